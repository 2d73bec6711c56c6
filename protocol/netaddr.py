"""``HOST:PORT`` addresses, and the processes both CLIs start: Flower's environment, and what a
pid runs (to never signal a recycled pid)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedpref.protocol.errors import ConfigError


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not HOST:PORT; give e.g. fl.example.org:9092 or 10.0.0.5:9092")
    return host.strip("[]"), int(port)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's processes: its home, and this Python's scripts first on PATH
    (the SuperLink and SuperNode start flower-superexec, flwr-serverapp and flwr-clientapp by
    name, and a venv need not be activated)."""
    scripts = os.path.dirname(sys.executable)
    return dict(os.environ, FLWR_HOME=str(flwr_home), PATH=os.pathsep.join([scripts, os.environ.get("PATH", "")]))


def cmdline(pid: int) -> list[str] | None:
    """The arguments process ``pid`` runs with (Linux ``/proc``); None if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
