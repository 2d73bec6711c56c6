"""Tests for the `fedpref-server privacy` commands and the CLI's error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedpref.common.exit_codes import ExitCode
from fedpref.server.cli import app, main

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
runner = CliRunner()
EPS_ARGS = ["privacy", "epsilon", "--sample-rate", "0.04", "--noise-multiplier", "1.5",
            "--steps", "2250", "--delta", "1e-5"]
NOISE_ARGS = ["privacy", "noise", "--sample-rate", "0.04", "--target-epsilon", "8",
              "--steps", "2000", "--delta", "1e-5"]


def test_epsilon_human() -> None:
    result = runner.invoke(app, EPS_ARGS)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("epsilon = 7.32911 at delta = 1e-05 [rdp")


def test_epsilon_json() -> None:
    result = runner.invoke(app, [*EPS_ARGS, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == {"sample_rate": 0.04, "noise_multiplier": 1.5, "steps": 2250, "delta": 1e-5,
                   "accountant": "rdp", "epsilon": pytest.approx(7.32911117143, abs=1e-6)}


def test_epsilon_json_prv_reports_its_error_bound() -> None:
    args = ["privacy", "epsilon", "--sample-rate", "0.05", "--noise-multiplier", "1.5",
            "--steps", "100", "--delta", "1e-6", "--accountant", "PRV", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # microsoft/prv_accountant value, see tests/test_privacy.py
    assert out["accountant"] == "prv" and out["eps_error"] == 0.01
    assert out["epsilon"] == pytest.approx(1.95385313568420, abs=out["eps_error"])


def test_noise_human_and_json() -> None:
    human = runner.invoke(app, NOISE_ARGS)
    assert human.exit_code == 0 and human.stdout.startswith("noise_multiplier = 1.3562")
    result = runner.invoke(app, [*NOISE_ARGS, "--json"])
    out = json.loads(result.stdout)
    assert out["noise_multiplier"] == pytest.approx(1.3562, abs=1e-4)  # Opacus' own vector
    assert out["target_epsilon"] == 8 and out["accountant"] == "rdp"


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--sample-rate", "2", "sample_rate=2.0"), ("--delta", "1", "delta=1.0"),
     ("--noise-multiplier", "0", "noise_multiplier=0.0"), ("--steps", "-3", "steps=-3")],
)
def test_bad_value_is_one_line_config_error(flag: str, value: str, field: str) -> None:
    args = list(EPS_ARGS)
    args[args.index(flag) + 1] = value
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.CONFIG
    assert _one_error_line(result.stderr).startswith(f"error: {field} is invalid")
    assert result.stdout == ""


def test_unreachable_budget_is_config_error() -> None:
    args = ["privacy", "noise", "--sample-rate", "1", "--target-epsilon", "1e-9",
            "--steps", "100000", "--delta", "1e-5"]
    result = runner.invoke(app, args)
    assert result.exit_code == ExitCode.CONFIG
    assert "target_epsilon=1e-09" in _one_error_line(result.stderr)


def test_exit_codes_command_lists_every_code() -> None:
    result = runner.invoke(app, ["exit-codes"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == len(ExitCode)
    for code, line in zip(ExitCode, lines):
        assert line.split()[:2] == [str(int(code)), code.name]


@pytest.mark.parametrize(
    "args",
    [["privacy", "epsilon", "--sample-rate", "abc", "--noise-multiplier", "1", "--steps", "1",
      "--delta", "1e-5"],
     ["privacy", "epsilon", "--sample-rate", "0.1"],
     [*EPS_ARGS, "--accountant", "gdp"],
     ["no-such-command"]],
)
def test_main_turns_usage_errors_into_one_line(args, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == ExitCode.USAGE
    _one_error_line(capsys.readouterr().err)


def test_main_success_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([*EPS_ARGS, "--json"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == pytest.approx(7.3291, abs=1e-3)


def _server_command() -> list[str]:
    script = Path(sys.executable).parent / "fedpref-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedpref.server.cli"]


def test_installed_script_end_to_end() -> None:
    ok = subprocess.run([*_server_command(), *EPS_ARGS, "--json"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["epsilon"] == pytest.approx(7.32911117143, abs=1e-6)
    bad = list(EPS_ARGS)
    bad[bad.index("--sample-rate") + 1] = "2"
    err = subprocess.run([*_server_command(), *bad], capture_output=True, text=True,
                         timeout=120)
    assert err.returncode == ExitCode.CONFIG
    assert _one_error_line(err.stderr).startswith("error: sample_rate=2.0 is invalid")
    assert err.stdout == ""
