"""Property: whatever a device sends, validate_reply returns exactly what the server may sum, or rejects.

Hostile replies mix spoofed declared metadata, payloads of other dtypes and shapes (complex,
object/pickled, structured, big-endian, empty, huge), hand-written ``.npy`` headers, random and
mutated bytes, extra and missing keys, hostile attestations and metric values.
"""

from __future__ import annotations

import io
import math
from dataclasses import fields

import numpy as np
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainMetrics, TrainReply, l2_norm
from fedpref.server.validation import NORM_TOLERANCE, Expected, RejectedUpdate, validate_reply

SHAPES = {"a.lora_A.shared.weight": (2, 3), "score.modules_to_save.shared.bias": (1,), "p.shared.empty": (0,)}
SHA = "ab" * 32
ATT = dict(protocol_version=PROTOCOL_VERSION, server_round=4, frozen_identity=SHA, policy_version=2, safety_digest="cd" * 32)


def _expected(clip_norm: float) -> Expected:
    return Expected(shapes=SHAPES, dtype="float32", clip_norm=clip_norm, server_round=4, frozen_identity=SHA,
                    policy_version=2, safety_digest="cd" * 32)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype.hasobject)  # pickled object arrays are part of the attack surface
    return buf.getvalue()


def _hand_npy(version: bytes, header: str, body: bytes) -> bytes:
    raw = header.encode("latin1", "replace")
    size = len(raw).to_bytes(2 if version[:1] == b"\x01" else 4, "little", signed=False) if len(raw) < 65536 else b"\xff\xff"
    return b"\x93NUMPY" + version + size + raw + body


# -- payload bytes ------------------------------------------------------------------------------------

FLOATS32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
HOSTILE_DTYPES = st.sampled_from([
    np.dtype("<f4"), np.dtype(">f4"), np.dtype("<f8"), np.dtype("<f2"), np.dtype("<c8"), np.dtype("<c16"),
    np.dtype("<i4"), np.dtype("u1"), np.dtype("?"), np.dtype("O"), np.dtype("V4"), np.dtype("<U1"),
    np.dtype([("x", "<f4")]), np.dtype([("x", "<f4"), ("y", "<f4")]), np.dtype("<M8[s]"),
])


@st.composite
def real_arrays(draw) -> np.ndarray:
    """Arrays of any dtype and shape (possibly empty or fortran-ordered), as a client could np.save."""
    dtype = draw(HOSTILE_DTYPES)
    shape = draw(st.one_of(st.sampled_from(list(SHAPES.values())), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    if dtype.hasobject:
        arr = np.empty(shape, dtype=object)
        value = draw(st.sampled_from([None, 1.0, "x", (1, 2), {"k": 1}]))
        for i in np.ndindex(shape):
            arr[i] = value
        return arr
    if dtype.kind == "f":
        arr = draw(hnp.arrays(dtype, shape, elements=st.floats(allow_nan=True, allow_infinity=True, width=8 * min(dtype.itemsize, 8))))
    else:
        arr = np.zeros(shape, dtype)
    return np.asfortranarray(arr) if draw(st.booleans()) else arr


@st.composite
def honest(draw, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` as a client sends it: any scale, now and then a non-finite value."""
    arr = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)))
    with np.errstate(over="ignore"):
        arr = arr * np.float32(draw(st.sampled_from([0.0, 1e-3, 0.1, 0.3, 1.0, 1e3, 1e38])))
    if arr.size and draw(st.sampled_from([False] * 9 + [True])):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return np.asfortranarray(arr) if draw(st.booleans()) else arr


DESCRS = st.sampled_from(["'<f4'", "'>f4'", "'|f4'", "'f4'", "'<f8'", "'|O'", "'<c8'", "[('x', '<f4')]", "('<f4', (3,))",
                          "[('x', '<f4', (3,))]", "'V4'", "'<U3'", "'|b1'", "'<f2'", "'zz'", "1", "None", "[]", "''"])
HEADER_SHAPES = st.one_of(
    st.sampled_from(["(2, 3)", "(1,)", "(0,)", "()", "(6,)", "(3, 2)", "(1000000000000,)", "(-1,)", "(2, -3)",
                     "[2, 3]", "(2.0, 3)", "'x'", "(2, 3, 0)", "(4611686018427387904, 4)", "None"]),
    st.lists(st.integers(-(2**64), 2**64), max_size=4).map(lambda xs: repr(tuple(xs))),
)
FORTRAN = st.sampled_from(["False", "True", "0", "'no'", "None"])


@st.composite
def hand_written(draw) -> bytes:
    """An .npy file written by hand: any descr / shape / fortran flag, any version, any body."""
    header = draw(st.sampled_from([
        "{{'descr': {d}, 'fortran_order': {f}, 'shape': {s}, }}",
        "{{'shape': {s}, 'fortran_order': {f}, 'descr': {d}}}",
        "{{'descr': {d}, 'shape': {s}}}",
        "{{'descr': {d}, 'fortran_order': {f}, 'shape': {s}, 'extra': 1}}",
        "[{d}, {f}, {s}]",
    ])).format(d=draw(DESCRS), f=draw(FORTRAN), s=draw(HEADER_SHAPES))
    header += " " * draw(st.integers(0, 70)) + "\n"
    version = draw(st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00", b"\x00\x00", b"\xff\x01"]))
    body = draw(st.one_of(st.binary(max_size=40), st.integers(0, 40).map(lambda n: np.zeros(n, "<f4").tobytes())))
    return _hand_npy(version, header, body)


@st.composite
def mutated(draw, shape: tuple[int, ...]) -> bytes:
    data = bytearray(_npy(draw(honest(shape))))
    how = draw(st.sampled_from(["truncate", "flip", "append", "prepend"]))
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
        return bytes(data)
    extra = draw(st.one_of(st.binary(min_size=1, max_size=16), st.integers(4090, 5000).map(lambda n: b"\0" * n)))
    return bytes(data + extra) if how == "append" else bytes(extra + data)


def hostile_payload(shape: tuple[int, ...]):
    """Data bytes for a key of ``shape``: another array, hand-written, mutated, random, huge."""
    return st.one_of(
        real_arrays().map(_npy),
        hand_written(),
        mutated(shape),
        st.binary(max_size=256),
        st.integers(0, 3).map(lambda k: _npy(np.zeros(2_000 + 1_000 * k, np.float32))),  # over the size bound
    )


HOSTILE_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                           st.text(max_size=8), st.binary(max_size=8), st.lists(st.integers(), max_size=2))


@st.composite
def attestations(draw) -> Attestation:
    att = dict(ATT)
    if draw(st.sampled_from([False] * 4 + [True])):  # mostly right, so the delta checks are reached
        att[draw(st.sampled_from(sorted(att)))] = draw(HOSTILE_VALUES)
    return Attestation(**att)


@st.composite
def metrics(draw):
    """None, a valid TrainMetrics, or one with hostile values built around its range checks."""
    kind = draw(st.sampled_from(["none", "valid", "hostile", "junk"]))
    if kind == "none":
        return None
    if kind == "junk":
        return draw(HOSTILE_VALUES)
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    if kind == "hostile":
        for f in fields(TrainMetrics):
            if draw(st.booleans()):
                object.__setattr__(m, f.name, draw(HOSTILE_VALUES))
    return m


CORRUPTIONS = ["payload", "payload", "payload", "declared", "stype", "missing", "extra"]
CORRUPTION_COUNTS = [0, 0, 0, 1, 1, 1, 1, 2, 3]  # sampled_from draws about uniformly; integers() would not


@st.composite
def replies(draw) -> TrainReply:
    """An honest reply, then 0-3 corruptions of its delta, a hostile attestation now and then, any metrics."""
    items: dict[str, Array] = {name: Array(draw(honest(shape))) for name, shape in SHAPES.items()}
    for _ in range(draw(st.sampled_from(CORRUPTION_COUNTS))):
        what, name = draw(st.sampled_from(CORRUPTIONS)), draw(st.sampled_from(list(SHAPES)))
        if name not in items and what != "extra":
            continue
        if what == "payload":  # the spoof of issue 12: declared metadata right, data anything
            items[name] = Array(dtype="float32", shape=SHAPES[name], stype="numpy.ndarray",
                                data=draw(hostile_payload(SHAPES[name])))
        elif what == "declared":
            old = items[name]
            items[name] = Array(dtype=draw(st.sampled_from(["float32", "float64", "complex64", "object", "", "<f4"])),
                                shape=tuple(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))),
                                stype=old.stype, data=old.data)
        elif what == "stype":
            old = items[name]
            items[name] = Array(dtype=old.dtype, shape=old.shape, stype=draw(st.sampled_from(["torch.Tensor", "", "numpy"])),
                                data=old.data)
        elif what == "missing":
            del items[name]
        else:
            items[draw(st.sampled_from(["x.lora_A.private.weight", "", name + " "]))] = Array(np.zeros(1, np.float32))
    return TrainReply(delta=ArrayRecord(items), metrics=draw(metrics()), attestation=draw(attestations()))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(replies(), st.sampled_from([1e-3, 1.0, 3.0, 1e3, 1e30]))
def test_validate_reply_returns_only_what_may_be_summed_or_rejects(reply, clip_norm):
    exp = _expected(clip_norm)
    try:
        out = validate_reply(reply, exp)
    except RejectedUpdate as e:
        reason = str(e)
        assert reason and "\n" not in reason and len(reason) <= 220
        what = reason.split(": ", 1)[1] if reason.startswith(tuple(SHAPES)) else reason
        event("rejected: " + " ".join(w for w in what.split()[:3] if not any(c.isdigit() for c in w)))
        return
    event("accepted")
    # accepted: exactly the expected keys, in order, each the float32 array of the expected shape ...
    assert list(out) == list(SHAPES)
    for name, shape in SHAPES.items():
        v = out[name]
        assert type(v) is np.ndarray and v.dtype == np.float32 and v.dtype.isnative and v.dtype.fields is None
        assert v.shape == shape and v.flags.c_contiguous and not v.flags.writeable
        assert np.all(np.isfinite(v))
        # ... holding exactly what the bytes hold (decoded with numpy's own safe loader, for comparison)
        real = np.load(io.BytesIO(reply.delta[name].data), allow_pickle=False)
        assert real.shape == shape
        np.testing.assert_array_equal(v, real, strict=False)
    assert l2_norm(out) <= clip_norm * (1 + NORM_TOLERANCE)
    total = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for k, v in out.items():
        total[k] += v  # what the strategy does: cannot broadcast, shapes are exact
        assert total[k].shape == SHAPES[k]


@settings(max_examples=200, deadline=None)
@given(st.tuples(*(honest(s) for s in SHAPES.values())), st.floats(1e-3, 1e3))
def test_an_honest_clipped_reply_is_accepted_bit_for_bit(arrays, clip_norm):
    delta = dict(zip(SHAPES, arrays))
    norm = l2_norm(delta)
    if not all(np.all(np.isfinite(a)) for a in arrays) or not math.isfinite(norm):
        return
    if norm > clip_norm:
        delta = {k: (v.astype(np.float64) * (clip_norm / norm) * (1 - 1e-6)).astype(np.float32) for k, v in delta.items()}
    reply = TrainReply(delta=ArrayRecord({k: Array(v) for k, v in delta.items()}), metrics=None, attestation=Attestation(**ATT))
    out = validate_reply(reply, _expected(clip_norm))
    for k, v in delta.items():
        assert out[k].tobytes() == np.ascontiguousarray(v).tobytes()
