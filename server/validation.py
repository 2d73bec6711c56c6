"""Validation of one client's reply, before anything of it is aggregated.

Pure: takes the reply and what the server expects, returns the delta as numpy arrays or raises
:class:`RejectedUpdate` with the reason that goes to the log and the operator's status.

A Flower ``Array`` carries ``dtype`` and ``shape`` as *declared* metadata next to ``data``, an
``.npy`` file whose own header says what the bytes really are; ``Array.numpy()`` trusts the header
and ignores the declaration. So nothing here trusts either: each payload is size-bounded, its
``.npy`` header parsed (never with pickle), and the dtype, shape, finiteness and norm checks run on
the decoded array, which is what :func:`validate_reply` returns and the caller sums.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord
from numpy.lib import format as npy

from fedpref.common.errors import ConfigError, DataError
from fedpref.protocol.messages import NORM_TOLERANCE, PROTOCOL_VERSION, Attestation, TrainReply, l2_norm

NPY_HEADER_ALLOWANCE = 4096  # bytes: magic + header of an .npy payload (np.save writes 128 for our shapes)
NPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the only serialization accepted
_REASON_CHARS = 200  # a rejection reason is one line of at most about this many characters


class RejectedUpdate(DataError):
    """A reply that fails validation; it is logged and left out of the aggregate."""


@dataclass(frozen=True)
class Expected:
    shapes: dict[str, tuple[int, ...]]  # shared parameter name -> shape
    dtype: str  # numpy dtype name every array must have, e.g. "float32" (sent little-endian)
    clip_norm: float
    server_round: int
    frozen_identity: str  # what devices must attest: backbone sha256 (+ attribute basis)
    policy_version: int = 0
    safety_digest: str = ""

    def __post_init__(self) -> None:
        if np.dtype(self.dtype).kind != "f":
            raise ConfigError(f"Expected.dtype = {self.dtype!r}: the delta must be a float dtype, e.g. 'float32'")
        if not (isinstance(self.clip_norm, (int, float)) and 0 < self.clip_norm < math.inf):
            raise ConfigError(f"Expected.clip_norm = {self.clip_norm!r}: must be a finite number > 0")
        for name, shape in self.shapes.items():
            if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ConfigError(f"Expected.shapes[{name!r}] = {shape!r}: must be a tuple of ints ≥ 0")


def validate_reply(reply: TrainReply, exp: Expected) -> dict[str, np.ndarray]:
    """Check a reply; return its delta, decoded, in ``exp.shapes`` order.

    Each returned array is a fresh, read-only, C-contiguous array of dtype ``exp.dtype`` (native
    byte order) and exactly ``exp.shapes[name]``, all finite, with global L2 norm ≤ C·(1+tol).
    These are the arrays to sum: do not decode ``reply.delta`` again. Any failure, whatever its
    cause, is a :class:`RejectedUpdate` with a one-line reason; nothing else is raised.
    """
    try:
        validate_attestation(reply.attestation, exp)
        return validate_delta(reply.delta, exp)
    except RejectedUpdate as e:
        reason = str(e)
        if reason == _clip(reason):
            raise
        raise RejectedUpdate(_clip(reason)) from None
    except Exception as e:  # noqa: BLE001 - a hostile reply must never end the round
        raise RejectedUpdate(f"malformed reply ({_one_line(e)})") from None


def validate_attestation(att: Attestation, exp: Expected) -> None:
    """The attestation matches the round, the backbone and the policy in force (else RejectedUpdate)."""
    try:
        _check_attestation(att, exp)
    except RejectedUpdate:
        raise
    except Exception as e:  # noqa: BLE001
        raise RejectedUpdate(f"malformed attestation ({_one_line(e)})") from None


def _check_attestation(att: Attestation, exp: Expected) -> None:
    for field, want in (("protocol_version", int), ("server_round", int), ("frozen_identity", str),
                        ("policy_version", int), ("safety_digest", str)):
        v = getattr(att, field)
        if type(v) is not want:  # exact: True == 1, and neither a bool nor a numpy int comes off the wire
            raise RejectedUpdate(f"attestation field {field!r} has {type(v).__name__}, expected {want.__name__}")
    if att.protocol_version != PROTOCOL_VERSION:
        raise RejectedUpdate(f"protocol version {att.protocol_version} != {PROTOCOL_VERSION}")
    if att.server_round != exp.server_round:
        raise RejectedUpdate(f"stale round {att.server_round} (current {exp.server_round})")
    if att.frozen_identity != exp.frozen_identity:
        raise RejectedUpdate(f"frozen weights (backbone sha256, attribute basis) {att.frozen_identity[:12]!r}… "
                             f"!= {exp.frozen_identity[:12]}…")
    if att.policy_version != exp.policy_version:
        raise RejectedUpdate(f"policy version {att.policy_version} != {exp.policy_version}")
    if att.safety_digest != exp.safety_digest:
        raise RejectedUpdate(f"safety digest {att.safety_digest[:12]!r}… does not match policy v{exp.policy_version}")


def validate_delta(record: ArrayRecord, exp: Expected) -> dict[str, np.ndarray]:
    """Decode and check every array of ``record`` (see :func:`validate_reply` for what comes back)."""
    if not isinstance(record, ArrayRecord):
        raise RejectedUpdate(f"delta is a {type(record).__name__}, not an ArrayRecord")
    keys = set(record.keys())
    want = set(exp.shapes)
    if keys != want:
        extra, missing = sorted(repr(k[:40]) for k in keys - want), sorted(want - keys)
        raise RejectedUpdate(f"keys differ from the shared partition: unexpected {extra[:3]}, missing {missing[:3]}")
    dtype = np.dtype(exp.dtype)
    out: dict[str, np.ndarray] = {}
    for name, shape in exp.shapes.items():
        try:
            value = decode_array(record[name], tuple(shape), dtype)
            if not np.all(np.isfinite(value)):
                raise RejectedUpdate("non-finite values")
        except Exception as e:  # noqa: BLE001 - RejectedUpdate and anything a hostile payload triggers
            reason = str(e) if isinstance(e, RejectedUpdate) else f"undecodable array ({_one_line(e)})"
            raise RejectedUpdate(_clip(f"{name}: {reason}")) from None
        out[name] = value
    norm = l2_norm(out)  # float64 accumulation
    if not norm <= exp.clip_norm * (1 + NORM_TOLERANCE):
        raise RejectedUpdate(f"delta norm {norm:.6g} exceeds clip norm {exp.clip_norm:.6g}")
    return out


def decode_array(arr: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The array a Flower ``Array`` really carries, if it is ``dtype`` (little-endian) of ``shape``.

    Bounds the payload before parsing, parses only the ``.npy`` header (literal, no pickle), checks
    the real dtype and shape there, and requires the data to be exactly ``prod(shape)`` items: no
    short read, no trailing bytes. Declared metadata must agree too. Returns a read-only copy in
    native byte order; raises RejectedUpdate (or, on malformed bytes, whatever numpy raises).
    """
    wire = dtype.newbyteorder("<")  # what an honest client's np.save writes on any common host
    count = math.prod(shape)
    nbytes = count * wire.itemsize
    stype, data = getattr(arr, "stype", None), getattr(arr, "data", None)
    if stype != NPY_STYPE:
        raise RejectedUpdate(f"serialization {str(stype)[:40]!r} != {NPY_STYPE!r}")
    if not isinstance(data, bytes):
        raise RejectedUpdate(f"data is {type(data).__name__}, not bytes")
    if len(data) > nbytes + NPY_HEADER_ALLOWANCE:
        raise RejectedUpdate(f"payload of {len(data)} bytes > {nbytes} for {shape} {dtype} "
                             f"+ {NPY_HEADER_ALLOWANCE} header allowance")
    declared_shape, declared_dtype = arr.shape, arr.dtype  # type: ignore[attr-defined]
    if tuple(declared_shape) != shape:
        raise RejectedUpdate(f"declared shape {tuple(declared_shape)} != {shape}")
    if declared_dtype != dtype.name:
        raise RejectedUpdate(f"declared dtype {str(declared_dtype)[:40]!r} != {dtype.name}")

    fp = io.BytesIO(data)
    version = npy.read_magic(fp)
    if version == (1, 0):
        real_shape, fortran, real = npy.read_array_header_1_0(fp, max_header_size=NPY_HEADER_ALLOWANCE)
    elif version == (2, 0):
        real_shape, fortran, real = npy.read_array_header_2_0(fp, max_header_size=NPY_HEADER_ALLOWANCE)
    else:  # 3.0 only adds utf-8 field names of structured dtypes
        raise RejectedUpdate(f"npy format version {version} not accepted")
    if real.str != wire.str or real.hasobject or real.fields is not None or real.subdtype is not None:
        raise RejectedUpdate(f"dtype {real.str!r} in the data != {wire.str!r} ({dtype.name} little-endian)")
    if tuple(real_shape) != shape:
        raise RejectedUpdate(f"shape {tuple(real_shape)} in the data != {shape}")
    offset = fp.tell()
    if len(data) - offset != nbytes:
        raise RejectedUpdate(f"data holds {len(data) - offset} bytes after the header, {shape} {dtype} needs {nbytes}")
    flat = np.frombuffer(data, dtype=wire, count=count, offset=offset)
    value = np.array(flat.reshape(shape, order="F" if fortran else "C"), dtype=dtype, order="C", copy=True)
    value.flags.writeable = False
    return value


def _one_line(e: BaseException) -> str:
    return _clip(f"{type(e).__name__}: {' '.join(str(e).split())}")


def _clip(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) <= _REASON_CHARS else s[: _REASON_CHARS - 1] + "…"
