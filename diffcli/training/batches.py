"""The batch of training step s, drawn from (seed, s) alone: data order, timesteps, noise, label dropout, crops, flips.

Randomness: everything random in step s (timesteps, noise, label dropout, flips, crops, data order)
is drawn from generators seeded by (seed, s) for the whole global batch, and each rank takes its
slice. So a run's result depends only on the seed and the global batch, not on the number of
processes, and resuming needs only the step counter (no RNG state to carry over).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffcli.data.folder import ImageSet, parse_resolution
from diffcli.data.latents import LatentSet
from diffcli.errors import UsageError
from diffcli.models.text import PAD
from diffcli.training.config import TrainConfig


def step_generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    # a distinct, reproducible generator per (seed, stream...); the mixing constants are arbitrary odd numbers
    s = seed & 0xFFFFFFFF
    for k in stream:
        s = (s * 6364136223846793005 + 1442695040888963407 + k) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator(device=device).manual_seed(s)


class DataOrder:
    """The infinite stream of epoch permutations; global batch k covers stream positions [kB, (k+1)B)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = torch.randperm(self.n, generator=step_generator(self.seed, 1, epoch))
        return self._cache[epoch]

    def batch_indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        epochs, within = pos // self.n, pos % self.n
        return torch.stack([self.perm(int(e))[int(w)] for e, w in zip(epochs, within)]) if self.n < self.batch else (
            self._fast(int(epochs[0]), int(epochs[-1]), within)
        )

    def _fast(self, e0: int, e1: int, within: torch.Tensor) -> torch.Tensor:
        if e0 == e1:
            return self.perm(e0)[within]
        split = int((within == 0).nonzero()[0])
        return torch.cat([self.perm(e0)[within[:split]], self.perm(e1)[within[split:]]])


def sample_timesteps(cfg: TrainConfig, B: int, g: torch.Generator) -> torch.Tensor:
    T = cfg.timesteps
    if cfg.timestep_sampling == "logit-normal":
        # Esser et al. 2024 (SD3), logit-normal(0, 1) over the diffusion time, discretised
        u = torch.sigmoid(torch.randn(B, generator=g, dtype=torch.float64))
        return (u * T).long().clamp(0, T - 1)
    return torch.randint(0, T, (B,), generator=g)


def augment(x: torch.Tensor, cfg: TrainConfig, H: int, W: int, flip: torch.Tensor, g: torch.Generator,
            offset: int, device: torch.device) -> torch.Tensor:
    """uint8 (b, C, h, w) -> float [-1, 1] (b, C, H, W): random crop (if cached larger) and flips."""
    if x.shape[-2:] != (H, W):
        b = x.shape[0]
        # crop offsets for the whole global batch come from g; this rank uses its slice
        ys = torch.randint(0, x.shape[-2] - H + 1, (cfg.batch_size,), generator=g)[offset : offset + b]
        xs = torch.randint(0, x.shape[-1] - W + 1, (cfg.batch_size,), generator=g)[offset : offset + b]
        x = torch.stack([x[i, :, int(ys[i]) : int(ys[i]) + H, int(xs[i]) : int(xs[i]) + W] for i in range(b)])
    x = x.float() / 127.5 - 1
    if cfg.flip:
        f = flip.to(device)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x


@dataclass
class Batch:
    """This rank's slice of one step's global batch."""

    x0: torch.Tensor  # (b, C, H, W) float in [-1, 1]
    y: torch.Tensor  # (b,) class indices, the null class where dropped (everywhere when unconditional); text: (b, L) token rows
    t: torch.Tensor  # (b,) timesteps
    noise: torch.Tensor  # (b, C, H, W)

    def split(self, parts: int) -> list[Batch]:
        """Equal micro-batches, in order, for gradient accumulation."""
        m = self.x0.shape[0] // parts
        return [Batch(self.x0[s], self.y[s], self.t[s], self.noise[s])
                for s in (slice(a * m, (a + 1) * m) for a in range(parts))]


class Batches:
    """The cached image set on the training device, and step -> this rank's Batch."""

    def __init__(self, cfg: TrainConfig, data: ImageSet, rank: int, world: int, device: torch.device,
                 latents: LatentSet | None = None, tokens: torch.Tensor | None = None) -> None:
        self.latents = latents
        if latents is None:
            self.pixels = data.pixels.to(device)  # the whole cached set lives on the training device
        else:  # a latent run: the posterior of every image (and of its mirror image with --flip)
            self.mean, self.logvar = latents.mean.to(device), latents.logvar.to(device)
        # the condition of every image: its class, or (a text model) its caption's token row (N, L)
        self.labels = (data.labels if tokens is None else tokens).to(device)
        self.text = tokens is not None
        self.dropout = cfg.caption_dropout if self.text else cfg.class_dropout
        self.order = DataOrder(len(data.files), cfg.batch_size, cfg.seed)
        B = cfg.batch_size
        if B % world:
            raise UsageError(f"--batch-size {B} must be divisible by the number of processes ({world})")
        self.per_rank = per_rank = B // world
        if per_rank % cfg.grad_accum:
            raise UsageError(f"the per-process batch {per_rank} must be divisible by --grad-accum {cfg.grad_accum}")
        self.cfg, self.rank, self.device = cfg, rank, device
        self.H, self.W = parse_resolution(cfg.resolution)
        self.num_classes = len(data.class_names)
        # the null class index (unconditional models only have it); a text model's null caption is all PAD
        self.null = PAD if self.text else self.num_classes

    def at(self, step: int) -> Batch:
        if self.latents is not None:
            return self._latent_at(step)
        cfg, device = self.cfg, self.device
        B, C, H, W = cfg.batch_size, self.pixels.shape[1], self.H, self.W
        g = step_generator(cfg.seed, 2, step)
        idx = self.order.batch_indices(step)  # (B,) global batch
        t_all = sample_timesteps(cfg, B, g)
        noise_all = torch.randn((B, C, H, W), generator=g)
        drop = torch.rand(B, generator=g) < self.dropout
        flip = torch.rand(B, generator=g) < 0.5
        lo = self.rank * self.per_rank
        mine = slice(lo, lo + self.per_rank)
        x0 = augment(self.pixels[idx[mine].to(device)], cfg, H, W, flip[mine], g, lo, device)
        y = self.labels[idx[mine].to(device)].clone()
        y[drop[mine].to(device)] = self.null
        if not self.num_classes and not self.text:
            y.fill_(self.null)
        return Batch(x0, y, t_all[mine].to(device), noise_all[mine].to(device))

    def _latent_at(self, step: int) -> Batch:
        """x0 = scaling_factor x a draw from the cached posterior q(z|x) (Rombach et al. 2022: the DiT
        learns the distribution of latents, so it sees fresh posterior samples, not only the means)."""
        cfg, device, lat = self.cfg, self.device, self.latents
        assert lat is not None
        B, (C, h, w) = cfg.batch_size, self.mean.shape[1:]
        g = step_generator(cfg.seed, 2, step)
        idx = self.order.batch_indices(step)
        t_all = sample_timesteps(cfg, B, g)
        noise_all = torch.randn((B, C, h, w), generator=g)
        drop = torch.rand(B, generator=g) < self.dropout
        flip = torch.rand(B, generator=g) < 0.5
        eps_all = torch.randn((B, C, h, w), generator=g)  # the posterior draw
        lo = self.rank * self.per_rank
        mine = slice(lo, lo + self.per_rank)
        i = idx[mine]
        row = (i + len(self.labels) * flip[mine].long()) if lat.flipped else i  # mirror images follow the originals
        row = row.to(device)
        mean, logvar = self.mean[row].float(), self.logvar[row].float()
        x0 = lat.scaling_factor * (mean + torch.exp(0.5 * logvar) * eps_all[mine].to(device))
        y = self.labels[i.to(device)].clone()
        y[drop[mine].to(device)] = self.null
        if not self.num_classes and not self.text:
            y.fill_(self.null)
        return Batch(x0, y, t_all[mine].to(device), noise_all[mine].to(device))
