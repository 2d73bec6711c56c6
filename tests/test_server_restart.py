"""A server killed mid-federation (SIGKILL, real processes) resumes from its ledger and its
latest checkpoint: no round is charged twice under one number, none is lost, and the privacy
budget keeps counting from where it was."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from fedpref.client.data import write_jsonl
from fedpref.server.privacy import AccountantKind, PrivacyLedger, UserLevelBudget
from fedpref.simulations.persona import CommunitySpec, PersonaConfig, generate

pytestmark = pytest.mark.slow  # two Ray simulations in real processes, one killed

ROUNDS = 4
CONFIG = """
[model]
backbone = "{backbone}"
max_length = 48

[model.adapter]
rank = 2
personal_dims = 2

[federation]
rounds = {rounds}
client_sample_rate = 1.0
clip_norm = 1.0
server_noise_multiplier = 1.0
min_available_clients = 3
max_epsilon_user = 50.0

[local]
epochs = 1
batch_size = 8
dp_noise_multiplier = 0.5
"""

SCRIPT = """
import os, sys, threading
from pathlib import Path
from fedpref.protocol.runconfig import Method
from fedpref.server.privacy import PrivacyLedger
from fedpref.simulations.config import RuntimeConfig
from fedpref.simulations.engine import run_on_simulation_engine
hold_fd = int(sys.argv[4]) if len(sys.argv) > 4 else None
if hold_fd is not None:  # the ServerApp runs in this process: hold it before the third ledger line
    append = PrivacyLedger.append
    def held_append(self, entry):
        if len(self.entries()) >= 2:
            os.write(hold_fd, b"held\\n")  # two rounds charged, the third not yet: kill me now
            threading.Event().wait()
        append(self, entry)
    PrivacyLedger.append = held_append
run_on_simulation_engine(method=Method.AGGREGATED, num_users=3, data=Path(sys.argv[1]), workdir=Path(sys.argv[2]),
                         config_file=Path(sys.argv[3]), cache=None, runtime=RuntimeConfig(client_cpus=1.0))
"""


def _start(args, pass_fds=()):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)


def _wait_for_hold(read_fd: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once the server says it holds before its third ledger line; False if it exits first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 1.0)
        if ready:
            return os.read(read_fd, 16).startswith(b"held")
    return False


def test_a_killed_server_resumes_with_its_ledger_intact(tiny_encoder_dir, tmp_path):
    comms = (CommunitySpec("a", 0.5, (1.0,) * 8, -5.0), CommunitySpec("b", 0.5, (-1.0,) * 8, 5.0))
    data = tmp_path / "persona.jsonl"
    write_jsonl(generate(PersonaConfig(users=3, pairs_per_user=16, seed=2, communities=comms)).pairs, data)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(backbone=tiny_encoder_dir, rounds=ROUNDS))
    work = tmp_path / "work"
    ledger = PrivacyLedger(work / "server" / "ledger.jsonl")

    read_fd, write_fd = os.pipe()
    proc = _start([data, work, cfg, write_fd], pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        held = _wait_for_hold(read_fd, proc, timeout=300)
        assert held, f"the first server ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the server, its Ray cluster, every client: gone at once
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = ledger.entries()
    assert len(before) == 2  # killed between the second ledger line and the third

    proc = _start([data, work, cfg])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    after = ledger.entries()
    rounds = [e.round for e in after]
    assert after[: len(before)] == before  # the old lines are untouched
    assert rounds == sorted(set(rounds)) and rounds[-1] == ROUNDS  # no number twice, up to the last round
    assert "resuming at round" in err
    # the budget read back from the ledger counts every charged round, none forgotten
    budget = UserLevelBudget(max_epsilon=50.0, delta=1e-5, accountant=AccountantKind.RDP, ledger=ledger)
    assert budget.spent() == pytest.approx(after[-1].epsilon)
    history = json.loads((work / "server" / "history.json").read_text())
    released = [h["server_round"] for h in history]
    assert released == sorted(set(released)) and set(released) <= set(rounds) and released[-1] == ROUNDS
    assert (work / "server" / "checkpoints" / f"round-{ROUNDS:04d}").is_dir()
