"""AutoencoderConfig + presets + the KL autoencoder of latent diffusion (Rombach et al. 2022, sec. 3).

Module and parameter names follow diffusers' `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D,
one UNetMidBlock2D with a single-head attention), so a diffusers state dict loads as it is and a
latent-diffusion single file loads after the renaming in diffcli/files/convert.py. The layout, for
block_out_channels (c0, c1, ..., cL) and f = 2**L:

    encoder: conv_in -> down_blocks[i] (resnets x layers_per_block, then a stride-2 conv but on the last)
             -> mid_block (resnet, attention, resnet) -> GroupNorm, SiLU, conv_out (2 x latent_channels)
    quant_conv (1x1) -> posterior N(mean, exp(logvar))           post_quant_conv (1x1) -> decoder
    decoder: conv_in -> mid_block -> up_blocks[i] over reversed channels (resnets x (layers_per_block + 1),
             then nearest 2x and a conv but on the last) -> GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffcli.validate import Field, Invalid, check_record, describe, field

# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_attention: bool = True  # diffusers' mid_block_add_attention
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def factor(self) -> int:
        """Down-sampling factor f: each side of the latent is the image's side / f."""
        return 2 ** (len(self.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent_channels, height // self.factor, width // self.factor

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    FIELDS: ClassVar[tuple[Field, ...]] = (
        field("in_channels", int, choices=(1, 3)),
        field("out_channels", int, choices=(1, 3)),
        field("latent_channels", int, min=1, max=64),
        field("layers_per_block", int, min=1, max=16),
        field("norm_num_groups", int, min=1, max=1024),
        field("mid_attention", bool, default=True),
        field("use_quant_conv", bool, default=True),
        field("use_post_quant_conv", bool, default=True),
    )

    @classmethod
    def from_dict(cls, d: Any, where: str = "autoencoder_config") -> "AutoencoderConfig":
        """The config a JSON object describes, every field checked (Invalid names the first bad one).
        The bounds keep a hostile file from sizing memory: widths up to 4096, up to 6 levels (f <= 32)."""
        if not isinstance(d, dict):
            raise Invalid(f"{where} must be an object, found {describe(d)}")
        chans = d.get("block_out_channels")
        if not isinstance(chans, list) or not 1 <= len(chans) <= 6:
            raise Invalid(f"{where}.block_out_channels must be a list of 1 to 6 widths, found {describe(chans)}")
        width = field("block_out_channels", int, min=1, max=4096)
        for i, c in enumerate(chans):
            width.check(c, where) if i == 0 else field(f"block_out_channels[{i}]", int, min=1, max=4096).check(c, where)
        rest = check_record({k: v for k, v in d.items() if k != "block_out_channels"}, cls.FIELDS, where)
        cfg = cls(block_out_channels=tuple(chans), **rest)
        bad = next((c for c in chans if c % cfg.norm_num_groups), None)
        if bad is not None:
            raise Invalid(f"{where}: norm_num_groups {cfg.norm_num_groups} does not divide the width {bad}")
        return cfg


AE_PRESETS: dict[str, dict] = {
    # f=4: 32x32 RGB -> 8x8x4 (12x fewer numbers); the shipped CIFAR-10 autoencoder. Narrow at full
    # resolution (32 channels), where a conv costs the most, so it trains at ~80 images/s on 2 CPU cores
    "f4": dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32),
    # f=8, the factor of Stable Diffusion's VAE, much narrower: 64x64 RGB -> 8x8x4 (48x fewer)
    "f8": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32),
}


def ae_preset_config(name: str, in_channels: int = 3, latent_channels: int = 4) -> AutoencoderConfig:
    if name not in AE_PRESETS:
        raise KeyError(name)
    return AutoencoderConfig(in_channels=in_channels, out_channels=in_channels, latent_channels=latent_channels,
                             **AE_PRESETS[name])


# --------------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the encoder's output split along channels."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as latent diffusion: keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps  # reparameterisation (Kingma & Welling 2014, eq. 10)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per image, summed over latent elements: 0.5 sum(mu^2 + var - 1 - log var)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers: to_out.0 (then a dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (diffusers' padding=0 variant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder (resnets, downsamplers) or of the decoder (resnets, upsamplers)."""

    def __init__(self, resnets: list[nn.Module], sampler: nn.Module | None, kind: str) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if sampler is not None:
            setattr(self, kind, nn.ModuleList([sampler]))
        self._kind = kind if sampler is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self._kind is not None:
            x = getattr(self, self._kind)[0](x)
        return x


# --------------------------------------------------------------------------------------------------
# Encoder, decoder, the autoencoder
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock2D(prev if j == 0 else c, c, g) for j in range(cfg.layers_per_block)]
            levels.append(_Level(resnets, Downsample(c) if i < len(ch) - 1 else None, "downsamplers"))
            prev = c
        self.down_blocks = nn.ModuleList(levels)
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_attention)
        self.conv_norm_out = _norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_attention)
        levels, prev = [], ch[0]
        for i, c in enumerate(ch):
            resnets = [ResnetBlock2D(prev if j == 0 else c, c, g) for j in range(cfg.layers_per_block + 1)]
            levels.append(_Level(resnets, Upsample(c) if i < len(ch) - 1 else None, "upsamplers"))
            prev = c
        self.up_blocks = nn.ModuleList(levels)
        self.conv_norm_out = _norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] (B, C, H, W) <-> latents (B, latent_channels, H/f, W/f), unscaled."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        C2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(C2, C2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        q = self.encode(x)
        return self.decode(q.sample(generator)), q

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The tensors decoding needs (decoder.* and post_quant_conv.*): what a latent model file embeds."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(DECODER_PARTS)}


def tensor_shapes(cfg: AutoencoderConfig, prefix: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Names and shapes of AutoencoderKL(cfg).state_dict() (only those starting with a prefix, when
    given), from a module built on the meta device: no memory is sized from the config."""
    with torch.device("meta"):
        m = AutoencoderKL(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items() if not prefix or k.startswith(prefix)}


DECODER_PARTS = ("decoder.", "post_quant_conv.")


class LatentDecoder(nn.Module):
    """The half of an autoencoder a latent model file embeds: scaled latents -> images in [-1, 1].

    Latent diffusion trains on z * scaling_factor (unit variance, Rombach et al. 2022, sec. 4.3.2), so
    decoding divides by it first."""

    def __init__(self, cfg: AutoencoderConfig, scaling_factor: float) -> None:
        super().__init__()
        self.config, self.scaling_factor = cfg, scaling_factor
        self.decoder = Decoder(cfg)
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    def forward(self, z_scaled: torch.Tensor) -> torch.Tensor:
        z = z_scaled / self.scaling_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def count_flops(cfg: AutoencoderConfig, height: int, width: int) -> tuple[float, float]:
    """Multiply-accumulates x 2 of one image through (encoder, decoder), convolutions and attention."""
    model = AutoencoderKL(cfg)
    counts = {"encoder": 0.0, "decoder": 0.0}
    hooks = []

    def hook(part: str):
        def f(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                counts[part] += 2 * out.numel() * m.in_channels * math.prod(m.kernel_size)
            elif isinstance(m, nn.Linear):
                counts[part] += 2 * out.numel() * m.in_features
            elif isinstance(m, Attention):
                n = inp[0].shape[2] * inp[0].shape[3]
                counts[part] += 2 * 2 * n * n * inp[0].shape[1]  # q k^T and attention x v
        return f

    for name, m in model.named_modules():
        part = "encoder" if name.startswith(("encoder", "quant_conv")) else "decoder"
        if isinstance(m, (nn.Conv2d, nn.Linear, Attention)):
            hooks.append(m.register_forward_hook(hook(part)))
    with torch.no_grad():
        q = model.encode(torch.zeros(1, cfg.in_channels, height, width))
        model.decode(q.mean)
    for h in hooks:
        h.remove()
    return counts["encoder"], counts["decoder"]
