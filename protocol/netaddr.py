"""``HOST:PORT`` addresses and the environment of Flower's processes, as both CLIs use them."""

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
