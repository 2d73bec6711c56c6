"""`fedpref-server init`: a home with config, a TLS CA + server certificate, and signing keys."""

import ipaddress
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from fedpref.common.exit_codes import ExitCode
from fedpref.server.app import load_server_settings


def _init(home, *args):
    env = dict(os.environ, FEDPREF_KEY_PASSPHRASE="correct horse")
    return subprocess.run([sys.executable, "-m", "fedpref.server.cli", "init", "--home", str(home), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow  # fedpref-server init as a real process
def test_init_writes_a_usable_home(tmp_path):
    home = tmp_path / "ops"
    r = _init(home, "--address", "10.1.2.3:9092", "--signers", "3", "--threshold", "2")
    assert r.returncode == 0, r.stderr
    tls = home / "tls"
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert sorted(p.name for p in (home / "keys").glob("signer-*.pem")) == ["signer-1.pem", "signer-2.pem", "signer-3.pem"]
    assert (home / "keys" / "root.json").exists()
    settings = load_server_settings(str(home / "config.toml"))
    assert settings.federation.max_epsilon_user == 10.0 and settings.federation.report_eval_metrics is False
    assert settings.local.max_epsilon_sample == 10.0
    assert 'address = "10.1.2.3:9092"' in (home / "config.toml").read_text()


@pytest.mark.slow  # fedpref-server init as a real process
def test_init_for_a_host_name_and_refusals(tmp_path):
    home = tmp_path / "ops"
    assert _init(home, "--address", "fl.example.org:443").returncode == 0
    cert = x509.load_pem_x509_certificate((home / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in san.get_values_for_type(x509.DNSName)
    before = (home / "tls" / "ca.pem").read_bytes()
    again = _init(home)
    assert again.returncode == ExitCode.CONFIG and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert (home / "tls" / "ca.pem").read_bytes() == before  # nothing replaced
    bad = _init(tmp_path / "other", "--address", "no-port")
    assert bad.returncode == ExitCode.CONFIG and "HOST:PORT" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "other").exists()
