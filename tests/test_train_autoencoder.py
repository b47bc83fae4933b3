"""`diffcli train-autoencoder` and diffcli.training.autoencoder: the loss and PSNR formulas, the run
folder, exact resume (with and without the discriminator), learning, stops, bad input and --json.

Every run uses a "tiny" preset (widths 8 and 16, f=2, ~20 ms a step at 16x16 on one CPU thread)
registered for the test, on folders of a few smooth 16x16 images made in tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli import records
from diffcli.files import checkpoint
from diffcli.models.autoencoder import AE_PRESETS, AutoencoderKL, DiagonalGaussian, ae_preset_config
from diffcli.files.autoencoder_file import load_autoencoder
from diffcli.cli import app
from diffcli.data.folder import load_folder
from diffcli.errors import Interrupted, UsageError
from diffcli.training.autoencoder import (
    AE_STATE_FORMAT, AETrainConfig, _split, autoencoder_loss, psnr_batch, train_autoencoder,
)

runner = CliRunner()
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    monkeypatch.setitem(AE_PRESETS, "tiny", TINY)


def quiet(_: str) -> None:
    pass


def smooth_folder(root: Path, n: int = 10, size: int = 16, seed: int = 0) -> Path:
    """n RGB PNGs, each a random linear colour gradient plus one soft Gaussian blob: smooth images
    a small autoencoder can learn to reconstruct within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for i in range(n):
        base, dx, dy, blob = (torch.rand(3, 1, 1, generator=g) for _ in range(4))
        cy, cx = torch.rand(2, generator=g)
        bump = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        img = 40 + 100 * base + 60 * (dx * xx + dy * yy) + 50 * (blob - 0.5) * bump
        pixels = img.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
        Image.fromarray(pixels.numpy(), "RGB").save(root / f"{i:03d}.png")
    return root


def cfg(data: Path, out: Path, **overrides) -> AETrainConfig:
    base = dict(data_dir=str(data), out=str(out), preset="tiny", resolution="16", steps=4, batch_size=4, lr=2e-3,
                warmup_steps=2, holdout=2, checkpoint_every=2, sample_every=0, metrics_every=1, device="cpu")
    return AETrainConfig(**{**base, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path, AE_STATE_FORMAT, "autoencoder training checkpoint")[0]


def held_out(data: Path, holdout: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """The uint8 held-out images of a run, found independently of the run itself."""
    pixels = load_folder(data, (size, size), "auto", "center", True).pixels
    train_idx, held_idx = _split(len(pixels), holdout, seed)
    assert sorted(train_idx.tolist() + held_idx.tolist()) == list(range(len(pixels)))
    return pixels[held_idx]


def psnr_of(model: AutoencoderKL, x_u8: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR on [0, 1] of the posterior mean's reconstruction, written out from its definition."""
    with torch.no_grad():
        x = x_u8.double() / 255
        rec = model.decode(model.encode(x_u8.float() / 127.5 - 1).mode()).double()
        rec = ((rec + 1) / 2).clamp(0, 1)
        mse = ((x - rec) ** 2).mean(dim=(1, 2, 3))
        return 10 * torch.log10(1 / mse)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_autoencoder(path).model.state_dict()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


# --------------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_autoencoder_loss_is_per_pixel_error_plus_weighted_kl_per_pixel_value(loss):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, 5, generator=g) * 2 - 1
    x_hat = torch.rand(3, 2, 4, 5, generator=g) * 2 - 1
    kl = torch.rand(3, generator=g) * 100
    w = 0.25
    expected = 0.0
    for i in range(3):  # per image: sum of errors / pixel values + w * KL / pixel values; then the mean
        d = (x_hat[i].double() - x[i].double()).flatten().tolist()
        err = sum(abs(v) if loss == "l1" else v * v for v in d)
        expected += (err + w * float(kl[i])) / 40 / 3
    got = autoencoder_loss(x, x_hat, kl, loss, w)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(autoencoder_loss(x, x_hat, kl, loss, 0.0)) == pytest.approx(
        expected - w * float(kl.double().mean()) / 40, rel=1e-6)


def test_posterior_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    moments = torch.randn(2, 6, 3, 3, generator=g)  # 3 latent channels: mean, then log-variance
    q = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    assert torch.allclose(q.kl(), ref, rtol=1e-5, atol=1e-5)


def test_psnr_batch_is_10_log10_of_one_over_mse_on_0_1():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 1.6 - 0.8  # room for the offsets without clamping
    offsets = torch.tensor([0.1, -0.02, 0.2])  # in [-1, 1]: half that on [0, 1]
    p = psnr_batch(x, x + offsets[:, None, None, None])
    expected = [10 * math.log10(1 / (o / 2) ** 2) for o in offsets.tolist()]  # 0.1 -> 26.02 dB
    assert p.tolist() == pytest.approx(expected, abs=1e-4)
    assert p[0].item() == pytest.approx(26.0206, abs=1e-4)
    # reconstructions are clamped to [-1, 1] first: 3.0 where x is 1 is a perfect pixel
    ones = torch.ones(1, 1, 2, 2)
    assert psnr_batch(ones, torch.full_like(ones, 3.0)).item() > 150
    assert psnr_batch(ones, torch.zeros_like(ones)).item() == pytest.approx(10 * math.log10(4), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------------


def test_run_folder_metrics_preview_model_file_and_psnr(tmp_path):
    data = smooth_folder(tmp_path / "data", n=15)
    run = tmp_path / "run"
    result = train_autoencoder(cfg(data, run, holdout=3, sample_every=2), log=quiet)
    assert (result.steps, result.resumed_from, result.stopped_by) == (4, 0, "steps")
    assert result.model_path == str(run / "model.safetensors") and result.run_dir == str(run)

    config = json.loads((run / "config.json").read_text())
    assert config["train_autoencoder"]["preset"] == "tiny" and config["train_autoencoder"]["steps"] == 4
    assert config["autoencoder_config"]["block_out_channels"] == [8, 16]
    assert config["autoencoder_config"]["in_channels"] == 3 and config["autoencoder_config"]["latent_channels"] == 4

    recs = metrics(run)
    losses = [r for r in recs if "loss" in r]
    psnrs = [r for r in recs if "psnr_holdout" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in losses)
    assert [r["images_seen"] for r in losses] == [4, 8, 12, 16]
    assert [r["step"] for r in psnrs] == [2, 4]  # one per checkpoint
    assert psnrs[-1]["psnr_holdout"] == pytest.approx(result.psnr, abs=1e-4)
    assert psnrs[-1]["psnr_holdout_worst"] <= psnrs[-1]["psnr_holdout"]
    assert result.final_loss == pytest.approx(losses[-1]["loss"])
    assert ckpt_names(run) == ["step_0000002.safetensors", "step_0000004.safetensors"]

    f = load_autoencoder(run / "model.safetensors")
    assert config["parameters"] == sum(p.numel() for p in f.model.parameters())
    assert f.training["steps"] == 4 and f.training["final"] is True
    assert f.training["holdout_images"] == 3 and f.training["dataset_images"] == 15
    assert f.training["psnr_holdout"] == pytest.approx(result.psnr, abs=1e-3)
    # the model file holds the EMA weights of the last checkpoint
    state = read_state(run / "checkpoints" / "step_0000004.safetensors")
    assert_identical(f.model.state_dict(), {k[4:]: v for k, v in state.items() if k.startswith("ema.")})

    held = held_out(data, holdout=3)
    assert held.shape == (3, 3, 16, 16)
    per_image = psnr_of(f.model, held)
    assert float(per_image.mean()) == pytest.approx(result.psnr, abs=1e-3)
    assert float(per_image.min()) == pytest.approx(psnrs[-1]["psnr_holdout_worst"], abs=1e-3)

    # the preview: originals above their reconstructions, 2 px apart, blown up 64 // 16 = 4 times
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    with Image.open(run / "samples" / "step_0000004.png") as im:
        grid = torch.from_numpy(np.array(im.convert("RGB")))
    s, cell = 4, 16 + 2
    assert grid.shape == ((2 * cell + 2) * s, (3 * cell + 2) * s, 3)
    with torch.no_grad():
        rec = f.model.decode(f.model.encode(held.float() / 127.5 - 1).mode())
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for j in range(3):
        cols = slice((2 + j * cell) * s, (2 + j * cell + 16) * s)
        top = grid[2 * s:(2 + 16) * s, cols]
        bottom = grid[(2 + cell) * s:(2 + cell + 16) * s, cols]
        up = lambda im: im.permute(1, 2, 0).repeat_interleave(s, 0).repeat_interleave(s, 1)  # noqa: E731
        assert torch.equal(top, up(held[j]))
        assert (bottom.int() - up(rec_u8[j]).int()).abs().max() <= 1
    assert int(grid[: 2 * s].max()) == 0  # the padding above the first row


# --------------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("disc_start", [0, 2])
def test_resume_takes_exactly_the_steps_of_an_uninterrupted_run(tmp_path, disc_start):
    data = smooth_folder(tmp_path / "data")
    opts = dict(steps=6, checkpoint_every=3, disc_start=disc_start, flip=True, ema_decay=0.5)
    straight = train_autoencoder(cfg(data, tmp_path / "straight", **opts), log=quiet)
    assert straight.steps == 6

    split = tmp_path / "split"
    first = train_autoencoder(cfg(data, split, **{**opts, "steps": 3}), log=quiet)
    assert (first.steps, first.resumed_from) == (3, 0)
    half = read_state(split / "checkpoints" / "step_0000003.safetensors")
    if disc_start:  # the discriminator trained at step 3 (index 2): its weights and moments are saved
        assert any(k.startswith("disc.") for k in half) and any(k.startswith("opt_d.exp_avg.") for k in half)
    else:
        assert not any(k.startswith(("disc.", "opt_d.")) for k in half)
    logs: list[str] = []
    second = train_autoencoder(cfg(data, split, **opts), log=logs.append)
    assert (second.steps, second.resumed_from) == (6, 3)
    assert any("resuming from" in line and "step_0000003" in line for line in logs)

    assert_identical(weights(split / "model.safetensors"), weights(tmp_path / "straight" / "model.safetensors"))
    a = read_state(tmp_path / "straight" / "checkpoints" / "step_0000006.safetensors")
    b = read_state(split / "checkpoints" / "step_0000006.safetensors")
    assert_identical(a, b)  # model, EMA, optimizer moments and (when on) the discriminator and its moments
    assert not torch.equal(a["model.encoder.conv_in.weight"], half["model.encoder.conv_in.weight"])  # it trained
    assert second.psnr == straight.psnr
    assert [r["loss"] for r in metrics(split) if "loss" in r] == [r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r]


# --------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------


def test_training_improves_held_out_psnr(tmp_path):
    data = smooth_folder(tmp_path / "data", n=20, seed=3)
    c = cfg(data, tmp_path / "run", steps=60, batch_size=8, holdout=4, warmup_steps=5, checkpoint_every=30,
            metrics_every=10, ema_decay=0.9, kl_weight=1e-6)
    result = train_autoencoder(c, log=quiet)

    torch.manual_seed(0)  # the initial weights of a run with --seed 0
    initial = AutoencoderKL(ae_preset_config("tiny", in_channels=3, latent_channels=4)).eval()
    held = held_out(data, holdout=4)
    before = float(psnr_of(initial, held).mean())
    after = float(psnr_of(load_autoencoder(result.model_path).model, held).mean())
    assert after == pytest.approx(result.psnr, abs=1e-3)
    assert after > before + 4, (before, after)  # seen: 14.2 -> 21.5 dB
    psnrs = [r["psnr_holdout"] for r in metrics(tmp_path / "run") if "psnr_holdout" in r]
    assert len(psnrs) == 2 and psnrs[1] > psnrs[0]
    losses = [r["loss"] for r in metrics(tmp_path / "run") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses  # seen: 0.255 -> 0.150


# --------------------------------------------------------------------------------------------------
# Stops
# --------------------------------------------------------------------------------------------------


def test_time_limit_stops_early_with_a_checkpoint(tmp_path):
    data = smooth_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = train_autoencoder(cfg(data, run, steps=50, checkpoint_every=100, time_limit=1e-7), log=quiet)
    assert (result.stopped_by, result.steps) == ("time_limit", 1)
    assert ckpt_names(run) == ["step_0000001.safetensors"]
    f = load_autoencoder(run / "model.safetensors")
    assert f.training["steps"] == 1 and f.training["final"] is False
    with pytest.raises(UsageError, match="already trained"):
        train_autoencoder(cfg(data, run, steps=50, checkpoint_every=100, time_limit=1e-7), log=quiet)
    more = train_autoencoder(cfg(data, run, steps=3, checkpoint_every=100), log=quiet)
    assert (more.stopped_by, more.steps, more.resumed_from) == ("steps", 3, 1)


def test_sigint_saves_a_checkpoint_and_the_run_resumes_to_the_end(tmp_path):
    data = smooth_folder(tmp_path / "data")
    straight = train_autoencoder(cfg(data, tmp_path / "straight", steps=5, checkpoint_every=100), log=quiet)

    run = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)

    def progress(step: int, total: int, text: str = "") -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="interrupted at step 2"):
        train_autoencoder(cfg(data, run, steps=5, checkpoint_every=100), log=quiet, progress=progress)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert ckpt_names(run) == ["step_0000002.safetensors"]
    assert load_autoencoder(run / "model.safetensors").training["steps"] == 2

    result = train_autoencoder(cfg(data, run, steps=5, checkpoint_every=100), log=quiet)
    assert (result.steps, result.resumed_from, result.stopped_by) == (5, 2, "steps")
    assert_identical(weights(run / "model.safetensors"), weights(tmp_path / "straight" / "model.safetensors"))
    assert result.psnr == straight.psnr


def test_discriminator_needs_a_resolution_it_can_score(tmp_path):
    """The patch discriminator's convolutions leave nothing of a side under 12 pixels: refused up front,
    not a crash at step --disc-start."""
    data = smooth_folder(tmp_path / "data", size=8)
    with pytest.raises(UsageError, match="--disc-start"):
        train_autoencoder(cfg(data, tmp_path / "run", resolution="8", disc_start=1), log=quiet)
    assert not (tmp_path / "run").exists()
    ok = train_autoencoder(cfg(data, tmp_path / "ok", resolution="8", steps=2, disc_start=0), log=quiet)
    assert ok.steps == 2


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

ARGS = ["--preset", "tiny", "--resolution", "16", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1",
        "--holdout", "2", "--checkpoint-every", "2", "--sample-every", "0", "--device", "cpu"]


def train_ae(data: Path, out: Path, *args: str):
    return runner.invoke(app, ["train-autoencoder", str(data), "--out", str(out), *ARGS, *args])


def assert_one_error_line(result, *fragments: str) -> str:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert result.stdout == ""
    return errors[0]


def test_train_then_the_model_file_reconstructs(tmp_path):
    data = smooth_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = train_ae(data, run)
    assert result.exit_code == 0, result.output
    assert f"autoencoder: {run / 'model.safetensors'}\n" in result.stdout
    assert f"run: {run}\n" in result.stdout
    psnr = float(result.stdout.split("held-out PSNR: ")[1].split(" dB")[0])
    f = load_autoencoder(run / "model.safetensors")
    assert psnr == pytest.approx(float(psnr_of(f.model, held_out(data, 2)).mean()), abs=0.006)  # printed to 2 decimals
    assert "data: 10 images (2 held out), 3 channel(s), 16x16" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "f16"], "--preset must be one of"),
    (["--resolution", "15"], "not a multiple of the autoencoder's factor 2"),
    (["--preset", "f4", "--resolution", "18"], "not a multiple of the autoencoder's factor 4"),
    (["--loss", "xyz"], "--loss must be l1 or l2"),
    (["--kl-weight", "-1"], "--kl-weight must be >= 0"),
    (["--holdout", "0"], "--holdout must be >= 1"),
])
def test_bad_options_exit_2(tmp_path, args, fragment):
    data = smooth_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = train_ae(data, run, *args)
    assert result.exit_code == 2, result.output
    assert_one_error_line(result, fragment)
    assert not (run / "model.safetensors").exists()


def test_too_few_images_a_missing_folder_or_checkpoint_exit_4(tmp_path):
    few = smooth_folder(tmp_path / "few", n=4)
    result = train_ae(few, tmp_path / "run")
    assert result.exit_code == 4, result.output
    assert_one_error_line(result, "4 image(s)", "at least 5")
    assert not (tmp_path / "run" / "model.safetensors").exists()

    result = train_ae(tmp_path / "nowhere", tmp_path / "run2")
    assert result.exit_code == 4, result.output
    assert_one_error_line(result, "data folder not found", str(tmp_path / "nowhere"))
    assert not (tmp_path / "run2" / "model.safetensors").exists()

    result = train_ae(smooth_folder(tmp_path / "data"), tmp_path / "run3", "--resume", str(tmp_path / "no-such.safetensors"))
    assert result.exit_code == 4, result.output
    assert_one_error_line(result, "not found", "no-such.safetensors")


def test_resume_refusals_leave_the_run_as_it_was(tmp_path):
    data = smooth_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert train_ae(data, run).exit_code == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*.safetensors")}
    assert Path("model.safetensors") in before and Path("checkpoints/step_0000002.safetensors") in before

    different = train_ae(data, run, "--steps", "4", "--loss", "l2")
    assert different.exit_code == 2, different.output
    assert_one_error_line(different, "step_0000002.safetensors", "--loss 'l1' (now 'l2')")

    different = train_ae(data, run, "--steps", "4", "--latent-channels", "2", "--kl-weight", "0.001")
    assert different.exit_code == 2, different.output
    assert_one_error_line(different, "--latent-channels 4 (now 2)", "--kl-weight 1e-06 (now 0.001)")

    never = train_ae(data, run, "--steps", "4", "--resume", "never")
    assert never.exit_code == 3, never.output
    assert_one_error_line(never, str(run), "--resume auto")

    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*.safetensors")} == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_checkpoint_exits_4_naming_it(tmp_path, damage):
    data = smooth_folder(tmp_path / "data")
    good = tmp_path / "good"
    assert train_ae(data, good).exit_code == 0
    raw = (good / "checkpoints" / "step_0000002.safetensors").read_bytes()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bad = run / "checkpoints" / "step_0000002.safetensors"
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x00not a checkpoint" * 10)
    result = train_ae(data, run, "--steps", "4")
    assert result.exit_code == 4, result.output
    assert_one_error_line(result, "step_0000002.safetensors")
    assert not (run / "model.safetensors").exists()
    assert ckpt_names(run) == ["step_0000002.safetensors"]


def test_json_prints_one_summary_record(tmp_path):
    data = smooth_folder(tmp_path / "data")
    run = tmp_path / "run"
    result = train_ae(data, run, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    records.check("train-autoencoder", summary)
    assert summary["kind"] == "summary"
    assert (summary["steps"], summary["resumed_from"], summary["stopped_by"]) == (2, 0, "steps")
    assert summary["model_path"] == str(run / "model.safetensors") and summary["run_dir"] == str(run)
    last = [r for r in metrics(run) if "psnr_holdout" in r][-1]
    assert summary["psnr"] == pytest.approx(last["psnr_holdout"], abs=1e-4)
    assert summary["psnr"] == pytest.approx(load_autoencoder(run / "model.safetensors").training["psnr_holdout"], abs=1e-3)
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0

    again = train_ae(data, tmp_path / "run2", "--json", "--quiet", "--loss", "xyz")
    assert again.exit_code == 2, again.output
    error = json.loads(again.stdout)
    records.check("train-autoencoder", error)
    assert error["kind"] == "error" and error["exit_code"] == 2 and "--loss" in error["message"]
