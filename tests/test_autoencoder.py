"""autoencoder and autoencoder_file: parity with diffusers' AutoencoderKL (when installed) at f=4 and
f=8; the posterior against closed forms; presets, shapes and a hand count of FLOPs; config validation
naming the field; the file round trip and the refusal of files that are not autoencoder files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffcli.models.autoencoder import (
    AE_PRESETS,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    ae_preset_config,
    count_flops,
    tensor_shapes,
)
from diffcli.files.autoencoder_file import (
    AE_FORMAT,
    load_autoencoder,
    read_autoencoder_spec,
    save_autoencoder,
)
from diffcli.files.checkpoint import save_model, write
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.errors import InputError
from diffcli.validate import Invalid


def normal_weights(model: AutoencoderKL, seed: int, std: float = 0.05) -> AutoencoderKL:
    """Every parameter from N(0, std^2), GroupNorm scales from N(1, std^2): outputs of order one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = name.endswith("weight") and p.dim() == 1  # a GroupNorm's gamma
            p.copy_(float(scale) + torch.randn(p.shape, generator=g) * std)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("widths, factor", [((32, 64, 64), 4), ((32, 64, 64, 64), 8)])
def test_parity_with_diffusers(widths, factor):
    diffusers = pytest.importorskip("diffusers")
    cfg = AutoencoderConfig(block_out_channels=widths, layers_per_block=2, norm_num_groups=32)
    ours = normal_weights(AutoencoderKL(cfg), seed=factor)
    n = len(widths)
    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=widths, layers_per_block=2,
        latent_channels=4, norm_num_groups=32).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the same names, nothing renamed
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        q, dist = ours.encode(x), theirs.encode(x).latent_dist
        assert q.mean.shape == (2, 4, 32 // factor, 32 // factor)
        z = q.mean + 0.5 * torch.randn(q.mean.shape, generator=torch.Generator().manual_seed(1))
        mine, ref = ours.decode(z), theirs.decode(z).sample
    assert q.mean.std() > 0.05 and mine.std() > 0.2  # numbers well away from zero, not a trivial match
    assert (q.mean - dist.mean).abs().max() <= 1e-4
    assert (q.logvar - dist.logvar).abs().max() <= 1e-4
    assert (mine - ref).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------------


def test_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g) * 2
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(mu, s^2) || N(0, 1)) = log(1 / s) + (s^2 + mu^2) / 2 - 1 / 2, element by element, in float64
    s = torch.exp(logvar.double() / 2)
    want = (torch.log(1 / s) + (s**2 + mean.double() ** 2) / 2 - 0.5).flatten(1).sum(1)
    torch.testing.assert_close(q.kl().double(), want, rtol=1e-5, atol=1e-4)
    other = torch.distributions.kl_divergence(torch.distributions.Normal(mean, logvar.mul(0.5).exp()),
                                              torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), other, rtol=1e-5, atol=1e-4)
    # the prior itself is at distance zero
    assert q.kl().min() > 0 and DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_sample_statistics_and_seeding():
    moments = torch.cat([torch.full((1, 4, 128, 128), 0.7), torch.full((1, 4, 128, 128), math.log(0.25))], dim=1)
    q = DiagonalGaussian(moments)
    z = q.sample(torch.Generator().manual_seed(3))
    assert z.shape == (1, 4, 128, 128)
    assert abs(z.mean().item() - 0.7) < 0.01 and abs(z.std().item() - 0.5) < 0.01  # 65536 draws: se 0.002
    torch.testing.assert_close(q.sample(torch.Generator().manual_seed(3)), z, rtol=0, atol=0)
    assert not torch.equal(q.sample(torch.Generator().manual_seed(4)), z)
    assert torch.equal(q.mode(), q.mean) and torch.allclose(q.std, torch.full_like(q.std, 0.5))


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.tensor([[0.0, 1.0, -100.0, 50.0]]).view(1, 4, 1, 1))
    assert q.logvar.flatten().tolist() == [-30.0, 20.0]
    assert torch.isfinite(q.std).all() and torch.isfinite(q.kl()).all() and torch.isfinite(q.sample()).all()


# --------------------------------------------------------------------------------------------------
# Presets, shapes, FLOPs
# --------------------------------------------------------------------------------------------------


def test_presets_factors_and_latent_shapes():
    f4, f8 = ae_preset_config("f4"), ae_preset_config("f8", in_channels=1, latent_channels=8)
    assert f4.factor == 4 and f4.latent_shape(32, 32) == (4, 8, 8)
    assert f8.factor == 8 and f8.latent_shape(64, 48) == (8, 8, 6) and f8.out_channels == 1
    assert set(AE_PRESETS) == {"f4", "f8"}
    with pytest.raises(KeyError):
        ae_preset_config("f16")
    with torch.no_grad():
        model = AutoencoderKL(f4).eval()
        q = model.encode(torch.zeros(1, 3, 32, 32))
        assert q.mean.shape == (1, *f4.latent_shape(32, 32)) and model.decode(q.mean).shape == (1, 3, 32, 32)
    shapes = tensor_shapes(f4)
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(tensor_shapes(f4, ("decoder.", "post_quant_conv."))) == set(model.decoder_state())


def test_count_flops_against_a_hand_count():
    # one level of 4 channels, 1x1 -> 1 latent channel: every layer is listed below
    cfg = AutoencoderConfig(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(4,),
                            layers_per_block=1, norm_num_groups=2)
    H = W = 8
    N = H * W

    def conv(cin: int, cout: int, k: int = 3) -> int:
        return 2 * cout * N * cin * k * k  # one multiply-add per weight per output position

    attention = 4 * 2 * N * 4 * 4 + 2 * 2 * N * N * 4  # q, k, v, out projections; q k^T and weights x v
    encoder = conv(1, 4) + 2 * conv(4, 4) + 4 * conv(4, 4) + attention + conv(4, 2) + conv(2, 2, 1)
    decoder = conv(1, 1, 1) + conv(1, 4) + 4 * conv(4, 4) + attention + 2 * 2 * conv(4, 4) + conv(4, 1)
    assert count_flops(cfg, H, W) == (encoder, decoder)


# --------------------------------------------------------------------------------------------------
# AutoencoderConfig.from_dict
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, named", [
    ({"block_out_channels": [32, -64]}, "autoencoder_config.block_out_channels[1] must be an integer"),
    ({"block_out_channels": [0]}, "autoencoder_config.block_out_channels must be an integer in [1, 4096]"),
    ({"block_out_channels": [32] * 7}, "block_out_channels must be a list of 1 to 6 widths"),
    ({"block_out_channels": []}, "block_out_channels must be a list of 1 to 6 widths"),
    ({"block_out_channels": "32,64"}, "block_out_channels must be a list"),
    ({"layers_per_block": True}, "autoencoder_config.layers_per_block must be an integer"),
    ({"latent_channels": 2.0}, "autoencoder_config.latent_channels must be an integer"),
    ({"in_channels": 4}, "autoencoder_config.in_channels must be one of 1, 3"),
    ({"norm_num_groups": 24}, "norm_num_groups 24 does not divide the width 32"),
    ({"mid_attention": 1}, "autoencoder_config.mid_attention must be true or false"),
    ({"heads": 4}, "autoencoder_config.heads is not a known field"),
])
def test_config_from_dict_names_the_bad_field(change, named):
    d = ae_preset_config("f4").to_dict() | change
    with pytest.raises(Invalid) as e:
        AutoencoderConfig.from_dict(d)
    assert named in str(e.value)


def test_config_round_trips_through_json():
    cfg = AutoencoderConfig(block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4, mid_attention=False,
                            use_quant_conv=False)
    assert AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --------------------------------------------------------------------------------------------------
# autoencoder_file
# --------------------------------------------------------------------------------------------------

TINY = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def test_file_round_trip(tmp_path):
    model = normal_weights(AutoencoderKL(TINY), seed=1, std=0.1)
    save_autoencoder(tmp_path / "ae.safetensors", model, 0.4, training={"steps": 7}, source={"layout": "ldm"})
    f = load_autoencoder(tmp_path / "ae.safetensors")
    assert f.config == TINY and f.scaling_factor == 0.4 and f.training == {"steps": 7} and f.source == {"layout": "ldm"}
    for k, v in model.state_dict().items():
        assert torch.equal(f.model.state_dict()[k], v)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(f.model.decode(f.model.encode(x).mean), model.decode(model.encode(x).mean))
    spec = read_autoencoder_spec(tmp_path / "ae.safetensors")
    assert spec.config == TINY and spec.weights_dtype == "float32"


def test_fp16_file_loads_as_float32(tmp_path):
    model = normal_weights(AutoencoderKL(TINY), seed=2, std=0.1)
    save_autoencoder(tmp_path / "half.safetensors", model, dtype=torch.float16)
    f = load_autoencoder(tmp_path / "half.safetensors")
    assert f.scaling_factor is None and read_autoencoder_spec(tmp_path / "half.safetensors").weights_dtype == "float16"
    for k, v in model.state_dict().items():
        got = f.model.state_dict()[k]
        assert got.dtype == torch.float32 and torch.equal(got, v.half().float())


def test_files_that_are_not_autoencoders(tmp_path, make_dit):
    save_model(tmp_path / "dit.safetensors", make_dit(), NoiseSchedule("cosine", 500), "v", [])
    with pytest.raises(InputError, match=r"dit\.safetensors is a 'diffcli.model' file, not a diffcli autoencoder"):
        load_autoencoder(tmp_path / "dit.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match=r"plain\.safetensors is a safetensors file without diffcli metadata"):
        load_autoencoder(tmp_path / "plain.safetensors")


def test_a_misshapen_tensor_is_named(tmp_path):
    state = AutoencoderKL(TINY).state_dict()
    state["decoder.conv_in.weight"] = torch.zeros(16, 4, 1, 1)
    meta = {"autoencoder_config": TINY.to_dict(), "scaling_factor": None, "training": {}, "source": {},
            "weights_dtype": "float32"}
    write(tmp_path / "bad.safetensors", state, meta, AE_FORMAT)
    with pytest.raises(InputError, match=r"bad\.safetensors.*tensor decoder\.conv_in\.weight has shape \[16, 4, 1, 1\]"):
        load_autoencoder(tmp_path / "bad.safetensors")
    meta["autoencoder_config"] = TINY.to_dict() | {"norm_num_groups": 3}
    write(tmp_path / "groups.safetensors", AutoencoderKL(TINY).state_dict(), meta, AE_FORMAT)
    with pytest.raises(InputError, match=r"groups\.safetensors has invalid autoencoder metadata.*norm_num_groups 3"):
        read_autoencoder_spec(tmp_path / "groups.safetensors")


def test_a_truncated_file(tmp_path):
    save_autoencoder(tmp_path / "ae.safetensors", AutoencoderKL(TINY))
    data = (tmp_path / "ae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(InputError, match=r"cut\.safetensors is truncated"):
        load_autoencoder(tmp_path / "cut.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:100])
    with pytest.raises(InputError, match=r"head\.safetensors"):
        load_autoencoder(tmp_path / "head.safetensors")
