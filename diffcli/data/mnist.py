"""The MNIST idx files -> an image folder (one subfolder per label) that `diffcli train` reads.

    python -m diffcli.data.mnist IDX_DIR OUT_DIR [--split test|train|both] [--limit N] [--overwrite]

IDX_DIR holds the files of the MNIST database (LeCun, Cortes and Burges), gzipped or not, of the
splits asked for: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte.
The idx format: a big-endian magic number (2051 for images, 2049 for labels: two zero bytes, the
type 0x08 for unsigned bytes, the number of dimensions), one big-endian uint32 per dimension, then
the data, row-major. Images become 8-bit grayscale PNGs named by their index in the split,
OUT_DIR/LABEL/NNNNN.png (with --split both: train-NNNNN.png and test-NNNNN.png), the layout of the
folder the shipped model was trained on (the test split, `--split test`, the default).

Every file is checked (magic, dimensions, size against the header's counts, images against labels)
before anything is written; the PNGs are written into a hidden folder beside OUT_DIR, which becomes
OUT_DIR when complete, so a failure or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import signal
import struct
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from diffcli import atomic
from diffcli.errors import DiffcliError, InputError, OutputExistsError, UsageError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: ubyte, 3 dimensions; 0x00000801: ubyte, 1
SPLITS = {"train": "train", "test": "t10k"}  # our split name -> the files' prefix
CHUNK = 1 << 20


@dataclass(frozen=True)
class IdxFile:
    """One checked idx file: where its data starts, and its dimensions."""

    path: Path
    dims: tuple[int, ...]  # (count,) for labels, (count, rows, cols) for images
    data_offset: int

    @property
    def count(self) -> int:
        return self.dims[0]


def _open(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzipped (recognised by content, not by name)."""
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def find(idx_dir: Path, prefix: str, kind: str) -> Path:
    """IDX_DIR/{prefix}-{kind}-idx?-ubyte, plain or .gz."""
    name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for candidate in (idx_dir / name, idx_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise InputError(f"no {name} or {name}.gz in {idx_dir}")


def check(path: Path, magic: int) -> IdxFile:
    """Read the header and stream the data once to check its length against the header's counts
    (in constant memory: a gzip stream's size is only known by reading it)."""
    ndim = magic & 0xFF
    what = "images" if magic == IMAGES_MAGIC else "labels"
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * ndim)
            if len(head) < 4 + 4 * ndim:
                raise InputError(f"{path} is too short for an idx {what} header")
            (found,) = struct.unpack(">I", head[:4])
            if found != magic:
                raise InputError(f"{path} is not an idx {what} file (magic number {found}, expected {magic})")
            dims = struct.unpack(f">{ndim}I", head[4:])
            size = 0
            while chunk := f.read(CHUNK):
                size += len(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path} is a truncated or corrupt gzip file ({e})") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if ndim == 3 and (dims[1] < 1 or dims[2] < 1):
        raise InputError(f"{path} has images of {dims[1]}x{dims[2]} pixels")
    expected = dims[0] * (dims[1] * dims[2] if ndim == 3 else 1)
    if size != expected:
        raise InputError(f"{path} holds {size} bytes of data, its header says {dims[0]} {what} ({expected} bytes)"
                         + (": truncated" if size < expected else ""))
    return IdxFile(path, dims, 4 + 4 * ndim)


@dataclass(frozen=True)
class Split:
    name: str  # "train" or "test"
    images: IdxFile
    labels: IdxFile
    count: int  # images to convert: all, or the first --limit


def checked_splits(idx_dir: Path, split: str, limit: int | None) -> list[Split]:
    if not idx_dir.is_dir():
        raise InputError(f"no folder {idx_dir}" if not idx_dir.exists() else f"{idx_dir} is not a folder")
    out = []
    for name in (("train", "test") if split == "both" else (split,)):
        prefix = SPLITS[name]
        images = check(find(idx_dir, prefix, "images"), IMAGES_MAGIC)
        labels = check(find(idx_dir, prefix, "labels"), LABELS_MAGIC)
        if images.count != labels.count:
            raise InputError(f"{images.path} has {images.count} images but {labels.path} has {labels.count} labels")
        if images.count == 0:
            raise InputError(f"{images.path} holds no images")
        out.append(Split(name, images, labels, min(images.count, limit or images.count)))
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Make the complete staging folder OUT: by one rename when OUT is missing or empty; with
    --overwrite into a non-empty OUT, file by file (each rename atomic)."""
    try:
        os.replace(staging, out)  # POSIX replaces an empty folder
        return
    except OSError:
        if not out.is_dir() or (any(out.iterdir()) and not overwrite):
            raise
    if not any(out.iterdir()):  # empty, but the platform would not replace it
        out.rmdir()
        os.replace(staging, out)
        return
    for src in sorted(staging.rglob("*")):
        dst = out / src.relative_to(staging)
        if src.is_dir():
            dst.mkdir(exist_ok=True)
        else:
            os.replace(src, dst)


def convert(
    idx_dir: str | Path,
    out: str | Path,
    split: str = "test",
    limit: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Counter[str]:
    """Convert; returns the number of images per label folder. InputError for a bad or missing idx
    file (exit 4), OutputExistsError for a non-empty OUT without overwrite (exit 3)."""
    from PIL import Image

    if split not in ("train", "test", "both"):
        raise UsageError(f"unknown split {split!r}; choose train, test or both")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    idx_dir, out = Path(idx_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite to write into it")
    splits = checked_splits(idx_dir, split, limit)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; OUT_DIR gets the usual permissions
    except OSError as e:
        raise DiffcliError(f"cannot write in {out.parent}: {e.strerror or e}") from e
    counts: Counter[str] = Counter()
    total, done = sum(s.count for s in splits), 0
    try:
        for s in splits:
            _, rows, cols = s.images.dims
            with _open(s.labels.path) as lf, _open(s.images.path) as imf:
                lf.read(s.labels.data_offset)
                imf.read(s.images.data_offset)
                labels = lf.read(s.count)  # checked: the file holds at least this many
                for i, label in enumerate(labels):
                    pixels = imf.read(rows * cols)
                    if len(pixels) != rows * cols:  # checked above; only a file changed since then
                        raise InputError(f"{s.images.path} ended early (did it change while being read?)")
                    png = io.BytesIO()
                    Image.frombytes("L", (cols, rows), pixels).save(png, format="PNG")
                    name = f"{i:05d}.png" if len(splits) == 1 else f"{s.name}-{i:05d}.png"
                    atomic.write_bytes(staging / str(label) / name, png.getvalue(), overwrite=False)
                    counts[str(label)] += 1
                    done += 1
                    if progress is not None:
                        progress(done, total)
        _publish(staging, out, overwrite)
    except OSError as e:
        raise DiffcliError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when published by rename
    return counts


# --------------------------------------------------------------------------------------------------
# python -m diffcli.data.mnist
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like the diffcli command
        print(f"Error: {message} (see 'python -m diffcli.data.mnist --help')", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m diffcli.data.mnist",
        description="Convert the MNIST idx files (gzipped or not) into an image folder with one subfolder "
        "per digit, for `diffcli train`. Exit codes: 0 ok, 1 cannot write, 2 usage, 3 OUT_DIR not empty, "
        "4 a missing or bad idx file, 130 interrupted.",
    )
    parser.add_argument("idx_dir", metavar="IDX_DIR", help="folder with train-images-idx3-ubyte[.gz], "
                        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")
    parser.add_argument("out", metavar="OUT_DIR", help="image folder to create (must be missing or empty)")
    parser.add_argument("--split", choices=("test", "train", "both"), default="test",
                        help="test: the 10,000 test digits, the shipped model's data (default); train: the "
                        "60,000 training digits; both: all, named train-NNNNN.png and test-NNNNN.png")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N images of each split")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR, "
                        "replacing files of the same name")
    parser.add_argument("-q", "--quiet", action="store_true", help="no messages on stderr")
    args = parser.parse_args(argv)

    from diffcli.progress import Progress

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the staging folder is removed

    old = signal.signal(signal.SIGTERM, stop)
    try:
        with Progress("converting", quiet=args.quiet) as bar:
            counts = convert(args.idx_dir, args.out, args.split, args.limit, args.overwrite, progress=bar.update)
    except DiffcliError as e:
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    if not args.quiet:
        per_class = " ".join(f"{k}:{counts[k]}" for k in sorted(counts, key=lambda k: int(k)))
        print(f"wrote {sum(counts.values())} images in {len(counts)} class folders ({per_class})", file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
