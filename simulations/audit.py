"""Empirical privacy audits on the ``persona`` benchmark (issue 5; issue 10 item 9).

Formal ε is the guarantee; these audits show what an attacker actually gets, and each one is
built so that it *can* succeed: its no-DP arm must leak.

(a) Community inference by the server (:func:`replay_round`, :func:`community_inference_audit`):
    from one user's clipped shared delta (secure aggregation off), and from the difference of
    two aggregates in which one device drops out (a SecAgg server's differencing attack;
    pre-noise, and as an observer of the released, noised models sees it).
(b) Sample-level canary audit on devices (:func:`canary_membership_audit`): canary pairs
    planted in audited devices' data, each included with probability 1/2; a black-box attacker
    with the device's trained model and a white-box attacker with its clipped shared delta
    guess which were included. DP-SGD on and off, everything else the same.
(c) User-level canary audit of the server's release (:func:`user_level_canary_audit`), after
    Andrew et al., "One-shot empirical privacy estimation for federated learning" (ICLR 2024):
    canary users whose clipped update is a random unit direction × C, each in the population
    with probability 1/2; the attacker reads the released global updates.

(b) and (c) turn their guesses into an empirical ε lower bound from one run
(:mod:`fedpref.simulations.audit_bound`; Steinke, Nasr & Jagielski, NeurIPS 2023), reported next
to the formal ε. Every draw is seeded from ``seed`` (:func:`stable_seed`), so an
audit repeats exactly; nothing uses torch's global generator.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedpref.client.data import PreferencePair, Split, UserData
from fedpref.client.device import (
    DeclinedRound,
    DeviceState,
    Runtime,
    adapters_for,
    clip,
    set_safety_module,
    stable_seed,
    train_round,
    user_cache,
)
from fedpref.client.terms import DeviceTerms
from fedpref.client.trainer import LocalTrainConfig, score_texts, train_pairs
from fedpref.common.accounting import epsilon as formal_epsilon
from fedpref.common.accounting import epsilon_of_history
from fedpref.common.errors import ConfigError
from fedpref.model.cache import TextCache
from fedpref.model.preference import get_arrays, params_of, set_arrays
from fedpref.protocol.messages import RoundConfig, TrainReply, TrainRequest, record_to_arrays, train_request
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group
from fedpref.safety_policy.classifier import attached
from fedpref.simulations.audit_bound import one_run_audit
from fedpref.simulations.progress import progress


# ---- shared helpers ---------------------------------------------------------------------------
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


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One vector, parameters in sorted-name order, (P,) float64."""
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def community_labels(users: dict[str, UserData]) -> list[str]:
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
    of ``features`` is the same, the classifier can only learn the training folds' class
    prior, so it scores the majority-class share whenever each training fold keeps the
    overall majority (always, unless the largest classes are nearly tied).
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


# ---- (a) community inference: individual updates and dropout differencing -----------------------
@dataclass(frozen=True)
class Replay:
    """One replayed round: every user's clipped shared delta as the server receives it."""

    uids: tuple[str, ...]  # sorted
    deltas: np.ndarray  # (n, P) float64, parameters in sorted-name order
    sizes: dict[str, int]  # parameter name -> coordinates, sorted by name


def replay_round(
    rt: Runtime,
    users: dict[str, UserData],
    cache: TextCache | None,
    *,
    shared: dict[str, np.ndarray],
    round_cfg: RoundConfig,
    terms: DeviceTerms,
    seed: int,
    workdir: str | Path,
    envelope: bytes | None = None,
    trust_root: bytes | None = None,
) -> Replay:
    """Every user runs the real device round (:func:`fedpref.client.device.train_round`) on a
    fresh device folder ``workdir/<user_id>``, from the same global ``shared`` weights, with
    ``round_cfg`` as the server sends it, under the devices' own ``terms``; the clipped delta
    of each reply is kept.

    ``rt`` must hold the adapters ``round_cfg`` trains; ``cache`` is the run's text cache
    (None: each device builds its own). With a safety policy in force pass its signed
    ``envelope`` and the devices' ``trust_root``. User ``i`` (sorted ids) samples batches with
    ``stable_seed(seed, "audit", "replay", i)`` and draws its DP-SGD noise from
    ``stable_seed(seed, "audit", "replay-noise", i)``: a different ``seed`` is a fresh round.
    Raises :class:`ConfigError` for a mismatched runtime, a non-empty device folder, or a round
    a fresh device declines. The runtime's weights are restored afterwards.
    """
    if not round_cfg.train_shared:
        raise ConfigError("replay_round: round_cfg.train_shared = False; the server sees no delta, use True")
    want = adapters_for(train_shared=round_cfg.train_shared, train_private=round_cfg.train_private)
    if set(rt.adapters) != set(want):
        raise ConfigError(
            f"replay_round: the runtime has adapters {list(rt.adapters)} but round_cfg trains {list(want)}; "
            f"build it with get_runtime(model_cfg, {want!r})"
        )
    workdir = Path(workdir)
    req = TrainRequest.from_content(train_request(shared, round_cfg, envelope))  # what goes over the wire
    rows: list[np.ndarray] = []
    sizes: dict[str, int] = {}
    with _restored(rt), progress() as prog:
        task = prog.add_task("audit: replaying a round", total=len(users))
        for i, uid in enumerate(sorted(users)):
            user = users[uid]
            state = _fresh_state(workdir / uid)
            ucache = user_cache(rt, user, state, cache)
            try:
                content = train_round(
                    rt, user, state, req, cache=ucache, terms=terms, trust_root=trust_root,
                    batch_seed=stable_seed(seed, "audit", "replay", i),
                    noise_seed=stable_seed(seed, "audit", "replay-noise", i),
                )
            except DeclinedRound as e:
                raise ConfigError(f"replay_round: a fresh device for {uid!r} declines the round ({e})") from e
            delta = record_to_arrays(TrainReply.from_content(content).delta)  # what the server receives
            sizes = {k: int(np.size(delta[k])) for k in sorted(delta)}
            rows.append(_flat(delta))
            prog.advance(task)
    return Replay(uids=tuple(sorted(users)), deltas=np.stack(rows), sizes=sizes)


SHUFFLES = 10  # label shuffles for the best attack's chance level


def _attacks(features: np.ndarray, labels: list[str], sizes: dict[str, int], *, folds: int, seed: int) -> dict:
    """The classifier on the whole vector and on each parameter tensor alone; ``best`` is the
    strongest (an auditor reports the strongest attack it tried)."""
    bounds = np.cumsum([0, *sizes.values()])
    whole = cv_accuracy(features, labels, folds=folds, seed=seed)
    by_tensor = {k: cv_accuracy(features[:, a:b], labels, folds=folds, seed=seed)
                 for k, a, b in zip(sizes, bounds[:-1], bounds[1:])}
    return {"best": max(whole, *by_tensor.values()), "whole": whole, "by_tensor": by_tensor}


def community_inference_audit(
    users: dict[str, UserData],
    first: Replay,
    second: Replay,
    *,
    clip_norm: float,
    server_noise_multiplier: float,
    expected_cohort: float,
    seed: int,
) -> dict:
    """How well a server (or an observer of the released models) infers each user's community.

    ``first`` and ``second`` are two replays of the same round (:func:`replay_round`, same
    global weights, different seeds) by the same cohort ``users``. The attacker is standardized
    logistic regression, scored held-out over k = min(5, smallest community) stratified folds,
    on the whole vector and on each parameter tensor alone (the best is reported; standardizing
    gives noise-only coordinates as much weight as informative ones). Features per user i:

    - ``individual_updates``: d_i, the clipped delta the server receives without SecAgg;
    - ``differencing.secagg_server``: S − S₋ᵢ, two pre-noise aggregates of the same replies, one
      with user i dropped out: exactly d_i, so SecAgg alone does not hide one device from a
      server that can make it drop out while everyone else's reply stays the same;
    - ``differencing.secagg_server_rerun``: S − S'₋ᵢ, the second aggregate from a re-run of the
      round (``second``) without i: d_i plus the others' fresh DP-SGD noise;
    - ``differencing.released_observer``: the difference of the released (noised) means of S
      and S₋ᵢ, via the server's own :func:`fedpref.server.release.noisy_mean` (noise std
      √2·z·C/E[m] on the difference); the strongest observer: the rest of the cohort cancels.

    Returns those accuracies (best attack), ``chance`` (share of the largest community),
    ``chance_best_attack`` (mean, and ``_max``, of the best attack's accuracy on the individual
    updates with the communities shuffled among users, :data:`SHUFFLES` times: what the best of
    several attackers reaches by luck), ``folds``, ``users``, and per feature set the
    whole-vector accuracy and ``by_tensor``.
    """
    from fedpref.server.release import dp_generator, noisy_mean

    labels = community_labels(users)
    if first.uids != tuple(sorted(users)) or second.uids != first.uids:
        raise ConfigError("community_inference_audit: both replays must be of exactly these users, sorted")
    counts = Counter(labels)
    folds = max(2, min(5, min(counts.values())))
    a, b = first.deltas, second.deltas  # (n, P)
    total_a, total_b = a.sum(axis=0), b.sum(axis=0)  # (P,) what SecAgg unmasks
    rng = dp_generator((stable_seed(seed, "audit", "differencing-noise"),))

    def released(total: np.ndarray) -> np.ndarray:  # (P,) the released mean delta
        return noisy_mean({"s": total}, expected_cohort=expected_cohort, clip_norm=clip_norm,
                          noise_multiplier=server_noise_multiplier, rng=rng)["s"]

    full = released(total_a)
    features = {
        "individual_updates": a,
        "secagg_server": total_a[None] - (total_a[None] - a),  # (n, P)
        "secagg_server_rerun": total_a[None] - (total_b[None] - b),  # (n, P)
        "released_observer": np.stack([(full - released(total_a - a[i])) * expected_cohort for i in range(len(a))]),
    }
    res = {k: _attacks(v, labels, first.sizes, folds=folds, seed=seed) for k, v in features.items()}
    ind = res.pop("individual_updates")
    # what "best of several attackers" scores by luck on this few users: the same attackers with
    # the communities shuffled among the users
    shuffle = np.random.default_rng(stable_seed(seed, "audit", "shuffled-communities"))
    null = [_attacks(a, list(shuffle.permutation(labels)), first.sizes, folds=folds, seed=seed)["best"]
            for _ in range(SHUFFLES)]
    return {
        "individual_updates": ind["best"],
        "individual_updates_whole_delta": ind["whole"],
        "by_tensor": ind["by_tensor"],
        "differencing": {
            **{k: r["best"] for k, r in res.items()},
            "whole_delta": {k: r["whole"] for k, r in res.items()},
            "noise_std_difference": math.sqrt(2) * server_noise_multiplier * clip_norm / expected_cohort,
            "cohort": len(labels),
        },
        "chance": max(counts.values()) / len(labels),
        "chance_best_attack": float(np.mean(null)),
        "chance_best_attack_max": float(np.max(null)),
        "folds": folds,
        "users": len(labels),
    }


# ---- (b) sample-level canary audit on devices -----------------------------------------------------
@torch.no_grad()
def pair_losses(model: torch.nn.Module, cache: TextCache, pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Each pair's Bradley–Terry loss −log σ(r_chosen − r_rejected) under ``model``, (N,)."""
    if not pairs:
        return np.zeros(0)
    scores = score_texts(model, cache, [p.chosen for p in pairs] + [p.rejected for p in pairs])  # (2N,)
    n = len(pairs)
    return F.softplus(-(scores[:n] - scores[n:])).double().numpy()  # softplus(−m) = −log σ(m)


def canary_pairs(rt: Runtime, n: int, *, seed: int, words: int = 12) -> list[PreferencePair]:
    """``n`` canary pairs: each text is ``words`` random whole words of the backbone's own
    vocabulary, so they tokenize cleanly and look like nothing in the benchmark; which text is
    "chosen" is arbitrary (a random label), so only memorisation can predict it."""
    vocab = sorted({w.lstrip("▁Ġ") for w in rt.backbone.tokenizer.get_vocab()})
    vocab = [w for w in vocab if re.fullmatch(r"[a-z]{4,12}", w)]
    if len(vocab) < 100:
        raise ConfigError(f"canary_pairs: the tokenizer has only {len(vocab)} plain lower-case words; need ≥ 100")
    rng = np.random.default_rng(seed)
    text = lambda: " ".join(vocab[j] for j in rng.choice(len(vocab), size=words, replace=False))  # noqa: E731
    return [PreferencePair(user_id="canary", prompt="canary", chosen=text(), rejected=text(), split=Split.TRAIN)
            for _ in range(n)]


def _shared_gradients(rt: Runtime, cache: TextCache, pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Unit-norm gradient of each pair's BT loss w.r.t. the shared parameters at the model's
    current weights, (N, P), parameters in sorted-name order (the layout of :func:`_flat`)."""
    params = sorted(params_of(rt.model, Group.SHARED).items())
    rt.model.eval()
    rows = []
    for p in pairs:
        ids, mask, rep = cache.batch([p.chosen, p.rejected])
        r = rt.model(ids, mask, rep)  # (2,)
        live = [t for _, t in params if t.requires_grad]
        grads = iter(torch.autograd.grad(F.softplus(-(r[0] - r[1])), live, allow_unused=True))
        flat = []
        for _, t in params:
            g = next(grads) if t.requires_grad else None
            flat.append((g if g is not None else torch.zeros_like(t)).detach().double().reshape(-1))
        v = torch.cat(flat).numpy()
        rows.append(v / max(np.linalg.norm(v), 1e-30))
    return np.stack(rows)


def _with_texts(rt: Runtime, cache: TextCache, texts: list[str]) -> TextCache:
    """``cache`` plus the hidden states of ``texts`` (a new object; ``cache`` is left alone)."""
    new = TextCache.build(rt.model, rt.backbone, cache.missing(texts), max_length=rt.max_length)
    return TextCache({**cache.ids, **new.ids}, {**cache.states, **new.states}, cache.pad_id, cache.layout)


def canary_membership_audit(
    rt: Runtime,
    users: dict[str, UserData],
    cache: TextCache,
    *,
    shared: dict[str, np.ndarray],
    local_cfg: LocalTrainConfig,
    clip_norm: float,
    canaries_per_device: int,
    delta: float,
    seed: int,
    beta: float = 0.05,
) -> dict:
    """Sample-level canary audit: which planted pairs did each device train on?

    Each audited device (one per user in ``users``) gets ``canaries_per_device`` canary pairs
    (:func:`canary_pairs`), each included in its training data independently with probability
    1/2. The device trains its shared and private adapters together, as in a personalized round,
    with the real trainer (:func:`fedpref.client.trainer.train_pairs`) on its train pairs plus
    its included canaries, from the global ``shared`` weights and the initial private adapter,
    twice: with ``local_cfg`` (DP-SGD, σ > 0) and with σ = 0 (plain SGD, no per-sample clip);
    the same epochs, learning rates and batch-sampling seed. Two attackers score each canary:

    - ``model`` (black box, the device's trained model and the public global model): the drop
      in the canary's BT loss from the global model to the device's model;
    - ``white_box`` (the device's shared delta as the server sees it, clipped to ``clip_norm``
      by the device's own :func:`fedpref.client.device.clip`): −⟨Δ, g⟩/‖g‖, g the gradient of
      the canary's BT loss w.r.t. the shared weights at the global weights.

    Canaries of all devices are pooled (each affects one device's training only, so the
    whole experiment is ε_sample-DP in each canary). Per arm: ``auc``, ``epsilon_lower`` (the
    larger attacker's, at confidence 1−β over both attackers, :func:`one_run_audit`) and each
    attacker's details; the DP arm adds ``epsilon_formal``, the largest ε_sample (Opacus RDP, at
    ``delta``) of the audited devices' DP training (this training, not the demo's).
    """
    if set(rt.adapters) != {SHARED_ADAPTER, PRIVATE_ADAPTER}:
        raise ConfigError(f"canary audit: the runtime has adapters {list(rt.adapters)}; it needs both "
                          f"({SHARED_ADAPTER!r}, {PRIVATE_ADAPTER!r}), as a personalized device")
    if not local_cfg.dp:
        raise ConfigError(f"canary audit: local_cfg.noise_multiplier = {local_cfg.noise_multiplier}; the DP arm "
                          "needs DP-SGD noise > 0 (e.g. 1.0)")
    if not users or canaries_per_device < 1:
        raise ConfigError(f"canary audit: {len(users)} devices, {canaries_per_device} canaries each; use ≥ 1 of both")
    ids, m = sorted(users), canaries_per_device
    pairs = canary_pairs(rt, len(ids) * m, seed=stable_seed(seed, "audit", "canary-texts"))
    included = np.random.default_rng(stable_seed(seed, "audit", "canary-inclusion")).random(len(pairs)) < 0.5
    ccache = _with_texts(rt, cache, [t for p in pairs for t in (p.chosen, p.rejected)])
    arms = {"dp": local_cfg, "no_dp": replace(local_cfg, noise_multiplier=0.0)}
    scores = {arm: {"model": np.zeros(len(pairs)), "white_box": np.zeros(len(pairs))} for arm in arms}
    eps_formal, steps = 0.0, []
    with _restored(rt), progress() as prog:
        set_arrays(rt.model, Group.SHARED, shared)
        set_arrays(rt.model, Group.PRIVATE, rt.initial_private)
        ref_loss = pair_losses(rt.model, ccache, pairs)  # (M,) under the global model
        grads = _shared_gradients(rt, ccache, pairs)  # (M, P)
        task = prog.add_task("audit: canaries on devices", total=len(ids) * len(arms))
        for i, uid in enumerate(ids):
            sl = slice(i * m, (i + 1) * m)
            train = [*users[uid].train, *(p for p, inc in zip(pairs[sl], included[sl]) if inc)]
            for arm, cfg in arms.items():
                set_arrays(rt.model, Group.SHARED, shared)
                set_arrays(rt.model, Group.PRIVATE, rt.initial_private)
                cfg_i = replace(cfg, seed=stable_seed(seed, "audit", "canary-batches", i),
                                noise_seed=stable_seed(seed, "audit", "canary-noise", i))
                result = train_pairs(rt.model, ccache, [p.chosen for p in train], [p.rejected for p in train], cfg_i,
                                     frozen_snapshot=rt.snapshot)
                if cfg.dp:
                    eps_formal = max(eps_formal, epsilon_of_history(history=result.accountant_history, delta=delta))
                    steps.append(result.steps)
                new = get_arrays(rt.model, Group.SHARED)
                d, _ = clip({k: new[k] - shared[k] for k in shared}, clip_norm)  # what the device sends
                scores[arm]["white_box"][sl] = -(grads[sl] @ (_flat(d)))
                scores[arm]["model"][sl] = ref_loss[sl] - pair_losses(rt.model, ccache, pairs[sl])
                prog.advance(task)
    out: dict = {}
    for arm, by_attack in scores.items():
        res = {k: one_run_audit(s, included, delta=delta, beta=beta, family=len(by_attack)) for k, s in by_attack.items()}
        top = max(res.values(), key=lambda r: r["epsilon_lower"])
        out[arm] = {"auc": max(r["auc"] or 0.5 for r in res.values()), "epsilon_lower": top["epsilon_lower"],
                    "correct": top["correct"], "guesses": top["guesses"], "confidence": 1 - beta, **res}
    out["dp"]["epsilon_formal"] = eps_formal
    out.update(devices=len(ids), canaries_per_device=m, canaries=len(pairs), included=int(included.sum()), delta=delta,
               steps_dp=[min(steps), max(steps)], epochs=local_cfg.epochs, batch_size=local_cfg.batch_size,
               learning_rate=local_cfg.learning_rate, head_learning_rate=local_cfg.head_learning_rate,
               noise_multiplier=local_cfg.noise_multiplier, max_grad_norm=local_cfg.max_grad_norm)
    return out


# ---- (c) user-level canary audit of the server's release -------------------------------------------
def user_level_canary_audit(
    real_deltas: np.ndarray,
    *,
    population: int,
    sample_rate: float,
    clip_norm: float,
    noise_multiplier: float,
    rounds: int,
    canaries: int,
    delta: float,
    seed: int,
    beta: float = 0.05,
) -> dict:
    """Canary users against the server's release, DP (``noise_multiplier`` z) and no-DP (z = 0).

    After Andrew et al. (ICLR 2024): ``canaries`` canary users, each with a random unit
    direction u_j (in the shared partition's dimension, ``real_deltas.shape[1]``) whose clipped
    update is C·u_j in every round it takes part. Each canary is in the population with
    probability 1/2 and then, like every user, joins each round with probability q =
    ``sample_rate``. ``population`` real users are Poisson-sampled too; user j contributes row
    ``j mod n`` of ``real_deltas`` (clipped real deltas, reused across users and rounds). Each
    round the server releases :func:`fedpref.server.release.noisy_mean` of the sum with E[m] =
    q·``population`` (the canaries do not change the denominator: each user's sensitivity stays
    C/E[m] against noise z·C/E[m]). The attacker scores canary j by the cosine of the sum of the
    released updates with u_j. Both arms share every draw except the noise.

    Returns per arm ``auc``, ``epsilon_lower`` (:func:`one_run_audit`), the guess counts, and
    for the DP arm ``epsilon_formal`` (Opacus RDP over ``rounds`` rounds at q, z, ``delta``:
    the run's ε_user), plus the setup.
    """
    from fedpref.server.release import dp_generator, noisy_mean

    real = np.asarray(real_deltas, dtype=np.float64)
    if real.ndim != 2 or not len(real) or population < 1 or canaries < 2 or rounds < 1:
        raise ConfigError(f"user-level audit: need real deltas (n ≥ 1, P), population ≥ 1, canaries ≥ 2, rounds ≥ 1; "
                          f"got {real.shape}, {population}, {canaries}, {rounds}")
    if np.linalg.norm(real, axis=1).max() > clip_norm * (1 + 1e-6):
        raise ConfigError(f"user-level audit: a real delta is longer than clip_norm = {clip_norm}; pass clipped deltas")
    rng = np.random.default_rng(stable_seed(seed, "audit", "user-canaries"))
    u = rng.standard_normal((canaries, real.shape[1]))
    u /= np.linalg.norm(u, axis=1, keepdims=True)  # (k, P) unit directions
    included = rng.random(canaries) < 0.5
    rows = np.arange(population) % len(real)
    expected = sample_rate * population
    arms = {"dp": noise_multiplier, "no_dp": 0.0}
    released = {arm: np.zeros(real.shape[1]) for arm in arms}
    noise = {arm: dp_generator((stable_seed(seed, "audit", "user-noise", arm),)) for arm in arms}
    for _ in range(rounds):
        real_in = rng.random(population) < sample_rate
        canary_in = included & (rng.random(canaries) < sample_rate)
        total = real[rows[real_in]].sum(axis=0) + clip_norm * u[canary_in].sum(axis=0)  # (P,)
        for arm, z in arms.items():
            released[arm] += noisy_mean({"s": total}, expected_cohort=expected, clip_norm=clip_norm,
                                        noise_multiplier=z, rng=noise[arm])["s"]
    out: dict = {}
    for arm, theta in released.items():
        cos = u @ theta / max(np.linalg.norm(theta), 1e-30)  # (k,)
        out[arm] = one_run_audit(cos, included, delta=delta, beta=beta)
    out["dp"]["epsilon_formal"] = formal_epsilon(sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                                                 steps=rounds, delta=delta)
    out.update(canaries=canaries, dims=int(real.shape[1]), rounds=rounds, population=population,
               sample_rate=sample_rate, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
               real_deltas=len(real), delta=delta)
    return out


__all__ = [
    "SHUFFLES", "Replay", "canary_membership_audit", "canary_pairs", "community_inference_audit", "community_labels",
    "cv_accuracy", "pair_losses", "replay_round", "user_level_canary_audit",
]
