"""The Flower SuperNode a device runs (``fedpref-agent start``): the TLS preflight, the pidfile
and the supervision of the SuperNode's process group.

The pidfile (``run/agent.pid``) holds the pid of the supervising ``fedpref-agent`` process and
its start time: the two identify it, so a pid the system has since given to another program
never counts as a running agent. The SuperNode runs in its own session; its group is signalled
only while its leader's pid has not been recycled (:func:`fedpref.common.processes.signal_group`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
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
from fedpref.common.processes import flower_env, process_started, same_process, signal_group

# Flower's SuperExec and ClientApps stop by themselves once their SuperNode is gone (s).
CHILDREN_GRACE_S = 10.0


def running_pid(h: AgentHome) -> int | None:
    """The pid of the agent that runs the SuperNode of ``h``, or None (no pidfile, a stale
    one, or one whose pid now belongs to another process)."""
    try:
        pid, started = h.pid_file.read_text().split()[:2]
        return int(pid) if same_process(int(pid), float(started)) else None
    except (OSError, ValueError):  # no file; not "PID START" (a stale file of an older agent)
        return None


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

    @property
    def pid(self) -> int:
        return self.child.pid

    @classmethod
    def start(cls, h: AgentHome, *, max_wait: float | None = None) -> SuperNode:
        """Refuse a second agent on ``h``, check the server (TLS against the pinned CA), write
        the pidfile and start ``flower-supernode`` in its own session, logging to ``h.log_file``.

        Flower's telemetry and update check are off: nothing phones home, no device id is written.
        """
        from fedpref.common.atomic import write_text_atomic

        if (pid := running_pid(h)) is not None:
            raise AlreadyRunningError(f"the agent of {h.root} is already running (pid {pid})")
        preflight(h.server, h.ca)
        cmd = supernode_command(h, max_wait=max_wait)
        h.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = flower_env(h.flwr_home)
        write_text_atomic(h.pid_file, f"{os.getpid()} {process_started()!r}\n")
        log = open(h.log_file, "ab", buffering=0)
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return cls(h, child, process_started(child.pid), log)

    def supervise(self) -> None:
        """Wait for the SuperNode; SIGTERM and SIGINT stop it. Removes the pidfile. Returns
        when it stopped cleanly; raises :class:`NodeRejectedError` if the server refused this
        device, :class:`FedPrefError` for any other exit."""

        def _stop(signum: int, _frame: object) -> None:
            if self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            rc = self._wait()
        finally:
            self.home.pid_file.unlink(missing_ok=True)
            self.log.close()
        if rc in (0, -signal.SIGTERM, -signal.SIGINT):
            return
        h = self.home
        tail = h.log_file.read_text(errors="replace")[-4000:]
        if "Failed to activate SuperNode" in tail:
            # Flower answers both cases with the same code (2004): a key it does not know, and a node
            # it still counts as online because an earlier session of this device ended without
            # saying so (a crash, a SIGKILL, a power cut) and its last heartbeat has not expired yet.
            raise NodeRejectedError(f"the server refused this device: its key is not registered (give "
                                    f"{h.public_key_file} to the operator: fedpref-server nodes add), or the "
                                    "server still counts an earlier session of this device that ended without "
                                    "stopping (a crash) as connected, until two of its heartbeats are missed "
                                    "(about a minute): then start it again")
        raise FedPrefError(f"the SuperNode exited with code {rc}; see {h.log_file}")

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
