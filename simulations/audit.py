"""Empirical privacy audits on the ``persona`` benchmark (issue 5, section 4).

Formal ε is the guarantee; these audits show what an attacker actually gets.

(a) :func:`community_inference_audit`: an honest-but-curious server predicts each user's
    community from what it observes in one round: every user's clipped shared delta when
    secure aggregation is off, only the cohort's sum when it is on.
(b) :func:`membership_audit`: a loss-threshold attack (Yeom et al., CSF 2018) on each
    device's personal model tells the user's training pairs from held-out ones, with
    DP-SGD on and off at the same number of steps.

Both run the real device code (:mod:`fedpref.client.device`) on a fresh device folder per
user, restore the runtime's in-memory weights afterwards, and are deterministic given
``seed``: user ``i`` (in sorted user-id order) trains with seed ``seed + i``, and torch's
global generator, which Opacus draws its noise from, is forked and seeded around each run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedpref.client.data import PreferencePair, UserData
from fedpref.client.device import (
    DeclinedRound,
    DeviceState,
    Runtime,
    adapters_for,
    set_safety_module,
    train_private_locally,
    train_round,
    user_cache,
)
from fedpref.client.trainer import LocalTrainConfig, score_texts
from fedpref.model.cache import TextCache
from fedpref.model.preference import get_arrays, set_arrays
from fedpref.protocol.errors import ConfigError
from fedpref.protocol.messages import RoundConfig, TrainReply, TrainRequest, record_to_arrays, train_request
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group
from fedpref.safety_policy.classifier import attached
from fedpref.simulations.progress import progress


def _fresh_state(root: Path) -> DeviceState:
    """A device folder that holds nothing yet: no adapter or accountant from an earlier run."""
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"audit device folder {root} already holds device state; give the audit a new, empty workdir "
            "(a stale adapter or accountant would leak into the audit)"
        )
    root.mkdir(parents=True, exist_ok=True)
    return DeviceState(root)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator (Opacus' noise source) without disturbing the caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _restored(rt: Runtime) -> Iterator[None]:
    """Put the runtime back as it was (trainable weights, attached safety module and its
    snapshot): the audit leaves no trace in memory."""
    saved = {g: get_arrays(rt.model, g) for g in (Group.SHARED, Group.PRIVATE)}
    module, source = attached(rt.model), rt.safety_source
    try:
        yield
    finally:
        for g, arrays in saved.items():
            if arrays:
                set_arrays(rt.model, g, arrays)
        if attached(rt.model) is not module or rt.safety_source != source:
            set_safety_module(rt, module, source)


def _communities(users: dict[str, UserData]) -> list[str]:
    """Each user's community in sorted user-id order; needs ≥ 2 communities of ≥ 2 users."""
    labels = []
    for uid in sorted(users):
        c = users[uid].community
        if c is None:
            raise ConfigError(
                f"community inference: user {uid!r} has no community; give every pair a 'community' field"
            )
        labels.append(c)
    counts = Counter(labels)
    if len(counts) < 2:
        raise ConfigError(
            f"community inference needs ≥ 2 communities; the users have {len(counts)} ({sorted(counts)}); "
            "use data with several communities or skip this audit"
        )
    small = sorted(c for c, n in counts.items() if n < 2)
    if small:
        raise ConfigError(
            f"community inference needs ≥ 2 users per community for stratified cross-validation; "
            f"{', '.join(f'{c!r} has {counts[c]}' for c in small)}; add users or drop that community"
        )
    return labels


def cv_accuracy(features: np.ndarray, labels: Sequence[str], *, folds: int, seed: int) -> float:
    """Held-out accuracy of standardized logistic regression, pooled over stratified k folds.

    Every user is predicted exactly once, by a classifier that never saw them. When every row
    of ``features`` is the same (the secure aggregate), the classifier can only learn the
    training folds' class prior, so it scores the majority-class share whenever each training
    fold keeps the overall majority (always, unless the largest classes are nearly tied).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    pred = cross_val_predict(pipe, np.asarray(features, dtype=np.float64), y, cv=cv)
    return float(np.mean(pred == y))


# ---- (a) community inference ----------------------------------------------------------------
def community_inference_audit(
    rt: Runtime,
    users: dict[str, UserData],
    cache: TextCache | None,
    *,
    shared: dict[str, np.ndarray],
    round_cfg: RoundConfig,
    seed: int,
    workdir: str | Path,
    envelope: bytes | None = None,
    trust_root: bytes | None = None,
) -> dict:
    """How well an honest-but-curious server infers each user's community from one round.

    Every user runs the real device round (:func:`fedpref.client.device.train_round`) on a
    fresh device folder ``workdir/<user_id>``, from the same global ``shared`` weights, with
    ``round_cfg`` as the server sends it (local epochs, DP-SGD noise, clip norm
    ``round_cfg.clip_norm``). The attacker's features are the clipped delta each reply carries,
    flattened (parameter names sorted). With secure aggregation the server sees only the
    cohort's sum, the same vector for every user; the same classifier is scored on that.

    ``rt`` must hold the adapters ``round_cfg`` trains (``adapters_for(...)``), the shared one
    among them; ``cache`` is the run's text cache (None: each device builds its own). When a
    safety policy is in force (``round_cfg.policy_version > 0``), pass its signed ``envelope``
    and the devices' ``trust_root`` (root.json bytes), as the server and the ClientApp do.

    Returns ``{"individual_updates": accuracy, "secure_aggregate": accuracy, "chance": share
    of the largest community, "folds": k, "users": n, "by_tensor": {parameter name:
    accuracy}}``; accuracies are held-out, pooled over k = min(5, smallest community)
    stratified folds. ``by_tensor`` is the same attack on each parameter tensor of the delta
    alone: standardizing every coordinate gives the noise-only ones (LoRA, under DP-SGD) as
    much weight as the informative ones (the reward head), so the whole-delta attack can
    understate what a server that knows the architecture learns.

    Raises :class:`ConfigError` for fewer than 2 communities, a community of 1 user, a user
    without a community, a runtime that does not match ``round_cfg``, a non-empty device
    folder, or a round the fresh device declines (``max_epsilon_sample`` below one round, or
    a policy it cannot verify).
    """
    labels = _communities(users)
    if not round_cfg.train_shared:
        raise ConfigError("community inference: round_cfg.train_shared = False; the server sees no delta, use True")
    want = adapters_for(train_shared=round_cfg.train_shared, train_private=round_cfg.train_private)
    if set(rt.adapters) != set(want):
        raise ConfigError(
            f"community inference: the runtime has adapters {list(rt.adapters)} but round_cfg trains {list(want)}; "
            f"build it with get_runtime(model_cfg, {want!r})"
        )
    workdir = Path(workdir)
    req = TrainRequest.from_content(train_request(shared, round_cfg, envelope))  # what goes over the wire
    rows: list[np.ndarray] = []
    with _restored(rt), progress() as prog:
        task = prog.add_task("audit: community inference", total=len(users))
        for i, uid in enumerate(sorted(users)):
            user = users[uid]
            state = _fresh_state(workdir / uid)
            ucache = user_cache(rt, user, state, cache)
            try:
                with _seeded(seed + i):
                    content = train_round(
                        rt, user, state, req, cache=ucache, trust_root=trust_root, report_eval=False, seed=seed + i,
                    )
            except DeclinedRound as e:
                raise ConfigError(f"community inference: a fresh device for {uid!r} declines the round ({e})") from e
            delta = record_to_arrays(TrainReply.from_content(content).delta)  # what the server receives
            keys = sorted(delta)
            rows.append(np.concatenate([delta[k].ravel().astype(np.float64) for k in keys]))
            prog.advance(task)
    individual = np.stack(rows)  # (n, P)
    # with secure aggregation the server sees one sum, the same for everyone
    aggregate = np.repeat(individual.sum(axis=0, keepdims=True), len(rows), axis=0)  # (n, P)
    counts = Counter(labels)
    folds = max(2, min(5, min(counts.values())))
    bounds = np.cumsum([0] + [delta[k].size for k in keys])
    return {
        "individual_updates": cv_accuracy(individual, labels, folds=folds, seed=seed),
        "secure_aggregate": cv_accuracy(aggregate, labels, folds=folds, seed=seed),
        "chance": max(counts.values()) / len(labels),
        "folds": folds,
        "users": len(labels),
        # the same attack on one parameter tensor at a time: an attacker who knows the
        # architecture can drop the coordinates that carry only noise
        "by_tensor": {
            k: cv_accuracy(individual[:, a:b], labels, folds=folds, seed=seed)
            for k, a, b in zip(keys, bounds[:-1], bounds[1:])
        },
    }


# ---- (b) membership inference ---------------------------------------------------------------
@torch.no_grad()
def pair_losses(model: torch.nn.Module, cache: TextCache, pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Each pair's Bradley–Terry loss −log σ(r_chosen − r_rejected) under ``model``, (N,)."""
    if not pairs:
        return np.zeros(0)
    scores = score_texts(model, cache, [p.chosen for p in pairs] + [p.rejected for p in pairs])  # (2N,)
    n = len(pairs)
    return F.softplus(-(scores[:n] - scores[n:])).double().numpy()  # softplus(−m) = −log σ(m)


def membership_audit(
    rt: Runtime,
    users: dict[str, UserData],
    cache: TextCache | None,
    *,
    local_cfg: LocalTrainConfig,
    delta: float,
    seed: int,
    workdir: str | Path,
    shared: dict[str, np.ndarray] | None = None,
) -> dict:
    """Loss-threshold membership inference on each device's personal model, DP-SGD on and off.

    For each user, the private adapter is trained on the user's train pairs with the real
    device trainer (:func:`fedpref.client.device.train_private_locally`) twice, from the
    common initial adapter: once with ``local_cfg`` (DP-SGD; ``noise_multiplier`` must be
    > 0) in ``workdir/dp/<user_id>``, once with ``noise_multiplier = 0`` (plain SGD, no
    per-sample clip) in ``workdir/no_dp/<user_id>``. Epochs, batch size and learning rates
    are the same, so both take ``local_cfg.steps(n)`` steps. ``local_cfg.seed`` is replaced by
    ``seed + i`` for user ``i``. ``shared``: the global shared weights, required when ``rt``
    has the shared adapter (kept frozen, as in the ``finetuned`` method).

    The attack scores each pair by −loss under that user's model; members are the user's
    train pairs (label 1), non-members the user's test pairs. AUC pools every user's pairs.

    Returns ``{"dp": AUC, "no_dp": AUC, "pairs_member": int, "pairs_nonmember": int,
    "epsilon_sample": largest ε_sample of the DP runs at ``delta``}``.
    """
    from sklearn.metrics import roc_auc_score

    if PRIVATE_ADAPTER not in rt.adapters:
        raise ConfigError(
            f"membership audit: the runtime has adapters {list(rt.adapters)}; it needs {PRIVATE_ADAPTER!r}"
        )
    if SHARED_ADAPTER in rt.adapters and shared is None:
        raise ConfigError("membership audit: the runtime has the shared adapter; pass shared= (the global weights)")
    if not local_cfg.dp:
        raise ConfigError(
            f"membership audit: local_cfg.noise_multiplier = {local_cfg.noise_multiplier}; the DP arm needs "
            "DP-SGD noise > 0 (e.g. 1.0)"
        )
    if not users:
        raise ConfigError("membership audit: no users")
    workdir = Path(workdir)
    arms = {"dp": local_cfg, "no_dp": replace(local_cfg, noise_multiplier=0.0)}
    losses: dict[str, list[np.ndarray]] = {arm: [] for arm in arms}
    labels: list[np.ndarray] = []
    eps_max = 0.0
    with _restored(rt), progress() as prog:
        task = prog.add_task("audit: membership inference", total=len(users))
        for i, uid in enumerate(sorted(users)):
            user = users[uid]
            for arm, cfg in arms.items():
                state = _fresh_state(workdir / arm / uid)
                ucache = user_cache(rt, user, state, cache)
                with _seeded(seed + i):
                    eps = train_private_locally(
                        rt, user, state,
                        replace(cfg, seed=seed + i, noise_seed=None if cfg.noise_seed is None else cfg.noise_seed + i),
                        cache=ucache, shared=shared, delta=delta,
                    )
                if cfg.dp:
                    eps_max = max(eps_max, eps)
                losses[arm].append(np.concatenate([pair_losses(rt.model, ucache, user.train),
                                                   pair_losses(rt.model, ucache, user.test)]))
            labels.append(np.r_[np.ones(len(user.train)), np.zeros(len(user.test))])
            prog.advance(task)
    y = np.concatenate(labels)
    auc = {arm: float(roc_auc_score(y, -np.concatenate(v))) for arm, v in losses.items()}
    return {
        "dp": auc["dp"],
        "no_dp": auc["no_dp"],
        "pairs_member": int(y.sum()),
        "pairs_nonmember": int(len(y) - y.sum()),
        "epsilon_sample": eps_max,
    }


__all__ = ["community_inference_audit", "cv_accuracy", "membership_audit", "pair_losses"]
