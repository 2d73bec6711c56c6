"""The device agent's on-device store: feedback pairs in SQLite plus encrypted blobs.

Layout under ``root`` (the agent passes ``<home>/store``)::

    store.json        format, version, store_id, kdf (+ scrypt salt/params), key_check
    store.key         32 random bytes, mode 0600 (kdf "keyfile", the default)
    feedback.sqlite3  tables ``pairs`` and ``meta`` (meta holds the store_id)
    vault/<name>.enc  b"FPV1" + 12-byte nonce + AES-GCM ciphertext, AAD f"{store_id}/{name}"

Threat model: the store protects data at rest against someone who copies the files
without the key. The prompt/chosen/rejected columns are AES-GCM encrypted too (AAD binds
store_id, row id and field, so values cannot be swapped between rows or fields); ``source``
and ``created_at`` stay in clear. By default the key file sits beside the data, so theft
of the whole disk (key file included) defeats it; passphrase mode (scrypt, no key file) is
for that case. A wrong key or passphrase is caught by ``key_check`` before anything is read.

Fail closed: a malformed, corrupted or foreign file raises a one-line error that names the
file and the fix; nothing is ever deleted or overwritten automatically. ``seal`` refuses to
replace an existing blob that does not decrypt; remove it explicitly with ``delete`` first.
``store.json`` is written last by ``create``, so an interrupted init leaves files that
``create`` refuses to reuse (the message says to move them aside).

Deletion is physical as far as SQLite and the file system let a program make it: every
connection runs with ``PRAGMA secure_delete=ON`` (freed pages are zeroed, whatever the
build's default) and ``temp_store=MEMORY``; :meth:`DeviceStore.clear_pairs` then runs
``VACUUM`` and, in WAL mode, ``wal_checkpoint(TRUNCATE)``, so no deleted ciphertext stays in
the database, its WAL or its journal. :meth:`DeviceStore.delete` overwrites a sealed blob
with zeros before unlinking it, and :meth:`DeviceStore.destroy` overwrites and removes the
key file and removes ``store.json`` (salt and key check), after which nothing left on disk
decrypts. Copies the file system keeps on its own (blocks of unlinked files such as a
committed rollback journal, copy-on-write file systems, SSD wear levelling, snapshots,
backups) are out of a program's reach; destroying the key covers them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import re
import secrets
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedpref.common.atomic import fsync_dir, write_bytes_atomic
from fedpref.common.errors import ConfigError, DataError
from fedpref.common.jsonl import read_jsonl

FORMAT = "fedpref-device-store"
VERSION = 1
PASSPHRASE_ENV = "FEDPREF_STORE_PASSPHRASE"
SCRYPT_PARAMS = {"n": 2**15, "r": 8, "p": 1}
BLOB_MAGIC = b"FPV1"
_NONCE = 12
_KEY_CHECK = b"fedpref-device-store key check v1"
_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
_FIELDS = ("prompt", "chosen", "rejected")
_SCHEMA = (
    ("CREATE TABLE pairs(id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT NOT NULL, chosen TEXT NOT NULL,"
     " rejected TEXT NOT NULL, source TEXT NOT NULL, created_at TEXT NOT NULL)"),
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)",
)


class StoreError(DataError):
    """A store file is malformed, corrupted or belongs to another store."""


@dataclass(frozen=True)
class FeedbackPair:
    id: int
    prompt: str
    chosen: str
    rejected: str
    source: str
    created_at: str


def passphrase_from_env() -> str | None:
    """The store passphrase from ``$FEDPREF_STORE_PASSPHRASE``, or None if unset or empty."""
    return os.environ.get(PASSPHRASE_ENV) or None


def _derive(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=params["n"], r=params["r"], p=params["p"])
    return kdf.derive(passphrase.encode("utf-8"))


def _encrypt(aead: AESGCM, data: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + aead.encrypt(nonce, data, aad)


def _decrypt(aead: AESGCM, blob: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag (or ValueError for a too-short blob) on any mismatch."""
    if len(blob) < _NONCE + 16:
        raise InvalidTag()
    return aead.decrypt(blob[:_NONCE], blob[_NONCE:], aad)


def _read_meta(path: Path) -> dict:
    fix = "restore it from a backup, or move the folder aside and run `fedpref-agent init`"
    try:
        meta = json.loads(path.read_bytes())
    except IsADirectoryError:
        raise StoreError(f"{path} is a folder, not the store's store.json; {fix}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(exc).split())[:100]
        raise StoreError(f"{path} is not a fedpref device store (malformed JSON: {reason}); {fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{path} is not a fedpref device store (format is not {FORMAT!r}); {fix}")
    version = meta.get("version")
    if type(version) is int and version > VERSION:
        raise StoreError(f"{path} was written by a newer fedpref (store version {version} > {VERSION}); "
                         "upgrade fedpref to open it")
    try:
        if version != VERSION or type(version) is not int:
            raise ValueError(f"unsupported version {version!r}")
        if not re.fullmatch(r"[0-9a-f]{32}", str(meta.get("store_id"))):
            raise ValueError("store_id is not 32 hex digits")
        bytes.fromhex(meta["key_check"])
        if meta.get("kdf") == "scrypt":
            if len(bytes.fromhex(meta["salt"])) != 16:
                raise ValueError("salt is not 16 bytes")
            p = meta["scrypt"]
            if not (all(type(p.get(k)) is int for k in "nrp") and 2 <= p["n"] <= 2**18
                    and p["n"] & (p["n"] - 1) == 0 and 1 <= p["r"] <= 16 and 1 <= p["p"] <= 16):
                raise ValueError(f"bad scrypt parameters {p!r}")
        elif meta.get("kdf") != "keyfile":
            raise ValueError(f"unknown kdf {meta.get('kdf')!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"{path} is not a valid fedpref device store ({exc}); {fix}") from None
    return meta


def _read_keyfile(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"key file {path} is missing; restore it from your backup "
                          "(the store's data cannot be decrypted without it)")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ConfigError(f"key file {path} is readable by other users; run `chmod 600 {path}`")
    key = path.read_bytes()
    if len(key) != 32:
        raise StoreError(f"key file {path} is {len(key)} bytes, not 32; it is damaged, restore it from your backup")
    return key


def _db_guard(method):  # noqa: ANN001, ANN202
    """Turn a SQLite failure (a corrupt page, a dropped column) into a one-line StoreError."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"feedback database {self.root / 'feedback.sqlite3'} is damaged ({e}); restore it from "
                             "a backup, or move the store aside and run `fedpref-agent init` again") from None
    return wrapper


class DeviceStore:
    """An open store. Use ``create`` or ``open``; close it (or use ``with``) when done."""

    def __init__(self, root: Path, store_id: str, key: bytes, db: sqlite3.Connection) -> None:
        self.root, self.store_id = root, store_id
        self._aead = AESGCM(key)
        self._db: sqlite3.Connection | None = db

    # -- lifecycle ------------------------------------------------------------------

    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / "store.json").is_file()

    @staticmethod
    def uses_passphrase(root: Path) -> bool:
        """Whether the store at ``root`` derives its key from a passphrase (store.json checked)."""
        return DeviceStore.exists(root) and _read_meta(Path(root) / "store.json")["kdf"] == "scrypt"

    @classmethod
    def create(cls, root: Path, *, passphrase: str | None = None) -> DeviceStore:
        root = Path(root)
        if cls.exists(root):
            raise ConfigError(f"a device store already exists at {root}; open it instead, "
                              "or move the folder aside to start over")
        leftovers = [n for n in ("store.key", "feedback.sqlite3", "vault") if (root / n).exists()]
        if leftovers:
            raise ConfigError(f"{root} holds store files ({', '.join(leftovers)}) but no store.json, "
                              "maybe from an interrupted init; move them aside and run init again")
        if passphrase is not None and not passphrase:
            raise ConfigError(f"empty passphrase for new store {root}; pick a non-empty one or use a key file")
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        store_id = uuid.uuid4().hex
        meta: dict = {"format": FORMAT, "version": VERSION, "store_id": store_id}
        if passphrase is None:
            key = secrets.token_bytes(32)
            meta["kdf"] = "keyfile"
            write_bytes_atomic(root / "store.key", key, mode=0o600)
        else:
            salt = secrets.token_bytes(16)
            key = _derive(passphrase, salt, SCRYPT_PARAMS)
            meta.update(kdf="scrypt", salt=salt.hex(), scrypt=dict(SCRYPT_PARAMS))
        meta["key_check"] = _encrypt(AESGCM(key), _KEY_CHECK, (store_id + "key-check").encode()).hex()
        db_path = root / "feedback.sqlite3"
        os.close(os.open(db_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.chmod(db_path, 0o600)
        db = _connect(db_path)
        try:
            with _tx(db):
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute("INSERT INTO meta(key, value) VALUES ('store_id', ?)", (store_id,))
            (root / "vault").mkdir(mode=0o700)
            write_bytes_atomic(root / "store.json", json.dumps(meta, indent=2).encode() + b"\n", mode=0o600)
        except BaseException:
            db.close()
            raise
        return cls(root, store_id, key, db)

    @classmethod
    def open(cls, root: Path, *, passphrase: str | None = None) -> DeviceStore:
        root = Path(root)
        if not cls.exists(root):
            raise ConfigError(f"no device store at {root}; run `fedpref-agent init --home ...` first")
        meta = _read_meta(root / "store.json")
        if meta["kdf"] == "keyfile":
            if passphrase is not None:
                raise ConfigError(f"store {root} uses a key file, not a passphrase; "
                                  f"open it without a passphrase (unset {PASSPHRASE_ENV})")
            key = _read_keyfile(root / "store.key")
        else:
            if not passphrase:
                raise ConfigError(f"store {root} is passphrase-protected; set {PASSPHRASE_ENV} or pass the passphrase")
            key = _derive(passphrase, bytes.fromhex(meta["salt"]), meta["scrypt"])
        try:
            _decrypt(AESGCM(key), bytes.fromhex(meta["key_check"]), (meta["store_id"] + "key-check").encode())
        except (InvalidTag, ValueError):
            raise ConfigError(f"wrong passphrase or key for store {root}; check {PASSPHRASE_ENV} "
                              "or restore this store's own store.key") from None
        db = _open_db(root / "feedback.sqlite3", meta["store_id"])
        return cls(root, meta["store_id"], key, db)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        """The open database connection; raises once the store is closed."""
        if self._db is None:
            raise ConfigError(f"device store {self.root} is closed; open it again")
        return self._db

    # -- feedback -------------------------------------------------------------------

    @_db_guard
    def add_pair(self, prompt: str, chosen: str, rejected: str, *, source: str = "cli") -> int:
        _validate_pair(prompt, chosen, rejected, source, where="add_pair")
        with _tx(self._conn):
            return self._insert(prompt, chosen, rejected, source)

    @_db_guard
    def import_jsonl(self, path: Path) -> int:
        """Add every pair in a JSONL file in one transaction: all of them, or none."""
        path = Path(path)
        rows = []
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            for field in _FIELDS:
                if field not in obj:
                    raise DataError(f"{where}: missing field {field!r}; every line needs prompt, chosen, rejected")
            rows.append((obj["prompt"], obj["chosen"], obj["rejected"]))
            _validate_pair(*rows[-1], "jsonl", where=where)
        if not rows:
            raise DataError(f"{path}: no preference pairs in the file; write one "
                            '{"prompt": ..., "chosen": ..., "rejected": ...} object per line')
        with _tx(self._conn):
            for row in rows:
                self._insert(*row, "jsonl")
        return len(rows)

    @_db_guard
    def pairs(self) -> list[FeedbackPair]:
        cur = self._conn.execute("SELECT id, prompt, chosen, rejected, source, created_at FROM pairs ORDER BY id")
        return [FeedbackPair(r[0], *(self._open_field(r[0], f, v) for f, v in zip(_FIELDS, r[1:4])), r[4], r[5])
                for r in cur]

    @_db_guard
    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]

    @_db_guard
    def clear_pairs(self) -> int:
        """Delete every pair, physically: the rows' pages are zeroed (secure_delete), the file
        rebuilt (VACUUM) and, in WAL mode, the WAL copied back and truncated to zero bytes."""
        db = self._conn
        with _tx(db):
            n = db.execute("DELETE FROM pairs").rowcount
        _purge(db, self.root / "feedback.sqlite3")
        return n

    def _insert(self, prompt: str, chosen: str, rejected: str, source: str) -> int:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rid = self._conn.execute("INSERT INTO pairs(prompt, chosen, rejected, source, created_at) "
                                 "VALUES ('', '', '', ?, ?)", (source, now)).lastrowid
        sealed = [self._seal_field(rid, f, v) for f, v in zip(_FIELDS, (prompt, chosen, rejected))]
        self._conn.execute("UPDATE pairs SET prompt = ?, chosen = ?, rejected = ? WHERE id = ?", (*sealed, rid))
        return rid

    def _field_aad(self, rid: int, field: str) -> bytes:
        return f"{self.store_id}/pairs/{rid}/{field}".encode()

    def _seal_field(self, rid: int, field: str, value: str) -> str:
        return base64.b64encode(_encrypt(self._aead, value.encode("utf-8"), self._field_aad(rid, field))).decode()

    def _open_field(self, rid: int, field: str, value: str) -> str:
        try:
            blob = base64.b64decode(value, validate=True)
            return _decrypt(self._aead, blob, self._field_aad(rid, field)).decode("utf-8")
        except (InvalidTag, ValueError, binascii.Error, TypeError):
            raise StoreError(f"{self.root / 'feedback.sqlite3'}: pair {rid} field {field!r} is corrupted, "
                             "or from another store; restore the database from a backup") from None

    # -- encrypted blobs ------------------------------------------------------------

    def _blob_path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"bad vault blob name {name!r}; use 1-64 characters from [a-z0-9_-]")
        return self.root / "vault" / f"{name}.enc"

    def seal(self, name: str, data: bytes) -> None:
        """Encrypt ``data`` to ``vault/<name>.enc``; refuses to replace a blob that does not decrypt."""
        path = self._blob_path(name)
        _ = self._conn  # raises on a closed store
        if path.exists():
            self.unseal(name)  # raises on a corrupted or foreign blob; `delete` it explicitly first
        aad = f"{self.store_id}/{name}".encode()
        write_bytes_atomic(path, BLOB_MAGIC + _encrypt(self._aead, bytes(data), aad), mode=0o600)

    def unseal(self, name: str) -> bytes | None:
        path = self._blob_path(name)
        _ = self._conn
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # a folder (or anything unreadable) where the sealed file should be
            raise StoreError(f"{path}: cannot read the sealed file ({e.strerror or e}); move it aside, or run "
                             "`fedpref-agent forget` to start afresh") from None
        if not blob.startswith(BLOB_MAGIC):
            raise StoreError(f"{path} is not a fedpref vault blob (bad magic); restore it from a backup "
                             "or remove it with delete")
        try:
            return _decrypt(self._aead, blob[len(BLOB_MAGIC):], f"{self.store_id}/{name}".encode())
        except (InvalidTag, ValueError):
            raise StoreError(f"{path} cannot be decrypted: corrupted, or from another store; "
                             "restore it from a backup or remove it with delete") from None

    def delete(self, name: str) -> bool:
        """Overwrite ``vault/<name>.enc`` with zeros, then remove it; False if there was none."""
        path = self._blob_path(name)
        _ = self._conn
        return shred(path)

    def destroy(self) -> None:
        """Crypto-shred the store and close it: overwrite and remove ``store.key`` and remove
        ``store.json`` (the passphrase's salt and the key check), so that nothing left in
        ``root`` (nor a copy of the data made earlier) decrypts. The store cannot be opened again."""
        _ = self._conn
        self.close()
        self._aead = None  # type: ignore[assignment]  # drop our reference to the key
        shred(self.root / "store.key")
        shred(self.root / "store.json")


def _validate_pair(prompt: object, chosen: object, rejected: object, source: object, *, where: str) -> None:
    for field, value in zip((*_FIELDS, "source"), (prompt, chosen, rejected, source)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {field!r} must be a non-empty string, got {value!r:.60}; fill it in")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: {field!r} is not valid Unicode text (lone surrogate); fix the text") from None
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair needs two different answers")


def shred(path: Path) -> bool:
    """Overwrite the file ``path`` with zeros (fsynced), then unlink it and fsync its folder;
    False if there was none. On copy-on-write file systems and SSDs the old blocks may survive
    the overwrite; the unlink is what is certain."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file (a link?); remove it by hand")
    if not st.st_mode & stat.S_IWUSR:
        os.chmod(path, 0o600)  # a key made read-only is still overwritten
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        chunk = bytes(min(size, 1 << 20))
        written = 0
        while written < size:
            written += os.write(fd, chunk[: size - written])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)
    fsync_dir(path.parent)
    return True


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")  # every COMMIT is fsynced
        db.execute("PRAGMA temp_store=MEMORY")  # VACUUM's copy of the data stays out of the temp folder
        if db.execute("PRAGMA secure_delete=ON").fetchone() != (1,):  # deleted rows' pages are zeroed
            raise ConfigError(f"{path}: this SQLite build ignores PRAGMA secure_delete, so deleted pairs "
                              "would stay readable in the file; use a Python whose sqlite3 supports it")
    except BaseException:
        db.close()
        raise
    return db


def _purge(db: sqlite3.Connection, path: Path) -> None:
    """Leave no freed page in the database file or its WAL: VACUUM, then (WAL mode) checkpoint
    the WAL into the file and truncate it. Raises if another connection keeps the WAL alive."""
    busy = f"{path}: another process holds the database open, so the deleted pairs could not be purged from the file"
    fix = "; stop it (fedpref-agent start, serve) and run forget again"
    try:
        db.execute("VACUUM")
        if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            if db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                raise ConfigError(busy + " (its WAL is in use)" + fix)
    except sqlite3.OperationalError as e:
        raise ConfigError(f"{busy} ({e}){fix}") from None


@contextmanager
def _tx(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _open_db(path: Path, store_id: str) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(f"feedback database {path} is missing; restore it from a backup")
    try:
        db = _connect(path)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"feedback database {path} is corrupted ({exc}); restore it from a backup") from None
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(pairs)")}
        if "pairs" in tables and not {"id", *_FIELDS, "source", "created_at"} <= columns:
            raise StoreError(f"{path}: table pairs lacks columns "
                             f"{sorted({'id', *_FIELDS, 'source', 'created_at'} - columns)}; restore it from a backup")
        row = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone() if "meta" in tables else None
        if not {"pairs", "meta"} <= tables:
            raise StoreError(f"{path} is not a fedpref feedback database (tables pairs/meta missing); "
                             "restore it from a backup")
        if row is None or row[0] != store_id:
            raise StoreError(f"{path} belongs to a foreign store (store_id {row[0] if row else None!r}, "
                             f"expected {store_id!r}); restore this store's own database from a backup")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f"feedback database {path} is corrupted ({exc}); restore it from a backup") from None
    except BaseException:
        db.close()
        raise
    return db
