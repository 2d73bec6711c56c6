"""Trust root: loading, rotation v1 -> v2 -> v3, and rotations that must be refused."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from fedpref.safety_policy import (
    ROOT_PAYLOAD_TYPE,
    ExpiredRootError,
    MalformedEnvelopeError,
    MalformedRootError,
    RootRotationError,
    SignatureThresholdError,
    WrongPayloadTypeError,
    follow_root_chain,
    generate_signing_key,
    keyid,
    load_root,
    make_root_body,
    public_key_hex,
    rotate_root,
    sign_envelope,
    sign_root,
    update_root,
)

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
LATER = NOW + timedelta(days=365)


@pytest.fixture(scope="module")
def keys():
    return [generate_signing_key() for _ in range(6)]


def root_v1(keys, threshold=2):
    body = make_root_body([k.public_key() for k in keys[:3]], threshold, expires=LATER)
    return sign_root(body, keys[:threshold])


def test_load_valid_root(keys):
    root = load_root(root_v1(keys), now=NOW)
    assert root.version == 1 and root.threshold == 2
    assert dict(root.keys) == {keyid(k): public_key_hex(k) for k in keys[:3]}
    assert root.expires == LATER and root.revoked == frozenset()
    assert set(root.public_keys()) == set(root.keys)
    assert json.loads(root.raw)["payloadType"] == ROOT_PAYLOAD_TYPE


def test_initial_root_needs_its_own_threshold(keys):
    body = make_root_body([k.public_key() for k in keys[:3]], 2, expires=LATER)
    with pytest.raises(SignatureThresholdError):
        load_root(sign_root(body, keys[:1]))
    with pytest.raises(SignatureThresholdError):  # signed by keys it does not list
        load_root(sign_root(body, keys[3:5]))


def test_expired_root(keys):
    root = load_root(root_v1(keys))
    with pytest.raises(ExpiredRootError):
        load_root(root_v1(keys), now=LATER)
    with pytest.raises(ExpiredRootError):
        root.check_not_expired(LATER + timedelta(seconds=1))


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b.update(_type="policy"),
        lambda b: b.update(version=0),
        lambda b: b.update(version=True),
        lambda b: b.update(threshold=0),
        lambda b: b.update(threshold=4),
        lambda b: b.update(keys={}),
        lambda b: b.update(expires="2031-01-01"),
        lambda b: b.update(expires="2031-01-01T00:00:00+00:00"),
        lambda b: b.update(extra=1),
        lambda b: b.pop("expires"),
        lambda b: b["keys"].update({"0" * 64: next(iter(b["keys"].values()))}),  # keyid != sha256(public)
        lambda b: next(iter(b["keys"].values())).update(keytype="rsa"),
        lambda b: next(iter(b["keys"].values())).update(public="zz" * 32),
    ],
)
def test_malformed_root_bodies(keys, edit):
    body = make_root_body([k.public_key() for k in keys[:3]], 2, expires=LATER)
    edit(body)
    payload = json.dumps(body).encode()
    with pytest.raises(MalformedRootError):
        sign_root(body, keys[:2])
    with pytest.raises(MalformedRootError):
        load_root(sign_envelope(payload, ROOT_PAYLOAD_TYPE, keys[:2]))


def test_root_wrong_payload_type_and_malformed_envelope(keys):
    body = json.dumps(make_root_body([k.public_key() for k in keys[:3]], 2, expires=LATER)).encode()
    with pytest.raises(WrongPayloadTypeError):
        load_root(sign_envelope(body, "application/vnd.fedpref.safety-policy.v1+json", keys[:2]))
    with pytest.raises(MalformedEnvelopeError):
        load_root(b"{")


# --- rotation -----------------------------------------------------------------------------


def _chain(keys):
    """v1: keys 0,1,2 (2-of-3); v2: keys 1,2,3 (2-of-3, key 0 revoked); v3: keys 3,4,5 (2-of-3)."""
    v1 = load_root(root_v1(keys))
    body2 = make_root_body([k.public_key() for k in keys[1:4]], 2, expires=LATER, version=2)
    r2 = rotate_root(v1, body2, old_signers=[keys[0], keys[1]], new_signers=[keys[1], keys[3]])
    v2 = update_root(v1, r2)
    body3 = make_root_body([k.public_key() for k in keys[3:6]], 2, expires=LATER, version=3)
    r3 = rotate_root(v2, body3, old_signers=[keys[1], keys[2]], new_signers=[keys[4], keys[5]])
    return v1, r2, r3


def test_rotation_chain_followed_by_client(keys):
    v1, r2, r3 = _chain(keys)
    client = follow_root_chain(v1, [r2, r3], now=NOW)
    assert client.version == 3
    assert set(client.keys) == {keyid(k) for k in keys[3:6]}
    assert client.revoked == {keyid(k) for k in keys[0:3]}
    assert client.raw == r3
    step = update_root(update_root(v1, r2), r3)
    assert step.keys == client.keys
    assert update_root(v1, r2).revoked == {keyid(keys[0])}
    # a persisted later root reloads on its own (self-signed by its threshold)
    assert load_root(r3).version == 3


def test_rotation_skipping_or_repeating_versions_is_refused(keys):
    v1, r2, r3 = _chain(keys)
    v2 = update_root(v1, r2)
    with pytest.raises(RootRotationError):
        update_root(v2, r2)  # replay of the same root
    with pytest.raises(RootRotationError):
        update_root(v1, r3)  # skip v2 (also not signed by v1's threshold)
    body = make_root_body([k.public_key() for k in keys[:3]], 2, expires=LATER, version=3)
    skip = sign_root(body, keys[:3])  # signed by every v1 key, but version 3
    with pytest.raises(RootRotationError, match="version 3, expected 2"):
        update_root(v1, skip)
    with pytest.raises(RootRotationError):
        rotate_root(v1, body, keys[:2], keys[:2])


def test_rotation_needs_threshold_of_old_keys(keys):
    v1 = load_root(root_v1(keys))
    body = make_root_body([k.public_key() for k in keys[3:6]], 2, expires=LATER, version=2)
    only_new = sign_root(body, keys[3:6])  # attacker holding only new keys
    with pytest.raises(RootRotationError) as info:
        update_root(v1, only_new)
    assert isinstance(info.value.__cause__, SignatureThresholdError)
    one_old = sign_root(body, [keys[0], *keys[3:6]])
    with pytest.raises(RootRotationError, match="root v1's keys"):
        update_root(v1, one_old)
    with pytest.raises(RootRotationError):
        rotate_root(v1, body, old_signers=[keys[0]], new_signers=keys[3:6])


def test_rotation_needs_threshold_of_new_keys(keys):
    v1 = load_root(root_v1(keys))
    body = make_root_body([k.public_key() for k in keys[3:6]], 2, expires=LATER, version=2)
    only_old = sign_root(body, keys[:3])  # old keys hand trust to keys that never signed
    with pytest.raises(RootRotationError, match="its own keys"):
        update_root(v1, only_old)
    one_new = sign_root(body, [*keys[:3], keys[3]])
    with pytest.raises(RootRotationError, match="its own keys"):
        update_root(v1, one_new)
    with pytest.raises(RootRotationError):
        rotate_root(v1, body, old_signers=keys[:3], new_signers=[keys[3]])


def test_revoked_key_cannot_sign_next_rotation(keys):
    v1, r2, _ = _chain(keys)
    v2 = update_root(v1, r2)
    body = make_root_body([k.public_key() for k in keys[:2]], 1, expires=LATER, version=3)
    # key 0 was removed in v2; with key 1 it does not reach v2's threshold of 2
    with pytest.raises(RootRotationError):
        update_root(v2, sign_root(body, keys[:2]))


def test_expired_final_root_refused_intermediate_allowed(keys):
    v1 = load_root(root_v1(keys))
    body2 = make_root_body([k.public_key() for k in keys[:3]], 2, expires=NOW - timedelta(days=1), version=2)
    r2 = rotate_root(v1, body2, keys[:2], keys[:2])
    body3 = make_root_body([k.public_key() for k in keys[:3]], 2, expires=LATER, version=3)
    r3 = rotate_root(update_root(v1, r2), body3, keys[:2], keys[:2])
    assert follow_root_chain(v1, [r2, r3], now=NOW).version == 3
    with pytest.raises(ExpiredRootError):
        follow_root_chain(v1, [r2], now=NOW)
    with pytest.raises(ExpiredRootError):
        update_root(v1, r2, now=NOW)
