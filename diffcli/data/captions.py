"""Image folder -> one caption per image, for text-to-image training.

Two sources, the first found wins:
    DATA_DIR/metadata.jsonl   Hugging Face imagefolder's convention: one JSON object per line,
                              {"file_name": "cls/cat_001.png", "text": "a cat on a sofa"}, file_name
                              relative to DATA_DIR with '/' between folders; images it does not
                              list have no caption, and sidecar files are not read
    cat_001.txt               otherwise a UTF-8 sidecar beside each image, with the image's stem

A caption is stripped and every run of whitespace (newlines included) becomes one space. Captions
come from files that may come from elsewhere, so anything unusable is refused with an InputError
(exit code 4) naming the file, and the line for metadata.jsonl, rather than trained on silently.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Any

from diffcli.errors import InputError
from diffcli.validate import Invalid, describe, parse_json

METADATA = "metadata.jsonl"
MAX_CAPTION_BYTES = 64 * 1024  # per caption, UTF-8; longer ones are refused, never truncated
MAX_LINE_BYTES = 1024 * 1024  # per metadata.jsonl line: room for a caption written as \uXXXX escapes
QUOTE = 80  # characters of user text quoted in a message


def read_captions(root: Path, files: list[Path], column: str = "text") -> list[str | None]:
    """One caption per image in `files` (as find_images gives them, under root), None where an
    image has none. column: the metadata.jsonl key holding the caption."""
    root = Path(root)
    if (root / METADATA).exists():
        return _from_metadata(root, files, column)
    return [_from_sidecar(f.with_suffix(".txt")) for f in files]


def caption_sources(root: Path, files: list[Path]) -> str:
    """A short string that changes when any caption source changes (for the data cache's key):
    metadata.jsonl's size and mtime, or else each sidecar's presence, size and mtime."""
    meta = Path(root) / METADATA
    if meta.exists():
        st = meta.stat()
        return f"{METADATA}|{st.st_size}|{st.st_mtime_ns}"
    h = hashlib.sha256()
    for f in files:
        side = f.with_suffix(".txt")
        try:
            st = side.stat()
            h.update(f"{side}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{side}|-\n".encode())
    return f"sidecars|{h.hexdigest()}"


def normalise(text: str) -> str:
    """Stripped, with each run of whitespace (spaces, tabs, newlines) as one space."""
    return " ".join(text.split())


def is_caption(value: Any) -> bool:
    """Whether a value is a caption as read_captions gives it: a non-empty normalised string of at
    most MAX_CAPTION_BYTES in UTF-8 (the data cache checks its stored captions with this)."""
    if not isinstance(value, str) or not value or value != normalise(value):
        return False
    try:
        return len(value.encode()) <= MAX_CAPTION_BYTES
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can produce
        return False


def _from_sidecar(side: Path) -> str | None:
    if not side.is_file():
        return None
    try:
        with open(side, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)  # never more, whatever the file's size
    except OSError as e:
        raise InputError(f"caption file {side} cannot be read ({type(e).__name__})") from None
    if len(raw) > MAX_CAPTION_BYTES:
        raise InputError(f"caption file {side} is over {MAX_CAPTION_BYTES // 1024} KiB; longer captions are refused")
    try:
        text = normalise(_utf8(raw))
    except UnicodeDecodeError as e:
        raise InputError(f"caption file {side} is not UTF-8 text (byte {e.start + 1})") from None
    if not text:
        raise InputError(f"caption file {side} is empty; delete it or write the caption")
    return text


def _from_metadata(root: Path, files: list[Path], column: str) -> list[str | None]:
    path = root / METADATA
    index = {f.relative_to(root).as_posix(): i for i, f in enumerate(files)}
    captions: list[str | None] = [None] * len(files)
    line_of: dict[int, int] = {}  # image index -> the line that captioned it
    n = 0
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                row = _row(raw, column)
                if row is None:
                    continue
                name, caption = row
                i = index.get(PurePosixPath(name).as_posix())  # "./cat.png" names cat.png
                if i is None:
                    raise Invalid(f"file_name {describe(name, QUOTE)} is not an image in the folder")
                if i in line_of:
                    raise Invalid(f"file_name {describe(name, QUOTE)} was already captioned on line {line_of[i]}")
                line_of[i] = n
                captions[i] = caption
    except Invalid as e:
        raise InputError(f"{path} line {n}: {e}") from None
    except OSError as e:
        raise InputError(f"{path} cannot be read ({type(e).__name__})") from None
    return captions


def _row(raw: bytes, column: str) -> tuple[str, str] | None:
    """(file_name, normalised caption) from one metadata.jsonl line, None for a blank line, or
    Invalid saying what is wrong with it."""
    if len(raw) > MAX_LINE_BYTES:
        raise Invalid(f"longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB")
    try:
        text = _utf8(raw)
    except UnicodeDecodeError as e:
        raise Invalid(f"not UTF-8 (byte {e.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        row = parse_json(text, "line")
    except Invalid:
        raise Invalid("not valid JSON") from None
    col = describe(column, QUOTE)
    if not isinstance(row, dict):
        raise Invalid(f"must be a JSON object, found {describe(row, QUOTE)}")
    if "file_name" not in row:
        raise Invalid(f"lacks \"file_name\" (has {_keys(row)})")
    name = row["file_name"]
    if not isinstance(name, str):
        raise Invalid(f"file_name must be a string, found {describe(name, QUOTE)}")
    if column not in row:
        raise Invalid(f"lacks the caption column {col} (has {_keys(row)})")
    value = row[column]
    if not isinstance(value, str):
        raise Invalid(f"{col} must be a string, found {describe(value, QUOTE)}")
    caption = normalise(value)
    if not caption:
        raise Invalid(f"{col} is empty")
    try:
        size = len(caption.encode())
    except UnicodeEncodeError:
        raise Invalid(f"{col} holds a lone surrogate escape, which is not text") from None
    if size > MAX_CAPTION_BYTES:
        raise Invalid(f"{col} is over {MAX_CAPTION_BYTES // 1024} KiB; longer captions are refused")
    return name, caption


def _utf8(raw: bytes) -> str:
    """Strict UTF-8; a leading byte order mark (Windows Notepad writes one) is not text."""
    return raw.decode("utf-8").removeprefix("\ufeff")


def _keys(row: dict, most: int = 8) -> str:
    """The object's keys, quoted, at most `most` of them: '"file_name", "caption"'."""
    keys = [describe(k, 40) for k in list(row)[:most]]
    more = f" and {len(row) - most} more" if len(row) > most else ""
    return (", ".join(keys) + more) if keys else "no keys"
