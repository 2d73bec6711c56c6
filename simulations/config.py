"""The simulation config: one TOML, typed, loaded once.

Tables: ``[persona]`` (with ``[[persona.communities]]``), ``[model]`` (with
``[model.adapter]``), ``[federation]``, ``[local]``, ``[personalize]``, ``[methods]``, ``[runtime]``, ``[safety]``,
``[secagg]``, ``[audit]``, ``[attributes]``, ``[robustness]``, ``[new_users]``.
Every key is optional; see ``simulations/configs/demo.toml`` for the demo's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedpref.common.errors import ConfigError
from fedpref.common.tomlconfig import build, check_fields, ranged, read_toml, to_plain
from fedpref.model.config import ModelConfig
from fedpref.server.config import FederationConfig, LocalConfig, PersonalizeConfig
from fedpref.server.secagg import SecAggConfig
from fedpref.simulations.persona import PersonaConfig

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class MethodsConfig:
    local_epochs: int = ranged(8, ge=1, le=1000)  # DP-SGD epochs of the local-only baseline
    finetune_epochs: int = ranged(4, ge=1, le=1000)  # DP-SGD epochs of private fine-tuning after FedAvg
    # SGD step of the personal head where a device fits its private adapter alone (local,
    # finetuned, new users); 0 = [local].head_learning_rate. With few pairs the DP noise per
    # step is σ·C/(pairs), so a smaller step than the shared score's wins (RESULTS.md)
    private_head_learning_rate: float = ranged(0.0, ge=0, le=1e4, example=0.05, note="(0 = [local].head_learning_rate)")
    # expected Poisson batch of those private-only fits (pairs), as [personalize] batch_size is for
    # the final step: the rounds may run full batches ([local].batch_size), a lone head small ones
    private_batch_size: int = ranged(0, ge=0, le=65_536, example=16, note="(0 = [local].batch_size)")

    def __post_init__(self) -> None:
        check_fields(self, "methods")

    def fit_batch_size(self, local: LocalConfig) -> int:
        """The private-only fits' expected batch: ``private_batch_size``, or [local]'s where it is 0."""
        return self.private_batch_size or local.batch_size


@dataclass(frozen=True)
class RuntimeConfig:
    ray_address: str = ""  # "" = start Ray on this machine; "auto" or "ray://host:10001" = join a cluster
    client_cpus: float = ranged(1.0, gt=0, le=1024)  # CPUs Ray reserves for each virtual client
    torch_threads: int = ranged(1, ge=1, le=1024)  # torch threads inside each client
    seed: int = ranged(0, ge=0, le=2**32 - 1)  # users add their index to it: stays well inside int64
    secure_aggregation: bool = False  # Flower SecAgg+ for the federated methods ([secagg] sets its parameters)
    deterministic_noise: bool = True  # seed every device's DP noise per (seed, user, round): same config, same numbers

    def __post_init__(self) -> None:
        check_fields(self, "runtime")


@dataclass(frozen=True)
class SafetyConfig:
    """The signed safety policy of the run and the falsification experiment (issue 3)."""

    enabled: bool = True  # build, sign and distribute a policy; evaluate the bound
    # labelled texts per class (safe + each unsafe category) for the classifier; 400 in the demo
    corpus_per_class: int = ranged(400, ge=5, le=100_000)
    threshold: float = ranged(0.5, gt=0, lt=1)  # p(category) at or above which a candidate is flagged
    signers: int = ranged(3, ge=1, le=256)  # n: Ed25519 keys in the run's trust root
    signature_threshold: int = ranged(2, ge=1, le=256)  # k: signatures a policy needs (≤ signers)
    validity_days: int = ranged(7, ge=1, le=3650)  # the policy expires this long after the run starts
    tamper_users: tuple[str, ...] = ()  # attack: these users' devices perturb their safety weights

    def __post_init__(self) -> None:
        check_fields(self, "safety")
        if self.signature_threshold > self.signers:
            raise ConfigError(
                f"safety.signature_threshold = {self.signature_threshold} with signers = {self.signers}; use 1..signers"
            )


@dataclass(frozen=True)
class AuditConfig:
    """The empirical privacy audits (``simulations/audit.py``): what an attacker gets, next to the
    formal ε. Each audit's no-DP arm must leak, or it shows nothing about the DP arm."""

    enabled: bool = True
    # community inference and dropout differencing: users whose round is replayed twice (0 = all)
    community_users: int = ranged(0, ge=0, le=100_000, example=20, note="(0 = all)")
    # sample-level canary audit: audited devices, each trains twice (DP-SGD on and off)
    canary_devices: int = ranged(4, ge=1, le=100_000)
    canaries_per_device: int = ranged(16, ge=1, le=10_000)  # canary pairs planted per device, each kept w.p. 1/2
    canary_epochs: int = ranged(5, ge=1, le=1000)  # local epochs of an audited device (both arms)
    canary_lr_scale: float = ranged(1.0, gt=0, le=1000)  # × the three [local] learning rates (both arms)
    user_canaries: int = ranged(500, ge=2, le=1_000_000)  # canary users in the user-level audit
    confidence: float = ranged(0.95, gt=0, lt=1)  # 1 − β of every empirical ε lower bound

    def __post_init__(self) -> None:
        check_fields(self, "audit")


@dataclass(frozen=True)
class AttributesConfig:
    """The public attribute basis of the personal head (``model/basis.py``).

    With ``corpus_texts > 0`` the runner fits ridge probes for every persona attribute and
    "unsafe" on that many public labelled texts (``persona.attribute_corpus``) and the model's
    ``style_proj`` becomes that frozen basis (``model.adapter.personal_dims`` must be 9).
    """

    # 0 = no basis: style_proj is learnt (or absent with personal_dims = 0)
    corpus_texts: int = ranged(0, ge=0, le=1_000_000, example=1200, note="(0 = off)")
    ridge: float = ranged(10.0, gt=0)  # the probes' L2 penalty, on standardised embeddings
    corpus: str = ""  # a JSONL of {"text", "attributes": {name: ±1, ...}} instead of the persona corpus (real data)

    def __post_init__(self) -> None:
        check_fields(self, "attributes")


@dataclass(frozen=True)
class RobustnessConfig:
    """Lying and failing devices (``simulations/robustness.py``, ``client/adversary.py``).

    Each fraction in ``poison_fractions`` is one more ``personalized`` federation in which that
    share of the users (a seeded draw; each fraction's attackers include the smaller one's)
    attest exactly what honest devices attest and send norm-``C`` updates trained to rank
    unsafe candidates first; the report compares the honest users with the attack-free run.
    """

    poison_fractions: tuple[float, ...] = ranged((), gt=0, lt=1, example=0.3)
    # these fractions also run on the SecAgg+ path (where a liar's norm is unchecked; only
    # Flower's quantizer bounds each coordinate by C); a run with runtime.secure_aggregation
    # runs every fraction there already
    secure_aggregation_fractions: tuple[float, ...] = ranged((), gt=0, lt=1, example=0.3)
    # every sampled device drops out after training, before its reply, with this probability
    # per round, in every federated run (a seeded fault schedule)
    drop_rate: float = ranged(0.0, ge=0, lt=1)

    def __post_init__(self) -> None:
        check_fields(self, "robustness")
        for name in ("poison_fractions", "secure_aggregation_fractions"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"robustness.{name} = {list(values)} repeats a fraction; give each once")


@dataclass(frozen=True)
class NewUsersConfig:
    """New users (``simulations/newusers.py``): held out of every run, they join afterwards with
    their first k training pairs, for each k in ``pairs``."""

    fraction: float = ranged(0.0, ge=0, lt=1, example=0.2, note="(0 = off)")  # of each community
    pairs: tuple[int, ...] = ranged((0, 5, 10, 25, 50), ge=0, le=100_000)

    def __post_init__(self) -> None:
        check_fields(self, "new_users")
        if self.fraction and not self.pairs:
            raise ConfigError("new_users.pairs is empty; give the numbers of pairs new users join with, e.g. [0, 10]")


@dataclass(frozen=True)
class SimConfig:
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)  # read by the ServerApp
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)  # read by the ServerApp when runtime.secure_aggregation
    audit: AuditConfig = field(default_factory=AuditConfig)
    attributes: AttributesConfig = field(default_factory=AttributesConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    new_users: NewUsersConfig = field(default_factory=NewUsersConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


def load_sim_config(path: str | Path | None) -> SimConfig:
    """``None`` = the demo config shipped in ``simulations/configs/demo.toml``."""
    path = Path(path) if path else CONFIG_DIR / "demo.toml"
    return build(SimConfig, read_toml(path), where=str(path))
