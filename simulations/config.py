"""The simulation config: one TOML, typed, loaded once.

Tables: ``[persona]`` (with ``[[persona.communities]]``), ``[model]`` (with
``[model.adapter]``), ``[federation]``, ``[local]``, ``[methods]``, ``[runtime]``.
Every key is optional; see ``simulations/configs/demo.toml`` for the demo's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedpref.model.config import ModelConfig
from fedpref.protocol.errors import ConfigError
from fedpref.protocol.tomlconfig import build, read_toml, to_plain
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.simulations.persona import PersonaConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class MethodsConfig:
    local_epochs: int = 8  # DP-SGD epochs of the local-only baseline
    finetune_epochs: int = 4  # DP-SGD epochs of private fine-tuning after FedAvg

    def __post_init__(self) -> None:
        if self.local_epochs < 1 or self.finetune_epochs < 1:
            raise ConfigError("methods.local_epochs and methods.finetune_epochs must be ≥ 1")


@dataclass(frozen=True)
class RuntimeConfig:
    ray_address: str = ""  # "" = start Ray on this machine; "auto" or "ray://host:10001" = join a cluster
    client_cpus: float = 1.0  # CPUs Ray reserves for each virtual client
    torch_threads: int = 1  # torch threads inside each client
    seed: int = 0

    def __post_init__(self) -> None:
        if self.client_cpus <= 0:
            raise ConfigError(f"runtime.client_cpus = {self.client_cpus}; use > 0 (e.g. 1)")


@dataclass(frozen=True)
class SimConfig:
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


def load_sim_config(path: str | Path | None) -> SimConfig:
    """``None`` = the demo config shipped in ``simulations/configs/demo.toml``."""
    path = Path(path) if path else CONFIG_DIR / "demo.toml"
    return build(SimConfig, read_toml(path), where=str(path))
