"""Tests for fedpref.client.api: real gRPC servers (unix socket, loopback) over an in-memory backend."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import grpc
import pytest

from fedpref.client.api import (
    MAX_CANDIDATES,
    MAX_TEXT_CHARS,
    AgentBackend,
    _is_loopback,
    connect,
    run_forever,
    serve,
)
from fedpref.common.errors import BudgetExceededError, ConfigError, DataError
from fedpref.protocol import agent_pb2, agent_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
GRPC_TOOLS_VERSION = "1.81.1"  # the version scripts/gen_proto.sh documents


class MemoryBackend:
    """A real, tiny AgentBackend: pairs in a list; score = word overlap with chosen minus rejected."""

    UNSAFE: ClassVar[dict[str, str]] = {"bomb": "weapons", "poison": "harm"}

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str, str]] = []
        self.adapter_version = ""
        self.spent = 0.0
        self.fail_with: Exception | None = None

    def _maybe_fail(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    def add_feedback(self, prompt: str, chosen: str, rejected: str) -> tuple[int, int]:
        self._maybe_fail()
        if chosen == rejected:
            raise DataError("chosen and rejected are the same text;\n  send two different answers")
        self.pairs.append((prompt, chosen, rejected))
        self.adapter_version, self.spent = f"v{len(self.pairs)}", self.spent + 0.25
        return len(self.pairs), len(self.pairs)

    def rank(self, prompt: str, candidates: list[str]) -> tuple[list[dict], int]:
        self._maybe_fail()
        good = {w for _, c, _ in self.pairs for w in c.lower().split()}
        bad = {w for _, _, r in self.pairs for w in r.lower().split()}
        out = []
        for cand in candidates:
            words = set(cand.lower().split())
            cats = sorted({cat for w, cat in self.UNSAFE.items() if w in words})
            out.append({"candidate": cand, "personal_score": float(len(words & good) - len(words & bad)),
                        "unsafe_categories": cats, "allowed": not cats,
                        "reason": f"unsafe: {', '.join(cats)}" if cats else ""})
        out.sort(key=lambda r: (not r["allowed"], -r["personal_score"]))
        return out, 3

    def status(self) -> dict:
        self._maybe_fail()
        return {"pairs": len(self.pairs), "adapter_version": self.adapter_version or None,
                "policy_version": 3, "epsilon_sample": self.spent, "delta": 1e-5,
                "server": "fl.example:9092", "node_public_key": "ab" * 32}

    def forget(self) -> dict:
        self._maybe_fail()
        n, had_adapter = len(self.pairs), bool(self.adapter_version)
        self.pairs.clear()
        self.adapter_version, self.spent = "", 0.0
        return {"pairs_deleted": n, "adapter_deleted": had_adapter, "accountant_deleted": had_adapter}


def _backend() -> AgentBackend:
    return MemoryBackend()  # type-checks MemoryBackend against the Protocol


@pytest.fixture
def unix_agent(tmp_path):
    backend = MemoryBackend()
    server, address = serve(backend, socket=tmp_path / "run" / "agent.sock")
    client = connect(address, timeout=10)
    yield backend, client, address, tmp_path / "run" / "agent.sock"
    client.close()
    server.stop(None).wait()


@pytest.fixture
def tcp_agent():
    backend = MemoryBackend()
    server, address = serve(backend, port=0)
    client = connect(address, timeout=10)
    yield backend, client, address
    client.close()
    server.stop(None).wait()


def _round_trip(client) -> None:
    assert client.status()["pairs"] == 0
    assert client.status()["adapter_version"] == ""  # None on the backend side becomes ""
    assert client.add_feedback("tea?", "green tea with lemon", "black coffee") == (1, 1)
    assert client.add_feedback("snack?", "lemon cake", "coffee cake") == (2, 2)

    ranked, policy = client.rank("drink?", ["black coffee", "lemon tea", "tea with a bomb"])
    assert policy == 3
    assert [r["candidate"] for r in ranked] == ["lemon tea", "black coffee", "tea with a bomb"]
    assert [r["position"] for r in ranked] == [0, 1, 2]
    assert ranked[0] == {"candidate": "lemon tea", "personal_score": 2.0, "unsafe_categories": [],
                         "allowed": True, "reason": "", "position": 0}
    assert ranked[2]["unsafe_categories"] == ["weapons"] and not ranked[2]["allowed"]
    assert ranked[2]["reason"] == "unsafe: weapons"

    assert client.status() == {"pairs": 2, "adapter_version": "v2", "policy_version": 3,
                               "epsilon_sample": 0.5, "delta": 1e-5, "server": "fl.example:9092",
                               "node_public_key": "ab" * 32}
    assert client.forget() == {"pairs_deleted": 2, "adapter_deleted": True, "accountant_deleted": True}
    assert client.forget() == {"pairs_deleted": 0, "adapter_deleted": False, "accountant_deleted": False}
    assert client.status()["pairs"] == 0


def test_unix_socket_round_trip_and_modes(unix_agent) -> None:
    _, client, address, sock = unix_agent
    assert address == f"unix:{sock}"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    _round_trip(client)
    with connect(sock, timeout=10) as by_path:  # a bare socket path works too
        assert by_path.status()["policy_version"] == 3


def test_loopback_port_zero_round_trip(tcp_agent) -> None:
    _, client, address = tcp_agent
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    _round_trip(client)


def _rank_request(prompt: str = "p", n: int = 1, text: str = "c") -> agent_pb2.RankRequest:
    return agent_pb2.RankRequest(prompt=prompt, candidates=[text] * n)


@pytest.mark.parametrize("rpc, request_, fragment", [
    ("AddFeedback", agent_pb2.AddFeedbackRequest(prompt="", chosen="a", rejected="b"), "prompt is empty"),
    ("AddFeedback", agent_pb2.AddFeedbackRequest(prompt="  \n", chosen="a", rejected="b"), "prompt is empty"),
    ("AddFeedback", agent_pb2.AddFeedbackRequest(prompt="p", chosen="", rejected="b"), "chosen is empty"),
    ("AddFeedback", agent_pb2.AddFeedbackRequest(prompt="p", chosen="a", rejected="x" * (MAX_TEXT_CHARS + 1)),
     "rejected has 8193 characters"),
    ("Rank", _rank_request(prompt=""), "prompt is empty"),
    ("Rank", _rank_request(n=0), "no candidates"),
    ("Rank", _rank_request(n=MAX_CANDIDATES + 1), "65 candidates"),
    ("Rank", _rank_request(text="x" * (MAX_TEXT_CHARS + 1)), "candidate 0 has 8193 characters"),
    ("Rank", _rank_request(prompt="x" * (MAX_TEXT_CHARS + 1)), "prompt has 8193 characters"),
])
def test_invalid_requests_are_invalid_argument(tcp_agent, rpc, request_, fragment) -> None:
    backend, client, _ = tcp_agent
    with pytest.raises(grpc.RpcError) as err:
        getattr(client.stub, rpc)(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert backend.pairs == []


def test_limits_themselves_are_accepted(tcp_agent) -> None:
    _, client, _ = tcp_agent
    ranked, _ = client.rank("x" * MAX_TEXT_CHARS, [f"c{i}" for i in range(MAX_CANDIDATES)])
    assert len(ranked) == MAX_CANDIDATES
    assert client.add_feedback("p", "a" * MAX_TEXT_CHARS, "b") == (1, 1)
    with pytest.raises(DataError, match="no candidates"):  # the client maps the code back
        client.rank("p", [])


def test_backend_data_error_keeps_its_message(tcp_agent) -> None:
    _, client, _ = tcp_agent
    with pytest.raises(grpc.RpcError) as err:
        client.stub.AddFeedback(agent_pb2.AddFeedbackRequest(prompt="p", chosen="same", rejected="same"),
                                timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "chosen and rejected are the same text; send two different answers"
    with pytest.raises(DataError, match="^chosen and rejected are the same text; send two") as mapped:
        client.add_feedback("p", "same", "same")
    assert isinstance(mapped.value.__cause__, grpc.RpcError)


@pytest.mark.parametrize("exc, code, client_exc", [
    (ConfigError("no safety policy installed; run `fedpref-agent policy pull`"),
     grpc.StatusCode.FAILED_PRECONDITION, ConfigError),
    (BudgetExceededError("privacy budget spent"), grpc.StatusCode.FAILED_PRECONDITION, ConfigError),
])
def test_backend_fedpref_errors_are_failed_precondition(tcp_agent, exc, code, client_exc) -> None:
    backend, client, _ = tcp_agent
    backend.fail_with = exc
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Status(agent_pb2.StatusRequest(), timeout=10)
    assert err.value.code() == code and err.value.details() == str(exc)
    with pytest.raises(client_exc, match=str(exc).split(";")[0]):
        client.status()


def test_unexpected_backend_error_is_internal_and_logged(tcp_agent, caplog) -> None:
    backend, client, _ = tcp_agent
    backend.fail_with = KeyError("secret-user-text")
    with caplog.at_level(logging.ERROR, logger="fedpref.client.api"), \
            pytest.raises(grpc.RpcError) as err:
        client.stub.Forget(agent_pb2.ForgetRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "KeyError" in err.value.details() and "secret-user-text" not in err.value.details()
    assert any(r.exc_info and "Forget" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com", ""])
def test_non_loopback_host_is_refused(host) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        serve(_backend(), port=0, host=host)


def test_loopback_spellings() -> None:
    assert all(_is_loopback(h) for h in ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])


def test_exactly_one_of_socket_or_port(tmp_path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        serve(_backend())
    with pytest.raises(ConfigError, match="exactly one"):
        serve(_backend(), socket=tmp_path / "a.sock", port=0)
    with pytest.raises(ConfigError, match="out of range"):
        serve(_backend(), port=70000)


def test_port_in_use_is_config_error(tcp_agent) -> None:
    _, client, address = tcp_agent
    port = int(address.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}"):
        serve(_backend(), port=port)  # a second agent on the same port
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(ConfigError, match="in use"):
            serve(_backend(), port=other.getsockname()[1])
    assert client.status()["pairs"] == 0  # the first agent is untouched


def test_live_socket_is_refused_and_stale_one_replaced(unix_agent, tmp_path) -> None:
    _, client, _, sock = unix_agent
    with pytest.raises(ConfigError, match="already listens"):
        serve(_backend(), socket=sock)
    assert client.status()["pairs"] == 0  # still ours

    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens
    server, addr = serve(_backend(), socket=stale)
    try:
        with connect(addr, timeout=10) as c:
            assert c.status()["pairs"] == 0
    finally:
        server.stop(None).wait()

    plain = tmp_path / "plain.txt"
    plain.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        serve(_backend(), socket=plain)
    assert plain.read_text() == "not a socket"

    with pytest.raises(ConfigError, match="longer than"):
        serve(_backend(), socket=tmp_path / ("x" * 120))


def test_no_agent_is_config_error(tmp_path) -> None:
    with connect(tmp_path / "nobody.sock", timeout=2) as c, pytest.raises(ConfigError, match="no fedpref agent"):
        c.status()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs main thread")
def test_run_forever_stops_on_sigterm(tmp_path, monkeypatch) -> None:
    before = signal.getsignal(signal.SIGTERM)
    server, _ = serve(_backend(), socket=tmp_path / "a.sock")
    installed = threading.Event()
    real_signal = signal.signal

    def spy(sig, handler):  # noqa: ANN001, ANN202
        previous = real_signal(sig, handler)
        if sig == signal.SIGTERM and handler is not before:
            installed.set()  # run_forever's handler is in place: the SIGTERM below reaches it
        return previous

    def send() -> None:
        if installed.wait(60):
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            server.stop(0)  # no handler: end the wait, and the assertion below fails

    monkeypatch.setattr(signal, "signal", spy)
    sender = threading.Thread(target=send)
    sender.start()
    run_forever(server, grace=0.5)
    sender.join()
    assert installed.is_set()
    assert signal.getsignal(signal.SIGTERM) is before
    assert not (tmp_path / "a.sock").exists()  # gRPC unlinks its socket on shutdown


def test_stubs_regenerate_identically(tmp_path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip(f"grpcio-tools not installed (dev only: pip install grpcio-tools=={GRPC_TOOLS_VERSION})")
    from importlib.metadata import version

    if version("grpcio-tools") != GRPC_TOOLS_VERSION:
        pytest.skip(f"stubs are generated with grpcio-tools {GRPC_TOOLS_VERSION}, "
                    f"{version('grpcio-tools')} is installed")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in ("agent_pb2.py", "agent_pb2.pyi", "agent_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (ROOT / "protocol" / name).read_text(), (
            f"protocol/{name} is stale; run scripts/gen_proto.sh")
    assert "from fedpref.protocol import agent_pb2 as" in (tmp_path / "agent_pb2_grpc.py").read_text()


def test_generated_code_matches_the_runtime() -> None:
    # Importing the stubs ran protobuf's and grpcio's version checks; pin the API shape too.
    assert agent_pb2.DESCRIPTOR.package == "fedpref.agent.v1"
    service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
    assert [m.name for m in service.methods] == ["AddFeedback", "Rank", "Status", "Forget"]
    assert hasattr(agent_pb2_grpc, "AgentStub")
