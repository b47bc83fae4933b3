"""Line charts drawn with Pillow alone (no matplotlib).

line_chart() knows nothing about diffusion: it draws any list of Series (a noise schedule against t,
a loss against the training step) with axes, "nice" ticks, a light grid, a legend and optional
marked points. Everything is drawn at up to 3 times the size and scaled down, which is Pillow's way
to get smooth lines and text.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

MAX_DRAW_PX = 4000  # longest side of the supersampled canvas, to bound memory
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
INK, GRID, BACKGROUND = "#222222", "#e4e4e4", "white"


@dataclass(frozen=True)
class Series:
    """One line: y against x. Non-finite y values leave a gap. `marks` are indices of points to dot."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    marks: Sequence[int] = field(default_factory=tuple)


# --------------------------------------------------------------------------------------------------
# Ticks
# --------------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About `target` round values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / max(target - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs(math.log(step / raw)))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text  # no "-0"


# --------------------------------------------------------------------------------------------------
# The chart
# --------------------------------------------------------------------------------------------------


def _finite_range(series: Sequence[Series], axis: str) -> tuple[float, float]:
    values = [v for s in series for v in getattr(s, axis) if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def line_chart(
    series: Sequence[Series],
    *,
    size: tuple[int, int] = (900, 600),
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    y_range: tuple[float, float] | None = None,
    legend: bool = True,
    mark_label: str | None = None,
) -> Image.Image:
    """An RGB image of the given size: one colored line per series, in COLORS order.

    y_range fixes the y axis (lines outside it are clipped); by default it spans the finite data.
    mark_label, when given, adds a legend entry for the dotted points.
    """
    S = max(1, min(3, MAX_DRAW_PX // max(size)))  # supersampling factor
    W, H = size[0] * S, size[1] * S
    font_px = max(10, min(28, round(min(size) / 34))) * S
    font = ImageFont.load_default(size=font_px)
    title_font = ImageFont.load_default(size=round(font_px * 1.2))
    line = max(2, round(min(size) / 300)) * S  # width of the data lines
    thin = max(S, line // 3)  # frame, ticks and grid
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)

    # Data ranges, with a margin so that lines do not run along the frame.
    x_lo, x_hi = _finite_range(series, "x")
    y_lo, y_hi = y_range if y_range is not None else _finite_range(series, "y")
    x_pad, y_pad = 0.02 * (x_hi - x_lo), 0.04 * (y_hi - y_lo)
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo - y_pad, y_hi + y_pad
    x_ticks, y_ticks = nice_ticks(x_lo, x_hi), nice_ticks(y_lo, y_hi)
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
    y_texts = [tick_label(v, y_step) for v in y_ticks]

    # Plot area: room on the left for the y tick labels and y label, below for x ticks and x label.
    gap, tick = font_px // 2, font_px // 2
    line_h = font_px + gap
    y_text_w = round(max(draw.textlength(t, font=font) for t in y_texts))
    left = gap + (line_h if y_label else 0) + y_text_w + tick + gap
    top = gap + (round(font_px * 1.2) + gap if title else line_h // 2)
    right = W - 2 * gap
    bottom = H - gap - (line_h if x_label else 0) - line_h - tick

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    # Grid, frame, ticks and their labels.
    for v, text in zip(x_ticks, (tick_label(v, x_step) for v in x_ticks)):
        x = px(v)
        draw.line([(x, top), (x, bottom)], fill=GRID, width=thin)
        draw.line([(x, bottom), (x, bottom + tick)], fill=INK, width=thin)
        draw.text((x, bottom + tick + gap // 2), text, fill=INK, font=font, anchor="mt")
    for v, text in zip(y_ticks, y_texts):
        y = py(v)
        draw.line([(left, y), (right, y)], fill=GRID, width=thin)
        draw.line([(left - tick, y), (left, y)], fill=INK, width=thin)
        draw.text((left - tick - gap // 2, y), text, fill=INK, font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline=INK, width=thin)
    if title:
        draw.text(((left + right) / 2, gap), title, fill=INK, font=title_font, anchor="mt")
    if x_label:
        draw.text(((left + right) / 2, H - gap), x_label, fill=INK, font=font, anchor="md")
    if y_label:
        label = Image.new("RGBA", (round(draw.textlength(y_label, font=font)) + S, line_h), (0, 0, 0, 0))
        ImageDraw.Draw(label).text((0, 0), y_label, fill=INK, font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (gap, round((top + bottom - label.height) / 2)), label)

    # Lines and dots, drawn on a layer the size of the plot area so that they are clipped to it.
    layer = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    radius = 1.75 * line
    for s, color in zip(series, itertools.cycle(COLORS)):
        run: list[tuple[float, float]] = []
        for x, y in zip(s.x, s.y):
            if math.isfinite(y):
                run.append((px(x) - left, py(y) - top))
            else:
                _polyline(pen, run, color, line)
                run = []
        _polyline(pen, run, color, line)
        for i in s.marks:
            if math.isfinite(s.y[i]):
                cx, cy = px(s.x[i]) - left, py(s.y[i]) - top
                pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color, outline="white")
    img.paste(layer, (left, top), layer)

    if legend and series:
        _legend(draw, series, mark_label, font, line, (left, top, right, bottom), (px, py))
    return img.resize(size, Image.Resampling.LANCZOS)


def _polyline(pen: ImageDraw.ImageDraw, points: list[tuple[float, float]], color: str, width: int) -> None:
    if len(points) > 1:
        pen.line(points, fill=color, width=width, joint="curve")


def _legend(
    draw: ImageDraw.ImageDraw,
    series: Sequence[Series],
    mark_label: str | None,
    font: ImageFont.FreeTypeFont,
    line: int,
    area: tuple[int, int, int, int],
    to_px: tuple[Callable[[float], float], Callable[[float], float]],
) -> None:
    """A boxed legend in the corner (or mid-side) of the plot area that the fewest data points and lines cross."""
    left, top, right, bottom = area
    px, py = to_px
    font_px = round(font.size)
    gap, swatch = font_px // 2, 2 * font_px
    entries = [(s.label, color, False) for s, color in zip(series, itertools.cycle(COLORS))]
    if mark_label:
        entries.append((mark_label, INK, True))
    w = gap + swatch + gap + max(draw.textlength(e[0], font=font) for e in entries) + gap
    h = gap + len(entries) * (font_px + gap)
    inset = 2 * gap
    corners = [  # upper right first: it wins ties
        (right - inset - w, top + inset),
        (left + inset, top + inset),
        (right - inset - w, bottom - inset - h),
        (left + inset, bottom - inset - h),
        (right - inset - w, (top + bottom - h) / 2),  # then the middle of either side
        (left + inset, (top + bottom - h) / 2),
    ]

    # the lines as well as the data points: points along each segment between finite neighbours
    along = [
        (px(x0 + (x1 - x0) * k / 16), py(y0 + (y1 - y0) * k / 16))
        for s in series
        for (x0, y0), (x1, y1) in itertools.pairwise(zip(s.x, s.y))
        if math.isfinite(y0) and math.isfinite(y1)
        for k in range(17)
    ]
    dots = [(px(x), py(y)) for s in series for x, y in zip(s.x, s.y) if math.isfinite(y)]

    def crowding(corner: tuple[float, float]) -> int:
        x0, y0 = corner
        return sum(1 for x, y in dots + along if x0 <= x <= x0 + w and y0 <= y <= y0 + h)

    x0, y0 = min(corners, key=crowding)
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill="white", outline="#999999", width=max(1, line // 3))
    for k, (label, color, dot) in enumerate(entries):
        cy = y0 + gap + k * (font_px + gap) + font_px / 2
        sx = x0 + gap
        if dot:
            r = 1.75 * line
            draw.ellipse([sx + swatch / 2 - r, cy - r, sx + swatch / 2 + r, cy + r], fill=color)
        else:
            draw.line([(sx, cy), (sx + swatch, cy)], fill=color, width=line)
        draw.text((sx + swatch + gap, cy), label, fill=INK, font=font, anchor="lm")


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Panels left to right, top-aligned, on a white background."""
    out = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), BACKGROUND)
    x = 0
    for image in images:
        out.paste(image, (x, 0))
        x += image.width
    return out
