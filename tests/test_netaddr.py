"""Addresses, and the environment of every Flower process both CLIs start: nothing phones home
and no per-device identifier is written. Includes a real ``flower-supernode``. A process is
known by its pid and start time, so a recycled pid is never signalled."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedpref.client.agent_home import AgentHome
from fedpref.common.errors import ConfigError
from fedpref.common.netaddr import parse_address
from fedpref.common.processes import (
    FLOWER_QUIET,
    TELEMETRY_SOURCE,
    TELEMETRY_SOURCE_PIN,
    flower_env,
    pin_telemetry_source,
    process_started,
    same_process,
    signal_group,
)

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_TELEMETRY_LOGGING": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def test_parse_address():
    assert parse_address("fl.example.org:9092") == ("fl.example.org", 9092)
    assert parse_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        parse_address("fl.example.org")


def test_flower_env_turns_telemetry_and_the_update_check_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")  # whatever the caller's environment says
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "0")
    monkeypatch.setenv("FLWR_TELEMETRY_PARTNER_ID", str(uuid.uuid4()))
    env = flower_env(tmp_path / "flwr")
    assert FLOWER_QUIET == QUIET and QUIET.items() <= env.items()
    assert "FLWR_TELEMETRY_PARTNER_ID" not in env
    assert env["FLWR_HOME"] == str(tmp_path / "flwr")
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert (tmp_path / "flwr" / TELEMETRY_SOURCE).read_text() == TELEMETRY_SOURCE_PIN


def test_flower_reads_the_pinned_source_as_no_identifier(tmp_path, monkeypatch):
    """Flower computes a source id for every event, sent or not; pinned, it is "invalid"."""
    from flwr.supercore import telemetry

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "bare"))
    created = telemetry._get_source_id()  # control: an unpinned home gets a fresh UUID, persisted
    assert str(uuid.UUID(created)) == (tmp_path / "bare" / TELEMETRY_SOURCE).read_text()
    flower_env(tmp_path / "bare")  # replaces the UUID an earlier run wrote
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "bare"))
    assert telemetry._get_source_id() == "invalid"
    assert (tmp_path / "bare" / TELEMETRY_SOURCE).read_text() == TELEMETRY_SOURCE_PIN


def test_pin_is_idempotent(tmp_path):
    pin_telemetry_source(tmp_path)
    before = (tmp_path / TELEMETRY_SOURCE).stat()
    pin_telemetry_source(tmp_path)
    assert (tmp_path / TELEMETRY_SOURCE).stat().st_ino == before.st_ino  # not rewritten


def test_the_server_cli_runs_flwr_with_flower_env(tmp_path, monkeypatch):
    from fedpref.server import deploy

    home = deploy.ServerHome(root=tmp_path, address="127.0.0.1:9092", superlink="127.0.0.1:9093",
                             ca=tmp_path / "ca.pem", certificate=tmp_path / "s.pem", private_key=tmp_path / "s.key",
                             trust_root=tmp_path / "root.json")
    assert QUIET.items() <= home.env().items()
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout='{"success": true}', stderr="")

    monkeypatch.setattr(deploy.subprocess, "run", fake_run)
    deploy.flwr(home, "ls", "fedpref")
    assert QUIET.items() <= seen.items() and seen["FLWR_HOME"] == str(home.flwr_home)
    assert (home.flwr_home / TELEMETRY_SOURCE).read_text() == TELEMETRY_SOURCE_PIN


def test_the_agent_starts_its_supernode_with_flower_env(tmp_path, monkeypatch):
    from fedpref.client import agent_cli, supervisor

    home = tmp_path / "agent"
    home.mkdir()
    (home / "agent.toml").write_text('[agent]\nserver = "127.0.0.1:9092"\nca = "ca.pem"\n')
    monkeypatch.setattr(supervisor, "preflight", lambda *a, **k: None)
    seen = {}

    def fake_popen(cmd, **kwargs):
        seen.update(kwargs["env"])
        raise ConfigError("stop before starting anything")

    monkeypatch.setattr(supervisor.subprocess, "Popen", fake_popen)
    with pytest.raises(SystemExit):
        agent_cli.main(["start", "--home", str(home)])
    assert QUIET.items() <= seen.items() and seen["FLWR_HOME"] == str(home / "flwr")
    assert (home / "flwr" / TELEMETRY_SOURCE).read_text() == TELEMETRY_SOURCE_PIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("pinned", [True, False], ids=["flower_env", "control-unpinned"])
def test_a_real_supernode_runs_quiet_and_writes_no_device_id(tmp_path, pinned):
    """A real flower-supernode started as the agent starts it: every process of its group has
    telemetry and the update check off, and FLWR_HOME ends up with no UUID. The control (the pin
    removed after flower_env) shows Flower writes one even with telemetry off."""
    flwr_home = tmp_path / "flwr"
    env = flower_env(flwr_home)
    if not pinned:
        (flwr_home / TELEMETRY_SOURCE).unlink()
    exe = os.path.join(os.path.dirname(sys.executable), "flower-supernode")
    port = _free_port()
    proc = subprocess.Popen([exe, "--insecure", "--superlink", f"127.0.0.1:{_free_port()}", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and proc.poll() is None:  # its Runtime API listens after the event
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        assert proc.poll() is None, "flower-supernode exited at start-up"
        checked = []
        for pid in _group(proc.pid):
            try:
                raw = Path(f"/proc/{pid}/environ").read_text()
            except OSError:
                continue  # exited meanwhile
            environ = dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)
            assert QUIET.items() <= environ.items(), f"pid {pid} runs without telemetry off"
            assert environ["FLWR_HOME"] == str(flwr_home)
            checked.append(pid)
        assert proc.pid in checked
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its SuperExec child is in the same group
        try:
            proc.wait(timeout=20)  # exiting sends (here: builds) the leave event, so the source id is read
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    source = (flwr_home / TELEMETRY_SOURCE).read_text()
    if pinned:
        assert source == TELEMETRY_SOURCE_PIN
    else:
        uuid.UUID(source)  # control: the per-device id Flower writes when the pin is missing
    assert not (flwr_home / ".cache").exists()  # no update-check state either


# --- a process's identity: pid and start time (a recycled pid is never signalled) ------------


def test_a_process_is_its_pid_and_start_time():
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = process_started(proc.pid)
        assert started is not None and same_process(proc.pid, started)
        later = started + 60  # what a recycled pid looks like: the same number, another start
        assert not same_process(proc.pid, later) and not same_process(proc.pid, None)
        assert not signal_group(proc.pid, later, signal.SIGTERM)  # a group under a recycled pid: left alone
        assert signal_group(proc.pid, started, 0) and proc.poll() is None
        assert signal_group(proc.pid, started, signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not same_process(proc.pid, started) and not signal_group(proc.pid, started, 0)


@pytest.mark.skipif(not hasattr(os, "waitid"), reason="needs os.waitid")
def test_a_zombie_is_not_running():
    proc = subprocess.Popen(["true"])
    started = process_started(proc.pid)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert started is not None and not same_process(proc.pid, started)
    proc.wait()


def test_the_agent_pidfile_names_a_running_agent_only(tmp_path):
    from fedpref.client.supervisor import running_pid

    home = tmp_path / "agent"
    (home / "run").mkdir(parents=True)
    (home / "agent.toml").write_text('[agent]\nserver = "127.0.0.1:9092"\nca = "ca.pem"\n')
    h = AgentHome.load(home)
    assert running_pid(h) is None  # no pidfile
    me = os.getpid()
    h.pid_file.write_text(f"{me} {process_started()!r}\n")
    assert running_pid(h) == me
    h.pid_file.write_text(f"{me} {process_started() + 60!r}\n")  # the pid of an agent that is gone, recycled
    assert running_pid(h) is None
    h.pid_file.write_text(f"{me}\n")  # no start time: a stale file of an older agent
    assert running_pid(h) is None


def test_the_server_judges_its_recorded_processes_by_start_time(tmp_path):
    from fedpref.common.errors import DataError
    from fedpref.server import deploy

    home = deploy.ServerHome(root=tmp_path, address="127.0.0.1:9092", superlink="127.0.0.1:9093",
                             ca=tmp_path / "ca.pem", certificate=tmp_path / "s.pem", private_key=tmp_path / "s.key",
                             trust_root=tmp_path / "root.json")
    home.run_dir.mkdir()
    me = {"name": "superlink", "pid": os.getpid(), "cmd": ["flower-superlink"], "log": "x.log"}
    recycled = {**me, "name": "nginx", "started": process_started() + 60}
    home.processes_file.write_text(json.dumps({"processes": [{**me, "started": process_started()}, recycled]}))
    assert [p["name"] for p in deploy.running(home)] == ["superlink"]
    home.processes_file.write_text(json.dumps({"processes": [me]}))  # written before start times were kept
    with pytest.raises(DataError, match="no start time for superlink"):
        deploy.running(home)


# --- a step of the wall clock is no new process; a reboot is -----------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="boot-relative starts: /proc")


def _step_the_clock(monkeypatch, seconds: float) -> None:
    """What a step of the wall clock does to psutil: btime (/proc/stat), and with it every
    create_time(), moves by the step."""
    import psutil._pslinux as L

    real = L.boot_time
    monkeypatch.setattr(L, "boot_time", lambda: real() + seconds)


@linux_only
@pytest.mark.parametrize("step", [60.0, -3600.0])
def test_a_clock_step_changes_no_process_identity(monkeypatch, step):
    import psutil

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = process_started(proc.pid)
        created = psutil.Process(proc.pid).create_time()
        _step_the_clock(monkeypatch, step)
        assert abs(psutil.Process(proc.pid).create_time() - created - step) < 1  # the step is real to psutil
        assert process_started(proc.pid) == started
        assert same_process(proc.pid, started) and signal_group(proc.pid, started, 0)
        assert signal_group(proc.pid, started, signal.SIGTERM)  # `fedpref-server stop` still stops it
        assert proc.wait(timeout=20) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@linux_only
def test_the_same_pid_and_start_tick_after_a_reboot_is_another_process(monkeypatch):
    from fedpref.common import processes

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = process_started(proc.pid)
        assert same_process(proc.pid, started)
        real = processes._boot_tag
        monkeypatch.setattr(processes, "_boot_tag", lambda: real() % processes._BOOT_TAGS + 1)  # another boot_id
        assert not same_process(proc.pid, started)  # the record is of a process of the last boot
        assert not signal_group(proc.pid, started, signal.SIGTERM) and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@linux_only
def test_a_record_of_an_older_release_is_judged_as_then_or_refused_as_unknown(tmp_path, monkeypatch):
    """Records written before (psutil's create time, seconds since the epoch) still name their
    process while it matches by the old rule; the server then keeps to its clock-step-proof start.
    A live pid that no longer matches is 'unknown' (clock step or reused pid): one clear line."""
    import psutil

    from fedpref.common.errors import DataError
    from fedpref.server import deploy

    legacy = psutil.Process().create_time()  # what an older fedpref recorded for this process
    assert same_process(os.getpid(), legacy)  # an agent pidfile of the older release still works
    home = deploy.ServerHome(root=tmp_path, address="127.0.0.1:9092", superlink="127.0.0.1:9093",
                             ca=tmp_path / "ca.pem", certificate=tmp_path / "s.pem", private_key=tmp_path / "s.key",
                             trust_root=tmp_path / "root.json")
    home.run_dir.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = {"name": "superlink", "pid": os.getpid(), "cmd": ["flower-superlink"], "log": "x.log", "started": legacy}
    dead = {**me, "name": "nginx", "pid": gone.pid, "started": legacy - 5}
    home.processes_file.write_text(json.dumps({"processes": [me, dead]}))
    rec = deploy.recorded(home)
    assert [p["started"] for p in rec["processes"]] == [process_started(), legacy - 5]
    _step_the_clock(monkeypatch, 120.0)
    assert [p["name"] for p in rec["processes"] if deploy._alive(p)] == ["superlink"]  # read before, judged after
    # read after the step, the older release's record is 120 s off its process: unknown
    for call in (deploy.running, deploy.stop):
        with pytest.raises(DataError, match=r"superlink: pid \d+ was recorded by an older fedpref .* clock step") as e:
            call(home)
        assert "\n" not in str(e.value)
    assert home.processes_file.exists()  # nothing stopped, nothing forgotten
