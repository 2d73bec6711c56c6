"""The policy store fails closed: a bad update never replaces the installed policy."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from fedpref.common.errors import ConfigError
from fedpref.safety_policy import (
    POLICY_NAME,
    POLICY_PAYLOAD_TYPE,
    BackboneMismatchError,
    EnvelopeTooLargeError,
    ExpiredPolicyError,
    ExtraFileError,
    FileHashMismatchError,
    FileMismatchError,
    MalformedEnvelopeError,
    MissingFileError,
    PolicyError,
    PolicyStore,
    PolicyStoreError,
    RevokedKeyError,
    RollbackError,
    RootRotationError,
    SignatureThresholdError,
    UntrustedKeyError,
    WrongPayloadTypeError,
    build_payload,
    generate_signing_key,
    keyid,
    load_root,
    make_root_body,
    read_bundle_dir,
    rotate_root,
    sign_envelope,
    sign_root,
    update_root,
    write_bundle_dir,
)
from fedpref.safety_policy import bundle as bundle_module

NOW = datetime(2030, 6, 1, tzinfo=timezone.utc)
BACKBONE = "ab" * 32
FILES = {"classifier.safetensors": b"\x01\x02" * 300}


@pytest.fixture(scope="module")
def keys():
    return [generate_signing_key() for _ in range(5)]


@pytest.fixture(scope="module")
def root_bytes(keys):
    return sign_root(make_root_body([k.public_key() for k in keys[:3]], 2, expires=NOW + timedelta(days=365)), keys[:2])


@pytest.fixture(scope="module")
def root(root_bytes):
    return load_root(root_bytes)


def manifest(version: int = 1, expires_at: str = "2030-07-01T00:00:00Z") -> dict:
    return {
        "name": POLICY_NAME, "version": version, "issued_at": "2030-05-01T00:00:00Z", "expires_at": expires_at,
        "backbone_sha256": BACKBONE, "categories": [{"name": "violence", "threshold": 0.5}], "classifier": {},
    }


def make_env(keys, version, signers=(0, 1), expires_at="2030-07-01T00:00:00Z", files=FILES) -> bytes:
    payload = build_payload(manifest(version, expires_at), files)
    return sign_envelope(payload, POLICY_PAYLOAD_TYPE, [keys[i] for i in signers])


def tampered_file_env(keys, version) -> bytes:
    """Validly signed by a compromised builder, but the file does not match the manifest."""
    doc = json.loads(build_payload(manifest(version), FILES))
    doc["files"]["classifier.safetensors"] = base64.b64encode(b"evil" * 150).decode()
    return sign_envelope(json.dumps(doc).encode(), POLICY_PAYLOAD_TYPE, keys[:2])


def snapshot(store: PolicyStore) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.dir.iterdir())}


def test_install_and_current(tmp_path, keys, root):
    store = PolicyStore(tmp_path / "store")
    assert store.version == 0 and store.current(root, NOW) is None and store.installed_envelope() is None
    env = make_env(keys, 1)
    policy = store.install(env, root, now=NOW, backbone_sha256=BACKBONE)
    assert policy.version == 1 and store.version == 1
    assert store.installed_envelope() == env
    assert store.current(root, NOW) == policy
    state = json.loads((store.dir / "state.json").read_text())
    assert state["version"] == 1 and state["envelope_sha256"] == policy.envelope_sha256
    v2 = store.install(make_env(keys, 2), root, now=NOW)
    assert store.version == 2 and store.current(root, NOW) == v2
    assert sorted(p.name for p in store.dir.iterdir()) == ["policy-v2.dsse.json", "state.json"]


def test_reload_from_disk(tmp_path, keys, root):
    PolicyStore(tmp_path).install(make_env(keys, 4), root, now=NOW)
    again = PolicyStore(tmp_path)
    assert again.version == 4 and again.current(root, NOW).version == 4
    with pytest.raises(RollbackError):
        again.install(make_env(keys, 4), root, now=NOW)  # replay after a restart


def flipped_payload(env: bytes) -> bytes:
    doc = json.loads(env)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(doc).encode()


# Each offered while v3 is installed; v4 would be the legitimate next version.
BAD_UPDATES = {
    "flipped payload": lambda k: flipped_payload(make_env(k, 4)),
    "tampered file": lambda k: tampered_file_env(k, 4),
    "one signature": lambda k: make_env(k, 4, signers=(0,)),
    "duplicated signature": lambda k: json.dumps(
        {**json.loads(make_env(k, 4, signers=(0,))), "signatures": json.loads(make_env(k, 4, signers=(0,)))["signatures"] * 2}
    ).encode(),
    "untrusted key": lambda k: make_env(k, 4, signers=(3, 4)),
    "rollback": lambda k: make_env(k, 2),
    "replay": lambda k: make_env(k, 3),
    "expired": lambda k: make_env(k, 4, expires_at="2030-06-01T00:00:00Z"),
    "oversize": lambda k: b" " * (4 * 1024 * 1024 + 1),
    "malformed": lambda k: b'{"payload":',
    "wrong type": lambda k: sign_envelope(b"{}", "application/json", k[:2]),
}


@pytest.mark.parametrize("name", sorted(BAD_UPDATES))
def test_bad_update_leaves_old_policy_installed(tmp_path, keys, root, name):
    store = PolicyStore(tmp_path)
    good = store.install(make_env(keys, 3), root, now=NOW)
    before = snapshot(store)
    with pytest.raises(PolicyError):
        store.install(BAD_UPDATES[name](keys), root, now=NOW)
    assert snapshot(store) == before  # same files, same bytes: envelope and state.json untouched
    assert store.version == 3 and store.current(root, NOW) == good
    reloaded = PolicyStore(tmp_path)
    assert reloaded.version == 3 and reloaded.current(root, NOW) == good
    assert store.install(make_env(keys, 4), root, now=NOW).version == 4  # the real update still works


def test_specific_errors_surface(tmp_path, keys, root):
    store = PolicyStore(tmp_path)
    store.install(make_env(keys, 1), root, now=NOW)
    cases = [
        (tampered_file_env(keys, 2), FileHashMismatchError, {}),
        (make_env(keys, 2, signers=(0,)), SignatureThresholdError, {}),
        (make_env(keys, 2, signers=(3, 4)), UntrustedKeyError, {}),
        (make_env(keys, 1), RollbackError, {}),
        (make_env(keys, 2), ExpiredPolicyError, {"now": datetime(2030, 7, 2, tzinfo=timezone.utc)}),
        (make_env(keys, 2), BackboneMismatchError, {"backbone_sha256": "cd" * 32}),
        (b" " * (4 * 1024 * 1024 + 1), EnvelopeTooLargeError, {}),
        (b"{", MalformedEnvelopeError, {}),
        (sign_envelope(b"{}", "application/json", keys[:2]), WrongPayloadTypeError, {}),
    ]
    for env, error, kw in cases:
        with pytest.raises(error):
            store.install(env, root, **{"now": NOW, **kw})
        assert store.version == 1


def test_naive_clock_changes_nothing(tmp_path, keys, root):
    store = PolicyStore(tmp_path)
    with pytest.raises(ConfigError):
        store.install(make_env(keys, 1), root, now=datetime(2030, 6, 1))
    assert store.version == 0 and list(store.dir.iterdir()) == []


def test_installed_policy_expires_fail_closed(tmp_path, keys, root):
    store = PolicyStore(tmp_path)
    store.install(make_env(keys, 1), root, now=NOW)
    with pytest.raises(ExpiredPolicyError):
        store.current(root, datetime(2030, 7, 1, tzinfo=timezone.utc))
    assert store.version == 1  # still the floor for rollback


def test_failed_write_is_rolled_back(tmp_path, keys, root, monkeypatch):
    store = PolicyStore(tmp_path)
    good = store.install(make_env(keys, 1), root, now=NOW)
    before = snapshot(store)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("state.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", failing_replace)
    with pytest.raises(PolicyStoreError):
        store.install(make_env(keys, 2), root, now=NOW)
    monkeypatch.undo()
    assert snapshot(store) == before and store.current(root, NOW) == good


def test_corrupt_store_is_refused(tmp_path, keys, root):
    store = PolicyStore(tmp_path)
    store.install(make_env(keys, 1), root, now=NOW)
    env_path = store.dir / "policy-v1.dsse.json"
    env_path.write_bytes(env_path.read_bytes() + b" ")
    with pytest.raises(PolicyStoreError):
        store.current(root, NOW)
    for bad in (b"{", b'{"version": -1, "envelope_sha256": null, "root_revoked": []}', b"[]"):
        (store.dir / "state.json").write_bytes(bad)
        with pytest.raises(PolicyStoreError):
            store.install(make_env(keys, 2), root, now=NOW)
        with pytest.raises(PolicyStoreError):
            store.current(root, NOW)


# --- the persisted trust root -------------------------------------------------------------


def test_root_persistence_and_rotation(tmp_path, keys, root_bytes):
    store = PolicyStore(tmp_path)
    assert store.trusted_root() is None
    with pytest.raises(ConfigError):
        store.update_root(root_bytes)
    v1 = store.init_root(root_bytes)
    assert store.init_root(root_bytes).version == 1  # idempotent
    store.install(make_env(keys, 1), v1, now=NOW)
    body2 = make_root_body([k.public_key() for k in keys[1:4]], 2, expires=NOW + timedelta(days=365), version=2)
    r2 = rotate_root(v1, body2, keys[:2], keys[1:3])
    body3 = make_root_body([k.public_key() for k in keys[2:5]], 2, expires=NOW + timedelta(days=365), version=3)
    r3 = rotate_root(update_root(v1, r2), body3, keys[1:3], keys[2:4])

    bogus = sign_root({**body2, "version": 2, "threshold": 1}, keys[3:5])  # not signed by v1 keys
    with pytest.raises(RootRotationError):
        store.update_root(bogus)
    assert store.trusted_root().version == 1

    v3 = store.update_root([r2, r3], now=NOW)
    reloaded = PolicyStore(tmp_path).trusted_root(now=NOW)
    assert reloaded.version == 3 and reloaded.keys == v3.keys
    assert reloaded.revoked == {keyid(keys[0]), keyid(keys[1])}
    with pytest.raises(ConfigError):
        store.init_root(root_bytes)  # cannot silently go back to v1
    with pytest.raises(RevokedKeyError):
        store.install(make_env(keys, 2, signers=(0, 1)), reloaded, now=NOW)
    with pytest.raises(PolicyError):
        store.current(reloaded, NOW)  # installed v1 was signed by keys no longer trusted
    assert store.install(make_env(keys, 2, signers=(3, 4)), reloaded, now=NOW).version == 2


# --- bundle folders -----------------------------------------------------------------------

BUNDLE_FILES = {**FILES, "labels.json": b'["violence"]'}


def _bundle(tmp_path):
    d = tmp_path / "bundle"
    write_bundle_dir(d, manifest(), BUNDLE_FILES)
    return d


def test_bundle_dir_roundtrip(tmp_path, keys, root):
    d = _bundle(tmp_path)
    assert sorted(p.name for p in d.iterdir()) == sorted([*BUNDLE_FILES, "manifest.json"])
    m, files = read_bundle_dir(d)
    assert files == BUNDLE_FILES and m["files"]["labels.json"]["length"] == len(b'["violence"]')
    assert build_payload(m, files) == build_payload(manifest(), BUNDLE_FILES)
    env = sign_envelope(build_payload(m, files), POLICY_PAYLOAD_TYPE, keys[:2])
    assert dict(PolicyStore(tmp_path / "s").install(env, root, now=NOW).files) == BUNDLE_FILES


def test_bundle_dir_tampering(tmp_path):
    d = _bundle(tmp_path)
    weights = d / "classifier.safetensors"
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ExtraFileError):
        read_bundle_dir(d)
    (d / "extra.bin").unlink()
    data = bytearray(weights.read_bytes())
    data[0] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(FileHashMismatchError, match="sha256"):
        read_bundle_dir(d)
    weights.write_bytes(BUNDLE_FILES["labels.json"])  # swapped in another file
    with pytest.raises(FileHashMismatchError, match="length"):
        read_bundle_dir(d)
    weights.unlink()
    with pytest.raises(MissingFileError):
        read_bundle_dir(d)
    weights.symlink_to(d / "labels.json")
    with pytest.raises(FileMismatchError):
        read_bundle_dir(d)
    (d / "manifest.json").unlink()
    with pytest.raises(MissingFileError):
        read_bundle_dir(d)


def test_bundle_dir_refuses_stray_entries_and_mismatched_manifest(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "old.bin").write_bytes(b"x")
    with pytest.raises(ConfigError):
        write_bundle_dir(d, manifest(), BUNDLE_FILES)
    assert [p.name for p in d.iterdir()] == ["old.bin"]
    m, _ = read_bundle_dir(_bundle(tmp_path))
    with pytest.raises(FileHashMismatchError):
        build_payload(m, {**BUNDLE_FILES, "labels.json": b"other"})
