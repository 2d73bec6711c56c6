"""Validation of one client's reply, before anything of it is aggregated.

Pure: takes the decoded reply and what the server expects, returns the delta as numpy
arrays or raises :class:`RejectedUpdate` with the reason that goes to the log and the
operator's status.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from fedpref.protocol.errors import DataError
from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainReply, l2_norm

NORM_TOLERANCE = 1e-6  # relative slack on ‖delta‖ ≤ C for float32 rounding


class RejectedUpdate(DataError):
    """A reply that fails validation; it is logged and left out of the aggregate."""


@dataclass(frozen=True)
class Expected:
    shapes: dict[str, tuple[int, ...]]  # shared parameter name -> shape
    dtype: str  # numpy dtype name every array must have, e.g. "float32"
    clip_norm: float
    server_round: int
    backbone_sha256: str
    policy_version: int = 0
    safety_digest: str = ""


def validate_reply(reply: TrainReply, exp: Expected) -> dict[str, np.ndarray]:
    validate_attestation(reply.attestation, exp)
    return validate_delta(reply.delta, exp)


def validate_attestation(att: Attestation, exp: Expected) -> None:
    """The attestation matches the round, the backbone and the policy in force (else RejectedUpdate)."""
    if att.protocol_version != PROTOCOL_VERSION:
        raise RejectedUpdate(f"protocol version {att.protocol_version} != {PROTOCOL_VERSION}")
    if att.server_round != exp.server_round:
        raise RejectedUpdate(f"stale round {att.server_round} (current {exp.server_round})")
    if att.backbone_sha256 != exp.backbone_sha256:
        raise RejectedUpdate(f"frozen weights (backbone sha256, attribute basis) {att.backbone_sha256[:12]}… "
                             f"!= {exp.backbone_sha256[:12]}…")
    if att.policy_version != exp.policy_version:
        raise RejectedUpdate(f"policy version {att.policy_version} != {exp.policy_version}")
    if att.safety_digest != exp.safety_digest:
        raise RejectedUpdate(f"safety digest {att.safety_digest[:12]}… does not match policy v{exp.policy_version}")


def validate_delta(record: ArrayRecord, exp: Expected) -> dict[str, np.ndarray]:
    keys = set(record.keys())
    want = set(exp.shapes)
    if keys != want:
        extra, missing = sorted(keys - want), sorted(want - keys)
        raise RejectedUpdate(f"keys differ from the shared partition: unexpected {extra[:3]}, missing {missing[:3]}")
    out: dict[str, np.ndarray] = {}
    for name in exp.shapes:
        arr = record[name]
        if tuple(arr.shape) != tuple(exp.shapes[name]):
            raise RejectedUpdate(f"{name}: shape {tuple(arr.shape)} != {tuple(exp.shapes[name])}")
        if arr.dtype != exp.dtype:
            raise RejectedUpdate(f"{name}: dtype {arr.dtype} != {exp.dtype}")
        try:
            value = arr.numpy()
        except Exception as e:  # malformed bytes
            raise RejectedUpdate(f"{name}: undecodable array ({e})") from None
        if not np.all(np.isfinite(value)):
            raise RejectedUpdate(f"{name}: non-finite values")
        out[name] = value
    norm = l2_norm(out)
    if norm > exp.clip_norm * (1 + NORM_TOLERANCE):
        raise RejectedUpdate(f"delta norm {norm:.6g} exceeds clip norm {exp.clip_norm:.6g}")
    return out
