"""`fedpref-sim` from a shell: generation, and malformed input failing clearly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpref.client.data import write_jsonl
from fedpref.simulations.persona import PersonaConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def _sim(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fedpref.simulations.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        proc = _sim("generate", "--users", "5", "--pairs-per-user", "12", "--seed", "4", "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    assert a.read_bytes() == b.read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert {r["user_id"] for r in rows} == {f"u{i:03d}" for i in range(5)}
    assert {"user_id", "community", "prompt", "chosen", "rejected", "split"} <= set(rows[0])


def test_committed_flwr_sample_is_what_generate_writes(tmp_path):
    """simulations/data/persona-small.jsonl (used by `flwr run .`) is reproducible."""
    out = tmp_path / "small.jsonl"
    write_jsonl(generate(PersonaConfig(users=12, pairs_per_user=40, seed=0)).pairs, out)
    assert out.read_bytes() == (ROOT / "simulations" / "data" / "persona-small.jsonl").read_bytes()


@pytest.mark.parametrize(
    "lines,expect",
    [
        (['{"user_id": "u1", "prompt": "p", "chosen": "a", "split": "train"}'], "rejected"),
        (['{"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b", "split": "train"', ], "JSON"),
        (['{"user_id": "u1", "prompt": "p", "chosen": "a", "rejected": "b", "split": "train"}'], "u1"),
    ],
    ids=["missing-field", "bad-json", "empty-user"],
)
@pytest.mark.slow  # fedpref-sim run as a real process
def test_malformed_data_fails_with_file_line_and_reason(tmp_path, lines, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    proc = _sim("run", "--data", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"{bad.name}:1" in proc.stderr and expect in proc.stderr, proc.stderr


@pytest.mark.slow  # fedpref-sim run as a real process
def test_missing_config_fails_clearly(tmp_path):
    proc = _sim("run", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "nope.toml" in proc.stderr


@pytest.mark.slow  # fedpref-sim run as a real process
def test_unknown_config_key_is_named(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[federation]\nrounds = 2\nround = 3\n")
    proc = _sim("run", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "'round'" in proc.stderr and "federation" in proc.stderr
