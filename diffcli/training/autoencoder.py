"""train_autoencoder(): fit an AutoencoderKL to an image folder, with the run-folder contract of `train`.

Loss (Rombach et al. 2022, sec. 3 and appendix G): per image, the reconstruction error summed over
pixels plus kl_weight x KL(q(z|x) || N(0, I)) summed over latent elements, both divided by the
number of pixel values so the numbers read as a per-pixel L1 (or L2). After --disc-start steps an
optional patch discriminator (Isola et al. 2017, a 3-layer PatchGAN) adds a hinge-loss adversarial
term (Lim & Ye 2017): the discriminator minimises mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))),
the autoencoder adds -disc_weight x mean(D(x_hat)).

Everything random in step s is drawn from generators seeded by (seed, s), as in `train`, so a
resumed run takes exactly the steps an uninterrupted one would. A held-out slice of the folder
(--holdout images, never trained on) gives the reconstruction PSNR logged at every checkpoint and
the preview (originals above their reconstructions, by the EMA weights).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from diffcli import __version__, atomic
from diffcli.files import checkpoint
from diffcli.models.autoencoder import AE_PRESETS, AutoencoderKL, ae_preset_config
from diffcli.files.autoencoder_file import save_autoencoder
from diffcli.data.folder import load_folder, parse_resolution
from diffcli.reconstruct import psnr
from diffcli.errors import DiffcliError, InputError, Interrupted, OutputExistsError, UsageError
from diffcli.training.batches import DataOrder, step_generator
from diffcli.training.rundir import RunDir, load_optimizer_tensors, optimizer_tensors, trim_metrics
from diffcli.training.loop import StopFlag
from diffcli.validate import describe

AE_STATE_FORMAT = "diffcli.autoencoder-state"


@dataclass
class AETrainConfig:
    data_dir: str
    out: str = "runs/autoencoder"
    preset: str = "f4"
    latent_channels: int = 4
    resolution: str = "32"
    channels: str = "auto"
    crop: str = "center"
    flip: bool = False
    steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 200
    loss: str = "l1"
    kl_weight: float = 1e-6
    disc_start: int = 0  # 0: no discriminator; else the step the adversarial loss switches on
    disc_weight: float = 0.1
    ema_decay: float = 0.999
    holdout: int = 256
    checkpoint_every: int = 1000
    keep_last: int = 3
    sample_every: int = 1000
    metrics_every: int = 50
    time_limit: float | None = None  # minutes of training
    seed: int = 0
    resume: str = "auto"
    save_dtype: str = "fp32"
    num_workers: int = 0
    device: str = "auto"

    # what a resumed run must share with the checkpoint it continues
    IDENTITY = ("preset", "latent_channels", "resolution", "channels", "crop", "flip", "batch_size", "loss",
                "kl_weight", "disc_start", "disc_weight", "holdout", "seed")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.preset not in AE_PRESETS:
            raise UsageError(f"--preset must be one of {', '.join(AE_PRESETS)}, got {self.preset!r}")
        parse_resolution(self.resolution)
        checks = [
            (1 <= self.latent_channels <= 64, "--latent-channels must be in [1, 64]"),
            (self.steps >= 1, "--steps must be >= 1"), (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be > 0"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.loss in ("l1", "l2"), "--loss must be l1 or l2"),
            (self.kl_weight >= 0 and math.isfinite(self.kl_weight), "--kl-weight must be >= 0"),
            (self.disc_start >= 0, "--disc-start must be >= 0 (0: no discriminator)"),
            (self.disc_weight >= 0 and math.isfinite(self.disc_weight), "--disc-weight must be >= 0"),
            (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
            (self.holdout >= 1, "--holdout must be >= 1"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.keep_last >= 1, "--keep-last must be >= 1"),
            (self.sample_every >= 0, "--sample-every must be >= 0"),
            (self.metrics_every >= 1, "--metrics-every must be >= 1"),
            (self.time_limit is None or (self.time_limit > 0 and math.isfinite(self.time_limit)),
             "--time-limit must be > 0 minutes"),
            (self.save_dtype in ("fp32", "fp16"), "--save-dtype must be fp32 or fp16"),
            (self.crop in ("center", "random"), "--crop must be center or random"),
            (self.channels in ("auto", "1", "3"), "--channels must be auto, 1 or 3"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        H, W = parse_resolution(self.resolution)
        f = 2 ** (len(AE_PRESETS[self.preset]["block_out_channels"]) - 1)
        if H % f or W % f:
            raise UsageError(f"--resolution {self.resolution} is not a multiple of the autoencoder's factor {f} "
                             f"(--preset {self.preset})")
        if self.disc_start and min(H, W) < 12:  # PatchDiscriminator's convolutions leave nothing of a smaller side
            raise UsageError(f"--disc-start needs a --resolution of at least 12 per side (the patch discriminator's "
                             f"smallest input), got {self.resolution}; use --disc-start 0")


@dataclass
class AETrainResult:
    model_path: str
    run_dir: str
    steps: int
    resumed_from: int
    final_loss: float
    psnr: float  # held-out reconstruction PSNR of the EMA weights at the last step, dB
    seconds: float
    images_per_second: float
    stopped_by: str = "steps"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# The patch discriminator
# --------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """Conv(4, s2) x 3 with LeakyReLU(0.2) and GroupNorm, then a 1-channel conv: one real/fake score per patch."""

    def __init__(self, in_channels: int, width: int = 64) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 1, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --------------------------------------------------------------------------------------------------
# Losses and metrics
# --------------------------------------------------------------------------------------------------


def autoencoder_loss(x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor, loss: str, kl_weight: float) -> torch.Tensor:
    """Per-pixel reconstruction error + kl_weight x KL per image / pixel values per image (see the module doc)."""
    rec = (x_hat - x).abs() if loss == "l1" else (x_hat - x).pow(2)
    return rec.mean() + kl_weight * kl.mean() / x[0].numel()


def psnr_batch(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image for images in [-1, 1], measured on [0, 1] (reconstruct.psnr); identical images
    give 200 dB (an MSE of 1e-20) rather than inf, which metrics.jsonl could not hold."""
    p = psnr((x.double() + 1) / 2, (x_hat.double().clamp(-1, 1) + 1) / 2)
    return p.clamp_max(10 * math.log10(1e20))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _split(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a fixed permutation's last `holdout` images are never trained on."""
    k = min(holdout, n // 5)
    if n < 2 or k < 1:
        raise InputError(f"the folder has {n} image(s); training an autoencoder needs at least 5 "
                         f"(a fifth, up to --holdout, is held out to measure PSNR)")
    perm = torch.randperm(n, generator=step_generator(seed, 7))
    return perm[:-k].sort().values, perm[-k:].sort().values


def _lr_at(cfg: AETrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def _modules(cfg: AETrainConfig, C: int, device: torch.device):
    torch.manual_seed(cfg.seed)  # the initial weights (a resumed run loads its own)
    acfg = ae_preset_config(cfg.preset, in_channels=C, latent_channels=cfg.latent_channels)
    model = AutoencoderKL(acfg).to(device)
    ema = AutoencoderKL(acfg).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    disc = opt_d = None
    if cfg.disc_start:
        disc = PatchDiscriminator(C).to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    return model, ema, opt, disc, opt_d


def _state(model, ema, opt, disc, opt_d) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    t |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    t |= optimizer_tensors("opt", model, opt)
    if disc is not None:
        t |= {f"disc.{k}": v for k, v in disc.state_dict().items()}
        t |= optimizer_tensors("opt_d", disc, opt_d)
    return t


def _expected_state(model, disc) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor a checkpoint of these modules may hold (the optimizer's only after a first step)."""
    f32 = ("F32",)
    out = {f"model.{k}": (tuple(v.shape), f32) for k, v in model.state_dict().items()}
    out |= {f"ema.{k}": (tuple(v.shape), f32) for k, v in model.state_dict().items()}
    for prefix, m in (("opt", model), ("opt_d", disc)):
        if m is None:
            continue
        if prefix == "opt_d":
            out |= {f"disc.{k}": (tuple(v.shape), f32) for k, v in m.state_dict().items()}
        for name, p in m.named_parameters():
            out |= {f"{prefix}.exp_avg.{name}": (tuple(p.shape), f32), f"{prefix}.exp_avg_sq.{name}": (tuple(p.shape), f32),
                    f"{prefix}.step.{name}": ((), f32)}
    return out


def _resume(cfg: AETrainConfig, run: RunDir, model, ema, opt, disc, opt_d) -> tuple[Path | None, int, float]:
    """Load the checkpoint --resume names into the modules: (path, step, seconds trained before)."""
    if cfg.resume == "never":
        if run.list_checkpoints():
            raise OutputExistsError(f"{run.root} already holds a run; use --resume auto to continue it or choose another --out")
        return None, 0, 0.0
    if cfg.resume == "auto":
        ckpts = run.list_checkpoints()
        if not ckpts:
            return None, 0, 0.0
        path = ckpts[-1]
    else:
        path = Path(cfg.resume)
    header, data = checkpoint.read_header(path, AE_STATE_FORMAT, what="autoencoder training checkpoint")
    saved = checkpoint.meta_json(header.meta, "train_config", path)
    if not isinstance(saved, dict):
        raise InputError(f"{path} has malformed 'train_config' metadata")
    diff = [k for k in AETrainConfig.IDENTITY if k in saved and saved[k] != getattr(cfg, k)]
    if diff:
        def short(v: Any) -> str:  # the file's value as a short line (a hostile one may be 100 kB long)
            return repr(v) if len(repr(v)) <= 40 else describe(v)

        shown = ", ".join(f"--{k.replace('_', '-')} {short(saved[k])} (now {getattr(cfg, k)!r})" for k in diff[:4])
        raise UsageError(f"cannot resume {path.name} with different options: it was trained with {shown}")
    expected = _expected_state(model, disc)
    found = {k: v for k, v in header.tensors.items()}
    required = {k: v for k, v in expected.items() if not k.startswith(("opt.", "opt_d."))}
    problem = checkpoint.tensor_problem({k: v for k, v in found.items() if k in required}, required,
                                        needs="this run needs", of="this run")
    extra = next((k for k in found if k not in expected), None)
    if problem or extra:
        raise InputError(f"{path}: tensors do not match this run ({problem or f'tensor {extra} is not part of it'})")
    for k, info in found.items():
        if info.shape != expected[k][0] or info.dtype not in expected[k][1]:
            raise InputError(f"{path}: tensor {k} has shape {list(info.shape)}, this run needs {list(expected[k][0])}")
    parts = ("exp_avg", "exp_avg_sq", "step")
    for k in found:  # a parameter's optimizer state is all three of its tensors or none (_load_opt reads each)
        prefix, _, rest = k.partition(".")
        part, _, name = rest.partition(".")
        if prefix in ("opt", "opt_d") and part in parts:
            missing = next((f"{prefix}.{p}.{name}" for p in parts if f"{prefix}.{p}.{name}" not in found), None)
            if missing:
                raise InputError(f"{path}: tensors do not match this run (tensor {missing} is missing)")
    try:
        step = int(header.meta.get("step", ""))
        seconds = float(header.meta.get("seconds", "0"))
        if not (0 <= step <= 10**12 and math.isfinite(seconds) and seconds >= 0):
            raise ValueError
    except ValueError:
        raise InputError(f"{path} has malformed 'step' or 'seconds' metadata") from None
    assert data is not None
    tensors = checkpoint.load_tensors(data, path)
    # AdamW divides by sqrt(exp_avg_sq): a negative second moment (or step count) would make NaN weights
    checkpoint.check_finite(tensors, path, nonnegative=("opt.exp_avg_sq.", "opt.step.", "opt_d.exp_avg_sq.", "opt_d.step."))

    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."))
    ema.load_state_dict(sub("ema."))
    load_optimizer_tensors("opt", tensors, model, opt)
    if disc is not None:
        disc.load_state_dict(sub("disc."))
        load_optimizer_tensors("opt_d", tensors, disc, opt_d)
    return path, step, seconds


@torch.no_grad()
def _evaluate(ema: AutoencoderKL, x_all: torch.Tensor, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Held-out PSNR per image, posterior mean decoded (what `reconstruct` measures)."""
    out = []
    for i in range(0, len(x_all), batch):
        x = x_all[i:i + batch].to(device).float() / 127.5 - 1
        out.append(psnr_batch(x, ema.decode(ema.encode(x).mode())).cpu())
    return torch.cat(out)


@torch.no_grad()
def _preview(ema: AutoencoderKL, x_u8: torch.Tensor, path: Path, device: torch.device) -> None:
    from diffcli.files.images import make_grid, save_png, to_pil, to_uint8

    x = x_u8.to(device).float() / 127.5 - 1
    rec = ema.decode(ema.encode(x).mode()).clamp(-1, 1)
    grid = to_pil(make_grid(to_uint8(torch.cat([x, rec]).cpu()), ncols=len(x)))
    scale = max(1, 64 // min(x.shape[2], x.shape[3]))
    if scale > 1:
        from PIL import Image

        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    save_png(path, grid, overwrite=True)


def train_autoencoder(cfg: AETrainConfig, log: Callable[[str], None] = print,
                      progress: Callable[..., None] | None = None,
                      decode_progress: Callable[[int, int], None] | None = None) -> AETrainResult:
    from diffcli.device import resolve_device

    cfg.validate()
    started = time.time()
    device = resolve_device(cfg.device)
    H, W = parse_resolution(cfg.resolution)
    run = RunDir(cfg.out)
    data = load_folder(cfg.data_dir, (H, W), cfg.channels, "center", True, cfg.num_workers, decode_progress,
                       cache_path=run.cache, log=log)
    N, C = data.pixels.shape[0], data.pixels.shape[1]
    train_idx, held_idx = _split(N, cfg.holdout, cfg.seed)
    model, ema, opt, disc, opt_d = _modules(cfg, C, device)
    resumed_path, start, prior = _resume(cfg, run, model, ema, opt, disc, opt_d)
    if cfg.time_limit is not None and prior >= cfg.time_limit * 60:
        raise UsageError(f"the run in {run.root} has already trained {prior / 60:.1f} minutes, --time-limit is "
                         f"{cfg.time_limit:g}: give a larger --time-limit to continue it")
    if resumed_path is not None:
        log(f"resuming from {resumed_path} at step {start}")
    acfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    log(f"data: {N} images ({len(held_idx)} held out), {C} channel(s), {H}x{W}")
    log(f"autoencoder: {cfg.preset} (f={acfg.factor}, {acfg.latent_channels} latent channels, "
        f"{n_params / 1e6:.2f} M parameters); {device.type}")
    run.root.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(run.config, json.dumps({"train_autoencoder": cfg.to_dict(), "autoencoder_config": acfg.to_dict(),
                                               "dataset": {**data.summary(), "path": cfg.data_dir},
                                               "parameters": n_params, "diffcli_version": __version__},
                                              indent=2).encode())
    for folder in (run.root, run.checkpoints, run.samples):
        atomic.remove_stale_temps(folder, older_than=started)
    trim_metrics(run.metrics, start)

    pixels = data.pixels  # uint8 (N, C, H, W), on the CPU; a batch is moved to the device per step
    held = pixels[held_idx]
    order = DataOrder(len(train_idx), cfg.batch_size, cfg.seed)
    B = cfg.batch_size
    t0, window, last_loss = time.perf_counter(), [], float("nan")
    elapsed = lambda: prior + time.perf_counter() - t0  # noqa: E731
    t_window, ips = time.perf_counter(), 0.0
    limit_s = cfg.time_limit * 60 if cfg.time_limit is not None else math.inf
    step, stopped_by, psnr = start, "steps", float("nan")

    def save(step: int, final: bool) -> float:
        p = _evaluate(ema, held, device)
        rec = {"step": step, "psnr_holdout": round(float(p.mean()), 4), "psnr_holdout_worst": round(float(p.min()), 4),
               "elapsed": round(elapsed(), 2)}
        atomic.append_line(run.metrics, json.dumps(rec))
        meta = {"train_config": cfg.to_dict(), "step": str(step), "seconds": str(round(elapsed(), 3)),
                "autoencoder_config": acfg.to_dict()}
        checkpoint.write(run.checkpoint_path(step), _state(model, ema, opt, disc, opt_d), meta, AE_STATE_FORMAT)
        for old in run.list_checkpoints()[: -cfg.keep_last]:
            old.unlink(missing_ok=True)
        save_autoencoder(run.model, ema, None,
                         training={"steps": step, "images_seen": step * B, "dataset": str(cfg.data_dir),
                                   "dataset_images": N, "holdout_images": len(held_idx), "resolution": f"{H}x{W}",
                                   "psnr_holdout": round(float(p.mean()), 3), "loss": cfg.loss,
                                   "kl_weight": cfg.kl_weight, "discriminator": bool(cfg.disc_start),
                                   "seconds": round(elapsed(), 1), "final": final},
                         dtype=torch.float16 if cfg.save_dtype == "fp16" else torch.float32)
        log(f"step {step}: held-out PSNR {float(p.mean()):.2f} dB (worst {float(p.min()):.2f})")
        return float(p.mean())

    with StopFlag() as stop:
        while step < cfg.steps:
            g = step_generator(cfg.seed, 2, step)
            idx = train_idx[order.batch_indices(step)]
            flip = torch.rand(B, generator=g) < 0.5
            x = pixels[idx].float() / 127.5 - 1
            if cfg.flip:
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = x.to(device)
            q = model.encode(x)
            eps = torch.randn(q.mean.shape, generator=g).to(device)
            x_hat = model.decode(q.mean + q.std * eps)
            loss = autoencoder_loss(x, x_hat, q.kl(), cfg.loss, cfg.kl_weight)
            use_disc = disc is not None and step >= cfg.disc_start
            if use_disc:
                loss = loss - cfg.disc_weight * disc(x_hat).mean()
            if not torch.isfinite(loss):
                raise DiffcliError(f"loss is {float(loss)} at step {step + 1}; training stopped. The last good "
                                   f"checkpoint is kept in {run.checkpoints}; try a lower --lr")
            lr = _lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if use_disc:  # hinge loss on real images and the (detached) reconstructions
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat.detach())).mean()
                for group in opt_d.param_groups:
                    group["lr"] = lr
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            with torch.no_grad():
                decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # a short run's EMA is not stuck at init
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            step += 1
            window.append(loss.detach())
            if step % cfg.metrics_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                last_loss = float(torch.stack(window).mean())
                ips = len(window) * B / max(now - t_window, 1e-9)
                atomic.append_line(run.metrics, json.dumps({"step": step, "loss": last_loss, "lr": lr,
                                                            "images_per_second": round(ips, 2),
                                                            "elapsed": round(elapsed(), 2), "images_seen": step * B}))
                window, t_window = [], now
            if progress:
                progress(step, cfg.steps, "" if math.isnan(last_loss) else f"loss {last_loss:.4f}  {ips:.0f} img/s")
            time_up = elapsed() >= limit_s
            last = step == cfg.steps or time_up
            if step % cfg.checkpoint_every == 0 or last or stop.signal is not None:
                psnr = save(step, final=step == cfg.steps)
            if cfg.sample_every and (step % cfg.sample_every == 0 or last):
                _preview(ema, held[:8], run.samples / f"step_{step:07d}.png", device)
            if stop.signal is not None:
                raise Interrupted(f"interrupted at step {step}; checkpoint saved in {run.checkpoints} "
                                  f"(resume with --resume auto)")
            if time_up and step < cfg.steps:
                stopped_by = "time_limit"
                log(f"time limit: stopped at step {step} after {elapsed() / 60:.1f} minutes of training; checkpoint "
                    f"saved (a larger --time-limit or none continues it with --resume auto)")
                break
    if step == start and not run.model.exists():  # --steps already reached by the checkpoint: write the model file
        psnr = save(step, final=True)
    elif math.isnan(psnr):
        psnr = float(_evaluate(ema, held, device).mean())
    secs = time.perf_counter() - t0
    return AETrainResult(str(run.model), str(run.root), step, start, last_loss, round(psnr, 4), round(elapsed(), 2),
                         round((step - start) * B / max(secs, 1e-9), 2), stopped_by)

