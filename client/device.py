"""One device's side of a round: verify, load, train with DP-SGD, clip, save, reply.

:class:`Runtime` holds what a process keeps in memory between rounds (the frozen model,
its snapshot for the bit-identity check, the initial private adapter). Everything per user
lives on disk in :class:`DeviceState`, keyed by the user or node, never in Flower's
``Context``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpref.client.data import UserData
from fedpref.client.terms import DeviceTerms
from fedpref.client.trainer import LocalTrainConfig, TrainResult, _frozen_snapshot, pair_accuracy, train_pairs
from fedpref.common.accounting import SampleLevelAccountant
from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import AlreadyPersonalized, DeclinedRound, FedPrefError, IntegrityError, PolicyRefused
from fedpref.model.backbone import Backbone, load_backbone
from fedpref.model.basis import model_identity
from fedpref.model.cache import TextCache
from fedpref.model.config import ModelConfig
from fedpref.model.io import adapter_exists, load_adapter_weights, save_adapter
from fedpref.model.preference import build_model, get_arrays, set_arrays
from fedpref.protocol.messages import (
    PROTOCOL_VERSION,
    Attestation,
    RoundConfig,
    TrainMetrics,
    TrainRequest,
    l2_norm,
    personalize_reply,
    train_reply,
    weights_digest,
)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group, group_of
from fedpref.safety_policy.classifier import SafetyModule, attach, attached
from fedpref.safety_policy.errors import PolicyError
from fedpref.safety_policy.root import load_root
from fedpref.safety_policy.store import PolicyStore
from fedpref.safety_policy.verify import Policy

log = logging.getLogger("fedpref.client")


@dataclass
class Runtime:
    backbone: Backbone
    model: nn.Module
    adapters: tuple[str, ...]
    snapshot: dict[str, torch.Tensor]
    initial_private: dict[str, np.ndarray]
    max_length: int
    identity: str = ""  # the frozen weights this device attests: backbone sha256 (+ attribute basis)
    safety_source: str | None = field(default=None)  # sha256 of the envelope whose module is attached


@functools.lru_cache(maxsize=4)
def get_runtime(model_cfg: ModelConfig, adapters: tuple[str, ...]) -> Runtime:
    """Load the backbone and build the PEFT model once per process and adapter set."""
    backbone = load_backbone(model_cfg.backbone or None)
    model = build_model(backbone, model_cfg.adapter, adapters=adapters)
    return Runtime(
        backbone=backbone, model=model, adapters=adapters, snapshot=_frozen_snapshot(model),
        initial_private=get_arrays(model, Group.PRIVATE) if PRIVATE_ADAPTER in adapters else {},
        max_length=model_cfg.max_length, identity=model_identity(backbone.sha256, model_cfg.adapter),
    )


def adapters_for(*, train_shared: bool, train_private: bool) -> tuple[str, ...]:
    return tuple(a for a, on in ((SHARED_ADAPTER, train_shared), (PRIVATE_ADAPTER, train_private)) if on)


class DeviceState:
    """Everything a device keeps for one user, under one folder.

    The private adapter and the accountant go through the methods below, so that a device
    agent can keep them encrypted (:class:`fedpref.client.agent_state.EncryptedDeviceState`);
    the simulation keeps them as plain files.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load_private(self, rt: Runtime) -> None:
        """The user's private adapter, or the common initial one for a new user."""
        if adapter_exists(self.private_dir):
            load_adapter_weights(rt.model, PRIVATE_ADAPTER, self.private_dir)
        else:
            set_arrays(rt.model, Group.PRIVATE, rt.initial_private)

    def save_private(self, rt: Runtime, *, metadata: dict[str, str] | None = None) -> None:
        save_adapter(rt.model, PRIVATE_ADAPTER, self.private_dir, metadata=metadata)

    def save_accountant(self, acct: SampleLevelAccountant) -> None:
        acct.save()

    def received_global(self, rt: Runtime, server_round: int, shared: dict[str, np.ndarray]) -> None:
        """The global shared weights a round brought, after the reply is computed (a device
        agent keeps them to rank with; the simulation evaluates from the server's checkpoints)."""

    def personalized_on(self) -> str:
        """sha256 (:func:`~fedpref.protocol.messages.weights_digest`) of the global weights the
        private adapter was last personalized on; ``""``: never."""
        try:
            return self.personalized_path.read_text().strip()
        except FileNotFoundError:
            return ""

    def record_personalized(self, sha256: str) -> None:
        write_text_atomic(self.personalized_path, sha256 + "\n")

    @property
    def personalized_path(self) -> Path:
        return self.root / "personalized-on.txt"

    @property
    def private_dir(self) -> Path:
        return self.root / "adapters" / PRIVATE_ADAPTER

    @property
    def accountant_path(self) -> Path:
        return self.root / "accountant.json"

    @property
    def cache_path(self) -> Path | None:
        """Where the hidden-state cache of the user's texts is kept (None: rebuilt in memory)."""
        return self.root / "cache.safetensors"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policy"

    def accountant(self) -> SampleLevelAccountant:
        if not self.accountant_path.exists():
            self.refuse_lost_accountant(has_private=adapter_exists(self.private_dir), where=self.accountant_path)
        return SampleLevelAccountant.load(self.accountant_path)

    @staticmethod
    def refuse_lost_accountant(*, has_private: bool, where: Path) -> None:
        """A trained private adapter without its accountant means spent privacy would be forgotten:
        fail closed instead of starting a fresh history."""
        if has_private:
            raise IntegrityError(f"{where}: the private adapter exists but its DP accountant does not; restore the "
                                 "accountant from a backup, or `fedpref-agent forget` to start afresh")

    @contextlib.contextmanager
    def accountant_lock(self) -> Iterator[None]:
        """Exclusive across processes (Flower may run two rounds of two runs at once): the
        accountant's load → budget check → charge → save is one step, so no charge is lost."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "accountant.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def policy_store(self) -> PolicyStore:
        return PolicyStore(self.policy_dir)


def set_safety_module(rt: Runtime, module: SafetyModule | None, source: str | None) -> None:
    """Attach (or remove) the frozen safety module and refresh its bit-identity snapshot."""
    attach(rt.model, module)
    for name in [n for n in rt.snapshot if group_of(n) is Group.SAFETY]:
        del rt.snapshot[name]
    for name, p in rt.model.named_parameters():
        if group_of(name) is Group.SAFETY:
            rt.snapshot[name] = p.detach().clone()
    rt.safety_source = source


def enforce_policy(
    rt: Runtime,
    state: DeviceState,
    *,
    required_version: int,
    envelope: bytes | None,
    trust_root: bytes | None,
    now: datetime | None = None,
    tamper: bool = False,
    roots: tuple[bytes, ...] = (),
):
    """Install ``envelope`` if sent, check the policy the server requires, attach its module.

    ``roots`` (sent with the envelope) may carry trust-root versions newer than the pinned
    one: the device follows the chain (each version signed by a threshold of the previous
    one's keys and of its own) before verifying the envelope, so a key rotation reaches it.

    Fails closed: any verification error raises :class:`PolicyRefused` and the previously
    installed policy stays in force on disk. Returns the verified Policy, or ``None`` when
    neither side has one. ``tamper`` perturbs the attached safety weights *after*
    verification: it simulates a compromised device, for the tampered-client experiment
    (which then attests the digest an honest device would: see :func:`attest`).
    """
    now = now or datetime.now(timezone.utc)
    store = state.policy_store()
    try:
        root = store.trusted_root(now=now)
        if root is None and trust_root is not None:
            root = store.init_root(trust_root, now=now)
        if root is not None and roots:
            newer = sorted((v, r) for r in roots if (v := load_root(r).version) > root.version)
            if newer:
                root = store.update_root([r for _, r in newer], now=now)
                log.info("followed the trust root to v%d", root.version)
        if envelope is not None and hashlib.sha256(envelope).hexdigest() != store.envelope_sha256:
            if root is None:
                raise PolicyRefused("a policy arrived but this device has no trust root pinned; pin root.json first")
            policy = store.install(envelope, root, now=now, backbone_sha256=rt.backbone.sha256)
            log.info("installed safety policy v%d (%s)", policy.version, policy.envelope_sha256[:12])
        installed = store.version
        if installed != required_version:
            raise PolicyRefused(
                f"the server enforces policy v{required_version}, this device has v{installed} "
                f"and {'received no newer envelope' if envelope is None else 'the envelope sent is not that version'}"
            )
        if installed == 0:
            set_safety_module(rt, None, None)
            return None
        assert root is not None  # a policy can only have been installed under a root
        policy = store.current(root, now, backbone_sha256=rt.backbone.sha256)
    except PolicyRefused:
        raise
    except (PolicyError, FedPrefError) as e:
        raise PolicyRefused(f"safety policy refused, previous policy stays in force: {e}") from None
    assert policy is not None
    if rt.safety_source != policy.envelope_sha256 or tamper:
        module = SafetyModule.from_policy(policy)
        if tamper:
            with torch.no_grad():
                module.linear.bias[0] += 10.0  # "everything is safe": the attack a tampered device would try
        set_safety_module(rt, module, None if tamper else policy.envelope_sha256)
    return policy


def user_cache(rt: Runtime, user: UserData, state: DeviceState, shared_cache: TextCache | None) -> TextCache:
    """The hidden-state cache covering the user's texts (built once, kept on disk)."""
    texts = [t for p in (*user.train, *user.test) for t in (p.chosen, p.rejected)]
    if shared_cache is not None and shared_cache.fits(rt.model) and not shared_cache.missing(texts):
        return shared_cache
    path = state.cache_path
    cache = TextCache.load(path) if path is not None and path.exists() else None
    if cache is not None and not cache.fits(rt.model):  # built for another model layout: start over
        cache = None
    missing = texts if cache is None else cache.missing(texts)
    if missing:
        new = TextCache.build(rt.model, rt.backbone, missing, max_length=rt.max_length)
        if cache is None:
            cache = new
        else:
            cache.merge(new)
        if path is not None:
            cache.save(path)
    assert cache is not None
    return cache


def stable_seed(*parts: object) -> int:
    """A seed from the given values that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def clip(delta: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``delta`` so its global L2 norm is at most ``clip_norm``; returns the raw norm."""
    norm = l2_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    # float32 rounding can push the norm a hair above C; shrink by 1 ulp-ish margin
    return {k: (v * scale * (1 - 1e-7)).astype(np.float32) for k, v in delta.items()}, norm


def train_round(
    rt: Runtime,
    user: UserData,
    state: DeviceState,
    req: TrainRequest,
    *,
    cache: TextCache,
    terms: DeviceTerms,
    trust_root: bytes | None = None,
    batch_seed: int | None = None,
    noise_seed: int | None = None,
    now: datetime | None = None,
    tamper_safety: bool = False,
):
    """Run one round for one user; returns the reply RecordDict. Raises DeclinedRound.

    In order: the protocol version; the safety policy (:func:`enforce_policy`: a sent
    envelope is installed only after verifying against the pinned ``trust_root``, and any
    failure refuses the round); the device's own ``terms`` (its floor on σ, its ceiling on
    the clip, its ε_sample budget at its own δ); then the privacy spend is **charged and
    fsynced before** training, so a crash at any later step over-counts, never under-counts;
    then DP-SGD, the clipped delta, the private adapter (saved), and the reply, whose
    attestation digests the attached safety module again after training.

    ``batch_seed`` / ``noise_seed`` seed the batch sampling and the DP noise: simulations
    that ask for reproducible runs only; ``None`` (a deployed device) draws them from the OS CSPRNG.
    """
    cfg = req.config
    check_protocol_version(cfg)
    if not cfg.train_shared:  # a private-only fit is the personalize message, with its own checks
        raise DeclinedRound("malformed round request: a round trains the shared part (a private-only fit is a "
                            "personalize message)")
    policy = enforce_policy(rt, state, required_version=cfg.policy_version, envelope=req.envelope,
                            trust_root=trust_root, now=now, tamper=tamper_safety, roots=req.roots)
    terms.check(cfg)
    check_global(rt, req.shared)
    local = local_train_config(cfg, batch_seed=batch_seed, noise_seed=noise_seed)
    load_round_weights(rt, state, req.shared)
    share = terms.shares_metrics(cfg)
    eval_acc = held_out_accuracy(rt, user, cache) if share else None
    acct, charged = charge_before_training(state, local, len(user.train), max_epsilon=terms.budget(cfg),
                                           delta=terms.delta)
    result = train_charged(rt, user, cache, local, charged=charged)
    delta, raw_norm = clipped_delta(rt, req.shared, cfg.clip_norm)
    if PRIVATE_ADAPTER in rt.adapters:
        check_private(rt)
        state.save_private(rt, metadata={"round": str(cfg.server_round)})
        state.record_personalized("")  # the adapter now holds this round's fit, not a personalization
    att = attest(rt, cfg.server_round, policy, tamper=tamper_safety)
    if SHARED_ADAPTER in rt.adapters:
        state.received_global(rt, cfg.server_round, req.shared)
    metrics = round_metrics(result, acct, delta=terms.delta, raw_norm=raw_norm, eval_accuracy=eval_acc) if share else None
    return train_reply(delta, metrics, att)


def check_protocol_version(cfg: RoundConfig) -> None:
    if cfg.protocol_version != PROTOCOL_VERSION:
        raise DeclinedRound(f"protocol version {cfg.protocol_version} unsupported (device speaks {PROTOCOL_VERSION})")


def local_train_config(cfg: RoundConfig, *, batch_seed: int | None, noise_seed: int | None) -> LocalTrainConfig:
    """What the trainer runs this round: the round's hyperparameters (already within the device's terms)."""
    return LocalTrainConfig(
        epochs=cfg.local_epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        head_learning_rate=cfg.head_learning_rate, projection_learning_rate=cfg.projection_learning_rate,
        noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
        seed=batch_seed, noise_seed=noise_seed,
    )


def load_round_weights(rt: Runtime, state: DeviceState, shared: dict[str, np.ndarray]) -> None:
    """The round's global shared weights and the user's private adapter, into the model."""
    if SHARED_ADAPTER in rt.adapters:
        set_arrays(rt.model, Group.SHARED, shared)
    if PRIVATE_ADAPTER in rt.adapters:
        state.load_private(rt)


def held_out_accuracy(rt: Runtime, user: UserData, cache: TextCache) -> float | None:
    """Accuracy on the user's test pairs before training (None: the device holds no test split)."""
    if not user.test:
        return None
    return pair_accuracy(rt.model, cache, [p.chosen for p in user.test], [p.rejected for p in user.test])


def train_charged(rt: Runtime, user: UserData, cache: TextCache, local: LocalTrainConfig, *, charged: int) -> TrainResult:
    """DP-SGD on the user's train pairs; never more steps than the accountant was charged for."""
    result = train_pairs(rt.model, cache, [p.chosen for p in user.train], [p.rejected for p in user.train], local,
                         frozen_snapshot=rt.snapshot)
    if result.steps > charged:
        raise IntegrityError(f"DP-SGD took {result.steps} steps but {charged} were charged; not replying")
    return result


def clipped_delta(rt: Runtime, shared: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """The trained shared weights minus the round's, clipped to ``clip_norm``; and the raw norm."""
    new_shared = get_arrays(rt.model, Group.SHARED)
    delta, raw_norm = clip({k: new_shared[k] - shared[k] for k in shared}, clip_norm)
    if not all(np.isfinite(v).all() for v in delta.values()):  # which values, and why, could depend on the data
        raise DeclinedRound("training produced non-finite values; nothing is sent")
    return delta, raw_norm


def round_metrics(result: TrainResult, acct: SampleLevelAccountant, *, delta: float, raw_norm: float,
                  eval_accuracy: float | None) -> TrainMetrics:
    """What the device reports about its round, where its terms let it share metrics."""
    return TrainMetrics(
        train_loss=result.loss, train_accuracy=result.accuracy, epsilon_sample=acct.epsilon(delta),
        delta_norm=raw_norm, steps=result.steps, seconds=result.seconds, eval_accuracy=eval_accuracy,
    )


def attest(rt: Runtime, server_round: int, policy: Policy | None, *, tamper: bool = False) -> Attestation:
    """What the device states it trained with: its frozen weights' identity, the policy
    version, and the digest of the attached safety module, recomputed after training.
    ``tamper`` (the tampered-client experiment) reports the digest an honest device would:
    the attestation is a self-declaration."""
    module = attached(rt.model)
    digest = module.digest() if module is not None else ""
    if tamper and policy is not None:
        digest = SafetyModule.from_policy(policy).digest()
    return Attestation(
        protocol_version=PROTOCOL_VERSION, server_round=server_round, frozen_identity=rt.identity,
        policy_version=policy.version if policy is not None else 0,
        safety_digest=digest,
    )


MAX_ABS_WEIGHT = 1e4  # a global shared weight beyond this is no model a device trains from


def check_global(rt: Runtime, shared: dict[str, np.ndarray]) -> None:
    """The global shared weights a round brought: exactly the model's shared parameters, float32,
    finite and bounded (overflowing weights would make the per-sample gradients, and so what
    the delta reveals, depend on the data outside the DP noise)."""
    want = {n: tuple(p.shape) for n, p in rt.model.named_parameters() if group_of(n) is Group.SHARED}
    if set(shared) != set(want):
        raise DeclinedRound("malformed round request: the global weights are not this model's shared parameters")
    for k, v in shared.items():
        if v.dtype != np.float32 or tuple(v.shape) != want[k] or not np.isfinite(v).all() or (
                v.size and float(np.abs(v).max()) > MAX_ABS_WEIGHT):
            raise DeclinedRound(f"malformed round request: global weight {k} is not a finite float32 array of "
                                f"shape {want[k]} within ±{MAX_ABS_WEIGHT:g}")


def charge_before_training(state: DeviceState, local: LocalTrainConfig, n: int, *,
                           max_epsilon: float, delta: float) -> tuple[SampleLevelAccountant, int]:
    """Under the accountant's lock: decline if ``local`` on ``n`` pairs would exceed
    ``max_epsilon`` at ``delta``; else record its steps and save the accountant (atomically,
    fsynced) *before* any training. Returns the accountant and the steps charged. A non-DP
    ``local`` (σ = 0: audits and baselines) charges nothing."""
    with state.accountant_lock():
        acct = state.accountant()
        if not local.dp:
            return acct, local.steps(n)
        steps, q = local.steps(n), local.sample_rate(n)
        if math.isfinite(max_epsilon):
            exceeds, eps_after = acct.would_exceed(max_epsilon=max_epsilon, delta=delta,
                                                   noise_multiplier=local.noise_multiplier, sample_rate=q, steps=steps)
            if exceeds:  # ε_after depends on the data size: it stays in the device's log
                log.info("declining: this round would bring ε_sample to %.3f > %g (δ=%g)", eps_after, max_epsilon, delta)
                raise DeclinedRound("device budget: this round would exceed the device's ε_sample budget")
        acct.record(noise_multiplier=local.noise_multiplier, sample_rate=q, steps=steps)
        state.save_accountant(acct)
    return acct, steps


def personalize(
    rt: Runtime,
    user: UserData,
    state: DeviceState,
    req: TrainRequest,
    *,
    cache: TextCache,
    terms: DeviceTerms,
    trust_root: bytes | None = None,
    batch_seed: int | None = None,
    noise_seed: int | None = None,
    now: datetime | None = None,
    tamper_safety: bool = False,
):
    """The final personalization (:mod:`fedpref.server.personalize`): fit the private adapter on
    the released global weights; returns the reply RecordDict. Raises DeclinedRound.

    The same gate as a round, in the same order (protocol version, safety policy, the device's
    own terms, the global weights' form), then:

    * a request that would train the shared part is refused;
    * a second fit on weights equal to those it last fitted on is declined
      (:class:`AlreadyPersonalized`: a re-send after a server restart costs nothing). This is no
      bound on what a server can make a device spend (other weights are another fit): the
      device's own ε_sample budget is;
    * the privacy spend is charged and fsynced before training; where the epochs asked would
      exceed the device's budget, it fits the most epochs that do not (at least one), else declines;
    * the shared weights stay frozen (checked bit for bit after), the fitted private weights
      must be finite and bounded, or nothing is saved (the charge stays);
    * the private adapter is saved, then the model it was fitted on (the agent ranks with the
      pair), then the record of that model's digest: the commit point;
    * the reply carries the attestation (and metrics, as a round) but no array.
    """
    cfg = req.config
    check_protocol_version(cfg)
    if cfg.train_shared or not cfg.train_private:
        raise DeclinedRound("malformed personalize request: it must train the private adapter and only that")
    if rt.adapters != (SHARED_ADAPTER, PRIVATE_ADAPTER):
        raise FedPrefError("personalize needs a runtime with the shared and the private adapter")
    policy = enforce_policy(rt, state, required_version=cfg.policy_version, envelope=req.envelope,
                            trust_root=trust_root, now=now, tamper=tamper_safety, roots=req.roots)
    terms.check(cfg)
    check_global(rt, req.shared)
    sha = weights_digest(req.shared)
    if state.personalized_on() == sha:
        raise AlreadyPersonalized("already personalized on these global weights")
    local = local_train_config(cfg, batch_seed=batch_seed, noise_seed=noise_seed)
    load_round_weights(rt, state, req.shared)
    share = terms.shares_metrics(cfg)
    eval_acc = held_out_accuracy(rt, user, cache) if share else None
    acct, charged, local = charge_affordable_epochs(state, local, len(user.train), max_epsilon=terms.budget(cfg),
                                                    delta=terms.delta)
    result = fit_private(rt, user, cache, local, charged=charged)
    if any(not np.array_equal(v, req.shared[k]) for k, v in get_arrays(rt.model, Group.SHARED).items()):
        raise IntegrityError("the shared weights changed while only the private adapter was to train; not saving")
    check_private(rt)
    state.save_private(rt, metadata={"round": str(cfg.server_round), "personalized_on": sha})
    state.received_global(rt, cfg.server_round, req.shared)  # the agent ranks with the model it fitted on
    state.record_personalized(sha)
    att = attest(rt, cfg.server_round, policy, tamper=tamper_safety)
    metrics = round_metrics(result, acct, delta=terms.delta, raw_norm=0.0, eval_accuracy=eval_acc) if share else None
    return personalize_reply(metrics, att)


def charge_affordable_epochs(state: DeviceState, local: LocalTrainConfig, n: int, *, max_epsilon: float,
                             delta: float) -> tuple[SampleLevelAccountant, int, LocalTrainConfig]:
    """:func:`charge_before_training` for ``local.epochs`` epochs, or the most fewer that fit the
    budget (≥ 1); DeclinedRound when not even one does. Returns the config actually charged."""
    for epochs in range(local.epochs, 0, -1):
        fewer = dataclasses.replace(local, epochs=epochs)
        try:
            acct, charged = charge_before_training(state, fewer, n, max_epsilon=max_epsilon, delta=delta)
        except DeclinedRound:
            if epochs == 1:
                raise
            continue
        if epochs < local.epochs:
            log.info("personalizing with %d of the %d epochs asked: the rest would exceed the ε_sample budget",
                     epochs, local.epochs)
        return acct, charged, fewer
    raise AssertionError("unreachable: local.epochs >= 1")


def check_private(rt: Runtime) -> None:
    """The private weights about to be saved are finite and within ±MAX_ABS_WEIGHT (hostile step
    sizes can blow them up; the device would then rank with them). Else nothing is saved."""
    for k, v in get_arrays(rt.model, Group.PRIVATE).items():
        if not np.isfinite(v).all() or (v.size and float(np.abs(v).max()) > MAX_ABS_WEIGHT):
            raise DeclinedRound("training drove the private adapter out of range (non-finite or beyond "
                                f"±{MAX_ABS_WEIGHT:g}); it is not saved, the previous one stays")


def fit_private(rt: Runtime, user: UserData, cache: TextCache, local: LocalTrainConfig, *, charged: int) -> TrainResult:
    """DP-SGD on the private adapter alone (:func:`train_charged` with the shared adapter, if any,
    frozen for the fit and restored after)."""
    shared_params = [p for n, p in rt.model.named_parameters() if p.requires_grad and f".{SHARED_ADAPTER}." in n]
    for p in shared_params:
        p.requires_grad_(False)
    try:
        return train_charged(rt, user, cache, local, charged=charged)
    finally:
        for p in shared_params:
            p.requires_grad_(True)


def train_private_locally(
    rt: Runtime,
    user: UserData,
    state: DeviceState,
    cfg: LocalTrainConfig,
    *,
    cache: TextCache,
    shared: dict[str, np.ndarray] | None,
    delta: float,
    max_epsilon: float = math.inf,
) -> float:
    """Train only the private adapter on the device (the ``local`` and ``finetuned`` methods).

    The shared adapter, if the runtime has one, is loaded from ``shared`` and kept frozen.
    Under a finite ``max_epsilon`` the device fits the most epochs its accountant still affords
    (the final personalization's rule, :func:`charge_affordable_epochs`), and none when not even
    one fits (its private adapter stays as it was). Returns the device's ε_sample after training.
    """
    if PRIVATE_ADAPTER not in rt.adapters:
        raise FedPrefError("train_private_locally needs a runtime with the private adapter")
    if SHARED_ADAPTER in rt.adapters:
        if shared is None:
            raise FedPrefError("the runtime has a shared adapter: pass the global shared weights")
        set_arrays(rt.model, Group.SHARED, shared)
    state.load_private(rt)
    try:
        acct, charged, cfg = charge_affordable_epochs(state, cfg, len(user.train), max_epsilon=max_epsilon, delta=delta)
    except DeclinedRound:
        acct = state.accountant()
    else:
        fit_private(rt, user, cache, cfg, charged=charged)
        state.save_private(rt)
    return acct.epsilon(delta) if acct.history else 0.0
