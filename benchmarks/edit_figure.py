"""Development tool: the pictures of the README's "Edit images" section. (Not part of the package.)

Runs the section's commands with the shipped model, from the repository root, exactly as written there,
and draws weights/edit-demo.png from their outputs. Also writes the inputs the commands use,
weights/edit-example.png (a 3 the shipped model drew) and weights/edit-mask.png (the 12x12 centre
square), and keeps one edited image with its parameters, weights/edit-as-8.png, which
`diffcli sample --from-png weights/edit-as-8.png` reproduces (tests/test_edit.py checks it).

    python benchmarks/edit_figure.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE, MASK = "weights/edit-example.png", "weights/edit-mask.png"
STRENGTHS = ("0.2", "0.4", "0.6", "0.8", "1.0")
SCALE, GAP, LABEL_W, CAPTION_H = 4, 10, 230, 22


def diffcli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffcli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def make_inputs() -> None:
    """The example digit (the shipped model's 3 of seed 23, without metadata) and the mask."""
    with tempfile.TemporaryDirectory() as tmp:
        diffcli("sample", "--class", "3", "--seed", "23", "-n", "1", "--no-metadata", "-o", tmp, "--name", "x.png", "-q")
        shutil.copyfile(Path(tmp) / "x.png", ROOT / EXAMPLE)
    mask = Image.new("L", (28, 28), 0)
    mask.paste(255, (8, 8, 20, 20))  # rows and columns 8..19
    mask.save(ROOT / MASK)


def main() -> None:
    make_inputs()
    out = Path(tempfile.mkdtemp(prefix="edits-"))
    # the README's commands (with -o pointing into a temporary folder)
    for c in ("3", "8"):
        diffcli("sample", "--init-image", EXAMPLE, "--mask", MASK, "--class", c, "-n", "4", "--seed", "1",
                "-o", str(out / f"as-{c}"))
    for s in STRENGTHS:
        diffcli("sample", "--init-image", EXAMPLE, "--strength", s, "--class", "3", "--seed", "1",
                "-o", str(out / "strength"), "--name", f"{s}.png")
    shutil.copyfile(out / "as-8" / "edit-example-1.png", ROOT / "weights" / "edit-as-8.png")

    example = Image.open(ROOT / EXAMPLE).convert("L")
    mask = Image.open(ROOT / MASK).convert("L")
    cut = example.copy()
    cut.paste(96, (8, 8, 20, 20))
    rows = [
        ("the input", [(example, "edit-example.png"), (mask, "edit-mask.png"), (cut, "what is redrawn")]),
        ("--mask, --class 3", [(Image.open(out / "as-3" / f"edit-example-{i}.png"), f"seed {i}") for i in range(1, 5)]),
        ("--mask, --class 8", [(Image.open(out / "as-8" / f"edit-example-{i}.png"), f"seed {i}") for i in range(1, 5)]),
        ("no mask, --class 3", [(Image.open(out / "strength" / f"{s}.png"), f"strength {s}") for s in STRENGTHS]),
    ]
    cell = 28 * SCALE
    W = LABEL_W + 5 * (cell + GAP) + GAP
    H = len(rows) * (cell + CAPTION_H + GAP) + GAP
    fig = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default(size=15)
    for r, (label, cells) in enumerate(rows):
        y = GAP + r * (cell + CAPTION_H + GAP)
        draw.text((GAP, y + cell // 2), label, fill=0, font=font, anchor="lm")
        for c, (im, caption) in enumerate(cells):
            x = LABEL_W + c * (cell + GAP)
            fig.paste(im.convert("L").resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + cell // 2, y + cell + 4), caption, fill=0, font=font, anchor="mt")
    fig.save(ROOT / "weights" / "edit-demo.png", optimize=True)
    shutil.rmtree(out)
    print(ROOT / "weights" / "edit-demo.png")


if __name__ == "__main__":
    main()
