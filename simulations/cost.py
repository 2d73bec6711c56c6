"""What a simulation costs: wall time per phase and the peak memory of the whole process tree.

:class:`Phases` times named phases of a run (``with phases("evaluation"): ...``; a phase may
be entered many times and its seconds add up). :class:`PeakRSS` samples, from a background
thread, the resident memory of this process plus every descendant (Ray's GCS, raylet and
workers included) with psutil, and keeps the largest sum seen. Both report plain numbers for
``results.json``'s ``cost``; nothing here is timed inside a test.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psutil


class Phases:
    """Wall seconds per named phase, summed over every time the phase is entered."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def split(self) -> dict[str, float]:
        """Every phase, plus ``other``: the wall time that no phase covered (never negative)."""
        out = dict(self.seconds)
        out["other"] = max(0.0, self.elapsed() - sum(self.seconds.values()))
        return out


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and all its descendants (processes that vanish are skipped)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading: it holds no memory now
            continue
    return total


class PeakRSS:
    """The largest resident size of this process tree seen while running (``with PeakRSS() as p``).

    Sampled every ``interval`` seconds, and once more at exit, so a short-lived peak between
    two samples can be missed: the figure is a lower bound on the true peak, close to it for
    phases that hold their memory for longer than ``interval``.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        rss = tree_rss(self._proc)
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="fedpref-peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


__all__ = ["Phases", "PeakRSS", "tree_rss"]
