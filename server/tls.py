"""TLS material for a fedpref server: a private CA and a server certificate, with ``cryptography``.

``make_ca`` creates a self-signed CA (ECDSA P-256, ``BasicConstraints(ca=True, path_length=0)``);
``make_server_cert`` issues a certificate for the server's host name or IP (both as
``SubjectAlternativeName``, plus ``localhost`` and ``127.0.0.1`` for the operator's own
tools), signed by that CA. Devices are given ``ca.pem`` and verify the server against it.
Private keys are written 0600, atomically; nothing is ever overwritten.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpref.common.atomic import write_bytes_atomic
from fedpref.common.errors import ConfigError
from fedpref.common.netaddr import parse_address

__all__ = ["TlsFiles", "make_ca", "make_server_cert", "parse_address", "write_tls"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpref"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(*, now: datetime, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("fedpref operator CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str, *, now: datetime, days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        ip = ipaddress.ip_address(host)
        if x509.IPAddress(ip) not in names:
            names.append(x509.IPAddress(ip))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder().subject_name(_name(host)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_tls(folder: Path, host: str, *, now: datetime | None = None) -> TlsFiles:
    """CA + server certificate for ``host`` under ``folder``; refuses to overwrite anything."""
    now = now or datetime.now(timezone.utc)
    files = TlsFiles(folder / "ca.pem", folder / "ca.key", folder / "server.pem", folder / "server.key")
    existing = [p for p in vars(files).values() if p.exists()]
    if existing:
        raise ConfigError(f"{existing[0]} already exists; refusing to replace TLS material (use another --home)")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca = make_ca(now=now)
    key, cert = make_server_cert(ca_key, ca, host, now=now)
    write_bytes_atomic(files.ca_key, _pem_key(ca_key), mode=0o600)
    write_bytes_atomic(files.server_key, _pem_key(key), mode=0o600)
    write_bytes_atomic(files.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    write_bytes_atomic(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    for p in (files.ca_key, files.server_key):
        os.chmod(p, 0o600)
    return files
