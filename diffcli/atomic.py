"""Atomic file writes: a reader (or a crash) sees the old complete file or the new complete file.

Write to a temporary file in the destination folder, fsync it, then publish it by rename
(overwrite) or by hard link (exclusive create: fails if the name exists, even when two processes race).
Ctrl-C and SIGTERM wait for a write in progress, so they never leave its temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffcli.errors import DiffcliError, OutputExistsError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, then their handlers run as usual, so a stop
    cannot land between creating the temporary file and publishing or removing it. (Python runs
    signal handlers in the main thread, whichever thread the signal reached, so swapping the
    handlers holds them reliably; elsewhere nothing is held.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not None:  # None: installed outside Python, cannot be put back
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:
            signum, frame = pending[0]
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # the default action, now that the file is whole


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> bool:
    """Write data to path atomically. With overwrite=False an existing file is kept and
    OutputExistsError is raised (exit code 3). Returns True when written."""
    with _stop_signals_held():
        return _write_bytes(Path(path), data, overwrite)


def _write_bytes(path: Path, data: bytes, overwrite: bool) -> bool:
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffcliError(f"cannot create folder {folder}: {e.strerror or e}") from e
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise DiffcliError(f"cannot write in {folder}: {e.strerror or e}") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic exclusive create
            except FileExistsError:
                raise OutputExistsError(f"{path} exists; pass --overwrite to replace it or --skip-existing")
            except OSError:
                # file systems without hard links: best effort check-then-rename
                if path.exists():
                    raise OutputExistsError(f"{path} exists; pass --overwrite to replace it or --skip-existing")
                os.replace(tmp, path)
        _fsync_dir(folder)
        return True
    except OSError as e:
        raise DiffcliError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# write_bytes' temporary names: "." + the final name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(folder: str | os.PathLike, older_than: float) -> list[Path]:
    """Delete the temporary files that write_bytes leaves when its process is killed mid-write
    (SIGKILL, power loss): only names of its own pattern, last written before `older_than` (a
    time.time() value such as this process's start), so no live writer's file is touched."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) \
                    and entry.stat(follow_symlinks=False).st_mtime < older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # gone already, or not ours to delete: harmless either way
    return removed


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single write + fsync, so a line is either all there or absent
    (readers of metrics.jsonl skip a trailing line without a newline)."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise DiffcliError(f"cannot write {path}: {e.strerror or e}") from e
