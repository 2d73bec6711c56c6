"""New users: what the federation gives a user who was not part of it (``[new_users]``).

A share of each community is held out of every federated and local run. After training, each
held-out user joins with its first ``k`` training pairs, for every ``k`` in ``new_users.pairs``:

* ``personalized``: the personalized federation's final shared weights, kept frozen, plus a
  private adapter fitted on the ``k`` pairs with the same DP-SGD as ``local`` (``k = 0``: the
  common initial private adapter, i.e. the shared model alone);
* ``local``: a private adapter fitted on the ``k`` pairs alone, same DP-SGD (``k = 0``: untrained);
* ``aggregated``: the aggregated federation's final shared model (it does not use the pairs);
* ``oracle``: the generator's truth on the same held-out pairs.

Every method is evaluated on the new user's whole held-out test split.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedpref.client.data import UserData
from fedpref.client.device import DeviceState, Runtime, stable_seed, train_private_locally
from fedpref.model.cache import TextCache
from fedpref.model.preference import set_arrays
from fedpref.protocol.partition import Group
from fedpref.simulations.evaluation import method_summary
from fedpref.simulations.progress import progress

__all__ = ["hold_out", "new_user_study"]


def hold_out(users: dict[str, UserData], fraction: float, seed: int) -> tuple[dict[str, UserData], dict[str, UserData]]:
    """(federated, new): ``round(fraction·n_c)`` users of each community ``c`` held out (a seeded
    draw; at least one per community when ``fraction > 0``, never a whole community)."""
    if fraction <= 0:
        return users, {}
    by_comm: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(users):
        by_comm[users[uid].community or "all"].append(uid)
    rng = np.random.default_rng(stable_seed(seed, "new-users"))
    new: set[str] = set()
    for comm, ids in sorted(by_comm.items()):
        k = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        new.update(ids[i] for i in rng.permutation(len(ids))[:k])
    return ({u: d for u, d in users.items() if u not in new}, {u: d for u, d in users.items() if u in new})


def new_user_study(
    cfg, new: dict[str, UserData], cache: TextCache, work: Path, *,  # noqa: ANN001 - SimConfig
    rt_both: Runtime, rt_priv: Runtime, rt_shared: Runtime,
    shared_personalized: dict[str, np.ndarray], shared_aggregated: dict[str, np.ndarray],
) -> dict:
    """The ``new_users`` section of ``results.json``: ``<method>.<k>.mean_accuracy`` (and per
    community, per user), the pairs each k had, and the seconds the study took."""
    from fedpref.simulations.runner import _local_cfg, evaluate

    t0 = time.perf_counter()
    ks = sorted(set(cfg.new_users.pairs))
    short = {uid: len(u.train) for uid, u in new.items() if len(u.train) < max(ks)}
    out: dict = {m: {} for m in ("personalized", "local", "aggregated", "oracle")}
    set_arrays(rt_shared.model, Group.SHARED, shared_aggregated)
    aggregated = evaluate(rt_shared, new, cache, private_root=None, label="new users: aggregated")
    oracle = {uid: float(np.mean([p.oracle_margin > 0 for p in u.test])) for uid, u in new.items()
              if all(p.oracle_margin is not None for p in u.test)}
    epochs = cfg.methods.local_epochs
    with progress() as bar:
        task = bar.add_task("new users: fit k pairs", total=len(ks) * len(new) * 2)
        for k in ks:
            subset = {uid: dataclasses.replace(u, train=u.train[:k]) for uid, u in new.items()}
            for method, rt, shared in (("personalized", rt_both, shared_personalized), ("local", rt_priv, None)):
                root = work / "new_users" / method / str(k)
                for i, (uid, user) in enumerate(subset.items()):
                    if k > 0 and user.train:
                        train_private_locally(rt, user, DeviceState(root / uid),
                                              _local_cfg(cfg, epochs, stable_seed(cfg.runtime.seed, uid, k, method) % 2**31),
                                              cache=cache, shared=shared, delta=cfg.federation.delta)
                    bar.advance(task)
                if shared is not None:
                    set_arrays(rt.model, Group.SHARED, shared)
                per_user = evaluate(rt, new, cache, private_root=root, label=f"new users: {method}, k={k}")
                out[method][str(k)] = method_summary(per_user, new)
            out["aggregated"][str(k)] = method_summary(aggregated, new)
            if len(oracle) == len(new):
                out["oracle"][str(k)] = method_summary(oracle, new)
    if not out["oracle"]:
        del out["oracle"]
    out["users"] = sorted(new)
    out["pairs"] = ks
    out["fewer_train_pairs_than_k"] = short  # such users train on all they have at the larger k
    out["epochs"] = epochs
    out["seconds"] = time.perf_counter() - t0
    return out
