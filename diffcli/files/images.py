"""Tensors <-> PNG: conversion, grids, generation parameters in PNG text chunks, atomic writes."""

from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from diffcli import atomic
from diffcli.digest import tensor_memory
from diffcli.errors import InputError


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255], (B, C, H, W) -> (B, H, W, C) on the CPU."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float [-1, 1]."""
    return x.float() / 127.5 - 1


def to_pil(img: torch.Tensor) -> Image.Image:
    """One uint8 (H, W, C) image -> PIL, grayscale 'L' for one channel, 'RGB' for three."""
    arr = img.contiguous()
    H, W, C = arr.shape
    # frombytes copies the buffer, so arr need only live through this call (numpy is not a dependency;
    # bytes(storage) would copy one byte at a time, and the storage may be a whole batch's)
    return Image.frombytes("L" if C == 1 else "RGB", (W, H), bytes(tensor_memory(arr)))


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
    """The widely used one-line form: 'Steps: 50, Sampler: ddim, CFG scale: 2.0, Seed: 7, Size: 28x28, ...';
    for a text model, A1111's three lines: the prompt, 'Negative prompt: ...' (when given), the settings."""
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
        ("Guidance interval", f'"{p["guidance_interval"]}"' if p.get("guidance_interval") else None),  # quoted: has a comma
        ("NFE", p.get("nfe")),
        ("Denoising strength", p.get("strength")),  # an edit (the name other tools use)
        ("Mask blur", p.get("mask_blur") or None),
        ("Version", f"diffcli {p['diffcli_version']}" if "diffcli_version" in p else None),
    ]
    line = ", ".join(f"{k}: {v}" for k, v in parts if v is not None)
    if p.get("prompt") is None:
        return line
    # a text-to-image image: A1111's layout, the prompt first, then the negative prompt, then the settings
    negative = p.get("negative_prompt")
    return p["prompt"] + "\n" + (f"Negative prompt: {negative}\n" if negative else "") + line


def generation_text(params: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks diffcli writes: 'parameters' (one line) and 'diffcli' (full JSON)."""
    return {"parameters": parameters_text(params), "diffcli": json.dumps(params, sort_keys=True)}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG, keyword -> text, read without decoding any pixels.

    A PNG may come from anywhere, so the chunks are walked here with bounds rather than by decoding
    the image: InputError (exit code 4) for a file that is missing, not a PNG, truncated (no IEND
    chunk) or damaged (a text chunk failing its CRC), and for text beyond Pillow's own limits
    (PngImagePlugin.MAX_TEXT_CHUNK per chunk, stored or decompressed; MAX_TEXT_MEMORY in all), so
    neither a huge chunk nor a compression bomb can take more. A text chunk whose content cannot be
    decoded (an unknown compression method, bad UTF-8 in iTXt) is skipped, as Pillow skips it; a
    keyword seen twice keeps its last text, as in Pillow."""
    from PIL.PngImagePlugin import MAX_TEXT_CHUNK, MAX_TEXT_MEMORY

    path = Path(path)
    if not path.exists():
        raise InputError(f"PNG file not found: {path}")
    text: dict[str, str] = {}
    total = 0
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                raise InputError(f"{path} is not a PNG file")
            while True:
                head = f.read(8)
                if len(head) < 8:
                    raise InputError(f"{path} is truncated (it ends before the PNG's IEND chunk)")
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if length >= 2**31:
                    raise InputError(f"{path} is damaged (a chunk claims {length} bytes; PNG allows 2^31 - 1)")
                if kind == b"IEND":
                    return text
                if kind not in (b"tEXt", b"zTXt", b"iTXt"):
                    f.seek(length + 4, 1)  # image data and other chunks: skipped unread (a short file shows next)
                    continue
                if length > MAX_TEXT_CHUNK:
                    raise InputError(f"{path}: a PNG {kind.decode()} chunk holds {length} bytes, more than the "
                                     f"{MAX_TEXT_CHUNK} diffcli reads")
                body, crc = f.read(length), f.read(4)
                if len(body) < length or len(crc) < 4:
                    raise InputError(f"{path} is truncated (it ends inside a {kind.decode()} chunk)")
                if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
                    raise InputError(f"{path} is damaged (a {kind.decode()} chunk fails its CRC check)")
                entry = _text_chunk(kind, body, MAX_TEXT_CHUNK)
                if entry is None:
                    continue
                key, value = entry
                total += len(value)
                if total > MAX_TEXT_MEMORY:
                    raise InputError(f"{path}: its PNG text chunks hold more than {MAX_TEXT_MEMORY} characters")
                text[key] = value
    except _TooLarge as e:
        raise InputError(f"{path}: a PNG {e} chunk decompresses to more than {MAX_TEXT_CHUNK} bytes") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


class _TooLarge(Exception):
    pass


def _inflate(data: bytes, limit: int, kind: str) -> bytes | None:
    """zlib data inflated to at most `limit` bytes (_TooLarge beyond), None if it is not zlib data."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error:
        return None
    if d.unconsumed_tail:
        raise _TooLarge(kind)
    return out


def _text_chunk(kind: bytes, body: bytes, limit: int) -> tuple[str, str] | None:
    """(keyword, text) of one tEXt, zTXt or iTXt chunk, or None when its content cannot be read."""
    key, _, rest = body.partition(b"\0")
    if not key:
        return None
    keyword = key.decode("latin-1")
    if kind == b"tEXt":
        return keyword, rest.decode("latin-1")
    if kind == b"zTXt":
        if rest[:1] != b"\0":  # compression method 0 (zlib) is the only one defined
            return None
        raw = _inflate(rest[1:], limit, "zTXt")
        return None if raw is None else (keyword, raw.decode("latin-1"))
    if len(rest) < 2:
        return None
    compressed, method, rest = rest[0], rest[1], rest[2:]
    parts = rest.split(b"\0", 2)  # language tag, translated keyword, text
    if len(parts) < 3:
        return None
    raw = parts[2]
    if compressed:
        raw = _inflate(raw, limit, "iTXt") if method == 0 else None
        if raw is None:
            return None
    try:
        return keyword, raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
