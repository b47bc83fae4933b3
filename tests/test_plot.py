"""plot.line_chart on data other than schedules, and its tick choice."""

import math

import pytest
from PIL import Image

from diffcli.plot import Series, line_chart, nice_ticks, side_by_side, tick_label


def test_nice_ticks():
    assert nice_ticks(0, 999) == [0, 200, 400, 600, 800]
    assert nice_ticks(-0.04, 1.04) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(-90, 46) == [-80, -60, -40, -20, 0, 20, 40]
    assert [tick_label(v, 0.2) for v in nice_ticks(-0.04, 1.04)] == ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert tick_label(-1e-17, 0.2) == "0"  # no "-0"


def test_learning_curve_with_gaps_and_marks():
    steps = list(range(0, 2000, 10))
    loss = [1 / (1 + s / 100) for s in steps]
    loss[50] = math.nan  # a gap, e.g. a step that was not logged
    val = [math.inf] * len(steps)  # nothing drawable at all
    img = line_chart(
        [Series("train", steps, loss, marks=[10, 100]), Series("val", steps, val)],
        size=(500, 300), title="loss", x_label="step", y_label="MSE", mark_label="checkpoints",
    )
    assert isinstance(img, Image.Image) and img.size == (500, 300) and img.mode == "RGB"
    assert len(img.getcolors(maxcolors=1 << 20)) > 50


def test_side_by_side():
    a, b = Image.new("RGB", (30, 20), "red"), Image.new("RGB", (10, 40), "blue")
    out = side_by_side([a, b])
    assert out.size == (40, 40)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((35, 39)) == (0, 0, 255)
    assert out.getpixel((0, 39)) == (255, 255, 255)
