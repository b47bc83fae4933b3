"""Autoencoder round trips: every image of a folder encoded, decoded, written as PNG and scored.

`reconstruct(ae, folder, out_dir)` is the core of `diffcli reconstruct`: it checks everything it can
before writing anything (the autoencoder file, the images, every output name), then yields one
`image` record per reconstruction as it is written and a closing `summary`. `psnr` and `ssim` are
pure functions of image tensors in [0, 1], computed in float64.

What is compared: the image as the autoencoder sees it (decoded by data.load_rgb, cropped or resized,
gray or RGB as the autoencoder takes it, 8-bit) against the reconstruction as written (clamped to
[-1, 1], rounded to 8 bits). Both sides are the 8-bit pixels of files one can open, so anyone can
recompute the numbers from the input and the PNG. Rounding the reconstruction adds about 1/12 of a
level squared to the MSE (it alone would give 59 dB), invisible at an autoencoder's 20-40 dB.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from diffcli.data import folder as data
from diffcli.files.autoencoder_file import AutoencoderFile, load_autoencoder
from diffcli.errors import InputError, OutputExistsError, UsageError
from diffcli.files.images import save_png, to_pil, to_uint8

# --------------------------------------------------------------------------------------------------
# Metrics: pure functions of (B, C, H, W) images in [0, 1]
# --------------------------------------------------------------------------------------------------

PSNR_CAP = 100.0  # dB: an exact reconstruction (PSNR +inf) counts as this in the summary's mean

SSIM_WINDOW = 11  # Gaussian window side, Wang et al. 2004 sec. III.C
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_L = 1.0  # the data range: images in [0, 1]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"expected two (B, C, H, W) images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[2] < 1 or a.shape[3] < 1:
        raise ValueError(f"images have no pixels: {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, 10 log10(peak^2 / MSE) in dB, the MSE over all of an
    image's channels and pixels: (B, C, H, W) x 2 -> (B,) float64. Identical images give +inf."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(peak**2 / mse)  # mse 0 -> peak^2 / 0 = inf -> inf


def _window_side(side: int) -> int:
    """The window's extent along an image side: 11, or for a side under 11 pixels the largest odd
    number that fits (7 for 8 pixels, 1 for 1 or 2), so that at least one full window exists."""
    k = min(SSIM_WINDOW, side)
    return k if k % 2 else k - 1


def _gaussian(size: int, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """A sampled Gaussian of `size` taps centred on the middle one, summing to 1, float64."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004), (B, C, H, W) x 2 in [0, 1] -> (B,) float64.

    The variant, exactly: at each position where the whole window lies inside the image ('valid'
    positions, no padding), with Gaussian weights w (11 x 11, sigma 1.5, normalised to sum 1; eqs. 14-16)

        mu_a = sum w a,  var_a = sum w a^2 - mu_a^2,  cov = sum w a b - mu_a mu_b   (weights sum to 1: no N-1)
        SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))      (eq. 13)

    with C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, L = 1; the map is averaged over the valid
    positions of each channel (eq. 17), then over the channels. This is what scikit-image's
    structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=0) gives (it filters with reflection and then drops the 5-pixel border,
    which leaves the valid positions). An image side under 11 pixels, where scikit-image refuses, uses
    the largest odd window extent that fits along that side (7 for 8 pixels) with the same sigma,
    renormalised. Identical images give exactly 1; the value is symmetric in a and b.
    """
    _check_pair(a, b)
    B, C, H, W = a.shape
    kh, kw = _window_side(H), _window_side(W)
    gh = _gaussian(kh).to(a.device).view(1, 1, kh, 1)
    gw = _gaussian(kw).to(a.device).view(1, 1, 1, kw)
    x = a.double().reshape(B * C, 1, H, W)
    y = b.double().reshape(B * C, 1, H, W)
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(B * C * 5, 1, H, W)
    # the 2-D window is the outer product of two 1-D Gaussians: filter the columns, then the rows
    m = F.conv2d(F.conv2d(maps, gh), gw).reshape(B * C, 5, H - kh + 1, W - kw + 1)
    mu_a, mu_b, e_aa, e_bb, e_ab = m.unbind(1)  # (BC, H', W') each
    var_a, var_b = e_aa - mu_a * mu_a, e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    C1, C2 = (SSIM_K1 * SSIM_L) ** 2, (SSIM_K2 * SSIM_L) ** 2
    s = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a * mu_a + mu_b * mu_b + C1) * (var_a + var_b + C2))
    return s.reshape(B, C, -1).mean(2).mean(1)


# --------------------------------------------------------------------------------------------------
# The plan: every check before the first write
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    path: Path  # the input file
    rel: str  # its path under the folder, '/'-separated
    out: Path  # the PNG to write
    height: int  # the size the autoencoder gets
    width: int


@dataclass
class _Plan:
    ae: AutoencoderFile
    items: list[_Item]
    size: tuple[int, int] | None  # --resolution, or None: each image's own size cropped to a multiple of f
    overwrite: bool
    device: torch.device


def _resolution(text: str | None, size: tuple[int, int] | None, factor: int) -> tuple[int, int] | None:
    if size is None:
        return None
    H, W = size
    if H % factor or W % factor:
        raise UsageError(f"--resolution {text} is not a multiple of the autoencoder's factor {factor} on each side")
    return H, W


def _check_out_dir(folder: Path, out_dir: Path) -> None:
    root, out = folder.resolve(), out_dir.resolve()
    if out == root or root in out.parents:
        raise UsageError(f"--out {out_dir} is inside the image folder {folder}; choose a folder outside it, "
                         "so that a second run does not read the first run's reconstructions")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")


def _outputs(folder: Path, files: list[Path], out_dir: Path) -> list[tuple[str, Path]]:
    """(relative name, output path) per input; UsageError when two inputs map to one output, or an
    output would replace an input or stand where another output needs a folder."""
    rels = [p.relative_to(folder) for p in files]
    outs = [out_dir / r.with_suffix(".png") for r in rels]
    seen: dict[Path, Path] = {}
    for r, o in zip(rels, outs):
        if o in seen:
            raise UsageError(f"{folder / seen[o]} and {folder / r} would both be reconstructed as {o}; "
                             "rename one of them")
        seen[o] = r
    folders = {p for o in outs for p in o.parents}
    clash = next((o for o in outs if o in folders), None)
    if clash is not None:
        raise UsageError(f"{clash} would be both a reconstruction and a folder of reconstructions; rename the input")
    inputs = {p.resolve() for p in files}
    same = next((o for o in outs if o.resolve() in inputs), None)
    if same is not None:
        raise UsageError(f"writing {same} would replace an input image; choose another --out")
    return [(r.as_posix(), o) for r, o in zip(rels, outs)]


def _check_existing(outs: list[Path], overwrite: bool) -> None:
    folders = [o for o in outs if o.is_dir()]
    if folders:
        raise UsageError(f"{folders[0]} is a folder; a reconstruction is to be written there")
    if overwrite:
        return
    there = [o for o in outs if o.exists() or o.is_symlink()]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise OutputExistsError(f"{there[0]} exists{more}; pass --overwrite to replace")


def _open(path: Path) -> Image.Image:
    try:
        return data.load_rgb(path)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None


def _fit_size(path: Path, height: int, width: int, factor: int) -> tuple[int, int]:
    """The image's own size cropped down to a multiple of the factor."""
    if height < factor or width < factor:
        raise InputError(f"{path} is {width}x{height} pixels, smaller than the autoencoder's factor {factor} "
                         "on a side; it cannot be encoded (give --resolution to resize every image)")
    return height // factor * factor, width // factor * factor


def _plan(ae_path: str | Path, folder: str | Path, out_dir: str | Path, resolution: str | None,
          overwrite: bool, batch_size: int, device: str | torch.device) -> _Plan:
    from diffcli.device import resolve_device

    folder, out_dir = Path(folder), Path(out_dir)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    asked = data.parse_resolution(resolution) if resolution is not None else None
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    _check_out_dir(folder, out_dir)
    files, _, _ = data.find_images(folder, unconditional=True)  # class subfolders: just more images
    ae = load_autoencoder(ae_path, dev)
    cfg = ae.config
    if cfg.in_channels != cfg.out_channels:
        raise InputError(f"{ae_path}: the autoencoder takes {cfg.in_channels}-channel images and gives "
                         f"{cfg.out_channels}-channel ones; a reconstruction needs the same on both sides")
    size = _resolution(resolution, asked, cfg.factor)
    if not files:
        raise InputError(f"no images found in {folder} (looked for {', '.join(sorted(data.EXTENSIONS))})")
    names = _outputs(folder, files, out_dir)
    _check_existing([o for _, o in names], overwrite)
    items = []
    for path, (rel, out) in zip(files, names):
        # decoded once here so that an unreadable or too small image stops the run before any write
        im = _open(path)
        H, W = size or _fit_size(path, im.height, im.width, cfg.factor)
        items.append(_Item(path, rel, out, H, W))
    return _Plan(ae, items, size, overwrite, dev)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _pixels(item: _Item, size: tuple[int, int] | None, channels: int) -> torch.Tensor:
    """uint8 (C, H, W): the image as the autoencoder takes it."""
    im = _open(item.path)
    H, W = item.height, item.width
    if size is not None:
        im = data.resize_crop(im, H, W)  # as training does
    else:
        top, left = (im.height - H) // 2, (im.width - W) // 2
        im = im.crop((left, top, left + W, top + H))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(H, W, 3).permute(2, 0, 1)
    return data.luma(x[None])[0] if channels == 1 else x.contiguous()  # RGB -> ITU-R 601 luma, as PIL's "L"


def _batches(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """Batches of one size each: sizes in order of first appearance, files in order within a size."""
    groups: dict[tuple[int, int], list[_Item]] = {}
    for it in items:
        groups.setdefault((it.height, it.width), []).append(it)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def reconstruct(
    ae_path: str | Path,
    folder: str | Path,
    out_dir: str | Path,
    resolution: str | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Encode every image under `folder` (recursively; class subfolders are just subfolders) with the
    posterior mean, decode it, and write it as a PNG at the same relative path under `out_dir`.

    Sizes: each image's own, center-cropped down to a multiple of the autoencoder's factor f; with
    `resolution` ('32' or 'HxW', multiples of f) resized and center-cropped as training does. Gray
    images go to an RGB autoencoder as RGB, RGB images to a gray one as luma.

    Everything is checked at the call, before anything is written (so errors raise here, not while
    iterating): UsageError for a bad option, an `out_dir` that is or lies inside `folder`, or two inputs
    that map to one output name; InputError for a bad autoencoder file, a folder without images, an
    unreadable image or one smaller than f; OutputExistsError when an output exists and not `overwrite`.

    Returns an iterator of records, in batches of one size: per image, once its PNG is written,
        {"kind": "image", "file": path under folder, "out": PNG written, "psnr": dB (inf when exact),
         "ssim", "height", "width"}   (the size encoded)
    then one {"kind": "summary", "images", "psnr_mean", "psnr_worst", "worst_psnr_file", "ssim_mean",
    "ssim_worst", "worst_ssim_file", "autoencoder", "autoencoder_hash", "factor", "seconds"}.
    psnr_mean counts each PSNR above PSNR_CAP (an exact round trip: inf) as PSNR_CAP; the worst values
    are the lowest, and the first file in file order that has it. progress(done, total) after each batch.
    """
    started = time.perf_counter()
    plan = _plan(ae_path, folder, out_dir, resolution, overwrite, batch_size, device)
    return _run(plan, batch_size, progress, started)


def _run(plan: _Plan, batch_size: int, progress: Callable[[int, int], None] | None,
         started: float) -> Iterator[dict[str, Any]]:
    model, C = plan.ae.model, plan.ae.config.in_channels
    scores: dict[str, tuple[float, float]] = {}  # file -> (psnr, ssim)
    done, total = 0, len(plan.items)
    for batch in _batches(plan.items, batch_size):
        x = torch.stack([_pixels(it, plan.size, C) for it in batch])  # (B, C, H, W) uint8
        # inference mode only around the model: a generator that yields inside it would leave the
        # caller's code in inference mode between records
        with torch.inference_mode():
            z = model.encode(x.to(plan.device).float() / 127.5 - 1).mode()  # the posterior mean
            y = to_uint8(model.decode(z).clamp(-1, 1))  # (B, H, W, C) uint8 on the CPU, as written
        a = x.double() / 255
        b = y.permute(0, 3, 1, 2).double() / 255  # (B, C, H, W)
        for j, it in enumerate(batch):
            save_png(it.out, to_pil(y[j]), overwrite=plan.overwrite)
            p = float(psnr(a[j:j + 1], b[j:j + 1])[0])  # one image at a time: SSIM's maps stay small
            s = float(ssim(a[j:j + 1], b[j:j + 1])[0])
            scores[it.rel] = (p, s)
            yield {"kind": "image", "file": it.rel, "out": str(it.out), "psnr": p, "ssim": s,
                   "height": it.height, "width": it.width}
        done += len(batch)
        if progress:
            progress(done, total)
    yield _summary(plan, [(it.rel, *scores[it.rel]) for it in plan.items], time.perf_counter() - started)


def _summary(plan: _Plan, scores: list[tuple[str, float, float]], seconds: float) -> dict[str, Any]:
    """scores: (file, psnr, ssim) in file order."""
    n = len(scores)
    worst_p = min(scores, key=lambda r: r[1])  # min() keeps the first of equal values: file order
    worst_s = min(scores, key=lambda r: r[2])
    psnr_mean = math.fsum(min(p, PSNR_CAP) for _, p, _ in scores) / n
    ssim_mean = math.fsum(s for _, _, s in scores) / n
    return {"kind": "summary", "images": n,
            "psnr_mean": psnr_mean, "psnr_worst": worst_p[1], "worst_psnr_file": worst_p[0],
            "ssim_mean": ssim_mean, "ssim_worst": worst_s[2], "worst_ssim_file": worst_s[0],
            "autoencoder": plan.ae.path, "autoencoder_hash": plan.ae.hash, "factor": plan.ae.config.factor,
            "seconds": round(seconds, 3)}
