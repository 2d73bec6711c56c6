"""The deployment's generated files and home checks, without starting anything
(tests/test_deployment.py runs the real processes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedpref.common.errors import ConfigError, HomeError
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


# --- settings that cannot work with secure aggregation are refused at init and at start ----------
def _with(home: ServerHome, tmp_path: Path, **federation: object) -> ServerHome:
    """A copy of the home's config with [federation] keys replaced (nothing else is needed to start checking)."""
    text = home.config.read_text()
    for key, value in federation.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    (tmp_path / "config.toml").write_text(text)
    return ServerHome.load(tmp_path)


@pytest.mark.parametrize("n, q, keys, fix", [
    (2, 1.0, ("min_available_clients = 2", "min_cohort = 3"), "set min_available_clients >= 3"),
    (3, 0.5, ("client_sample_rate = 0.5", "min_available_clients = 3", "min_cohort = 3"),
     "set client_sample_rate >= 0.8 or min_available_clients >= 5"),
])
def test_start_refuses_settings_that_halt_secure_aggregation_in_one_line(home, tmp_path, n, q, keys, fix) -> None:
    from fedpref.server import deploy

    bad = _with(home, tmp_path, min_available_clients=n, client_sample_rate=q)
    with pytest.raises(ConfigError) as e:
        deploy.start(bad, rounds=1, policy=None)  # refused before anything starts
    msg = str(e.value)
    assert "\n" not in msg and all(k in msg for k in keys) and fix in msg, msg
    assert not (tmp_path / "run").exists()


def test_the_halt_rule_allows_a_small_halt_probability_only() -> None:
    from fedpref.server.config import FederationConfig
    from fedpref.server.secagg import SecAggConfig, check_cohort_settings, halt_probability

    k = SecAggConfig()
    assert check_cohort_settings(FederationConfig(min_available_clients=3, client_sample_rate=1.0), k, where="x") == 0.0
    p = check_cohort_settings(FederationConfig(min_available_clients=20, client_sample_rate=0.5), k, where="x")
    assert p == pytest.approx(halt_probability(population=20, sample_rate=0.5, min_cohort=3)) and p < 1e-3
    with pytest.raises(ConfigError, match="in 84% of rounds"):
        check_cohort_settings(FederationConfig(min_available_clients=5, client_sample_rate=0.3), k, where="x")


def test_init_writes_a_config_that_works_with_secure_aggregation_from_three_devices(home) -> None:
    """What `fedpref-server init` wrote passes `start`'s check; 10 rounds fit its ε budget."""
    import tomllib

    from fedpref.server import privacy
    from fedpref.server.app import load_server_settings
    from fedpref.server.deploy import check_secure_aggregation
    from fedpref.server.secagg import load_secagg_config

    fed = load_server_settings(str(home.config)).federation
    secagg = load_secagg_config(str(home.config))
    assert check_secure_aggregation(fed, secagg, where="init") == 0.0
    assert fed.min_available_clients == 3 == secagg.min_cohort and fed.client_sample_rate == 1.0
    assert "secagg" in tomllib.loads(home.config.read_text())  # min_cohort and max_attempts are visible
    eps = privacy.epsilon(sample_rate=fed.client_sample_rate, noise_multiplier=fed.server_noise_multiplier,
                          steps=fed.rounds, delta=fed.delta)
    assert eps <= fed.max_epsilon_user, eps


def test_status_says_how_many_rounds_were_released_and_why_not_more() -> None:
    from fedpref.server.deploy import rounds_report

    history = [{"server_round": 1}, {"server_round": 2, "halted": "2 node(s) sampled, secure aggregation needs ≥ 3"},
               {"server_round": 2}, {"server_round": 3, "halted": "x"}, {"server_round": 3, "halted": "x"},
               {"server_round": 3, "halted": "x"}]
    line = rounds_report(history, [1, 5], stopped_reason="stopped at round 3: 3 attempts in a row halted", finished=True)
    assert line.startswith("2 of 5 rounds released (rounds 1..5); 4 attempts halted")
    assert "round 2: 2 node(s) sampled" in line and "round 3: x (×3)" in line and "stopped at round 3" in line


def test_the_operator_safety_corpus_is_the_demos() -> None:
    """README: `fedpref-sim generate --safety-corpus` then `policy build` with its defaults is the
    demo's classifier (400 texts per class, same threshold, length, seed and backbone)."""
    import inspect
    import json

    from fedpref.server.policy_cli import policy_build
    from fedpref.simulations.config import load_sim_config
    from fedpref.simulations.persona import PersonaConfig, safety_corpus

    demo = load_sim_config(None)
    assert safety_corpus(PersonaConfig()) == safety_corpus(demo.persona, n_per_class=demo.safety.corpus_per_class)
    defaults = {k: v.default for k, v in inspect.signature(policy_build).parameters.items()}
    assert (defaults["threshold"], defaults["max_length"], defaults["seed"], defaults["backbone"]) == (
        demo.safety.threshold, demo.model.max_length, demo.runtime.seed, demo.model.backbone or None)
    assert json.dumps(safety_corpus(PersonaConfig())[0])  # what `generate --safety-corpus` writes


def test_rounds_0_offers_only_the_final_personalization_and_is_refused_where_it_cannot(home, tmp_path) -> None:
    from fedpref.server import deploy
    from fedpref.server.app import load_server_settings
    from fedpref.server.deploy import rounds_report

    settings = load_server_settings(str(home.config))
    for rounds, want in ((0, "no round has been released on this home yet"), (-1, "give 0 (no new round")):
        with pytest.raises(ConfigError, match=re.escape(want)):
            deploy.start(home, rounds=rounds, policy=None)  # refused before anything starts
    assert not (home.root / "run" / "processes.json").exists()
    off = _with(home, tmp_path, min_available_clients=3)
    off.config.write_text(off.config.read_text().replace("epochs = 5", "epochs = 0"))
    with pytest.raises(ConfigError, match=r"\[personalize\] epochs = 0"):
        deploy.start(off, rounds=0, policy=None)
    assert deploy.check_rounds(home, settings, 2) == 2 and deploy.check_rounds(home, settings, None) == 10
    assert rounds_report([{"server_round": 1}, {"server_round": 2}], [3, 2]).startswith("no new round")
