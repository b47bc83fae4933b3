"""Split a class-folder image set into train and held-out folders of symbolic links (nothing copied).

    python benchmarks/split_folder.py ../shared/data/cifar10-20k ../diffcli-runs/cifar --held-out 200

makes DEST/train/CLASS/... and DEST/test/CLASS/...: per class, a seeded shuffle's first --held-out
files go to test, the rest to train. The shipped CIFAR-10 autoencoder and latent model were trained
on train (18,000 photos) and measured on test (2,000 photos they never saw). Run again, it checks
that an existing split is the same one and leaves it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--held-out", type=int, default=200, help="files per class for test")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    classes = sorted(p for p in a.src.iterdir() if p.is_dir() and not p.name.startswith(".")) if a.src.is_dir() else []
    if not classes:
        print(f"Error: {a.src} has no class folders", file=sys.stderr)
        return 4
    rng = random.Random(a.seed)
    counts = {"train": 0, "test": 0}
    for cls in classes:
        files = sorted(p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) <= a.held_out:
            print(f"Error: {cls} has {len(files)} images, not more than --held-out {a.held_out}", file=sys.stderr)
            return 4
        rng.shuffle(files)
        for split, part in (("test", files[: a.held_out]), ("train", files[a.held_out :])):
            folder = a.dest / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for f in part:
                link = folder / f.name
                if link.is_symlink() or link.exists():
                    if link.resolve() != f.resolve():
                        print(f"Error: {link} exists and is not a link to {f}", file=sys.stderr)
                        return 3
                else:
                    os.symlink(f.resolve(), link)
                counts[split] += 1
    print(f"{a.dest / 'train'}: {counts['train']} images; {a.dest / 'test'}: {counts['test']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
