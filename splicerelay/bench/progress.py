"""Progress while the bench runs, on stderr so that stdout holds only the report.

With `rich` installed (the `bench` extra) it is a progress bar with each finished
measurement printed above it; without, one plain line per measurement, counted.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol


class Progress(Protocol):
    def start(self, total: int) -> None: ...

    def step(self, message: str) -> None:
        """One unit of work done; `message` says what it gave."""

    def skip(self, count: int, message: str) -> None:
        """`count` units of work that will not be done; `message` says why."""

    def note(self, message: str) -> None:
        """A line that is not a unit of work (a target skipped, a file written)."""

    def close(self) -> None: ...


class PlainProgress:
    """`[3/42] bulk round 1/3 relay: 9.81 Gbit/s` lines."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total = total

    def step(self, message: str) -> None:
        self.done += 1
        width = len(str(self.total))
        print(f"[{self.done:>{width}}/{self.total}] {message}", file=sys.stderr, flush=True)

    def skip(self, count: int, message: str) -> None:
        self.done += count
        self.note(message)

    def note(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A rich progress bar on stderr; rich itself drops the animation when not a terminal."""

    def __init__(self, rich_progress: Any, rich_console: Any) -> None:
        self.console = rich_console.Console(stderr=True, highlight=False)
        self.bar = rich_progress.Progress(
            rich_progress.TextColumn("splicerelay bench"),
            rich_progress.BarColumn(),
            rich_progress.MofNCompleteColumn(),
            rich_progress.TimeElapsedColumn(),
            console=self.console,
        )
        self.task: Any = None

    def start(self, total: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("bench", total=total)

    def step(self, message: str) -> None:
        self.console.print(message, markup=False)
        self.bar.advance(self.task)

    def skip(self, count: int, message: str) -> None:
        self.console.print(message, markup=False)
        self.bar.advance(self.task, count)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False)

    def close(self) -> None:
        self.bar.stop()


def make_progress(prefer_rich: bool = True) -> Progress:
    """A rich progress bar when rich can be imported, else plain lines."""
    if prefer_rich:
        try:
            rich_progress = importlib.import_module("rich.progress")
            rich_console = importlib.import_module("rich.console")
        except ImportError:
            pass
        else:
            return RichProgress(rich_progress, rich_console)
    return PlainProgress()
