"""Progress bars and log lines on stderr: animated only on a terminal, silent with --quiet."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console


class Progress:
    def __init__(self, description: str, quiet: bool = False, fields: str = "") -> None:
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.description = description
        self.fields = fields
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if not self.quiet and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, completed: int, total: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total, info=info)

    def log(self, message: str) -> None:
        """A line for humans on stderr (not shown with --quiet)."""
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)
