"""`fedpref-server start` and `stop` and the processes of a home, with real processes.

- One server per home: `start` takes an exclusive flock before its "already running?" check and
  its SuperLink inherits it, so a second `start` (concurrent, or while the server runs) is refused
  in one line with exit 33 and touches nothing (red-team finding: two concurrent starts both
  passed the check, with the TLS set-up and the SuperLink's start-up between check and write).
- `stop` ends the whole tree: Flower's SuperLink starts its SuperExec in a session of its own, and
  the SuperExec the `flwr-serverapp`, which signals to the SuperLink's process group never reach
  (the soak reported "killed 1 leftover processes" after every `stop`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpref.common.errors import AlreadyRunningError
from fedpref.common.processes import descendants, process_started, same_process, signal_process
from fedpref.server import deploy

BIN = Path(sys.executable).parent
ENV = dict(os.environ, FEDPREF_KEY_PASSPHRASE="server-processes-test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_home(root: Path) -> deploy.ServerHome:
    """A home `fedpref-server init` wrote, on free loopback ports."""
    port, link = _free_port(), _free_port()
    subprocess.run([str(BIN / "fedpref-server"), "init", "--home", str(root), "--address", f"127.0.0.1:{port}"],
                   check=True, capture_output=True, env=ENV, timeout=120)
    cfg = root / "config.toml"
    text = cfg.read_text()
    assert f'superlink = "127.0.0.1:{port + 1}"' in text
    cfg.write_text(text.replace(f'superlink = "127.0.0.1:{port + 1}"', f'superlink = "127.0.0.1:{link}"'))
    return deploy.ServerHome.load(root)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _mentioning(text: str) -> list[int]:
    """Running processes (not zombies) whose command line names ``text``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and same_process(int(pid), process_started(int(pid))):
            out.append(int(pid))
    return out


# --- one server per home ------------------------------------------------------------------------
def test_a_second_start_is_refused_in_one_line_while_another_holds_the_home(tmp_path: Path) -> None:
    home = _init_home(tmp_path / "ops")
    home.run_dir.mkdir(parents=True, exist_ok=True)
    home.processes_file.write_text('{"processes": []}')  # nothing recorded as running: only the lock refuses
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom pathlib import Path\nfrom fedpref.server import deploy\n"
        f"lock = deploy.hold_server_lock(deploy.ServerHome.load(Path({str(home.root)!r})))\n"
        "print('held', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"  # a `start` between its check and its SuperLink
        before = _snapshot(home.root)

        with pytest.raises(AlreadyRunningError, match="already running") as e:
            deploy.start(home, rounds=1, policy=None)
        assert "\n" not in str(e.value) and str(home.lock_file) in str(e.value)

        out = subprocess.run([str(BIN / "fedpref-server"), "start", "--home", str(home.root), "--detach"],
                             capture_output=True, text=True, env=ENV, timeout=120)
        assert out.returncode == 33, (out.returncode, out.stdout, out.stderr)  # ExitCode.ALREADY_RUNNING
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "already running" in lines[0], out.stderr
        assert "Traceback" not in out.stderr + out.stdout

        assert _snapshot(home.root) == before  # no record, log, config or policy written
        assert _mentioning(str(home.root)) == [holder.pid]  # nothing started but the holder
    finally:
        holder.kill()
        holder.wait()
    deploy.hold_server_lock(home).close()  # the killed holder's lock went with it


def test_stop_leaves_the_record_of_a_start_that_took_the_home_meanwhile(tmp_path: Path) -> None:
    """red-team: stop's SIGTERM frees the SuperLink's lock while a ServerApp lingers; a new start
    takes the home and writes its record; stop must not then delete it (the new server would be
    untracked, and every later start refused)."""
    home = _init_home(tmp_path / "ops")
    home.run_dir.mkdir(parents=True, exist_ok=True)
    home.processes_file.write_text('{"processes": []}')  # what this stop read: nothing alive
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom pathlib import Path\nfrom fedpref.server import deploy\n"
        f"lock = deploy.hold_server_lock(deploy.ServerHome.load(Path({str(home.root)!r})))\n"
        "print('held', flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"  # the new start holds the lock
        assert deploy.stop(home) == []
        assert home.processes_file.read_text() == '{"processes": []}'  # not removed under another's lock
    finally:
        holder.kill()
        holder.wait()
    home.processes_file.write_text('{"processes": [], "started_at": "new"}')
    raw = home.processes_file.read_bytes()
    # a record that changed between stop's read and its removal stays (the new start's)
    orig = deploy._read_record_bytes
    calls = []

    def changed(h):  # noqa: ANN001
        calls.append(1)
        return raw if len(calls) == 1 else b"another start's record"
    deploy._read_record_bytes = changed
    try:
        deploy.stop(home)
    finally:
        deploy._read_record_bytes = orig
    assert home.processes_file.exists()
    deploy.stop(home)  # unchanged, lock free: removed
    assert not home.processes_file.exists()


# --- stop ends the whole tree ---------------------------------------------------------------------
# A stand-in for the SuperLink: it starts a "SuperExec" in a session of its own (Flower does, with
# start_new_session), which starts a "ServerApp" in the SuperExec's group; then it waits.
_SERVERAPP = "import signal, time\nif {ignore}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)\n"
_SUPEREXEC = ("import subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-c', {serverapp!r}])\n"
              "print(p.pid, flush=True)\ntime.sleep(300)\n")
_SUPERLINK = ("import subprocess, sys, time\nfrom pathlib import Path\n"
              "x = subprocess.Popen([sys.executable, '-c', {superexec!r}], stdout=subprocess.PIPE, text=True, "
              "start_new_session=True)\n"
              "app = int(x.stdout.readline())\n"
              "Path({out!r}).write_text(f'{{x.pid}} {{app}}')\ntime.sleep(300)\n")


def _fake_server(tmp_path: Path, *, ignore_sigterm: bool) -> tuple[deploy.ServerHome, dict, list[tuple[int, float]]]:
    """A home whose record names a running stand-in SuperLink; the (pid, start) of its SuperExec and ServerApp."""
    home = deploy.ServerHome(root=tmp_path, address="127.0.0.1:9092", superlink="127.0.0.1:9093",
                             ca=tmp_path / "ca.pem", certificate=tmp_path / "s.pem", private_key=tmp_path / "s.key",
                             trust_root=tmp_path / "root.json")
    home.run_dir.mkdir(parents=True)
    pids = tmp_path / "pids"
    code = _SUPERLINK.format(superexec=_SUPEREXEC.format(serverapp=_SERVERAPP.format(ignore=ignore_sigterm)),
                             out=str(pids))
    link = deploy._spawn("superlink", [sys.executable, "-c", code], home.logs / "superlink.log", dict(os.environ))
    deploy._save_processes(home, [link])
    deadline = time.monotonic() + 30
    while not (pids.exists() and pids.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [(int(pid), process_started(int(pid))) for pid in pids.read_text().split()]
    assert all(same_process(pid, started) for pid, started in tree)
    return home, link, tree


def _kill(procs: list[tuple[int, float]]) -> None:
    for pid, started in procs:
        signal_process(pid, started, signal.SIGKILL)


def test_stop_ends_the_processes_flower_starts_in_sessions_of_their_own(tmp_path: Path) -> None:
    home, link, tree = _fake_server(tmp_path, ignore_sigterm=False)
    (superexec, _), (serverapp, _) = tree
    try:
        found = {d.pid: d for d in descendants(link["pid"], link["started"])}
        assert found[superexec].leader and found[serverapp].pgid == superexec  # outside the SuperLink's group
        t = time.monotonic()
        assert deploy.stop(home) == ["superlink"]
        assert time.monotonic() - t < deploy.CHILDREN_GRACE_S  # they ended at the SIGTERM, no grace waited out
        assert not same_process(link["pid"], link["started"])
        alive = [pid for pid, started in tree if same_process(pid, started)]
        assert alive == [], f"stop left {alive} (SuperExec {superexec}, ServerApp {serverapp}) running"
        assert not home.processes_file.exists()
    finally:
        _kill([*tree, (link["pid"], link["started"])])


def test_stop_kills_what_ignores_its_sigterm(tmp_path: Path) -> None:
    home, link, tree = _fake_server(tmp_path, ignore_sigterm=True)
    try:
        t = time.monotonic()
        assert deploy._terminate([link], grace=1.0, children_grace=1.0) == ["superlink"]
        assert time.monotonic() - t < 1.0 + 1.0 + deploy.REAP_WAIT_S + 2.0
        assert [pid for pid, started in tree if same_process(pid, started)] == []
    finally:
        _kill([*tree, (link["pid"], link["started"])])


def test_a_recycled_pid_is_never_signalled() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_started(proc.pid)
        later = started + 100.0  # what a later process under the same pid would have recorded
        assert not signal_process(proc.pid, later, signal.SIGTERM)
        assert descendants(proc.pid, later) == [] and descendants(os.getpid(), process_started())
        assert proc.poll() is None
        assert signal_process(proc.pid, started, 0) and signal_process(proc.pid, started, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert not signal_process(proc.pid, started, signal.SIGTERM)  # a zombie, then gone: not signalled
    finally:
        proc.kill()
        proc.wait()


# --- the same with Flower's own processes ---------------------------------------------------------------
_SLEEPER = """import os, time
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    with open({marker!r} + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace({marker!r} + ".tmp", {marker!r})
    time.sleep(600)
"""


@pytest.mark.slow  # a real SuperLink, SuperExec, flwr-serverapp and nginx (about 15 s)
def test_stop_ends_a_real_superlinks_serverapp_and_start_waits_for_its_lock(tmp_path: Path) -> None:
    if shutil.which("nginx") is None and not os.access("/usr/sbin/nginx", os.X_OK):
        if os.environ.get("FEDPREF_REQUIRE_NGINX") == "1":
            raise RuntimeError("nginx is required (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    home = _init_home(tmp_path / "ops")
    marker = tmp_path / "serverapp.pid"
    home.app_dir.mkdir(parents=True, exist_ok=True)
    (home.app_dir / "sleeper.py").write_text(_SLEEPER.format(marker=str(marker)))
    started = deploy.start(home, rounds=1, policy=None, serverapp="sleeper:app")
    try:
        started.lock.close()  # as a detached `start` exits: the SuperLink still holds the home's lock
        with pytest.raises(AlreadyRunningError, match="already running"):
            deploy.hold_server_lock(home)
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        serverapp = int(marker.read_text())
        app_started = process_started(serverapp)
        link = started.processes[0]
        tree = {d.pid: d for d in descendants(link["pid"], link["started"])}
        assert serverapp in tree and tree[serverapp].pgid != link["pid"]  # Flower's session, not the SuperLink's
        t = time.monotonic()
        assert deploy.stop(home) == ["superlink", "nginx"]
        assert time.monotonic() - t < 15
        assert not same_process(serverapp, app_started), "flwr-serverapp outlived `fedpref-server stop`"
        assert _mentioning(str(home.root)) == []
        deploy.hold_server_lock(home).close()  # the SuperLink's lock went with it
    finally:
        deploy.stop(home)
