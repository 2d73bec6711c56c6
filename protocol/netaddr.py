"""``HOST:PORT`` addresses, and the processes both CLIs start: Flower's environment (which
keeps Flower from phoning home), and what a pid runs (to never signal a recycled pid)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fedpref.protocol.atomic import write_text_atomic
from fedpref.protocol.errors import ConfigError


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not HOST:PORT; give e.g. fl.example.org:9092 or 10.0.0.5:9092")
    return host.strip("[]"), int(port)


# Flower phones home unless told not to: telemetry events (flwr.supercore.telemetry, on unless
# FLWR_TELEMETRY_ENABLED=0) and an update check (flwr.supercore.update_check, posts the version
# and OS to api.flower.ai at every start of a SuperLink, SuperNode, SuperExec and `flwr` CLI).
FLOWER_QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_TELEMETRY_LOGGING": "0",  # the event payload (with the source id) is not even logged
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# Flower builds a telemetry event even when sending is off, and for it writes a random UUID to
# FLWR_HOME/source unless that file exists: a persistent per-device identifier. A constant that
# is not a UUID pins it (Flower then reports the source as "invalid").
TELEMETRY_SOURCE = "source"
TELEMETRY_SOURCE_PIN = "telemetry-disabled-by-fedpref\n"
_DROPPED = ("FLWR_TELEMETRY_PARTNER_ID",)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's processes: its home, telemetry and the update check off,
    and this Python's scripts first on PATH (the SuperLink and SuperNode start
    flower-superexec, flwr-serverapp and flwr-clientapp by name, and a venv need not be
    activated). Creates ``flwr_home`` and pins its telemetry source id
    (:data:`TELEMETRY_SOURCE_PIN`), so no Flower process started with it writes a device id."""
    pin_telemetry_source(flwr_home)
    scripts = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    return env | FLOWER_QUIET | {"FLWR_HOME": str(flwr_home),
                                 "PATH": os.pathsep.join([scripts, os.environ.get("PATH", "")])}


def pin_telemetry_source(flwr_home: Path) -> None:
    """Make ``flwr_home/source`` hold the constant :data:`TELEMETRY_SOURCE_PIN` (replacing a
    UUID an earlier Flower run wrote there)."""
    path = Path(flwr_home) / TELEMETRY_SOURCE
    try:
        if path.read_text() == TELEMETRY_SOURCE_PIN:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_text_atomic(path, TELEMETRY_SOURCE_PIN, mode=0o644)


def cmdline(pid: int) -> list[str] | None:
    """The arguments process ``pid`` runs with (Linux ``/proc``); None if it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
