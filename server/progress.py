"""The operator's progress bars (rich, on stderr): the CLI's long commands and the ServerApp's rounds.

On a terminal they redraw in place and vanish when done; anywhere else (a log file, a pipe,
a test) they print nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn


def progress_bar(*extra: ProgressColumn) -> Progress:
    """Description, bar, done/total, elapsed (then ``extra`` columns); use it as a context manager."""
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    *extra, console=console, transient=True, disable=not console.is_terminal)


class RoundBar:
    """One bar of rounds, with a free-form note after it (``eps_user=1.23``); :meth:`close` ends it."""

    def __init__(self, description: str, *, total: int, done: int = 0) -> None:
        self._progress = progress_bar(TextColumn("{task.fields[note]}"))
        self._task = self._progress.add_task(description, total=total, completed=done, note="")
        self._progress.start()

    def update(self, *, done: int | None = None, advance: int = 0, **note: object) -> None:
        """Set the rounds done (or advance them) and, if given, the note (``key=value`` pairs)."""
        fields = {"note": " ".join(f"{k}={v}" for k, v in note.items())} if note else {}
        self._progress.update(self._task, completed=done, advance=advance or None, **fields)

    def close(self) -> None:
        self._progress.stop()
