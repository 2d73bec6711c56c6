"""The message contract between the ServerApp and the ClientApp.

Typed dataclasses, and their encoding to and from Flower ``RecordDict``. Both sides import
this module and nothing else of each other.

Server → client (train): ``RecordDict{"shared": ArrayRecord, "config": ConfigRecord}`` and,
when the client's policy is older, ``"policy": ConfigRecord{"envelope": bytes, "roots":
list[bytes]}`` (``roots``: the operator's trust-root chain, so devices can follow a key rotation).
Client → server: ``RecordDict{"delta": ArrayRecord, "attestation": ConfigRecord}`` and,
only when the round asks for them *and* the device's own terms allow it (simulations, for
their plots), ``"metrics": MetricRecord`` (:class:`TrainMetrics`: bounded, validated on
receipt, never used to weight anything).

Server → client (personalize, once after the last round; Flower message type
:data:`PERSONALIZE_MESSAGE_TYPE`): the same record layout as a train request, carrying the
released global shared weights and a config with ``train_shared = False``. The device fits its
private adapter on them under its own DP-SGD terms and keeps it. Client → server: only
``"attestation"`` (and ``"metrics"`` under the same rule as a round): no array record at all.

Every number a peer sends is checked on receipt: finite and within the range its field
declares (:data:`ROUND_RANGES`, :data:`METRIC_RANGES`); anything else is a :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpref.common.errors import DataError

# Bump on every change of the wire format (a field added, removed, renamed or retyped), so that a
# peer on another release is told "protocol version" before anything is charged or trained:
# 2 = the attestation's backbone_sha256 renamed frozen_identity (backbone sha256 + attribute basis).
PROTOCOL_VERSION = 2
NORM_TOLERANCE = 1e-6  # relative slack on ‖delta‖₂ ≤ C (float32 rounding): the server's check and the device's own

# RecordDict keys
K_SHARED = "shared"
K_CONFIG = "config"
K_POLICY = "policy"
K_DELTA = "delta"
K_METRICS = "metrics"
K_ATTESTATION = "attestation"
K_EVAL = "eval"

# Flower message type of the final personalization ("<category>.<action>": a ClientApp registers it
# with ``@app.train(PERSONALIZE_ACTION)``)
PERSONALIZE_ACTION = "personalize"
PERSONALIZE_MESSAGE_TYPE = f"train.{PERSONALIZE_ACTION}"
# Flower error code of a device's answer "already personalized on these weights" (a re-send after a
# server restart): nothing trained or charged, and the server counts the device as fitted earlier
ALREADY_PERSONALIZED_CODE = 4104


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
    dp_noise_multiplier: float  # DP-SGD σ the server asks for (a device declines one below its own floor)
    dp_max_grad_norm: float  # DP-SGD per-sample clip (a device declines one above its own ceiling)
    delta: float  # δ the server reports ε at
    max_epsilon_sample: float  # the server's cap on a device's ε_sample (inf = none; the device's own is tighter)
    train_shared: bool
    train_private: bool
    policy_version: int  # version in force on the server (0 = none)
    report_metrics: bool = False  # ask devices for training/eval metrics in clear (not covered by DP; simulations)

    def __post_init__(self) -> None:
        check_ranges(self, ROUND_RANGES)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        check_protocol_version(cls, record)
        return cls(**_typed_fields(cls, record))


# (lowest, highest, lowest inclusive?) of every number in a round config; inf only where listed
ROUND_RANGES: dict[str, tuple[float, float, bool]] = {
    "server_round": (0, 10**9, True),
    "protocol_version": (0, 10**6, True),
    "local_epochs": (1, 10**4, True),
    "batch_size": (1, 10**7, True),
    "learning_rate": (0.0, 1e4, False),
    "head_learning_rate": (0.0, 1e4, False),
    "projection_learning_rate": (0.0, 1e4, False),
    "clip_norm": (1e-6, 1e9, True),  # a subnormal clip would round clipped values to a coarse grid
    "dp_noise_multiplier": (0.0, 1e9, True),
    "dp_max_grad_norm": (1e-6, 1e9, True),  # (a subnormal clip doubles the real sensitivity in float32)
    "delta": (0.0, 1.0, False),
    "max_epsilon_sample": (0.0, math.inf, False),
    "policy_version": (0, 2**53, True),
}

# what a device may report, and the range each value must lie in
METRIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "train_loss": (0.0, 1e4, True),  # Bradley–Terry loss, nats
    "train_accuracy": (0.0, 1.0, True),
    "epsilon_sample": (0.0, 1e9, True),  # the device's running ε_sample at its own δ
    "delta_norm": (0.0, 1e12, True),  # ‖shared delta‖ before clipping
    "steps": (0, 10**9, True),  # DP-SGD steps this round
    "seconds": (0.0, 1e7, True),  # wall time of local training
    "eval_accuracy": (0.0, 1.0, True),  # held-out accuracy (simulation users only)
}


def check_ranges(obj: object, ranges: dict[str, tuple[float, float, bool]]) -> None:
    """Every listed field of ``obj`` (``None``: absent) passes :func:`check_number`."""
    for name, span in ranges.items():
        v = getattr(obj, name)
        if v is not None:
            check_number(f"{type(obj).__name__}.{name}", v, span)


def check_number(where: str, v: object, span: tuple[float, float, bool]) -> float:
    """``v`` is a finite number (not a bool) in ``span`` = (lowest, highest, lowest inclusive?),
    ``inf`` only where the highest is ``inf``; else a :class:`DataError` naming it. Returns it."""
    lo, hi, lo_incl = span
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
          and (math.isfinite(v) or v == hi == math.inf) and (v >= lo if lo_incl else v > lo) and v <= hi)
    if not ok:
        raise DataError(f"{where} = {v!r}: outside {'[' if lo_incl else '('}{lo:g}, {hi:g}]")
    return float(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Attestation:
    """What a client states about the code and weights it trained with."""

    protocol_version: int
    server_round: int
    frozen_identity: str  # the frozen weights trained with: backbone sha256 (+ attribute basis; model_identity)
    policy_version: int
    safety_digest: str  # sha256 over the frozen safety weights ("" = no policy)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Attestation:
        check_protocol_version(cls, record)
        return cls(**_typed_fields(cls, record))


@dataclass(frozen=True)
class TrainMetrics:
    """What a device reports about its round when asked and allowed (not covered by DP).

    No data size: nothing the server computes is weighted by a device's claim about itself.
    """

    train_loss: float
    train_accuracy: float
    epsilon_sample: float  # the device's running ε at its own δ
    delta_norm: float  # L2 norm of the shared delta before clipping
    steps: int  # DP-SGD steps taken this round
    seconds: float  # wall time of local training
    eval_accuracy: float | None = None  # held-out accuracy, where the device holds a test split

    def __post_init__(self) -> None:
        check_ranges(self, METRIC_RANGES)

    def to_record(self) -> MetricRecord:
        return MetricRecord({k: v for k, v in asdict(self).items() if v is not None})

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainMetrics:
        rec = dict(record)
        extra = sorted(set(rec) - {f.name for f in fields(cls)})
        if extra:
            raise DataError(f"TrainMetrics: unexpected metric {extra[0]!r}")
        ev = rec.pop("eval_accuracy", None)
        if ev is not None and (isinstance(ev, bool) or not isinstance(ev, (int, float))):
            raise DataError(f"TrainMetrics: field 'eval_accuracy' has {type(ev).__name__} {ev!r}, expected float")
        return cls(**_typed_fields(cls, rec, skip=("eval_accuracy",)), eval_accuracy=None if ev is None else float(ev))


class ProtocolVersionError(DataError):
    """A message of another protocol version (a peer on another fedpref release)."""


def check_protocol_version(cls: type, record: object) -> None:
    """Before any other field is read (another version may name, add or drop fields): a record
    whose integer ``protocol_version`` is not :data:`PROTOCOL_VERSION` is a
    :class:`ProtocolVersionError` that says so. A missing or non-integer one is left to the
    field checks."""
    v = dict(record).get("protocol_version")  # type: ignore[call-overload]
    if isinstance(v, int) and not isinstance(v, bool) and v != PROTOCOL_VERSION:
        raise ProtocolVersionError(f"{cls.__name__}: protocol version {v} != {PROTOCOL_VERSION} (the sender runs "
                                   f"an {'older' if v < PROTOCOL_VERSION else 'newer'} fedpref release than this side; "
                                   "update the older one)")


def _typed_fields(cls: type, record: object, *, skip: tuple[str, ...] = ()) -> dict:
    """Pick a dataclass's fields out of a record, with clear errors on missing/wrong types."""
    rec = dict(record)  # type: ignore[call-overload]
    out = {}
    for f in fields(cls):
        if f.name in skip:
            continue
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


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over named arrays (each name, dtype, shape and bytes, in name order, signed zeros
    made one): which model a personalization was for, the same on the server and on the device."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        if a.dtype.kind == "f":
            a = a + a.dtype.type(0.0)  # -0.0 → +0.0: weights that compare equal have one digest
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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


def train_reply(delta: dict[str, np.ndarray], metrics: TrainMetrics | None, attestation: Attestation) -> RecordDict:
    content = RecordDict({K_DELTA: arrays_to_record(delta), K_ATTESTATION: attestation.to_record()})
    if metrics is not None:
        content[K_METRICS] = metrics.to_record()
    return content


@dataclass(frozen=True)
class TrainReply:
    delta: ArrayRecord  # left as Arrays: the server decodes and validates what it will sum
    metrics: TrainMetrics | None  # only when the round asked and the device agreed
    attestation: Attestation

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainReply:
        try:
            delta = content.array_records[K_DELTA]
            att = Attestation.from_record(content.config_records[K_ATTESTATION])
        except KeyError as e:
            raise DataError(f"train reply lacks record {e.args[0]!r}") from None
        raw = content.metric_records.get(K_METRICS)
        metrics = TrainMetrics.from_record(raw) if raw is not None else None
        return cls(delta=delta, metrics=metrics, attestation=att)


def personalize_reply(metrics: TrainMetrics | None, attestation: Attestation) -> RecordDict:
    """A device's answer to a personalize message: its attestation (and metrics where asked and
    allowed); nothing fitted leaves the device."""
    content = RecordDict({K_ATTESTATION: attestation.to_record()})
    if metrics is not None:
        content[K_METRICS] = metrics.to_record()
    return content


@dataclass(frozen=True)
class PersonalizeReply:
    attestation: Attestation
    metrics: TrainMetrics | None

    @classmethod
    def from_content(cls, content: RecordDict) -> PersonalizeReply:
        """Exactly an attestation and optional metrics: any array record (a private adapter, a
        delta) or any other record is refused, so the server never holds what it must not."""
        if len(content.array_records):
            raise DataError(f"personalize reply carries array record(s) {sorted(content.array_records)}; "
                            "a device sends nothing it fitted")
        extra = sorted(set(content) - {K_ATTESTATION, K_METRICS})
        if extra:
            raise DataError(f"personalize reply carries unexpected record {extra[0]!r}")
        try:
            att = Attestation.from_record(content.config_records[K_ATTESTATION])
        except KeyError:
            raise DataError("personalize reply lacks record 'attestation'") from None
        raw = content.metric_records.get(K_METRICS)
        return cls(attestation=att, metrics=TrainMetrics.from_record(raw) if raw is not None else None)
