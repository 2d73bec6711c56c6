"""``fedpref-server keys ...`` and ``fedpref-server policy ...``: the operator's signing workflow.

A shell round trip::

    export FEDPREF_KEY_PASSPHRASE=...            # or be prompted (hidden, with confirmation)
    fedpref-server keys init --home ops --signers 3 --threshold 2
    fedpref-server policy build --data safety.jsonl --out bundle/
    fedpref-server policy sign bundle/ --home ops --version 1 --expires 2027-01-01 --out policy.dsse.json
    fedpref-server policy verify policy.dsse.json --root ops/keys/root.json
    fedpref-server keys rotate --home ops          # root v2, signed by old and new keys

The key folder ``DIR/keys`` and the operations on it (creation, rotation, signing, verifying)
are :mod:`fedpref.server.keys`; this module parses the command line, calls one of them and
prints.

Every command here reuses :mod:`fedpref.safety_policy` for all cryptography. Every failure is
one line on stderr and a documented exit code (``fedpref-server exit-codes``), no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

from fedpref.common.errors import ConfigError
from fedpref.common.exit_codes import exit_on_error
from fedpref.safety_policy import MAX_ENVELOPE_SIZE, PolicyError, format_rfc3339
from fedpref.server import keys
from fedpref.server.keys import ROOT_FILE, keys_dir, now_utc, read_capped, short_id
from fedpref.server.progress import progress_bar

__all__ = ["PASSPHRASE_ENV", "keys_app", "parse_when", "policy_app"]

PASSPHRASE_ENV = "FEDPREF_KEY_PASSPHRASE"
HOME_ENV = "FEDPREF_HOME"

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


def _signer_range(n: int) -> str:
    return "signer-1.pem" if n == 1 else f"signer-1.pem .. signer-{n}.pem"


def _ids(kids: Any) -> str:
    return ", ".join(short_id(k) for k in sorted(kids)) or "none"


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
        root = keys.init_keys(home, signers=signers, threshold=threshold, expires_days=expires_days,
                              passphrase=lambda: _passphrase(confirm=True))
    kdir = keys_dir(home)
    typer.echo(f"created {signers} signing key(s) in {kdir}: {_signer_range(signers)} "
               "(passphrase-encrypted, mode 0600)")
    typer.echo(f"trust root v1: threshold {root.threshold} of {signers}, expires {format_rfc3339(root.expires)}, "
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
        r = keys.rotate_keys(home, signers=signers, threshold=threshold, expires_days=expires_days,
                             passphrase=lambda: _passphrase(confirm=False))
    old, new, kdir = r.old, r.new, keys_dir(home)
    removed, added = set(old.keys) - set(new.keys), set(new.keys) - set(old.keys)
    typer.echo(f"rotated trust root v{old.version} -> v{new.version} ({kdir / ROOT_FILE})")
    typer.echo(f"  threshold: {old.threshold} of {len(old.keys)} -> {new.threshold} of {len(new.keys)}")
    typer.echo(f"  removed keys: {_ids(removed)} (archived in {kdir / f'retired-v{old.version}'})")
    typer.echo(f"  added keys:   {_ids(added)} ({_signer_range(len(new.keys))})")
    typer.echo(f"  signed by {r.old_signers} old and {len(new.keys)} new keys; "
               f"expires {format_rfc3339(new.expires)}")
    typer.echo(f"  previous root kept as {kdir / f'root-v{old.version}.json'}; a client that trusts "
               f"v{old.version} follows root-v{new.version}.json; policies signed by the removed keys "
               "are no longer accepted")


# --- policy build -----------------------------------------------------------------------------


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
        with progress_bar() as bar:
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
        with progress_bar() as bar:
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
        now = now_utc()
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
        policy, root = keys.sign_bundle(bundle, home, version=version, expires_at=expires_at, out=out,
                                        passphrase=lambda: _passphrase(confirm=False), now=now)
    typer.echo(f"signed {policy.name} v{policy.version} with {len(policy.signed_by)} of {len(root.keys)} keys "
               f"(threshold {root.threshold}, root v{root.version}): {out}")
    typer.echo(f"  issued {format_rfc3339(policy.issued_at)}, expires {format_rfc3339(policy.expires_at)}, "
               f"envelope sha256 {policy.envelope_sha256}")
    if policy.expires_at > root.expires:
        typer.echo(f"warning: the policy expires after trust root v{root.version} ({format_rfc3339(root.expires)}); "
                   "clients reject it from then on unless you rotate the keys first", err=True)


# --- policy verify / show ---------------------------------------------------------------------


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
        when = parse_when(now, "--now") if now is not None else now_utc()
        policy, trust = keys.verify_file(envelope, root, min_version=min_version, now=when,
                                     backbone_sha256=backbone_sha256)
    if as_json:
        typer.echo(json.dumps({"verified": True, "envelope": str(envelope), "root_version": trust.version,
                               **policy.manifest_summary()}))
        return
    cats = ", ".join(c.name for c in policy.categories)
    typer.echo(f"OK {envelope}: {policy.name} v{policy.version}, expires {format_rfc3339(policy.expires_at)}, "
               f"signed by {len(policy.signed_by)} key(s) (threshold {trust.threshold} of root v{trust.version}), "
               f"categories {cats}")


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
            when = parse_when(now, "--now") if now is not None else now_utc()
            policy, trust = keys.verify_file(envelope, root, min_version=1, now=when, backbone_sha256=None)
            summary: dict[str, Any] = {"verified": True, "root": str(root[-1]), "root_version": trust.version,
                                       **policy.manifest_summary(),
                                       "training": policy.classifier_dict().get("training")}
            banner = (f"VERIFIED against trust root v{trust.version} ({root[-1]}): signed by "
                      f"{len(policy.signed_by)} key(s), threshold {trust.threshold}")
        else:
            try:
                summary = {"verified": False, **keys.unverified_summary(read_capped(envelope, MAX_ENVELOPE_SIZE))}
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
