"""The preference (reward) model: frozen backbone + shared and private PEFT adapters.

::

    text ─► backbone (frozen; LoRA "shared" + "private" on the top blocks) ─► pool ─► LN ─► f (B, H)
    reward(text) = score(f) + personal_head(style_proj(f))

- ``score`` (H → 1) is the shared reward head: what everyone agrees on.
- ``style_proj`` (H → k) is a shared projection onto the k directions along which users
  differ; it is learnt from every user's personal signal, under user-level DP, or it is a
  frozen public attribute basis (:mod:`fedpref.model.basis`, ``adapter.attribute_basis``).
- ``personal_head`` (k → 1) is the user's own weights over those directions. A user needs
  only k numbers, so 75 pairs and DP-SGD noise in k dimensions suffice.
- ``score`` and ``style_proj`` are ``modules_to_save`` of the "shared" adapter,
  ``personal_head`` of the "private" one; its frozen base is zero, so a model without the
  private adapter ignores it. Both adapters also carry LoRA on the same target modules,
  and both are active at once.

Because the backbone is frozen and adapters sit on the top blocks only, the hidden state
entering the first adapted block is a pure function of the text. :mod:`fedpref.model.cache`
stores it, and :meth:`RewardModel.forward` can *replay* it instead of recomputing the lower
blocks. This is exact, not an approximation (checked in the tests).

With ``adapter.top_layers = 0`` no block is adapted: both LoRA adapters sit on a frozen
identity ``neck`` (H → H) between the pooled embedding and the heads::

    text ─► backbone (frozen, whole) ─► pool ─► neck (identity + LoRA shared + private) ─► LN ─► f

The pooled embedding is then the cached state (one (H,) vector per text), and a DP-SGD step
costs a few small matrix products instead of a transformer block per token: the layout for
large simulations (``simulations/configs/scale-1000.toml``) and the demo.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedpref.common.errors import ConfigError, IntegrityError
from fedpref.model.backbone import Backbone, pool
from fedpref.model.config import AdapterSpec  # noqa: F401  (re-exported: defined with the config)
from fedpref.protocol.partition import PRIVATE_ADAPTER, SHARED_ADAPTER, Group, group_of

# Module names inside a transformer block that LoRA may target, by architecture family.
_ATTENTION_NAMES = {
    "query": ("query", "q_proj", "q_lin", "c_attn"),
    "value": ("value", "v_proj", "v_lin"),
}


class _Replayable(nn.Module):
    """Wraps a frozen lower block so that a cached hidden state can stand in for its output."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.replay: torch.Tensor | None = None  # set on the last lower block only
        self.skip = False  # lower blocks under a replayed one do nothing
        self.returns_tuple = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003
        if self.replay is not None:
            return (self.replay,) if self.returns_tuple else self.replay
        if self.skip:
            return (hidden_states,) if self.returns_tuple else hidden_states
        out = self.block(hidden_states, *args, **kwargs)
        self.returns_tuple = isinstance(out, tuple)
        return out


class RewardModel(nn.Module):
    """Backbone + reward heads. Wrap with :func:`build_model` to get the PEFT adapters."""

    def __init__(self, backbone: Backbone, *, first_adapted: int, personal_dims: int,
                 basis: torch.Tensor | None = None) -> None:
        super().__init__()
        self.encoder = backbone.model
        self.is_decoder = backbone.is_decoder
        self.first_adapted = first_adapted
        self.decoupled = False  # build_model sets it from AdapterSpec.objective
        self.private_lora = True  # and this from AdapterSpec.private_lora
        h = backbone.hidden_size
        self.score = nn.Linear(h, 1)
        self.personal_head = nn.Linear(personal_dims or h, 1)
        for head in (self.score, self.personal_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            head.requires_grad_(False)
        self.style_proj: nn.Module = nn.Identity()
        if personal_dims:
            self.style_proj = nn.Linear(h, personal_dims, bias=False)
            with torch.no_grad():
                if basis is not None:  # a frozen public attribute basis (model/basis.py)
                    self.style_proj.weight.copy_(basis)
                else:  # the same orthonormal start on every device and the server
                    g = torch.Generator().manual_seed(20260101)
                    q, _ = torch.linalg.qr(torch.randn(h, personal_dims, generator=g))  # (H, k)
                    self.style_proj.weight.copy_(q.T)  # rows orthonormal: outputs O(1) like f
            self.style_proj.requires_grad_(False)
        # no adapted block: LoRA goes on this frozen identity over the pooled embedding, and the
        # pooled embedding itself is what the cache stores
        self.neck_mode = first_adapted >= backbone.num_layers
        self.neck: nn.Module | None = None
        if self.neck_mode:
            self.neck = nn.Linear(h, h)
            with torch.no_grad():
                self.neck.weight.copy_(torch.eye(h))
                self.neck.bias.zero_()
            self.neck.requires_grad_(False)
        else:
            layers = backbone.layers()
            for i in range(first_adapted):
                layers[i] = _Replayable(layers[i])
        self._layers_path = backbone.layers_path

    def lower_blocks(self) -> list[_Replayable]:
        if self.neck_mode:
            return []
        layers = self.encoder.get_submodule(self._layers_path)
        return [layers[i] for i in range(self.first_adapted)]  # type: ignore[misc]

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        replay: torch.Tensor | None = None,  # (B, T, H): output of the last lower block; (B, H) pooled on a neck
        both: bool = False,
    ) -> torch.Tensor:  # (B,) rewards; with ``both``, (B, 2): [population, personal]
        """The user's reward. ``both`` (training with ``adapter.objective = "decoupled"``) returns
        the population reward ``score(f)`` and the personal reward ``score(f).detach() +
        personal_head(style_proj(f.detach()))`` side by side: the same value as the default
        output in column 1, but gradients that keep the two parts apart."""
        pooled = self.pooled(input_ids, attention_mask, replay)  # (B, H)
        if self.neck is not None:
            pooled = self.neck(pooled)  # identity + the adapters' LoRA
        # Parameter-free standardisation: every coordinate O(1), so per-sample gradients of the
        # heads are O(1) too and DP-SGD's clip norm C means the same for every backbone.
        feats = F.layer_norm(pooled, pooled.shape[-1:])  # (B, H)
        population = self.score(feats).squeeze(-1)  # (B,)
        if both:
            personal = self.personal_head(self.style_proj(feats.detach())).squeeze(-1)  # (B,)
            return torch.stack([population, population.detach() + personal], dim=-1)  # (B, 2)
        return population + self.personal_head(self.style_proj(feats)).squeeze(-1)  # (B,)

    def pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, replay: torch.Tensor | None = None
    ) -> torch.Tensor:  # (B, H)
        """The pooled last hidden state of the frozen backbone's blocks (replaying the cached lower
        blocks when given; on a neck, ``replay`` is the cached pooled state itself)."""
        if self.neck_mode and replay is not None:
            if replay.dim() != 2 or replay.shape[0] != input_ids.shape[0]:
                raise IntegrityError(f"a neck model replays pooled states (B, H); got {tuple(replay.shape)}")
            return replay
        lower = self.lower_blocks()
        if replay is not None and lower:
            for blk in lower[:-1]:
                blk.skip = True
            lower[-1].replay = replay
        try:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        finally:
            for blk in lower:
                blk.skip, blk.replay = False, None
        return pool(hidden, attention_mask, is_decoder=self.is_decoder)  # (B, H)

    @torch.no_grad()
    def lower_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the cache stores: the hidden states leaving the last lower block, (B, T, H); on a
        neck, the pooled embedding of the whole frozen backbone, (B, H)."""
        if self.neck_mode:
            return self.pooled(input_ids, attention_mask)
        lower = self.lower_blocks()
        if not lower:
            raise ConfigError("every block is adapted (adapter.top_layers = all); nothing to cache")
        captured: list[torch.Tensor] = []

        def hook(_m, _i, out):  # noqa: ANN001
            captured.append(out[0] if isinstance(out, tuple) else out)

        handle = lower[-1].register_forward_hook(hook)
        try:
            self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return captured[0]


def _target_module_names(model: RewardModel, backbone: Backbone, spec: AdapterSpec) -> list[str]:
    if spec.top_layers == 0:
        return ["neck"]
    n = backbone.num_layers
    if spec.top_layers > n:
        raise ConfigError(f"adapter.top_layers = {spec.top_layers} but the backbone has {n} blocks")
    wanted = [suffix for t in spec.targets for suffix in _ATTENTION_NAMES.get(t, (t,))]
    prefix = f"encoder.{backbone.layers_path}."
    names = []
    for name, module in model.named_modules():
        if not name.startswith(prefix) or not isinstance(module, (nn.Linear, nn.Conv1d)) and type(module).__name__ != "Conv1D":
            continue
        idx = int(name[len(prefix) :].split(".")[0])
        if idx >= n - spec.top_layers and name.rsplit(".", 1)[-1] in wanted:
            names.append(name)
    if not names:
        raise ConfigError(
            f"adapter.targets = {list(spec.targets)} match no module in the top {spec.top_layers} "
            f"block(s) of {type(backbone.model).__name__}; name Linear sub-modules of a block"
        )
    return names


def build_model(
    backbone: Backbone, spec: AdapterSpec, *, adapters: Sequence[str] = (SHARED_ADAPTER, PRIVATE_ADAPTER), seed: int = 0
) -> nn.Module:
    """A PEFT model with the requested adapters, all active. The backbone must be fresh.

    ``get_peft_model`` runs after the model is on its device (CPU here), as the Opacus +
    PEFT issue #820 requires.
    """
    if not adapters:
        raise ConfigError("build_model needs at least one adapter")
    for m in backbone.model.modules():  # deterministic forward: no dropout in a frozen backbone
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    first_adapted = backbone.num_layers - spec.top_layers
    basis = None
    if spec.attribute_basis:
        from fedpref.model.basis import load_basis

        basis, _, _ = load_basis(spec.attribute_basis)
        if tuple(basis.shape) != (spec.personal_dims, backbone.hidden_size):
            raise ConfigError(
                f"attribute basis {spec.attribute_basis} is {tuple(basis.shape)}, but the model needs "
                f"(personal_dims, hidden size) = ({spec.personal_dims}, {backbone.hidden_size}); set "
                f"personal_dims = {basis.shape[0]} or build the basis for this backbone")
    # the initial weights (heads, adapters) are public and the same for a seed on every device and
    # the server; drawn inside fork_rng, so torch's global generator is left exactly as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = RewardModel(backbone, first_adapted=first_adapted, personal_dims=spec.personal_dims, basis=basis)
        model = _with_adapters(base, backbone, spec, adapters, learnt_proj=bool(spec.personal_dims and basis is None))
    # read by the trainer: two losses per step where both adapters train (AdapterSpec.objective)
    base.decoupled = spec.objective == "decoupled" and SHARED_ADAPTER in adapters and PRIVATE_ADAPTER in adapters
    base.private_lora = spec.private_lora  # read by check_partition and model.io.reset_frozen_lora
    check_partition(model)
    return model


def _with_adapters(base: nn.Module, backbone: Backbone, spec: AdapterSpec, adapters: Sequence[str], *,
                   learnt_proj: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = _target_module_names(base, backbone, spec)
    # a learnt projection is shared (trained under user-level DP); a public basis stays frozen
    proj = ["style_proj"] if learnt_proj else []
    heads = {SHARED_ADAPTER: ["score", *proj], PRIVATE_ADAPTER: ["personal_head"]}

    def cfg(name: str) -> LoraConfig:
        return LoraConfig(
            r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, bias="none",
            target_modules=targets, modules_to_save=heads[name],
        )

    model = get_peft_model(base, cfg(adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg(name))
    model.base_model.set_adapter(list(adapters))
    if PRIVATE_ADAPTER in adapters and not spec.private_lora:
        # the private adapter is the personal head alone: its LoRA keeps its zero start (B = 0)
        for n, p in model.named_parameters():
            if f".{PRIVATE_ADAPTER}." in n and ".lora_" in n:
                p.requires_grad_(False)
    if PRIVATE_ADAPTER not in adapters and learnt_proj:
        # without a personal head the projection gets no gradient, only DP noise: freeze it
        model.base_model.model.style_proj.requires_grad_(False)
    return model


def reward_model(model: nn.Module) -> nn.Module:
    """The :class:`RewardModel` inside PEFT's wrapper (``model`` itself when it is unwrapped):
    where build_model records the spec's flags (``decoupled``, ``private_lora``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_partition(model: nn.Module) -> None:
    """Only shared/private parameters may be trainable; safety/backbone never; nor the private
    LoRA where ``adapter.private_lora = false`` (PEFT's ``set_adapter`` would re-enable it)."""
    frozen_private_lora = not getattr(reward_model(model), "private_lora", True)
    for name, p in model.named_parameters():
        g = group_of(name)
        if p.requires_grad and g not in (Group.SHARED, Group.PRIVATE):
            raise IntegrityError(f"parameter {name} of group {g.value} is trainable; it must stay frozen")
        if p.requires_grad and frozen_private_lora and f".{PRIVATE_ADAPTER}." in name and ".lora_" in name:
            raise IntegrityError(f"parameter {name} is trainable, but adapter.private_lora = false; it must stay frozen")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """PEFT's ``disable_adapter()`` (every LoRA and head off: the frozen backbone's output), with
    each parameter's ``requires_grad`` restored exactly on exit. PEFT's own exit re-enables
    every active adapter's LoRA through ``set_adapter``, which would make a frozen private LoRA
    (``adapter.private_lora = false``) trainable again after any safety check (found by
    :func:`check_partition` in a 1,000-user run)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for p, flag in before:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def params_of(model: nn.Module, group: Group) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if group_of(n) is group}


def get_arrays(model: nn.Module, group: Group) -> dict[str, np.ndarray]:
    """A copy of one group's parameters as float32 numpy arrays, by parameter name."""
    return {n: p.detach().cpu().numpy().copy() for n, p in params_of(model, group).items()}


@torch.no_grad()
def set_arrays(model: nn.Module, group: Group, arrays: dict[str, np.ndarray]) -> None:
    """Load one group's parameters; the names must match exactly."""
    params = params_of(model, group)
    if set(params) != set(arrays):
        missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
        raise IntegrityError(f"{group.value} parameters do not match: missing {missing[:3]}, unexpected {extra[:3]}")
    for n, p in params.items():
        p.copy_(torch.from_numpy(np.asarray(arrays[n])).to(p.dtype))


def digest_of(model: nn.Module, groups: Iterable[Group]) -> str:
    """sha256 over the exact bytes of every parameter of the given groups, by sorted name."""
    wanted = set(groups)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if group_of(name) in wanted:
            h.update(name.encode() + b"\0")
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected), averaged over pairs. chosen, rejected: (B,)."""
    return -F.logsigmoid(chosen - rejected).mean()
