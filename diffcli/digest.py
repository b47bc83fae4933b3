"""SHA-256 of files: the model hash, the provenance of edits, imported weights and CLIP folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

from diffcli.errors import InputError


def file_sha256(path: Path) -> str:
    """The file's SHA-256 in hex, read in chunks; InputError naming the file when it cannot be read."""
    try:
        with Path(path).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
