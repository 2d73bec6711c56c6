"""Local DP-SGD training of the shared and private adapters on one user's pairs.

Opacus does the per-sample clipping and the noise, and keeps the RDP history of the steps
taken (the device's budget is charged before training, by its own accountant: see
``charge_before_training`` in client/device.py); this module only builds the loop, and checks
around it the invariants that Opacus + PEFT can silently break (issue #820): frozen weights
stay bit-identical, trained LoRA weights do change.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpref.common.errors import ConfigError, IntegrityError
from fedpref.model.cache import TextCache
from fedpref.model.preference import bradley_terry_loss, check_partition, reward_model
from fedpref.protocol.partition import Group, group_of

# Randomness. Opacus' secure_mode needs torchcsprng, which has no wheel for this torch. So every
# call gets its own torch generators (Mersenne Twister) for the DP noise and for the Poisson
# batch sampling, each with its whole 19,968-bit state drawn from the OS CSPRNG (`secrets`;
# see `generator`), never from torch's global generator (which `build_model` seeds, inside
# `fork_rng`, for the public initial weights only), a run id, a node id or a round. Only a
# simulation that asks for reproducible runs passes explicit seeds (`seed`, `noise_seed`; a
# deployed device never does). The limit: MT19937 is not a cryptographic generator; its state
# can be solved from 624 exact raw outputs, but its outputs are only ever seen transformed to
# Gaussians and summed with clipped gradients, and the state is new for every round.
# PEFT's frozen inputs make full backward hooks warn on every step although per-sample
# gradients are exact (checked in tests/test_trainer.py).
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass(frozen=True)
class LocalTrainConfig:
    epochs: int  # passes over the train pairs
    batch_size: int  # expected (Poisson) batch size, pairs
    learning_rate: float  # LoRA matrices
    head_learning_rate: float  # reward heads
    projection_learning_rate: float  # shared style projection
    noise_multiplier: float  # DP-SGD σ; 0 turns DP off (plain SGD, no accountant: audits and baselines only)
    max_grad_norm: float  # DP-SGD per-sample clip
    seed: int | None = None  # batch sampling: None = fresh from the OS CSPRNG; an int only in simulations
    noise_seed: int | None = None  # DP noise: None = fresh from the OS CSPRNG; an int only in simulations

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"local epochs = {self.epochs}; use ≥ 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size = {self.batch_size}; use ≥ 1")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier = {self.noise_multiplier}; use a finite number ≥ 0 (0 = DP off)")
        if self.noise_multiplier > 0 and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm = {self.max_grad_norm}; DP-SGD needs a finite positive clip")

    @property
    def dp(self) -> bool:
        return self.noise_multiplier > 0

    def batches_per_epoch(self, n: int) -> int:
        return max(1, math.ceil(n / self.batch_size))

    def sample_rate(self, n: int) -> float:
        """Opacus' Poisson rate for ``n`` pairs: 1 / (batches per epoch), as DPDataLoader sets it."""
        return 1.0 / self.batches_per_epoch(n)

    def steps(self, n: int) -> int:
        """DP-SGD steps in one call: ``epochs`` passes of ``1/q`` expected batches."""
        return self.epochs * self.batches_per_epoch(n)


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean BT loss over the steps
    accuracy: float  # train accuracy over the steps' batches
    steps: int
    sample_rate: float
    seconds: float
    accountant_history: list[tuple[float, float, int]]  # Opacus RDP history after training


_MT_WORDS = 624  # MT19937's state, 32-bit words
_MT_OFFSET = 24  # byte offset of the state words in torch's CPU generator state (after seed, left, seeded, next)


def generator(seed: int | None) -> torch.Generator:
    """A private torch generator: seeded with ``seed`` (simulations), else its whole MT19937
    state (624 words, 19,968 bits) drawn from the OS CSPRNG.

    ``manual_seed`` would not do for a device: torch's CPU generator keeps only the low 32 bits
    of a seed, so a server could search all 2**32 noise streams of a round and subtract the
    noise. The state words are written through ``set_state``; the layout is checked first
    (a torch whose layout differs fails closed).
    """
    g = torch.Generator()
    if seed is not None:
        return g.manual_seed(seed)
    g.manual_seed(5489)
    state = g.get_state().clone()
    raw = state.numpy()  # (5056,) uint8, shares memory with `state`
    words = raw[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS].view("<u8")
    header = raw[:_MT_OFFSET].view("<u8")
    if int(header[0]) != 5489 or int(words[0]) != 5489 or raw.size < _MT_OFFSET + 8 * _MT_WORDS:
        raise IntegrityError("torch's CPU generator state has an unexpected layout; refusing to draw DP noise "
                             "from a 32-bit seed (pin torch==2.13.0)")
    words[:] = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4")
    header[0] = secrets.randbits(64)  # the reported initial seed: not used to draw
    g.set_state(state)  # `left` = 1: the first draw twists the whole random state
    return g


def _frozen_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if group_of(n) in (Group.BACKBONE, Group.SAFETY)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def assert_frozen_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Every backbone and safety parameter is bit-identical to the snapshot."""
    for n, p in model.named_parameters():
        if n not in snapshot:
            if group_of(n) in (Group.BACKBONE, Group.SAFETY):
                raise IntegrityError(f"frozen parameter {n} ({group_of(n).value}) has no snapshot; take one before training")
            continue
        if not torch.equal(_bits(p.detach()), _bits(snapshot[n])):
            raise IntegrityError(f"frozen parameter {n} ({group_of(n).value}) changed during local training")


def trainable_groups(model: nn.Module) -> dict[Group, list[str]]:
    out: dict[Group, list[str]] = {Group.SHARED: [], Group.PRIVATE: []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[group_of(n)].append(n)
    return out


def train_pairs(
    model: nn.Module,
    cache: TextCache,
    chosen: Sequence[str],
    rejected: Sequence[str],
    cfg: LocalTrainConfig,
    *,
    accountant_history: list[tuple[float, float, int]] | None = None,
    frozen_snapshot: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train every trainable (shared/private) parameter of ``model`` with DP-SGD.

    ``frozen_snapshot`` lets a caller that keeps the model in memory pass the snapshot it
    took once, so the bit-identity check costs a comparison, not a copy.
    """
    if len(chosen) != len(rejected) or not chosen:
        raise ConfigError(f"need ≥ 1 pair with chosen and rejected; got {len(chosen)} and {len(rejected)}")
    check_partition(model)
    snapshot = frozen_snapshot if frozen_snapshot is not None else _frozen_snapshot(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    optimizer = _optimizer(model, cfg)
    decoupled = is_decoupled(model)
    n = len(chosen)
    # Opacus' Poisson sampler draws from this loader's generator
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=cfg.batch_size, shuffle=True, generator=generator(cfg.seed))
    model.train()
    engine, net, optimizer, loader = _make_private(model, optimizer, loader, cfg, accountant_history)
    t0 = time.perf_counter()
    try:
        tally = _run_epochs(net, optimizer, loader, cache, chosen, rejected, cfg, trained, decoupled=decoupled)
    finally:
        if engine is not None:
            net._close()  # type: ignore[operator]  # remove Opacus hooks: the model is reused
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    seconds = time.perf_counter() - t0
    _check_trained(model, snapshot, trained, before, seen=tally.seen)
    history = [tuple(h) for h in engine.accountant.history] if engine is not None else list(accountant_history or [])
    return TrainResult(
        loss=tally.loss_sum / max(tally.seen, 1), accuracy=tally.correct / max(tally.seen, 1), steps=tally.steps,
        sample_rate=cfg.sample_rate(n), seconds=seconds, accountant_history=history,  # type: ignore[arg-type]
    )


def _optimizer(model: nn.Module, cfg: LocalTrainConfig) -> torch.optim.SGD:
    """Plain SGD with one learning rate per role: LoRA matrices, reward heads, style projection."""
    roles: dict[str, list[nn.Parameter]] = {"lora": [], "head": [], "proj": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            roles["proj" if ".style_proj." in n else "head" if ".modules_to_save." in n else "lora"].append(p)
    lrs = {"lora": cfg.learning_rate, "head": cfg.head_learning_rate, "proj": cfg.projection_learning_rate}
    groups = [{"params": ps, "lr": lrs[r]} for r, ps in roles.items() if ps]
    return torch.optim.SGD(groups, lr=cfg.learning_rate)


def _make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cfg: LocalTrainConfig,
    accountant_history: list[tuple[float, float, int]] | None,
) -> tuple[Any, nn.Module, torch.optim.Optimizer, DataLoader]:
    """Opacus' setup for DP-SGD: per-sample clipping, noise from a private generator, Poisson
    batches, and an RDP accountant continuing ``accountant_history``. Returns
    ``(engine, module, optimizer, loader)``; without DP (σ = 0) no engine and the inputs as they are."""
    if not cfg.dp:
        return None, model, optimizer, loader
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    if accountant_history:
        engine.accountant.history = [tuple(h) for h in accountant_history]
    net, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks",
        noise_generator=generator(cfg.noise_seed),
    )
    return engine, net, optimizer, loader


@dataclass
class _Tally:
    steps: int = 0
    loss_sum: float = 0.0  # BT loss summed over the pairs seen
    correct: int = 0  # pairs scored chosen above rejected
    seen: int = 0  # pairs drawn into batches


def _run_epochs(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    cache: TextCache,
    chosen: Sequence[str],
    rejected: Sequence[str],
    cfg: LocalTrainConfig,
    trained: list[nn.Parameter],
    *,
    decoupled: bool = False,
) -> _Tally:
    """The training loop: ``cfg.epochs`` passes over ``loader``'s batches, one optimizer step each.
    ``decoupled``: two Bradley-Terry losses per step (:func:`is_decoupled`), one DP-SGD step on their sum."""
    tally = _Tally()
    for _ in range(cfg.epochs):
        for (idx,) in loader:
            optimizer.zero_grad(set_to_none=True)
            if idx.numel() == 0:  # Poisson sampling can draw an empty batch: noise-only step
                if cfg.dp:
                    for p in trained:
                        p.grad_sample = torch.zeros((0, *p.shape))
                    optimizer.step()
                tally.steps += 1
                continue
            ids_c, mask_c, rep_c = cache.batch([chosen[i] for i in idx.tolist()])
            ids_r, mask_r, rep_r = cache.batch([rejected[i] for i in idx.tolist()])
            if decoupled:  # population loss on the shared score + personal loss on the private head
                out_c, out_r = net(ids_c, mask_c, rep_c, both=True), net(ids_r, mask_r, rep_r, both=True)  # (B, 2)
                personal_loss = bradley_terry_loss(out_c[:, 1], out_r[:, 1])
                loss = bradley_terry_loss(out_c[:, 0], out_r[:, 0]) + personal_loss
                r_c, r_r, reported = out_c[:, 1], out_r[:, 1], personal_loss
            else:
                r_c = net(ids_c, mask_c, rep_c)  # (B,)
                r_r = net(ids_r, mask_r, rep_r)  # (B,)
                loss = reported = bradley_terry_loss(r_c, r_r)
            loss.backward()
            optimizer.step()
            tally.steps += 1
            tally.loss_sum += float(reported.detach()) * idx.numel()
            tally.correct += int((r_c > r_r).sum())
            tally.seen += idx.numel()
    return tally


def is_decoupled(model: nn.Module) -> bool:
    """``AdapterSpec.objective = "decoupled"`` and both parts train: the population loss moves the
    shared part, the personal loss the private one. A private-only fit (shared frozen) has
    nothing for the population loss to move: one loss, as with "joint"."""
    groups = trainable_groups(model)
    return bool(getattr(reward_model(model), "decoupled", False)) and bool(groups[Group.SHARED]) and bool(groups[Group.PRIVATE])


def _check_trained(model: nn.Module, snapshot: dict[str, torch.Tensor], trained: list[nn.Parameter],
                   before: list[torch.Tensor], *, seen: int) -> None:
    """After training: frozen weights bit-identical, and some trained weight changed (when any pair was seen)."""
    assert_frozen_unchanged(model, snapshot)
    if seen and all(torch.equal(p.detach(), b) for p, b in zip(trained, before)):
        raise IntegrityError("no trainable LoRA/head weight changed during local training (Opacus + PEFT issue #820?)")


@torch.no_grad()
def pair_accuracy(model: nn.Module, cache: TextCache, chosen: Sequence[str], rejected: Sequence[str], *, batch_size: int = 64) -> float:
    """Share of pairs where the model scores chosen above rejected."""
    scores = score_texts(model, cache, list(chosen) + list(rejected), batch_size=batch_size)
    n = len(chosen)
    if not n:
        return float("nan")
    wins = (scores[:n] > scores[n:]).float() + 0.5 * (scores[:n] == scores[n:]).float()  # a tie is a coin flip
    return float(wins.mean())


@torch.no_grad()
def score_texts(model: nn.Module, cache: TextCache, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Personal rewards, (N,)."""
    model.eval()
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask, rep = cache.batch(texts[s : s + batch_size])
        out.append(model(ids, mask, rep))
    return torch.cat(out) if out else torch.zeros(0)
