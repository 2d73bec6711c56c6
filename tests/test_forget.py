"""Forget deletes physically: no deleted ciphertext stays in the store's files, sealed blobs are
overwritten before they go, and ``forget --all`` destroys the key. Real SQLite, real AES-GCM."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedpref.client import agent_cli
from fedpref.client import store as store_mod
from fedpref.client.agent_home import ACCOUNTANT_BLOB, AGENT_FILE, PRIVATE_BLOB, AgentHome, forget
from fedpref.client.store import PASSPHRASE_ENV, DeviceStore, shred
from fedpref.model.config import ModelConfig

N_PAIRS = 60  # a few pages' worth, so that freed pages (not just one) are involved


def _home(tmp_path: Path) -> AgentHome:
    root = tmp_path / "home"
    root.mkdir()
    (root / AGENT_FILE).write_text('[agent]\nserver = "127.0.0.1:9092"\nca = "ca.pem"\n')
    return AgentHome(root=root, server="127.0.0.1:9092", ca=root / "ca.pem", model=ModelConfig())


def _fill(store: DeviceStore) -> list[tuple[int, str, bytes]]:
    """Add pairs and sealed blobs; the pairs' ciphertexts as stored: (row id, field, blob)."""
    for i in range(N_PAIRS):
        store.add_pair(f"prompt {i} " + "x" * 40, f"the chosen answer {i}", f"the rejected answer {i}")
    store.seal(PRIVATE_BLOB, b"private adapter " * 64)
    store.seal(ACCOUNTANT_BLOB, b'{"history": []}')
    rows = store._conn.execute("SELECT id, prompt, chosen, rejected FROM pairs").fetchall()
    return [(rid, field, base64.b64decode(v)) for rid, *vals in rows
            for field, v in zip(("prompt", "chosen", "rejected"), vals)]


def _store_files(root: Path) -> dict[str, bytes]:
    """The raw bytes of every file under the store: the database, its -wal/-journal/-shm, the vault."""
    return {p.name: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _leaked(root: Path, cts: list[tuple[int, str, bytes]]) -> list[str]:
    """Which ciphertexts appear (as stored, base64) in any file under ``root``."""
    files = _store_files(root)
    return [f"{rid}/{field}" for rid, field, ct in cts
            if any(base64.b64encode(ct) in data for data in files.values())]


@pytest.fixture
def insecure_sqlite(monkeypatch, request):
    """Every connection the store opens runs with secure_delete OFF (as if the SQLite build
    ignored the pragma) in the journal mode the test asks for."""
    journal = getattr(request, "param", "delete")
    real = store_mod._connect

    def connect(path):
        db = real(path)
        db.execute("PRAGMA secure_delete=OFF")
        db.execute(f"PRAGMA journal_mode={journal}")
        return db

    monkeypatch.setattr(store_mod, "_connect", connect)
    return journal


@pytest.mark.parametrize("insecure_sqlite", ["delete", "wal"], indirect=True)
def test_forget_leaves_no_deleted_ciphertext_in_the_files(tmp_path, insecure_sqlite):
    home = _home(tmp_path)
    store = DeviceStore.create(home.store_dir)
    assert store._conn.execute("PRAGMA secure_delete").fetchone() == (0,)
    assert store._conn.execute("PRAGMA journal_mode").fetchone() == (insecure_sqlite,)
    cts = _fill(store)
    assert len(_leaked(home.store_dir, cts)) == len(cts) == 3 * N_PAIRS  # control: the search finds them
    out = forget(home, store)
    assert out == {"pairs_deleted": N_PAIRS, "adapter_deleted": True, "accountant_deleted": True}
    assert _leaked(home.store_dir, cts) == []
    if insecure_sqlite == "wal":
        assert (home.store_dir / "feedback.sqlite3-wal").stat().st_size == 0  # truncated by the checkpoint
    assert not (home.store_dir / "feedback.sqlite3-journal").exists()
    assert store.count() == 0 and store.pairs() == []
    store.add_pair("p", "a", "b")  # the store still works after forget
    store.close()
    with DeviceStore.open(home.store_dir) as again:
        assert [p.prompt for p in again.pairs()] == ["p"]


@pytest.mark.parametrize("insecure_sqlite", ["delete", "wal"], indirect=True)
def test_control_a_plain_delete_without_secure_delete_leaves_the_ciphertexts(tmp_path, insecure_sqlite):
    """What forget guards against: with secure_delete off, DELETE alone keeps every ciphertext."""
    with DeviceStore.create(tmp_path / "store") as store:
        cts = _fill(store)
        store._conn.execute("DELETE FROM pairs")
        assert store.count() == 0
        assert len(_leaked(tmp_path / "store", cts)) == len(cts)


def test_forget_with_the_default_pragmas_leaves_nothing(tmp_path):
    home = _home(tmp_path)
    with DeviceStore.create(home.store_dir) as store:
        assert store._conn.execute("PRAGMA secure_delete").fetchone() == (1,)
        cts = _fill(store)
        assert len(_leaked(home.store_dir, cts)) == len(cts)
        forget(home, store)
        assert _leaked(home.store_dir, cts) == []


def test_forget_fails_loudly_when_the_wal_cannot_be_emptied(tmp_path, monkeypatch):
    real = store_mod._connect
    monkeypatch.setattr(store_mod, "_connect", lambda path: _wal(real(path)))
    with DeviceStore.create(tmp_path / "store") as store:
        store.add_pair("p", "a", "b")
        reader = sqlite3.connect(tmp_path / "store" / "feedback.sqlite3")
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM pairs").fetchone()  # a read transaction pins the WAL
        try:
            with pytest.raises(store_mod.ConfigError, match=r"another process holds the database open.*forget again"):
                store.clear_pairs()
        finally:
            reader.close()
        store.clear_pairs()  # once the other reader is gone, it goes through


def _wal(db: sqlite3.Connection) -> sqlite3.Connection:
    db.execute("PRAGMA journal_mode=WAL")
    return db


# -- sealed blobs and keys are overwritten, not only unlinked -----------------------------------


def test_delete_overwrites_the_blob_before_unlinking(tmp_path):
    """A hard link made beforehand sees the same inode: after delete it holds only zeros."""
    with DeviceStore.create(tmp_path / "store") as store:
        store.seal(PRIVATE_BLOB, b"secret adapter bytes" * 100)
        blob = tmp_path / "store" / "vault" / f"{PRIVATE_BLOB}.enc"
        size = blob.stat().st_size
        os.link(blob, tmp_path / "link")
        assert (tmp_path / "link").read_bytes() != bytes(size)  # control
        assert store.delete(PRIVATE_BLOB) is True
        assert not blob.exists()
        assert (tmp_path / "link").read_bytes() == bytes(size)
        assert store.delete(PRIVATE_BLOB) is False


def test_shred_makes_a_read_only_file_writable_and_refuses_links(tmp_path):
    f = tmp_path / "key"
    f.write_bytes(b"k" * 32)
    os.link(f, tmp_path / "copy")
    os.chmod(f, 0o400)
    assert shred(f) is True and not f.exists()
    assert (tmp_path / "copy").read_bytes() == bytes(32)
    (tmp_path / "sym").symlink_to(tmp_path / "copy")
    with pytest.raises(store_mod.ConfigError, match="not a regular file"):
        shred(tmp_path / "sym")
    assert (tmp_path / "copy").exists()
    assert shred(tmp_path / "missing") is False


# -- forget --all destroys the key ------------------------------------------------------------


def _decrypts(key: bytes, store_id: str, cts: list[tuple[int, str, bytes]]) -> bool:
    rid, field, ct = cts[0]
    try:
        AESGCM(key).decrypt(ct[:12], ct[12:], f"{store_id}/pairs/{rid}/{field}".encode())
    except InvalidTag:
        return False
    return True


def _keys_on_disk(root: Path) -> set[bytes]:
    """Every 32-byte window of every file under ``root`` (raw and hex-decoded): anything that
    could be the key."""
    found: set[bytes] = set()
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            found.update(data[i:i + 32] for i in range(len(data) - 31))
            try:
                text = data.decode("ascii")
            except UnicodeDecodeError:
                continue
            for i in range(len(text) - 63):
                try:
                    found.add(bytes.fromhex(text[i:i + 64]))
                except ValueError:
                    pass
    return found


def test_forget_all_destroys_the_key_file(tmp_path):
    home = _home(tmp_path)
    store = DeviceStore.create(home.store_dir)
    store_id = store.store_id
    cts = _fill(store)
    key = (home.store_dir / "store.key").read_bytes()
    assert any(_decrypts(k, store_id, cts) for k in _keys_on_disk(home.root))  # control: the key is found
    forget(home, store, destroy_key=True)
    assert not (home.store_dir / "store.key").exists() and not (home.store_dir / "store.json").exists()
    assert key not in _keys_on_disk(home.root)
    assert not any(_decrypts(k, store_id, cts) for k in _keys_on_disk(home.root))
    assert _decrypts(key, store_id, cts)  # the copies are real ciphertexts: only the key is gone
    with pytest.raises(store_mod.ConfigError, match="is closed"):
        store.count()


def test_forget_all_removes_a_passphrase_stores_salt(tmp_path):
    home = _home(tmp_path)
    store = DeviceStore.create(home.store_dir, passphrase="correct horse")
    meta = store_mod._read_meta(home.store_dir / "store.json")
    salt = bytes.fromhex(meta["salt"])
    cts = _fill(store)
    key = store_mod._derive("correct horse", salt, meta["scrypt"])
    assert _decrypts(key, store.store_id, cts)
    forget(home, store, destroy_key=True)
    assert not (home.store_dir / "store.json").exists()
    files = _store_files(home.root)
    assert not any(salt in data or salt.hex().encode() in data for data in files.values())
    assert not DeviceStore.exists(home.store_dir)


@pytest.mark.parametrize("passphrase", [None, "correct horse"])
def test_cli_forget_all_overwrites_the_keys_then_deletes_the_home(tmp_path, monkeypatch, capsys, passphrase):
    if passphrase:
        monkeypatch.setenv(PASSPHRASE_ENV, passphrase)
    home = _home(tmp_path)
    with DeviceStore.create(home.store_dir, passphrase=passphrase) as store:
        _fill(store)
    (home.root / "identity").mkdir()
    (home.root / "identity" / "node.key").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n")
    links = tmp_path / "links"
    links.mkdir()
    watched = [home.store_dir / "store.json", home.store_dir / "vault" / f"{PRIVATE_BLOB}.enc",
               home.root / "identity" / "node.key"] + ([] if passphrase else [home.store_dir / "store.key"])
    for i, f in enumerate(watched):
        os.link(f, links / str(i))
    with pytest.raises(SystemExit) as exit_:
        agent_cli.main(["forget", "--home", str(home.root), "--all"])
    assert exit_.value.code == 0
    assert f"deleted {N_PAIRS} pairs, the private adapter, the accountant state; destroyed the store key" \
        in capsys.readouterr().out
    assert not home.root.exists()
    for i, f in enumerate(watched):
        data = (links / str(i)).read_bytes()
        assert data and data == bytes(len(data)), f"{f} was unlinked without being overwritten"


def test_cli_forget_help_documents_physical_deletion(capsys):
    with pytest.raises(SystemExit):
        agent_cli.main(["forget", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "secure_delete" in text and "VACUUM" in text and "store key" in text
