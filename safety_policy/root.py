"""The trust root: which Ed25519 keys may sign safety policies, and how many must.

Format (our choice): a root is itself a DSSE envelope, payloadType
``application/vnd.fedpref.root.v1+json``, whose payload (exact bytes, no canonicalization) is::

    {"_type": "root", "version": int >= 1, "threshold": k,
     "keys": {keyid: {"keytype": "ed25519", "public": <64 hex>}},
     "expires": "YYYY-MM-DDTHH:MM:SSZ"}

Each ``keyid`` must equal the sha256 of its public key, so one public key appears at most
once; ``1 <= k <= len(keys)``. Unknown members are rejected.

- The first root is trusted on first use (shipped out of band): :func:`load_root` checks that
  it is signed by a threshold of its own keys.
- Root ``N+1`` is accepted only when signed by a threshold of root ``N``'s keys (checked
  before its body is parsed) *and* a threshold of its own keys, with version exactly ``N+1``
  (:func:`update_root`, :func:`follow_root_chain`).
- Revocation: a key absent from the current root is not trusted. Key ids removed by a rotation
  the client followed are remembered in :attr:`TrustRoot.revoked` so errors can say so.
- Expiry: checked when a ``now`` is given, and by the policy verifier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpref.safety_policy.bundle import format_rfc3339, parse_rfc3339, require_aware
from fedpref.safety_policy.dsse import (
    Envelope,
    keyid,
    parse_envelope,
    sign_envelope,
    strict_json_loads,
    verify_signatures,
)
from fedpref.safety_policy.errors import (
    ExpiredRootError,
    MalformedRootError,
    RootRotationError,
    SignatureThresholdError,
    WrongPayloadTypeError,
    short,
)
from fedpref.safety_policy.keys import public_key_from_hex, public_key_hex

__all__ = [
    "MAX_ROOT_SIZE",
    "ROOT_PAYLOAD_TYPE",
    "TrustRoot",
    "follow_root_chain",
    "load_root",
    "make_root_body",
    "rotate_root",
    "sign_root",
    "update_root",
]

ROOT_PAYLOAD_TYPE = "application/vnd.fedpref.root.v1+json"
MAX_ROOT_SIZE = 256 * 1024
_MAX_KEYS = 16


@dataclass(frozen=True)
class TrustRoot:
    """A verified trust root.

    ``keys`` maps key id -> public key hex; ``raw`` is the exact root envelope bytes (what a
    store persists); ``revoked`` holds key ids removed by rotations this client followed.
    """

    version: int
    threshold: int
    keys: Mapping[str, str]
    expires: datetime
    raw: bytes = field(repr=False)
    revoked: frozenset[str] = frozenset()

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> Ed25519 public key, for :func:`~fedpref.safety_policy.dsse.verify_signatures`."""
        return {kid: public_key_from_hex(hexkey) for kid, hexkey in self.keys.items()}

    def check_not_expired(self, now: datetime) -> None:
        """Raise :class:`ExpiredRootError` unless ``expires > now`` (``now`` timezone-aware)."""
        require_aware(now)
        if self.expires <= now:
            raise ExpiredRootError(f"trust root v{self.version} expired at {format_rfc3339(self.expires)}")


def make_root_body(
    public_keys: Iterable[Ed25519PublicKey | Ed25519PrivateKey],
    threshold: int,
    *,
    expires: datetime,
    version: int = 1,
) -> dict[str, Any]:
    """The body of a root trusting ``public_keys`` with a ``threshold``-of-n rule."""
    keys = {keyid(k): {"keytype": "ed25519", "public": public_key_hex(k)} for k in public_keys}
    return {"_type": "root", "version": version, "threshold": threshold, "keys": keys,
            "expires": format_rfc3339(expires)}


def _parse_body(payload: bytes) -> tuple[int, int, dict[str, str], datetime]:
    body = strict_json_loads(payload, MalformedRootError, "root")
    expected = {"_type", "version", "threshold", "keys", "expires"}
    if not isinstance(body, dict) or set(body) != expected:
        raise MalformedRootError(f"root: expected exactly the members {sorted(expected)}")
    if body["_type"] != "root":
        raise MalformedRootError(f"root._type: expected 'root', got {short(body['_type'])}")
    version, threshold, keys = body["version"], body["threshold"], body["keys"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedRootError("root.version: expected an integer >= 1")
    if not isinstance(keys, dict) or not keys or len(keys) > _MAX_KEYS:
        raise MalformedRootError(f"root.keys: expected 1 to {_MAX_KEYS} keys")
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 <= threshold <= len(keys):
        raise MalformedRootError(f"root.threshold: expected an integer in [1, {len(keys)}]")
    parsed: dict[str, str] = {}
    for kid, entry in keys.items():
        if not isinstance(entry, dict) or set(entry) != {"keytype", "public"} or entry["keytype"] != "ed25519":
            raise MalformedRootError(f"root.keys[{short(kid)}]: expected {{'keytype': 'ed25519', 'public': hex}}")
        try:
            public = public_key_from_hex(entry["public"])
        except (TypeError, ValueError):
            raise MalformedRootError(f"root.keys[{short(kid)}].public: not an Ed25519 public key") from None
        if keyid(public) != kid:
            raise MalformedRootError(f"root.keys[{short(kid)}]: key id is not the sha256 of the public key")
        parsed[kid] = entry["public"]
    expires = parse_rfc3339(body["expires"], "root.expires", MalformedRootError)
    return version, threshold, parsed, expires


def _parse_root_envelope(data: bytes) -> Envelope:
    envelope = parse_envelope(data, max_size=MAX_ROOT_SIZE)
    if envelope.payload_type != ROOT_PAYLOAD_TYPE:
        raise WrongPayloadTypeError(f"root payloadType {short(envelope.payload_type)}, expected {ROOT_PAYLOAD_TYPE!r}")
    return envelope


def _root_from(data: bytes, body: tuple[int, int, dict[str, str], datetime], revoked: Iterable[str]) -> TrustRoot:
    version, threshold, keys, expires = body
    return TrustRoot(version, threshold, MappingProxyType(dict(keys)), expires, bytes(data), frozenset(revoked))


def load_root(data: bytes, *, now: datetime | None = None) -> TrustRoot:
    """Load an initial (trusted-on-first-use) root: it must be signed by a threshold of its own
    keys. With ``now``, also refuse an expired root.

    Raises :class:`MalformedEnvelopeError`, :class:`WrongPayloadTypeError`,
    :class:`MalformedRootError`, :class:`SignatureThresholdError` (or a subclass) or
    :class:`ExpiredRootError`.
    """
    envelope = _parse_root_envelope(data)
    body = _parse_body(envelope.payload)  # no prior trust: the keys come from the body itself
    root = _root_from(data, body, ())
    verify_signatures(envelope, root.public_keys(), root.threshold, what=f"root v{root.version}")
    if now is not None:
        root.check_not_expired(now)
    return root


def sign_root(body: Mapping[str, Any] | bytes, signers: Iterable[Ed25519PrivateKey]) -> bytes:
    """Sign a root body (a mapping, serialized as sorted compact JSON, or exact bytes).

    Checks the body's schema first (:class:`MalformedRootError`); does not check that the
    signers meet any threshold (see :func:`rotate_root`, :func:`load_root`).
    """
    if isinstance(body, Mapping):
        payload = json.dumps(dict(body), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    else:
        payload = bytes(body)
    _parse_body(payload)
    return sign_envelope(payload, ROOT_PAYLOAD_TYPE, signers)


def update_root(trusted: TrustRoot, new_root_bytes: bytes, *, now: datetime | None = None) -> TrustRoot:
    """Accept the next root after ``trusted``, or raise.

    Requires a threshold of ``trusted``'s keys (checked before the new body is parsed), version
    exactly ``trusted.version + 1``, and a threshold of the new root's own keys. Signature and
    version failures raise :class:`RootRotationError` (signature failures as its
    ``__cause__``). With ``now``, also refuse an expired new root.
    """
    envelope = _parse_root_envelope(new_root_bytes)
    try:
        verify_signatures(envelope, trusted.public_keys(), trusted.threshold, revoked=trusted.revoked,
                          what=f"new root, by root v{trusted.version} keys")
    except SignatureThresholdError as exc:
        raise RootRotationError(f"new root is not signed by a threshold of root v{trusted.version}'s keys: {exc}") from exc
    body = _parse_body(envelope.payload)
    if body[0] != trusted.version + 1:
        raise RootRotationError(f"new root has version {body[0]}, expected {trusted.version + 1}")
    new_ids = set(body[2])
    revoked = (set(trusted.revoked) | (set(trusted.keys) - new_ids)) - new_ids
    root = _root_from(new_root_bytes, body, revoked)
    try:
        verify_signatures(envelope, root.public_keys(), root.threshold, what=f"root v{root.version}, by its own keys")
    except SignatureThresholdError as exc:
        raise RootRotationError(f"root v{root.version} is not signed by a threshold of its own keys: {exc}") from exc
    if now is not None:
        root.check_not_expired(now)
    return root


def follow_root_chain(trusted: TrustRoot, roots: Sequence[bytes], *, now: datetime | None = None) -> TrustRoot:
    """Apply :func:`update_root` to each of ``roots`` in order; with ``now``, refuse an expired
    final root (intermediate roots may have expired, as in TUF)."""
    for data in roots:
        trusted = update_root(trusted, data)
    if now is not None:
        trusted.check_not_expired(now)
    return trusted


def rotate_root(
    old: TrustRoot,
    new_signed_body: Mapping[str, Any] | bytes,
    old_signers: Iterable[Ed25519PrivateKey],
    new_signers: Iterable[Ed25519PrivateKey],
) -> bytes:
    """Sign the next root with the old and the new signers (a key in both signs once).

    The result is checked with :func:`update_root` before it is returned, so a rotation
    lacking a threshold of either key set, or with the wrong version, raises
    :class:`RootRotationError` here rather than on every client.
    """
    signers: dict[str, Ed25519PrivateKey] = {}
    for key in [*old_signers, *new_signers]:
        signers.setdefault(keyid(key), key)
    data = sign_root(new_signed_body, signers.values())
    update_root(old, data)
    return data
