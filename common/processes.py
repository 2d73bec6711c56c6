"""The processes both CLIs start: Flower's environment (which keeps Flower from phoning
home), a process's identity over time (pid and start time, so that a recycled pid is never
signalled), the process trees Flower grows under them, and the lock that lets one ``start``
at a time run a home. ``HOST:PORT`` addresses are parsed in :mod:`fedpref.common.netaddr`."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from fedpref.common.atomic import write_text_atomic
from fedpref.common.errors import AlreadyRunningError, FedPrefError

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


# A process's identity is its pid and its start. psutil's create_time() is (start ticks since
# boot) + btime, and the kernel moves btime with every step of the wall clock (an NTP step after
# boot on a device without RTC, `date -s`, a VM resumed): a start recorded that way stops matching
# its own process after a step. So the start recorded here is read from /proc/<pid>/stat (field
# 22: clock ticks since boot, which no clock step moves), tagged with the boot it belongs to
# (from /proc/sys/kernel/random/boot_id: after a reboot the same pid and tick name another
# process), packed in one float that is exact and that older records (seconds since the epoch,
# all below 2**_TICK_BITS) can be told apart from:  start = boot_tag · 2**_TICK_BITS + ticks.
_TICK_BITS = 37  # ticks since boot: at 100 per second (USER_HZ), 43 years of uptime
_BOOT_TAGS = (1 << 15) - 1  # boot tags are 1.._BOOT_TAGS: start < 2**52, an exact float
_LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")

# Records of an older fedpref, and any record off Linux, hold psutil's create time (seconds since
# the epoch; whole seconds of btime, so two readings of one process agree to this many seconds).
START_TOLERANCE_S = 1.5


class UnknownProcessError(FedPrefError):
    """A pid recorded by an older fedpref runs a process whose start no longer matches the record:
    it may be that process after a clock step, or another one under a reused pid."""


def _boot_tag() -> int:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
    except OSError:
        return 1  # no boot id: the start ticks alone
    return int.from_bytes(hashlib.sha256(boot_id).digest()[:4], "big") % _BOOT_TAGS + 1


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time, clock ticks since boot); None: no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    # fields after the command name, which is in parentheses and may itself hold ") "
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def is_legacy_start(started: float) -> bool:
    """``started`` is a start in seconds since the epoch (a record of an older fedpref, or any
    record off Linux), not a boot-relative one (:func:`process_started`)."""
    return started < float(1 << _TICK_BITS)


def process_started(pid: int | None = None) -> float | None:
    """The start of process ``pid`` (default: this one); None if there is no such process.
    Record it with the pid: the two identify the process over time (:func:`same_process`,
    :func:`signal_group`). On Linux a boot-relative start that no clock step moves (see
    above); elsewhere psutil's create time, in seconds since the epoch."""
    if not _LINUX:
        try:
            return psutil.Process(pid).create_time()
        except psutil.Error:
            return None
    try:
        ticks = _start_ticks(os.getpid() if pid is None else pid)
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else float((_boot_tag() << _TICK_BITS) + ticks)


def _starts_match(pid: int, started: float) -> bool | None:
    """Whether process ``pid`` started at ``started``; None if there is no process ``pid``.
    Raises psutil.Error or OSError when it cannot be inspected."""
    if not _LINUX or is_legacy_start(started):
        try:
            return abs(psutil.Process(pid).create_time() - started) <= START_TOLERANCE_S
        except psutil.NoSuchProcess:
            return None
    now = process_started(pid)
    return None if now is None else now == started


def upgrade_legacy_start(pid: int, started: float) -> float:
    """A start recorded by an older fedpref (seconds since the epoch) in today's format, on Linux.

    If process ``pid`` still matches it by the old rule (within :data:`START_TOLERANCE_S`), it is
    that process: its boot-relative start is returned. If there is no process ``pid`` (or a
    zombie), ``started`` is returned as it is (nothing runs under that pid; what is left of its
    group is still the recorded one's). Any other process under ``pid`` is an
    :class:`UnknownProcessError`: that process after a clock step, or another one under a
    reused pid, cannot be told apart. Off Linux, or for a start of today's format, ``started``
    is returned as it is.
    """
    if not _LINUX or not is_legacy_start(started):
        return started
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return started
        if abs(proc.create_time() - started) <= START_TOLERANCE_S:
            return process_started(pid) or started
    except psutil.NoSuchProcess:
        return started
    except psutil.Error:
        pass
    raise UnknownProcessError(
        f"pid {pid} was recorded by an older fedpref with a wall-clock start time it no longer matches: it may be "
        f"the same process after a clock step, or another one under a reused pid; check `ps -o pid,lstart,args -p "
        f"{pid}`, stop it by hand if it is fedpref's")


def same_process(pid: int, started: float | None) -> bool:
    """Process ``pid`` runs (a zombie does not) and is the one that started at ``started``, not
    a later process that was given the same pid. A start of an older fedpref is compared as it
    was then (psutil's create time, which a clock step moves): see :func:`upgrade_legacy_start`."""
    if started is None:
        return False
    try:
        return bool(_starts_match(pid, started)) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, OSError, ValueError, IndexError):
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
        if os.getpgid(pid) == pid and _starts_match(pid, started) is False:
            return False  # a new group under a recycled pid
    except ProcessLookupError:
        pass  # the leader is gone; what is left of its group is ours
    except (psutil.Error, OSError, ValueError, IndexError):
        return False
    try:
        os.killpg(pid, sig)
    except OSError:  # no such group, or not ours to signal
        return False
    return True


def signal_process(pid: int, started: float | None, sig: int) -> bool:
    """Send ``sig`` to process ``pid`` alone, only if it is the one that started at ``started``
    (not a later process under a recycled pid, nor a zombie); True if it was signalled (``sig``
    0 only asks). On Linux the process is pinned by a pidfd before its start is checked, so the
    pid cannot be recycled between the check and the signal."""
    if started is None:
        return False
    pidfd = None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): check, then kill
        pidfd = None
    try:
        if not same_process(pid, started):
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return True


@dataclass(frozen=True)
class Descendant:
    """A process started under a recorded one: its identity (pid, start: :func:`process_started`)
    and the process group it was in when seen (``leader``: it leads that group, as a process
    started with ``start_new_session`` does)."""

    pid: int
    started: float
    pgid: int

    @property
    def leader(self) -> bool:
        return self.pgid == self.pid


def descendants(pid: int, started: float | None) -> list[Descendant]:
    """Every process under process ``pid`` (children, theirs, ...), if ``pid`` is still the one
    that started at ``started``; [] otherwise. Flower starts some of them in sessions of their
    own (the SuperLink's SuperExec, with the ServerApps under it), outside the process group
    of the process fedpref started: only this walk finds them, and only while they are still
    attached to the tree (an orphan is reparented away), so take it before signalling."""
    if not same_process(pid, started):
        return []
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        child_started = process_started(child.pid)
        try:
            pgid = os.getpgid(child.pid)
        except OSError:
            continue
        if child_started is not None:
            out.append(Descendant(child.pid, child_started, pgid))
    return out


def hold_exclusive_lock(path: Path, *, busy: str) -> BinaryIO:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if missing), or
    :class:`AlreadyRunningError` with the one-line message ``busy``.

    The caller keeps the returned file open for as long as what it guards runs; the lock goes
    with the last open copy of that file, which the kernel closes when its process ends, however
    it ends (SIGKILL included): a crash never leaves it behind. A child started with the file in
    ``pass_fds`` holds it too, for its own lifetime. Taken before the "already running?" check,
    it makes check-then-start atomic: two concurrent ``start`` runs cannot both pass the check.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "ab", buffering=0)  # noqa: SIM115 - held for the guarded process's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise AlreadyRunningError(busy) from None
    return lock
