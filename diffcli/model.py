"""ModelConfig, presets and the diffusion transformer (DiT, Peebles & Xie 2023), in pixel space.

Sections: config and presets, embedders, positional embeddings, blocks, final layer, the model.
Shapes: B batch, C image channels, H x W image, p patch size, h x w = H/p x W/p patch grid,
N = h * w tokens, D hidden size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffcli.errors import UsageError

# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the architecture; stored in every model file to rebuild the model."""

    image_height: int = 32
    image_width: int = 32
    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional (the embedding table holds only the null class)
    learn_sigma: bool = False  # Improved DDPM: a second output half interpolates the log variance
    long_skip: bool = False  # U-ViT (Bao et al. 2023): concat-and-project skips shallow -> deep

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    def validate(self) -> "ModelConfig":
        p = self.patch_size
        if min(self.image_height, self.image_width) < 1 or self.in_channels not in (1, 3):
            raise UsageError(f"bad image shape {self.in_channels}x{self.image_height}x{self.image_width}")
        if self.image_height % p or self.image_width % p:
            raise UsageError(
                f"resolution {self.image_height}x{self.image_width} is not a multiple of the patch size {p}"
            )
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise UsageError(f"hidden size {self.hidden_size} must be divisible by 4 and by the head count")
        if self.depth < 1 or self.num_classes < 0:
            raise UsageError("depth must be >= 1 and num_classes >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UsageError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        return cls(**d)


# Architecture presets: (depth, hidden size, heads). The paper's sizes (DiT Table 1) and small ones
# for CPU training on small images. Each comes with patch sizes 2, 4 and 8: "DiT-S/2".
_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    # small presets, not in the paper
    "M": (8, 256, 4),  # ~6 M parameters in the blocks: the shipped MNIST model's family
    "XS": (6, 192, 3),
    "T": (4, 128, 4),  # tiny: tests and smoke runs
}
PRESETS: dict[str, dict[str, Any]] = {
    f"DiT-{name}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for name, (d, w, h) in _SIZES.items()
    for p in (2, 4, 8)
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a preset name such as 'DiT-S/2', with image shape etc. as overrides."""
    key = next((k for k in PRESETS if k.lower() == name.lower()), None)
    if key is None:
        raise UsageError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(ModelConfig(), **{**PRESETS[key], **overrides}).validate()


# --------------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of t (dim 256, as the Transformer's and DiT's), then an MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        # precomputed once; t may be fractional (ODE samplers visit interpolated timesteps)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra 'null' class (index num_classes) for classifier-free
    guidance. Label dropout happens in the training loop, where the random generator lives."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.null_class = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)  # (B, D)


# --------------------------------------------------------------------------------------------------
# Positional embeddings: fixed 2-D sin-cos (MAE / DiT), half the channels per axis
# --------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (N, dim)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w)  # token n = r * w + c
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1).float()  # (N, D)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), token order row-major over the patch grid."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of patchify."""
    B, N, K = x.shape
    C = K // (p * p)
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # one fused projection
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Sec. 3.2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False) -> None:
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None  # U-ViT long skip: Linear([x, skip])
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, D) each
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        x = x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # (B, N, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C_out)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Denoiser f(x_t, t, y) -> eps or v prediction (plus variance values when learn_sigma)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config.validate()
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        h, w = cfg.grid
        self.register_buffer("pos_embed", sincos_2d(D, h, w)[None], persistent=False)  # (1, N, D), fixed
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        n_in = cfg.depth // 2 if cfg.long_skip else 0  # blocks whose outputs feed the long skips
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, skip=cfg.long_skip and i >= cfg.depth - n_in)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        # Transformer linears: xavier-uniform, zero bias (DiT, as in ViT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding like a linear layer over the flattened patch
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Label table and timestep MLP: normal(0, 0.02)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every modulation starts at zero, so each block starts as the identity
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Final layer at zero: an untrained model outputs exactly 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) timesteps (float allowed), y: (B,) labels, null class = unconditional."""
        B = x.shape[0]
        if y is None:
            y = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D), computed once for all blocks
        n_in = len([b for b in self.blocks if b.skip is not None])
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, skips.pop() if block.skip is not None else None)
            if i < n_in:
                skips.append(tokens)
        out = self.final_layer(tokens, c)  # (B, N, p*p*C_out)
        h, w = self.config.grid
        return unpatchify(out, self.config.patch_size, h, w)  # (B, C_out, H, W)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
