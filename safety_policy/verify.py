"""Verify a signed safety-policy envelope against a trust root.

:func:`verify_envelope` runs the checks in this order, and the payload is parsed only after
its signatures are verified:

1. size (``max_size``), before anything is parsed;
2. envelope parse (strict JSON, strict base64);
3. payloadType;
4. the trust root has not expired (``now``);
5. signatures: a threshold of distinct trusted keys;
6. payload JSON and schema;
7. policy name;
8. version > ``last_version`` (rollback, replay);
9. ``issued_at <= now + MAX_CLOCK_SKEW`` (5 minutes), ``expires_at > now`` (freeze); ``now`` is injected and must be timezone-aware;
10. backbone sha256 (when given);
11. files against the manifest (missing, extra, length, sha256).

Every rejection is a :class:`~fedpref.safety_policy.errors.PolicyError` subclass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

from fedpref.safety_policy.bundle import (
    POLICY_NAME,
    POLICY_PAYLOAD_TYPE,
    check_files,
    format_rfc3339,
    parse_payload,
    parse_rfc3339,
    require_aware,
)
from fedpref.safety_policy.dsse import parse_envelope, verify_signatures
from fedpref.safety_policy.errors import (
    BackboneMismatchError,
    ExpiredPolicyError,
    MalformedPolicyError,
    RollbackError,
    WrongPayloadTypeError,
    WrongPolicyNameError,
    short,
)
from fedpref.safety_policy.root import TrustRoot

__all__ = ["MAX_CLOCK_SKEW", "MAX_ENVELOPE_SIZE", "Category", "Policy", "verify_envelope"]

MAX_ENVELOPE_SIZE = 4 * 1024 * 1024
MAX_CLOCK_SKEW = timedelta(minutes=5)  # a policy issued later than now + this is refused


def _skew() -> str:
    return f"{int(MAX_CLOCK_SKEW.total_seconds() // 60)} minutes"


@dataclass(frozen=True)
class Category:
    """One unsafe category and the classifier score at or above which a candidate is flagged."""

    name: str
    threshold: float


@dataclass(frozen=True)
class Policy:
    """A verified safety policy. ``files`` and ``classifier`` are read-only mappings."""

    name: str
    version: int
    issued_at: datetime
    expires_at: datetime
    backbone_sha256: str
    categories: tuple[Category, ...]
    files: Mapping[str, bytes]
    classifier: Mapping[str, Any]
    envelope_sha256: str
    signed_by: tuple[str, ...] = field(default=(), compare=False)
    """Key ids of the distinct trusted keys whose signatures counted."""

    def manifest_summary(self) -> dict[str, Any]:
        """A JSON-ready summary (no file contents), for logs and CLI output."""
        return {
            "name": self.name,
            "version": self.version,
            "issued_at": format_rfc3339(self.issued_at),
            "expires_at": format_rfc3339(self.expires_at),
            "backbone_sha256": self.backbone_sha256,
            "categories": [{"name": c.name, "threshold": c.threshold} for c in self.categories],
            "files": {n: len(b) for n, b in sorted(self.files.items())},
            "envelope_sha256": self.envelope_sha256,
            "signed_by": list(self.signed_by),
        }


    def classifier_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy of :attr:`classifier` (e.g. for ``json.dumps``)."""
        return _thaw(self.classifier)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def verify_envelope(
    envelope: bytes,
    root: TrustRoot,
    *,
    last_version: int,
    now: datetime,
    expected_name: str = POLICY_NAME,
    backbone_sha256: str | None = None,
    max_size: int = MAX_ENVELOPE_SIZE,
) -> Policy:
    """Verify ``envelope`` against ``root`` and return the :class:`Policy` it carries.

    ``last_version`` is the version installed before (0 when none); the policy's version must
    exceed it. ``now`` is the current time, injected, timezone-aware (a naive one raises
    ``ConfigError``). Raises a :class:`PolicyError` subclass on any rejection (see the module
    docstring for the order of checks).
    """
    require_aware(now)
    parsed = parse_envelope(envelope, max_size=max_size)
    if parsed.payload_type != POLICY_PAYLOAD_TYPE:
        raise WrongPayloadTypeError(f"payloadType {short(parsed.payload_type)}, expected {POLICY_PAYLOAD_TYPE!r}")
    root.check_not_expired(now)
    signed_by = verify_signatures(parsed, root.public_keys(), root.threshold, revoked=root.revoked, what="policy")

    manifest, files = parse_payload(parsed.payload)  # only now: the payload is authenticated
    if manifest["name"] != expected_name:
        raise WrongPolicyNameError(f"policy name {short(manifest['name'])}, expected {expected_name!r}")
    version = manifest["version"]
    if version <= last_version:
        raise RollbackError(f"policy version {version} is not greater than installed version {last_version}")
    issued_at = parse_rfc3339(manifest["issued_at"], "manifest.issued_at")
    if issued_at - now > MAX_CLOCK_SKEW:  # a difference, not now + skew: no overflow at year 9999
        raise MalformedPolicyError(
            f"policy v{version} is issued at {manifest['issued_at']}, more than {_skew()} after now "
            f"({format_rfc3339(now)}); check this clock, or re-sign the policy on a signer with the right time")
    expires_at = parse_rfc3339(manifest["expires_at"], "manifest.expires_at")
    if expires_at <= now:
        raise ExpiredPolicyError(f"policy v{version} expired at {manifest['expires_at']}")
    if backbone_sha256 is not None and manifest["backbone_sha256"] != backbone_sha256.lower():
        raise BackboneMismatchError(
            f"policy v{version} is for backbone {manifest['backbone_sha256'][:16]}..., "
            f"this backbone is {backbone_sha256[:16]}..."
        )
    check_files(manifest["files"], files)

    return Policy(
        name=manifest["name"],
        version=version,
        issued_at=issued_at,
        expires_at=expires_at,
        backbone_sha256=manifest["backbone_sha256"],
        categories=tuple(Category(c["name"], float(c["threshold"])) for c in manifest["categories"]),
        files=MappingProxyType(dict(files)),
        classifier=_freeze(manifest["classifier"]),
        envelope_sha256=hashlib.sha256(bytes(envelope)).hexdigest(),
        signed_by=signed_by,
    )
