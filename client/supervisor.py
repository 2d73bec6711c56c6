"""The Flower SuperNode a device runs (``fedpref-agent start``): the TLS preflight, the pidfile
and the supervision of the SuperNode's process group.

The pidfile (``run/agent.pid``) holds the pid of the supervising ``fedpref-agent`` process and
its start time: the two identify it, so a pid the system has since given to another program
never counts as a running agent; then the pid and start time of its SuperNode. The SuperNode
runs in its own session; its group is signalled only while its leader's pid has not been
recycled (:func:`fedpref.common.processes.signal_group`).

**A restart after a crash.** Flower's SuperLink counts a SuperNode session online until two of
its heartbeats (30 s apart) are missed, and refuses to activate the same node meanwhile. An
agent that ended without stopping its SuperNode (SIGKILL, power cut) leaves such a session. The
next ``start`` therefore stops a SuperNode the dead agent left running, ends the earlier session
itself (Flower's ``DeactivateNode``, signed with the device key: the server accepts it only for
the node registered to that key), and if activation is still refused while the key is known to
have been accepted before, tries again with backoff for up to :data:`STALE_SESSION_WAIT_S`
before giving up with exit 35.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedpref.client.agent_home import AgentHome
from fedpref.client.app import NODE_CONFIG_KEY
from fedpref.common.errors import (
    AlreadyRunningError,
    ConfigError,
    FedPrefError,
    NodeRejectedError,
    ServerUnreachableError,
    TlsVerificationError,
)
from fedpref.common.netaddr import parse_address
from fedpref.common.processes import (
    UnknownProcessError,
    flower_env,
    hold_exclusive_lock,
    process_started,
    same_process,
    signal_group,
    upgrade_legacy_start,
)

# Flower's SuperExec and ClientApps stop by themselves once their SuperNode is gone (s).
CHILDREN_GRACE_S = 10.0
# Flower's SuperNode heartbeat (flwr.common.constant.HEARTBEAT_DEFAULT_INTERVAL, s); its SuperLink
# counts a session online until two are missed (HEARTBEAT_PATIENCE)
FLOWER_HEARTBEAT_S = 30.0
# how long a restarted agent keeps trying while the server still counts its earlier session online
STALE_SESSION_WAIT_S = 2 * FLOWER_HEARTBEAT_S + 15.0
ACTIVATION_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0)  # waits between tries, the last one repeated
ACTIVATION_REFUSED = "Failed to activate SuperNode"
_NODE_ID = re.compile(rb"SuperNode ID: (\d+)")
_NODE_ID_SCAN_BYTES = 16 << 20  # how far back supernode.log is searched for the node id


def hold_agent_lock(h: AgentHome) -> BinaryIO:
    """An exclusive ``flock`` on ``<pidfile>.lock`` (:func:`~fedpref.common.processes.hold_exclusive_lock`),
    or AlreadyRunningError. The caller keeps the returned file open for as long as its agent runs;
    the kernel releases the lock when the process ends, however it ends (SIGKILL included), so a
    crash never leaves it behind. Two concurrent ``start`` runs can no longer both pass the pidfile
    check (each used to check, spend up to 10 s in the TLS preflight, then write)."""
    return hold_exclusive_lock(h.pid_file.with_name(h.pid_file.name + ".lock"),
                               busy=f"another fedpref-agent is starting or running on {h.root}; "
                                    "stop it first (fedpref-agent status shows it)")


def running_pid(h: AgentHome) -> int | None:
    """The pid of the agent that runs the SuperNode of ``h``, or None (no pidfile, a stale
    one, or one whose pid now belongs to another process)."""
    try:
        pid, started = h.pid_file.read_text().split()[:2]
        pid_n, start = int(pid), float(started)
    except (OSError, ValueError):  # no file; not "PID START" (a stale file of an older agent)
        return None
    # a wall-clock start written by an older fedpref: today's clock-step-proof form when it still
    # matches; a process it no longer matches is refused (UnknownProcessError), never taken for "not running"
    start = upgrade_legacy_start(pid_n, start)
    return pid_n if same_process(pid_n, start) else None


def orphaned_supernode(h: AgentHome) -> tuple[int, float] | None:
    """(pid, start time) of the SuperNode a dead agent of ``h`` left running, from a stale
    pidfile (``AGENT_PID AGENT_START NODE_PID NODE_START``); None if there is none."""
    try:
        fields = h.pid_file.read_text().split()
        if len(fields) < 4:
            return None
        agent, agent_start, pid, started = int(fields[0]), float(fields[1]), int(fields[2]), float(fields[3])
    except (OSError, ValueError):
        return None
    try:
        if same_process(agent, upgrade_legacy_start(agent, agent_start)):
            return None
        started = upgrade_legacy_start(pid, started)
    except UnknownProcessError:  # an older record no process matches for sure: signal nothing
        return None
    return (pid, started) if signal_group(pid, started, 0) else None


def stop_orphan(orphan: tuple[int, float], *, grace: float = CHILDREN_GRACE_S) -> None:
    """Stop (SIGTERM, then SIGKILL after ``grace``) the SuperNode group ``orphan`` (pid, start
    time: :func:`orphaned_supernode`): a SuperNode stopped so ends its own session."""
    pid, started = orphan
    signal_group(pid, started, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and signal_group(pid, started, 0):
        time.sleep(0.2)
    signal_group(pid, started, signal.SIGKILL)


def last_node_id(log_file: Path, *, before: int | None = None) -> int | None:
    """The node id the server gave this device's last accepted session (Flower's SuperNode logs
    ``SuperNode ID: N`` once activated), from ``log_file`` up to byte ``before``; None if no
    session of this device was ever accepted (or the log is gone)."""
    try:
        with open(log_file, "rb") as f:
            end = f.seek(0, os.SEEK_END) if before is None else before
            start = max(0, end - _NODE_ID_SCAN_BYTES)
            f.seek(start)
            ids = _NODE_ID.findall(f.read(end - start))
    except OSError:
        return None
    return int(ids[-1]) if ids else None


def activation_backoff(attempt: int, waited: float, *, limit: float = STALE_SESSION_WAIT_S) -> float | None:
    """Seconds to wait before the next start after ``attempt`` refused ones (``waited`` s since
    the first), or None: stop trying (the server refused this device for ``limit`` s)."""
    if waited >= limit:
        return None
    step = ACTIVATION_BACKOFF_S[min(attempt, len(ACTIVATION_BACKOFF_S) - 1)]
    return max(0.0, min(step, limit - waited))


def end_stale_session(h: AgentHome, node_id: int, *, timeout: float = 10.0) -> bool:
    """Ask the server to count this device's earlier session (node ``node_id``) offline: Flower's
    ``DeactivateNode``, which a SuperNode sends itself when it stops, signed with the device key
    over TLS to the pinned CA (the server accepts it only for the node registered to this key).
    True if the server did; False if it refused (the session is already offline, or the node
    is not this key's) or could not be reached."""
    import httpx
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    try:
        key = load_ssh_private_key(h.key_file.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"device key {h.key_file}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"device key {h.key_file}: not an ECDSA key")
    host, port = parse_address(h.server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ctx = ssl.create_default_context(cafile=str(h.ca))
    client = FleetHttpClient(f"https://{address}", verify=ctx, timeout=timeout, interceptors=[
        RuntimeVersionHttpInterceptor(component_name="SuperNode"), NodeAuthHttpInterceptor(key, key.public_key())])
    with client:
        try:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except (httpx.HTTPError, ValueError, RuntimeError):  # refused, or not reachable: nothing to end
            return False
    return True


def preflight(address: str, ca: Path, *, timeout: float = 10.0) -> None:
    """Reach the server and verify its certificate against the pinned CA (one-line errors)."""

    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ServerUnreachableError(f"server {address} is unreachable ({e.strerror or e}); check the address "
                                     "and that the operator has started the server") from None
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as e:
        raise TlsVerificationError(f"server {address}: its certificate does not verify against {ca} "
                                   f"({e.verify_message}); get the operator's tls/ca.pem") from None
    except (ssl.SSLError, OSError) as e:
        raise ServerUnreachableError(f"server {address}: TLS handshake failed ({e}); is it a fedpref server?") from None
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supernode_command(h: AgentHome, *, max_wait: float | None = None) -> list[str]:
    """``flower-supernode`` with TLS to the server and the device key (this Python's first)."""
    exe = shutil.which("flower-supernode", path=os.path.dirname(sys.executable)) or shutil.which("flower-supernode")
    if exe is None:
        raise ConfigError("flower-supernode not found; install fedpref (it depends on flwr) in this environment")
    cmd = [exe, "--root-certificates", str(h.ca), "--superlink", h.server,
           "--auth-supernode-private-key", str(h.key_file),
           "--node-config", f'{NODE_CONFIG_KEY}="{h.root}"', "--port", str(_free_port())]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


@dataclass
class SuperNode:
    """A SuperNode this process started for ``home``; :meth:`supervise` waits for it."""

    home: AgentHome
    child: subprocess.Popen
    started: float | None  # the child's start time: with its pid, the identity of its group
    log: BinaryIO
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_offset: int = 0  # where this SuperNode's output starts in the log
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: BinaryIO | None = None  # the agent lock (hold_agent_lock), held for this agent's lifetime

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    def start(cls, h: AgentHome, *, max_wait: float | None = None) -> SuperNode:
        """Refuse a second agent on ``h``, check the server (TLS against the pinned CA), write
        the pidfile and start ``flower-supernode`` in its own session, logging to ``h.log_file``.
        After an agent that did not stop cleanly (its pidfile is left), first stop the SuperNode
        it left running and end its session on the server (:func:`end_stale_session`).

        Flower's telemetry and update check are off: nothing phones home, no device id is written.
        """
        from fedpref.common.atomic import write_text_atomic

        lock = hold_agent_lock(h)  # held until this process exits: a second start cannot slip in
        if (pid := running_pid(h)) is not None:  # an agent of an older release holds no lock
            lock.close()
            raise AlreadyRunningError(f"the agent of {h.root} is already running (pid {pid})")
        preflight(h.server, h.ca)
        cmd = supernode_command(h, max_wait=max_wait)
        h.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = flower_env(h.flwr_home)
        crashed = h.pid_file.exists()  # a pidfile without its agent: the last one did not stop cleanly
        orphan = orphaned_supernode(h) if crashed else None
        write_text_atomic(h.pid_file, f"{os.getpid()} {process_started()!r}\n")
        if orphan is not None:
            stop_orphan(orphan)
        if crashed:
            if (node_id := last_node_id(h.log_file)) is not None:
                end_stale_session(h, node_id)
        log = open(h.log_file, "ab", buffering=0)
        node = cls(h, None, None, log, cmd=cmd, env=env, lock=lock)  # type: ignore[arg-type]
        node._spawn()
        return node

    def _spawn(self) -> None:
        """Start ``flower-supernode`` (again) and record it in the pidfile after the agent."""
        from fedpref.common.atomic import write_text_atomic

        self.log_offset = self.log.seek(0, os.SEEK_END)
        self.child = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                      start_new_session=True)
        self.started = process_started(self.child.pid)
        write_text_atomic(self.home.pid_file, f"{os.getpid()} {process_started()!r} {self.child.pid} {self.started!r}\n")

    def _output(self) -> str:
        """What the current SuperNode wrote to the log (its last 4000 characters)."""
        try:
            with open(self.home.log_file, "rb") as f:
                f.seek(max(self.log_offset, f.seek(0, os.SEEK_END) - 4000))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def supervise(self) -> None:
        """Wait for the SuperNode; SIGTERM and SIGINT stop it. Removes the pidfile. Returns
        when it stopped cleanly; raises :class:`NodeRejectedError` if the server refused this
        device, :class:`FedPrefError` for any other exit."""

        def _stop(signum: int, _frame: object) -> None:
            self.stopping.set()
            if self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            rc, tail = self._run()
        finally:
            self.home.pid_file.unlink(missing_ok=True)
            self.log.close()
        if rc in (0, -signal.SIGTERM, -signal.SIGINT) or self.stopping.is_set():
            return
        h = self.home
        if ACTIVATION_REFUSED in tail:
            # Flower answers both cases with the same code (2004): a key it does not know, and a node
            # it still counts as online because an earlier session of this device ended without
            # saying so (a crash, a SIGKILL, a power cut) and its last heartbeat has not expired yet.
            # The second is retried in _run (for a device the server accepted before) until it expires.
            if last_node_id(h.log_file, before=self.log_offset) is None:
                raise NodeRejectedError(f"the server refused this device: its key is not registered (give "
                                        f"{h.public_key_file} to the operator: fedpref-server nodes add)")
            raise NodeRejectedError(f"the server refused this device for {STALE_SESSION_WAIT_S:.0f} s although it "
                                    "accepted it before: its key is no longer registered (fedpref-server nodes "
                                    "list), or another agent with this device's key is connected")
        raise FedPrefError(f"the SuperNode exited with code {rc}; see {h.log_file}")

    def _run(self) -> tuple[int, str]:
        """Wait for the SuperNode; while the server refuses to activate a device it accepted
        before (its earlier session still counts as online), end that session and start the
        SuperNode again, with backoff, for up to :data:`STALE_SESSION_WAIT_S`. Returns the last
        exit code and that SuperNode's output."""
        first, attempt = time.monotonic(), 0
        while True:
            rc = self._wait()
            tail = self._output()
            if rc == 0 or self.stopping.is_set() or ACTIVATION_REFUSED not in tail:
                return rc, tail
            node_id = last_node_id(self.home.log_file, before=self.log_offset)
            delay = activation_backoff(attempt, time.monotonic() - first) if node_id is not None else None
            if delay is None:  # never accepted (an unregistered key), or refused for too long
                return rc, tail
            print(f"fedpref-agent: the server still counts an earlier session of this device (node {node_id}) "
                  f"as connected; ending it and starting again in {delay:.0f} s", file=sys.stderr, flush=True)
            end_stale_session(self.home, node_id)
            if self.stopping.wait(delay):
                return rc, tail
            attempt += 1
            self._spawn()

    def _wait(self) -> int:
        rc = self.child.wait()  # a SIGTERM/SIGINT runs _stop, then the wait resumes (PEP 475)
        # The SuperNode's SuperExec and ClientApps (its session) watch it and stop themselves with
        # one SIGINT once it is gone; a SIGTERM from here at that moment is a second signal in the
        # middle of their graceful exit, which Python turns into a KeyboardInterrupt traceback in
        # supernode.log. Give them that time; then stop whatever is left.
        deadline = time.monotonic() + CHILDREN_GRACE_S
        while time.monotonic() < deadline:
            if not signal_group(self.pid, self.started, 0):
                return rc
            time.sleep(0.2)
        signal_group(self.pid, self.started, signal.SIGTERM)
        return rc
