"""`python -m diffcli.data.mnist`: tiny synthetic idx files, gzipped and plain, converted and read back.

Run as a user would (a subprocess for the CLI checks: exit code first, then the output), plus the
Makefile's `weights` target refusing a missing data folder.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffcli.data.mnist import main

REPO = Path(__file__).resolve().parent.parent


def image(seed: int, rows: int = 28, cols: int = 28) -> bytes:
    """A known, distinct pixel pattern per seed."""
    return bytes((seed * 37 + r * 5 + c * 11) % 256 for r in range(rows) for c in range(cols))


def idx_images(images: list[bytes], rows: int = 28, cols: int = 28, magic: int = 2051, count: int | None = None) -> bytes:
    return struct.pack(">IIII", magic, len(images) if count is None else count, rows, cols) + b"".join(images)


def idx_labels(labels: list[int], magic: int = 2049, count: int | None = None) -> bytes:
    return struct.pack(">II", magic, len(labels) if count is None else count) + bytes(labels)


def write_idx(folder: Path, prefix: str, images: bytes, labels: bytes, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, data in (("images-idx3", images), ("labels-idx1", labels)):
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


TEST_LABELS = [7, 2, 1, 0, 4, 1]
TRAIN_LABELS = [5, 0, 4]


@pytest.fixture
def idx_dir(tmp_path) -> Path:
    """t10k: 6 images, gzipped; train: 3 images, plain."""
    folder = tmp_path / "idx"
    write_idx(folder, "t10k", idx_images([image(i) for i in range(6)]), idx_labels(TEST_LABELS), gz=True)
    write_idx(folder, "train", idx_images([image(100 + i) for i in range(3)]), idx_labels(TRAIN_LABELS), gz=False)
    return folder


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcli.data.mnist", *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False, **kwargs)


def pngs(folder: Path) -> dict[str, bytes]:
    """'label/name.png' -> pixels, for every PNG under folder."""
    out = {}
    for p in sorted(folder.rglob("*.png")):
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (28, 28)
            out[p.relative_to(folder).as_posix()] = im.tobytes()
    return out


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------------


def test_test_split_gzipped(tmp_path, idx_dir):
    out = tmp_path / "digits"
    result = run(idx_dir, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert "wrote 6 images in 5 class folders (0:1 1:2 2:1 4:1 7:1)" in result.stderr
    assert pngs(out) == {f"{label}/{i:05d}.png": image(i) for i, label in enumerate(TEST_LABELS)}
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2", "4", "7"]  # no leftovers
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_train_split_plain_with_limit(tmp_path, idx_dir):
    out = tmp_path / "digits"
    assert main([str(idx_dir), str(out), "--split", "train", "--limit", "2", "--quiet"]) == 0
    assert pngs(out) == {"5/00000.png": image(100), "0/00001.png": image(101)}


def test_both_splits_are_prefixed(tmp_path, idx_dir):
    out = tmp_path / "digits"
    assert main([str(idx_dir), str(out), "--split", "both", "-q"]) == 0
    expected = {f"{label}/train-{i:05d}.png": image(100 + i) for i, label in enumerate(TRAIN_LABELS)}
    expected.update({f"{label}/test-{i:05d}.png": image(i) for i, label in enumerate(TEST_LABELS)})
    assert pngs(out) == expected


def test_a_non_square_size_is_kept(tmp_path):
    folder, out = tmp_path / "idx", tmp_path / "out"
    write_idx(folder, "t10k", idx_images([image(1, 4, 6)], rows=4, cols=6), idx_labels([3]), gz=False)
    assert main([str(folder), str(out), "-q"]) == 0
    with Image.open(out / "3" / "00000.png") as im:
        assert im.size == (6, 4) and im.tobytes() == image(1, 4, 6)


def test_the_output_folder_must_be_empty(tmp_path, idx_dir):
    out = tmp_path / "digits"
    (out / "7").mkdir(parents=True)
    (out / "7" / "00000.png").write_bytes(b"old")
    result = run(idx_dir, out)
    assert result.returncode == 3
    assert "not empty; pass --overwrite" in assert_one_error_line(result.stderr)
    assert result.stdout == ""
    assert (out / "7" / "00000.png").read_bytes() == b"old"

    result = run(idx_dir, out, "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    assert pngs(out)["7/00000.png"] == image(0)
    assert len(pngs(out)) == 6

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(idx_dir), str(empty), "-q"]) == 0 and len(pngs(empty)) == 6


def test_usage_errors_exit_2(tmp_path, idx_dir):
    for args in (["--limit", "0"], ["--split", "validation"], ["--limit", "x"]):
        result = run(idx_dir, tmp_path / "out", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert_one_error_line(result.stderr)
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Bad idx files: one Error line, exit 4, nothing written
# --------------------------------------------------------------------------------------------------


GOOD_IMAGES = [image(i) for i in range(3)]


def _truncated_gzip(folder: Path) -> None:
    write_idx(folder, "t10k", idx_images(GOOD_IMAGES), idx_labels([1, 2, 3]), gz=True)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])


BAD = {
    "images magic": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES, magic=2049), idx_labels([1, 2, 3]), True),
                     "is not an idx images file (magic number 2049, expected 2051)"),
    "labels magic": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES), idx_labels([1, 2, 3], magic=2051), False),
                     "is not an idx labels file (magic number 2051, expected 2049)"),
    "truncated images": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES)[:-100], idx_labels([1, 2, 3]), False),
                         "holds 2252 bytes of data, its header says 3 images (2352 bytes): truncated"),
    "images beyond the count": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES, count=2), idx_labels([1, 2]), False),
                                "its header says 2 images"),
    "huge count claimed": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES, count=2**32 - 1), idx_labels([1, 2, 3]), True),
                           "its header says 4294967295 images"),
    "count mismatch": (lambda f: write_idx(f, "t10k", idx_images(GOOD_IMAGES), idx_labels([1, 2]), True),
                       "has 3 images but"),
    "short header": (lambda f: write_idx(f, "t10k", b"\x00\x00\x08", idx_labels([1]), False), "too short for an idx images header"),
    "truncated gzip": (_truncated_gzip, "truncated or corrupt gzip file"),
    "missing labels": (lambda f: (write_idx(f, "t10k", idx_images(GOOD_IMAGES), b"", False),
                                  (f / "t10k-labels-idx1-ubyte").unlink()),
                       "no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz in"),
    "no images": (lambda f: write_idx(f, "t10k", idx_images([]), idx_labels([]), False), "holds no images"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_idx_files_exit_4(tmp_path, case):
    make, words = BAD[case]
    folder, out = tmp_path / "idx", tmp_path / "out"
    folder.mkdir()
    make(folder)
    result = run(folder, out)
    assert result.returncode == 4, result.stderr
    assert words in assert_one_error_line(result.stderr)
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no output folder, no staging folder


def test_a_missing_idx_folder_exits_4(tmp_path):
    result = run(tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode == 4
    assert "no folder" in assert_one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()


def test_a_bad_file_leaves_an_empty_output_folder_empty(tmp_path):
    folder, out = tmp_path / "idx", tmp_path / "out"
    write_idx(folder, "t10k", idx_images(GOOD_IMAGES), idx_labels([1, 2]), gz=False)
    out.mkdir()
    assert main([str(folder), str(out), "-q"]) == 4
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# make weights without data
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_weights_without_data_fails_first(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(["make", "-s", "weights", "DATA=/nonexistent", f"WEIGHTS_RUN={run_dir}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error: ")]
    assert ours == [("Error: no MNIST folder at /nonexistent; make one with python -m diffcli.data.mnist and pass "
                     "DATA=path (see weights/README.md)")]
    assert ours[0] in result.stderr
    assert not run_dir.exists()
