"""Server-side validation of replies: every rejection has its reason."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedpref.client.device import clip
from fedpref.protocol.messages import PROTOCOL_VERSION, Attestation, TrainMetrics, TrainReply, train_reply
from fedpref.protocol.messages import l2_norm
from fedpref.server.validation import Expected, RejectedUpdate, validate_reply

SHAPES = {"a.lora_A.shared.weight": (2, 3), "score.modules_to_save.shared.bias": (1,)}
SHA = "ab" * 32
EXP = Expected(shapes=SHAPES, dtype="float32", clip_norm=1.0, server_round=4, backbone_sha256=SHA,
               policy_version=2, safety_digest="cd" * 32)


def _reply(delta=None, **att):
    delta = delta if delta is not None else {k: np.full(s, 0.1, np.float32) for k, s in SHAPES.items()}
    a = dict(protocol_version=PROTOCOL_VERSION, server_round=4, backbone_sha256=SHA, policy_version=2, safety_digest="cd" * 32)
    a.update(att)
    m = TrainMetrics(num_examples=5, train_loss=0.5, train_accuracy=0.5, epsilon_sample=1.0, delta_norm=0.1, steps=1, seconds=0.1)
    return TrainReply.from_content(train_reply(delta, m, Attestation(**a)))


def test_valid_reply_passes():
    out = validate_reply(_reply(), EXP)
    assert set(out) == set(SHAPES)


@pytest.mark.parametrize(
    "att,reason",
    [
        ({"protocol_version": 99}, "protocol version"),
        ({"server_round": 3}, "stale round"),
        ({"backbone_sha256": "00" * 32}, "backbone sha256"),
        ({"policy_version": 1}, "policy version"),
        ({"safety_digest": "ee" * 32}, "safety digest"),
    ],
)
def test_attestation_mismatch_is_rejected(att, reason):
    with pytest.raises(RejectedUpdate, match=reason):
        validate_reply(_reply(**att), EXP)


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
