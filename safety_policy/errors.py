"""Every way a signed safety policy, a trust root or a key file is rejected.

One class per rejection, all under :class:`PolicyError`, in the style of python-tuf's
``api/exceptions.py``. Messages from verification are terse on purpose: they say which check
failed and the numbers involved, and never echo more than a short, ``repr``-quoted prefix of
anything an attacker controls.

Hierarchy::

    PolicyError
    ├── EnvelopeTooLargeError
    ├── MalformedEnvelopeError
    ├── WrongPayloadTypeError
    ├── SignatureThresholdError
    │   ├── DuplicateKeyError
    │   └── UntrustedKeyError
    │       └── RevokedKeyError
    ├── MalformedPolicyError
    ├── WrongPolicyNameError
    ├── RollbackError
    ├── ExpiredPolicyError
    ├── BackboneMismatchError
    ├── FileMismatchError
    │   ├── MissingFileError
    │   ├── ExtraFileError
    │   └── FileHashMismatchError
    ├── RootError
    │   ├── MalformedRootError
    │   ├── RootRotationError
    │   └── ExpiredRootError
    ├── KeyFileError
    │   └── WrongPassphraseError
    └── PolicyStoreError
"""

from __future__ import annotations

from fedpref.common.errors import FedPrefError
from fedpref.common.exit_codes import ExitCode, register_exit_codes

__all__ = [
    "BackboneMismatchError",
    "DuplicateKeyError",
    "EnvelopeTooLargeError",
    "ExpiredPolicyError",
    "ExpiredRootError",
    "ExtraFileError",
    "FileHashMismatchError",
    "FileMismatchError",
    "KeyFileError",
    "MalformedEnvelopeError",
    "MalformedPolicyError",
    "MalformedRootError",
    "MissingFileError",
    "PolicyError",
    "PolicyStoreError",
    "RevokedKeyError",
    "RollbackError",
    "RootError",
    "RootRotationError",
    "SignatureThresholdError",
    "UntrustedKeyError",
    "WrongPassphraseError",
    "WrongPayloadTypeError",
    "WrongPolicyNameError",
    "short",
]


def short(value: object, limit: int = 40) -> str:
    """``repr`` of an untrusted value, cut to ``limit`` characters, for error messages."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PolicyError(FedPrefError):
    """Root of every safety-policy error: the policy (or root, or key) was not accepted.

    Whoever catches it keeps the previous policy in force (fail closed).
    """


# --- the envelope -------------------------------------------------------------------------


class EnvelopeTooLargeError(PolicyError):
    """The envelope is larger than the configured maximum; it was not parsed at all."""


class MalformedEnvelopeError(PolicyError):
    """The envelope is not a well-formed DSSE envelope.

    Bad UTF-8 or JSON, a duplicate or unknown member, a missing field, a field of the wrong
    type, or invalid / non-canonical base64.
    """


class WrongPayloadTypeError(PolicyError):
    """The envelope's payloadType is not the one this verifier accepts."""


# --- signatures ---------------------------------------------------------------------------


class SignatureThresholdError(PolicyError):
    """Fewer valid signatures from distinct trusted keys than the root's threshold.

    The subclasses name the most telling reason when one applies.
    """


class DuplicateKeyError(SignatureThresholdError):
    """The threshold was not met, and some trusted key signed more than once.

    A key counts once however many signature entries (or key ids) carry it.
    """


class UntrustedKeyError(SignatureThresholdError):
    """The threshold was not met, and some signature names a key the root does not trust."""


class RevokedKeyError(UntrustedKeyError):
    """The threshold was not met, and some signature names a key removed by a root rotation."""


# --- the signed payload -------------------------------------------------------------------


class MalformedPolicyError(PolicyError):
    """The payload or manifest (signed, or about to be signed) breaks the policy schema."""


class WrongPolicyNameError(PolicyError):
    """The manifest names a different policy than the one expected."""


class RollbackError(PolicyError):
    """The policy version is not greater than the last one installed (rollback or replay)."""


class ExpiredPolicyError(PolicyError):
    """The policy's ``expires_at`` is not after the (injected) current time: a freeze attack
    or a stale policy."""


class BackboneMismatchError(PolicyError):
    """The policy was built for a different frozen backbone (sha256 differs)."""


class FileMismatchError(PolicyError):
    """The bundle's files do not match the manifest."""


class MissingFileError(FileMismatchError):
    """A file listed in the manifest is absent."""


class ExtraFileError(FileMismatchError):
    """A file is present that the manifest does not list."""


class FileHashMismatchError(FileMismatchError):
    """A file's length or sha256 differs from the manifest (tampered or swapped file)."""


# --- the trust root -----------------------------------------------------------------------


class RootError(PolicyError):
    """A problem with the trust root itself."""


class MalformedRootError(RootError):
    """The root body breaks the root schema (type, version, threshold, keys, expiry)."""


class RootRotationError(RootError):
    """A new root was refused: wrong version, or not signed by a threshold of both the old
    keys and the new keys. ``__cause__`` holds the signature failure, if any."""


class ExpiredRootError(RootError):
    """The trust root's ``expires`` is not after the (injected) current time."""


# --- key files and the store --------------------------------------------------------------


class KeyFileError(PolicyError):
    """A private-key file is missing, unreadable, unencrypted or not an Ed25519 key."""


class WrongPassphraseError(KeyFileError):
    """The passphrase does not decrypt the private-key file."""


class PolicyStoreError(PolicyError):
    """The on-disk policy store is inconsistent or corrupt; nothing in it is trusted."""


register_exit_codes({  # documented in `fedpref-server exit-codes`
    PolicyError: ExitCode.POLICY_REJECTED,
    ExpiredPolicyError: ExitCode.POLICY_EXPIRED,
    ExpiredRootError: ExitCode.ROOT_EXPIRED,
    KeyFileError: ExitCode.KEY_FILE,
    MalformedRootError: ExitCode.KEY_FILE,
    WrongPassphraseError: ExitCode.WRONG_PASSPHRASE,
})
