"""A device agent restarted after a crash (SIGKILL, power cut): it finds the node id its last
accepted session had, stops a SuperNode the dead agent left running, ends its earlier session
on the server and retries activation with bounded backoff. Real processes and files; the
end-to-end case (a real SuperLink refusing, then accepting) is in ``test_deployment.py`` and
``scripts/soak.sh``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedpref.client.agent import _identity
from fedpref.client.agent_home import AgentHome
from fedpref.client.supervisor import (
    ACTIVATION_BACKOFF_S,
    STALE_SESSION_WAIT_S,
    activation_backoff,
    end_stale_session,
    last_node_id,
    orphaned_supernode,
    running_pid,
    stop_orphan,
)
from fedpref.common.processes import process_started, same_process
from fedpref.model.config import ModelConfig
from fedpref.server.tls import write_tls


def test_last_node_id_is_the_last_accepted_session(tmp_path) -> None:  # noqa: ANN001
    log = tmp_path / "supernode.log"
    assert last_node_id(log) is None  # no log: never accepted
    log.write_bytes(b"INFO :      Starting Flower SuperNode\n")
    assert last_node_id(log) is None
    first = b"\x1b[92mINFO \x1b[0m:      SuperNode ID: 3137798435383382521\n"
    log.write_bytes(b"Starting\n" + first + b"Push replies\n" * 100)
    assert last_node_id(log) == 3137798435383382521
    mark = log.stat().st_size
    with log.open("ab") as f:  # a later session, re-registered by the operator under a new id
        f.write(b"Starting\nSuperNode ID: 42\nFailed to activate SuperNode\n")
    assert last_node_id(log) == 42
    assert last_node_id(log, before=mark) == 3137798435383382521  # what the log held before a start


def test_activation_backoff_is_bounded() -> None:
    waits, waited, attempt = [], 0.0, 0
    while (d := activation_backoff(attempt, waited)) is not None:
        waits.append(d)
        waited += d + 3.0  # each refused start also takes a few seconds
        attempt += 1
    assert waits[: len(ACTIVATION_BACKOFF_S)] == list(ACTIVATION_BACKOFF_S)[: len(waits)]
    assert max(waits) == max(ACTIVATION_BACKOFF_S)
    # it stops once the server has refused for longer than two of Flower's heartbeats (30 s) and a margin
    assert 60.0 < STALE_SESSION_WAIT_S <= 90.0
    assert waited - 3.0 <= STALE_SESSION_WAIT_S + max(ACTIVATION_BACKOFF_S)
    assert activation_backoff(0, STALE_SESSION_WAIT_S) is None
    assert activation_backoff(10, STALE_SESSION_WAIT_S - 0.5) == pytest.approx(0.5)


@pytest.fixture
def home(tmp_path):  # noqa: ANN001, ANN201
    """A device's home as the supervisor sees it: its ECDSA key, the server's CA, a server address
    where nothing listens."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    tls = write_tls(tmp_path / "tls", "127.0.0.1")
    private, _ = _identity()
    (tmp_path / "device" / "identity").mkdir(parents=True)
    (tmp_path / "device" / "identity" / "node.key").write_bytes(private)
    return AgentHome(root=tmp_path / "device", server=f"127.0.0.1:{port}", ca=tls.ca_cert, model=ModelConfig())


def _session(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(list(argv), start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_an_orphaned_supernode_of_a_dead_agent_is_stopped(home) -> None:  # noqa: ANN001
    # the dead agent started its SuperNode (a session of its own) and died: the SuperNode outlives it
    agent = subprocess.run([sys.executable, "-c", (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(os.getpid(), p.pid)")], capture_output=True, text=True, check=True)
    agent_pid, node_pid = map(int, agent.stdout.split())
    node_started = process_started(node_pid)
    try:
        home.pid_file.parent.mkdir(parents=True, exist_ok=True)
        home.pid_file.write_text(f"{agent_pid} 1.0 {node_pid} {node_started!r}\n")
        assert running_pid(home) is None
        orphan = orphaned_supernode(home)
        assert orphan == (node_pid, node_started)
        t = time.monotonic()
        stop_orphan(orphan)
        assert time.monotonic() - t < 5  # it stopped at the SIGTERM, without waiting out the grace
        assert not same_process(node_pid, node_started)
        assert orphaned_supernode(home) is None  # gone now
    finally:
        if same_process(node_pid, node_started):
            os.kill(node_pid, signal.SIGKILL)


def test_no_orphan_while_the_agent_runs_or_with_an_old_pidfile(home) -> None:  # noqa: ANN001
    node = _session(sys.executable, "-c", "import time; time.sleep(120)")
    try:
        home.pid_file.parent.mkdir(parents=True, exist_ok=True)
        # the agent (this process) runs: its SuperNode is no orphan
        home.pid_file.write_text(f"{os.getpid()} {process_started()!r} {node.pid} {process_started(node.pid)!r}\n")
        assert orphaned_supernode(home) is None
        home.pid_file.write_text("12345 1.0\n")  # an older agent's pidfile: no SuperNode recorded
        assert orphaned_supernode(home) is None
        home.pid_file.write_text(f"1 1.0 {node.pid} 1.0\n")  # a recycled pid (another start time)
        assert orphaned_supernode(home) is None
    finally:
        node.kill()
        node.wait()


def test_ending_a_session_on_an_unreachable_server_is_a_no_op(home) -> None:  # noqa: ANN001
    t = time.monotonic()
    assert end_stale_session(home, 3137798435383382521, timeout=5) is False
    assert time.monotonic() - t < 10


def test_an_older_agents_wall_clock_pidfile(home) -> None:  # noqa: ANN001
    """A pidfile written by the previous release holds a wall-clock start: it still identifies
    the running agent, and a live pid it no longer matches is refused in one line (it may be that
    agent after a clock step), never reported as 'not running' (forget would then proceed)."""
    import psutil

    from fedpref.common.processes import UnknownProcessError

    home.pid_file.parent.mkdir(parents=True, exist_ok=True)
    home.pid_file.write_text(f"{os.getpid()} {psutil.Process().create_time()!r}\n")
    assert running_pid(home) == os.getpid()
    home.pid_file.write_text(f"{os.getpid()} {psutil.Process().create_time() - 3600!r}\n")
    with pytest.raises(UnknownProcessError, match="clock step"):
        running_pid(home)
    assert orphaned_supernode(home) is None  # and nothing is signalled on such a record


def test_two_starts_on_one_home_cannot_both_pass(home) -> None:  # noqa: ANN001
    """Red-team finding: two concurrent `fedpref-agent start` both passed the pidfile check (the
    TLS preflight sat between check and write). The agent lock is taken first, by a real second
    process here, and the kernel drops it when its holder dies, SIGKILL included."""
    from fedpref.client.supervisor import SuperNode, hold_agent_lock
    from fedpref.common.errors import AlreadyRunningError

    code = ("import sys, time\nfrom pathlib import Path\n"
            "from fedpref.client.agent_home import AgentHome\nfrom fedpref.model.config import ModelConfig\n"
            "from fedpref.client.supervisor import hold_agent_lock\n"
            f"h = AgentHome(root=Path({str(home.root)!r}), server='127.0.0.1:1', ca=Path('x'), model=ModelConfig())\n"
            "lock = hold_agent_lock(h)\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunningError, match="another fedpref-agent"):
            hold_agent_lock(home)
        with pytest.raises(AlreadyRunningError):  # start refuses before its preflight: no pidfile written
            SuperNode.start(home)
        assert not home.pid_file.exists()
    finally:
        holder.kill()
        holder.wait()
    lock = hold_agent_lock(home)  # the killed holder's lock is gone with it
    lock.close()
