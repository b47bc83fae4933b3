"""The `auto` feature network: a small CNN that diffcli trains on the real folder itself, so that
`diffcli eval` works offline with no file from elsewhere.

With class subfolders it learns the classes: its softmax says which class a sample looks like
(class accuracy) and its penultimate layer gives the features. Without, it learns to tell real
images from blurred, noisy and ghosted views of them (VIEWS), and its penultimate layer gives
features that notice those defects. Either way every image is first resized to SIZE x SIZE.

Training is seeded and bounded by a step count (not by time), so the same folder gives the same
network on the same machine; the network is cached beside the real statistics (diffcli/eval/cache.py).
Adapted from benchmarks/mnist_eval.py's DigitNet to any channel count and to 32x32 inputs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffcli.validate import Field, check_record, field

SIZE = 32  # every image is resized to SIZE x SIZE (PIL bicubic) before the network
FEATURES = 128  # width of the penultimate layer: the feature dimension
VIEWS = ("real", "blurred", "noisy", "ghosted")  # the discriminator's classes, for a folder without classes
RECIPE = "auto-v1"  # names the architecture and training below; part of every cache key
BATCH = 128
EPOCHS = 10
MIN_STEPS, MAX_STEPS = 20, 1500  # bounds on the optimizer steps, whatever the folder's size
SHIFT = 2  # random translations of up to SHIFT pixels, so features do not depend on exact centring
HOLD_OUT = 0.1  # share of the real images kept out of training to measure the network's own accuracy


@dataclass(frozen=True)
class AutoConfig:
    """What defines the network: stored in its cache file to rebuild it."""

    channels: int  # 1 or 3: the real folder's (1 when every image is gray)
    outputs: int  # the number of classes, or len(VIEWS)
    conditional: bool  # True: the outputs are the folder's classes; False: VIEWS

    FIELDS: ClassVar[tuple[Field, ...]] = (
        field("channels", int, choices=(1, 3)),
        field("outputs", int, min=2, max=100_000),
        field("conditional", bool),
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> "AutoConfig":
        return cls(**check_record(d, cls.FIELDS, where))


class AutoNet(nn.Module):
    """Three conv + max-pool stages (32 -> 16 -> 8 -> 4), a FEATURES-wide layer, the class head."""

    def __init__(self, cfg: AutoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.c1 = nn.Conv2d(cfg.channels, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.out = nn.Linear(FEATURES, cfg.outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) in [-1, 1] -> (B, FEATURES)"""
        x = F.max_pool2d(F.relu(self.c1(x)), 2)  # (B, 16, 16, 16)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)  # (B, 32, 8, 8)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def tensor_shapes(cfg: AutoConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of AutoNet(cfg).state_dict(), without allocating its weights."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in AutoNet(cfg).state_dict().items()}


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float [-1, 1]"""
    return pixels.float() / 127.5 - 1


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class Trained:
    net: AutoNet
    accuracy: float | None  # on the held-out real images (the views task without classes); None if too few
    steps: int


def train(pixels: torch.Tensor, labels: torch.Tensor | None, num_classes: int, seed: int = 0,
          device: torch.device | str = "cpu", progress: Callable[[int, int], None] | None = None) -> Trained:
    """Train an AutoNet on real images: uint8 (N, C, SIZE, SIZE) and their class labels (N,), or
    labels=None to learn VIEWS. Every random draw comes from generators seeded with `seed`."""
    N, C = pixels.shape[:2]
    conditional = labels is not None and num_classes >= 2
    cfg = AutoConfig(channels=C, outputs=num_classes if conditional else len(VIEWS), conditional=conditional)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(N, generator=g)
    held = order[: int(N * HOLD_OUT)] if N >= 20 else order[:0]
    train_idx = order[len(held):]
    with torch.random.fork_rng(devices=[]):  # initialisation from the seed, without touching global RNG
        torch.manual_seed(seed)
        net = AutoNet(cfg)
    net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    B = min(BATCH, len(train_idx))
    steps = min(MAX_STEPS, max(MIN_STEPS, math.ceil(EPOCHS * len(train_idx) / B)))
    y_all = labels if conditional else None
    perm, pos = torch.randperm(len(train_idx), generator=g), 0
    for step in range(steps):
        if pos + B > len(perm):
            perm, pos = torch.randperm(len(train_idx), generator=g), 0
        idx = train_idx[perm[pos : pos + B]]
        pos += B
        x = shift(to_input(pixels[idx]), g)
        if conditional:
            y = y_all[idx]
        else:
            x, y = views(x, g)
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            progress(step + 1, steps)
    net.eval().requires_grad_(False)
    unit_rms(net, to_input(pixels[train_idx[:2048]]).to(device))
    accuracy = None
    if len(held):
        with torch.no_grad():
            x = to_input(pixels[held])
            if conditional:
                y = y_all[held]
            else:
                x, y = views(x, torch.Generator().manual_seed(seed + 1))
            accuracy = float((net(x.to(device)).argmax(1).cpu() == y).float().mean())
    return Trained(net.cpu(), accuracy, steps)


@torch.no_grad()
def unit_rms(net: AutoNet, x: torch.Tensor) -> None:
    """Scale the features so that their root mean square over these images is 1, leaving the logits as
    they are: ReLU(s z) = s ReLU(z) for s > 0, so the feature layer is multiplied by s and the class
    head divided by it. KID's kernel (x.y/d + 1)^3 and FID then work on features of unit size, as
    Inception's are of order 1, whatever scale training happened to reach."""
    rms = float(net.features(x).pow(2).mean().sqrt())
    if rms > 0:
        net.fc.weight.div_(rms)
        net.fc.bias.div_(rms)
        net.out.weight.mul_(rms)


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset of up to SHIFT pixels (edges repeated)."""
    B, C, H, W = x.shape
    padded = F.pad(x, (SHIFT,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, B), generator=g)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * SHIFT)
    x = padded.gather(2, rows)  # (B, C, H, W + 2s)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
    return x.gather(3, cols)


def views(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image replaced by one of VIEWS, drawn uniformly: itself, a Gaussian blur (sigma 0.7 to 2
    px), added noise (sigma 0.05 to 0.25 of the [-1, 1] range), or a 50/50 blend with another image
    of the batch; then rounded to 8-bit levels like the real images. Returns (images, view index)."""
    B = x.shape[0]
    y = torch.randint(0, len(VIEWS), (B,), generator=g)
    out = x.clone()
    blur = y == 1
    if blur.any():
        sigma = 0.7 + 1.3 * torch.rand(int(blur.sum()), generator=g)
        out[blur] = gaussian_blur(x[blur], sigma)
    noisy = y == 2
    if noisy.any():
        sigma = 0.05 + 0.2 * torch.rand(int(noisy.sum()), generator=g)
        out[noisy] = x[noisy] + sigma[:, None, None, None] * torch.randn(x[noisy].shape, generator=g)
    ghost = y == 3
    if ghost.any():
        other = x[torch.randint(0, B, (int(ghost.sum()),), generator=g)]
        out[ghost] = 0.5 * (x[ghost] + other)
    out = ((out.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return out, y


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own Gaussian of std sigma[b] pixels (edges repeated)."""
    B, C, H, W = x.shape
    r = int(math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, 2r+1)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)  # along H
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)  # along W
    return y.reshape(B, C, H, W)
