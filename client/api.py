"""The device agent's local gRPC API (``fedpref-agent serve``), server side and client side.

Apps on the device talk to the agent through :func:`connect`; the agent exposes its
:class:`AgentBackend` with :func:`serve`. The API has no authentication, so it listens only
where the device's own users can reach it: a unix socket (mode 0600, in a 0700 folder that
:func:`serve` creates) or a loopback port. It never listens on another interface.

Errors cross the wire as gRPC status codes: a backend :class:`DataError` or a request that
fails validation becomes ``INVALID_ARGUMENT``; a :class:`ConfigError` or any other
:class:`FedPrefError` becomes ``FAILED_PRECONDITION``; anything else becomes ``INTERNAL``
(traceback in the agent's log only). :class:`AgentClient` maps them back: ``INVALID_ARGUMENT``
to :class:`DataError`, everything else to :class:`ConfigError` (or :class:`FedPrefError` for
unexpected codes), each with the server's one-line message.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket as _socket
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

import grpc

from fedpref.common.errors import ConfigError, DataError, FedPrefError
from fedpref.protocol import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

MAX_CANDIDATES = 64
MAX_TEXT_CHARS = 8192
DEFAULT_TIMEOUT_S = 60.0
_MAX_DETAIL_CHARS = 1000  # a status message travels in a trailer; keep it short
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes on Linux, including the final NUL

T = TypeVar("T")


class AgentBackend(Protocol):
    """What the agent does; :func:`serve` exposes it. Raise FedPrefError subclasses on purpose."""

    def add_feedback(self, prompt: str, chosen: str, rejected: str) -> tuple[int, int]:
        """Store one pair; return ``(id, total pairs stored)``."""
        ...

    def rank(self, prompt: str, candidates: list[str]) -> tuple[list[dict], int]:
        """Return candidates best first, each a dict with keys ``candidate``,
        ``personal_score``, ``unsafe_categories`` (list[str]), ``allowed``, ``reason``;
        and the safety policy version (0: none). The agent's reward model scores each candidate
        alone: ``prompt`` is checked (:meth:`AgentServicer.Rank`) but not scored."""
        ...

    def status(self) -> dict:
        """Keys: pairs, adapter_version, policy_version, epsilon_sample, delta, server,
        node_public_key."""
        ...

    def forget(self) -> dict:
        """Delete pairs, adapter and accountant (never the identity). Keys: pairs_deleted,
        adapter_deleted, accountant_deleted."""
        ...


# ---- server ---------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_DETAIL_CHARS else line[: _MAX_DETAIL_CHARS - 3] + "..."


def _check_text(name: str, value: str) -> str | None:
    """The problem with one request string, or None."""
    if not value.strip():
        return f"{name} is empty"
    if len(value) > MAX_TEXT_CHARS:
        return f"{name} has {len(value)} characters; the limit is {MAX_TEXT_CHARS}"
    return None


class AgentServicer(agent_pb2_grpc.AgentServicer):
    """Maps the four RPCs (gRPC's CamelCase method names) onto an :class:`AgentBackend`.

    Backend calls are serialised by a lock, so a backend need not be thread-safe; it is
    called from gRPC's worker threads, though, not the thread that built it.
    """

    def __init__(self, backend: AgentBackend) -> None:
        self.backend = backend
        self._lock = threading.Lock()

    def _call(self, context: grpc.ServicerContext, rpc: str, fn: Callable[[], T]) -> T:
        try:
            with self._lock:
                return fn()
        except DataError as e:
            code, msg = grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(e))
        except FedPrefError as e:  # ConfigError, budget, integrity: the state forbids it
            code, msg = grpc.StatusCode.FAILED_PRECONDITION, _one_line(str(e))
        except Exception as e:
            log.exception("agent API: %s failed", rpc)
            code = grpc.StatusCode.INTERNAL
            msg = f"internal error in the agent during {rpc} ({type(e).__name__}); see the agent log"
        context.abort(code, msg or code.name.lower())
        raise AssertionError("unreachable: context.abort raises")

    @staticmethod
    def _reject(context: grpc.ServicerContext, problems: list[str | None]) -> None:
        found = [p for p in problems if p]
        if found:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _one_line("; ".join(found)))

    def AddFeedback(self, request, context):
        self._reject(context, [_check_text("prompt", request.prompt),
                               _check_text("chosen", request.chosen),
                               _check_text("rejected", request.rejected)])
        pair_id, total = self._call(context, "AddFeedback", lambda: self.backend.add_feedback(
            request.prompt, request.chosen, request.rejected))
        return agent_pb2.AddFeedbackReply(id=int(pair_id), total=int(total))

    def Rank(self, request, context):
        cands = list(request.candidates)
        problems = [_check_text("prompt", request.prompt)]
        if not cands:
            problems.append("no candidates; send 1 to 64")
        elif len(cands) > MAX_CANDIDATES:
            problems.append(f"{len(cands)} candidates; the limit is {MAX_CANDIDATES}")
        else:
            problems += [_check_text(f"candidate {i}", c) for i, c in enumerate(cands)]
        self._reject(context, problems)

        def run() -> agent_pb2.RankReply:
            ranked, policy_version = self.backend.rank(request.prompt, cands)
            return agent_pb2.RankReply(policy_version=int(policy_version or 0), ranked=[
                agent_pb2.RankedCandidate(
                    candidate=r["candidate"], personal_score=float(r["personal_score"]),
                    unsafe_categories=list(r.get("unsafe_categories") or []),
                    allowed=bool(r["allowed"]), reason=r.get("reason") or "", position=i)
                for i, r in enumerate(ranked)])

        return self._call(context, "Rank", run)

    def Status(self, request, context):
        def run() -> agent_pb2.StatusReply:
            s = self.backend.status()
            return agent_pb2.StatusReply(
                pairs=int(s["pairs"]), adapter_version=s.get("adapter_version") or "",
                policy_version=int(s.get("policy_version") or 0),
                epsilon_sample=float(s.get("epsilon_sample") or 0.0),
                delta=float(s.get("delta") or 0.0), server=s.get("server") or "",
                node_public_key=s.get("node_public_key") or "")

        return self._call(context, "Status", run)

    def Forget(self, request, context):
        def run() -> agent_pb2.ForgetReply:
            f = self.backend.forget()
            return agent_pb2.ForgetReply(
                pairs_deleted=int(f["pairs_deleted"]), adapter_deleted=bool(f["adapter_deleted"]),
                accountant_deleted=bool(f["accountant_deleted"]))

        return self._call(context, "Forget", run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _prepare_socket_path(path: Path) -> Path:
    """Absolute socket path with a 0700 parent; a stale socket file removed, a live one refused."""
    path = path.expanduser().absolute()
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ConfigError(f"socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
                          "pick a shorter --socket path")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
        path.parent.chmod(0o700)  # mkdir's mode is subject to the umask
    if os.path.lexists(path):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or pick another --socket")
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody listens
        except OSError as e:
            raise ConfigError(f"cannot check socket {path}: {e.strerror or e}") from e
        else:
            raise ConfigError(f"another process already listens on {path}; stop it or pick another --socket")
        finally:
            probe.close()
    return path


def serve(backend: AgentBackend, *, socket: Path | str | None = None, port: int | None = None,
          host: str = "127.0.0.1", max_workers: int = 4) -> tuple[grpc.Server, str]:
    """Start the API on a unix ``socket`` or a loopback ``port`` (exactly one).

    Returns ``(server, address)``: the started server and the address :func:`connect` takes
    (``"unix:/abs/path"`` or ``"host:port"``, with the real port when ``port=0``). Stop it with
    ``server.stop(grace)`` or :func:`run_forever`. Raises :class:`ConfigError` for a
    non-loopback ``host``, both or neither of socket/port, or an address that cannot be bound.
    """
    if (socket is None) == (port is None):
        raise ConfigError("give exactly one of --socket PATH or --port N")
    path: Path | None = None
    if socket is not None:
        path = _prepare_socket_path(Path(socket))
        address = f"unix:{path}"
    else:
        if not _is_loopback(host):
            raise ConfigError(f"host {host!r} is not a loopback address; the agent API has no "
                              "authentication, so it listens on 127.0.0.1, ::1 or localhost only")
        if not 0 <= port <= 65535:
            raise ConfigError(f"port {port} is out of range; use 1-65535, or 0 for a free port")
        bare = host.strip("[]")
        address = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="fedpref-agent-api"),
                         options=[("grpc.so_reuseport", 0)])  # a second agent must fail to bind
    agent_pb2_grpc.add_AgentServicer_to_server(AgentServicer(backend), server)
    try:
        bound = server.add_insecure_port(address)  # no TLS: unix socket or loopback only
    except RuntimeError as e:
        log.debug("bind %s failed: %s", address, e)
        bound = 0
    if bound == 0:
        server.stop(None)
        raise ConfigError(f"cannot listen on {address} (in use or not permitted); "
                          "stop the other agent or pick another --port/--socket")
    if path is not None:
        os.chmod(path, 0o600)  # bound but not yet serving
        if stat.S_IMODE(path.parent.stat().st_mode) & 0o077:
            log.warning("socket folder %s is readable by others; prefer a 0700 folder", path.parent)
    else:
        address = f"{address.rsplit(':', 1)[0]}:{bound}"
    server.start()
    log.info("agent API listening on %s", address)
    return server, address


def run_forever(server: grpc.Server, grace: float = 2.0) -> None:
    """Block until the server stops; SIGTERM/SIGINT stop it with ``grace`` seconds of grace.

    Signal handlers are installed only from the main thread and restored on return.
    """
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("agent API: signal %d, stopping", signum)
            server.stop(grace)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.wait_for_termination()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---- client ---------------------------------------------------------------------------------


class AgentClient:
    """A tiny blocking client; its methods mirror :class:`AgentBackend` (plain Python out).

    ``rank``'s dicts also carry ``position``. Failures raise :class:`DataError` (the request
    was rejected), :class:`ConfigError` (no agent there, a timeout, or the agent's state
    forbids it) or :class:`FedPrefError`; the :class:`grpc.RpcError` is the ``__cause__``.
    """

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def _invoke(self, rpc: str, request: Any) -> Any:
        try:
            return getattr(self.stub, rpc)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code, details = e.code(), _one_line(e.details() or "")
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise DataError(details) from e
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ConfigError(details) from e
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ConfigError(f"no fedpref agent answers at {self.address} ({details}); "
                                  "start it with `fedpref-agent serve`") from e
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ConfigError(f"the agent at {self.address} did not answer {rpc} within "
                                  f"{self.timeout:g} s") from e
            raise FedPrefError(f"agent {rpc} failed: {code.name}: {details}") from e

    def add_feedback(self, prompt: str, chosen: str, rejected: str) -> tuple[int, int]:
        r = self._invoke("AddFeedback", agent_pb2.AddFeedbackRequest(
            prompt=prompt, chosen=chosen, rejected=rejected))
        return r.id, r.total

    def rank(self, prompt: str, candidates: list[str]) -> tuple[list[dict], int]:
        r = self._invoke("Rank", agent_pb2.RankRequest(prompt=prompt, candidates=list(candidates)))
        return [{"candidate": c.candidate, "personal_score": c.personal_score,
                 "unsafe_categories": list(c.unsafe_categories), "allowed": c.allowed,
                 "reason": c.reason, "position": c.position} for c in r.ranked], r.policy_version

    def status(self) -> dict:
        r = self._invoke("Status", agent_pb2.StatusRequest())
        return {"pairs": r.pairs, "adapter_version": r.adapter_version,
                "policy_version": r.policy_version, "epsilon_sample": r.epsilon_sample,
                "delta": r.delta, "server": r.server, "node_public_key": r.node_public_key}

    def forget(self) -> dict:
        r = self._invoke("Forget", agent_pb2.ForgetRequest())
        return {"pairs_deleted": r.pairs_deleted, "adapter_deleted": r.adapter_deleted,
                "accountant_deleted": r.accountant_deleted}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> AgentClient:
    """A client for the agent at ``address``: as :func:`serve` returns it (``unix:/path``,
    ``127.0.0.1:50051``), or a socket path (``/run/.../agent.sock``). Connects lazily."""
    addr = str(address)
    if isinstance(address, Path) or addr.startswith(("/", "~", "./")):
        addr = f"unix:{Path(addr).expanduser().absolute()}"
    return AgentClient(addr, timeout=timeout)
