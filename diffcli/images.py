"""Tensors <-> PNG: conversion, grids, generation parameters in PNG text chunks, atomic writes."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from diffcli import atomic


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255], (B, C, H, W) -> (B, H, W, C) on the CPU."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float [-1, 1]."""
    return x.float() / 127.5 - 1


def to_pil(img: torch.Tensor) -> Image.Image:
    """One uint8 (H, W, C) image -> PIL, grayscale 'L' for one channel, 'RGB' for three."""
    arr = img.contiguous().clone()  # own storage, exactly H*W*C bytes (numpy is not a dependency)
    H, W, C = arr.shape
    return Image.frombytes("L" if C == 1 else "RGB", (W, H), bytes(arr.untyped_storage()))


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2, pad_value: int = 0) -> torch.Tensor:
    """uint8 (B, H, W, C) -> one uint8 (H', W', C) grid, row-major, `pad` pixels between cells."""
    B, H, W, C = images.shape
    ncols = ncols or math.ceil(math.sqrt(B))
    nrows = math.ceil(B / ncols)
    grid = torch.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, C), pad_value, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = images[i]
    return grid


def png_bytes(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | Path, img: Image.Image, text: dict[str, str] | None = None, overwrite: bool = False) -> None:
    """Encode in memory, then write atomically (exclusive create unless overwrite)."""
    atomic.write_bytes(path, png_bytes(img, text), overwrite=overwrite)


def parameters_text(p: dict[str, Any]) -> str:
    """The widely used one-line form: 'Steps: 50, Sampler: ddim, CFG scale: 2.0, Seed: 7, Size: 28x28, ...'."""
    parts = [
        ("Steps", p.get("steps")),
        ("Sampler", p.get("sampler")),
        ("CFG scale", p.get("guidance")),
        ("Seed", p.get("seed")),
        ("Size", f"{p['width']}x{p['height']}" if "width" in p else None),
        ("Model hash", p.get("model_hash")),
        ("Class", p.get("class")),
        ("Eta", p.get("eta") if p.get("sampler") == "ddim" else None),
        ("Spacing", p.get("spacing") if not p.get("sigmas") else None),
        ("Sigmas", p.get("sigmas")),
        ("NFE", p.get("nfe")),
        ("Version", f"diffcli {p['diffcli_version']}" if "diffcli_version" in p else None),
    ]
    return ", ".join(f"{k}: {v}" for k, v in parts if v is not None)


def generation_text(params: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks diffcli writes: 'parameters' (one line) and 'diffcli' (full JSON)."""
    return {"parameters": parameters_text(params), "diffcli": json.dumps(params, sort_keys=True)}


def read_png_text(path: str | Path) -> dict[str, str]:
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})
