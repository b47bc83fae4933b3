"""ModelConfig, presets and the diffusion transformer (DiT, Peebles & Xie 2023), in pixel space.

Sections: config and presets, embedders, positional embeddings, blocks, final layer, the model.
Shapes: B batch, C image channels, H x W image, p patch size, h x w = H/p x W/p patch grid,
N = h * w tokens, D hidden size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffcli.errors import UsageError
from diffcli.validate import Field, Invalid, check_record, field, join

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
    # a text-to-image model (PixArt-alpha style cross-attention to caption tokens in every block):
    text_encoder: str = ""  # "" (class/unconditional model), "builtin" (diffcli.models.text, trained jointly) or "clip" (frozen)
    context_dim: int = 0  # width of the text features the blocks attend to
    text_length: int = 0  # tokens per caption
    text_vocab: int = 0  # builtin: rows of the word embedding table (the vocabulary and UNK)
    text_depth: int = 0  # builtin: transformer layers of the text encoder
    # the caption's mean token also joins the timestep in the adaLN condition of every block (the pooled
    # text embedding of SDXL and SD3), so a caption steers each block's modulation as a class label does,
    # not only its cross-attention; text models of diffcli before this field lack it
    text_pooled: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def text(self) -> bool:
        """A text-to-image model: its condition y is a (B, text_length) token row per image (diffcli.models.text)."""
        return bool(self.text_encoder)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_height // self.patch_size, self.image_width // self.patch_size

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    # Every field's type and range. A model file's config is checked against these before anything is
    # built from it; the bounds keep what a file can make the loader allocate within reason.
    FIELDS: ClassVar[tuple[Field, ...]] = (
        field("image_height", int, min=1, max=16384),
        field("image_width", int, min=1, max=16384),
        field("in_channels", int, min=1, max=64),  # 1 or 3 for pixels; a latent model: the latent channels
        field("patch_size", int, min=1, max=256),
        field("hidden_size", int, min=4, max=65536),
        field("depth", int, min=1, max=1024),
        field("num_heads", int, min=1, max=65536),
        field("mlp_ratio", float, gt=0, max=64),
        field("num_classes", int, min=0, max=1_000_000),
        field("learn_sigma", bool),
        field("long_skip", bool),
        field("text_encoder", str, choices=("", "builtin", "clip"), default=""),
        field("context_dim", int, min=0, max=65536, default=0),
        field("text_length", int, min=0, max=4096, default=0),
        field("text_vocab", int, min=0, max=1_000_000, default=0),
        field("text_depth", int, min=0, max=64, default=0),
        field("text_pooled", bool, default=False),
    )
    MAX_TOKENS: ClassVar[int] = 65536  # the patch grid; the fixed positional table is tokens x hidden_size

    def problem(self) -> tuple[str, str] | None:
        """The first field (and why) that this architecture cannot be built with, or None. The field
        checks come first, then what the DiT needs of the fields together."""
        try:
            check_record(self.to_dict(), self.FIELDS, "")
        except Invalid as e:
            return "", str(e)
        p, D = self.patch_size, self.hidden_size
        if self.image_height % p or self.image_width % p:
            return "patch_size", f"resolution {self.image_height}x{self.image_width} is not a multiple of the patch size {p}"
        if D % self.num_heads or D % 4:
            # heads split the width evenly; the 2-D sin-cos table splits it into four quarters
            return "hidden_size", f"hidden size {D} must be divisible by 4 and by the head count {self.num_heads}"
        if int(D * self.mlp_ratio) < 1:
            return "mlp_ratio", f"the MLP width int({D} * {self.mlp_ratio}) is 0"
        if self.text_encoder:
            if self.num_classes:
                return "num_classes", "a text-to-image model has no classes (captions are its condition)"
            if self.context_dim < 1 or self.text_length < 1:
                return "context_dim", "a text-to-image model needs context_dim and text_length >= 1"
            if (self.text_encoder == "builtin") != (self.text_vocab >= 1):
                return "text_vocab", "text_vocab is the builtin encoder's table size (>= 1), 0 for clip"
            if self.text_encoder == "clip" and self.text_depth:
                return "text_depth", "text_depth is the builtin encoder's, 0 for clip"
        elif self.context_dim or self.text_length or self.text_vocab or self.text_depth or self.text_pooled:
            return "text_encoder", "context_dim, text_length, text_vocab, text_depth and text_pooled need a text_encoder"
        if self.num_tokens > self.MAX_TOKENS:
            return "patch_size", (f"resolution {self.image_height}x{self.image_width} in patches of {p} is "
                                  f"{self.num_tokens} tokens, more than the {self.MAX_TOKENS} diffcli allows")
        return None

    def validate(self) -> "ModelConfig":
        """self, or a UsageError saying which setting the model cannot be built with."""
        bad = self.problem()
        if bad:
            raise UsageError(bad[1])
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.text_encoder:  # a class or unconditional model's file reads as it did before text models
            for k in ("text_encoder", "context_dim", "text_length", "text_vocab", "text_depth", "text_pooled"):
                del d[k]
        elif not self.text_pooled:  # and a text model without the pooled path as it did before that field
            del d["text_pooled"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "model_config") -> "ModelConfig":
        """The config a JSON object describes, every field checked (Invalid names the first bad one)."""
        cfg = cls(**check_record(d, cls.FIELDS, where))
        bad = cfg.problem()
        if bad:
            raise Invalid(f"{join(where, bad[0]) if bad[0] else where}: {bad[1]}")
        return cfg


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


def construction_device() -> torch.device:
    """The device modules are being built on: that of a `with torch.device(...)` block, else the CPU.
    Fixed tables are computed on the CPU and moved there, because computing them on the meta device
    (model files are shape-checked on it) pulls in a second of one-time imports."""
    return torch.empty(0).device


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of t (dim 256, as the Transformer's and DiT's), then an MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        half = freq_dim // 2
        # precomputed once; t may be fractional (ODE samplers visit interpolated timesteps)
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device="cpu") / half)
        self.register_buffer("freqs", freqs.to(construction_device()), persistent=False)
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
        # nn.Embedding's own N(0, 1) draw, made here so that it can be skipped on the meta device
        # (where a random draw costs a second of one-time imports; model files are shape-checked there)
        table = torch.empty(num_classes + 1, hidden_size)
        if not table.is_meta:
            nn.init.normal_(table)
        self.table = nn.Embedding(num_classes + 1, hidden_size, _weight=table)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)  # (B, D)


class CaptionEmbedder(nn.Module):
    """Text features (B, L, W) -> caption tokens (B, L, D) for the blocks' cross-attention: an MLP as
    PixArt-alpha's caption projection, and a learned null caption for classifier-free guidance that
    replaces every row without a real token (a dropped caption in training, the unconditional half
    when sampling). The null caption is one token; its row's other positions are masked out."""

    def __init__(self, context_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.null = nn.Parameter(torch.zeros(1, context_dim))
        self.mlp = nn.Sequential(nn.Linear(context_dim, hidden_size), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, W = feats.shape
        null = ~mask.any(1)  # (B,) rows that are the null caption
        # always in the graph, even for a batch without a null row: the optimizer then keeps state for the
        # null caption from the first step, so every training checkpoint holds the same tensors
        row = torch.cat([self.null, self.null.new_zeros(L - 1, W)])  # (L, W)
        row_mask = torch.arange(L, device=mask.device) == 0
        feats = torch.where(null[:, None, None], row.to(feats.dtype), feats)
        mask = torch.where(null[:, None], row_mask, mask)
        return self.mlp(feats), mask  # (B, L, D), (B, L)


# --------------------------------------------------------------------------------------------------
# Positional embeddings: fixed 2-D sin-cos (MAE / DiT), half the channels per axis
# --------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (N, dim)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """(N, dim) on the CPU (whatever device modules are being built on)."""
    rows = torch.arange(h, device="cpu").repeat_interleave(w)  # token n = r * w + c
    cols = torch.arange(w, device="cpu").repeat(h)
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
#
# Sampling on CPU (no autograd, fp32) takes a faster path through each block that computes the same
# function: LayerNorm outputs are modulated in place, the MLP residual is added in place, and the
# first MLP linear runs with its bias and tanh-GELU fused into one oneDNN matmul (the op PyTorch's
# own compiler emits for this pattern; ATen's tanh-GELU alone took ~2 ns per element, 6x its tanh).
# Each fresh large tensor costs page faults and each elementwise pass over (B, N, 4D) costs memory
# traffic. On a 2-core Xeon this path made a DiT-S/2 forward 1.11x and the shipped model's 1.17x
# faster. Training takes the plain path: autograd needs the values overwritten here.
# tests/test_speed_paths.py checks both paths against a naive reference; benchmarks/run.py times them.
# --------------------------------------------------------------------------------------------------


@functools.cache
def _fused_linear_gelu_works() -> bool:
    """Whether this torch build has oneDNN's fused linear + pointwise op and it gives GELU(tanh)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
        with torch.no_grad():
            out = op(x, w, b, "gelu", [], "tanh")
        return torch.allclose(out, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def inference_fast_path(x: torch.Tensor) -> bool:
    """True where a block may take its no-autograd CPU path for the input x."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not _autocast_on_cpu()
        and _fused_linear_gelu_works()
    )


def _autocast_on_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, per image, in one pass over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


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


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; masked keys (padding) get no weight."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        L, h = ctx.shape[1], self.num_heads
        q = self.q(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, heads, N, D/heads)
        k, v = self.kv(ctx).reshape(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, L, D/heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


Context = tuple[torch.Tensor, torch.Tensor]  # caption tokens (B, L, D) and their key mask (B, L)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Sec. 3.2); with `cross`, a cross-attention
    to the caption tokens between self-attention and MLP (PixArt-alpha, Chen et al. 2023, Sec. 2.3:
    the timestep still enters through adaLN, the text only through cross-attention)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.skip = nn.Linear(2 * dim, dim) if skip else None  # U-ViT long skip: Linear([x, skip])
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if cross else None
        self.cross_attn = CrossAttention(dim, num_heads) if cross else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None = None,
                context: Context | None = None) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, D) each
        if inference_fast_path(x):
            return self._forward_no_grad(x, context, *mods)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        # x + gate * f(...) in one pass (addcmul), not a product and a sum
        x = torch.addcmul(x, gate_a[:, None], self.attn(modulate(self.norm1(x), shift_a, scale_a)))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), *context)
        x = torch.addcmul(x, gate_m[:, None], self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        return x  # (B, N, D)

    def _forward_no_grad(self, x: torch.Tensor, context: Context | None, *mods: torch.Tensor) -> torch.Tensor:
        """forward() without autograd on CPU fp32: in-place updates, fused linear + GELU(tanh)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None] for m in mods)  # (B, 1, D)
        h = self.norm1(x)
        torch.addcmul(shift_a, h, 1 + scale_a, out=h)  # modulate in place
        x = torch.addcmul(x, gate_a, self.attn(h))  # a new tensor: the input may be a long skip's
        if self.cross_attn is not None:
            x.add_(self.cross_attn(self.norm_cross(x), *context))
        h = self.norm2(x)
        torch.addcmul(shift_m, h, 1 + scale_m, out=h)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        h = torch.ops.mkldnn._linear_pointwise(h, fc1.weight, fc1.bias, "gelu", [], "tanh")  # (B, N, 4D)
        return x.addcmul_(gate_m, fc2(h))  # (B, N, D)


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

    no_grad_chunk_tokens = 4096  # sampling on CPU: at most this many tokens (B * N) per pass

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = cfg = config.validate()
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        h, w = cfg.grid
        pos_embed = sincos_2d(D, h, w)[None].to(construction_device())
        self.register_buffer("pos_embed", pos_embed, persistent=False)  # (1, N, D), fixed
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        if cfg.text_encoder == "builtin":
            from diffcli.models.text import TextEncoder

            self.text_encoder = TextEncoder(cfg.text_vocab, cfg.text_length, cfg.context_dim, cfg.text_depth)
        # a frozen CLIP text encoder is not part of the model (nor of its file): load_model attaches it
        self.external_text: Any = None
        if cfg.text:
            self.caption_embedder = CaptionEmbedder(cfg.context_dim, D)
        self.caption_pool = nn.Linear(D, D) if cfg.text_pooled else None
        n_in = cfg.depth // 2 if cfg.long_skip else 0  # blocks whose outputs feed the long skips
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, skip=cfg.long_skip and i >= cfg.depth - n_in, cross=cfg.text)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        if self.x_embedder.weight.is_meta:  # built for its shapes only: there are no values to draw
            return
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
            if block.cross_attn is not None:  # and so does the text path (PixArt-alpha zeroes this projection too)
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # Text: word and position tables normal(0, 0.02 / 0.01); the null caption normal(0, 1/sqrt(width)),
        # the scale of a feature vector after a LayerNorm divided by its width's square root (PixArt-alpha)
        if self.config.text_encoder == "builtin":
            self.text_encoder.initialize_weights()
        if self.config.text:
            nn.init.normal_(self.caption_embedder.null, std=self.config.context_dim ** -0.5)
        # Final layer at zero: an untrained model outputs exactly 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) timesteps (float allowed), y: (B,) labels, null class = unconditional;
        a text model: y (B, text_length) token rows (diffcli.models.text), all PAD = the null caption."""
        B = x.shape[0]
        if y is None and self.config.text:
            from diffcli.models.text import PAD

            y = torch.full((B, self.config.text_length), PAD, dtype=torch.long, device=x.device)
        elif y is None:
            y = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
        chunk = max(1, self.no_grad_chunk_tokens // self.config.num_tokens)
        if B > chunk and inference_fast_path(x):
            # images are independent, so a big batch runs as chunks whose activations stay in cache
            # (and under the allocator's mmap threshold): DiT-S/2 on 32x32 ran ~10% faster per image
            # at batch 16 than at 64 on a 2-core Xeon
            return torch.cat([self._forward(x[i : i + chunk], t[i : i + chunk], y[i : i + chunk])
                              for i in range(0, B, chunk)])
        return self._forward(x, t, y)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # contiguous (B, N, D): the conv's (B, D, N) seen through a transpose would keep every later
        # elementwise op in channel-major strides and make each LayerNorm copy its input
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed  # (B, N, D)
        if self.config.text:  # the caption through cross-attention (and, pooled, through adaLN)
            c = self.t_embedder(t) + self.y_embedder.table.weight[0]  # (B, D)
            context = self.caption_embedder(*self.text_features(y))  # (B, L, D), (B, L)
            if self.caption_pool is not None:
                ctx, keep = context
                m = keep.to(ctx.dtype)[..., None]  # (B, L, 1); every row has a real or a null token
                c = c + self.caption_pool((ctx * m).sum(1) / m.sum(1))  # mean of the caption's tokens, (B, D)
        else:
            c = self.t_embedder(t) + self.y_embedder(y)  # (B, D), computed once for all blocks
            context = None
        n_in = len([b for b in self.blocks if b.skip is not None])
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, skips.pop() if block.skip is not None else None, context)
            if i < n_in:
                skips.append(tokens)
        out = self.final_layer(tokens, c)  # (B, N, p*p*C_out)
        h, w = self.config.grid
        return unpatchify(out, self.config.patch_size, h, w)  # (B, C_out, H, W)


    def text_features(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows (B, L) -> text features (B, L, context_dim) and the mask of real tokens (B, L)."""
        if self.config.text_encoder == "builtin":
            return self.text_encoder(y)
        if self.external_text is None:
            raise UsageError("this model reads captions with a CLIP text encoder that is not loaded (--text-encoder FOLDER)")
        return self.external_text.features(y)


def state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of DiT(cfg).state_dict(), in its order, worked out from the config alone:
    a model file is checked against these before any module is built (tests/test_model.py holds
    them equal to a built model's for every kind of block)."""
    D, p, K = cfg.hidden_size, cfg.patch_size, cfg.num_classes
    M = int(D * cfg.mlp_ratio)
    out: dict[str, tuple[int, ...]] = {
        "x_embedder.weight": (D, cfg.in_channels, p, p), "x_embedder.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.table.weight": (K + 1, D),
    }
    if cfg.text_encoder == "builtin":
        from diffcli.models.text import encoder_shapes

        shapes = encoder_shapes(cfg.text_vocab, cfg.text_length, cfg.context_dim, cfg.text_depth)
        out |= {f"text_encoder.{k}": v for k, v in shapes.items()}
    if cfg.text:
        W = cfg.context_dim
        out |= {"caption_embedder.null": (1, W), "caption_embedder.mlp.0.weight": (D, W), "caption_embedder.mlp.0.bias": (D,),
                "caption_embedder.mlp.2.weight": (D, D), "caption_embedder.mlp.2.bias": (D,)}
    if cfg.text_pooled:
        out |= {"caption_pool.weight": (D, D), "caption_pool.bias": (D,)}
    n_in = cfg.depth // 2 if cfg.long_skip else 0
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        if cfg.long_skip and i >= cfg.depth - n_in:
            out |= {b + "skip.weight": (D, 2 * D), b + "skip.bias": (D,)}
        out |= {
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            **({b + "cross_attn.q.weight": (D, D), b + "cross_attn.q.bias": (D,),
                b + "cross_attn.kv.weight": (2 * D, D), b + "cross_attn.kv.bias": (2 * D,),
                b + "cross_attn.proj.weight": (D, D), b + "cross_attn.proj.bias": (D,)} if cfg.text else {}),
            b + "mlp.0.weight": (M, D), b + "mlp.0.bias": (M,),
            b + "mlp.2.weight": (D, M), b + "mlp.2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        }
    out |= {
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (p * p * cfg.out_channels, D), "final_layer.linear.bias": (p * p * cfg.out_channels,),
    }
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
