"""``fedpref-server keys ...`` and ``fedpref-server policy ...``: the operator's signing workflow.

A shell round trip::

    export FEDPREF_KEY_PASSPHRASE=...            # or be prompted (hidden, with confirmation)
    fedpref-server keys init --home ops --signers 3 --threshold 2
    fedpref-server policy build --data safety.jsonl --out bundle/
    fedpref-server policy sign bundle/ --home ops --version 1 --expires 2027-01-01 --out policy.dsse.json
    fedpref-server policy verify policy.dsse.json --root ops/keys/root.json
    fedpref-server keys rotate --home ops          # root v2, signed by old and new keys

Layout of ``--home DIR`` (the folder is 0700, the key files 0600)::

    keys/signer-<i>.pem       current signing keys, passphrase-encrypted PKCS#8 (i = 1..n)
    keys/root.json            the current trust root (what clients are given)
    keys/root-v<N>.json       every root ever issued, so a client that trusts v1 can follow
                              root-v2.json, root-v3.json, ... (each signed by old and new keys)
    keys/retired-v<N>/        the signing keys of root vN, archived by ``keys rotate``

Every command here reuses :mod:`fedpref.safety_policy` for all cryptography. Every failure is
one line on stderr and a documented exit code (``fedpref-server exit-codes``), no traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None  # type: ignore[assignment]

from fedpref.protocol.atomic import write_bytes_atomic
from fedpref.protocol.errors import ConfigError
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
    format_rfc3339,
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
from fedpref.protocol.exit_codes import exit_on_error

__all__ = ["PASSPHRASE_ENV", "keys_app", "parse_when", "policy_app"]

PASSPHRASE_ENV = "FEDPREF_KEY_PASSPHRASE"
HOME_ENV = "FEDPREF_HOME"
ROOT_FILE = "root.json"
_MAX_SIGNERS = 16  # the trust root's own limit
_SIGNER = re.compile(r"signer-([1-9][0-9]{0,2})\.pem")
_STAGE = re.compile(r"\.next-v([1-9][0-9]*)")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")

keys_app = typer.Typer(
    rich_markup_mode=None,  # plain help: "[federation] rounds" must not vanish as rich markup
    help="Ed25519 signing keys and the trust root (root.json) that clients pin.",
    no_args_is_help=True,
)
policy_app = typer.Typer(
    rich_markup_mode=None,  # plain help: "[federation] rounds" must not vanish as rich markup
    help="Build, sign, verify and inspect safety-policy bundles (DSSE envelopes).",
    no_args_is_help=True,
)

Home = Annotated[
    Path,
    typer.Option("--home", envvar=HOME_ENV, help="Operator folder; keys live in DIR/keys.",
                 metavar="DIR", show_envvar=True),
]
ExpiresDays = Annotated[int, typer.Option("--expires-days", help="The new trust root expires this many days from now.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


# --- small helpers --------------------------------------------------------------------------


@contextmanager
def _errors() -> Iterator[None]:
    """:func:`exit_on_error`, plus an OS error (a path that cannot be read or written) as CONFIG."""
    with exit_on_error():
        try:
            yield
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise ConfigError(f"{where}{e.strerror or e}") from None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def parse_when(text: str, option: str) -> datetime:
    """Parse an ISO 8601 date or date-time leniently into an aware UTC datetime.

    Accepts ``2027-01-01`` (midnight UTC), ``2027-01-01T12:00:00Z``, offsets such as
    ``+02:00``, and fractions of a second. A time without an offset is taken as UTC.
    """
    s = text.strip()
    if s[-1:] in ("z", "Z"):
        s = s[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        try:
            moment = datetime.combine(date.fromisoformat(s), datetime.min.time())
        except ValueError:
            raise ConfigError(
                f"{option} {text!r} is not an ISO 8601 date or time; give e.g. 2027-01-01, "
                "2027-01-01T12:00:00Z or 2027-01-01T12:00:00+02:00"
            ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00:00-05:00 is past year 9999 in UTC
        raise ConfigError(f"{option} {text!r} is out of range in UTC; give a time between "
                          "0001-01-02 and 9999-12-30") from None


def _stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _passphrase(*, confirm: bool) -> bytes:
    """The key passphrase: from ``$FEDPREF_KEY_PASSPHRASE``, else a hidden prompt (on stderr)."""
    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        if not value:
            raise ConfigError(f"{PASSPHRASE_ENV} is set but empty; set it to the key passphrase, or unset it to be prompted")
        return value.encode("utf-8")
    if not _stdin_is_tty():
        raise ConfigError(f"no key passphrase: set {PASSPHRASE_ENV}, or run the command in a terminal to be prompted")
    text = typer.prompt("Key passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    return str(text).encode("utf-8")


def _read_capped(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (the verifier rejects anything over ``limit``)."""
    with open(path, "rb") as fh:
        return fh.read(limit + 1)


def _short_id(kid: str) -> str:
    return kid[:16]


def _signer_range(n: int) -> str:
    return "signer-1.pem" if n == 1 else f"signer-1.pem .. signer-{n}.pem"


def _ids(kids: Any) -> str:
    return ", ".join(_short_id(k) for k in sorted(kids)) or "none"


# --- the key folder -------------------------------------------------------------------------


def _keys_dir(home: Path) -> Path:
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
        return _read_capped(path, MAX_ROOT_SIZE)
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
    """``root-v<version>.json`` (kept for the chain), then ``root.json`` (the commit point)."""
    write_bytes_atomic(kdir / f"root-v{version}.json", root_bytes)
    write_bytes_atomic(kdir / ROOT_FILE, root_bytes)


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
            raise KeyFileError(f"{path} (key {_short_id(kid)}) is not a key of trust root v{root.version} "
                               f"in {kdir / ROOT_FILE}; remove it or restore the matching root")
        if kid in loaded:
            raise KeyFileError(f"{path} holds the same key as another signer file; remove the copy")
        loaded[kid] = key
    if len(loaded) < want:
        what = f"no signing key at {missing[0]}: " if missing else ""
        raise KeyFileError(f"{what}found {len(loaded)} of the {want} signing key(s) that trust root "
                           f"v{root.version}'s threshold needs in {kdir}; restore the key files from a backup")
    return loaded


def _finish_rotation(kdir: Path) -> None:
    """Finish (or roll back) a ``keys rotate`` that was interrupted.

    ``keys rotate`` writes the new keys to ``.next-v<W>/`` with a ``root.json`` marker, then
    commits by replacing ``root.json``; only then does it archive the old keys in
    ``retired-v<W-1>/`` (and drop the marker) and move the new keys in. Rerunning these steps
    is safe; a staged rotation whose root was never committed is deleted.
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


def _check_signers_threshold(signers: int, threshold: int) -> None:
    if not 1 <= signers <= _MAX_SIGNERS:
        raise ConfigError(f"--signers={signers} is invalid; give 1 to {_MAX_SIGNERS} keys")
    if not 1 <= threshold <= signers:
        raise ConfigError(f"--threshold={threshold} is invalid; give 1 to --signers ({signers})")


_MAX_DAYS = 36_500  # a trust root valid for 100 years is already a key that is never rotated


def _check_days(days: int) -> None:
    if not 1 <= days <= _MAX_DAYS:
        raise ConfigError(f"--expires-days={days} is invalid; give 1 to {_MAX_DAYS} days (rotate keys before then)")


# --- keys -----------------------------------------------------------------------------------


@keys_app.command("init")
def keys_init(
    home: Home,
    signers: Annotated[int, typer.Option("--signers", help="How many signing keys (n) to create.")] = 1,
    threshold: Annotated[int | None, typer.Option(
        "--threshold", help="How many of the n keys must sign (k). Default: a majority.")] = None,
    expires_days: ExpiresDays = 365,
) -> None:
    """Create n encrypted signing keys and the first trust root (v1, k of n) in DIR/keys."""
    with _errors():
        k = signers // 2 + 1 if threshold is None else threshold
        _check_signers_threshold(signers, k)
        _check_days(expires_days)
        kdir = _keys_dir(home)

        def refuse_existing() -> None:
            if existing := _existing_keys(kdir):
                raise ConfigError(f"{kdir} already holds keys ({', '.join(existing[:3])}); refusing to overwrite "
                                  f"them. Use `fedpref-server keys rotate --home {home}` to replace them, or another --home")

        refuse_existing()  # before asking for a passphrase
        passphrase = _passphrase(confirm=True)
        now = _now()
        keys = [generate_signing_key() for _ in range(signers)]
        body = make_root_body(keys, k, expires=now + timedelta(days=expires_days), version=1)
        root_bytes = sign_root(body, keys)
        root = load_root(root_bytes, now=now)
        kdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _locked(kdir):
            refuse_existing()
            for i, key in enumerate(keys, start=1):
                save_private_key(kdir / f"signer-{i}.pem", key, passphrase)
            _write_root_copies(kdir, root_bytes, root.version)
    typer.echo(f"created {signers} signing key(s) in {kdir}: {_signer_range(signers)} "
               "(passphrase-encrypted, mode 0600)")
    typer.echo(f"trust root v1: threshold {k} of {signers}, expires {format_rfc3339(root.expires)}, "
               f"keys {_ids(root.keys)}")
    typer.echo(f"give {kdir / ROOT_FILE} to clients; keep the signer-*.pem files and the passphrase secret")


@keys_app.command("rotate")
def keys_rotate(
    home: Home,
    signers: Annotated[int | None, typer.Option(
        "--signers", help="How many new keys (n). Default: as many as the current root has.")] = None,
    threshold: Annotated[int | None, typer.Option(
        "--threshold", help="New k. Default: the current threshold (a majority if that exceeds n).")] = None,
    expires_days: ExpiresDays = 365,
) -> None:
    """Replace every signing key: the next root (version + 1) is signed by the old keys and the new.

    The old keys are archived in DIR/keys/retired-v<old version>/; every root stays in
    DIR/keys/root-v<N>.json so clients can follow the chain.
    """
    with _errors():
        _check_days(expires_days)
        kdir = _keys_dir(home)
        with _locked(kdir):
            _finish_rotation(kdir)
            old = _read_root(kdir / ROOT_FILE)
            n = len(old.keys) if signers is None else signers
            k = threshold if threshold is not None else (old.threshold if old.threshold <= n else n // 2 + 1)
            _check_signers_threshold(n, k)
            passphrase = _passphrase(confirm=False)
            old_signers = _load_signers(kdir, old, passphrase, need=None)
            now = _now()
            new_keys = [generate_signing_key() for _ in range(n)]
            body = make_root_body(new_keys, k, expires=now + timedelta(days=expires_days), version=old.version + 1)
            new_bytes = rotate_root(old, body, old_signers.values(), new_keys)  # checked with update_root
            new = update_root(old, new_bytes, now=now)

            stage = kdir / f".next-v{new.version}"
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir(mode=0o700)
            for i, key in enumerate(new_keys, start=1):
                save_private_key(stage / f"signer-{i}.pem", key, passphrase)
            write_bytes_atomic(stage / ROOT_FILE, new_bytes)  # marker: the staged keys are complete
            if not (kdir / f"root-v{old.version}.json").exists():
                write_bytes_atomic(kdir / f"root-v{old.version}.json", old.raw)
            _write_root_copies(kdir, new_bytes, new.version)  # commit point: root.json
            _finish_rotation(kdir)

    removed, added = set(old.keys) - set(new.keys), set(new.keys) - set(old.keys)
    typer.echo(f"rotated trust root v{old.version} -> v{new.version} ({kdir / ROOT_FILE})")
    typer.echo(f"  threshold: {old.threshold} of {len(old.keys)} -> {new.threshold} of {len(new.keys)}")
    typer.echo(f"  removed keys: {_ids(removed)} (archived in {kdir / f'retired-v{old.version}'})")
    typer.echo(f"  added keys:   {_ids(added)} ({_signer_range(n)})")
    typer.echo(f"  signed by {len(old_signers)} old and {len(new_keys)} new keys; "
               f"expires {format_rfc3339(new.expires)}")
    typer.echo(f"  previous root kept as {kdir / f'root-v{old.version}.json'}; a client that trusts "
               f"v{old.version} follows root-v{new.version}.json; policies signed by the removed keys "
               "are no longer accepted")


# --- policy build -----------------------------------------------------------------------------


def _progress_bar() -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _quiet_transformers() -> None:
    """No loading bars or load reports from transformers: stderr is for our one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "n/a"


@policy_app.command("build")
def policy_build(
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL: {\"text\": ..., \"category\": \"safe\" | <unsafe category>}.",
                                       metavar="FILE.jsonl")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write (new, or a previous bundle).",
                                      metavar="BUNDLE_DIR")],
    backbone: Annotated[str | None, typer.Option(
        "--backbone", help="Local backbone folder. Default: the bundled MiniLM.", metavar="PATH")] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Flag a category at or above this probability, in (0, 1).")] = 0.5,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per text.")] = 96,
    seed: Annotated[int, typer.Option("--seed", help="Validation split and training seed.")] = 0,
) -> None:
    """Train the safety classifier on the frozen backbone and write an unsigned bundle folder."""
    with _errors():
        from fedpref.safety_policy.classifier import CLASSIFIER_FILE, build_bundle, load_labelled_jsonl

        if max_length < 8:
            raise ConfigError(f"--max-length={max_length} is invalid; give at least 8 tokens")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a bundle folder")
        if out.is_dir():
            stray = sorted(set(os.listdir(out)) - {"manifest.json", CLASSIFIER_FILE})
            if stray:
                raise ConfigError(f"--out {out} holds other entries {stray[:3]}; give a new or empty folder")
        records = load_labelled_jsonl(data)  # data errors (FILE:LINE) before the backbone loads
        _quiet_transformers()
        with _progress_bar() as bar:
            task = bar.add_task("embedding texts", total=len(records))
            manifest = build_bundle(records, out, backbone=backbone, max_length=max_length, threshold=threshold,
                                    seed=seed, progress=lambda k: bar.advance(task, k))
    training = manifest["classifier"].get("training", {})
    cats = [c["name"] for c in manifest["categories"]]
    typer.echo(f"built unsigned bundle {out}: {manifest['name']}, {len(cats)} unsafe categories "
               f"({', '.join(cats)}) at threshold {threshold:g}, backbone sha256 {manifest['backbone_sha256'][:16]}...")
    examples = training.get("examples", {})
    typer.echo("  examples: " + ", ".join(f"{c} {n}" for c, n in examples.items()))
    val = training.get("validation")
    if val:
        typer.echo(f"  validation ({val['examples']} held out): accuracy {_fmt(val['accuracy'])}, "
                   f"unsafe recall {_fmt(val.get('flagged_any_unsafe_recall'))}, "
                   f"safe false-positive rate {_fmt(val.get('safe_false_positive_rate'))}")
        typer.echo("  recall by category: " + ", ".join(f"{c} {_fmt(r)}" for c, r in val.get("recall", {}).items()))
    typer.echo(f"next: fedpref-server policy sign {out} --home DIR --version N --expires YYYY-MM-DD "
               "--out policy.dsse.json")


# --- basis build ------------------------------------------------------------------------------
basis_app = typer.Typer(
    rich_markup_mode=None,  # plain help: "[federation] rounds" must not vanish as rich markup
    help="The public attribute basis the devices' personal heads read (model/basis.py).",
    no_args_is_help=True,
)


@basis_app.command("build")
def basis_build(
    data: Annotated[Path, typer.Option("--data", metavar="FILE.jsonl", help=(
        'Public labelled texts: {"text": ..., "attributes": {"formal": 1, "emoji": -1, ...}} per line.'))],
    out: Annotated[Path, typer.Option("--out", metavar="BASIS.safetensors", help="The basis file to write.")],
    backbone: Annotated[str | None, typer.Option(
        "--backbone", help="Local backbone folder. Default: the bundled MiniLM.", metavar="PATH")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per text (the config's [model] max_length).")] = 96,
    ridge: Annotated[float, typer.Option("--ridge", help="The probes' L2 penalty.")] = 10.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split.")] = 0,
) -> None:
    """Fit one ridge probe per attribute on the frozen backbone and write the basis file."""
    with _errors():
        from fedpref.model.basis import build_basis, load_attribute_corpus, save_basis

        if max_length < 8:
            raise ConfigError(f"--max-length={max_length} is invalid; give at least 8 tokens")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file path, e.g. ops/basis.safetensors")
        records = load_attribute_corpus(data)  # data errors (FILE:LINE) before the backbone loads
        labels = list(records[0]["attributes"])
        _quiet_transformers()
        with _progress_bar() as bar:
            task = bar.add_task("embedding texts", total=len(records))
            weight, holdout = build_basis(records, backbone=backbone, max_length=max_length, ridge=ridge, seed=seed,
                                          progress=lambda k: bar.advance(task, k))
        sha = save_basis(out, weight, labels, source=str(data))
    typer.echo(f"wrote {out}: {len(labels)} attribute probes ({', '.join(labels)}) on {len(records)} texts, sha256 {sha[:16]}...")
    if holdout:
        typer.echo("  held-out sign accuracy: " + ", ".join(f"{n} {_fmt(v)}" for n, v in holdout.items()))
    typer.echo(f"next: in config.toml [model.adapter] set personal_dims = {len(labels)} and attribute_basis = "
               f"\"{out.absolute()}\"; give the file to devices (`fedpref-agent init --basis`)")


# --- policy sign ------------------------------------------------------------------------------


@policy_app.command("sign")
def policy_sign(
    bundle: Annotated[Path, typer.Argument(exists=True, file_okay=False, dir_okay=True, metavar="BUNDLE_DIR",
                                           help="Bundle folder written by `policy build`.")],
    home: Home,
    version: Annotated[int, typer.Option("--version", help="Policy version; must exceed every version clients have installed.")],
    expires: Annotated[str, typer.Option("--expires", metavar="ISO8601",
                                         help="Expiry, e.g. 2027-01-01 or 2027-01-01T00:00:00+02:00 (no offset: UTC).")],
    out: Annotated[Path, typer.Option("--out", metavar="ENVELOPE", help="Signed envelope file to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out file.")] = False,
) -> None:
    """Sign a bundle with a threshold of DIR's keys into one DSSE envelope (checked before writing)."""
    with _errors():
        now = _now()
        if version < 1:
            raise ConfigError(f"--version={version} is invalid; give an integer >= 1")
        expires_at = parse_when(expires, "--expires")
        if expires_at <= now:
            raise ConfigError(f"--expires {expires!r} ({format_rfc3339(expires_at)}) is not in the future "
                              f"(now {format_rfc3339(now)}); give a later date")
        if out.exists() and not force:
            raise ConfigError(f"--out {out} already exists; give a new file name or --force to overwrite it")
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; give a file name")
        manifest, files = read_bundle_dir(bundle)
        kdir = _keys_dir(home)
        with _locked(kdir):
            _finish_rotation(kdir)
            root = _read_root(kdir / ROOT_FILE)
            try:
                root.check_not_expired(now)
            except ExpiredRootError as e:
                raise ExpiredRootError(f"{kdir / ROOT_FILE}: {e}; run `fedpref-server keys rotate --home {home}`") from None
            passphrase = _passphrase(confirm=False)
            signers = _load_signers(kdir, root, passphrase, need=root.threshold)
            envelope = sign_policy(manifest, files, signers.values(), version=version, issued_at=now,
                                   expires_at=expires_at)
            try:  # what every client will do; nothing is written unless it passes
                policy = verify_envelope(envelope, root, last_version=version - 1, now=now)
            except PolicyError as e:
                raise type(e)(f"the signed policy would be rejected, nothing written: {e}") from None
        write_bytes_atomic(out, envelope)
    typer.echo(f"signed {policy.name} v{policy.version} with {len(policy.signed_by)} of {len(root.keys)} keys "
               f"(threshold {root.threshold}, root v{root.version}): {out}")
    typer.echo(f"  issued {format_rfc3339(policy.issued_at)}, expires {format_rfc3339(policy.expires_at)}, "
               f"envelope sha256 {policy.envelope_sha256}")
    if policy.expires_at > root.expires:
        typer.echo(f"warning: the policy expires after trust root v{root.version} ({format_rfc3339(root.expires)}); "
                   "clients reject it from then on unless you rotate the keys first", err=True)


# --- policy verify / show ---------------------------------------------------------------------


def _verify_file(envelope: Path, roots: list[Path], *, min_version: int, now: datetime,
                 backbone_sha256: str | None) -> tuple[Policy, TrustRoot]:
    if min_version < 1:
        raise ConfigError(f"--min-version={min_version} is invalid; give an integer >= 1")
    if backbone_sha256 is not None and not _HEX64.fullmatch(backbone_sha256):
        raise ConfigError(f"--backbone-sha256 {short(backbone_sha256)} is invalid; give 64 hex digits")
    if not roots:
        raise ConfigError("give the trust root with --root ROOT.json")
    root = _read_root_chain(roots)
    data = _read_capped(envelope, MAX_ENVELOPE_SIZE)
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


RootHelp = ("Trust root to verify against. Repeat to follow a chain: the first is trusted, each next one must "
            "be signed by the keys of the one before and its own (--root root-v1.json --root root-v2.json).")
EnvelopeArg = Annotated[Path, typer.Argument(exists=True, file_okay=True, dir_okay=False, metavar="ENVELOPE",
                                             help="Signed policy envelope (DSSE JSON).")]
NowOpt = Annotated[str | None, typer.Option(
    "--now", metavar="ISO8601", help="Check expiry at this time instead of the clock (no offset: UTC).")]


@policy_app.command("verify")
def policy_verify(
    envelope: EnvelopeArg,
    root: Annotated[list[Path], typer.Option("--root", metavar="ROOT.json", help=RootHelp)],
    min_version: Annotated[int, typer.Option("--min-version", help="Accept only version >= N (rollback guard).")] = 1,
    now: NowOpt = None,
    backbone_sha256: Annotated[str | None, typer.Option(
        "--backbone-sha256", metavar="HEX", help="Require the policy to be built for this backbone.")] = None,
    as_json: AsJson = False,
) -> None:
    """Verify ENVELOPE exactly as a client does: exit 0 and one "OK" line, or a documented code."""
    with _errors():
        when = parse_when(now, "--now") if now is not None else _now()
        policy, trust = _verify_file(envelope, root, min_version=min_version, now=when,
                                     backbone_sha256=backbone_sha256)
    if as_json:
        typer.echo(json.dumps({"verified": True, "envelope": str(envelope), "root_version": trust.version,
                               **policy.manifest_summary()}))
        return
    cats = ", ".join(c.name for c in policy.categories)
    typer.echo(f"OK {envelope}: {policy.name} v{policy.version}, expires {format_rfc3339(policy.expires_at)}, "
               f"signed by {len(policy.signed_by)} key(s) (threshold {trust.threshold} of root v{trust.version}), "
               f"categories {cats}")


def _unverified_summary(data: bytes) -> dict[str, Any]:
    """What the envelope claims, parsed without any signature check (for display only)."""
    import hashlib

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


@policy_app.command("show")
def policy_show(
    envelope: EnvelopeArg,
    root: Annotated[list[Path] | None, typer.Option(
        "--root", metavar="ROOT.json", help="Verify first, as `policy verify` does; without it nothing is verified.")] = None,
    now: NowOpt = None,
    as_json: AsJson = False,
) -> None:
    """Print what ENVELOPE contains. Without --root the output is UNVERIFIED: signatures are not checked."""
    with _errors():
        if root:
            when = parse_when(now, "--now") if now is not None else _now()
            policy, trust = _verify_file(envelope, root, min_version=1, now=when, backbone_sha256=None)
            summary: dict[str, Any] = {"verified": True, "root": str(root[-1]), "root_version": trust.version,
                                       **policy.manifest_summary(),
                                       "training": policy.classifier_dict().get("training")}
            banner = (f"VERIFIED against trust root v{trust.version} ({root[-1]}): signed by "
                      f"{len(policy.signed_by)} key(s), threshold {trust.threshold}")
        else:
            try:
                summary = {"verified": False, **_unverified_summary(_read_capped(envelope, MAX_ENVELOPE_SIZE))}
            except PolicyError as e:
                raise type(e)(f"{envelope}: {e}") from None
            banner = "UNVERIFIED: signatures not checked; give --root ROOT.json (or run `policy verify`) to verify"
    if as_json:
        typer.echo(json.dumps({"envelope": str(envelope), **summary}))
        return
    _print_summary(envelope, banner, summary)


def _print_summary(envelope: Path, banner: str, s: dict[str, Any]) -> None:
    echo: Callable[[str], None] = typer.echo
    echo(banner)
    echo(f"envelope:    {envelope} (sha256 {s['envelope_sha256']})")
    echo(f"policy:      {s['name']} v{s['version']}")
    echo(f"issued_at:   {s['issued_at']}")
    echo(f"expires_at:  {s['expires_at']}")
    echo(f"backbone:    sha256 {s['backbone_sha256']}")
    echo("categories:  " + ", ".join(f"{c['name']} (>= {c['threshold']:g})" for c in s["categories"]))
    echo("files:       " + ", ".join(f"{n} ({size} bytes)" for n, size in s["files"].items())
         + (f"; {s['files_check']}" if "files_check" in s else ""))
    if s["verified"]:
        echo(f"signed by:   {_ids(s['signed_by'])}")
    else:
        echo(f"signatures:  {len(s['signature_keyid_hints'])} (key id hints, unchecked: "
             f"{_ids(h for h in s['signature_keyid_hints'] if h)})")
    training = s.get("training")  # unsigned, free-form: shown only when it has the expected shape
    val = training.get("validation") if isinstance(training, dict) else None
    if isinstance(val, dict):
        echo(f"validation:  accuracy {_fmt(val.get('accuracy'))}, unsafe recall "
             f"{_fmt(val.get('flagged_any_unsafe_recall'))}, safe false-positive rate "
             f"{_fmt(val.get('safe_false_positive_rate'))} ({val.get('examples')} held out)")
