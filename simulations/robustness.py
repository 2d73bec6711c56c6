"""Poisoning at load: what lying devices do to the honest users (``[robustness]``).

For each fraction ``f`` of ``robustness.poison_fractions`` the runner repeats the
``personalized`` federation with ``f·N`` malicious devices (:mod:`fedpref.client.adversary`):
they verify and attest the policy exactly as honest devices do, so no server check can tell
them apart, and each round they send the largest update the server accepts (norm ``C``),
trained on their own (safe, unsafe) pairs relabelled so that the unsafe text wins.

Measured on the honest users only, against the attack-free run on the same users and the same
path (SecAgg+ runs get their own attack-free SecAgg+ control, ``poisoning_secagg.none``):

* ``honest_accuracy``: held-out pair accuracy (personal data, shared + private model);
* ``unbounded_violation``: (safe, unsafe) pairs whose unsafe text the personal model ranks first;
* ``bounded_violation``: the same with the device's frozen, verified classifier enforcing the
  bound (what a device's user is actually shown).

What protects honest users is on their own device: the bound is enforced by the classifier each
device verified against the trust root, whatever the shared model became. The server's part is
the per-update norm bound (``C``): an attacker moves the sum by at most ``C`` per device per
round, the same as any honest device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from fedpref.client.app import SimulatedDevices
from fedpref.client.data import UserData
from fedpref.client.device import stable_seed
from fedpref.client.terms import DeviceTerms
from fedpref.common.errors import ConfigError
from fedpref.model.cache import TextCache
from fedpref.protocol.runconfig import Method
from fedpref.simulations.progress import console
from fedpref.simulations.safety import SimPolicy, pooled_violation

__all__ = ["check_fractions", "malicious_users", "poisoning_summary", "run_poisoning"]


def malicious_users(users: dict[str, UserData], fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction·N)`` users (at least one), a seeded draw: one fixed order for every
    fraction, so each fraction's attackers include every smaller fraction's."""
    ids = sorted(users)
    order = np.random.default_rng(stable_seed(seed, "poisoners")).permutation(len(ids))
    k = max(1, round(fraction * len(ids)))
    return frozenset(ids[i] for i in order[:k])


def _summary(acc: dict[str, float], safety: dict | None, uids: list[str]) -> dict:
    out = {"users": len(uids), "honest_accuracy": float(np.mean([acc[u] for u in uids]))}
    if safety is not None:
        out["unbounded_violation"] = pooled_violation(safety["unbounded"], uids)
        out["bounded_violation"] = pooled_violation(safety["bounded"], uids)
    return out


def poisoning_summary(acc: dict[str, float], safety: dict | None, malicious: frozenset[str],
                      base_acc: dict[str, float], base_safety: dict | None) -> dict:
    """One poisoned run's numbers on its honest users, next to the attack-free run's on the same users."""
    honest = sorted(u for u in acc if u not in malicious)
    return {**_summary(acc, safety, honest), "malicious": sorted(malicious),
            "baseline": _summary(base_acc, base_safety, honest)}


def run_poisoning(
    cfg, users: dict[str, UserData], cache: TextCache, work: Path, *,  # noqa: ANN001 - SimConfig
    run_federation, evaluate_personalized,  # noqa: ANN001 - the runner's own phases, passed in
    sim_policy: SimPolicy | None, terms: DeviceTerms,
    base_acc: dict[str, float], base_safety: dict | None,
) -> dict:
    """The ``robustness`` section of ``results.json``.

    ``run_federation(workdir, devices, runtime)`` runs one ``personalized`` federation;
    ``evaluate_personalized(workdir, label)`` returns (per-user accuracy, safety evaluation or
    ``None``) for its final model. ``base_*``: the attack-free run's.
    """
    rb = cfg.robustness
    check_fractions(rb, len(users))
    own = "secagg" if cfg.runtime.secure_aggregation else "plain"  # the path of the run's attack-free federation
    runs: list[tuple[str, object, float | None]] = [(own, cfg.runtime, f) for f in rb.poison_fractions]
    if not cfg.runtime.secure_aggregation and rb.secure_aggregation_fractions:
        secure = dataclasses.replace(cfg.runtime, secure_aggregation=True)
        # SecAgg+'s own attack-free control first: its quantisation and projection cost accuracy
        # too, and that is not the attackers' doing
        runs += [("secagg", secure, None)] + [("secagg", secure, f) for f in rb.secure_aggregation_fractions]
    out: dict = {"poisoning": {"none": _summary(base_acc, base_safety, sorted(users))}, "seconds": {}}
    baselines = {own: (base_acc, base_safety)}
    for path, runtime, f in runs:
        bad = malicious_users(users, f, cfg.runtime.seed) if f is not None else frozenset()
        key = f"{f:g}" if f is not None else "none"
        label = (f"poisoning {key}" if f is not None else "no attack") + (" (SecAgg+)" if path == "secagg" else "")
        console.print(f"[bold]{label}[/]: {len(bad)} of {len(users)} devices lie; "
                      f"{cfg.federation.rounds} rounds of {Method.PERSONALIZED.value}")
        t0 = time.perf_counter()
        wd = work / "robustness" / f"{path}-{key}"
        run_federation(wd, SimulatedDevices(terms=terms, poison=bad, drop_rate=rb.drop_rate,
                                            fault_seed=cfg.runtime.seed), runtime)
        acc, safety = evaluate_personalized(wd, label)
        section = "poisoning" if path == own else "poisoning_secagg"
        if f is None:  # this path's attack-free control: each poisoned run on it is compared with it
            baselines[path] = (acc, safety)
            out.setdefault(section, {})["none"] = _summary(acc, safety, sorted(users))
        else:
            out.setdefault(section, {})[key] = poisoning_summary(acc, safety, bad, *baselines[path])
        out["seconds"][f"{path}-{key}"] = time.perf_counter() - t0
    out["paths"] = sorted({p for p, _, _ in runs}, key=["plain", "secagg"].index)
    return out


def check_fractions(rb, users: int) -> None:  # noqa: ANN001 - RobustnessConfig
    """Every fraction must leave at least one honest user to measure (checked before any run)."""
    for name in ("poison_fractions", "secure_aggregation_fractions"):
        for f in getattr(rb, name):
            if max(1, round(f * users)) >= users:
                raise ConfigError(f"robustness.{name} has {f:g}: with {users} users every device would lie and no "
                                  f"honest user is left to measure; use a fraction below {(users - 0.5) / users:.3f}")
