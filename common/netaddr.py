"""``HOST:PORT`` addresses (the ``--address`` of the SuperLink, the Fleet API and the agent)."""

from __future__ import annotations

from fedpref.common.errors import ConfigError


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) → (host, port), with a clear error."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r} is not HOST:PORT; give e.g. fl.example.org:9092 or 10.0.0.5:9092")
    return host.strip("[]"), int(port)
