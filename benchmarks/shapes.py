"""The synthetic captioned set for the text-to-image model, and the pixel-rule judge that scores it.

Each image is 32x32 RGB: one shape (circle, axis-aligned square, point-up triangle) in one of eight
colours on a plain background of another, captioned exactly `a {fg} {shape} on a {bg} background`.
The shape's box is 14 to 22 px a side and its centre within 4 px of the image centre (both drawn at
random); nothing is antialiased, so every pixel is exactly one palette colour and a 1-px border is
always background.

A triple is (fg index, bg index, shape index), indices in COLOURS and SHAPES order: 8 x 7 x 3 = 168
triples. The 32 with (fg + bg + shape) % 5 == 0 are held back (19%): never in a training set, they
measure whether a model composes attributes it only saw apart.

    python benchmarks/shapes.py ../diffcli-runs/shapes --per-triple 50             # PNG + .txt sidecars
    python benchmarks/shapes.py OUT --per-triple 50 --layout jsonl                 # PNG + metadata.jsonl

Files are named `{fg initial}{fg}_{bg initial}{bg}_{shape}_{n:04d}.png` in one flat folder (a red
circle on blue, the fourth of its triple: r0_b2_circle_0003.png). The same seed writes the same bytes.

judge(pixels) reads (fg, bg, shape) back from uint8 images (N, 3, H, W), by nearest palette colour
(Euclidean in RGB), so it also scores a model's slightly noisy samples: see its docstring.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE = 32  # image side
SIDES = (14, 22)  # the shape's box side, both ends drawn
MAX_OFFSET = 4  # px between the box's centre and the image's, on each axis
HELD_BACK_MODULUS = 5

_NAMES = tuple(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (8, 3)

# fill = the shape's pixels / its bounding box's: 1 for a square, about pi/4 for a circle, about 1/2
# for a triangle (drawn: 0.78-0.81 and 0.55-0.57 at sides 14-22); the cuts lie between
SQUARE_FILL = 0.9
CIRCLE_FILL = 0.65

Triple = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# captions and triples
# --------------------------------------------------------------------------------------------------


def caption(fg: int, bg: int, shape: int) -> str:
    return f"a {_NAMES[fg]} {SHAPES[shape]} on a {_NAMES[bg]} background"


def parse_caption(text: str) -> Triple:
    """caption's inverse; ValueError for any other text."""
    words = text.strip().split(" ")
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background" \
            or words[1] not in _NAMES or words[5] not in _NAMES or words[2] not in SHAPES or words[1] == words[5]:
        raise ValueError(f"not a caption of the shapes set: {text!r}")
    return _NAMES.index(words[1]), _NAMES.index(words[5]), SHAPES.index(words[2])


def held_back(fg: int, bg: int, shape: int) -> bool:
    return (fg + bg + shape) % HELD_BACK_MODULUS == 0


def triples(held_back: bool) -> list[Triple]:
    """The held-back triples (held_back=True) or the seen ones, in (fg, bg, shape) order."""
    # the rule of held_back(), which this parameter hides
    return [(f, b, s) for f in range(len(COLOURS)) for b in range(len(COLOURS)) if f != b
            for s in range(len(SHAPES)) if ((f + b + s) % HELD_BACK_MODULUS == 0) == held_back]


def file_stem(fg: int, bg: int, shape: int, n: int) -> str:
    return f"{_NAMES[fg][0]}{fg}_{_NAMES[bg][0]}{bg}_{SHAPES[shape]}_{n:04d}"


# --------------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------------


def offsets(side: int) -> range:
    """The dx (or dy) that keep a box of this side within MAX_OFFSET px of the image centre. An odd
    side's centre is a pixel's centre, half a pixel before the image's (see draw), so it gets one less."""
    return range(-MAX_OFFSET + side % 2, MAX_OFFSET + 1)


def mask(shape: int, side: int) -> np.ndarray:
    """bool (side, side): the pixels of the shape inscribed in a side x side box, by pixel centres.

    Coordinates are pixel indices, so the box runs 0 .. side-1 and its centre is c = (side-1)/2.
    Circle: within side/2 of the centre (which reaches the middle of each edge). Triangle: apex at the
    top centre, base the bottom row; row y spans c +- (c * y / (side-1) + 1/2), so the apex row holds
    one pixel (odd side) or two (even side) and the base the whole row.
    """
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    c = (side - 1) / 2
    if SHAPES[shape] == "square":
        return np.ones((side, side), dtype=bool)
    if SHAPES[shape] == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (side / 2) ** 2
    return np.abs(x - c) <= c * y / (side - 1) + 0.5 + 1e-9


def draw(fg: int, bg: int, shape: int, size: int, dx: int, dy: int) -> Image.Image:
    """A SIZE x SIZE RGB image: a shape of box side `size` on a plain background, no antialiasing.

    The box's top-left pixel is ((SIZE - size) // 2 + dx, (SIZE - size) // 2 + dy), so an even side's
    box is centred dx, dy px from the image centre and an odd side's half a pixel before that.
    """
    left, top = (SIZE - size) // 2 + dx, (SIZE - size) // 2 + dy
    if not (1 <= left and left + size <= SIZE - 1 and 1 <= top and top + size <= SIZE - 1):
        raise ValueError(f"a box of side {size} at offset ({dx}, {dy}) leaves no 1-px background border")
    pixels = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    pixels[:] = COLOURS[_NAMES[bg]]
    box = pixels[top:top + size, left:left + size]  # (size, size, 3), a view
    box[mask(shape, size)] = COLOURS[_NAMES[fg]]
    return Image.fromarray(pixels, "RGB")


def make_set(out: str | Path, per_triple: int, seed: int, layout: str = "sidecar",
             include_held_back: bool = False) -> list[Path]:
    """Write per_triple images of every seen triple (and of the held-back ones with include_held_back)
    into the empty or new folder out, with a .txt caption beside each PNG (layout "sidecar") or one
    metadata.jsonl of {"file_name", "text"} lines (layout "jsonl"). Returns the PNGs' paths in the
    order written. FileExistsError for a non-empty folder, ValueError for a bad layout or count."""
    if layout not in ("sidecar", "jsonl"):
        raise ValueError(f"layout must be sidecar or jsonl, not {layout!r}")
    if per_triple < 1:
        raise ValueError(f"per_triple must be at least 1, not {per_triple}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    chosen = sorted(triples(False) + (triples(True) if include_held_back else []))
    rng = random.Random(seed)
    written, records = [], []
    for fg, bg, shape in chosen:
        for n in range(per_triple):
            side = rng.randint(*SIDES)
            dx, dy = rng.choice(offsets(side)), rng.choice(offsets(side))
            path = out / (file_stem(fg, bg, shape, n) + ".png")
            draw(fg, bg, shape, side, dx, dy).save(path)
            text = caption(fg, bg, shape)
            if layout == "sidecar":
                path.with_suffix(".txt").write_text(text + "\n")
            records.append({"file_name": path.name, "text": text})
            written.append(path)
    if layout == "jsonl":
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return written


def read_set(folder: str | Path) -> list[tuple[Path, Triple]]:
    """A make_set folder's PNGs and the triples their captions name (metadata.jsonl when present, else
    the .txt sidecars), in file name order."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if meta.exists():
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        found = [(folder / r["file_name"], parse_caption(r["text"])) for r in rows]
    else:
        found = [(p, parse_caption(p.with_suffix(".txt").read_text())) for p in folder.glob("*.png")]
    return sorted(found)


# --------------------------------------------------------------------------------------------------
# judging
# --------------------------------------------------------------------------------------------------


def read_pngs(paths: list[str | Path]) -> np.ndarray:
    """PNGs of one size -> uint8 (N, 3, H, W), judge's input."""
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return np.stack(arrays).transpose(0, 3, 1, 2)


def nearest_colour(pixels) -> np.ndarray:
    """uint8 (N, 3, H, W) -> int (N, H, W): each pixel's nearest palette index (Euclidean in RGB)."""
    x = np.asarray(pixels, dtype=np.float32).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    d = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)  # (N, H, W, 8)
    return d.argmin(-1)


def _largest_component(region: np.ndarray) -> np.ndarray:
    """bool (H, W) -> the largest 4-connected part of it (specks of the colour elsewhere are dropped)."""
    H, W = region.shape
    seen = np.zeros_like(region)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(region)):
        if seen[start]:
            continue
        seen[start] = True
        part, stack = [], [start]
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < H and 0 <= u < W and region[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        if len(part) > len(best):
            best = part
    out = np.zeros_like(region)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def fill_ratio(region: np.ndarray) -> float:
    """The share of its bounding box that a non-empty bool (H, W) region covers."""
    ys, xs = np.nonzero(region)
    return len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def judge(pixels) -> list[Triple]:
    """uint8 images (N, 3, H, W), a numpy array or a CPU torch tensor -> (fg, bg, shape) per image.

    Every pixel is first mapped to its nearest palette colour (Euclidean in RGB), so noise well under
    half the distance between two palette colours (the closest pair, yellow and orange, are 81 apart)
    changes nothing.
      bg     the most common colour of the 1-px border;
      fg     the most common other colour in the image (the shape's interior outnumbers any fringe);
      shape  from the largest 4-connected region of fg pixels: the share of its bounding box it fills,
             > SQUARE_FILL square, > CIRCLE_FILL circle, else triangle.
    An image with no pixel off the background colour gets fg = shape = -1 (wrong on both).
    """
    pixels = np.asarray(pixels)
    return [_judge_one(c) for i in range(0, len(pixels), 512) for c in nearest_colour(pixels[i:i + 512])]


def _judge_one(c: np.ndarray) -> Triple:
    """int (H, W) palette indices -> (fg, bg, shape), by judge's rules."""
    border = np.concatenate([c[0], c[-1], c[1:-1, 0], c[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    counts = np.bincount(c.ravel(), minlength=len(COLOURS))
    counts[bg] = 0
    if counts.sum() == 0:
        return -1, bg, -1
    fg = int(counts.argmax())
    fill = fill_ratio(_largest_component(c == fg))
    shape = "square" if fill > SQUARE_FILL else "circle" if fill > CIRCLE_FILL else "triangle"
    return fg, bg, SHAPES.index(shape)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="a new or empty folder")
    ap.add_argument("--per-triple", type=int, required=True, help="images of each triple")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=("sidecar", "jsonl"), default="sidecar",
                    help="captions in a .txt beside each PNG, or in one metadata.jsonl")
    ap.add_argument("--include-held-back", action="store_true",
                    help="also the held-back triples (a test set, never for training)")
    a = ap.parse_args(argv)
    try:
        written = make_set(a.out, a.per_triple, a.seed, a.layout, a.include_held_back)
    except (FileExistsError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    n_triples = len(written) // a.per_triple
    print(f"wrote {len(written)} images ({n_triples} triples x {a.per_triple}) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
