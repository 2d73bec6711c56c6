"""root.json is the commit point of a key rotation: a rotation that fails before it leaves no
``root-v<N>.json`` newer than root.json behind (nor does one an older release left survive the
next key operation), and the server sends devices only the chain that ends at root.json."""

from __future__ import annotations

import types
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import fedpref.server.keys as K
from fedpref.common.errors import FedPrefError
from fedpref.safety_policy import (
    generate_signing_key,
    load_root,
    make_root_body,
    rotate_root,
)
from fedpref.safety_policy.store import PolicyStore

def PW() -> bytes:  # noqa: N802 - the passphrase callable
    return b"pw"


def _init(tmp_path: Path) -> Path:
    home = tmp_path / "ops"
    K.init_keys(home, signers=1, threshold=1, expires_days=30, passphrase=PW)
    return K.keys_dir(home)


def _rotate(kdir: Path) -> K.Rotation:
    return K.rotate_keys(kdir.parent, signers=1, threshold=1, expires_days=30, passphrase=PW)


def _fail_writes_to(monkeypatch, target: Path) -> None:
    real = K.write_bytes_atomic

    def failing(path, data, **kw):
        if Path(path) == target:
            raise OSError(28, "No space left on device")
        return real(path, data, **kw)

    monkeypatch.setattr(K, "write_bytes_atomic", failing)


def _versions(chain: tuple[bytes, ...]) -> list[int]:
    return [load_root(raw).version for raw in chain]


def _device_follows(v1: bytes, chain: tuple[bytes, ...], tmp_path: Path) -> int:
    store = PolicyStore(tmp_path / "device")
    store.init_root(v1)
    newer = [raw for raw in chain if load_root(raw).version > 1]
    return store.update_root(newer, now=datetime.now(timezone.utc)).version


def test_a_rotation_that_fails_before_its_commit_leaves_no_newer_root(tmp_path, monkeypatch):
    kdir = _init(tmp_path)
    v1 = (kdir / "root.json").read_bytes()
    _fail_writes_to(monkeypatch, kdir / "root.json")
    with pytest.raises(OSError):
        _rotate(kdir)
    monkeypatch.undo()
    K.finish_rotation(kdir)  # what the next `policy sign` / `keys rotate` does first
    assert sorted(p.name for p in kdir.glob("root*.json")) == ["root-v1.json", "root.json"]
    assert _versions(K.root_chain(kdir / "root.json")) == [1]
    # the operator's next rotation reaches a device pinned on v1, and so does the one after
    _rotate(kdir)
    _rotate(kdir)
    chain = K.root_chain(kdir / "root.json")
    assert _versions(chain) == [1, 2, 3]
    assert _device_follows(v1, chain, tmp_path) == 3


def test_an_orphan_root_left_by_an_older_release_is_removed_and_never_sent(tmp_path):
    """The state the previous code left after a failed rotation: root-v2.json signed by v1's keys
    and new keys that were deleted with the staged rotation, root.json still v1."""
    kdir = _init(tmp_path)
    v1 = load_root((kdir / "root.json").read_bytes())
    key = K.load_private_key(kdir / "signer-1.pem", PW())
    lost = [generate_signing_key()]
    body = make_root_body(lost, 1, expires=datetime.now(timezone.utc) + timedelta(days=30), version=2)
    (kdir / "root-v2.json").write_bytes(rotate_root(v1, body, [key], lost))

    assert _versions(K.root_chain(kdir / "root.json")) == [1]  # the server never sends it
    K.finish_rotation(kdir)
    assert not (kdir / "root-v2.json").exists()
    rotation = _rotate(kdir)
    assert rotation.new.version == 2
    assert _device_follows(v1.raw, K.root_chain(kdir / "root.json"), tmp_path) == 2


def test_a_crash_after_the_commit_writes_the_copy_again(tmp_path, monkeypatch):
    kdir = _init(tmp_path)
    _fail_writes_to(monkeypatch, kdir / "root-v2.json")
    with pytest.raises(OSError):
        _rotate(kdir)
    monkeypatch.undo()
    assert load_root((kdir / "root.json").read_bytes()).version == 2  # committed
    assert _versions(K.root_chain(kdir / "root.json")) == [1, 2]  # root.json ends the chain anyway
    K.finish_rotation(kdir)
    assert (kdir / "root-v2.json").read_bytes() == (kdir / "root.json").read_bytes()
    assert (kdir / "retired-v1" / "signer-1.pem").exists() and not (kdir / ".next-v2").exists()


def test_a_newer_copy_of_a_committed_rotation_is_refused_not_deleted(tmp_path):
    """root.json put back from an older copy after a committed rotation: the newer root is kept."""
    kdir = _init(tmp_path)
    v1 = (kdir / "root.json").read_bytes()
    _rotate(kdir)
    (kdir / "root.json").write_bytes(v1)
    with pytest.raises(FedPrefError, match="was committed") as e:
        K.finish_rotation(kdir)
    assert "\n" not in str(e.value)
    assert (kdir / "root-v2.json").exists()


def test_a_gap_in_the_chain_is_refused_with_one_line(tmp_path):
    kdir = _init(tmp_path)
    _rotate(kdir)
    _rotate(kdir)
    (kdir / "root-v2.json").unlink()
    with pytest.raises(FedPrefError, match="root-v2.json is missing") as e:
        K.root_chain(kdir / "root.json")
    assert "\n" not in str(e.value)
    (kdir / "root-v1.json").unlink()  # old versions pruned on purpose: what is left is contiguous
    assert _versions(K.root_chain(kdir / "root.json")) == [3]


def test_a_copy_that_does_not_match_root_json_is_refused(tmp_path):
    kdir = _init(tmp_path)
    _rotate(kdir)
    # a v2 that differs from root.json (another rotation's v2)
    v1 = load_root((kdir / "root-v1.json").read_bytes())
    old_key = K.load_private_key(kdir / "retired-v1" / "signer-1.pem", PW())
    other = [generate_signing_key()]
    body = make_root_body(other, 1, expires=datetime.now(timezone.utc) + timedelta(days=30), version=2)
    (kdir / "root-v2.json").write_bytes(rotate_root(v1, body, [old_key], other))
    with pytest.raises(FedPrefError, match="differs from"):
        K.root_chain(kdir / "root.json")


def test_load_server_policy_sends_only_the_committed_chain(tmp_path, monkeypatch):
    import fedpref.safety_policy as sp
    from fedpref.safety_policy.classifier import SafetyModule
    from fedpref.server.app import load_server_policy

    kdir = _init(tmp_path)
    v1 = load_root((kdir / "root.json").read_bytes())
    key = K.load_private_key(kdir / "signer-1.pem", PW())
    lost = [generate_signing_key()]
    body = make_root_body(lost, 1, expires=datetime.now(timezone.utc) + timedelta(days=30), version=2)
    (kdir / "root-v2.json").write_bytes(rotate_root(v1, body, [key], lost))  # an orphan
    policy = types.SimpleNamespace(version=1, manifest_summary=lambda: {})
    monkeypatch.setattr(sp, "verify_envelope", lambda *a, **k: policy)
    module = types.SimpleNamespace(digest=lambda: "d")
    monkeypatch.setattr(SafetyModule, "from_policy", classmethod(lambda cls, p: module))
    envelope = tmp_path / "policy.dsse.json"
    envelope.write_bytes(b"{}")
    sent = load_server_policy(envelope, kdir / "root.json", backbone_sha256="0" * 64)
    assert _versions(sent.roots) == [1]
