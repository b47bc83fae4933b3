"""The DiT's fast paths compute the same function as a naive reference written out here.

diffcli.models.dit takes a no-autograd CPU path when sampling (in-place modulation and residuals, oneDNN's
fused linear + tanh-GELU, big batches in chunks) and a plain path under autograd. Both are checked
against `reference_forward`: every step spelled out from the DiT paper's definitions, in float64,
from the model's own weights (per-head attention with an explicit softmax, LayerNorm from its mean
and variance, GELU from its tanh formula, the sin-cos embeddings from their formulas, unpatchify as
the DiT reference's einsum).
"""

from __future__ import annotations

import math

import pytest
import torch

from diffcli.models import dit as model_module
from diffcli.models.dit import DiT, DiTBlock, inference_fast_path


def fused_op_available() -> bool:
    return model_module._fused_linear_gelu_works()


needs_fused = pytest.mark.skipif(not fused_op_available(), reason="this torch build lacks oneDNN's fused linear op")


# --------------------------------------------------------------------------------------------------
# The naive reference, float64
# --------------------------------------------------------------------------------------------------


def ref_linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    return x @ lin.weight.double().T + lin.bias.double()


def ref_layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def ref_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_attention(x: torch.Tensor, attn: torch.nn.Module) -> torch.Tensor:
    D = x.shape[-1]
    H = attn.num_heads
    d = D // H
    q, k, v = ref_linear(x, attn.qkv).split(D, dim=-1)  # (B, N, D) each, heads side by side
    heads = []
    for i in range(H):
        s = slice(i * d, (i + 1) * d)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d)  # (B, N, N)
        weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
        heads.append((weights / weights.sum(-1, keepdim=True)) @ v[..., s])
    return ref_linear(torch.cat(heads, dim=-1), attn.proj)


def ref_sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def reference_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    B, _, H, W = x.shape
    h, w = H // p, W // p
    x = x.double()
    # patch embedding: the conv is a linear map of each (C, p, p) patch
    patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    tokens = patches @ model.x_embedder.weight.double().reshape(D, -1).T + model.x_embedder.bias.double()
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    tokens = tokens + torch.cat([ref_sincos(D // 2, rows), ref_sincos(D // 2, cols)], dim=1)
    # conditioning: sinusoidal timestep features through the MLP, plus the class embedding
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    mlp = model.t_embedder.mlp
    temb = ref_linear(torch.nn.functional.silu(ref_linear(torch.cat([args.cos(), args.sin()], -1), mlp[0])), mlp[2])
    c = temb + model.y_embedder.table.weight.double()[y]
    silu_c = torch.nn.functional.silu(c)
    n_in = sum(b.skip is not None for b in model.blocks)
    skips = []
    for i, blk in enumerate(model.blocks):
        if blk.skip is not None:
            tokens = ref_linear(torch.cat([tokens, skips.pop()], -1), blk.skip)
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = ref_linear(silu_c, blk.adaLN_modulation[1])[:, None].chunk(6, -1)
        tokens = tokens + g_a * ref_attention(ref_layer_norm(tokens) * (1 + sc_a) + sh_a, blk.attn)
        hidden = ref_gelu_tanh(ref_linear(ref_layer_norm(tokens) * (1 + sc_m) + sh_m, blk.mlp[0]))
        tokens = tokens + g_m * ref_linear(hidden, blk.mlp[2])
        if i < n_in:
            skips.append(tokens)
    fl = model.final_layer
    shift, scale = ref_linear(silu_c, fl.adaLN_modulation[1])[:, None].chunk(2, -1)
    out = ref_linear(ref_layer_norm(tokens) * (1 + scale) + shift, fl.linear)  # (B, N, p*p*C_out)
    C_out = cfg.out_channels
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, h, w, p, p, C_out))
    return out.reshape(B, C_out, H, W)


def inputs(model: DiT, B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_height, cfg.image_width, generator=g)
    t = torch.rand(B, generator=g) * 999
    y = torch.randint(0, cfg.num_classes + 1, (B,), generator=g)
    return x, t, y


# outputs are O(1); float32 against the float64 reference agrees to ~5e-6
TOL = {"rtol": 1e-4, "atol": 5e-5}

# 16 tokens (a 4x4 or 4x6 patch grid) so that attention mixes many positions; weights perturbed so
# that every block and the final layer contribute (a fresh DiT outputs exactly zero)
CONFIGS = {
    "plain": {"image_height": 8, "image_width": 8, "patch_size": 2, "num_classes": 5},
    "rectangular, learned sigma": {"image_height": 8, "image_width": 12, "patch_size": 2, "num_classes": 3,
                                   "learn_sigma": True},
    "long skips": {"image_height": 8, "image_width": 8, "patch_size": 2, "num_classes": 5, "long_skip": True,
                   "depth": 4},
    "grayscale, 3 heads": {"image_height": 8, "image_width": 8, "patch_size": 2, "in_channels": 1,
                           "hidden_size": 48, "num_heads": 3, "num_classes": 2},
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def dit(request, make_dit) -> DiT:
    return make_dit(seed=3, scale=0.1, **CONFIGS[request.param])


# --------------------------------------------------------------------------------------------------
# Whole model: both paths against the reference
# --------------------------------------------------------------------------------------------------


def test_reference_is_not_trivial(dit):
    x, t, y = inputs(dit, 3)
    ref = reference_forward(dit, x, t, y)
    assert ref.abs().max() > 0.1  # the perturbed weights make a non-zero output to compare


@needs_fused
def test_no_grad_path_matches_reference(dit):
    x, t, y = inputs(dit, 3)
    with torch.inference_mode():
        assert inference_fast_path(x.view(3, -1))
        out = dit(x, t, y)
    torch.testing.assert_close(out.double(), reference_forward(dit, x, t, y), **TOL)


def test_autograd_path_matches_reference(dit):
    x, t, y = inputs(dit, 3)
    out = dit(x, t, y)
    assert out.requires_grad
    torch.testing.assert_close(out.detach().double(), reference_forward(dit, x, t, y), **TOL)


def test_gradients_match_reference(dit):
    """The plain path is what training differentiates: its parameter gradients are the reference's."""
    x, t, y = inputs(dit, 3)
    target = torch.randn(dit(x, t, y).shape, generator=torch.Generator().manual_seed(1))
    dit.zero_grad()
    ((dit(x, t, y) - target) ** 2).mean().backward()
    ours = {n: p.grad.double().clone() for n, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad()
    ((reference_forward(dit, x, t, y) - target.double()) ** 2).mean().backward()
    for n, p in dit.named_parameters():
        if p.grad is None:
            continue
        # float32 sums over the batch and tokens carry a rounding error of a few 1e-7 of the tensor's largest
        # gradient; a wrong gradient path differs by its own size
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(ours[n], p.grad.double(), rtol=1e-4, atol=max(1e-6, 1e-5 * scale),
                                   msg=f"gradient of {n}")


@needs_fused
def test_no_grad_path_is_taken_and_agrees_with_autograd_path(dit, monkeypatch):
    calls = []
    original = DiTBlock._forward_no_grad

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(DiTBlock, "_forward_no_grad", counting)
    x, t, y = inputs(dit, 4)
    with torch.no_grad():
        fast = dit(x, t, y)
    assert len(calls) == dit.config.depth
    slow = dit(x, t, y).detach()
    assert len(calls) == dit.config.depth  # autograd on: the plain path
    torch.testing.assert_close(fast, slow, **TOL)


def test_without_the_fused_op_the_plain_path_serves_sampling(dit, monkeypatch):
    monkeypatch.setattr(model_module, "_fused_linear_gelu_works", lambda: False)
    x, t, y = inputs(dit, 3)
    with torch.inference_mode():
        assert not inference_fast_path(x)
        out = dit(x, t, y)
    torch.testing.assert_close(out.double(), reference_forward(dit, x, t, y), **TOL)


# --------------------------------------------------------------------------------------------------
# Chunked big batches
# --------------------------------------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("B", [1, 2, 5, 7])
def test_chunked_batches_match_reference(dit, B):
    """With 16 tokens per image and a 32-token budget the batch runs as chunks of 2 images."""
    dit.no_grad_chunk_tokens = 32
    x, t, y = inputs(dit, B, seed=B)
    with torch.inference_mode():
        out = dit(x, t, y)
    assert out.shape[0] == B
    torch.testing.assert_close(out.double(), reference_forward(dit, x, t, y), **TOL)


@needs_fused
def test_chunking_does_not_change_results(dit):
    x, t, y = inputs(dit, 6)
    with torch.inference_mode():
        whole = dit(x, t, y)
        dit.no_grad_chunk_tokens = 16  # one image per chunk
        chunked = dit(x, t, y)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_chunk_size_covers_the_default_sampling_batches():
    """The shipped model's guided batch (20 x 49 tokens) runs in one piece; DiT-S/2 on 32x32 (256
    tokens per image) in chunks of 16 images."""
    assert DiT.no_grad_chunk_tokens // 49 >= 20
    assert DiT.no_grad_chunk_tokens // 256 == 16


# --------------------------------------------------------------------------------------------------
# One block: in-place updates must not leak
# --------------------------------------------------------------------------------------------------


@needs_fused
@pytest.mark.parametrize("skip", [False, True])
def test_block_leaves_its_inputs_alone(skip):
    """The no-grad block writes into fresh tensors only: a long skip's stored activation (the input
    of the next block) and the conditioning stay as they were."""
    torch.manual_seed(0)
    block = DiTBlock(32, 2, 4.0, skip=skip)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x, c, s = torch.randn(3, 10, 32), torch.randn(3, 32), torch.randn(3, 10, 32)
    x0, c0, s0 = x.clone(), c.clone(), s.clone()
    with torch.inference_mode():
        fast = block(x, c, s if skip else None)
    assert torch.equal(x, x0) and torch.equal(c, c0) and torch.equal(s, s0)
    slow = block(x, c, s if skip else None)
    torch.testing.assert_close(fast, slow.detach(), **TOL)


def test_fast_path_only_for_cpu_fp32_without_autograd_or_autocast():
    x = torch.randn(2, 3)
    assert not inference_fast_path(x)  # autograd on
    with torch.no_grad():
        assert inference_fast_path(x) == fused_op_available()
        assert not inference_fast_path(x.double())
        assert not inference_fast_path(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not inference_fast_path(x)


def test_tokens_are_contiguous_through_the_blocks(make_dit):
    """The patch embedding's transposed view is made contiguous once, so no block (and no LayerNorm)
    works on channel-major strides."""
    model = make_dit(image_height=8, image_width=8, patch_size=2, num_classes=2)
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous())) for b in model.blocks]
    x, t, y = inputs(model, 2)
    model(x, t, y)
    for hk in hooks:
        hk.remove()
    assert seen == [True] * model.config.depth
