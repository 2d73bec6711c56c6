"""DSSE encoding, envelope parsing, signature counting, and key files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization

from fedpref.common.errors import ConfigError
from fedpref.safety_policy import (
    DuplicateKeyError,
    EnvelopeTooLargeError,
    KeyFileError,
    MalformedEnvelopeError,
    PolicyError,
    RevokedKeyError,
    SignatureThresholdError,
    UntrustedKeyError,
    WrongPassphraseError,
    generate_signing_key,
    keyid,
    load_private_key,
    pae,
    parse_envelope,
    public_key_hex,
    save_private_key,
    sign_envelope,
    verify_signatures,
)
from fedpref.safety_policy.dsse import MAX_SIGNATURES, Envelope, Signature, public_key_bytes

TYPE = "application/vnd.test+json"
MAX = 1 << 20


@pytest.fixture(scope="module")
def keys():
    return [generate_signing_key() for _ in range(4)]


def trusted(*ks):
    return {keyid(k): k.public_key() for k in ks}


def env_json(env_bytes: bytes) -> dict:
    return json.loads(env_bytes)


def dump(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --- PAE ----------------------------------------------------------------------------------


def test_pae_spec_vector():
    assert pae("http://example.com/HelloWorld", b"hello world") == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_lengths_are_bytes_not_chars():
    assert pae("", b"") == b"DSSEv1 0  0 "
    assert pae("\u00e9", b"\x00\xff") == b"DSSEv1 2 \xc3\xa9 2 \x00\xff"


# --- signing and parsing ------------------------------------------------------------------


def test_sign_then_parse_roundtrip(keys):
    data = sign_envelope(b'{"a":1}', TYPE, keys[:2])
    doc = env_json(data)
    assert set(doc) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(doc["payload"]) == b'{"a":1}'
    env = parse_envelope(data, max_size=MAX)
    assert env.payload == b'{"a":1}' and env.payload_type == TYPE
    assert [s.keyid for s in env.signatures] == [keyid(k) for k in keys[:2]]
    for sig, key in zip(env.signatures, keys[:2]):
        key.public_key().verify(sig.sig, pae(TYPE, b'{"a":1}'))  # signature is over PAE
    assert verify_signatures(env, trusted(*keys[:3]), 2) == tuple(keyid(k) for k in keys[:2])


def test_keyid_is_sha256_of_raw_public_key(keys):
    raw = public_key_bytes(keys[0])
    assert len(raw) == 32
    assert keyid(keys[0]) == keyid(keys[0].public_key()) == hashlib.sha256(raw).hexdigest()
    assert public_key_hex(keys[0]) == raw.hex()


def test_sign_envelope_refuses_bad_signers(keys):
    with pytest.raises(ConfigError):
        sign_envelope(b"x", TYPE, [])
    with pytest.raises(ConfigError):
        sign_envelope(b"x", TYPE, [keys[0], keys[0]])
    with pytest.raises(ConfigError):
        sign_envelope("x", TYPE, [keys[0]])  # type: ignore[arg-type]


def test_url_safe_alphabet_accepted(keys):
    payload = bytes(range(256))  # base64 contains '+' and '/'
    doc = env_json(sign_envelope(payload, TYPE, [keys[0]]))
    doc["payload"] = base64.urlsafe_b64encode(payload).decode()
    doc["signatures"][0]["sig"] = doc["signatures"][0]["sig"].replace("+", "-").replace("/", "_")
    env = parse_envelope(dump(doc), max_size=MAX)
    assert env.payload == payload
    verify_signatures(env, trusted(keys[0]), 1)


def test_size_checked_before_parsing():
    with pytest.raises(EnvelopeTooLargeError):
        parse_envelope(b"\xff" * 101, max_size=100)  # not even UTF-8: size must win
    with pytest.raises(MalformedEnvelopeError):
        parse_envelope(b"\xff" * 100, max_size=100)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: b"not json",
        lambda d: b"[]",
        lambda d: b"\xc3(",
        lambda d: b"[" * 100_000 + b"]" * 100_000,
        lambda d: dump({k: v for k, v in d.items() if k != "payload"}),
        lambda d: dump({**d, "extra": 1}),
        lambda d: dump({**d, "payloadType": ""}),
        lambda d: dump({**d, "payloadType": 7}),
        lambda d: dump({**d, "signatures": []}),
        lambda d: dump({**d, "signatures": {}}),
        lambda d: dump({**d, "signatures": [{"keyid": "k"}]}),
        lambda d: dump({**d, "signatures": [{**d["signatures"][0], "x": 1}]}),
        lambda d: dump({**d, "signatures": [{**d["signatures"][0], "keyid": 5}]}),
        lambda d: dump({**d, "signatures": d["signatures"] * (MAX_SIGNATURES + 1)}),
        lambda d: dump(d).replace(b'"payloadType"', b'"payload":"","payloadType"'),  # duplicate member
        lambda d: dump(d).replace(b'"signatures":', b'"signatures":NaN,"x":'),
    ],
)
def test_malformed_envelopes(keys, mutate):
    doc = env_json(sign_envelope(b"hello", TYPE, [keys[0]]))
    with pytest.raises(MalformedEnvelopeError):
        parse_envelope(mutate(doc), max_size=MAX)


@pytest.mark.parametrize(
    "bad",
    [
        "aGVsbG8",  # missing padding
        "aGVsbG9=",  # non-zero trailing bits (non-canonical)
        "aGVs bG8=",  # whitespace
        "aGVs\nbG8=",  # newline
        "aGVsbG8=aGVs",  # data after padding
        "a+b-",  # mixed alphabets
        "aGVsbG8*",  # not base64
        "\u00e9GVsbG8=",  # non-ASCII
    ],
)
def test_bad_base64_is_malformed(keys, bad):
    doc = env_json(sign_envelope(b"hello", TYPE, [keys[0]]))
    with pytest.raises(MalformedEnvelopeError):
        parse_envelope(dump({**doc, "payload": bad}), max_size=MAX)
    sig_doc = {**doc, "signatures": [{**doc["signatures"][0], "sig": bad}]}
    with pytest.raises(MalformedEnvelopeError):
        parse_envelope(dump(sig_doc), max_size=MAX)


def test_signature_of_wrong_length_is_malformed(keys):
    doc = env_json(sign_envelope(b"hello", TYPE, [keys[0]]))
    doc["signatures"][0]["sig"] = base64.b64encode(b"\x00" * 63).decode()
    with pytest.raises(MalformedEnvelopeError):
        parse_envelope(dump(doc), max_size=MAX)


# --- signature counting -------------------------------------------------------------------


def _env(keys, signers, payload=b"p"):
    return parse_envelope(sign_envelope(payload, TYPE, signers), max_size=MAX)


def test_threshold_not_met(keys):
    env = _env(keys, [keys[0]])
    with pytest.raises(SignatureThresholdError) as info:
        verify_signatures(env, trusted(*keys[:3]), 2)
    assert "1 of 2" in str(info.value)


def test_duplicate_entries_count_once(keys):
    env = _env(keys, [keys[0]])
    doubled = Envelope(env.payload, env.payload_type, env.signatures * 2)
    with pytest.raises(DuplicateKeyError):
        verify_signatures(doubled, trusted(*keys[:3]), 2)
    assert verify_signatures(doubled, trusted(*keys[:3]), 1) == (keyid(keys[0]),)


def test_same_key_under_two_keyids_counts_once(keys):
    """Even if a key map listed one public key under two ids, it would count once."""
    env = _env(keys, [keys[0]])
    sig = env.signatures[0].sig
    aliased = {"alias-a": keys[0].public_key(), "alias-b": keys[0].public_key(), keyid(keys[1]): keys[1].public_key()}
    twice = Envelope(env.payload, env.payload_type, (Signature("alias-a", sig), Signature("alias-b", sig)))
    with pytest.raises(DuplicateKeyError):
        verify_signatures(twice, aliased, 2)


def test_signature_relabelled_with_another_trusted_keyid_does_not_count(keys):
    env = _env(keys, [keys[0]])
    sig = env.signatures[0].sig
    relabelled = Envelope(env.payload, env.payload_type, (Signature(keyid(keys[0]), sig), Signature(keyid(keys[1]), sig)))
    with pytest.raises(SignatureThresholdError) as info:
        verify_signatures(relabelled, trusted(*keys[:3]), 2)
    assert "1 invalid" in str(info.value)


def test_empty_keyid_tries_every_key_but_still_counts_once(keys):
    env = _env(keys, [keys[0]])
    sig = env.signatures[0].sig
    assert verify_signatures(Envelope(env.payload, env.payload_type, (Signature("", sig),)), trusted(*keys[:3]), 1)
    both = Envelope(env.payload, env.payload_type, (Signature(keyid(keys[0]), sig), Signature("", sig)))
    with pytest.raises(DuplicateKeyError):
        verify_signatures(both, trusted(*keys[:3]), 2)


def test_untrusted_and_revoked_keys(keys):
    env = _env(keys, [keys[0], keys[3]])
    with pytest.raises(UntrustedKeyError):
        verify_signatures(env, trusted(*keys[:3]), 2)
    with pytest.raises(RevokedKeyError):
        verify_signatures(env, trusted(*keys[:3]), 2, revoked={keyid(keys[3])})


def test_signature_over_other_payload_type_fails(keys):
    env = _env(keys, [keys[0]])
    retyped = Envelope(env.payload, "application/other", env.signatures)
    with pytest.raises(SignatureThresholdError):
        verify_signatures(retyped, trusted(keys[0]), 1)


def test_all_rejections_are_policy_errors():
    for cls in (DuplicateKeyError, UntrustedKeyError, RevokedKeyError, MalformedEnvelopeError, KeyFileError):
        assert issubclass(cls, PolicyError)
    assert issubclass(DuplicateKeyError, SignatureThresholdError)
    assert issubclass(RevokedKeyError, UntrustedKeyError)


# --- key files ----------------------------------------------------------------------------


def test_private_key_roundtrip_mode_0600(tmp_path, keys):
    path = tmp_path / "keys" / "signer.pem"
    save_private_key(path, keys[0], b"correct horse")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert keyid(load_private_key(path, b"correct horse")) == keyid(keys[0])
    assert [p.name for p in path.parent.iterdir()] == ["signer.pem"]  # no temp file left


def test_private_key_errors(tmp_path, keys):
    path = tmp_path / "signer.pem"
    with pytest.raises(KeyFileError) as info:
        load_private_key(path, b"pw")
    assert str(path) in str(info.value) and "fedpref-server keys init" in str(info.value)
    save_private_key(path, keys[0], b"pw")
    with pytest.raises(WrongPassphraseError):
        load_private_key(path, b"nope")
    with pytest.raises(ConfigError):
        save_private_key(path, keys[1], b"pw")  # no silent overwrite
    save_private_key(path, keys[1], b"pw", overwrite=True)
    assert keyid(load_private_key(path, b"pw")) == keyid(keys[1])
    with pytest.raises(ConfigError):
        save_private_key(tmp_path / "other.pem", keys[0], b"")
    plain = tmp_path / "plain.pem"
    plain.write_bytes(keys[0].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    with pytest.raises(KeyFileError):
        load_private_key(plain, b"pw")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError):
        load_private_key(garbage, b"pw")
