"""The simulation config: one TOML, typed, loaded once.

Tables: ``[persona]`` (with ``[[persona.communities]]``), ``[model]`` (with
``[model.adapter]``), ``[federation]``, ``[local]``, ``[methods]``, ``[runtime]``, ``[safety]``,
``[secagg]``, ``[audit]``, ``[attributes]``.
Every key is optional; see ``simulations/configs/demo.toml`` for the demo's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedpref.model.config import ModelConfig
from fedpref.protocol.errors import ConfigError
from fedpref.protocol.tomlconfig import build, read_toml, to_plain
from fedpref.server.config import FederationConfig, LocalConfig
from fedpref.server.secagg import SecAggConfig
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
    secure_aggregation: bool = False  # Flower SecAgg+ for the federated methods ([secagg] sets its parameters)
    deterministic_noise: bool = True  # seed every device's DP noise per (seed, user, round): same config, same numbers

    def __post_init__(self) -> None:
        if self.client_cpus <= 0:
            raise ConfigError(f"runtime.client_cpus = {self.client_cpus}; use > 0 (e.g. 1)")


@dataclass(frozen=True)
class SafetyConfig:
    """The signed safety policy of the run and the falsification experiment (issue 3)."""

    enabled: bool = True  # build, sign and distribute a policy; evaluate the bound
    corpus_per_class: int = 400  # labelled texts per class (safe + each unsafe category) for the classifier
    threshold: float = 0.5  # p(category) at or above which a candidate is flagged
    signers: int = 3  # n: Ed25519 keys in the run's trust root
    signature_threshold: int = 2  # k: signatures a policy needs
    validity_days: int = 7  # the policy expires this long after the run starts
    tamper_users: tuple[str, ...] = ()  # attack: these users' devices perturb their safety weights

    def __post_init__(self) -> None:
        if not 1 <= self.signature_threshold <= self.signers:
            raise ConfigError(
                f"safety.signature_threshold = {self.signature_threshold} with signers = {self.signers}; use 1..signers"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"safety.threshold = {self.threshold}; use a probability in (0, 1), e.g. 0.5")
        if self.corpus_per_class < 5:
            raise ConfigError(f"safety.corpus_per_class = {self.corpus_per_class}; use at least 5 (400 in the demo)")
        if self.validity_days < 1:
            raise ConfigError(f"safety.validity_days = {self.validity_days}; use at least 1")


@dataclass(frozen=True)
class AuditConfig:
    """The empirical privacy audits (issue 5): what an attacker gets, next to the formal ε."""

    enabled: bool = True
    community_users: int = 0  # users in the community-inference audit (0 = all)
    membership_users: int = 12  # users in the membership audit (each trains twice: DP on and off)

    def __post_init__(self) -> None:
        if self.community_users < 0 or self.membership_users < 1:
            raise ConfigError("audit.community_users must be ≥ 0 (0 = all) and audit.membership_users ≥ 1")


@dataclass(frozen=True)
class AttributesConfig:
    """The public attribute basis of the personal head (``model/basis.py``).

    With ``corpus_texts > 0`` the runner fits ridge probes for every persona attribute and
    "unsafe" on that many public labelled texts (``persona.attribute_corpus``) and the model's
    ``style_proj`` becomes that frozen basis (``model.adapter.personal_dims`` must be 9).
    """

    corpus_texts: int = 0  # 0 = no basis: style_proj is learnt (or absent with personal_dims = 0)
    ridge: float = 10.0  # the probes' L2 penalty, on standardised embeddings
    corpus: str = ""  # a JSONL of {"text", "attributes": {name: ±1, ...}} instead of the persona corpus (real data)

    def __post_init__(self) -> None:
        if self.corpus_texts < 0:
            raise ConfigError(f"attributes.corpus_texts = {self.corpus_texts}; use 0 (off) or a positive count, e.g. 1200")
        if not self.ridge > 0:
            raise ConfigError(f"attributes.ridge = {self.ridge}; use a positive penalty, e.g. 10")


@dataclass(frozen=True)
class SimConfig:
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)  # read by the ServerApp when runtime.secure_aggregation
    attributes: AttributesConfig = field(default_factory=AttributesConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


def load_sim_config(path: str | Path | None) -> SimConfig:
    """``None`` = the demo config shipped in ``simulations/configs/demo.toml``."""
    path = Path(path) if path else CONFIG_DIR / "demo.toml"
    return build(SimConfig, read_toml(path), where=str(path))
