"""Server-side validation of replies: every rejection has its reason."""

import io
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings, strategies as st

from fedpref.client.device import clip
from fedpref.common.errors import DataError
from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainMetrics, TrainReply, train_reply
from fedpref.protocol.messages import l2_norm
from fedpref.server.validation import Expected, RejectedUpdate, validate_attestation, validate_reply

SHAPES = {"a.lora_A.shared.weight": (2, 3), "score.modules_to_save.shared.bias": (1,)}
SHA = "ab" * 32
EXP = Expected(shapes=SHAPES, dtype="float32", clip_norm=1.0, server_round=4, frozen_identity=SHA,
               policy_version=2, safety_digest="cd" * 32)


def _reply(delta=None, **att):
    delta = delta if delta is not None else {k: np.full(s, 0.1, np.float32) for k, s in SHAPES.items()}
    a = dict(protocol_version=PROTOCOL_VERSION, server_round=4, frozen_identity=SHA, policy_version=2, safety_digest="cd" * 32)
    a.update(att)
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    return TrainReply.from_content(train_reply(delta, m, Attestation(**a)))


def test_valid_reply_passes():
    out = validate_reply(_reply(), EXP)
    assert set(out) == set(SHAPES)


@pytest.mark.parametrize(
    "att,reason",
    [
        ({"server_round": 3}, "stale round"),
        ({"frozen_identity": "00" * 32}, "backbone sha256"),
        ({"policy_version": 1}, "policy version"),
        ({"safety_digest": "ee" * 32}, "safety digest"),
    ],
)
def test_attestation_mismatch_is_rejected(att, reason):
    with pytest.raises(RejectedUpdate, match=reason):
        validate_reply(_reply(**att), EXP)


def test_another_protocol_version_is_rejected_on_receipt_and_by_validation():
    """Parsing names the version before any field (another release may have other fields)."""
    with pytest.raises(DataError, match=r"^Attestation: protocol version 99 != "):
        _reply(protocol_version=99)
    att = Attestation(protocol_version=99, server_round=4, frozen_identity=SHA, policy_version=2, safety_digest="cd" * 32)
    with pytest.raises(RejectedUpdate, match="protocol version 99 != "):
        validate_attestation(att, EXP)


def test_extra_and_missing_keys_are_rejected():
    d = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(RejectedUpdate, match="unexpected"):
        validate_reply(_reply({**d, "x.lora_A.private.weight": np.zeros(1, np.float32)}), EXP)
    d.pop("a.lora_A.shared.weight")
    with pytest.raises(RejectedUpdate, match="missing"):
        validate_reply(_reply(d), EXP)


def test_shape_dtype_and_nonfinite_are_rejected():
    ok = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    with pytest.raises(RejectedUpdate, match="shape"):
        validate_reply(_reply({**ok, "a.lora_A.shared.weight": np.zeros((3, 2), np.float32)}), EXP)
    with pytest.raises(RejectedUpdate, match="dtype"):
        validate_reply(_reply({**ok, "a.lora_A.shared.weight": np.zeros((2, 3), np.float64)}), EXP)
    bad = np.zeros((2, 3), np.float32)
    bad[0, 0] = np.nan
    with pytest.raises(RejectedUpdate, match="non-finite"):
        validate_reply(_reply({**ok, "a.lora_A.shared.weight": bad}), EXP)


def test_norm_over_clip_is_rejected():
    big = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}  # norm sqrt(7)
    with pytest.raises(RejectedUpdate, match="exceeds clip norm"):
        validate_reply(_reply(big), EXP)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=7, max_size=7), st.floats(1e-3, 1e3))
def test_client_clipping_always_passes_server_check(values, c):
    """Property: whatever the delta, the client's clip gives norm ≤ C and the server accepts it."""
    arr = np.asarray(values, np.float32)
    delta = {"a.lora_A.shared.weight": arr[:6].reshape(2, 3), "score.modules_to_save.shared.bias": arr[6:]}
    clipped, raw = clip(delta, c)
    assert l2_norm(clipped) <= c * (1 + 1e-6)
    assert math.isclose(raw, l2_norm(delta), rel_tol=1e-6)
    exp = Expected(**{**EXP.__dict__, "clip_norm": c})
    validate_reply(_reply(clipped), exp)


# -- hostile payloads (issue 12, item 1): the checks run on what the bytes really hold ----------------

A, B = "a.lora_A.shared.weight", "score.modules_to_save.shared.bias"
PWNED: list[int] = []


def _pwn():  # what a pickled payload would run if anything ever unpickled it
    PWNED.append(1)
    return 0


class _Evil:
    def __reduce__(self):
        return (_pwn, ())


def _npy(arr: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _spoof(data: bytes, shape=(2, 3), dtype="float32", stype="numpy.ndarray") -> Array:
    """An Array whose declared metadata says ``shape``/``dtype`` whatever ``data`` holds."""
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def _raw_reply(arrays: dict, exp: Expected = EXP, **att) -> TrainReply:
    a = dict(protocol_version=PROTOCOL_VERSION, server_round=exp.server_round, frozen_identity=exp.frozen_identity,
             policy_version=exp.policy_version, safety_digest=exp.safety_digest)
    a.update(att)
    m = TrainMetrics(train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    return TrainReply(delta=ArrayRecord(arrays), metrics=m, attestation=Attestation(**a))


def _ok_b() -> Array:
    return Array(np.zeros(1, np.float32))


def _rejected(reply: TrainReply, match: str, exp: Expected = EXP, key: str | None = A) -> str:
    with pytest.raises(RejectedUpdate, match=match or None) as info:
        validate_reply(reply, exp)
    reason = str(info.value)
    assert "\n" not in reason and len(reason) <= 220
    if key is not None:
        assert reason.startswith(f"{key}: ")
    return reason


def test_returned_arrays_are_the_decoded_float32_values():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 100
    out = validate_reply(_raw_reply({A: Array(x), B: Array(np.array([0.25], np.float32))}), EXP)
    assert list(out) == [A, B]
    assert out[A].dtype == np.float32 and out[A].shape == (2, 3) and out[A].flags.c_contiguous
    np.testing.assert_array_equal(out[A], x)
    assert not out[A].flags.writeable  # what was validated is what gets summed


def test_fortran_ordered_payload_is_decoded_to_the_same_values():
    x = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3) / 100)
    assert b"'fortran_order': True" in Array(x).data
    out = validate_reply(_raw_reply({A: Array(x), B: _ok_b()}), EXP)
    np.testing.assert_array_equal(out[A], x)
    assert out[A].flags.c_contiguous


def test_spoofed_shape_cannot_broadcast_into_the_sum():
    """Declares (10000,) float32, carries (1,): Array.numpy() gives (1,), which would broadcast to 100·C."""
    exp = Expected(**{**EXP.__dict__, "shapes": {"w": (10000,)}})
    spoof = _spoof(_npy(np.array([1.0], np.float32)), shape=(10000,))
    assert spoof.numpy().shape == (1,)  # the bug: declared metadata and the real array disagree
    reason = _rejected(_raw_reply({"w": spoof}, exp), r"shape \(1,\) in the data != \(10000,\)", exp, key="w")
    assert "w" in reason


def test_spoofed_shape_with_other_element_count_is_rejected():
    _rejected(_raw_reply({A: _spoof(_npy(np.zeros((3, 2), np.float32))), B: _ok_b()}), r"shape \(3, 2\) in the data")
    _rejected(_raw_reply({A: _spoof(_npy(np.zeros((6,), np.float32))), B: _ok_b()}), r"shape \(6,\) in the data")


def test_declared_float32_carrying_float64_is_rejected():
    _rejected(_raw_reply({A: _spoof(_npy(np.zeros((2, 3), np.float64))), B: _ok_b()}), "dtype '<f8' in the data")


@pytest.mark.parametrize(
    "arr",
    [
        np.zeros((2, 3), np.complex64),
        np.zeros((2, 3), np.float16),
        np.zeros((2, 3), np.int32),
        np.zeros((2, 3), np.bool_),
        np.zeros((2, 3), ">f4"),  # big-endian float32
        np.zeros((2, 3), [("x", "<f4")]),  # structured, same itemsize
        np.zeros((2, 3), "V4"),
    ],
    ids=["complex64", "float16", "int32", "bool", "big-endian", "structured", "void"],
)
def test_declared_float32_carrying_another_dtype_is_rejected(arr):
    _rejected(_raw_reply({A: _spoof(_npy(arr)), B: _ok_b()}), "dtype")


def _hand_npy(descr: str, shape: str, body: bytes, fortran: str = "False") -> bytes:
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}\n".encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


@pytest.mark.parametrize(
    "descr,shape",
    [("('<f4', (3,))", "(2,)"), ("[('x', '<f4', (3,))]", "(2,)"), ("[('x', '<f4'), ('y', '<f4')]", "(2, 3)")],
    ids=["subarray", "structured-subarray", "two-fields"],
)
def test_hand_written_headers_with_compound_dtypes_are_rejected(descr, shape):
    _rejected(_raw_reply({A: _spoof(_hand_npy(descr, shape, b"\0" * 24)), B: _ok_b()}), "dtype .* in the data")


def test_pickled_object_array_is_rejected_without_unpickling():
    data = _npy(np.array([_Evil()] * 6, dtype=object).reshape(2, 3), allow_pickle=True)
    _rejected(_raw_reply({A: _spoof(data), B: _ok_b()}), "dtype '|O' in the data")
    assert PWNED == []


@pytest.mark.parametrize("cut", [0, 5, 9, 60, 127, 128, 151])
def test_truncated_data_is_rejected(cut):
    data = _npy(np.zeros((2, 3), np.float32))
    assert len(data) == 152
    _rejected(_raw_reply({A: _spoof(data[:cut]), B: _ok_b()}), "")


def test_trailing_bytes_are_rejected():
    data = _npy(np.zeros((2, 3), np.float32)) + b"\0" * 4
    _rejected(_raw_reply({A: _spoof(data), B: _ok_b()}), "28 bytes after the header")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an npy file at all",
        b"\x93NUMPY\x03\x00" + b"\0" * 200,  # format 3.0
        b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}\n",  # header misses keys
        b"\x93NUMPY\x01\x00\x0a\x00__import__\n",  # not a literal
        b"\x93NUMPY\x01\x00\xff\xff" + b" " * 200,  # header length beyond the data
    ],
)
def test_malformed_npy_is_rejected_with_a_reason(data):
    _rejected(_raw_reply({A: _spoof(data), B: _ok_b()}), "")


def test_header_declaring_a_huge_shape_is_rejected_before_any_allocation():
    data = _hand_npy("'<f4'", "(1000000000000,)", b"\0" * 24)
    _rejected(_raw_reply({A: _spoof(data), B: _ok_b()}), r"shape \(1000000000000,\) in the data")


def test_huge_payload_is_rejected_before_decoding():
    data = _npy(np.zeros((2, 3), np.float32)) + b"\0" * 10_000_000
    _rejected(_raw_reply({A: _spoof(data), B: _ok_b()}), "payload of 10000152 bytes > 24")


def test_declared_metadata_must_match_too():
    honest = _npy(np.zeros((2, 3), np.float32))
    _rejected(_raw_reply({A: _spoof(honest, dtype="float64"), B: _ok_b()}), "declared dtype")
    _rejected(_raw_reply({A: _spoof(honest, shape=(6,)), B: _ok_b()}), "declared shape")
    _rejected(_raw_reply({A: _spoof(honest, stype="torch.Tensor"), B: _ok_b()}), "serialization")


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_nonfinite_values_are_rejected(value):
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = value
    _rejected(_raw_reply({A: Array(x), B: _ok_b()}), "non-finite values")


def test_norm_just_above_clip_is_rejected_and_at_clip_accepted():
    zero = Array(np.zeros((2, 3), np.float32))
    for v in (np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2.0))):
        validate_reply(_raw_reply({A: zero, B: Array(np.array([v], np.float32))}), EXP)
    over = np.float32(1.0 + 1e-5)
    _rejected(_raw_reply({A: zero, B: Array(np.array([over], np.float32))}), "exceeds clip norm", key=None)


def test_norm_is_over_the_decoded_arrays_not_the_declared_ones():
    """3 × 0.5 in (2, 3) float32: norm 0.87 per key would pass, but the norm runs on every key together."""
    x = np.full((2, 3), 0.5, np.float32)  # norm sqrt(1.5) > 1
    _rejected(_raw_reply({A: Array(x), B: _ok_b()}), "exceeds clip norm", key=None)


def test_hostile_attestation_types_and_shapes_are_rejected_not_raised():
    ok = {A: Array(np.zeros((2, 3), np.float32)), B: _ok_b()}
    _rejected(_raw_reply(ok, protocol_version=True), "protocol_version", key=None)
    _rejected(_raw_reply(ok, frozen_identity=None), "frozen_identity", key=None)
    with pytest.raises(RejectedUpdate, match="malformed reply"):
        validate_reply(None, EXP)  # type: ignore[arg-type]
    bad = TrainReply(delta={A: np.zeros((2, 3), np.float32)}, metrics=None, attestation=_raw_reply(ok).attestation)  # type: ignore[arg-type]
    with pytest.raises(RejectedUpdate, match="not an ArrayRecord"):
        validate_reply(bad, EXP)


def test_a_long_hostile_key_gives_a_short_reason():
    ok = {A: Array(np.zeros((2, 3), np.float32)), B: _ok_b()}
    reason = _rejected(_raw_reply({**ok, "k" * 10_000: _ok_b()}), "unexpected", key=None)
    assert len(reason) <= 220


@pytest.mark.parametrize(
    "field,value", [("dtype", "int32"), ("clip_norm", 0.0), ("clip_norm", math.inf), ("shapes", {A: (2, -1)})]
)
def test_an_impossible_expectation_is_the_callers_error(field, value):
    from fedpref.common.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        Expected(**{**EXP.__dict__, field: value})
