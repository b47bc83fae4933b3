"""The latent cache of a latent run: every training image (and with --flip its mirror image) encoded
once by the autoencoder, kept as the posterior's mean and log-variance in float16.

    latents.safetensors   mean, logvar (M, c, h, w) float16; M = N images, or 2N with the mirror
                          images after them
    metadata              data_sha256 (the cached pixels and labels), autoencoder_sha256, flip,
                          resolution, scaling_factor (what the run trains with)

It is written atomically (a run killed while encoding leaves only a temporary file, removed and
re-encoded next time) and read back only when every field matches this run's folder state and
autoencoder; a cache that does not match is refused with a line saying what differs, never reused.

The scaling factor (Rombach et al. 2022, sec. 4.3.2): latents are multiplied by 1/std of the
posterior samples over the whole cache, so the DiT sees unit variance whatever the autoencoder's
KL weight. Var of a sample = Var(mean) + E[exp(logvar)] (law of total variance). An autoencoder
file that carries its own factor (an imported Stable Diffusion VAE: 0.18215) is used as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffcli.files import checkpoint
from diffcli.files.autoencoder_file import AutoencoderFile
from diffcli.errors import InputError
from diffcli.validate import describe

LATENT_FORMAT = "diffcli.latents"


@dataclass
class LatentSet:
    mean: torch.Tensor  # (M, c, h, w) float16
    logvar: torch.Tensor
    scaling_factor: float
    flipped: bool  # rows N..2N are the mirror images of rows 0..N


@torch.inference_mode()
def encode_pixels(ae: AutoencoderFile, pixels: torch.Tensor, device: torch.device, batch: int = 64,
                  progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, C, H, W) -> posterior (mean, logvar), each (N, c, h, w) float16 on the CPU."""
    means, logvars = [], []
    N = len(pixels)
    for i in range(0, N, batch):
        x = pixels[i:i + batch].to(device).float() / 127.5 - 1
        q = ae.model.encode(x)
        means.append(q.mean.half().cpu())
        logvars.append(q.logvar.half().cpu())
        if progress:
            progress(min(i + batch, N), N)
    return torch.cat(means), torch.cat(logvars)


def measured_scale(mean: torch.Tensor, logvar: torch.Tensor) -> float:
    """1 / std of posterior samples over the whole set: Var = Var(mean) + E[exp(logvar)]."""
    m = mean.double()
    var = float(m.var(unbiased=False) + logvar.double().exp().mean())
    if not math.isfinite(var) or var <= 0:
        raise InputError("the autoencoder's latents have no spread (variance 0 or not finite); it cannot be used")
    return 1.0 / math.sqrt(var)


def _expect(data_sha256: str, ae: AutoencoderFile, flip: bool, resolution: str) -> dict[str, str]:
    return {"data_sha256": data_sha256, "autoencoder_sha256": ae.sha256, "flip": str(flip).lower(),
            "resolution": resolution}


def load_or_encode(path: Path, ae: AutoencoderFile, pixels: torch.Tensor, data_sha256: str, flip: bool,
                   resolution: str, device: torch.device, log: Callable[[str], None] = print,
                   progress: Callable[[int, int], None] | None = None, write: bool = True) -> LatentSet:
    """The run's latents: read from `path` when it exists (refused, with what differs, when it does not
    match), else encoded now and written there (write=False: only read; DDP's other ranks)."""
    expect = _expect(data_sha256, ae, flip, resolution)
    N = len(pixels)
    c, h, w = ae.config.latent_shape(pixels.shape[2], pixels.shape[3])
    M = 2 * N if flip else N
    if path.exists():
        delete = "; delete it to encode the folder again"
        try:
            header, data = checkpoint.read_header(path, LATENT_FORMAT, what="latent cache")
        except InputError as e:
            raise InputError(f"{e}{delete}") from None
        for key, value in expect.items():
            found = header.meta.get(key)
            if found != value:
                # the file's value as one short line (a hostile one may be long or hold newlines)
                shown = found if found is not None and found.isprintable() and len(found) <= 64 else describe(found)
                what = {"data_sha256": "the images of the data folder differ from those it was encoded from",
                        "autoencoder_sha256": f"it was encoded by autoencoder {shown[:10]}, --autoencoder is {ae.hash}",
                        "flip": f"it was made with flip {shown}, the run has {value}",
                        "resolution": f"it was made at resolution {shown}, the run has {value}"}[key]
                raise InputError(f"latent cache {path} is stale: {what}{delete}")
        shape = (M, c, h, w)
        problem = checkpoint.tensor_problem(header.tensors, {"mean": (shape, ("F16",)), "logvar": (shape, ("F16",))},
                                            needs="this run needs", of="a latent cache")
        if problem:
            raise InputError(f"latent cache {path} does not fit this run ({problem}){delete}")
        try:
            scale = float(header.meta.get("scaling_factor", ""))
        except ValueError:
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(f"latent cache {path} has a malformed scaling_factor{delete}")
        assert data is not None
        t = checkpoint.load_tensors(data, path)
        checkpoint.check_finite(t, path)
        log(f"latents: {M} read from {path}")
        return LatentSet(t["mean"], t["logvar"], scale, flip)
    if not write:
        raise InputError(f"latent cache {path} is missing (the first process writes it)")
    log(f"latents: encoding {N} images{' and their mirror images' if flip else ''} with {Path(ae.path).name} "
        f"({ae.hash}), once; cached in {path}")
    mean, logvar = encode_pixels(ae, pixels, device, progress=progress)
    if flip:
        m2, l2 = encode_pixels(ae, pixels.flip(-1), device, progress=progress)
        mean, logvar = torch.cat([mean, m2]), torch.cat([logvar, l2])
    if not (torch.isfinite(mean).all() and torch.isfinite(logvar).all()):
        raise InputError(f"{ae.path}: the autoencoder gives non-finite latents (float16 overflow?) for this folder")
    scale = ae.scaling_factor if ae.scaling_factor is not None else measured_scale(mean, logvar)
    checkpoint.write(path, {"mean": mean, "logvar": logvar}, {**expect, "scaling_factor": repr(scale)}, LATENT_FORMAT)
    how = "from the autoencoder file" if ae.scaling_factor is not None else "1/std of the latents"
    log(f"latents: {tuple(mean.shape[1:])} each, scaling factor {scale:.5g} ({how})")
    return LatentSet(mean, logvar, scale, flip)
