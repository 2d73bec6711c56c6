"""The device store fails closed: real AES-GCM, real scrypt, real SQLite, nothing mocked."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpref.client.store import (
    PASSPHRASE_ENV,
    DeviceStore,
    FeedbackPair,
    StoreError,
    passphrase_from_env,
)
from fedpref.common.errors import ConfigError, DataError


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(root):
    with DeviceStore.create(root) as s:
        yield s


# -- create / open ------------------------------------------------------------------


def test_create_open_round_trip(root):
    assert not DeviceStore.exists(root)
    with DeviceStore.create(root) as s:
        pid = s.add_pair("p", "good", "bad")
        s.seal("adapter", b"weights")
        store_id = s.store_id
    assert DeviceStore.exists(root)
    meta = json.loads((root / "store.json").read_text())
    assert meta["format"] == "fedpref-device-store" and meta["version"] == 1
    assert meta["store_id"] == store_id and meta["kdf"] == "keyfile" and "salt" not in meta
    with DeviceStore.open(root) as s:
        assert s.store_id == store_id and s.root == root
        assert s.count() == 1
        [pair] = s.pairs()
        assert isinstance(pair, FeedbackPair)
        assert (pair.id, pair.prompt, pair.chosen, pair.rejected, pair.source) == (pid, "p", "good", "bad", "cli")
        assert pair.created_at
        assert s.unseal("adapter") == b"weights"


def test_files_are_private(store, root):
    assert _mode(root / "store.key") == 0o600
    assert len((root / "store.key").read_bytes()) == 32
    assert _mode(root / "feedback.sqlite3") == 0o600
    assert _mode(root) == 0o700 and _mode(root / "vault") == 0o700
    store.seal("x", b"1")
    assert _mode(root / "vault" / "x.enc") == 0o600


def test_open_missing_store(tmp_path):
    with pytest.raises(ConfigError, match=r"no device store at .*fedpref-agent init --home"):
        DeviceStore.open(tmp_path / "nowhere")


def test_group_readable_key_refused(store, root):
    store.close()
    key = root / "store.key"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError, match=rf"chmod 600 {key}"):
        DeviceStore.open(root)
    os.chmod(key, 0o600)
    DeviceStore.open(root).close()


def test_missing_key_file_refused(store, root):
    store.close()
    (root / "store.key").unlink()
    with pytest.raises(ConfigError, match=r"store\.key is missing; restore it"):
        DeviceStore.open(root)


def test_key_from_another_store_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    DeviceStore.create(a).close()
    DeviceStore.create(b).close()
    shutil.copy(a / "store.key", b / "store.key")
    with pytest.raises(ConfigError, match=rf"wrong passphrase or key for store {b}"):
        DeviceStore.open(b)


def test_create_over_existing_refused_and_nothing_changed(store, root):
    store.add_pair("p", "a", "b")
    store.seal("x", b"secret")
    store.close()
    before = _snapshot(root)
    for passphrase in (None, "pw"):
        with pytest.raises(ConfigError, match=r"already exists"):
            DeviceStore.create(root, passphrase=passphrase)
    assert _snapshot(root) == before


def test_create_refuses_leftovers_from_interrupted_init(store, root):
    store.close()
    (root / "store.json").unlink()
    before = _snapshot(root)
    with pytest.raises(ConfigError, match=r"no store\.json.*move them aside"):
        DeviceStore.create(root)
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"{not json", r"not a fedpref device store \(malformed JSON"),
        (b"[]", r"not a fedpref device store"),
        (json.dumps({"format": "something-else", "version": 1}).encode(), r"not a fedpref device store"),
    ],
)
def test_malformed_store_json(store, root, content, pattern):
    store.close()
    (root / "store.json").write_bytes(content)
    with pytest.raises(DataError, match=pattern) as exc:
        DeviceStore.open(root)
    assert str(root / "store.json") in str(exc.value)
    assert "\n" not in str(exc.value)


def test_newer_and_invalid_store_json(store, root):
    store.close()
    path = root / "store.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(DataError, match=rf"{path} was written by a newer fedpref"):
        DeviceStore.open(root)
    path.write_text(json.dumps({**meta, "kdf": "rot13"}))
    with pytest.raises(DataError, match=r"unknown kdf"):
        DeviceStore.open(root)
    path.write_text(json.dumps({**meta, "store_id": "x"}))
    with pytest.raises(DataError, match=r"store_id"):
        DeviceStore.open(root)


# -- passphrase mode ----------------------------------------------------------------


def test_scrypt_store(root):
    with DeviceStore.create(root, passphrase="correct horse") as s:
        s.add_pair("p", "a", "b")
        s.seal("x", b"data")
    assert not (root / "store.key").exists()
    meta = json.loads((root / "store.json").read_text())
    assert meta["kdf"] == "scrypt" and len(bytes.fromhex(meta["salt"])) == 16
    assert meta["scrypt"] == {"n": 2**15, "r": 8, "p": 1}
    with DeviceStore.open(root, passphrase="correct horse") as s:
        assert s.unseal("x") == b"data" and s.pairs()[0].chosen == "a"
    with pytest.raises(ConfigError, match=rf"wrong passphrase or key for store {root}; "):
        DeviceStore.open(root, passphrase="wrong horse")
    with pytest.raises(ConfigError, match=rf"passphrase-protected; set {PASSPHRASE_ENV}"):
        DeviceStore.open(root)


def test_passphrase_for_keyfile_store_refused(store, root):
    store.close()
    with pytest.raises(ConfigError, match=r"uses a key file"):
        DeviceStore.open(root, passphrase="pw")


def test_empty_passphrase_refused(root):
    with pytest.raises(ConfigError, match=r"empty passphrase"):
        DeviceStore.create(root, passphrase="")
    assert not DeviceStore.exists(root)


def test_passphrase_from_env(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    assert passphrase_from_env() is None
    monkeypatch.setenv(PASSPHRASE_ENV, "")
    assert passphrase_from_env() is None
    monkeypatch.setenv(PASSPHRASE_ENV, "s3cret")
    assert passphrase_from_env() == "s3cret"


# -- vault --------------------------------------------------------------------------


def test_seal_unseal_delete(store, root):
    assert store.unseal("missing") is None
    store.seal("adapter-1", b"v1")
    store.seal("adapter-1", b"v2")
    assert store.unseal("adapter-1") == b"v2"
    store.seal("empty", b"")
    assert store.unseal("empty") == b""
    assert store.delete("adapter-1") is True
    assert store.delete("adapter-1") is False
    assert store.unseal("adapter-1") is None
    assert not (root / "vault" / "adapter-1.enc").exists()


@pytest.mark.parametrize("name", ["", "Upper", "../escape", "a/b", "a.b", "x" * 65, 3])
def test_bad_blob_names(store, name):
    with pytest.raises(ConfigError, match=r"bad vault blob name"):
        store.seal(name, b"x")


def test_blob_on_disk_hides_plaintext(store, root):
    secret = b"my private adapter weights 0123456789" * 4
    store.seal("secret", secret)
    raw = (root / "vault" / "secret.enc").read_bytes()
    assert raw.startswith(b"FPV1") and secret not in raw and b"private" not in raw
    assert len(raw) == 4 + 12 + len(secret) + 16


def test_flipped_byte_detected_and_file_untouched(store, root):
    store.seal("blob", b"payload bytes")
    path = root / "vault" / "blob.enc"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupted, or from another store") as exc:
        store.unseal("blob")
    assert str(path) in str(exc.value) and isinstance(exc.value, StoreError)
    with pytest.raises(DataError, match=r"corrupted"):
        store.seal("blob", b"new")  # refuses to overwrite a blob it cannot read
    assert path.read_bytes() == bytes(raw)
    assert store.delete("blob") is True  # the explicit way out
    store.seal("blob", b"new")
    assert store.unseal("blob") == b"new"


@pytest.mark.parametrize("content", [b"", b"FPV1", b"XXXX" + bytes(40)])
def test_truncated_or_bad_magic_blob(store, root, content):
    path = root / "vault" / "b.enc"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)):
        store.unseal("b")
    assert path.read_bytes() == content


def test_blob_from_another_store(tmp_path):
    with DeviceStore.create(tmp_path / "a") as a, DeviceStore.create(tmp_path / "b") as b:
        a.seal("adapter", b"from a")
        shutil.copy(tmp_path / "a" / "vault" / "adapter.enc", tmp_path / "b" / "vault" / "adapter.enc")
        with pytest.raises(DataError, match=r"corrupted, or from another store"):
            b.unseal("adapter")


def test_blob_renamed_within_store_detected(store, root):
    store.seal("one", b"1")
    shutil.copy(root / "vault" / "one.enc", root / "vault" / "two.enc")
    with pytest.raises(DataError, match=r"two\.enc cannot be decrypted"):
        store.unseal("two")


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    with DeviceStore.create(tmp_path_factory.mktemp("prop") / "store") as s:
        yield s


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096), name=st.from_regex(r"[a-z0-9_-]{1,64}", fullmatch=True))
def test_seal_unseal_property(shared_store, data, name):
    shared_store.seal(name, data)
    assert shared_store.unseal(name) == data


# -- feedback -----------------------------------------------------------------------


def test_add_pair_and_clear(store):
    ids = [store.add_pair(f"p{i}", "a", "b", source="ui") for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.count() == 3
    assert [p.prompt for p in store.pairs()] == ["p0", "p1", "p2"]
    assert {p.source for p in store.pairs()} == {"ui"}
    assert store.clear_pairs() == 3
    assert store.count() == 0 and store.pairs() == []
    assert store.add_pair("p", "a", "b") > ids[-1]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (("", "a", "b"), r"'prompt' must be a non-empty string"),
        (("p", "   ", "b"), r"'chosen' must be a non-empty string"),
        (("p", "a", None), r"'rejected' must be a non-empty string"),
        (("p", "same", "same"), r"identical"),
        (("p", "\ud800", "b"), r"not valid Unicode"),
    ],
)
def test_add_pair_validation(store, args, pattern):
    with pytest.raises(DataError, match=pattern):
        store.add_pair(*args)
    with pytest.raises(DataError, match=r"'source'"):
        store.add_pair("p", "a", "b", source="")
    assert store.count() == 0


def test_feedback_text_encrypted_at_rest(store, root):
    store.add_pair("PROMPT-SECRET-1", "CHOSEN-SECRET-2", "REJECTED-SECRET-3")
    store.close()
    raw = b"".join(p.read_bytes() for p in root.iterdir() if p.is_file())
    assert b"SECRET" not in raw


def test_swapped_fields_detected(store, root):
    store.add_pair("p", "good", "bad")
    db = sqlite3.connect(root / "feedback.sqlite3")
    db.execute("UPDATE pairs SET chosen = rejected, rejected = chosen")
    db.commit()
    db.close()
    with pytest.raises(DataError, match=r"feedback\.sqlite3: pair 1 field 'chosen' is corrupted"):
        store.pairs()


def _write_jsonl(path, lines) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_import_jsonl(store, tmp_path):
    f = tmp_path / "fb.jsonl"
    _write_jsonl(f, [
        json.dumps({"prompt": "p1", "chosen": "a", "rejected": "b", "extra": 1}),
        "",
        "   ",
        json.dumps({"prompt": "p2 ünïcode", "chosen": "c", "rejected": "d"}),
    ])
    assert store.import_jsonl(f) == 2
    assert [(p.prompt, p.source) for p in store.pairs()] == [("p1", "jsonl"), ("p2 ünïcode", "jsonl")]


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("{not json", r"invalid JSON"),
        (json.dumps({"prompt": "p", "chosen": "a"}), r"missing field 'rejected'"),
        (json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}), r"'prompt' must be a non-empty string"),
        (json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}), r"'chosen' must be a non-empty string"),
        (json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}), r"identical"),
        (json.dumps(["p", "a", "b"]), r"expected a JSON object"),
    ],
)
def test_import_jsonl_all_or_nothing(store, tmp_path, bad, pattern):
    store.add_pair("existing", "a", "b")
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    f = tmp_path / "fb.jsonl"
    _write_jsonl(f, [good, "", good, bad, good])
    with pytest.raises(DataError, match=pattern) as exc:
        store.import_jsonl(f)
    assert str(exc.value).startswith(f"{f}:4: ")
    assert "\n" not in str(exc.value)
    assert store.count() == 1


def test_import_jsonl_bad_utf8(store, tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=rf"{f}:2: not valid UTF-8"):
        store.import_jsonl(f)
    assert store.count() == 0


def test_import_jsonl_missing_file(store, tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: cannot read the file \(no such file\); check the path"):
        store.import_jsonl(tmp_path / "nope.jsonl")


# -- database -----------------------------------------------------------------------


def test_foreign_database_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    DeviceStore.create(a).close()
    DeviceStore.create(b).close()
    shutil.copy(a / "feedback.sqlite3", b / "feedback.sqlite3")
    before = _snapshot(b)
    with pytest.raises(DataError, match=r"feedback\.sqlite3 belongs to a foreign store"):
        DeviceStore.open(b)
    assert _snapshot(b) == before


def test_corrupt_and_missing_database(store, root):
    store.close()
    db = root / "feedback.sqlite3"
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DataError, match=rf"feedback database {db} is corrupted"):
        DeviceStore.open(root)
    assert db.read_bytes() == b"this is not sqlite at all" * 100
    db.unlink()
    with pytest.raises(DataError, match=rf"feedback database {db} is missing"):
        DeviceStore.open(root)
    assert not db.exists()  # never recreated behind the user's back


def test_closed_store_refuses(store):
    store.close()
    store.close()  # idempotent
    with pytest.raises(ConfigError, match=r"is closed"):
        store.add_pair("p", "a", "b")
    with pytest.raises(ConfigError, match=r"is closed"):
        store.seal("x", b"")


def test_durability_pragmas(store):
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_secure_delete_is_on_whatever_the_sqlite_builds_default(root, monkeypatch):
    """Every connection the store opens zeroes freed pages, even where SQLite's default is off
    (simulated: every new connection starts with secure_delete OFF)."""
    real = sqlite3.connect

    def off_by_default(*args, **kwargs):
        db = real(*args, **kwargs)
        db.execute("PRAGMA secure_delete=OFF")
        return db

    monkeypatch.setattr(sqlite3, "connect", off_by_default)
    assert off_by_default(":memory:").execute("PRAGMA secure_delete").fetchone() == (0,)  # control
    with DeviceStore.create(root) as s:
        assert s._conn.execute("PRAGMA secure_delete").fetchone() == (1,)
        assert s._conn.execute("PRAGMA temp_store").fetchone() == (2,)  # MEMORY: VACUUM's copy stays in RAM
    with DeviceStore.open(root) as s:
        assert s._conn.execute("PRAGMA secure_delete").fetchone() == (1,)


def test_import_jsonl_crlf_and_bom(store, tmp_path):
    f = tmp_path / "win.jsonl"
    line = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    f.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n" + line.encode() + b"\r\n")
    assert store.import_jsonl(f) == 2


def test_tampered_scrypt_params_refused(root):
    DeviceStore.create(root, passphrase="pw").close()
    path = root / "store.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "scrypt": {"n": 2**30, "r": 8, "p": 1}}))
    with pytest.raises(DataError, match=r"bad scrypt parameters"):
        DeviceStore.open(root, passphrase="pw")
    path.write_text(json.dumps({**meta, "scrypt": {"n": 2**14, "r": 8, "p": 1}}))
    with pytest.raises(ConfigError, match=r"wrong passphrase or key"):
        DeviceStore.open(root, passphrase="pw")


def test_failed_transaction_rolls_back(store, tmp_path):
    """A database error part-way through an import leaves no pairs behind."""
    store.add_pair("p", "a", "b")
    store._conn.execute("CREATE TRIGGER cap BEFORE INSERT ON pairs WHEN (SELECT COUNT(*) FROM pairs) >= 2 "
                        "BEGIN SELECT RAISE(ABORT, 'full'); END")
    f = tmp_path / "fb.jsonl"
    _write_jsonl(f, [json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) for i in range(3)])
    with pytest.raises(DataError, match=r"is damaged \(full\)"):  # one line (StoreError), not sqlite3's
        store.import_jsonl(f)
    assert store.count() == 1
    assert not store._conn.in_transaction
