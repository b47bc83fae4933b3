"""Editing: init images and masks -> a starting point and a per-step known-region constraint.

Image-to-image (SDEdit, Meng et al. 2022): an init image x_0 is noised to the level at fraction
`strength` of the schedule and denoised from there. The N steps of --steps are spread over the part
of the schedule that is run, the timesteps [0, span) with span = round(strength * T)
(`schedule.timesteps(span=...)`, `ode.step_sigmas(span=...)`), so a run still costs N evaluations;
the samplers take it as a `samplers.Start`. At strength 1 the run starts at the schedule's top, where
x_0 is scaled by sqrt(alpha_bar_{T-1}) (5e-5 for the cosine schedule) and the start is noise.

Inpainting (RePaint, Lugmayr et al. 2022, Algorithm 1): after every step the known region (mask 0)
of x is replaced by the init image noised to the level x has just reached, a x_0 + s eps with fresh
noise from the image's own generator (`Inpaint`, a `samplers.Constraint`); --resample R takes every
step but the last R times, going back up one step by the forward process in between (the paper's
harmonisation loop). At the clean level the known region is x_0 itself, and the final pixels are
composed in uint8 (`compose`), so outside the mask they are the init image's, exactly.

Files: an init image (or a folder of them: one output each) is decoded, resized and centre-cropped
to the model's size as `train` does (data.load_rgb, data.resize_crop). A mask (or a folder of masks,
matched to init images by file stem) is read as grayscale, white (>= 128) = redraw, and resized with
the same crop but nearest-neighbour so it stays hard. `mask_blur` feathers it inward (`feather`): the
weight fades in over about that many pixels inside the mask's edge, and stays exactly 0 outside it.

Latent models (to come) slot into the same hooks: encode the uint8 init images to x0 where `start`
converts them (from_uint8 here), shrink the weights to the latent grid, run the same Start and
Inpaint in latent space, decode, and `compose` in pixels as here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffcli.digest import file_sha256
from diffcli.data.folder import EXTENSIONS, load_rgb, luma, resize_crop
from diffcli.errors import InputError, UsageError
from diffcli.files.images import from_uint8
from diffcli.diffusion.samplers import Level, Start
from diffcli.diffusion.schedule import NoiseSchedule

DEFAULT_STRENGTH = 0.6  # image-to-image: keep the layout and the broad shapes, redraw the detail
MASK_STRENGTH = 1.0  # with a mask: the masked region is drawn afresh, the rest comes from the image
MAX_RESAMPLE = 100
MAX_MASK_BLUR = 1000.0


@dataclass
class EditFiles:
    """What an edit job reads, decided and checked before anything is computed or written."""

    inits: list[Path]  # one per input image
    init_sha256: list[str]  # first 10 hex digits of each file's SHA-256, as model hashes
    init: torch.Tensor  # (N, C, H, W) uint8 at the model's size
    masks: list[Path] | None = None  # the mask of each input (the same file for all with one --mask file)
    mask_sha256: list[str] | None = None
    weight: torch.Tensor | None = None  # (N, 1, H, W) float32 in [0, 1]: 1 = redraw, 0 = keep exactly


def short_sha256(path: Path) -> str:
    """First 10 hex digits of the file's SHA-256 (as diffcli's model hash)."""
    return file_sha256(path)[:10]


# --------------------------------------------------------------------------------------------------
# Options and the truncated schedule
# --------------------------------------------------------------------------------------------------


def check_options(strength: float, resample: int, mask_blur: float, has_mask: bool) -> None:
    """UsageError (exit 2) for values out of range."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise UsageError(f"--strength must be in (0, 1], got {strength}")
    if not 1 <= resample <= MAX_RESAMPLE:
        raise UsageError(f"--resample must be between 1 and {MAX_RESAMPLE}, got {resample}")
    if not (math.isfinite(mask_blur) and 0 <= mask_blur <= MAX_MASK_BLUR):
        raise UsageError(f"--mask-blur must be between 0 and {MAX_MASK_BLUR:g} pixels, got {mask_blur}")
    if not has_mask and (resample != 1 or mask_blur != 0):
        raise UsageError(f"{'--resample' if resample != 1 else '--mask-blur'} needs --mask")


def span(strength: float, schedule: NoiseSchedule, steps: int) -> int:
    """The timesteps [0, span) that a run at this strength covers: span = round(strength * T), so
    strength 0.6 of T = 1000 starts at t = 599 and strength 1 at the top, t = T - 1. UsageError when
    fewer than --steps timesteps are left."""
    T = schedule.num_timesteps
    n = round(strength * T)
    if n < steps:
        raise UsageError(f"--strength {strength:g} leaves {n} of the model's {T} timesteps, fewer than --steps "
                         f"{steps}; raise --strength or lower --steps")
    return n


def start(init: torch.Tensor, span_: int) -> Start:
    """The samplers' Start for uint8 init images (B, C, H, W): model space is [-1, 1] for a pixel model
    (a latent model encodes here)."""
    return Start(x0=from_uint8(init), span=span_)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not p.name.startswith("."))


def find_inputs(init: str | Path, mask: str | Path | None) -> tuple[list[Path], list[Path] | None]:
    """The init image files (a file, or the images directly in a folder, sorted by name) and the mask of
    each (a file for all, or the file with the same stem in a mask folder). InputError (exit 4) for
    anything missing."""
    init = Path(init)
    if init.is_dir():
        inits = _images_in(init)
        if not inits:
            raise InputError(f"--init-image: no images in the folder {init} (looked for "
                             f"{', '.join(sorted(EXTENSIONS))})")
    elif init.is_file():
        inits = [init]
    else:
        raise InputError(f"--init-image: no such file or folder: {init}")
    if mask is None:
        return inits, None
    mask = Path(mask)
    if mask.is_file():
        return inits, [mask] * len(inits)
    if not mask.is_dir():
        raise InputError(f"--mask: no such file or folder: {mask}")
    by_stem: dict[str, list[Path]] = {}
    for p in _images_in(mask):
        by_stem.setdefault(p.stem, []).append(p)
    masks = []
    for p in inits:
        found = by_stem.get(p.stem, [])
        if not found:
            raise InputError(f"--mask: no mask for {p.name} in {mask} (masks are matched by name: {p.stem}.png)")
        if len(found) > 1:
            raise InputError(f"--mask: {len(found)} masks for {p.name} in {mask}: {', '.join(f.name for f in found)}")
        masks.append(found[0])
    return inits, masks


def _open(path: Path, what: str) -> Image.Image:
    try:
        return load_rgb(path)
    except ValueError as e:  # load_rgb's reasons: unreadable (...), too large (...)
        raise InputError(f"{what} {path} cannot be used: {e}") from None
    except OSError as e:
        raise InputError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def load_init(path: Path, channels: int, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One init image as uint8 (C, H, W), resized and centre-cropped as `train` does it (one channel: the
    gray value, or ITU-R 601 luma of a colour image, as data.load_folder), and its original (width, height)."""
    im = _open(path, "--init-image")
    size = im.size
    im = resize_crop(im, H, W)
    rgb = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(H, W, 3).permute(2, 0, 1)
    if channels == 1:
        gray = bool((rgb[0] == rgb[1]).all() and (rgb[1] == rgb[2]).all())
        return (rgb[:1].contiguous() if gray else luma(rgb[None])[0]), size
    return rgb.contiguous(), size


def load_mask(path: Path, init_path: Path, init_size: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """A hard mask (1, H, W) of 0.0 and 1.0 (1 = redraw: gray value >= 128), aligned with its init image:
    a mask of the init image's size (or its aspect ratio, scaled) gets the same resize and crop,
    nearest-neighbour; a mask of the model's size is taken as it is. Another shape is InputError."""
    im = _open(path, "--mask").convert("L")
    (iw, ih), (mw, mh) = init_size, im.size
    if (mw, mh) != (iw, ih) and (mw, mh) != (W, H):
        same_aspect = round(mh * iw / mw) == ih or round(mw * ih / mh) == iw
        if not same_aspect:
            raise InputError(f"--mask {path} is {mw}x{mh} but the init image {init_path} is {iw}x{ih} and the model "
                             f"{W}x{H}: another aspect ratio, so it cannot be resized to match")
        im = im.resize((iw, ih), Image.NEAREST)
    if im.size != (W, H):
        im = resize_crop(im, H, W, resample=Image.NEAREST)
    gray = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(1, H, W)
    return (gray >= 128).float()


def feather(hard: torch.Tensor, blur: float) -> torch.Tensor:
    """Soft edges inside the mask: w = m * clamp(2 G_blur(m) - 1, 0, 1), G a Gaussian blur of standard
    deviation `blur` pixels (truncated at 3 sigma, edges replicated). Deep inside the mask w = 1; at its
    edge w falls towards 0 (on a straight edge w = erf(d / (blur sqrt 2)) at distance d inside); outside
    it w = 0 exactly, so the pixels there still come back unchanged. hard: (N, 1, H, W) of 0 and 1."""
    if blur <= 0:
        return hard
    r = math.ceil(3 * blur)
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(k**2) / (2 * blur**2))
    k = k / k.sum()
    g = F.pad(hard.double(), (r, r, 0, 0), mode="replicate")
    g = F.conv2d(g, k.reshape(1, 1, 1, -1))
    g = F.pad(g, (0, 0, r, r), mode="replicate")
    g = F.conv2d(g, k.reshape(1, 1, -1, 1))  # (N, 1, H, W)
    w = (2 * g - 1).clamp(0, 1)
    w = torch.where(w > 1 - 1e-9, 1.0, w)  # deep inside: exactly 1 (the kernel's sum rounds), so exactly redrawn
    return (hard * w).float()


def load(init: str | Path, mask: str | Path | None, channels: int, H: int, W: int, mask_blur: float = 0.0) -> EditFiles:
    """Find, check and decode every init image and mask (InputError, exit 4, naming the first bad file)."""
    inits, masks = find_inputs(init, mask)
    pixels, sizes = [], []
    for p in inits:
        px, size = load_init(p, channels, H, W)
        pixels.append(px)
        sizes.append(size)
    files = EditFiles(inits=inits, init_sha256=[short_sha256(p) for p in inits], init=torch.stack(pixels))
    if masks is not None:
        hard = torch.stack([load_mask(m, p, size, H, W) for m, p, size in zip(masks, inits, sizes)])
        hashes = {m: short_sha256(m) for m in set(masks)}
        files.masks, files.mask_sha256 = masks, [hashes[m] for m in masks]
        files.weight = feather(hard, mask_blur)
    return files


# --------------------------------------------------------------------------------------------------
# Inpainting: the known region after every step, and the final pixels
# --------------------------------------------------------------------------------------------------


class Inpaint:
    """RePaint's constraint (Lugmayr et al. 2022, Algorithm 1, lines 4-7), a samplers.Constraint:
        x_known   = a x_0 + s eps      (q(x_t | x_0) at the level x has just reached; eps fresh, none at s = 0)
        x         = w x + (1 - w) x_known
    with w the mask weight (1 = redraw). Where w is 0 or 1 the blend is exact: 0 * x + 1 * x_known is
    x_known to the bit. x0: (B, C, H, W) in model space; weight: (B, 1, H, W)."""

    def __init__(self, x0: torch.Tensor, weight: torch.Tensor, resample: int = 1) -> None:
        self.x0, self.weight, self.keep = x0, weight, 1 - weight
        self.resample = resample

    def __call__(self, x: torch.Tensor, level: Level, noise) -> torch.Tensor:
        x0 = self.x0.to(device=x.device, dtype=x.dtype)
        if level.s > 0:
            known = level.a * x0 + level.s * noise.draw()
        else:
            known = x0 if level.a == 1.0 else level.a * x0
        w, keep = self.weight.to(x.device, x.dtype), self.keep.to(x.device, x.dtype)
        return w * x + keep * known


def compose(generated: torch.Tensor, init: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The final pixels, uint8 (B, H, W, C): w * generated + (1 - w) * init, computed on the uint8 values
    (exact in float32), so a pixel with w = 0 is the init image's byte whatever the sampler's float
    x held there. generated: uint8 (B, H, W, C) (images.to_uint8); init: uint8 (B, C, H, W); weight:
    (B, 1, H, W), None for image-to-image without a mask (the generated pixels are the result)."""
    if weight is None:
        return generated
    g = generated.float()
    i = init.permute(0, 2, 3, 1).float()
    w = weight.permute(0, 2, 3, 1).float()
    return (w * g + (1 - w) * i).round().clamp(0, 255).to(torch.uint8)
