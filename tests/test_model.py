"""The diffusion transformer: patches, shapes, the adaLN-Zero init, fixed positional embeddings,
rebuilding from the stored config, U-ViT long skips and the presets."""

import json
import math

import pytest
import torch

from diffcli.errors import UsageError
from diffcli.models.dit import PRESETS, DiT, ModelConfig, patchify, preset_config, state_dict_shapes, unpatchify
from diffcli.validate import Invalid


def timesteps_labels(B: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randint(0, num_classes + 1, (B,), generator=g)  # the null class included
    return t, y


# --------------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,H,W,p", [(3, 8, 8, 4), (1, 8, 16, 4), (3, 8, 16, 2), (3, 12, 4, 4)])
def test_patchify_layout_and_round_trip(C, H, W, p):
    x = torch.randn(2, C, H, W)
    tokens = patchify(x, p)
    h, w = H // p, W // p
    assert tokens.shape == (2, h * w, p * p * C)
    # token n = r * w + c (row-major over the patch grid); within a token (row i, col j, channel ch)
    for b, r, c, i, j, ch in [(0, 0, 0, 0, 0, 0), (1, h - 1, w - 1, p - 1, p - 1, C - 1), (1, h - 1, 0, 1, 0, C - 1)]:
        assert tokens[b, r * w + c, (i * p + j) * C + ch] == x[b, ch, r * p + i, c * p + j]
    assert torch.equal(unpatchify(tokens, p, h, w), x)


def test_patch_embedding_sees_the_same_token_order_as_patchify():
    """The conv patch embedding is a linear map of patchify's tokens: its flattened output is in
    the same row-major order that the positional embedding and unpatchify assume."""
    model = DiT(ModelConfig(image_height=8, image_width=16, in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2))
    x = torch.randn(2, 3, 8, 16)
    conv = model.x_embedder(x).flatten(2).transpose(1, 2)  # (B, N, D)
    Wt = model.x_embedder.weight.permute(0, 2, 3, 1).reshape(32, -1)  # (D, p*p*C) in patchify's order
    linear = patchify(x, 4) @ Wt.T + model.x_embedder.bias
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Output shape and init
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("C,H,W", [(3, 8, 8), (1, 8, 16)])
def test_output_shape(make_dit, learn_sigma, C, H, W):
    model = make_dit(in_channels=C, image_height=H, image_width=W, num_classes=3, learn_sigma=learn_sigma)
    t, y = timesteps_labels(5, 3)
    out = model(torch.randn(5, C, H, W), t, y)
    assert out.shape == (5, 2 * C if learn_sigma else C, H, W)
    assert model.config.out_channels == (2 * C if learn_sigma else C)


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 4, "learn_sigma": True}, {"long_skip": True, "depth": 4}])
def test_untrained_model_outputs_exactly_zero(make_config, overrides):
    model = DiT(make_config(image_width=16, **overrides))
    t, y = timesteps_labels(4, model.config.num_classes)
    out = model(torch.randn(4, 3, 8, 16) * 5, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(model(torch.randn(4, 3, 8, 16), t), torch.zeros_like(out))  # y=None: null class


def test_adaln_zero_init(make_config):
    model = DiT(make_config(depth=3, num_classes=2))
    for block in model.blocks:
        lin = block.adaLN_modulation[-1]
        assert lin.weight.shape == (6 * 32, 32)
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    final = model.final_layer
    for lin in (final.adaLN_modulation[-1], final.linear):
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    # ...while the other linears are not zero (xavier / normal(0, 0.02))
    assert torch.count_nonzero(model.blocks[0].attn.qkv.weight) == model.blocks[0].attn.qkv.weight.numel()
    assert 0.01 < model.y_embedder.table.weight.std().item() < 0.03
    # so every block starts as the identity, whatever the conditioning
    x, c = torch.randn(2, 4, 32), torch.randn(2, 32)
    assert torch.equal(model.blocks[1](x, c), x)


def test_timestep_embedding_frequencies(make_dit):
    """The MLP's input is [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/128), k < 128 (DiT's 256-dim embedding)."""
    emb = make_dit().t_embedder
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0]

    emb.mlp[0].register_forward_hook(hook)
    emb(torch.tensor([0.0, 7.0, 999.0]))
    x = seen["x"].double()
    for row, t in enumerate((0.0, 7.0, 999.0)):
        for k in (0, 1, 50, 127):
            f = 10000 ** (-k / 128)
            assert x[row, k].item() == pytest.approx(math.cos(t * f), abs=1e-4)
            assert x[row, 128 + k].item() == pytest.approx(math.sin(t * f), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Positional embedding
# --------------------------------------------------------------------------------------------------


def sincos_reference(D: int, r: int, c: int) -> list[float]:
    """2-D sin-cos embedding of patch (row r, col c): D/2 channels for the row, then D/2 for the
    column, each [sin(pos w_k)..., cos(pos w_k)...] with w_k = 1 / 10000^(k / (D/4)), k < D/4."""
    q = D // 4
    out = []
    for pos in (r, c):
        w = [1.0 / 10000 ** (k / q) for k in range(q)]
        out += [math.sin(pos * wk) for wk in w] + [math.cos(pos * wk) for wk in w]
    return out


def test_positional_embedding_is_fixed_sincos(make_config):
    cfg = make_config(image_height=16, image_width=32, patch_size=4, hidden_size=64, num_heads=4)
    model = DiT(cfg)
    h, w = cfg.grid
    assert (h, w) == (4, 8)
    assert model.pos_embed.shape == (1, h * w, 64)
    assert not any("pos_embed" in k for k in model.state_dict())
    assert not model.pos_embed.requires_grad
    assert all("pos_embed" not in name for name, _ in model.named_parameters())
    for r, c in [(0, 0), (0, 5), (3, 1), (2, 7)]:
        expected = torch.tensor(sincos_reference(64, r, c))
        torch.testing.assert_close(model.pos_embed[0, r * w + c], expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Rebuilding from the config
# --------------------------------------------------------------------------------------------------


def test_config_and_state_dict_rebuild_the_same_model(make_dit):
    model = make_dit(num_classes=3, learn_sigma=True, image_width=16)
    cfg_dict = json.loads(json.dumps(model.config.to_dict()))  # as it travels in a model file
    rebuilt = DiT(ModelConfig.from_dict(cfg_dict))
    assert rebuilt.config == model.config
    x = torch.randn(3, 3, 8, 16)
    t, y = timesteps_labels(3, 3)
    assert not torch.equal(rebuilt(x, t, y), model(x, t, y))  # fresh init: not yet the same model
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    out = model(x, t, y)
    assert out.abs().max() > 0.1
    assert torch.equal(rebuilt(x, t, y), out)


def test_from_dict_rejects_unknown_fields():
    d = ModelConfig().to_dict() | {"dropout": 0.1}
    with pytest.raises(UsageError, match="dropout"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    "overrides", [{"image_height": 10}, {"hidden_size": 30}, {"in_channels": 0}, {"depth": 0}, {"num_classes": -1}]
)
def test_invalid_configs_raise_usage_error(make_config, overrides):
    with pytest.raises(UsageError):
        DiT(make_config(**overrides))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_classes": 3, "learn_sigma": True}, {"long_skip": True, "depth": 5}, {"long_skip": True, "depth": 1},
     {"in_channels": 1, "patch_size": 1, "image_width": 4, "mlp_ratio": 2.5}],
    ids=["plain", "classes-sigma", "skips-odd-depth", "skips-depth-1", "gray-patch-1-mlp-2.5"],
)
def test_state_dict_shapes_are_those_of_the_built_model(make_config, overrides):
    """Model files are checked against state_dict_shapes, computed without building the model."""
    cfg = make_config(**overrides)
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    assert list(state_dict_shapes(cfg).items()) == list(built.items())


@pytest.mark.parametrize(
    "change, words",
    [
        ({"depth": 10**6}, "model_config.depth must be an integer in [1, 1024], found 1000000"),
        ({"depth": True}, "model_config.depth must be an integer in [1, 1024], found true"),
        ({"depth": 2.0}, "model_config.depth must be an integer in [1, 1024], found 2.0"),
        ({"mlp_ratio": float("nan")}, "model_config.mlp_ratio must be a finite number in (0, 64], found NaN"),
        ({"in_channels": 65}, "model_config.in_channels must be an integer in [1, 64], found 65"),
        ({"long_skip": 1}, "model_config.long_skip must be true or false, found 1"),
        ({"hidden_size": 30}, "model_config.hidden_size: hidden size 30 must be divisible by 4"),
        ({"image_height": 10}, "model_config.patch_size: resolution 10x8 is not a multiple of the patch size 4"),
        ({"image_height": 16384, "image_width": 16384}, "is 16777216 tokens, more than the 65536"),
        ({"dropout": 0.1}, "model_config.dropout is not a known field"),
    ],
)
def test_from_dict_checks_every_field(make_config, change, words):
    d = json.loads(json.dumps(make_config().to_dict())) | change
    with pytest.raises(Invalid) as info:
        ModelConfig.from_dict(d)
    assert words in str(info.value)


# --------------------------------------------------------------------------------------------------
# U-ViT long skips
# --------------------------------------------------------------------------------------------------


def test_long_skip_wiring_matches_a_hand_written_forward(make_dit):
    """depth 4: blocks 2 and 3 take Linear([x, skip]) with skip = output of block 1 and block 0."""
    model = make_dit(depth=4, long_skip=True, num_classes=2)
    D = 32
    skips = [i for i, b in enumerate(model.blocks) if b.skip is not None]
    assert skips == [2, 3]
    sd = model.state_dict()
    assert sd["blocks.2.skip.weight"].shape == (D, 2 * D) and sd["blocks.3.skip.bias"].shape == (D,)
    assert not any(k.startswith(("blocks.0.skip", "blocks.1.skip")) for k in sd)
    plain = make_dit(depth=4, num_classes=2)
    assert len(sd) == len(plain.state_dict()) + 4  # exactly the two skip linears (weight + bias) more

    x = torch.randn(3, 3, 8, 8)
    t, y = timesteps_labels(3, 2)
    tok = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    b = model.blocks
    h0 = b[0](tok, c)
    h1 = b[1](h0, c)
    h2 = b[2](h1, c, h1)
    h3 = b[3](h2, c, h0)
    expected = unpatchify(model.final_layer(h3, c), 4, 2, 2)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-6, atol=1e-6)


def test_long_skip_odd_depth_leaves_a_middle_block(make_dit):
    model = make_dit(depth=5, long_skip=True)
    assert [b.skip is not None for b in model.blocks] == [False, False, False, True, True]
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0.01


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,depth,width,heads,patch",
    [("DiT-S/2", 12, 384, 6, 2), ("DiT-XL/2", 28, 1152, 16, 2), ("DiT-B/4", 12, 768, 12, 4),
     ("DiT-L/8", 24, 1024, 16, 8), ("dit-t/4", 4, 128, 4, 4)],
)
def test_presets(name, depth, width, heads, patch):
    cfg = preset_config(name, image_height=64, image_width=32, in_channels=1)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, patch)
    assert (cfg.image_height, cfg.image_width, cfg.in_channels) == (64, 32, 1)


def test_preset_family_and_errors():
    assert len(PRESETS) == 7 * 3
    with pytest.raises(UsageError, match="unknown model preset"):
        preset_config("DiT-XXL/2")
    with pytest.raises(UsageError, match="multiple of the patch size"):
        preset_config("DiT-S/8", image_height=28, image_width=28)


def test_tiny_preset_builds_and_counts_parameters():
    """DiT-T/4 on 16x16 RGB: the parameter count from the architecture, written out by hand."""
    cfg = preset_config("DiT-T/4", image_height=16, image_width=16, num_classes=10)
    model = DiT(cfg)
    D, p, C, depth, hidden = 128, 4, 3, 4, 512
    embed = D * C * p * p + D
    t_emb = (256 * D + D) + (D * D + D)
    y_emb = (10 + 1) * D
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D) + (D * 6 * D + 6 * D)
    final = (D * 2 * D + 2 * D) + (D * p * p * C + p * p * C)
    assert sum(x.numel() for x in model.parameters()) == embed + t_emb + y_emb + depth * block + final
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0.0, 999.0]), torch.tensor([3, 10]))
    assert out.shape == (2, 3, 16, 16)
