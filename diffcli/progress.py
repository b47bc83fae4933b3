"""Progress on stderr: an animated bar on a terminal; in a log (nohup, CI, a file) one plain line,
or with --json one `progress` record, every `log_every` seconds; nothing with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console

LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


def console(stderr: bool = False) -> Console:
    """A rich console that uses the terminal's width, or a wide one when the stream is piped, so
    tables are never cut at 80 columns in a log or a pipe."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 1000, soft_wrap=not stream.isatty())


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(self, description: str, quiet: bool = False, log_every: float = LOG_EVERY,
                 json_command: str | None = None) -> None:
        self.console = console(stderr=True)
        self.quiet = quiet
        self.description = description
        self.log_every = log_every
        self.json_command = json_command  # set: log lines are `progress` records of this command
        self._bar = None
        self._task = None
        self._start = time.monotonic()
        self._last_line = self._start
        self._first: tuple[float, int] | None = None  # (time, completed) of the phase's first update, for the rate
        self._phase = description

    def __enter__(self) -> "Progress":
        if not self.quiet and sys.stderr.isatty() and not self.json_command:
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

    def update(self, completed: int, total: int, info: str = "", task: str | None = None, **fields: Any) -> None:
        """Move the bar; in a log, print a line when log_every seconds have passed since the last.
        `task` names a phase other than the description (decoding images); `fields` (loss,
        images_per_second) go into the line and the `progress` record."""
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=total, info=info or (task or ""))
            return
        now = time.monotonic()
        task = task or self.description
        if self._first is None or self._phase != task:
            self._first, self._phase = (now, completed), task  # the rate of this phase only
        if self.quiet or now - self._last_line < self.log_every:
            return
        self._last_line = now
        elapsed = now - self._start
        t0, c0 = self._first
        rate = (completed - c0) / (now - t0) if now > t0 and completed > c0 else None
        eta = (total - completed) / rate if rate and total else None
        if self.json_command:
            from diffcli.records import emit

            emit(self.json_command, "progress", stream=sys.stderr, task=task, completed=completed,
                 total=total, elapsed=round(elapsed, 1), eta=None if eta is None else round(eta, 1), **fields)
            return
        parts = [f"{task} {completed}/{total}"]
        if "loss" in fields:
            parts.append(f"loss {fields['loss']:.4f}")
        if "images_per_second" in fields:
            parts.append(f"{fields['images_per_second']:.0f} img/s")
        parts.append(f"elapsed {duration(elapsed)}")
        parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA ?")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        """A line for humans on stderr (not shown with --quiet)."""
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)
