"""Latent models end to end (train --autoencoder, the latent cache, model files that embed a decoder,
sample and info), with a tiny random autoencoder (f=2) on 16x16 images: the numbers are checked
against the autoencoder and DiT called directly, not just the shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli.models.autoencoder import AutoencoderConfig, AutoencoderKL
from diffcli.files.autoencoder_file import load_autoencoder, save_autoencoder
from diffcli.files.checkpoint import load_model, read_header
from diffcli.cli import app

runner = CliRunner()
TINY_AE = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)  # f = 2: 16x16x3 -> 8x8x4
TRAIN = ["--model", "DiT-T/2", "--resolution", "16", "--batch-size", "4", "--warmup-steps", "1",
         "--sample-every", "0", "--checkpoint-every", "2", "--device", "cpu"]


def make_ae(path: Path, seed: int = 0, scaling_factor: float | None = None, **cfg) -> Path:
    torch.manual_seed(seed)
    model = AutoencoderKL(AutoencoderConfig(**{**TINY_AE.to_dict(), **cfg}) if cfg else TINY_AE)
    save_autoencoder(path, model, scaling_factor)
    return path


@pytest.fixture()
def setup(tmp_path, toy_image_folder):
    data = toy_image_folder(classes=("red", "blue"), per_class=4, size=16)
    return data, make_ae(tmp_path / "ae.safetensors")


def train(data: Path, ae: Path, out: Path, *extra: str, steps: int = 4):
    return runner.invoke(app, ["train", str(data), "--autoencoder", str(ae), "--out", str(out), *TRAIN,
                               "--steps", str(steps), *extra])


def test_latent_run_caches_posteriors_and_embeds_the_decoder(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    r = train(data, ae_path, run, "--flip")
    assert r.exit_code == 0, r.output
    assert "encoding 8 images and their mirror images" in r.stderr

    # the cache holds the posterior of every image and of its mirror image, as the autoencoder gives it
    from diffcli.data.folder import load_folder
    from diffcli.data.latents import measured_scale

    ae = load_autoencoder(ae_path)
    pixels = load_folder(data, (16, 16), "3").pixels
    with torch.no_grad():
        q = ae.model.encode(pixels.float() / 127.5 - 1)
        qf = ae.model.encode(pixels.flip(-1).float() / 127.5 - 1)
    header, raw = read_header(run / "latents.safetensors", "diffcli.latents")
    from safetensors.torch import load

    cache = load(raw)
    assert cache["mean"].shape == (16, 4, 8, 8) and cache["mean"].dtype == torch.float16
    assert torch.allclose(cache["mean"][:8].float(), q.mean, atol=2e-3)
    assert torch.allclose(cache["mean"][8:].float(), qf.mean, atol=2e-3)
    assert torch.allclose(cache["logvar"][:8].float(), q.logvar, atol=1e-2)
    # the scale: 1 / std of posterior samples = 1 / sqrt(Var(mean) + E[var]), computed here independently
    m, v = torch.cat([q.mean, qf.mean]).double(), torch.cat([q.logvar, qf.logvar]).double().exp()
    expected = 1 / math.sqrt(float(((m - m.mean()) ** 2).mean() + v.mean()))
    assert float(header.meta["scaling_factor"]) == pytest.approx(expected, rel=2e-3)
    assert measured_scale(cache["mean"], cache["logvar"]) == pytest.approx(expected, rel=2e-3)

    # the model file: a DiT over 4x8x8 latents, the decoder's tensors under autoencoder.*, and its metadata
    mf = load_model(run / "model.safetensors")
    assert (mf.config.in_channels, mf.config.image_height, mf.config.image_width) == (4, 8, 8)
    assert mf.image_shape == (3, 16, 16)
    assert mf.latent.sha256 == ae.sha256 and mf.latent.name == "ae.safetensors"
    assert mf.latent.scaling_factor == pytest.approx(expected, rel=2e-3)
    for k, v in ae.model.state_dict().items():
        if k.startswith("decoder."):
            assert torch.equal(mf.decoder.state_dict()[k], v)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # LatentDecoder divides by the scale, then decodes
        assert torch.allclose(mf.decoder(z), ae.model.decode(z / mf.latent.scaling_factor), atol=1e-6)


def test_sample_decodes_with_the_embedded_decoder(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    assert train(data, ae_path, run).exit_code == 0
    out = tmp_path / "s"
    r = runner.invoke(app, ["sample", "-c", str(run / "model.safetensors"), "-n", "2", "--class", "blue", "--seed", "3",
                            "--steps", "4", "--sampler", "ddim", "-o", str(out), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    images = [x for x in recs if x["kind"] == "image"]
    assert images[0]["autoencoder"]["name"] == "ae.safetensors" and images[0]["autoencoder"]["decoder"] == "embedded"
    assert images[0]["width"] == 16 and images[0]["clip"] is False
    png = Image.open(images[0]["path"])
    assert png.size == (16, 16) and png.mode == "RGB"

    # the same image by hand: the sampler over latents with the DiT, then the autoencoder file's decoder
    from diffcli.diffusion.samplers import sample
    from diffcli.files.images import to_uint8

    mf = load_model(run / "model.safetensors")
    ae = load_autoencoder(ae_path)
    res = sample(mf.model, mf.schedule, (4, 8, 8), 4, "ddim", seeds=[3], labels=torch.tensor([mf.class_names.index("blue")]),
                 null_label=mf.model.null_class, guidance=1.5, prediction=mf.prediction, spacing="trailing",
                 clip_x0=None)
    with torch.no_grad():
        by_hand = to_uint8(ae.model.decode(res.images / mf.latent.scaling_factor).clamp(-1, 1))[0]
    got = torch.frombuffer(bytearray(png.tobytes()), dtype=torch.uint8).reshape(16, 16, 3)
    assert (got.int() - by_hand.int()).abs().max() <= 1

    # --decoder: the same autoencoder gives the same pixels; another compatible one, other pixels
    other = make_ae(tmp_path / "other.safetensors", seed=5)
    for dec, same in ((ae_path, True), (other, False)):
        o = tmp_path / f"d-{dec.stem}"
        r2 = runner.invoke(app, ["sample", "-c", str(run / "model.safetensors"), "-n", "1", "--class", "blue", "--seed", "3",
                                 "--steps", "4", "--sampler", "ddim", "-o", str(o), "--decoder", str(dec), "--device", "cpu"])
        assert r2.exit_code == 0, r2.output
        px = Image.open(next(o.iterdir())).tobytes()
        assert (px == png.tobytes()) == same


def test_info_says_the_model_is_latent(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    assert train(data, ae_path, run).exit_code == 0
    r = runner.invoke(app, ["info", str(run / "model.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["model_kind"] == "latent class-conditional"
    assert info["image_size"] == [16, 16] and info["channels"] == 3
    assert info["autoencoder"]["factor"] == 2 and info["autoencoder"]["latent_size"] == [4, 8, 8]
    assert info["autoencoder"]["sha256"] == load_autoencoder(ae_path).sha256
    text = runner.invoke(app, ["info", str(run / "model.safetensors")])
    assert "latent" in text.stdout and "4x8x8" in text.stdout


def test_latent_resume_is_exact_and_reuses_the_cache(tmp_path, setup):
    data, ae_path = setup
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(data, ae_path, straight, "--flip", steps=4).exit_code == 0
    assert train(data, ae_path, split, "--flip", steps=2).exit_code == 0
    r = train(data, ae_path, split, "--flip", steps=4)
    assert r.exit_code == 0, r.output
    assert "read from" in r.stderr and "encoding" not in r.stderr
    a, b = load_model(straight / "model.safetensors"), load_model(split / "model.safetensors")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_the_imported_scale_is_used_as_it_is(tmp_path, toy_image_folder):
    data = toy_image_folder(classes=("red", "blue"), per_class=4, size=16)
    ae = make_ae(tmp_path / "sd-like.safetensors", scaling_factor=0.18215)
    assert train(data, ae, tmp_path / "run", steps=1).exit_code == 0
    assert load_model(tmp_path / "run" / "model.safetensors").latent.scaling_factor == 0.18215


def test_a_cache_left_by_a_killed_run_is_rebuilt(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    run.mkdir()
    half = run / ".latents.safetensors.abcd1234.tmp"  # what a SIGKILL during the atomic write leaves
    half.write_bytes(b"\0" * 100)
    r = train(data, ae_path, run, steps=1)
    assert r.exit_code == 0, r.output
    assert "encoding" in r.stderr and not half.exists() and (run / "latents.safetensors").exists()


# --------------------------------------------------------------------------------------------------
# Bad input: one line, the documented exit code, nothing written
# --------------------------------------------------------------------------------------------------


def _one_error_line(r, *words: str) -> None:
    lines = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], lines[0]


def test_stale_or_truncated_cache_is_refused(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    assert train(data, ae_path, run, steps=2).exit_code == 0
    cache = run / "latents.safetensors"
    before = cache.read_bytes()
    # another autoencoder with the same run folder (its checkpoint would resume on other latents)
    other = make_ae(tmp_path / "other.safetensors", seed=9)
    r = train(data, other, run, steps=3)
    assert r.exit_code == 4
    _one_error_line(r, str(cache), "stale", "delete it")
    assert cache.read_bytes() == before
    # truncated
    cache.write_bytes(before[: len(before) // 2])
    r = train(data, ae_path, run, steps=3)
    assert r.exit_code == 4
    _one_error_line(r, str(cache), "truncated", "delete it")
    assert len(cache.read_bytes()) == len(before) // 2


def test_bad_files_for_latent_models(tmp_path, setup, make_dit):
    data, ae_path = setup
    run = tmp_path / "run"
    assert train(data, ae_path, run, steps=1).exit_code == 0
    model = run / "model.safetensors"

    # a model file given as --autoencoder, an autoencoder file given to sample -c
    r = train(data, model, tmp_path / "r2", steps=1)
    assert r.exit_code == 4
    _one_error_line(r, str(model), "not a diffcli autoencoder file")
    assert not (tmp_path / "r2" / "model.safetensors").exists()
    r = runner.invoke(app, ["sample", "-c", str(ae_path), "-o", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 4
    _one_error_line(r, str(ae_path))
    assert not (tmp_path / "s").exists()

    # an autoencoder whose channels differ from the data's
    r = train(data, ae_path, tmp_path / "r3", "--channels", "1", steps=1)
    assert r.exit_code == 4
    _one_error_line(r, str(ae_path), "3-channel", "--channels is 1")

    # a --decoder for another latent space, --decoder with a pixel model, editing a latent model
    wide = make_ae(tmp_path / "wide.safetensors", latent_channels=8)
    r = runner.invoke(app, ["sample", "-c", str(model), "-o", str(tmp_path / "s4"), "--decoder", str(wide), "--device", "cpu"])
    assert r.exit_code == 4
    _one_error_line(r, str(wide), "8-channel")
    assert not (tmp_path / "s4").exists()
    from diffcli.files.checkpoint import save_model
    from diffcli.diffusion.schedule import NoiseSchedule

    pixel = tmp_path / "pixel.safetensors"
    save_model(pixel, make_dit(), NoiseSchedule("cosine", 100), "v", [])
    r = runner.invoke(app, ["sample", "-c", str(pixel), "-o", str(tmp_path / "s5"), "--decoder", str(ae_path), "--device", "cpu"])
    assert r.exit_code == 2
    _one_error_line(r, "--decoder", "pixels")
    img = tmp_path / "init.png"
    Image.new("RGB", (16, 16)).save(img)
    r = runner.invoke(app, ["sample", "-c", str(model), "--init-image", str(img), "-o", str(tmp_path / "s6"), "--device", "cpu"])
    assert r.exit_code == 2
    _one_error_line(r, "latent model", "--init-image")

    # --crop random: each image is encoded once
    r = train(data, ae_path, tmp_path / "r7", "--crop", "random", steps=1)
    assert r.exit_code == 2
    _one_error_line(r, "--crop random", "--autoencoder")


def test_a_model_file_whose_autoencoder_metadata_disagrees_is_refused(tmp_path, setup):
    data, ae_path = setup
    run = tmp_path / "run"
    assert train(data, ae_path, run, steps=1).exit_code == 0
    from safetensors.torch import load_file, save_file

    src = run / "model.safetensors"
    meta = read_header(src, "diffcli.model")[0].meta
    tensors = load_file(src)
    ae_meta = json.loads(meta["autoencoder"])
    ae_meta["config"]["latent_channels"] = 3
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad, metadata={**meta, "autoencoder": json.dumps(ae_meta)})
    r = runner.invoke(app, ["sample", "-c", str(bad), "-o", str(tmp_path / "s"), "--device", "cpu"])
    assert r.exit_code == 4
    _one_error_line(r, str(bad), "latent_channels is 3", "in_channels 4")
    # a decoder tensor missing
    del tensors["autoencoder.decoder.conv_out.bias"]
    save_file(tensors, bad, metadata=meta)
    r = runner.invoke(app, ["info", str(bad)])
    assert r.exit_code == 4
    _one_error_line(r, "autoencoder.decoder.conv_out.bias", "missing")


@pytest.mark.slow
def test_two_process_latent_ddp_matches_one_process(tmp_path, setup):
    """Under torchrun, process 0 encodes the cache while the other waits at a barrier and reads it; both
    draw their slice of the same global batch, so the run equals a one-process run."""
    import subprocess
    import sys

    from test_training import assert_same_training, subprocess_env

    data, ae_path = setup
    common = ["train", str(data), "--autoencoder", str(ae_path), *TRAIN, "--steps", "3", "--flip", "--quiet",
              "--batch-size", "6", "--class-dropout", "0.3"]
    env = subprocess_env()
    single = subprocess.run([sys.executable, "-m", "diffcli", *common, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "-m", "diffcli", *common, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from safetensors import safe_open

    caches = []
    for run in ("single", "ddp"):
        with safe_open(tmp_path / run / "latents.safetensors", "pt") as f:
            caches.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    assert caches[0][0] == caches[1][0]  # the same images, autoencoder and scale
    assert all(torch.equal(caches[0][1][k], caches[1][1][k]) for k in ("mean", "logvar"))
    a = load_model(tmp_path / "single" / "model.safetensors")
    b = load_model(tmp_path / "ddp" / "model.safetensors")
    assert_same_training(a.model.state_dict(), b.model.state_dict())
    assert a.latent == b.latent
