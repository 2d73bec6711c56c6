"""DSSE v1 envelopes signed with Ed25519 (https://github.com/secure-systems-lab/dsse).

An envelope is the JSON object::

    {"payload": <base64>, "payloadType": <str>, "signatures": [{"keyid": <str>, "sig": <base64>}]}

Each signature is Ed25519 over ``PAE(payloadType, payload)``, the exact payload bytes: there is
no JSON canonicalization anywhere. Base64 may use the standard or the URL-safe alphabet (as
DSSE allows), must be padded, and must be canonical (re-encoding gives the same text).

Key ids are hints, never proofs. :func:`verify_signatures` only tries the trusted key whose id
matches (every trusted key when the id is empty), and counts each distinct public key at most
once, however many entries or ids carry it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedpref.common.errors import ConfigError
from fedpref.safety_policy.errors import (
    DuplicateKeyError,
    EnvelopeTooLargeError,
    MalformedEnvelopeError,
    PolicyError,
    RevokedKeyError,
    SignatureThresholdError,
    UntrustedKeyError,
    short,
)

__all__ = [
    "MAX_SIGNATURES",
    "Envelope",
    "Signature",
    "b64decode_strict",
    "keyid",
    "pae",
    "parse_envelope",
    "public_key_bytes",
    "sign_envelope",
    "strict_json_loads",
    "verify_signatures",
]

MAX_SIGNATURES = 16
"""Most signature entries an envelope may carry (bounds verification work)."""

_MAX_KEYID_LEN = 128
_ED25519_SIG_LEN = 64
_STD_ONLY = frozenset("+/")
_URL_ONLY = frozenset("-_")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, where LEN is the ASCII decimal
    byte length and ``type`` is UTF-8 encoded.
    """
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key of ``key`` (a private key gives its public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def keyid(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Key id: lowercase hex sha256 of the raw 32-byte public key."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()


# --- strict decoding ----------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON member {short(key)}")
        out[key] = value
    return out


def strict_json_loads(data: bytes, error: type[PolicyError], what: str) -> Any:
    """Parse UTF-8 JSON strictly: no duplicate members, no NaN/Infinity.

    Every failure (including absurd nesting) raises ``error`` naming ``what``.
    """
    try:
        text = data.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise error(f"{what}: not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise error(f"{what}: invalid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None


def b64decode_strict(text: object, error: type[PolicyError], what: str) -> bytes:
    """Decode padded, canonical base64 in the standard or the URL-safe alphabet.

    Mixed alphabets, missing padding, stray characters and non-zero trailing bits (any text
    that re-encoding would not reproduce) raise ``error`` naming ``what``.
    """
    if not isinstance(text, str):
        raise error(f"{what}: expected a base64 string, got {type(text).__name__}")
    chars = set(text)
    url_safe = bool(chars & _URL_ONLY)
    if url_safe and chars & _STD_ONLY:
        raise error(f"{what}: mixed base64 alphabets")
    std_text = text.translate(str.maketrans("-_", "+/")) if url_safe else text
    try:
        raw = base64.b64decode(std_text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise error(f"{what}: invalid base64") from None
    again = base64.urlsafe_b64encode(raw) if url_safe else base64.b64encode(raw)
    if again.decode("ascii") != text:
        raise error(f"{what}: non-canonical base64")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- envelopes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """One DSSE signature entry: an unauthenticated key-id hint and 64 signature bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed (not yet verified) DSSE envelope."""

    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        """Serialize as compact JSON with standard base64 (the form :func:`sign_envelope` emits)."""
        doc = {
            "payload": _b64(self.payload),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": s.keyid, "sig": _b64(s.sig)} for s in self.signatures],
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sign_envelope(payload: bytes, payload_type: str, signers: Iterable[Ed25519PrivateKey]) -> bytes:
    """Sign ``payload`` (exact bytes) with each signer; return the envelope JSON bytes.

    Raises :class:`~fedpref.common.errors.ConfigError` for no signers, a signer listed twice,
    or a non-Ed25519 key.
    """
    if not isinstance(payload, bytes):
        raise ConfigError(f"payload must be bytes, got {type(payload).__name__}")
    if not isinstance(payload_type, str) or not payload_type:
        raise ConfigError("payload_type must be a non-empty string")
    message = pae(payload_type, payload)
    signatures: list[Signature] = []
    seen: set[str] = set()
    for signer in signers:
        if not isinstance(signer, Ed25519PrivateKey):
            raise ConfigError(f"signers must be Ed25519PrivateKey, got {type(signer).__name__}")
        kid = keyid(signer)
        if kid in seen:
            raise ConfigError(f"signer {kid[:16]}... is listed twice; each key signs once")
        seen.add(kid)
        signatures.append(Signature(kid, signer.sign(message)))
    if not signatures:
        raise ConfigError("at least one signer is required")
    return Envelope(payload, payload_type, tuple(signatures)).to_bytes()


def _require_members(obj: object, required: set[str], optional: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedEnvelopeError(f"{what}: expected a JSON object")
    missing = required - obj.keys()
    if missing:
        raise MalformedEnvelopeError(f"{what}: missing {sorted(missing)}")
    unknown = obj.keys() - required - optional
    if unknown:
        raise MalformedEnvelopeError(f"{what}: unknown member {short(sorted(unknown)[0])}")
    return obj


def parse_envelope(data: bytes, *, max_size: int) -> Envelope:
    """Parse envelope bytes strictly. Checks the size first, before reading anything else.

    Raises :class:`EnvelopeTooLargeError` or :class:`MalformedEnvelopeError`. Verifies no
    signature: see :func:`verify_signatures`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedEnvelopeError(f"envelope: expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise EnvelopeTooLargeError(f"envelope is {len(data)} bytes, limit {max_size}")
    doc = _require_members(
        strict_json_loads(bytes(data), MalformedEnvelopeError, "envelope"),
        {"payload", "payloadType", "signatures"},
        set(),
        "envelope",
    )
    payload = b64decode_strict(doc["payload"], MalformedEnvelopeError, "envelope payload")
    payload_type = doc["payloadType"]
    if not isinstance(payload_type, str) or not payload_type:
        raise MalformedEnvelopeError("envelope payloadType: expected a non-empty string")
    entries = doc["signatures"]
    if not isinstance(entries, list) or not entries:
        raise MalformedEnvelopeError("envelope signatures: expected a non-empty list")
    if len(entries) > MAX_SIGNATURES:
        raise MalformedEnvelopeError(f"envelope has {len(entries)} signatures, limit {MAX_SIGNATURES}")
    signatures = []
    for i, entry in enumerate(entries):
        entry = _require_members(entry, {"sig"}, {"keyid"}, f"signature {i}")
        kid = entry.get("keyid", "")
        if not isinstance(kid, str) or len(kid) > _MAX_KEYID_LEN:
            raise MalformedEnvelopeError(f"signature {i} keyid: expected a string of <= {_MAX_KEYID_LEN} chars")
        sig = b64decode_strict(entry["sig"], MalformedEnvelopeError, f"signature {i} sig")
        if len(sig) != _ED25519_SIG_LEN:
            raise MalformedEnvelopeError(f"signature {i} is {len(sig)} bytes; Ed25519 needs {_ED25519_SIG_LEN}")
        signatures.append(Signature(kid, sig))
    return Envelope(payload, payload_type, tuple(signatures))


def verify_signatures(
    envelope: Envelope,
    keys: Mapping[str, Ed25519PublicKey],
    threshold: int,
    *,
    revoked: Iterable[str] = (),
    what: str = "envelope",
) -> tuple[str, ...]:
    """Check that at least ``threshold`` distinct keys of ``keys`` signed ``envelope``.

    ``keys`` maps key id -> trusted public key. A signature entry is tried only against the
    key its id names (against every key when the id is empty); a key counts once, identified
    by its raw public bytes, whatever id it appears under. Returns the key ids that counted.

    Raises :class:`SignatureThresholdError`, or the subclass naming the most telling reason:
    :class:`DuplicateKeyError`, :class:`RevokedKeyError`, :class:`UntrustedKeyError`.
    """
    if threshold < 1:
        raise ConfigError(f"threshold must be >= 1, got {threshold}")
    message = pae(envelope.payload_type, envelope.payload)
    revoked_ids = frozenset(revoked)
    counted: dict[bytes, str] = {}
    duplicate = invalid = untrusted = revoked_hits = 0
    for entry in envelope.signatures:
        if entry.keyid:
            candidates = [(entry.keyid, keys[entry.keyid])] if entry.keyid in keys else []
            if not candidates:
                if entry.keyid in revoked_ids:
                    revoked_hits += 1
                else:
                    untrusted += 1
                continue
        else:
            candidates = sorted(keys.items())
        for kid, public in candidates:
            try:
                public.verify(entry.sig, message)
            except InvalidSignature:
                continue
            raw = public_key_bytes(public)
            if raw in counted:
                duplicate += 1
            else:
                counted[raw] = kid
            break
        else:
            invalid += 1
    if len(counted) >= threshold:
        return tuple(counted.values())
    detail = (
        f"{what}: {len(counted)} of {threshold} required signatures from distinct trusted keys "
        f"({invalid} invalid, {duplicate} duplicate, {untrusted} untrusted, {revoked_hits} revoked)"
    )
    if duplicate:
        raise DuplicateKeyError(detail)
    if revoked_hits:
        raise RevokedKeyError(detail)
    if untrusted:
        raise UntrustedKeyError(detail)
    raise SignatureThresholdError(detail)
