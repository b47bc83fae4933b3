"""Image folder -> cached uint8 tensor + labels + class names (+ captions, when asked for).

Folder convention (torchvision's ImageFolder): if DATA_DIR has subfolders holding images, each
subfolder (sorted by name) is a class; otherwise the folder is one unconditional set. Images are
found recursively; hidden files and folders are skipped; extensions are matched case-insensitively.
Captions come from DATA_DIR/metadata.jsonl or sidecar .txt files (captions.py); they are kept in the
cache with the pixels, and a changed caption source rebuilds the cache like a changed image.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageFile, ImageOps

from diffcli.data.captions import caption_sources, is_caption, read_captions
from diffcli.errors import InputError, UsageError
from diffcli.validate import Invalid, check_names, describe

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
MAX_PIXELS = 80_000_000  # larger images (decompression bombs) are refused before decoding
RANDOM_CROP_MARGIN = 1.125  # --crop random: cache at 1.125x the target, crop a random window per step
CACHE_FORMAT = "diffcli.datacache"


@dataclass
class ImageSet:
    """Decoded images in memory: pixels (N, C, H', W') uint8 and labels (N,) int64; captions, when
    they were asked for, one per image (None for an image without one)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    captions: list[str | None] | None = None

    @property
    def conditional(self) -> bool:
        return bool(self.class_names)

    def summary(self) -> dict:
        counts = torch.bincount(self.labels, minlength=max(1, len(self.class_names))).tolist()
        out = {
            "images": len(self.files),
            "channels": int(self.pixels.shape[1]),
            "classes": self.class_names,
            "class_counts": counts if self.class_names else [],
            "skipped": len(self.skipped),
        }
        if self.captions is not None:
            out["captioned"] = sum(c is not None for c in self.captions)
        return out


def parse_resolution(text: str) -> tuple[int, int]:
    """'32' -> (32, 32); '32x48' -> (H=32, W=48)."""
    parts = str(text).lower().split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--resolution must look like 32 or 32x48, got {text!r}") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1 or max(hw) > 4096:
        raise UsageError(f"--resolution must be between 1 and 4096 per side, got {text!r}")
    return hw[0], hw[1]


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def find_images(root: str | Path, unconditional: bool = False) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class_names); class_names is empty for an unconditional set."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"data folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"not a folder: {root}")
    files = sorted(
        p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file() and _visible(p, root)
    )
    subdirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if unconditional or not subdirs:
        return files, [0] * len(files), []
    files = [p for p in files if len(p.relative_to(root).parts) > 1]  # loose files at the top are not a class
    try:  # a model file's class names must pass the same check when it is loaded
        check_names(subdirs, "class folder names")
    except Invalid as e:
        raise InputError(f"{root}: {e}; rename the folder") from None
    index = {name: i for i, name in enumerate(subdirs)}
    return files, [index[p.relative_to(root).parts[0]] for p in files], subdirs


def load_rgb(path: Path) -> Image.Image:
    """Open one image as RGB (first frame, EXIF orientation applied, alpha composited on white,
    16-bit scaled to 8-bit). Raises ValueError with a reason for anything unusable."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"too large ({w}x{h} pixels, limit {MAX_PIXELS})")
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # 16-bit grayscale: scale 0..65535 to 0..255 (PIL's convert would clip instead)
                im = im.point(lambda v: v * (1 / 257)).convert("L")
            elif im.mode == "F":
                im = im.convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            return im.convert("RGB")
    except ValueError:
        raise
    except Image.DecompressionBombError:
        raise ValueError("too large (decompression bomb)") from None
    except Exception as e:  # PIL raises many types for unreadable/truncated files
        raise ValueError(f"unreadable ({type(e).__name__})") from None


def resize_crop(im: Image.Image, H: int, W: int, margin: float = 1.0, resample: int | None = None) -> Image.Image:
    """Resize so the image covers (H*margin, W*margin), then center-crop to that box. resample: PIL's
    filter (default Lanczos when shrinking, bicubic when growing; a mask takes Image.NEAREST)."""
    th, tw = round(H * margin), round(W * margin)
    scale = max(th / im.height, tw / im.width)
    nh, nw = max(th, round(im.height * scale)), max(tw, round(im.width * scale))
    if resample is None:
        resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    im = im.resize((nw, nh), resample)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return im.crop((left, top, left + tw, top + th))


def _decode(path: Path, H: int, W: int, margin: float) -> torch.Tensor:
    im = resize_crop(load_rgb(path), H, W, margin)
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.reshape(im.height, im.width, 3).permute(2, 0, 1).contiguous()  # (3, h, w)


def luma(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, h, w) -> uint8 gray (N, 1, h, w) by ITU-R 601 luma, as PIL's convert("L")."""
    p = pixels.float()
    return (p[:, 0] * 0.299 + p[:, 1] * 0.587 + p[:, 2] * 0.114).round().clamp(0, 255).to(torch.uint8)[:, None]


def fingerprint(files: list[Path], labels: list[int], settings: str) -> str:
    h = hashlib.sha256(settings.encode())
    for f, y in zip(files, labels):
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}|{y}\n".encode())
    return h.hexdigest()


def load_folder(
    root: str | Path,
    resolution: tuple[int, int],
    channels: str = "auto",
    crop: str = "center",
    unconditional: bool = False,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    cache_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    caption_column: str | None = None,
) -> ImageSet:
    """Find, decode, resize and cache every image. InputError (exit 4) when nothing usable is found.
    A cache that fails its checks is rebuilt, with a line to `log` saying why. caption_column: read
    captions too (metadata.jsonl's column of that name, or sidecar .txt files); a bad caption is an
    InputError before anything is decoded."""
    if channels not in ("auto", "1", "3"):
        raise UsageError(f"--channels must be auto, 1 or 3, got {channels!r}")
    if crop not in ("center", "random"):
        raise UsageError(f"--crop must be center or random, got {crop!r}")
    H, W = resolution
    margin = RANDOM_CROP_MARGIN if crop == "random" else 1.0
    files, labels, names = find_images(root, unconditional)
    if not files:
        raise InputError(f"no images found in {root} (looked for {', '.join(sorted(EXTENSIONS))})")
    settings = f"{H}x{W}|{channels}|{margin}|{names}"
    if caption_column is not None:  # without captions the key, and so every existing cache, stays as it was
        settings += f"|captions={json.dumps(caption_column)}|{caption_sources(Path(root), files)}"
    key = fingerprint(files, labels, settings)
    if cache_path is not None:
        expect = _CacheExpect(key, files, labels, names, (round(H * margin), round(W * margin)), channels,
                              caption_column is not None)
        cached = _read_cache(cache_path, expect, log or (lambda message: None))
        if cached is not None:
            return cached
    captions = read_captions(Path(root), files, caption_column) if caption_column is not None else None
    workers = workers or min(8, os.cpu_count() or 1)
    results: list[torch.Tensor | None] = [None] * len(files)
    skipped: list[tuple[str, str]] = []

    def work(i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, _decode(files[i], H, W, margin), ""
        except ValueError as e:
            return i, None, str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (i, t, why) in enumerate(pool.map(work, range(len(files))), 1):
            results[i] = t
            if t is None:
                skipped.append((str(files[i]), why))
            if progress:
                progress(done, len(files))
    keep = [i for i, t in enumerate(results) if t is not None]
    if not keep:
        raise InputError(f"no readable images in {root} ({len(files)} files, all unreadable)")
    pixels = torch.stack([results[i] for i in keep])  # (N, 3, h, w)
    gray = bool((pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all())
    if channels == "1" or (channels == "auto" and gray):
        pixels = pixels[:, :1].contiguous() if gray else luma(pixels)
    out = ImageSet(
        pixels=pixels,
        labels=torch.tensor([labels[i] for i in keep], dtype=torch.long),
        class_names=names,
        files=[str(files[i]) for i in keep],
        skipped=skipped,
        captions=[captions[i] for i in keep] if captions is not None else None,
    )
    if names:
        empty = [n for n, c in zip(names, out.summary()["class_counts"]) if c == 0]
        if empty:
            raise InputError(f"class folders without readable images: {', '.join(empty[:5])}")
    if cache_path is not None:
        _write_cache(cache_path, key, out)
    return out


def _write_cache(path: str | Path, key: str, s: ImageSet) -> None:
    from diffcli.files import checkpoint

    meta = {"key": key, "class_names": s.class_names, "files": s.files, "skipped": s.skipped,
            "sha256": pixels_digest(s.pixels, s.labels, s.captions)}
    if s.captions is not None:
        meta["captions"] = s.captions
    checkpoint.write(path, {"pixels": s.pixels, "labels": s.labels}, meta, CACHE_FORMAT)


def pixels_digest(pixels: torch.Tensor, labels: torch.Tensor, captions: list[str | None] | None = None) -> str:
    """SHA-256 of the cached pixels, labels and captions: damage to the data itself is found like damage
    to the metadata (pixel values have no range to check, and an edited caption is still a caption).
    Without captions it is the digest of pixels and labels alone, as caches written before captions."""
    h = hashlib.sha256()
    for t in (pixels, labels):
        h.update(bytes(t.contiguous().clone().untyped_storage()))
    if captions is not None:
        h.update(json.dumps(captions).encode())
    return h.hexdigest()


@dataclass
class _CacheExpect:
    """What a cache for this folder and these settings must hold."""

    key: str
    files: list[Path]  # every image file found, in order
    labels: list[int]
    class_names: list[str]
    size: tuple[int, int]  # (h, w) of the cached images
    channels: str
    captions: bool  # whether the cache must hold captions


def _read_cache(path: str | Path, expect: _CacheExpect, log: Callable[[str], None]) -> ImageSet | None:
    """The cached set, or None: no cache, one for another folder state or other settings (rebuilt
    quietly), or one that fails its checks (rebuilt with a log line; never trusted)."""
    if not Path(path).exists():
        return None
    try:
        return _checked_cache(path, expect)
    except _Stale:
        return None
    except (InputError, Invalid) as e:
        reason = str(e).replace(str(path), "the file")
        log(f"data cache {path} is invalid ({reason}), rebuilding")
        return None


class _Stale(Exception):
    pass


def _checked_cache(path: str | Path, expect: _CacheExpect) -> ImageSet:
    """The cache's header, metadata and tensors against what this folder gives: the file list (those
    cached and those skipped, in order), the class names, every label, the image size and channels,
    and the captions when asked for (one per cached image, each None or a caption as captions.py reads)."""
    from diffcli.files import checkpoint

    header, data = checkpoint.read_header(path, CACHE_FORMAT, "data cache")
    meta = header.meta
    if meta.get("key") != expect.key:
        raise _Stale
    names = checkpoint.meta_json(meta, "class_names", path)
    if names != expect.class_names:
        raise Invalid(f"class_names are {describe(names)}, the folder has {describe(expect.class_names)}")
    files = checkpoint.meta_json(meta, "files", path)
    skipped = checkpoint.meta_json(meta, "skipped", path)
    found = [str(f) for f in expect.files]
    if not isinstance(skipped, list) or not all(
        isinstance(x, list) and len(x) == 2 and all(isinstance(v, str) and len(v) <= 4096 for v in x) for x in skipped
    ):
        raise Invalid(f"skipped must be a list of [file, reason] pairs, found {describe(skipped)}")
    gone = {f for f, _ in skipped}
    if len(gone) != len(skipped) or not gone <= set(found):
        raise Invalid("skipped lists files that the folder does not hold, or lists one twice")
    kept = [f for f in found if f not in gone]
    if files != kept or not kept:
        raise Invalid(f"files lists {describe(files)}, the folder gives {describe(kept)} readable files")
    captions = None
    if expect.captions:
        captions = checkpoint.meta_json(meta, "captions", path)
        if not isinstance(captions, list) or len(captions) != len(kept) or not all(
            c is None or is_caption(c) for c in captions
        ):
            raise Invalid(f"captions must be a list of {len(kept)} captions or nulls, found {describe(captions)}")
    label_of = dict(zip(found, expect.labels))
    labels = [label_of[f] for f in kept]
    if expect.class_names and len(set(labels)) != len(expect.class_names):
        raise Invalid("a class has no cached images")
    h, w = expect.size
    pix = header.tensors.get("pixels")
    C = {"1": 1, "3": 3}.get(expect.channels)
    if C is None:  # auto: one channel when every image was gray
        C = pix.shape[1] if pix is not None and len(pix.shape) == 4 and pix.shape[1] in (1, 3) else 3
    expected = {"pixels": ((len(kept), C, h, w), ("U8",)), "labels": ((len(kept),), ("I64",))}
    problem = checkpoint.tensor_problem(header.tensors, expected, "the folder needs", "a data cache")
    if problem:
        raise Invalid(problem)
    assert data is not None
    tensors = checkpoint.load_tensors(data, path)
    if tensors["labels"].tolist() != labels:
        raise Invalid("labels differ from the folder's class folders")
    if meta.get("sha256") != pixels_digest(tensors["pixels"], tensors["labels"], captions):
        what = "the pixels, labels or captions" if expect.captions else "the pixels or labels"
        raise Invalid(f"{what} do not match their recorded SHA-256")
    return ImageSet(pixels=tensors["pixels"], labels=tensors["labels"], class_names=names, files=kept,
                    skipped=[(f, why) for f, why in skipped], captions=captions)
