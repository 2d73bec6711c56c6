"""Ed25519 signing keys for safety policies and trust roots.

Private keys are stored as PEM PKCS#8 encrypted with a passphrase
(``BestAvailableEncryption``), file mode 0600, written atomically. Public keys appear in the
trust root as 64 hex digits; a key id is the hex sha256 of the raw 32-byte public key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpref.common.errors import ConfigError
from fedpref.safety_policy.bundle import write_file_atomic
from fedpref.safety_policy.dsse import keyid, public_key_bytes
from fedpref.safety_policy.errors import KeyFileError, WrongPassphraseError

__all__ = [
    "generate_signing_key",
    "keyid",
    "load_private_key",
    "public_key_from_hex",
    "public_key_hex",
    "save_private_key",
]

_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_MAX_KEY_FILE = 64 * 1024


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key of ``key`` as 64 lowercase hex digits."""
    return public_key_bytes(key).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_hex`. Raises ``ValueError`` for anything but 64 hex digits."""
    raw = bytes.fromhex(text)
    if len(raw) != 32 or raw.hex() != text:
        raise ValueError("an Ed25519 public key is 64 lowercase hex digits")
    return Ed25519PublicKey.from_public_bytes(raw)


def save_private_key(
    path: str | os.PathLike[str], key: Ed25519PrivateKey, passphrase: bytes, *, overwrite: bool = False
) -> None:
    """Write ``key`` to ``path`` as passphrase-encrypted PEM PKCS#8, mode 0600, atomically.

    Refuses (``ConfigError``) an empty passphrase, and an existing file unless ``overwrite``.
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"expected an Ed25519PrivateKey, got {type(key).__name__}")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise ConfigError("the key passphrase must be non-empty bytes")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to overwrite a signing key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, pem, mode=0o600)
    os.chmod(path, 0o600)


def load_private_key(path: str | os.PathLike[str], passphrase: bytes) -> Ed25519PrivateKey:
    """Load an encrypted Ed25519 private key written by :func:`save_private_key`.

    Raises :class:`KeyFileError` (missing, unreadable, unencrypted, corrupt or not Ed25519) or
    :class:`WrongPassphraseError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            pem = fh.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"no signing key at {path}; restore it from your backup, or create keys with `fedpref-server keys init` in an empty home") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {path}: {exc.strerror}") from None
    if len(pem) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path} is too large to be a signing key")
    if not pem.lstrip().startswith(_ENCRYPTED_PEM):
        raise KeyFileError(f"{path} is not a passphrase-encrypted PKCS#8 PEM private key")
    if not isinstance(passphrase, bytes) or not passphrase:
        raise WrongPassphraseError(f"an empty passphrase cannot decrypt {path}")
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except ValueError:
        raise WrongPassphraseError(f"wrong passphrase for signing key {path} (or the file is corrupt)") from None
    except (TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a usable encrypted private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
