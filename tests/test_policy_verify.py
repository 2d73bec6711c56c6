"""Policy envelope verification: acceptance and the attack suite (one test per rejection)."""

from __future__ import annotations

import base64
import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpref.common.errors import ConfigError
from fedpref.safety_policy import (
    POLICY_NAME,
    POLICY_PAYLOAD_TYPE,
    BackboneMismatchError,
    Category,
    DuplicateKeyError,
    EnvelopeTooLargeError,
    ExpiredPolicyError,
    ExpiredRootError,
    ExtraFileError,
    FileHashMismatchError,
    MalformedEnvelopeError,
    MalformedPolicyError,
    MissingFileError,
    PolicyError,
    RevokedKeyError,
    RollbackError,
    SignatureThresholdError,
    UntrustedKeyError,
    WrongPayloadTypeError,
    WrongPolicyNameError,
    build_payload,
    generate_signing_key,
    keyid,
    load_root,
    make_root_body,
    parse_envelope,
    rotate_root,
    sign_envelope,
    sign_root,
    update_root,
    verify_envelope,
)

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=timezone.utc)
BACKBONE = "ab" * 32
WEIGHTS = "classifier.safetensors"
FILES = {WEIGHTS: bytes(range(256)) * 8, "labels.json": b'["violence", "self-harm"]'}


def manifest(**over):
    m = {
        "name": POLICY_NAME,
        "version": 3,
        "issued_at": "2030-05-01T00:00:00Z",
        "expires_at": "2030-07-01T00:00:00Z",
        "backbone_sha256": BACKBONE,
        "categories": [{"name": "violence", "threshold": 0.5}, {"name": "self-harm", "threshold": 0.25}],
        "classifier": {"kind": "linear", "dim": 384, "layers": [1, 2]},
    }
    m.update(over)
    return m


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dump(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def keys():
    return [generate_signing_key() for _ in range(5)]


@pytest.fixture(scope="module")
def root(keys):
    """2-of-3 over keys 0, 1, 2; keys 3 and 4 are untrusted."""
    return load_root(sign_root(make_root_body([k.public_key() for k in keys[:3]], 2, expires=NOW + timedelta(days=365)), keys[:2]))


def make_env(keys, signers=(0, 1), files=FILES, payload_type=POLICY_PAYLOAD_TYPE, **over) -> bytes:
    return sign_envelope(build_payload(manifest(**over), files), payload_type, [keys[i] for i in signers])


def resigned(keys, edit, signers=(0, 1)) -> bytes:
    """A payload edited after build_payload, then validly signed (a compromised builder)."""
    doc = json.loads(build_payload(manifest(), FILES))
    edit(doc)
    return sign_envelope(dump(doc), POLICY_PAYLOAD_TYPE, [keys[i] for i in signers])


def verify(env, root, *, last_version=2, now=NOW, **kw):
    return verify_envelope(env, root, last_version=last_version, now=now, **kw)


# --- acceptance ---------------------------------------------------------------------------


def test_valid_2_of_3_envelope(keys, root):
    env = make_env(keys)
    policy = verify(env, root, backbone_sha256=BACKBONE)
    assert policy.name == POLICY_NAME and policy.version == 3
    assert policy.issued_at == datetime(2030, 5, 1, tzinfo=timezone.utc)
    assert policy.expires_at == datetime(2030, 7, 1, tzinfo=timezone.utc)
    assert policy.categories == (Category("violence", 0.5), Category("self-harm", 0.25))
    assert dict(policy.files) == FILES
    assert policy.classifier["dim"] == 384 and policy.classifier_dict()["layers"] == [1, 2]
    assert len(policy.envelope_sha256) == 64
    assert set(policy.signed_by) == {keyid(keys[0]), keyid(keys[1])}
    with pytest.raises(TypeError):
        policy.files["x"] = b""  # type: ignore[index]
    for signers in [(1, 2), (0, 2), (0, 1, 2), (0, 3, 2)]:
        assert verify(make_env(keys, signers), root).version == 3


def test_naive_clock_is_a_caller_error(keys, root):
    with pytest.raises(ConfigError):
        verify(make_env(keys), root, now=datetime(2030, 6, 1))


# --- the attack suite ---------------------------------------------------------------------


def _with_payload(env: bytes, payload: bytes) -> bytes:
    doc = json.loads(env)
    doc["payload"] = b64(payload)
    return dump(doc)


def test_flipped_byte_in_payload(keys, root):
    env = make_env(keys)
    payload = bytearray(parse_envelope(env, max_size=1 << 22).payload)
    payload[payload.index(b'"version":3') + 10] ^= 0x0F  # "version":3 -> "version":<
    with pytest.raises(SignatureThresholdError):
        verify(_with_payload(env, bytes(payload)), root)


def test_flipped_byte_in_file_after_signing(keys, root):
    env = make_env(keys)
    payload = bytearray(parse_envelope(env, max_size=1 << 22).payload)
    payload[payload.index(b64(FILES[WEIGHTS]).encode()) + 100] ^= 0x01
    with pytest.raises(SignatureThresholdError):
        verify(_with_payload(env, bytes(payload)), root)


def test_file_not_matching_manifest_signed_by_compromised_builder(keys, root):
    tampered = bytearray(FILES[WEIGHTS])
    tampered[7] ^= 0x01
    env = resigned(keys, lambda d: d["files"].update({WEIGHTS: b64(bytes(tampered))}))
    with pytest.raises(FileHashMismatchError, match="sha256"):
        verify(env, root)
    env = resigned(keys, lambda d: d["files"].update({WEIGHTS: b64(FILES[WEIGHTS] + b"\x00")}))
    with pytest.raises(FileHashMismatchError, match="length"):
        verify(env, root)


def test_missing_file(keys, root):
    with pytest.raises(MissingFileError):
        verify(resigned(keys, lambda d: d["files"].pop("labels.json")), root)


def test_extra_file(keys, root):
    with pytest.raises(ExtraFileError):
        verify(resigned(keys, lambda d: d["files"].update({"extra.bin": b64(b"x")})), root)


def test_swapped_files(keys, root):
    def swap(d):
        f = d["files"]
        f[WEIGHTS], f["labels.json"] = f["labels.json"], f[WEIGHTS]

    with pytest.raises(FileHashMismatchError):
        verify(resigned(keys, swap), root)
    same_length = bytes(reversed(FILES[WEIGHTS]))  # same length, other content
    with pytest.raises(FileHashMismatchError):
        verify(resigned(keys, lambda d: d["files"].update({WEIGHTS: b64(same_length)})), root)


def test_fewer_signatures_than_threshold(keys, root):
    with pytest.raises(SignatureThresholdError, match="1 of 2"):
        verify(make_env(keys, signers=(0,)), root)


def test_same_key_counted_twice(keys, root):
    doc = json.loads(make_env(keys, signers=(0,)))
    doc["signatures"] = doc["signatures"] * 2  # duplicated entry
    with pytest.raises(DuplicateKeyError):
        verify(dump(doc), root)
    sig = doc["signatures"][0]["sig"]
    for other_id in (keyid(keys[1]), keyid(keys[2]), ""):  # same key, different keyid
        doc["signatures"] = [{"keyid": keyid(keys[0]), "sig": sig}, {"keyid": other_id, "sig": sig}]
        with pytest.raises(SignatureThresholdError):
            verify(dump(doc), root)


def test_untrusted_key(keys, root):
    with pytest.raises(UntrustedKeyError):
        verify(make_env(keys, signers=(0, 3)), root)
    with pytest.raises(UntrustedKeyError):
        verify(make_env(keys, signers=(3, 4)), root)


def test_revoked_key(keys, root):
    body = make_root_body([k.public_key() for k in keys[1:4]], 2, expires=NOW + timedelta(days=30), version=2)
    v2 = update_root(root, rotate_root(root, body, keys[:2], keys[1:3]))
    env = make_env(keys, signers=(0, 1))
    assert verify(env, root).version == 3  # fine under v1
    with pytest.raises(RevokedKeyError):
        verify(env, v2)  # key 0 was removed in the rotation
    assert verify(make_env(keys, signers=(1, 3)), v2).version == 3


def test_wrong_payload_type(keys, root):
    with pytest.raises(WrongPayloadTypeError):
        verify(make_env(keys, payload_type="application/vnd.fedpref.root.v1+json"), root)
    doc = json.loads(make_env(keys))
    doc["payloadType"] = "application/json"
    with pytest.raises(WrongPayloadTypeError):
        verify(dump(doc), root)


def test_wrong_name(keys, root):
    with pytest.raises(WrongPolicyNameError):
        verify(make_env(keys, name="other-policy"), root)
    assert verify(make_env(keys, name="other-policy"), root, expected_name="other-policy").version == 3


def test_rollback_and_replay(keys, root):
    env = make_env(keys)
    with pytest.raises(RollbackError):
        verify(env, root, last_version=3)  # replay of the installed version
    with pytest.raises(RollbackError):
        verify(env, root, last_version=7)  # rollback to an older version


def test_expired_policy_with_injected_clock(keys, root):
    env = make_env(keys)
    expires = datetime(2030, 7, 1, tzinfo=timezone.utc)
    assert verify(env, root, now=expires - timedelta(seconds=1)).version == 3
    with pytest.raises(ExpiredPolicyError):
        verify(env, root, now=expires)  # expires_at == now is expired
    with pytest.raises(ExpiredPolicyError):
        verify(env, root, now=expires + timedelta(days=1))  # freeze attack: stale policy replayed
    with pytest.raises(ExpiredPolicyError):
        verify(env, root, now=expires.astimezone(timezone(timedelta(hours=-5))))  # same instant, other zone


def test_expired_root(keys, root):
    with pytest.raises(ExpiredRootError):
        verify(make_env(keys, expires_at="2032-01-01T00:00:00Z"), root, now=NOW + timedelta(days=366))


def test_oversize_envelope(keys, root):
    env = make_env(keys)
    with pytest.raises(EnvelopeTooLargeError):
        verify(env, root, max_size=len(env) - 1)
    assert verify(env, root, max_size=len(env)).version == 3
    with pytest.raises(EnvelopeTooLargeError):
        verify(b" " * (4 * 1024 * 1024 + 1), root)


def test_malformed_json_envelope(keys, root):
    for bad in (b"", b"{", make_env(keys)[:-1], b'{"payload": "", "payloadType": 1, "signatures": []}'):
        with pytest.raises(MalformedEnvelopeError):
            verify(bad, root)


def test_bad_base64(keys, root):
    doc = json.loads(make_env(keys))
    for field in ("payload", "sig"):
        bad = json.loads(json.dumps(doc))
        target = bad if field == "payload" else bad["signatures"][0]
        target[field] = target[field][:-4] + "!!!!"
        with pytest.raises(MalformedEnvelopeError):
            verify(dump(bad), root)
    bad_file = resigned(keys, lambda d: d["files"].update({WEIGHTS: "%%%%"}))
    with pytest.raises(MalformedPolicyError):
        verify(bad_file, root)


def test_backbone_mismatch(keys, root):
    with pytest.raises(BackboneMismatchError):
        verify(make_env(keys), root, backbone_sha256="cd" * 32)
    assert verify(make_env(keys), root, backbone_sha256=BACKBONE.upper()).version == 3


def test_payload_parsed_only_after_signatures(keys, root):
    garbage = b"\xff not json"
    with pytest.raises(UntrustedKeyError):
        verify(sign_envelope(garbage, POLICY_PAYLOAD_TYPE, [keys[3], keys[4]]), root)
    with pytest.raises(MalformedPolicyError):
        verify(sign_envelope(garbage, POLICY_PAYLOAD_TYPE, keys[:2]), root)


@pytest.mark.parametrize(
    "over",
    [
        {"version": 0}, {"version": "4"}, {"version": True}, {"issued_at": "2030-05-01"},
        {"expires_at": "2030-04-01T00:00:00Z"}, {"backbone_sha256": "AB" * 32}, {"categories": []},
        {"categories": [{"name": "a", "threshold": "0.5"}]}, {"categories": [{"name": "a", "threshold": 1, "x": 0}]},
        {"categories": [{"name": "a", "threshold": 1}, {"name": "a", "threshold": 2}]}, {"classifier": []},
        {"unknown": 1},
    ],
)
def test_bad_manifest_fields_are_malformed(keys, root, over):
    with pytest.raises(MalformedPolicyError):
        build_payload(manifest(**over), FILES)
    with pytest.raises(MalformedPolicyError):
        verify(resigned(keys, lambda d: d["manifest"].update(over)), root)


@pytest.mark.parametrize("name", ["../evil", "manifest.json", "", ".hidden", "a/b", "x" * 200])
def test_bad_file_names(name):
    with pytest.raises(MalformedPolicyError):
        build_payload(manifest(), {name: b"x"})


def test_order_of_checks(keys, root):
    env = make_env(keys, name="other", version=1, expires_at="2030-05-02T00:00:00Z")
    with pytest.raises(WrongPolicyNameError):  # name before version before expiry
        verify(env, root)
    with pytest.raises(RollbackError):
        verify(make_env(keys, version=1, expires_at="2030-05-02T00:00:00Z"), root)


# --- single-byte flips anywhere -----------------------------------------------------------

_ALPHABET_SWAPS = {(ord("+"), ord("-")), (ord("-"), ord("+")), (ord("/"), ord("_")), (ord("_"), ord("/"))}


def _assert_flip_rejected(env: bytes, root, index: int, xor: int) -> None:
    mutated = bytearray(env)
    mutated[index] ^= xor
    try:
        verify(bytes(mutated), root)
    except PolicyError:
        return
    # DSSE allows both base64 alphabets, so '+'<->'-' or '/'<->'_' may re-spell the very same
    # signed bytes; anything else that verifies would be a forgery.
    assert (env[index], mutated[index]) in _ALPHABET_SWAPS, f"flip at {index} (^{xor:#x}) accepted"
    assert parse_envelope(bytes(mutated), max_size=1 << 22) == parse_envelope(env, max_size=1 << 22)


@pytest.fixture(scope="module")
def exact_threshold_env(keys):
    """Exactly threshold signatures: every signature entry is needed."""
    return make_env(keys, signers=(0, 2))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_flipped_byte_is_rejected(exact_threshold_env, root, data):
    env = exact_threshold_env
    index = data.draw(st.integers(0, len(env) - 1), label="index")
    xor = data.draw(st.integers(1, 255), label="xor")
    _assert_flip_rejected(env, root, index, xor)


def test_every_position_flipped(exact_threshold_env, root):
    for index in range(len(exact_threshold_env)):
        for xor in (0x01, 0x80):  # neither can turn one base64 alphabet into the other
            mutated = bytearray(exact_threshold_env)
            mutated[index] ^= xor
            with pytest.raises(PolicyError):
                verify(bytes(mutated), root)


def test_every_value_at_base64_field_ends(exact_threshold_env, root):
    """All 255 flips of the last 4 characters of each base64 field (padding, trailing bits)."""
    env = exact_threshold_env
    doc = json.loads(env)
    fields = [doc["payload"], *(s["sig"] for s in doc["signatures"])]
    for text in fields:
        end = env.index(text.encode()) + len(text)
        for index in range(end - 4, end):
            for xor in range(1, 256):
                _assert_flip_rejected(env, root, index, xor)


def test_base64_alphabet_swap_is_the_same_signed_content(keys, root):
    # the payload's base64 holds no '+' or '/', so only the signatures can show the swap: with
    # random keys both lack them about once in 250 runs; take the first signer pair whose do not
    envs = [make_env(keys, signers=signers) for signers in ((0, 1), (0, 2), (1, 2), (0, 1, 2))]
    env = next(e for e in envs if any(c in sig["sig"] for sig in json.loads(e)["signatures"] for c in "+/"))
    doc = json.loads(env)
    doc["payload"] = doc["payload"].replace("+", "-").replace("/", "_")
    for s in doc["signatures"]:
        s["sig"] = s["sig"].replace("+", "-").replace("/", "_")
    assert dump(doc) != env
    policy, again = verify(env, root), verify(dump(doc), root)
    assert again.envelope_sha256 != policy.envelope_sha256
    assert dataclasses.replace(again, envelope_sha256=policy.envelope_sha256) == policy
    assert parse_envelope(dump(doc), max_size=1 << 22) == parse_envelope(env, max_size=1 << 22)


# --- bounds on the signed manifest's numbers (issue 12) ----------------------------------------


@pytest.mark.parametrize("threshold", [-0.5, 0, 1, 1.5, 10**400, -(10**400)])
def test_threshold_outside_0_1_is_refused(keys, root, threshold):
    def edit(doc):
        doc["manifest"]["categories"][0]["threshold"] = threshold

    with pytest.raises(MalformedPolicyError, match=r"categories\[0\]\.threshold: expected a probability in \(0, 1\)"):
        verify(resigned(keys, edit), root)


def test_issued_in_the_future_is_refused(keys, root):
    issued = datetime(2030, 5, 1, tzinfo=timezone.utc)
    env = make_env(keys)
    assert verify(env, root, now=issued - timedelta(minutes=4)).version == 3  # within the clock skew
    with pytest.raises(MalformedPolicyError, match="more than 5 minutes after now"):
        verify(env, root, now=issued - timedelta(minutes=6))
