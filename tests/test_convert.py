"""convert: diffusers folders (written by hand, with old attention names, in a pipeline's vae/, and by
diffusers' own save_pretrained) and latent-diffusion single files (bare and inside a whole SD
checkpoint), named here by a mapping written independently of convert.py's table; each import checked
by its numbers against the original model. Then every refusal: the class, the file or tensor named,
and nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffcli.models.autoencoder import AutoencoderConfig, AutoencoderKL
from diffcli.files.autoencoder_file import load_autoencoder, save_autoencoder
from diffcli.files.convert import convert_autoencoder, import_autoencoder
from diffcli.errors import InputError, OutputExistsError, UsageError

CFG = AutoencoderConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4)  # f = 4


def random_ae(cfg: AutoencoderConfig = CFG, seed: int = 0) -> AutoencoderKL:
    """Every parameter N(0, 0.1^2) away from its init, so GroupNorm affines and biases matter too."""
    torch.manual_seed(seed)
    model = AutoencoderKL(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def outputs(model: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mean = model.encode(X).mean
        return mean, model.decode(mean)


def assert_same_numbers(a: AutoencoderKL, b: AutoencoderKL) -> None:
    (ma, da), (mb, db) = outputs(a), outputs(b)
    assert da.abs().mean() > 0.05  # not trivially small
    torch.testing.assert_close(mb, ma, rtol=0, atol=1e-5)
    torch.testing.assert_close(db, da, rtol=0, atol=1e-5)


def diffusers_config(cfg: AutoencoderConfig, **extra) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0", "act_fn": "silu",
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "latent_channels": cfg.latent_channels, "block_out_channels": list(cfg.block_out_channels),
            "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "sample_size": 16, "scaling_factor": 0.5, "force_upcast": True, **extra}


def diffusers_folder(folder: Path, model: AutoencoderKL, state: dict | None = None, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_config(model.config, **config)))
    save_file(state if state is not None else model.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    return folder


# Latent-diffusion names, written out here as substitutions on our names (convert.py goes the other
# way with a prefix table): the decoder's up.{k} counts levels by resolution, up_blocks.{i} in running order.
def ldm_name(name: str, levels: int) -> str:
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}."
                            + (f"block.{m[3]}." if m[2] == "resnets" else "upsample."), name)
    for pattern, repl in [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    ]:
        name = re.sub(pattern, repl, name)
    return name


def ldm_state(model: AutoencoderKL, prefix: str = "") -> dict[str, torch.Tensor]:
    levels = len(model.config.block_out_channels)
    out = {}
    for k, v in model.state_dict().items():
        if re.search(r"attentions\.0\.to_(q|k|v|out\.0)\.weight$", k):
            v = v[:, :, None, None]  # latent diffusion's attention projections are 1x1 convs
        out[prefix + ldm_name(k, levels)] = v.clone()
    return out


def test_the_independent_mapping_gives_the_names_sd_files_use():
    names = set(ldm_state(random_ae(AutoencoderConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=2,
                                                      norm_num_groups=4))))
    # as in Stable Diffusion's first_stage_model (4 levels, 2 resnets, 3 in the decoder)
    for name in ["encoder.down.0.block.1.conv2.weight", "encoder.down.1.block.0.nin_shortcut.weight",
                 "encoder.down.2.downsample.conv.weight", "encoder.mid.attn_1.proj_out.weight",
                 "decoder.up.3.block.2.norm1.bias", "decoder.up.1.upsample.conv.bias",
                 "decoder.up.0.block.0.nin_shortcut.weight", "decoder.norm_out.weight", "post_quant_conv.bias"]:
        assert name in names
    assert "decoder.up.0.upsample.conv.weight" not in names and "encoder.down.3.downsample.conv.weight" not in names


# --------------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------------


def test_diffusers_folder_written_by_hand(tmp_path):
    model = random_ae()
    src = diffusers_folder(tmp_path / "vae", model)
    out = tmp_path / "ae.safetensors"
    summary = convert_autoencoder(src, out)
    f = load_autoencoder(out)
    assert_same_numbers(model, f.model)
    assert f.config == CFG and f.scaling_factor == 0.5
    assert summary["layout"] == "diffusers" and summary["scaling_factor"] == 0.5
    assert summary["tensors"] == len(model.state_dict())
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert summary["sha256"] == f.sha256 and summary["out"] == str(out) and summary["config"] == CFG.to_dict()
    assert f.source["layout"] == "diffusers" and f.source["sha256"] == summary["source_sha256"]


def test_pipeline_folder_fp16_old_attention_names_and_scaling_override(tmp_path):
    cfg = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, latent_channels=3,
                            use_quant_conv=False)
    model = random_ae(cfg, seed=3)
    old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    state = {}
    for k, v in model.state_dict().items():
        for new, was in old.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{was}")
        state[k] = v.half()
    assert any(".query." in k for k in state)
    pipe = tmp_path / "pipeline"
    diffusers_folder(pipe / "vae", model, state, use_quant_conv=False)
    (pipe / "model_index.json").write_text("{}")
    loaded, scale, source = import_autoencoder(pipe, scaling_factor=0.25)
    assert scale == 0.25 and source["layout"] == "diffusers"
    assert loaded.config == cfg and loaded.quant_conv is None
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    half = random_ae(cfg, seed=3)
    half.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    assert_same_numbers(half, loaded)


def test_diffusers_save_pretrained(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    model = random_ae()
    n = len(CFG.block_out_channels)
    theirs = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=CFG.block_out_channels,
        layers_per_block=CFG.layers_per_block, latent_channels=4, norm_num_groups=4, scaling_factor=0.3)
    theirs.load_state_dict(model.state_dict(), strict=True)
    theirs.save_pretrained(tmp_path / "saved", safe_serialization=True)
    summary = convert_autoencoder(tmp_path / "saved", tmp_path / "ae.safetensors")
    f = load_autoencoder(tmp_path / "ae.safetensors")
    assert summary["scaling_factor"] == pytest.approx(0.3) and f.config == CFG
    assert_same_numbers(model, f.model)
    with torch.no_grad():  # and against diffusers itself
        torch.testing.assert_close(f.model.decode(f.model.encode(X).mean),
                                   theirs.decode(theirs.encode(X).latent_dist.mean).sample, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# latent-diffusion single files
# --------------------------------------------------------------------------------------------------


def test_ldm_single_file(tmp_path):
    model = random_ae()
    save_file(ldm_state(model), tmp_path / "vae.safetensors")
    summary = convert_autoencoder(tmp_path / "vae.safetensors", tmp_path / "ae.safetensors", norm_num_groups=4)
    f = load_autoencoder(tmp_path / "ae.safetensors")
    assert f.config == CFG and f.scaling_factor is None and summary["scaling_factor"] is None
    assert summary["layout"] == "ldm" and summary["ignored_tensors"] == 0
    assert_same_numbers(model, f.model)


def test_whole_sd_checkpoint_takes_only_first_stage_model(tmp_path):
    cfg = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4, mid_attention=False)
    model = random_ae(cfg, seed=5)
    state = ldm_state(model, "first_stage_model.") | {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
        "model.diffusion_model.out.2.bias": torch.randn(4),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              tmp_path / "sd.safetensors")
    summary = convert_autoencoder(tmp_path / "sd.safetensors", tmp_path / "ae.safetensors",
                                  scaling_factor=0.18215, norm_num_groups=4)
    assert summary["ignored_tensors"] == 3 and summary["scaling_factor"] == 0.18215
    f = load_autoencoder(tmp_path / "ae.safetensors")
    assert f.config == cfg and f.model.encoder.mid_block.attentions is None
    rounded = random_ae(cfg)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert_same_numbers(rounded, f.model)
    assert f.source == {"layout": "ldm", "name": "sd.safetensors", "sha256": summary["source_sha256"],
                        "ignored_tensors": 3}


def test_ldm_group_count_is_not_in_the_file(tmp_path):
    save_file(ldm_state(random_ae()), tmp_path / "vae.safetensors")
    with pytest.raises(InputError, match=r"vae\.safetensors.*norm_num_groups 32 does not divide.*pass norm_num_groups"):
        import_autoencoder(tmp_path / "vae.safetensors")


# --------------------------------------------------------------------------------------------------
# Refusals: the class, the name, nothing written
# --------------------------------------------------------------------------------------------------


def refused(tmp_path: Path, src: Path, error: type, *patterns: str, **kw) -> str:
    before = sorted(p.name for p in tmp_path.rglob("*"))
    out = tmp_path / "out.safetensors"
    with pytest.raises(error) as e:
        convert_autoencoder(src, out, **kw)
    message = str(e.value)
    assert "\n" not in message
    for p in patterns:
        assert p in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no output, no temporary file
    return message


def test_pickle_files_are_refused_unopened(tmp_path):
    torch.save(random_ae().state_dict(), tmp_path / "vae.pt")
    torch.save({"state_dict": ldm_state(random_ae())}, tmp_path / "sd.ckpt")
    refused(tmp_path, tmp_path / "vae.pt", InputError, "vae.pt is a PyTorch pickle file", "only .safetensors")
    refused(tmp_path, tmp_path / "sd.ckpt", InputError, "sd.ckpt is a PyTorch pickle file")
    # by its first bytes, whatever its name
    (tmp_path / "vae.pt").rename(tmp_path / "renamed.safetensors")
    refused(tmp_path, tmp_path / "renamed.safetensors", InputError, "renamed.safetensors holds a zip archive")
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(CFG)))
    torch.save({}, folder / "diffusion_pytorch_model.bin")
    refused(tmp_path, folder, InputError, "diffusion_pytorch_model.bin is a PyTorch pickle file")


def test_folder_without_config_or_weights(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    save_file(random_ae().state_dict(), folder / "diffusion_pytorch_model.safetensors")
    refused(tmp_path, folder, InputError, f"{folder} has no config.json")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(diffusers_config(CFG)))
    refused(tmp_path, folder, InputError, f"{folder} has no diffusion_pytorch_model.safetensors")
    refused(tmp_path, tmp_path / "nowhere.safetensors", InputError, "nowhere.safetensors")


def test_unknown_missing_and_misshapen_tensors_are_named(tmp_path):
    model = random_ae()
    state = model.state_dict()
    extra = diffusers_folder(tmp_path / "extra", model, state | {"encoder.lora_up.weight": torch.zeros(2)})
    refused(tmp_path, extra, InputError, "diffusion_pytorch_model.safetensors", "1 unknown: encoder.lora_up.weight",
            "nothing was written")
    missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}
    refused(tmp_path, diffusers_folder(tmp_path / "missing", model, missing), InputError,
            "1 missing: decoder.up_blocks.1.resnets.0.conv2.bias")
    wrong = state | {"encoder.conv_in.bias": torch.zeros(9)}
    refused(tmp_path, diffusers_folder(tmp_path / "wrong", model, wrong), InputError,
            "encoder.conv_in.bias [9] (needs [8])")
    # in a latent-diffusion file the names are the file's own, prefix included
    sd = ldm_state(model, "first_stage_model.")
    del sd["first_stage_model.decoder.up.0.block.1.norm2.weight"]
    sd["first_stage_model.encoder.down.0.attn.0.q.weight"] = torch.zeros(8, 8, 1, 1)
    save_file(sd, tmp_path / "sd.safetensors")
    refused(tmp_path, tmp_path / "sd.safetensors", InputError, "sd.safetensors",
            "1 unknown: first_stage_model.encoder.down.0.attn.0.q.weight",
            "1 missing: first_stage_model.decoder.up.0.block.1.norm2.weight", norm_num_groups=4)


def test_many_bad_tensors_are_listed_on_one_line(tmp_path):
    state = ldm_state(random_ae()) | {f"loss.discriminator.{i}.weight": torch.zeros(1) for i in range(25)}
    save_file(state, tmp_path / "vae.safetensors")
    message = refused(tmp_path, tmp_path / "vae.safetensors", InputError, "25 unknown", "loss.discriminator.0.weight",
                      "and 15 more", norm_num_groups=4)
    assert "loss.discriminator.24.weight" not in message


def test_non_finite_and_integer_weights(tmp_path):
    state = ldm_state(random_ae())
    state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, tmp_path / "nan.safetensors")
    refused(tmp_path, tmp_path / "nan.safetensors", InputError, "nan.safetensors", "decoder.conv_out.weight",
            "NaN", norm_num_groups=4)
    state = ldm_state(random_ae()) | {"quant_conv.bias": torch.zeros(8, dtype=torch.int64)}
    save_file(state, tmp_path / "int.safetensors")
    refused(tmp_path, tmp_path / "int.safetensors", InputError, "quant_conv.bias is int64", norm_num_groups=4)


def test_out_exists(tmp_path):
    model = random_ae()
    src = diffusers_folder(tmp_path / "vae", model)
    out = tmp_path / "ae.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="ae.safetensors exists") as e:
        convert_autoencoder(src, out)
    assert e.value.exit_code == 3 and out.read_bytes() == b"keep me"
    # checked before any reading: even a bad source gives exit 3
    with pytest.raises(OutputExistsError):
        convert_autoencoder(tmp_path / "nowhere", out)
    convert_autoencoder(src, out, overwrite=True)
    assert_same_numbers(model, load_autoencoder(out).model)


def test_junk_and_truncated_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file at all")
    refused(tmp_path, tmp_path / "junk.safetensors", InputError, "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"{}")
    refused(tmp_path, tmp_path / "tiny.safetensors", InputError, "tiny.safetensors is not a safetensors file")
    save_file(ldm_state(random_ae()), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "whole.safetensors").unlink()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    refused(tmp_path, tmp_path / "cut.safetensors", InputError, "cut.safetensors is truncated")
    save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    refused(tmp_path, tmp_path / "other.safetensors", InputError, "other.safetensors holds no latent-diffusion")
    save_file(random_ae().state_dict(), tmp_path / "diffusers.safetensors")
    refused(tmp_path, tmp_path / "diffusers.safetensors", InputError, "holds diffusers names")


@pytest.mark.parametrize("change, named", [
    ({"norm_num_groups": -3}, "config.norm_num_groups must be an integer"),
    ({"layers_per_block": True}, "config.layers_per_block must be an integer"),
    ({"block_out_channels": [8, 10, 16]}, "norm_num_groups 4 does not divide the width 10"),
    ({"mid_block_add_attention": "yes"}, "config.mid_block_add_attention must be true or false"),
    ({"scaling_factor": 0}, "config.scaling_factor must be a finite number in (0, "),
    ({"act_fn": "gelu"}, "config.act_fn must be one of"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
     "config.down_block_types is"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "config.up_block_types has 2 entries"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderKL only"),
])
def test_bad_config_values(tmp_path, change, named):
    src = diffusers_folder(tmp_path / "vae", random_ae())
    (src / "config.json").write_text(json.dumps(diffusers_config(CFG, **change)))
    refused(tmp_path, src, InputError, str(src / "config.json"), named)


def test_config_json_that_is_not_json(tmp_path):
    src = diffusers_folder(tmp_path / "vae", random_ae())
    (src / "config.json").write_text("{not json")
    refused(tmp_path, src, InputError, "config.json", "not valid JSON")


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_scaling_factor_is_a_usage_error(tmp_path, scale):
    src = diffusers_folder(tmp_path / "vae", random_ae())
    refused(tmp_path, src, UsageError, "scaling factor", scaling_factor=scale)


def test_norm_num_groups_must_agree_with_a_diffusers_config(tmp_path):
    src = diffusers_folder(tmp_path / "vae", random_ae())
    refused(tmp_path, src, UsageError, "norm_num_groups 8 disagrees", str(src / "config.json"), norm_num_groups=8)


def test_writing_over_the_source_is_refused(tmp_path):
    save_file(ldm_state(random_ae()), tmp_path / "vae.safetensors")
    before = (tmp_path / "vae.safetensors").read_bytes()
    with pytest.raises(UsageError, match="is the file being converted"):
        convert_autoencoder(tmp_path / "vae.safetensors", tmp_path / "vae.safetensors", overwrite=True)
    assert (tmp_path / "vae.safetensors").read_bytes() == before


def test_a_diffcli_autoencoder_file_is_not_an_ldm_file(tmp_path):
    save_autoencoder(tmp_path / "mine.safetensors", random_ae())
    refused(tmp_path, tmp_path / "mine.safetensors", InputError, "mine.safetensors holds diffusers names")


def test_the_command_converts_and_refuses_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from diffcli.cli import app
    from diffcli.records import check

    model = random_ae()
    src = diffusers_folder(tmp_path / "vae", model, scaling_factor=0.5)
    runner = CliRunner()
    out = tmp_path / "ae.safetensors"
    r = runner.invoke(app, ["convert-autoencoder", str(src), str(out), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    check("convert-autoencoder", rec)
    assert rec["layout"] == "diffusers" and rec["scaling_factor"] == 0.5 and rec["out"] == str(out)
    assert_same_numbers(model, load_autoencoder(out).model)
    # a pickle: exit 4, one line naming it, nothing written
    pt = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {}}, pt)
    r = runner.invoke(app, ["convert-autoencoder", str(pt), str(tmp_path / "x.safetensors")])
    assert r.exit_code == 4 and r.stderr.count("\n") == 1 and str(pt) in r.stderr and "pickle" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
    # OUT exists: exit 3
    r = runner.invoke(app, ["convert-autoencoder", str(src), str(out), "--scaling-factor", "0.2"])
    assert r.exit_code == 3 and "exists" in r.stderr
