"""The processes both CLIs start: Flower's environment (which keeps Flower from phoning
home), and a process's identity over time (pid and start time, so that a recycled pid is never
signalled). ``HOST:PORT`` addresses are parsed in :mod:`fedpref.common.netaddr`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import psutil

from fedpref.common.atomic import write_text_atomic

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


# psutil's create time is the boot time (whole seconds, which a clock adjustment may move by
# one) plus the start tick (10 ms): two readings of one process's start time agree to this many
# seconds. A pid recycled this soon after its first process started is not a practical concern.
START_TOLERANCE_S = 1.5


def process_started(pid: int | None = None) -> float | None:
    """When process ``pid`` (default: this one) started, in seconds since the epoch (psutil's
    create time); None if there is no such process. Record it with the pid: the two identify
    the process over time (:func:`same_process`, :func:`signal_group`)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_start(proc: psutil.Process, started: float) -> bool:
    return abs(proc.create_time() - started) <= START_TOLERANCE_S


def same_process(pid: int, started: float | None) -> bool:
    """Process ``pid`` runs (a zombie does not) and is the one that started at ``started``, not
    a later process that was given the same pid."""
    if started is None:
        return False
    try:
        proc = psutil.Process(pid)
        return _same_start(proc, started) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_group(pid: int, started: float | None, sig: int) -> bool:
    """Send ``sig`` to the process group of the process ``pid`` that started at ``started``
    (one started with ``start_new_session``: the group id is its pid); True if the group exists
    and was signalled (``sig`` 0 only asks).

    The group outlives its leader while a member runs, and its id cannot be given to a new
    group meanwhile. So the group is ours unless process ``pid`` now leads a group of its own
    and started at another time (the pid and then the group id were recycled): that group is
    never signalled, nor one whose leader cannot be inspected.
    """
    if started is None:
        return False
    try:
        leader = psutil.Process(pid)
        if os.getpgid(pid) == pid and not _same_start(leader, started):
            return False  # a new group under a recycled pid
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass  # the leader is gone; what is left of its group is ours
    except (psutil.Error, OSError):
        return False
    try:
        os.killpg(pid, sig)
    except OSError:  # no such group, or not ours to signal
        return False
    return True
