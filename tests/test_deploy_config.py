"""The deployment's generated files and home checks, without starting anything
(tests/test_deployment.py runs the real processes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedpref.protocol.errors import ConfigError, HomeError
from fedpref.server.deploy import ServerHome, app_pyproject, listen_address, nginx_conf

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> ServerHome:  # noqa: ANN001
    root = tmp_path_factory.mktemp("ops") / "ops"
    subprocess.run([str(BIN / "fedpref-server"), "init", "--home", str(root), "--address", "fl.example.org:9092"],
                   check=True, capture_output=True, env={"FEDPREF_KEY_PASSPHRASE": "pw", "PATH": ""})
    return ServerHome.load(root)


def test_init_puts_the_superlink_on_loopback_next_to_the_device_port(home: ServerHome) -> None:
    assert home.address == "fl.example.org:9092" and home.superlink == "127.0.0.1:9093"


def test_nginx_proxies_only_the_fleet_api_with_tls_both_ways(home: ServerHome) -> None:
    conf = nginx_conf(home, home.superlink)
    proxied = re.findall(r"location (\S+) \{[^}]*proxy_pass", conf)
    assert proxied == ["/v1/fleet/"]
    assert "location / { return 404; }" in conf
    assert "listen 0.0.0.0:9092 ssl;" in conf and f"ssl_certificate {home.certificate};" in conf
    assert "proxy_pass https://127.0.0.1:9093;" in conf and "proxy_ssl_verify on;" in conf
    assert f"proxy_ssl_trusted_certificate {home.ca};" in conf
    assert "/v1/control" not in conf.replace("# The Control API (/v1/control/", "")


@pytest.mark.parametrize("address, listen", [
    ("fl.example.org:9092", "0.0.0.0:9092"), ("10.0.0.5:443", "10.0.0.5:443"), ("[::1]:9092", "[::1]:9092"),
])
def test_listen_address(address: str, listen: str) -> None:
    assert listen_address(address) == listen


def test_a_superlink_off_loopback_is_refused(home: ServerHome, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(home.config.read_text().replace('superlink = "127.0.0.1:9093"', 'superlink = "0.0.0.0:9093"'))
    with pytest.raises(ConfigError, match="must be a loopback address"):
        ServerHome.load(tmp_path)


def test_a_missing_or_foreign_home_is_a_home_error(tmp_path: Path) -> None:
    with pytest.raises(HomeError, match="does not exist"):
        ServerHome.load(tmp_path / "nowhere")
    with pytest.raises(HomeError, match="not a fedpref server home"):
        ServerHome.load(tmp_path)


def test_the_submitted_app_is_the_simulations_server_and_client_app() -> None:
    import tomllib

    app = tomllib.loads(app_pyproject())
    assert app["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedpref.server.app:app", "clientapp": "fedpref.client.app:app"}
    assert app["tool"]["flwr"]["app"]["config"]["secure-aggregation"] is True  # on by default in deployment
    assert app["project"]["dependencies"] == []  # nothing to install at run time
