"""diffcli.training: the run folder, exact resume, failure handling, the formulas the loop uses, signals,
DDP, and a toy set a tiny model must actually learn.

Training runs use DiT-T/4 at 8x8 (a 2x2 token grid) and a handful of steps: about 20 ms a step on CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcli.files import checkpoint
from diffcli.files.checkpoint import load_model
from diffcli.errors import DiffcliError, InputError, OutputExistsError, UsageError
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training import TrainConfig, loop, train
from diffcli.training.batches import DataOrder
from diffcli.training.loop import ema_decay_at, ema_update, lr_at
from diffcli.training.losses import diffusion_loss, min_snr_weight, vlb_term

REPO = Path(__file__).resolve().parent.parent


def quiet(_: str) -> None:
    pass


def tiny(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out=str(out), model="DiT-T/4", resolution="8", steps=4, batch_size=4,
                lr=1e-3, warmup_steps=2, checkpoint_every=2, sample_every=0, metrics_every=1, device="cpu")
    return TrainConfig(**{**base, **overrides})


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path, checkpoint.STATE_FORMAT, "training checkpoint")[0]


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float summation order. Adam divides by sqrt(v): where a gradient is near zero a
    ~1e-7 relative difference in it can move a weight by ~1e-5 (seen in the U-ViT skip weights), so
    the bound is 0.1 x one step at lr 1e-3 on any element, and tiny on average. A wrong batch or
    wrong noise moves most elements by ~lr."""
    assert set(a) == set(b)
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    worst = max(a, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
    assert diff.max() < 1e-4 and diff.mean() < 1e-7, (float(diff.max()), float(diff.mean()), worst)


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DIFFCLI_DEBUG="")
    return env


# --------------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------------


def test_run_folder_layout(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    cfg = tiny(data, run, steps=4, sample_every=2, checkpoint_every=2, metrics_every=1)
    result = train(cfg, log=quiet)

    assert result.model_path == str(run / "model.safetensors") and result.run_dir == str(run)
    assert result.steps == 4 and result.resumed_from == 0 and math.isfinite(result.final_loss)

    config = json.loads((run / "config.json").read_text())
    assert set(config["train"]) == {f.name for f in fields(TrainConfig)}
    assert config["train"] == cfg.to_dict()
    ds = config["dataset"]
    assert ds["images"] == 6 and ds["channels"] == 3 and ds["classes"] == ["blue", "green", "red"]
    assert ds["class_counts"] == [2, 2, 2] and ds["skipped"] == 0 and ds["path"] == str(data)
    assert config["model_config"]["patch_size"] == 4 and config["model_config"]["num_classes"] == 3
    assert config["parameters"] > 0 and config["world_size"] == 1

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert {"step", "loss", "lr", "grad_norm", "images_per_second", "elapsed"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["grad_norm"] > 0 and r["images_per_second"] > 0
        assert r["lr"] == pytest.approx(lr_at(cfg, r["step"] - 1))
    assert [r["lr"] for r in lines] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])  # 2 warm-up steps
    assert lines[-1]["loss"] == pytest.approx(result.final_loss)
    assert lines[0]["elapsed"] <= lines[-1]["elapsed"]

    previews = sorted(p.name for p in (run / "samples").iterdir())
    assert previews == ["step_0000002.png", "step_0000004.png"]
    with Image.open(run / "samples" / "step_0000004.png") as im:
        # 3 classes x 4 images of 8x8 with 2 px padding = 34 x 42, scaled 8x to reach 64 px cells
        assert im.mode == "RGB" and im.size == (42 * 8, 32 * 8)

    assert ckpt_names(run) == ["step_0000002.safetensors", "step_0000004.safetensors"]
    mf = load_model(run / "model.safetensors")
    assert mf.class_names == ["blue", "green", "red"]
    assert mf.config.num_classes == 3 and mf.config.image_height == 8 and mf.config.in_channels == 3
    assert mf.prediction == "v" and mf.training["steps"] == 4 and mf.training["final"] is True
    assert mf.sampling["guidance"] == cfg.guidance
    # the model file holds the EMA weights of the last checkpoint
    state = read_state(run / "checkpoints" / "step_0000004.safetensors")
    for k, v in mf.model.state_dict().items():
        assert torch.equal(v, state[f"ema.{k}"]), k


def test_unconditional_run(tmp_path, toy_image_folder):
    data = toy_image_folder(classes=(), per_class=4)
    result = train(tiny(data, tmp_path / "run", steps=2), log=quiet)
    mf = load_model(result.model_path)
    assert mf.class_names == [] and mf.config.num_classes == 0
    assert mf.sampling["guidance"] == 1.0  # no classes, no guidance


def test_log_messages(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    messages: list[str] = []
    train(tiny(data, tmp_path / "run", steps=2), log=messages.append)
    text = "\n".join(messages)
    assert "data: 3 images, 3 channel(s), 8x8, 3 classes (blue, green, red)" in text
    assert "model: DiT-T/4" in text and "cpu" in text


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


def test_resume_is_exact(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    # every source of randomness on: label dropout, flips, random crops, Min-SNR, micro-batches
    opts = dict(steps=6, flip=True, crop="random", class_dropout=0.3, grad_accum=2, checkpoint_every=100)
    whole = tiny(data, tmp_path / "whole", **opts)
    train(whole, log=quiet)

    first = tiny(data, tmp_path / "halves", **{**opts, "steps": 3})
    assert train(first, log=quiet).steps == 3
    messages: list[str] = []
    second = tiny(data, tmp_path / "halves", **opts)
    result = train(second, log=messages.append)
    assert result.resumed_from == 3 and result.steps == 6
    assert any("resuming" in m and "step 3" in m for m in messages)

    a = read_state(tmp_path / "whole" / "checkpoints" / "step_0000006.safetensors")
    b = read_state(tmp_path / "halves" / "checkpoints" / "step_0000006.safetensors")
    assert set(a) == set(b)
    assert any(k.startswith("opt.exp_avg_sq.") for k in a) and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = load_model(tmp_path / "whole" / "model.safetensors"), load_model(tmp_path / "halves" / "model.safetensors")
    for (k, va), vb in zip(ma.model.state_dict().items(), mb.model.state_dict().values()):
        assert torch.equal(va, vb), k
    # and the run really trained: the zero-initialised output layer has moved
    assert a["model.final_layer.linear.weight"].abs().sum() > 0
    metrics = [json.loads(line)["step"] for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_explicit_checkpoint(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    train(tiny(data, run, steps=4, checkpoint_every=2), log=quiet)
    older = run / "checkpoints" / "step_0000002.safetensors"
    result = train(tiny(data, run, steps=3, resume=str(older)), log=quiet)
    assert result.resumed_from == 2 and result.steps == 3
    with pytest.raises(InputError, match="not found"):
        train(tiny(data, run, steps=5, resume=str(run / "nope.safetensors")), log=quiet)


def test_finished_run_resumes_to_nothing_and_extends(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    train(tiny(data, run, steps=2), log=quiet)
    again = train(tiny(data, run, steps=2), log=quiet)
    assert again.resumed_from == 2 and again.steps == 2
    longer = train(tiny(data, run, steps=4), log=quiet)
    assert longer.resumed_from == 2 and longer.steps == 4
    assert load_model(run / "model.safetensors").training["steps"] == 4


def test_keep_last(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    train(tiny(data, run, steps=5, checkpoint_every=1, keep_last=2), log=quiet)
    assert ckpt_names(run) == ["step_0000004.safetensors", "step_0000005.safetensors"]


def test_resume_with_a_different_identity_option_is_refused(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    train(tiny(data, run, steps=2), log=quiet)
    with pytest.raises(UsageError, match=r"--lr 0\.001 \(now 0\.002\)"):
        train(tiny(data, run, steps=4, lr=2e-3), log=quiet)
    with pytest.raises(UsageError, match="--model"):
        train(tiny(data, run, steps=4, model="DiT-T/8"), log=quiet)
    # options outside the identity (steps, logging, checkpoint cadence) may change
    assert train(tiny(data, run, steps=3, metrics_every=5, checkpoint_every=7), log=quiet).resumed_from == 2


def test_resume_never_refuses_an_existing_run(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    train(tiny(data, run, steps=2, resume="never"), log=quiet)  # a fresh folder is fine
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already holds a run"):
        train(tiny(data, run, steps=4, resume="never"), log=quiet)
    assert (run / "model.safetensors").read_bytes() == before


# --------------------------------------------------------------------------------------------------
# A non-finite loss stops the run; the last good checkpoint stays
# --------------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, toy_image_folder, monkeypatch):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    calls = {"n": 0}
    real = loop.diffusion_loss

    def nan_at_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", nan_at_step_3)
    with pytest.raises(DiffcliError, match="at step 3") as info:
        train(tiny(data, run, steps=10, checkpoint_every=2), log=quiet)
    assert "nan" in str(info.value).lower() and type(info.value) is DiffcliError
    assert ckpt_names(run) == ["step_0000002.safetensors"]
    state = read_state(run / "checkpoints" / "step_0000002.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())
    mf = load_model(run / "model.safetensors")
    assert mf.training["steps"] == 2
    assert all(torch.isfinite(v).all() for v in mf.model.state_dict().values())
    metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2]

    monkeypatch.setattr(loop, "diffusion_loss", real)
    assert train(tiny(data, run, steps=4, checkpoint_every=2), log=quiet).resumed_from == 2


# --------------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------------


def test_min_snr_weight_closed_form():
    snr = torch.tensor([1e-4, 0.25, 1.0, 4.9, 5.0, 5.1, 30.0, 1e4], dtype=torch.float64)
    gamma = 5.0
    eps = min_snr_weight(snr, gamma, "epsilon")
    v = min_snr_weight(snr, gamma, "v")
    for s, we, wv in zip(snr.tolist(), eps.tolist(), v.tolist()):
        assert we == pytest.approx(min(s, gamma) / s, rel=1e-12)
        assert wv == pytest.approx(min(s, gamma) / (s + 1), rel=1e-12)
    assert eps[0] == pytest.approx(1.0) and eps[-1] == pytest.approx(5e-4)
    assert v[2] == pytest.approx(0.5)


def test_diffusion_loss_applies_min_snr_weights(make_dit):
    model = make_dit(num_classes=2)
    schedule = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    for prediction in ("epsilon", "v"):
        plain = diffusion_loss(model, schedule, TrainConfig(prediction=prediction, min_snr_gamma=0), x0, y, t, noise)
        weighted = diffusion_loss(model, schedule, TrainConfig(prediction=prediction, min_snr_gamma=5), x0, y, t, noise)
        w = min_snr_weight(schedule.snr[t].float(), 5.0, prediction)
        assert torch.allclose(weighted, plain * w, rtol=1e-5)
        # the unweighted loss is the per-sample MSE against the target
        x_t = schedule.add_noise(x0, noise, t)
        target = noise if prediction == "epsilon" else schedule.velocity(x0, noise, t)
        with torch.no_grad():
            mse = (model(x_t, t, y) - target).pow(2).flatten(1).mean(1)
        assert torch.allclose(plain, mse, rtol=1e-5)


def test_lr_warmup_then_constant_or_cosine():
    c = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="constant")
    assert [lr_at(c, s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(c, 10) == lr_at(c, 109) == lr_at(c, 5000) == 1e-3
    c = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="cosine")
    assert lr_at(c, 9) == pytest.approx(1e-3)
    assert lr_at(c, 10) == pytest.approx(1e-3)
    assert lr_at(c, 35) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(c, 60) == pytest.approx(5e-4)
    assert lr_at(c, 110) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(c, 200) == pytest.approx(0.0, abs=1e-15)  # never negative or rising again
    values = [lr_at(c, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(TrainConfig(lr=3e-4, warmup_steps=0), 0) == 3e-4


def test_ema_decay_warmup_and_update():
    c = TrainConfig(ema_decay=0.999)
    assert ema_decay_at(c, 0) == pytest.approx(0.1)
    assert ema_decay_at(c, 90) == pytest.approx(0.91)
    assert ema_decay_at(c, 8990) == pytest.approx(0.999)  # (1 + s) / (10 + s) = 0.999 here
    assert ema_decay_at(c, 10**6) == 0.999
    assert ema_decay_at(TrainConfig(ema_decay=0.5), 100) == 0.5
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in model.parameters():
            p.fill_(3.0)
    ema_update(ema, model, 0.9)  # 0.9 * 1 + 0.1 * 3
    assert all(torch.allclose(p, torch.full_like(p, 1.2)) for p in ema.parameters())


def stream(order: DataOrder, epochs: int) -> torch.Tensor:
    return torch.cat([order.perm(e) for e in range(epochs)])


@pytest.mark.parametrize("n, batch", [(10, 4), (10, 5), (7, 7), (3, 8), (1, 3)])
def test_data_order_covers_each_index_once_per_epoch(n, batch):
    order = DataOrder(n, batch, seed=1)
    for e in range(4):
        assert sorted(order.perm(e).tolist()) == list(range(n))
    batches = 6
    got = torch.cat([order.batch_indices(k) for k in range(batches)])
    assert got.shape == (batches * batch,)
    full = stream(order, math.ceil(batches * batch / n) + 1)
    assert torch.equal(got, full[: batches * batch])
    if n >= 5:
        assert not torch.equal(order.perm(0), order.perm(1))  # each epoch is shuffled afresh
    # a fresh object (as after resume) and an out-of-order query give the same batches
    again = DataOrder(n, batch, seed=1)
    assert torch.equal(again.batch_indices(5), order.batch_indices(5))
    assert not torch.equal(stream(DataOrder(n, batch, seed=2), 3), stream(order, 3)) or n == 1


def test_learned_sigma_loss_is_finite_and_its_vlb_part_non_negative(make_dit):
    model = make_dit(num_classes=0, learn_sigma=True, scale=0.2)
    schedule = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(6, 3, 8, 8, generator=g) * 2 - 1).round(decimals=2)
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 50, 400, 998, 999])
    y = torch.zeros(6, dtype=torch.long)  # the null class
    for prediction in ("epsilon", "v"):
        cfg = TrainConfig(prediction=prediction, min_snr_gamma=5, learn_sigma=True)
        total = diffusion_loss(model, schedule, cfg, x0, y, t, noise)
        mean_only = diffusion_loss(lambda *a: model(*a)[:, :3], schedule, cfg, x0, y, t, noise)
        assert total.shape == (6,) and torch.isfinite(total).all()
        vlb_part = total - mean_only
        assert (vlb_part >= 0).all() and (vlb_part > 0).any()

    # the vlb term itself: finite, >= 0, and it trains only the variance (the mean is detached)
    out = model(schedule.add_noise(x0, noise, t), t, y)
    x0_hat = out[:, :3].clamp(-1, 1)
    var_values = out[:, 3:]
    vlb = vlb_term(schedule, x0, schedule.add_noise(x0, noise, t), t, x0_hat, var_values)
    assert torch.isfinite(vlb).all() and (vlb >= 0).all()
    grads = torch.autograd.grad(vlb.sum(), out)[0]
    assert grads[:, :3].abs().max() == 0 and grads[:, 3:].abs().max() > 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    train(tiny(data, tmp_path / "one", steps=3, max_grad_norm=0.5), log=quiet)
    train(tiny(data, tmp_path / "accum", steps=3, grad_accum=4, max_grad_norm=0.5), log=quiet)
    a = load_model(tmp_path / "one" / "model.safetensors").model.state_dict()
    b = load_model(tmp_path / "accum" / "model.safetensors").model.state_dict()
    assert_same_training(a, b)
    metrics = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("one", "accum")]
    assert [r["loss"] for r in metrics[0]] == pytest.approx([r["loss"] for r in metrics[1]], rel=1e-5)
    assert [r["grad_norm"] for r in metrics[0]] == pytest.approx([r["grad_norm"] for r in metrics[1]], rel=1e-5)


def test_bad_config_values_are_usage_errors_before_any_data_is_read(tmp_path):
    missing = tmp_path / "no-such-folder"  # reading it would be an InputError: options are checked first
    for bad in (dict(steps=0), dict(batch_size=0), dict(lr=float("nan")), dict(lr=-1.0), dict(grad_accum=3),
                dict(ema_decay=1.0), dict(prediction="x0"), dict(resolution="8x"), dict(keep_last=0),
                dict(zero_terminal_snr=True, prediction="epsilon"), dict(model="DiT-Q/4"),
                dict(model="DiT-T/2", resolution="33"), dict(model="DiT-T/8", resolution="8x12")):
        with pytest.raises(UsageError):
            train(tiny(missing, tmp_path / "run", **bad), log=quiet)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Processes: SIGINT, and DDP on CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_auto_finishes(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "diffcli", "train", str(data), "--out", str(run), "--model", "DiT-T/4",
            "--resolution", "8", "--batch-size", "4", "--steps", "100000", "--checkpoint-every", "1000000",
            "--sample-every", "0", "--metrics-every", "1", "--device", "cpu"]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no metrics line within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume auto" in err
    ckpts = ckpt_names(run)
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0][5:12])
    assert 1 <= stopped_at < 100000
    mf = load_model(run / "model.safetensors")
    assert mf.training["steps"] == stopped_at and mf.training["final"] is False

    final = stopped_at + 3
    args[args.index("--steps") + 1] = str(final)
    done = subprocess.run(args + ["--resume", "auto"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and f"step {stopped_at}" in done.stderr
    assert str(run / "model.safetensors") in done.stdout
    mf = load_model(run / "model.safetensors")
    assert mf.training["steps"] == final and mf.training["final"] is True


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=3)
    common = ["train", str(data), "--model", "DiT-T/4", "--resolution", "8", "--batch-size", "6", "--steps", "4",
              "--lr", "3e-3", "--warmup-steps", "1", "--flip", "--crop", "random", "--class-dropout", "0.3",
              "--sample-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--quiet"]
    env = subprocess_env()
    single = subprocess.run([sys.executable, "-m", "diffcli", *common, "--out", str(tmp_path / "single")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "diffcli", *common, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("model: ") == 1  # only rank 0 prints the summary

    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["world_size"] == 2
    files = sorted(p.relative_to(tmp_path / "ddp").as_posix() for p in (tmp_path / "ddp").rglob("*.safetensors"))
    assert files == ["checkpoints/step_0000002.safetensors", "checkpoints/step_0000004.safetensors",
                     "data-cache.safetensors", "model.safetensors"]
    assert not list((tmp_path / "ddp").rglob("*.tmp"))

    a = load_model(tmp_path / "single" / "model.safetensors")
    b = load_model(tmp_path / "ddp" / "model.safetensors")
    assert a.class_names == b.class_names == ["blue", "green", "red"]
    assert_same_training(a.model.state_dict(), b.model.state_dict())
    # the whole training state (weights, EMA, Adam moments) agrees at both checkpoints
    for step in ("0000002", "0000004"):
        ta = read_state(tmp_path / "single" / "checkpoints" / f"step_{step}.safetensors")
        tb = read_state(tmp_path / "ddp" / "checkpoints" / f"step_{step}.safetensors")
        assert_same_training(ta, tb)
    # not trivially equal: training moved the weights between the two checkpoints
    mid = read_state(tmp_path / "single" / "checkpoints" / "step_0000002.safetensors")
    assert not torch.equal(mid["model.final_layer.linear.weight"], ta["model.final_layer.linear.weight"])
    la = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Toy learning: a tiny model learns three solid colours
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_learns_class_colours(tmp_path, toy_image_folder):
    from diffcli.diffusion.registry import sample

    data = toy_image_folder(per_class=8, noise=25)
    # tuned on training seeds 0-7: every class mean had a margin >= 1.1, and at most 1 of 18 images
    # per seed had the wrong dominant colour; ~5 s on one CPU thread
    cfg = tiny(data, tmp_path / "run", steps=300, batch_size=16, lr=3e-3, warmup_steps=20, ema_decay=0.99,
               long_skip=True, guidance=1.5, class_dropout=0.1, checkpoint_every=10_000, metrics_every=50)
    result = train(cfg, log=quiet)
    mf = load_model(result.model_path)
    assert mf.class_names == ["blue", "green", "red"]
    per = 6
    labels = torch.arange(3).repeat_interleave(per)
    with torch.no_grad():
        images = sample(mf.model, mf.schedule, (3, 8, 8), 20, "ddim", seeds=list(range(3 * per)), labels=labels,
                        null_label=mf.model.null_class, guidance=mf.sampling["guidance"],
                        prediction=mf.prediction).images
    means = images.mean((2, 3))  # (18, 3) mean colour per image in [-1, 1]; data: +0.57 own channel, -0.76 others
    channel = {"red": 0, "green": 1, "blue": 2}
    right = 0
    for k, name in enumerate(mf.class_names):
        c = channel[name]
        mine = means[labels == k]  # (per, 3)
        avg = mine.mean(0)
        assert avg[c] > 0.2 and avg[c] - max(avg[j] for j in range(3) if j != c) > 0.6, (name, avg.tolist())
        right += int((mine.argmax(1) == c).sum())
    # nearly every single image is its class's colour too
    assert right >= 3 * per - 3, right


# --------------------------------------------------------------------------------------------------
# --time-limit and --preset (training recipes)
# --------------------------------------------------------------------------------------------------


def test_time_limit_stops_with_a_checkpoint_and_the_run_continues_exactly(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    whole = train(tiny(data, tmp_path / "whole"), log=quiet)
    assert whole.stopped_by == "steps" and whole.steps == 4

    lines: list[str] = []
    # a limit of a few microseconds is over after the first step, whatever the machine's speed
    first = train(tiny(data, tmp_path / "cut", time_limit=1e-7), log=lines.append)
    assert first.stopped_by == "time_limit" and first.steps == 1
    assert any(line.startswith("time limit: stopped at step 1") for line in lines)
    assert ckpt_names(tmp_path / "cut") == ["step_0000001.safetensors"]
    assert load_model(tmp_path / "cut" / "model.safetensors").training["steps"] == 1
    records = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]

    # the same limit again: nothing left to train, a usage error, the run untouched
    with pytest.raises(UsageError, match="already trained"):
        train(tiny(data, tmp_path / "cut", time_limit=1e-7), log=quiet)
    assert ckpt_names(tmp_path / "cut") == ["step_0000001.safetensors"]

    rest = train(tiny(data, tmp_path / "cut"), log=quiet)
    assert rest.stopped_by == "steps" and rest.steps == 4 and rest.resumed_from == 1
    assert_same_training(read_state(tmp_path / "whole" / "checkpoints" / "step_0000004.safetensors"),
                         read_state(tmp_path / "cut" / "checkpoints" / "step_0000004.safetensors"))


def test_recipes_fill_defaults_and_options_given_win():
    from diffcli.training.config import RECIPES

    plain = TrainConfig.from_options()
    assert plain == TrainConfig(preset="default")
    quick = TrainConfig.from_options("quick", data_dir="d")
    for name, value in RECIPES["quick"].items():
        assert getattr(quick, name) == value != getattr(plain, name)
    mine = TrainConfig.from_options("quick", lr=5e-4, batch_size=None)  # None: not given
    assert mine.lr == 5e-4 and mine.batch_size == RECIPES["quick"]["batch_size"] and mine.preset == "quick"
    with pytest.raises(UsageError, match="unknown --preset 'fast'"):
        TrainConfig.from_options("fast")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UsageError, match="--time-limit"):
            TrainConfig(time_limit=bad).validate()


def test_quick_recipe_is_recorded_and_must_match_on_resume(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    lines: list[str] = []
    small = dict(model="DiT-T/4", resolution="8", steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1,
                 sample_every=0, device="cpu")
    cfg = TrainConfig.from_options("quick", data_dir=str(data), out=str(tmp_path / "run"), **small)
    train(cfg, log=lines.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["preset"] == "quick" and saved["lr"] == 2e-3 and saved["ema_decay"] == 0.999
    assert any(line.startswith("preset quick: ") and "--lr 0.002" in line for line in lines)
    assert not any(line.startswith("tip:") for line in lines)
    again = TrainConfig.from_options("default", data_dir=str(data), out=str(tmp_path / "run"), **{**small, "steps": 3})
    with pytest.raises(UsageError, match="--preset 'quick' \\(now 'default'\\)"):
        train(again, log=quiet)


def test_default_recipe_on_a_cpu_suggests_quick(tmp_path, toy_image_folder):
    lines: list[str] = []
    train(tiny(toy_image_folder(per_class=2), tmp_path / "run", steps=1), log=lines.append)
    assert any(line.startswith("tip: on a CPU, --preset quick") for line in lines)
