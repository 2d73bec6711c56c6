"""The operator's key folder (``--home DIR``, keys in ``DIR/keys``): the signing keys, the
trust-root chain, and the operations on them: create the keys, rotate them, sign a bundle,
and verify or inspect an envelope file. ``fedpref-server keys|policy`` (:mod:`fedpref.server.policy_cli`)
parses the command line, calls one of them and prints.

Layout of ``DIR/keys`` (the folder is 0700, the key files 0600)::

    signer-<i>.pem       current signing keys, passphrase-encrypted PKCS#8 (i = 1..n)
    root.json            the current trust root (what clients are given); the commit point
    root-v<N>.json       every root ever issued, so a client that trusts v1 can follow
                         root-v2.json, root-v3.json, ... (each signed by old and new keys);
                         never one newer than root.json (:func:`reconcile_root_copies`)
    retired-v<N>/        the signing keys of root vN, archived by a rotation
    .next-v<N>/          a rotation in progress (:func:`finish_rotation`)

Every operation holds an exclusive lock on the folder, so two commands never interleave.
All cryptography is :mod:`fedpref.safety_policy`'s. The passphrase is asked for through a
callable, only once the folder's state allows the operation.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None  # type: ignore[assignment]

from fedpref.common.atomic import write_bytes_atomic
from fedpref.common.errors import ConfigError
from fedpref.safety_policy import (
    MAX_ENVELOPE_SIZE,
    POLICY_PAYLOAD_TYPE,
    EnvelopeTooLargeError,
    ExpiredRootError,
    KeyFileError,
    MalformedRootError,
    Policy,
    PolicyError,
    RollbackError,
    TrustRoot,
    WrongPayloadTypeError,
    check_files,
    generate_signing_key,
    keyid,
    load_private_key,
    load_root,
    make_root_body,
    parse_envelope,
    parse_payload,
    read_bundle_dir,
    rotate_root,
    save_private_key,
    sign_policy,
    sign_root,
    update_root,
    verify_envelope,
)
from fedpref.safety_policy.errors import short
from fedpref.safety_policy.root import MAX_ROOT_SIZE

ROOT_FILE = "root.json"
_MAX_SIGNERS = 16  # the trust root's own limit
_SIGNER = re.compile(r"signer-([1-9][0-9]{0,2})\.pem")
_STAGE = re.compile(r"\.next-v([1-9][0-9]*)")
_ROOT_COPY = re.compile(r"root-v([1-9][0-9]{0,8})\.json")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

Passphrase = Callable[[], bytes]  # asked for when needed (from the environment, or a prompt)
Clock = Callable[[], datetime]


def now_utc() -> datetime:
    """The real clock, to the second, in UTC (every operation here takes ``now=`` to inject one)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


# --- the key folder -------------------------------------------------------------------------


def read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (the verifier rejects anything over ``limit``)."""
    with open(path, "rb") as fh:
        return fh.read(limit + 1)


def short_id(kid: str) -> str:
    return kid[:16]


def keys_dir(home: Path) -> Path:
    return home.expanduser() / "keys"


@contextmanager
def _locked(kdir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key folder, so that two commands never interleave (a
    ``policy sign`` must not tidy up a rotation that another process is staging)."""
    if fcntl is None or not kdir.is_dir():
        yield  # nothing to protect yet: a missing folder is reported by what reads it
        return
    fd = os.open(kdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{kdir} is in use by another fedpref-server command; retry when it has finished") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _existing_keys(kdir: Path) -> list[str]:
    if not kdir.is_dir():
        return []
    return sorted(p.name for p in kdir.iterdir() if _SIGNER.fullmatch(p.name) or p.name.startswith("root"))


def _signer_files(kdir: Path) -> list[Path]:
    """``signer-<i>.pem`` files in ``kdir``, by ``i``."""
    if not kdir.is_dir():
        return []
    found = [(int(m.group(1)), kdir / name) for name in os.listdir(kdir) if (m := _SIGNER.fullmatch(name))]
    return [p for _, p in sorted(found)]


def _signer_number(path: Path) -> int:
    m = _SIGNER.fullmatch(path.name)
    return int(m.group(1)) if m else 0


def _read_root(path: Path) -> TrustRoot:
    """Load a trust-root file (trusted on first use: signed by a threshold of its own keys).

    A missing file is a :class:`KeyFileError`; anything else wrong with it a
    :class:`MalformedRootError` naming the file. Expiry is left to the caller.
    """
    data = _read_root_bytes(path)
    try:
        return load_root(data)
    except PolicyError as e:
        raise MalformedRootError(f"{path} is not a valid trust root: {e}") from None


def _read_root_bytes(path: Path) -> bytes:
    try:
        return read_capped(path, MAX_ROOT_SIZE)
    except FileNotFoundError:
        raise KeyFileError(f"no trust root at {path}; run `fedpref-server keys init --home DIR`, "
                           "or give the root.json the operator distributed") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a folder, not a trust-root file") from None
    except OSError as e:
        raise KeyFileError(f"cannot read trust root {path}: {e.strerror}") from None


def _read_root_chain(paths: list[Path]) -> TrustRoot:
    """Trust the first root file, then follow each next one (signed by old and new keys)."""
    trust = _read_root(paths[0])
    for path in paths[1:]:
        data = _read_root_bytes(path)
        try:
            trust = update_root(trust, data)
        except PolicyError as e:
            raise MalformedRootError(f"{path} is not a valid next root after v{trust.version}: {e}") from None
    return trust


def _write_root_copies(kdir: Path, root_bytes: bytes, version: int) -> None:
    """``root.json`` (the commit point), then its copy ``root-v<version>.json`` (kept for the
    chain; :func:`reconcile_root_copies` writes it again if a crash came in between)."""
    write_bytes_atomic(kdir / ROOT_FILE, root_bytes)
    write_bytes_atomic(kdir / f"root-v{version}.json", root_bytes)


def _root_copies(folder: Path) -> dict[int, Path]:
    """``root-v<N>.json`` files in ``folder``, by ``N``."""
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): folder / name for name in os.listdir(folder) if (m := _ROOT_COPY.fullmatch(name))}


def reconcile_root_copies(kdir: Path) -> None:
    """Make the ``root-v<N>.json`` copies agree with ``root.json``, the commit point.

    A copy newer than ``root.json`` is what a rotation that failed before its commit left
    behind: signed for keys that were never moved in (they are deleted with the staged
    rotation), it must never reach a device, and is removed. One is kept, and refused, only
    where ``retired-v<N-1>/`` shows that rotation was committed (``root.json`` was then put
    back from an older copy). ``root-v<version>.json`` of ``root.json`` itself is written
    again from it when missing or different (a crash after the commit).
    """
    current_path = kdir / ROOT_FILE
    if not current_path.exists():
        return
    current_bytes = _read_root_bytes(current_path)
    current = _read_root(current_path)
    for n, path in sorted(_root_copies(kdir).items()):
        if n <= current.version:
            continue
        if (kdir / f"retired-v{n - 1}").exists():
            raise KeyFileError(f"{path} is newer than {current_path} (v{current.version}), and that rotation was "
                               f"committed ({kdir / f'retired-v{n - 1}'} exists): {current_path} was replaced by an "
                               "older root; restore the newest root.json and its signing keys from a backup")
        path.unlink()  # never committed
    copy = kdir / f"root-v{current.version}.json"
    try:
        same = read_capped(copy, MAX_ROOT_SIZE) == current_bytes
    except FileNotFoundError:
        same = False
    if not same:
        write_bytes_atomic(copy, current_bytes)


def root_chain(root_path: Path, root_bytes: bytes | None = None) -> tuple[bytes, ...]:
    """The trust roots a server sends with its policy, oldest first: the ``root-v<N>.json``
    copies next to ``root_path`` that lead, without a gap, to ``root_path``'s version, then
    ``root_path`` itself. Each is checked to follow from the one before (signed by a threshold
    of its keys and of its own), as a device will.

    A copy newer than ``root_path`` (a rotation that was never committed) is never sent. A gap
    (a missing version below which older copies remain), a copy that does not follow, or a
    ``root-v<N>.json`` of the current version that differs from ``root_path`` is refused with
    one line: devices pinned below the break could not follow to the current root.
    """
    current_bytes = _read_root_bytes(root_path) if root_bytes is None else root_bytes
    try:
        current = load_root(current_bytes)
    except PolicyError as e:
        raise MalformedRootError(f"{root_path} is not a valid trust root: {e}") from None
    folder = root_path.parent
    copies = _root_copies(folder)
    if (same := copies.get(current.version)) is not None and _read_root_bytes(same) != current_bytes:
        raise MalformedRootError(f"{same} differs from {root_path} (both should be trust root v{current.version}); "
                                 f"copy {root_path.name} over it if {root_path.name} is the root in force")
    older: list[Path] = []
    v = current.version - 1
    while v in copies:
        older.insert(0, copies[v])
        v -= 1
    if stranded := sorted(n for n in copies if n < v):
        raise KeyFileError(f"trust-root chain in {folder} is broken: root-v{v}.json is missing, so devices that "
                           f"trust root-v{stranded[-1]}.json or older cannot follow to {root_path.name} "
                           f"(v{current.version}); restore root-v{v}.json from the key folder or a backup")
    if not older:
        return (current_bytes,)
    trust = _read_root(older[0])
    for path, data in [*((p, _read_root_bytes(p)) for p in older[1:]), (root_path, current_bytes)]:
        try:
            trust = update_root(trust, data)
        except PolicyError as e:
            raise MalformedRootError(f"trust-root chain in {folder} is broken: {path.name} does not follow from "
                                     f"root v{trust.version}: {e}") from None
    return (*(_read_root_bytes(p) for p in older), current_bytes)


def _load_signers(kdir: Path, root: TrustRoot, passphrase: bytes, *, need: int | None) -> dict[str, Any]:
    """Decrypt signer keys of ``root`` from ``kdir``: ``need`` of them, or every one present.

    A key that is not in ``root`` is a :class:`KeyFileError` (a retired key put back?); fewer
    than ``need`` (default: the root's threshold) names the first missing file.
    """
    want = root.threshold if need is None else need
    expected = [kdir / f"signer-{i}.pem" for i in range(1, len(root.keys) + 1)]
    paths = sorted(set(expected) | set(_signer_files(kdir)), key=_signer_number)
    loaded: dict[str, Any] = {}
    missing: list[Path] = []
    for path in paths:
        if need is not None and len(loaded) >= need:
            break
        if not path.exists():
            missing.append(path)
            continue
        key = load_private_key(path, passphrase)
        kid = keyid(key)
        if kid not in root.keys:
            raise KeyFileError(f"{path} (key {short_id(kid)}) is not a key of trust root v{root.version} "
                               f"in {kdir / ROOT_FILE}; remove it or restore the matching root")
        if kid in loaded:
            raise KeyFileError(f"{path} holds the same key as another signer file; remove the copy")
        loaded[kid] = key
    if len(loaded) < want:
        what = f"no signing key at {missing[0]}: " if missing else ""
        raise KeyFileError(f"{what}found {len(loaded)} of the {want} signing key(s) that trust root "
                           f"v{root.version}'s threshold needs in {kdir}; restore the key files from a backup")
    return loaded


def finish_rotation(kdir: Path) -> None:
    """Finish (or roll back) a ``keys rotate`` that was interrupted.

    ``keys rotate`` writes the new keys to ``.next-v<W>/`` with a ``root.json`` marker, then
    commits by replacing ``root.json``; only then does it archive the old keys in
    ``retired-v<W-1>/`` (and drop the marker) and move the new keys in. Rerunning these steps
    is safe; a staged rotation whose root was never committed is deleted, with any
    ``root-v<N>.json`` it left that is newer than ``root.json``
    (:func:`reconcile_root_copies`).
    """
    if not kdir.is_dir():
        return
    for name in sorted(os.listdir(kdir)):
        m = _STAGE.fullmatch(name)
        if not m:
            continue
        stage, new_version = kdir / name, int(m.group(1))
        current = _read_root(kdir / ROOT_FILE).version if (kdir / ROOT_FILE).exists() else 0
        if current != new_version:  # never committed: the old keys and root are still in force
            shutil.rmtree(stage)
            continue
        marker = stage / ROOT_FILE
        if marker.exists():  # phase 1: archive the old keys
            retired = kdir / f"retired-v{new_version - 1}"
            retired.mkdir(mode=0o700, exist_ok=True)
            for path in _signer_files(kdir):
                os.replace(path, retired / path.name)
            marker.unlink()
        for path in _signer_files(stage):  # phase 2: move the new keys in
            os.replace(path, kdir / path.name)
        stage.rmdir()
    reconcile_root_copies(kdir)


def _check_signers_threshold(signers: int, threshold: int) -> None:
    if not 1 <= signers <= _MAX_SIGNERS:
        raise ConfigError(f"--signers={signers} is invalid; give 1 to {_MAX_SIGNERS} keys")
    if not 1 <= threshold <= signers:
        raise ConfigError(f"--threshold={threshold} is invalid; give 1 to --signers ({signers})")


_MAX_DAYS = 36_500  # a trust root valid for 100 years is already a key that is never rotated


def _check_days(days: int) -> None:
    if not 1 <= days <= _MAX_DAYS:
        raise ConfigError(f"--expires-days={days} is invalid; give 1 to {_MAX_DAYS} days (rotate keys before then)")


# --- operations ----------------------------------------------------------------------------


def init_keys(home: Path, *, signers: int, threshold: int | None, expires_days: int, passphrase: Passphrase,
              now: Clock = now_utc) -> TrustRoot:
    """Create ``signers`` encrypted signing keys and the first trust root (v1, ``threshold``
    of them; default a majority) in ``home``/keys, which must hold no keys yet."""
    k = signers // 2 + 1 if threshold is None else threshold
    _check_signers_threshold(signers, k)
    _check_days(expires_days)
    kdir = keys_dir(home)

    def refuse_existing() -> None:
        if existing := _existing_keys(kdir):
            raise ConfigError(f"{kdir} already holds keys ({', '.join(existing[:3])}); refusing to overwrite "
                              f"them. Use `fedpref-server keys rotate --home {home}` to replace them, or another --home")

    refuse_existing()  # before asking for a passphrase
    secret = passphrase()
    when = now()
    keys = [generate_signing_key() for _ in range(signers)]
    body = make_root_body(keys, k, expires=when + timedelta(days=expires_days), version=1)
    root_bytes = sign_root(body, keys)
    root = load_root(root_bytes, now=when)
    kdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(kdir):
        refuse_existing()
        for i, key in enumerate(keys, start=1):
            save_private_key(kdir / f"signer-{i}.pem", key, secret)
        _write_root_copies(kdir, root_bytes, root.version)
    return root


@dataclass(frozen=True)
class Rotation:
    old: TrustRoot
    new: TrustRoot
    old_signers: int  # how many old keys signed the new root (all of them)


def rotate_keys(home: Path, *, signers: int | None, threshold: int | None, expires_days: int,
                passphrase: Passphrase, now: Clock = now_utc) -> Rotation:
    """Replace every signing key: the next root (version + 1) is signed by the old keys and the new.

    ``signers`` defaults to as many as the current root has; ``threshold`` to the current one
    (a majority if that exceeds ``signers``). The new keys are staged in ``.next-v<N>/``, the
    commit point is ``root.json``, then :func:`finish_rotation` archives the old keys in
    ``retired-v<old version>/``; every root stays as ``root-v<N>.json``.
    """
    _check_days(expires_days)
    kdir = keys_dir(home)
    with _locked(kdir):
        finish_rotation(kdir)
        old = _read_root(kdir / ROOT_FILE)
        n = len(old.keys) if signers is None else signers
        k = threshold if threshold is not None else (old.threshold if old.threshold <= n else n // 2 + 1)
        _check_signers_threshold(n, k)
        secret = passphrase()
        old_signers = _load_signers(kdir, old, secret, need=None)
        when = now()
        new_keys = [generate_signing_key() for _ in range(n)]
        body = make_root_body(new_keys, k, expires=when + timedelta(days=expires_days), version=old.version + 1)
        new_bytes = rotate_root(old, body, old_signers.values(), new_keys)  # checked with update_root
        new = update_root(old, new_bytes, now=when)

        stage = kdir / f".next-v{new.version}"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(mode=0o700)
        for i, key in enumerate(new_keys, start=1):
            save_private_key(stage / f"signer-{i}.pem", key, secret)
        write_bytes_atomic(stage / ROOT_FILE, new_bytes)  # marker: the staged keys are complete
        if not (kdir / f"root-v{old.version}.json").exists():
            write_bytes_atomic(kdir / f"root-v{old.version}.json", old.raw)
        _write_root_copies(kdir, new_bytes, new.version)  # commit point: root.json
        finish_rotation(kdir)
    return Rotation(old=old, new=new, old_signers=len(old_signers))


def sign_bundle(bundle: Path, home: Path, *, version: int, expires_at: datetime, out: Path,
                passphrase: Passphrase, now: datetime) -> tuple[Policy, TrustRoot]:
    """Sign the bundle folder with a threshold of ``home``'s keys into one DSSE envelope,
    verified as every client will verify it before ``out`` is written."""
    manifest, files = read_bundle_dir(bundle)
    kdir = keys_dir(home)
    with _locked(kdir):
        finish_rotation(kdir)
        root = _read_root(kdir / ROOT_FILE)
        try:
            root.check_not_expired(now)
        except ExpiredRootError as e:
            raise ExpiredRootError(f"{kdir / ROOT_FILE}: {e}; run `fedpref-server keys rotate --home {home}`") from None
        signers = _load_signers(kdir, root, passphrase(), need=root.threshold)
        envelope = sign_policy(manifest, files, signers.values(), version=version, issued_at=now,
                               expires_at=expires_at)
        try:  # what every client will do; nothing is written unless it passes
            policy = verify_envelope(envelope, root, last_version=version - 1, now=now)
        except PolicyError as e:
            raise type(e)(f"the signed policy would be rejected, nothing written: {e}") from None
    write_bytes_atomic(out, envelope)
    return policy, root


# --- envelope files: verify against a root chain, or show unverified -----------------------------


def verify_file(envelope: Path, roots: list[Path], *, min_version: int, now: datetime,
                 backbone_sha256: str | None) -> tuple[Policy, TrustRoot]:
    if min_version < 1:
        raise ConfigError(f"--min-version={min_version} is invalid; give an integer >= 1")
    if backbone_sha256 is not None and not _HEX64.fullmatch(backbone_sha256):
        raise ConfigError(f"--backbone-sha256 {short(backbone_sha256)} is invalid; give 64 hex digits")
    if not roots:
        raise ConfigError("give the trust root with --root ROOT.json")
    root = _read_root_chain(roots)
    data = read_capped(envelope, MAX_ENVELOPE_SIZE)
    if len(data) > MAX_ENVELOPE_SIZE:  # report the file's real size, not the bytes read
        raise EnvelopeTooLargeError(f"{envelope}: rejected: envelope is {envelope.stat().st_size} bytes, "
                                    f"limit {MAX_ENVELOPE_SIZE}")
    try:
        policy = verify_envelope(data, root, last_version=min_version - 1, now=now, backbone_sha256=backbone_sha256)
    except ExpiredRootError as e:
        raise ExpiredRootError(f"{envelope}: rejected: {roots[-1]}: {e}") from None
    except RollbackError as e:
        raise RollbackError(f"{envelope}: rejected: below --min-version {min_version} ({e})") from None
    except PolicyError as e:
        raise type(e)(f"{envelope}: rejected: {e}") from None
    return policy, root


def unverified_summary(data: bytes) -> dict[str, Any]:
    """What the envelope claims, parsed without any signature check (for display only)."""
    parsed = parse_envelope(data, max_size=MAX_ENVELOPE_SIZE)
    if parsed.payload_type != POLICY_PAYLOAD_TYPE:
        raise WrongPayloadTypeError(f"payloadType {short(parsed.payload_type)}, expected {POLICY_PAYLOAD_TYPE!r}")
    manifest, files = parse_payload(parsed.payload)
    try:
        check_files(manifest["files"], files)
        files_ok = "match the manifest"
    except PolicyError as e:
        files_ok = f"DO NOT match the manifest: {e}"
    return {
        "name": manifest["name"], "version": manifest["version"], "issued_at": manifest["issued_at"],
        "expires_at": manifest["expires_at"], "backbone_sha256": manifest["backbone_sha256"],
        "categories": manifest["categories"], "files": {n: len(b) for n, b in sorted(files.items())},
        "files_check": files_ok, "envelope_sha256": hashlib.sha256(data).hexdigest(),
        "signature_keyid_hints": [s.keyid for s in parsed.signatures],
        "classifier": {k: v for k, v in manifest["classifier"].items() if k != "training"},
        "training": manifest["classifier"].get("training"),
    }
