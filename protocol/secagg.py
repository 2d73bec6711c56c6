"""The message contract of a secure-aggregation round, over Flower's legacy FitIns/FitRes.

Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``) runs only on the legacy
client/server API, so a SecAgg round cannot carry the ``RecordDict`` of
:mod:`fedpref.protocol.messages` as is. This module maps the same dataclasses
(:class:`RoundConfig`, :class:`Attestation`, :class:`TrainMetrics`) onto what the legacy API
carries, in one place, for both sides:

Server → client, ``FitIns``:
  ``parameters``  the global shared arrays, in the order of ``config[K_SHARED_KEYS]``;
  ``config``      the :class:`RoundConfig` fields, ``K_SHARED_KEYS`` (names, ``\\n``-joined)
                  and, when the node's policy is older, ``K_ENVELOPE`` (bytes).

Client → server, ``FitRes`` (``secaggplus_mod`` masks ``parameters``; the rest is plain):
  ``parameters``   the clipped shared delta, in ``K_SHARED_KEYS`` order, then one float vector
                   of the bounded training metrics (:data:`SECURE_METRICS`): *masked*, so the
                   server learns only cohort sums of both;
  ``num_examples`` always 1: SecAgg+ computes ``Σ wᵢxᵢ / Σ wᵢ``; with ``wᵢ = 1`` the server
                   recovers the plain sum as ``mean × m`` and learns nothing from the weight;
  ``metrics``      plain: the :class:`Attestation` fields (``attestation.<field>``, the same
                   public constants for every honest device) and, only when the device reports
                   metrics (simulations), ``epsilon_sample`` (a function of the device's DP-SGD
                   settings, its data *size* and its number of rounds; no labels). With metrics
                   off the masked metric vector is all zeros.

Quantization (Flower's, stochastic rounding): each coordinate is clipped to
``[-clipping_range, clipping_range]`` and mapped to an integer in ``[0, quantization_range]``.
The server sets ``clipping_range = C``: a delta with ``‖δ‖₂ ≤ C`` has every coordinate in
``[-C, C]``, so Flower's clip never changes an honestly clipped delta, and the error of the
unmasked sum of ``m`` deltas is below ``m · 2C / quantization_range`` per coordinate
(:func:`sum_error_bound`). The masked sum must not wrap: ``m · quantization_range <
modulus_range`` (:func:`check_ranges`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from fedpref.common.errors import ConfigError, DataError
from fedpref.protocol.messages import METRIC_RANGES, Attestation, RoundConfig, TrainMetrics, TrainRequest, check_number

K_SHARED_KEYS = "fedpref.shared-keys"  # FitIns config: "\n".join(shared parameter names)
K_ENVELOPE = "fedpref.policy-envelope"  # FitIns config: the signed policy envelope (bytes)
K_ROOT_PREFIX = "fedpref.trust-root."  # FitIns config: K_ROOT_PREFIX + i → the i-th trust-root version (bytes)
ATTESTATION_PREFIX = "attestation."  # FitRes metrics: attestation.<Attestation field>
K_EPSILON_SAMPLE = "epsilon_sample"  # FitRes metrics (plain): the device's running ε_sample
SECURE_AGGREGATION_KEY = "secure-aggregation"  # Flower run config switch (bool)


@dataclass(frozen=True)
class MetricBound:
    """A training metric that rides in the masked vector: saturated to [lo, hi]."""

    name: str
    lo: float
    hi: float


# Summed under the mask: the server learns only the cohort mean of each (values saturate).
# Tighter than the metric's valid range (protocol.messages.METRIC_RANGES) to keep resolution.
SECURE_METRICS: tuple[MetricBound, ...] = (
    MetricBound("train_loss", 0.0, 20.0),  # Bradley–Terry loss, nats
    MetricBound("train_accuracy", 0.0, 1.0),
    MetricBound("eval_accuracy", 0.0, 1.0),
    MetricBound("delta_norm", 0.0, 1000.0),  # L2 norm of the shared delta before clipping
    MetricBound("clipped", 0.0, 1.0),  # 1 if the delta was clipped: the mean is the clipped fraction
    MetricBound("steps", 0.0, 1e4),  # DP-SGD steps this round
    MetricBound("seconds", 0.0, 1e4),  # wall time of local training
)
assert all(b.name in METRIC_RANGES for b in SECURE_METRICS if b.name != "clipped")


def parse_run_flag(value: object, *, key: str = SECURE_AGGREGATION_KEY) -> bool:
    """A boolean run-config value (Flower passes TOML booleans; ``-c`` may give strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"run config {key} = {value!r}; use true or false")


def check_ranges(*, cohort: int, quantization_range: int, modulus_range: int) -> None:
    """SecAgg+ sums integers mod ``modulus_range``; ``cohort`` of them must not wrap."""
    if cohort * quantization_range >= modulus_range:
        raise ConfigError(
            f"secagg: {cohort} nodes × quantization_range {quantization_range} ≥ modulus_range "
            f"{modulus_range}: the masked sum would wrap; lower secagg.quantization_range (e.g. "
            f"{_pow2_below(modulus_range // max(cohort, 1))})"
        )


def _pow2_below(x: int) -> int:
    return 1 << max(int(x).bit_length() - 1, 1)


def sum_error_bound(*, cohort: int, clip_norm: float, quantization_range: int) -> float:
    """Largest per-coordinate error of the unmasked sum of ``cohort`` deltas (stochastic rounding)."""
    return cohort * 2.0 * clip_norm / quantization_range


# -- server → client --------------------------------------------------------------------
def fit_config(cfg: RoundConfig, keys: Sequence[str], envelope: bytes | None,
               roots: Sequence[bytes] = ()) -> dict[str, bool | bytes | float | int | str]:
    """The legacy ``FitIns.config`` of one node."""
    out: dict[str, bool | bytes | float | int | str] = dict(asdict(cfg))
    out[K_SHARED_KEYS] = "\n".join(keys)
    if envelope is not None:
        out[K_ENVELOPE] = envelope
        for i, r in enumerate(roots):
            out[f"{K_ROOT_PREFIX}{i}"] = r
    return out


def parse_fit(parameters: Sequence[np.ndarray], config: Mapping[str, object]) -> tuple[TrainRequest, list[str]]:
    """The :class:`TrainRequest` of a legacy ``FitIns`` and the shared key order."""
    raw_keys = config.get(K_SHARED_KEYS)
    if not isinstance(raw_keys, str) or not raw_keys:
        raise DataError(f"secure-aggregation train request lacks {K_SHARED_KEYS!r}")
    keys = raw_keys.split("\n")
    if len(keys) != len(parameters):
        raise DataError(f"secure-aggregation train request: {len(keys)} shared keys but {len(parameters)} arrays")
    env = config.get(K_ENVELOPE)
    if env is not None and not isinstance(env, bytes):
        raise DataError(f"secure-aggregation train request: {K_ENVELOPE!r} is {type(env).__name__}, not bytes")
    cfg = RoundConfig.from_record({f.name: config.get(f.name) for f in fields(RoundConfig)})  # type: ignore[arg-type]
    shared = {k: np.asarray(v) for k, v in zip(keys, parameters)}
    roots = []
    while isinstance(r := config.get(f"{K_ROOT_PREFIX}{len(roots)}"), bytes):
        roots.append(r)
    return TrainRequest(shared=shared, config=cfg, envelope=env, roots=tuple(roots)), keys


# -- client → server --------------------------------------------------------------------
def encode_metrics(values: Mapping[str, float], clipping_range: float) -> np.ndarray:
    """Map each secure metric from [lo, hi] onto [-clipping_range, clipping_range]."""
    out = np.empty(len(SECURE_METRICS), dtype=np.float64)
    for i, b in enumerate(SECURE_METRICS):
        v = float(values.get(b.name, b.lo))
        v = b.lo if not np.isfinite(v) else min(max(v, b.lo), b.hi)
        out[i] = clipping_range * (2.0 * (v - b.lo) / (b.hi - b.lo) - 1.0)
    return out


def decode_metric_sums(total: np.ndarray, cohort: int, clipping_range: float) -> dict[str, float]:
    """Cohort *means* of the secure metrics from the unmasked sum of their encodings."""
    if cohort <= 0:
        return {}
    return {
        b.name: float(((total[i] / clipping_range + cohort) * (b.hi - b.lo) / 2.0 + cohort * b.lo) / cohort)
        for i, b in enumerate(SECURE_METRICS)
    }


def fit_reply(
    delta: Mapping[str, np.ndarray], keys: Sequence[str], metrics: TrainMetrics | None, attestation: Attestation,
    *, clip_norm: float,
) -> tuple[list[np.ndarray], int, dict[str, bool | bytes | float | int | str]]:
    """What ``NumPyClient.fit`` returns: (masked payload, weight 1, plain metrics)."""
    if set(delta) != set(keys):
        raise DataError("the delta's keys differ from the request's shared keys")
    plain: dict[str, bool | bytes | float | int | str] = {
        ATTESTATION_PREFIX + k: v for k, v in asdict(attestation).items()
    }
    vector = np.zeros(len(SECURE_METRICS), dtype=np.float64)  # metrics off: nothing but zeros under the mask
    if metrics is not None:
        secure = {
            "train_loss": metrics.train_loss, "train_accuracy": metrics.train_accuracy,
            "eval_accuracy": metrics.eval_accuracy if metrics.eval_accuracy is not None else 0.0,
            "delta_norm": metrics.delta_norm, "clipped": float(metrics.delta_norm > clip_norm),
            "steps": float(metrics.steps), "seconds": metrics.seconds,
        }
        vector = encode_metrics(secure, clip_norm)
        plain[K_EPSILON_SAMPLE] = float(metrics.epsilon_sample)
    payload = [np.asarray(delta[k], dtype=np.float32) for k in keys] + [vector]
    return payload, 1, plain


def plain_epsilon_sample(metrics: Mapping[str, object]) -> float | None:
    """The ε_sample a device put in its plain metrics (None when it reports none); a value
    that is not a finite number in range is a :class:`DataError`."""
    if K_EPSILON_SAMPLE not in metrics:
        return None
    return check_number(K_EPSILON_SAMPLE, metrics[K_EPSILON_SAMPLE], METRIC_RANGES["epsilon_sample"])


def attestation_of(metrics: Mapping[str, object]) -> Attestation:
    """The :class:`Attestation` a device put in its plain ``FitRes.metrics``."""
    n = len(ATTESTATION_PREFIX)
    return Attestation.from_record({k[n:]: v for k, v in metrics.items() if k.startswith(ATTESTATION_PREFIX)})  # type: ignore[arg-type]


def split_sum(arrays: Sequence[np.ndarray], keys: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(shared arrays by name, secure-metric vector) of an unmasked payload."""
    if len(arrays) != len(keys) + 1:
        raise DataError(f"unmasked aggregate has {len(arrays)} arrays, expected {len(keys)} shared + 1 metric vector")
    return dict(zip(keys, arrays[:-1])), np.asarray(arrays[-1], dtype=np.float64)


__all__ = [
    "ATTESTATION_PREFIX", "K_ENVELOPE", "K_EPSILON_SAMPLE", "K_SHARED_KEYS", "SECURE_AGGREGATION_KEY",
    "SECURE_METRICS", "MetricBound", "attestation_of", "check_ranges", "decode_metric_sums", "encode_metrics",
    "fit_config", "fit_reply", "parse_fit", "plain_epsilon_sample", "parse_run_flag", "split_sum", "sum_error_bound",
]
