"""The policy bundle: manifest schema, the signed payload, and on-disk bundle folders.

The envelope payload is one JSON document (signed as exact bytes)::

    {"manifest": {"name": str, "version": int >= 1,
                  "issued_at": "YYYY-MM-DDTHH:MM:SS[.ffffff]Z",
                  "expires_at": "YYYY-MM-DDTHH:MM:SS[.ffffff]Z",
                  "backbone_sha256": <64 lowercase hex>,
                  "categories": [{"name": str, "threshold": number}, ...],
                  "files": {filename: {"sha256": <64 lowercase hex>, "length": int}},
                  "classifier": {...small free-form object...}},
     "files": {filename: <base64>}}

The files travel inside the signed payload, so one envelope file is self-contained. Unknown
members are rejected (the payloadType carries the schema version). Timestamps are UTC with a
literal ``Z``. File names are plain names (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128
characters, not ``manifest.json``, distinct ignoring case) so a bundle folder is flat.

A bundle folder holds ``manifest.json`` (with its ``files`` section) and the files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedpref.common.atomic import write_bytes_atomic as write_file_atomic  # one atomic writer for the project
from fedpref.common.errors import ConfigError
from fedpref.safety_policy.dsse import b64decode_strict, strict_json_loads
from fedpref.safety_policy.errors import (
    ExtraFileError,
    FileHashMismatchError,
    FileMismatchError,
    MalformedPolicyError,
    MissingFileError,
    PolicyError,
    short,
)

__all__ = [
    "MANIFEST_FILENAME",
    "MAX_FILES",
    "POLICY_NAME",
    "POLICY_PAYLOAD_TYPE",
    "build_payload",
    "check_files",
    "file_entry",
    "format_rfc3339",
    "parse_payload",
    "parse_rfc3339",
    "read_bundle_dir",
    "require_aware",
    "sign_policy",
    "validate_manifest",
    "write_bundle_dir",
    "write_file_atomic",
]

POLICY_PAYLOAD_TYPE = "application/vnd.fedpref.safety-policy.v1+json"
POLICY_NAME = "fedpref-safety"
MANIFEST_FILENAME = "manifest.json"
MAX_FILES = 64

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_MANIFEST_KEYS = {
    "name", "version", "issued_at", "expires_at", "backbone_sha256", "categories", "files", "classifier",
}


# --- small helpers shared by the package --------------------------------------------------


def parse_rfc3339(value: object, what: str, error: type[PolicyError] = MalformedPolicyError) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` into an aware UTC datetime, or raise ``error``."""
    if not isinstance(value, str) or not _RFC3339_Z.fullmatch(value):
        raise error(f"{what}: expected an RFC 3339 UTC time like 2030-01-01T00:00:00Z, got {short(value)}")
    try:
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=timezone.utc)
    except ValueError:
        raise error(f"{what}: not a valid date/time {short(value)}") from None


def require_aware(now: object) -> None:
    """Raise ``ConfigError`` unless ``now`` is a timezone-aware datetime (clocks are injected)."""
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ConfigError("now must be a timezone-aware datetime (e.g. datetime.now(timezone.utc))")


def format_rfc3339(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with ``Z`` (microseconds only when non-zero)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError("datetime must be timezone-aware (use datetime.now(timezone.utc))")
    moment = moment.astimezone(timezone.utc)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if moment.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return moment.strftime(fmt)


def file_entry(data: bytes) -> dict[str, Any]:
    """The manifest entry ``{"sha256": hex, "length": int}`` for ``data``."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


# --- schema -------------------------------------------------------------------------------


def _members(obj: object, required: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedPolicyError(f"{what}: expected a JSON object")
    missing = required - obj.keys()
    if missing:
        raise MalformedPolicyError(f"{what}: missing {sorted(missing)}")
    unknown = obj.keys() - required
    if unknown:
        raise MalformedPolicyError(f"{what}: unknown member {short(sorted(unknown)[0])}")
    return obj


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_filenames(names: list[str], what: str) -> None:
    folded: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not _FILENAME.fullmatch(name) or name == MANIFEST_FILENAME:
            raise MalformedPolicyError(f"{what}: bad file name {short(name)}")
        if name.lower() in folded:
            raise MalformedPolicyError(f"{what}: file names {short(name)} collide ignoring case")
        folded.add(name.lower())
    if len(names) > MAX_FILES:
        raise MalformedPolicyError(f"{what}: {len(names)} files, limit {MAX_FILES}")


def validate_manifest(manifest: object) -> dict[str, Any]:
    """Check ``manifest`` (with its ``files`` section) against the schema; return it.

    Raises :class:`MalformedPolicyError` naming the first bad field.
    """
    m = _members(manifest, _MANIFEST_KEYS, "manifest")
    if not isinstance(m["name"], str) or not m["name"] or len(m["name"]) > 128:
        raise MalformedPolicyError("manifest.name: expected a non-empty string of <= 128 chars")
    if not _is_int(m["version"]) or m["version"] < 1:
        raise MalformedPolicyError(f"manifest.version: expected an integer >= 1, got {short(m['version'])}")
    issued = parse_rfc3339(m["issued_at"], "manifest.issued_at")
    expires = parse_rfc3339(m["expires_at"], "manifest.expires_at")
    if expires <= issued:
        raise MalformedPolicyError("manifest: expires_at must be after issued_at")
    if not isinstance(m["backbone_sha256"], str) or not _HEX64.fullmatch(m["backbone_sha256"]):
        raise MalformedPolicyError("manifest.backbone_sha256: expected 64 lowercase hex digits")
    cats = m["categories"]
    if not isinstance(cats, list) or not cats:
        raise MalformedPolicyError("manifest.categories: expected a non-empty list")
    seen: set[str] = set()
    for i, cat in enumerate(cats):
        cat = _members(cat, {"name", "threshold"}, f"manifest.categories[{i}]")
        name, thr = cat["name"], cat["threshold"]
        if not isinstance(name, str) or not name or len(name) > 128 or name in seen:
            raise MalformedPolicyError(f"manifest.categories[{i}].name: expected a new non-empty string")
        seen.add(name)
        # compared, never converted: a 401-digit integer must be refused, not overflow float()
        if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0 < thr < 1:
            raise MalformedPolicyError(f"manifest.categories[{i}].threshold: expected a probability in (0, 1), "
                                       f"got {short(thr)}")
    files = m["files"]
    if not isinstance(files, dict):
        raise MalformedPolicyError("manifest.files: expected a JSON object")
    _check_filenames(list(files), "manifest.files")
    for name, entry in files.items():
        entry = _members(entry, {"sha256", "length"}, f"manifest.files[{name!r}]")
        if not isinstance(entry["sha256"], str) or not _HEX64.fullmatch(entry["sha256"]):
            raise MalformedPolicyError(f"manifest.files[{name!r}].sha256: expected 64 lowercase hex digits")
        if not _is_int(entry["length"]) or entry["length"] < 0:
            raise MalformedPolicyError(f"manifest.files[{name!r}].length: expected an integer >= 0")
    if not isinstance(m["classifier"], dict):
        raise MalformedPolicyError("manifest.classifier: expected a JSON object")
    return m


def check_files(manifest_files: Mapping[str, Mapping[str, Any]], files: Mapping[str, bytes]) -> None:
    """Check ``files`` against the manifest's ``files`` section.

    Raises :class:`MissingFileError`, :class:`ExtraFileError` or :class:`FileHashMismatchError`
    (length or sha256 differs), in that order of precedence, naming the first file in sorted
    order.
    """
    missing = sorted(set(manifest_files) - set(files))
    if missing:
        raise MissingFileError(f"file {short(missing[0])} is listed in the manifest but absent")
    extra = sorted(set(files) - set(manifest_files))
    if extra:
        raise ExtraFileError(f"file {short(extra[0])} is not listed in the manifest")
    for name in sorted(manifest_files):
        entry, data = manifest_files[name], files[name]
        if len(data) != entry["length"]:
            raise FileHashMismatchError(f"file {short(name)}: length {len(data)}, manifest says {entry['length']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise FileHashMismatchError(f"file {short(name)}: sha256 differs from the manifest")


# --- the payload --------------------------------------------------------------------------


def _with_files_section(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    if not isinstance(manifest, Mapping):
        raise MalformedPolicyError("manifest: expected a mapping")
    for name, data in files.items():
        if not isinstance(data, (bytes, bytearray)):
            raise MalformedPolicyError(f"file {short(name)}: expected bytes, got {type(data).__name__}")
    full = dict(manifest)
    computed = {name: file_entry(bytes(data)) for name, data in files.items()}
    if "files" in full:
        check_files(validate_manifest(full)["files"], {k: bytes(v) for k, v in files.items()})
    full["files"] = computed
    return validate_manifest(full)


def build_payload(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> bytes:
    """The payload bytes to sign: ``manifest`` plus a ``files`` section computed from ``files``.

    ``manifest`` may already carry a ``files`` section (e.g. from :func:`read_bundle_dir`); it
    must then match ``files``. Output is compact JSON with sorted keys. Raises
    :class:`MalformedPolicyError` or a :class:`FileMismatchError`.
    """
    full = _with_files_section(manifest, files)
    doc = {
        "manifest": full,
        "files": {name: base64.b64encode(bytes(data)).decode("ascii") for name, data in files.items()},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def parse_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse and schema-check a payload (call only after its signatures are verified).

    Returns ``(manifest, files)``; does not compare files with the manifest (see
    :func:`check_files`). Raises :class:`MalformedPolicyError`.
    """
    doc = _members(strict_json_loads(payload, MalformedPolicyError, "payload"), {"manifest", "files"}, "payload")
    manifest = validate_manifest(doc["manifest"])
    encoded = doc["files"]
    if not isinstance(encoded, dict):
        raise MalformedPolicyError("payload.files: expected a JSON object")
    _check_filenames(list(encoded), "payload.files")
    files = {name: b64decode_strict(text, MalformedPolicyError, f"payload.files[{name!r}]") for name, text in encoded.items()}
    return manifest, files


# --- bundle folders -----------------------------------------------------------------------


def write_bundle_dir(directory: str | os.PathLike[str], manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    """Write ``manifest.json`` (with a computed ``files`` section) and the files into ``directory``.

    Each file is written atomically, ``manifest.json`` last. Refuses (``ConfigError``, before
    writing anything) a folder holding entries other than those about to be written. Returns
    the full manifest.
    """
    full = _with_files_section(manifest, files)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stray = sorted(set(os.listdir(directory)) - set(files) - {MANIFEST_FILENAME})
    if stray:
        raise ConfigError(f"bundle folder {directory} holds unexpected entries {stray[:5]}; use an empty folder")
    for name, data in files.items():
        write_file_atomic(directory / name, bytes(data))
    text = json.dumps(full, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n"
    write_file_atomic(directory / MANIFEST_FILENAME, text.encode("ascii"))
    return full


def read_bundle_dir(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read a bundle folder and check every file against its manifest.

    Returns ``(manifest, files)``. Raises :class:`MissingFileError` (including a missing
    ``manifest.json``), :class:`ExtraFileError`, :class:`FileHashMismatchError`,
    :class:`FileMismatchError` (not a regular file) or :class:`MalformedPolicyError`.
    """
    directory = Path(directory)
    try:
        raw = (directory / MANIFEST_FILENAME).read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{directory / MANIFEST_FILENAME} does not exist") from None
    manifest = validate_manifest(strict_json_loads(raw, MalformedPolicyError, str(directory / MANIFEST_FILENAME)))
    entries = manifest["files"]
    for name in sorted(entries):
        if not os.path.lexists(directory / name):
            raise MissingFileError(f"file {short(name)} is listed in the manifest but absent from {directory}")
    extra = sorted(set(os.listdir(directory)) - set(entries) - {MANIFEST_FILENAME})
    if extra:
        raise ExtraFileError(f"file {short(extra[0])} in {directory} is not listed in the manifest")
    files: dict[str, bytes] = {}
    for name in sorted(entries):
        path = directory / name
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise FileMismatchError(f"{path} is not a regular file")
        if info.st_size != entries[name]["length"]:
            raise FileHashMismatchError(f"file {short(name)}: length {info.st_size}, manifest says {entries[name]['length']}")
        files[name] = path.read_bytes()
    check_files(entries, files)
    return manifest, files


def sign_policy(
    manifest: Mapping[str, Any],
    files: Mapping[str, bytes],
    signers: Any,
    *,
    version: int,
    expires_at: datetime,
    issued_at: datetime,
) -> bytes:
    """The DSSE envelope of ``manifest`` + ``files`` with ``version`` and validity set.

    ``signers`` are Ed25519 private keys (a threshold of the root's). Raises
    :class:`MalformedPolicyError` for a bad manifest or ``expires_at <= issued_at``.
    """
    from fedpref.safety_policy.dsse import sign_envelope

    require_aware(expires_at)
    require_aware(issued_at)
    full = {**dict(manifest), "version": version, "issued_at": format_rfc3339(issued_at),
            "expires_at": format_rfc3339(expires_at)}
    return sign_envelope(build_payload(full, files), POLICY_PAYLOAD_TYPE, signers)
