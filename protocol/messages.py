"""The message contract between the ServerApp and the ClientApp.

Typed dataclasses, and their encoding to and from Flower ``RecordDict``. Both sides import
this module and nothing else of each other.

Server → client (train): ``RecordDict{"shared": ArrayRecord, "config": ConfigRecord}`` and,
when the client's policy is older, ``"policy": ConfigRecord{"envelope": bytes, "roots":
list[bytes]}`` (``roots``: the operator's trust-root chain, so devices can follow a key rotation).
Client → server: ``RecordDict{"delta": ArrayRecord, "metrics": MetricRecord,
"attestation": ConfigRecord}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpref.protocol.errors import DataError

PROTOCOL_VERSION = 1

# RecordDict keys
K_SHARED = "shared"
K_CONFIG = "config"
K_POLICY = "policy"
K_DELTA = "delta"
K_METRICS = "metrics"
K_ATTESTATION = "attestation"
K_EVAL = "eval"


@dataclass(frozen=True)
class RoundConfig:
    """What a client needs to run one round. Units in comments."""

    server_round: int
    protocol_version: int
    local_epochs: int  # passes over the user's train pairs
    batch_size: int  # expected DP-SGD batch (Poisson sampled), pairs
    learning_rate: float  # SGD step size for adapters
    head_learning_rate: float  # SGD step size for the reward heads
    projection_learning_rate: float  # SGD step size for the shared style projection
    clip_norm: float  # C: L2 bound of the shared delta sent back
    dp_noise_multiplier: float  # DP-SGD noise on the device (0 = DP off)
    dp_max_grad_norm: float  # DP-SGD per-sample clip
    delta: float  # δ for reporting ε_sample
    max_epsilon_sample: float  # device-level budget (inf = none)
    train_shared: bool
    train_private: bool
    policy_version: int  # version in force on the server (0 = none)
    report_eval: bool = True  # the device also reports its held-out accuracy (not covered by DP)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        return cls(**_typed_fields(cls, record))


@dataclass(frozen=True)
class Attestation:
    """What a client states about the code and weights it trained with."""

    protocol_version: int
    server_round: int
    backbone_sha256: str
    policy_version: int
    safety_digest: str  # sha256 over the frozen safety weights ("" = no policy)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Attestation:
        return cls(**_typed_fields(cls, record))


@dataclass(frozen=True)
class TrainMetrics:
    num_examples: int  # pairs trained on (the FedAvg weight key is "num-examples")
    train_loss: float
    train_accuracy: float
    epsilon_sample: float  # the device's running ε at the round's δ
    delta_norm: float  # L2 norm of the shared delta before clipping
    steps: int  # DP-SGD steps taken this round
    seconds: float  # wall time of local training

    def to_record(self) -> MetricRecord:
        d = asdict(self)
        d["num-examples"] = d.pop("num_examples")
        return MetricRecord(d)

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainMetrics:
        d = dict(record)
        d["num_examples"] = d.pop("num-examples", None)
        return cls(**_typed_fields(cls, d))


def _typed_fields(cls: type, record: object) -> dict:
    """Pick a dataclass's fields out of a record, with clear errors on missing/wrong types."""
    rec = dict(record)  # type: ignore[call-overload]
    out = {}
    for f in fields(cls):
        if f.name not in rec or rec[f.name] is None:
            raise DataError(f"{cls.__name__}: field {f.name!r} is missing from the message")
        v = rec[f.name]
        want = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if want is int and isinstance(v, bool) or not isinstance(v, want):
            raise DataError(
                f"{cls.__name__}: field {f.name!r} has {type(v).__name__} {v!r}, expected {want.__name__}"
            )
        out[f.name] = v
    return out


def l2_norm(arrays: dict[str, np.ndarray]) -> float:
    """Global L2 norm over named arrays, accumulated in float64 (the clip/validation norm)."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())))


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Name → numpy array, in the given order, to a Flower ArrayRecord."""
    return ArrayRecord.from_array_dict({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def train_request(shared: dict[str, np.ndarray], config: RoundConfig, envelope: bytes | None,
                  roots: tuple[bytes, ...] = ()) -> RecordDict:
    content = RecordDict({K_SHARED: arrays_to_record(shared), K_CONFIG: config.to_record()})
    if envelope is not None:
        record = ConfigRecord({"envelope": envelope})
        if roots:
            record["roots"] = list(roots)
        content[K_POLICY] = record
    return content


@dataclass(frozen=True)
class TrainRequest:
    shared: dict[str, np.ndarray]
    config: RoundConfig
    envelope: bytes | None
    roots: tuple[bytes, ...] = ()  # trust-root versions the server holds (signed chain), oldest first

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        try:
            shared = record_to_arrays(content.array_records[K_SHARED])
            config = RoundConfig.from_record(content.config_records[K_CONFIG])
        except KeyError as e:
            raise DataError(f"train request lacks record {e.args[0]!r}") from None
        env, roots = None, ()
        if K_POLICY in content.config_records:
            raw = content.config_records[K_POLICY].get("envelope")
            if not isinstance(raw, bytes):
                raise DataError("train request: policy record has no bytes 'envelope'")
            env = raw
            chain = content.config_records[K_POLICY].get("roots", [])
            if not isinstance(chain, list) or not all(isinstance(r, bytes) for r in chain):
                raise DataError("train request: policy record 'roots' is not a list of bytes")
            roots = tuple(chain)
        return cls(shared=shared, config=config, envelope=env, roots=roots)


def train_reply(delta: dict[str, np.ndarray], metrics: TrainMetrics, attestation: Attestation) -> RecordDict:
    return RecordDict(
        {
            K_DELTA: arrays_to_record(delta),
            K_METRICS: metrics.to_record(),
            K_ATTESTATION: attestation.to_record(),
        }
    )


@dataclass(frozen=True)
class TrainReply:
    delta: ArrayRecord  # left as Arrays: the server validates shapes/dtypes before decoding
    metrics: TrainMetrics
    attestation: Attestation

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        try:
            delta = content.array_records[K_DELTA]
            metrics = TrainMetrics.from_record(content.metric_records[K_METRICS])
            att = Attestation.from_record(content.config_records[K_ATTESTATION])
        except KeyError as e:
            raise DataError(f"train reply lacks record {e.args[0]!r}") from None
        return cls(delta=delta, metrics=metrics, attestation=att)
