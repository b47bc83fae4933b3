"""TrainConfig and the training loop: EMA, exact resume, previews, metrics, DDP under torchrun.

Randomness: everything random in step s (timesteps, noise, label dropout, flips, crops, data order)
is drawn from generators seeded by (seed, s) for the whole global batch, and each rank takes its
slice. So a run's result depends only on the seed and the global batch, not on the number of
processes, and resuming needs only the step counter (no RNG state to carry over).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from diffcli import __version__, atomic, checkpoint
from diffcli.data import ImageSet, load_folder, parse_resolution
from diffcli.errors import DiffcliError, InputError, Interrupted, OutputExistsError, UsageError
from diffcli.model import DiT, count_parameters, preset_config
from diffcli.schedule import NoiseSchedule

# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    data_dir: str = ""
    out: str = "runs/default"
    # model
    model: str = "DiT-M/4"
    long_skip: bool = True
    learn_sigma: bool = False
    # data
    resolution: str = "32"
    channels: str = "auto"
    crop: str = "center"
    flip: bool = False
    unconditional: bool = False
    # optimisation
    steps: int = 10000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    warmup_steps: int = 500
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.9995
    # diffusion
    schedule: str = "cosine"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    prediction: str = "v"
    class_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # 0 disables Min-SNR weighting
    timestep_sampling: str = "uniform"  # uniform | logit-normal
    guidance: float = 1.5  # default CFG scale stored in the model file; previews use it
    # machinery
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 1000
    keep_last: int = 3
    sample_every: int = 1000
    log_every: int = 50
    resume: str = "auto"
    tensorboard: bool = False
    save_dtype: str = "fp32"  # weights in model.safetensors: fp32, or fp16 for half the size

    # options that define what is trained: they must match when resuming
    IDENTITY = (
        "model", "long_skip", "learn_sigma", "resolution", "channels", "crop", "flip", "unconditional",
        "batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "grad_accum",
        "ema_decay", "schedule", "timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction",
        "class_dropout", "min_snr_gamma", "timestep_sampling", "seed",
    )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        need(self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(finite(self.max_grad_norm) and self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables)")
        need(self.grad_accum >= 1, "--grad-accum must be >= 1")
        need(self.batch_size % self.grad_accum == 0, "--batch-size must be divisible by --grad-accum")
        need(finite(self.ema_decay) and 0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)")
        need(self.prediction in ("epsilon", "v"), "--prediction must be epsilon or v")
        need(finite(self.class_dropout) and 0 <= self.class_dropout <= 1, "--class-dropout must be in [0, 1]")
        need(finite(self.min_snr_gamma) and self.min_snr_gamma >= 0, "--min-snr-gamma must be >= 0 (0 disables)")
        need(self.timestep_sampling in ("uniform", "logit-normal"), "--timestep-sampling must be uniform or logit-normal")
        need(self.lr_schedule in ("constant", "cosine"), "--lr-schedule must be constant or cosine")
        need(finite(self.guidance) and self.guidance >= 0, "--guidance must be >= 0")
        need(self.checkpoint_every >= 1 and self.sample_every >= 0 and self.log_every >= 1,
             "--checkpoint-every and --log-every must be >= 1, --sample-every >= 0")
        need(self.keep_last >= 1, "--keep-last must be >= 1")
        need(self.num_workers >= 0, "--num-workers must be >= 0")
        need(self.save_dtype in ("fp32", "fp16"), "--save-dtype must be fp32 or fp16")
        need(not (self.zero_terminal_snr and self.prediction == "epsilon"),
             "--zero-terminal-snr needs --prediction v (epsilon cannot be sampled at alpha_bar = 0)")
        H, W = parse_resolution(self.resolution)
        # an unknown preset or a resolution the patch size does not divide fails now, not after decoding
        preset_config(self.model, image_height=H, image_width=W, learn_sigma=self.learn_sigma, long_skip=self.long_skip)


# --------------------------------------------------------------------------------------------------
# Distributed set-up (torchrun)
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    from diffcli.generate import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def all_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= d.world
    return x


# --------------------------------------------------------------------------------------------------
# Per-step randomness and data order
# --------------------------------------------------------------------------------------------------


def _gen(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    # a distinct, reproducible generator per (seed, stream...); the mixing constants are arbitrary odd numbers
    s = seed & 0xFFFFFFFF
    for k in stream:
        s = (s * 6364136223846793005 + 1442695040888963407 + k) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator(device=device).manual_seed(s)


class DataOrder:
    """The infinite stream of epoch permutations; global batch k covers stream positions [kB, (k+1)B)."""

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self._cache: dict[int, torch.Tensor] = {}

    def perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = torch.randperm(self.n, generator=_gen(self.seed, 1, epoch))
        return self._cache[epoch]

    def batch_indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        epochs, within = pos // self.n, pos % self.n
        return torch.stack([self.perm(int(e))[int(w)] for e, w in zip(epochs, within)]) if self.n < self.batch else (
            self._fast(int(epochs[0]), int(epochs[-1]), within)
        )

    def _fast(self, e0: int, e1: int, within: torch.Tensor) -> torch.Tensor:
        if e0 == e1:
            return self.perm(e0)[within]
        split = int((within == 0).nonzero()[0])
        return torch.cat([self.perm(e0)[within[:split]], self.perm(e1)[within[split:]]])


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023, Eq. 9 and Sec. 3.4): the x0-loss weight min(SNR, gamma)
    expressed for the eps target (divide by SNR) or the v target (divide by SNR + 1)."""
    clipped = snr.clamp(max=gamma)
    return clipped / snr.clamp(min=1e-12) if prediction == "epsilon" else clipped / (snr + 1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) for x in [-1, 1] quantised to 256 levels (DDPM Sec. 3.3, Eq. 13), elementwise."""
    inv = torch.exp(-log_scale)
    upper = torch.special.ndtr(inv * (x - mean + 1 / 255))
    lower = torch.special.ndtr(inv * (x - mean - 1 / 255))
    prob = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    return -torch.log(prob.clamp(min=1e-12))


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             x0_hat: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
    """Improved DDPM L_vlb (Eqs. 4-6, 15) per sample, in bits per dimension. The mean is frozen
    (x0_hat detached) so this term trains only the variance, as in L_hybrid."""
    ab = schedule.alphas_cumprod.to(x0.device)
    ab_t = ab[t].float()
    ab_prev = torch.where(t > 0, ab[(t - 1).clamp(min=0)].float(), torch.ones_like(ab_t))
    beta = 1 - ab_t / ab_prev
    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta
    # log of beta_tilde, with its t = 0 value (zero) replaced by the t = 1 value, as Improved DDPM
    bt1 = float((1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0]))
    log_bt = torch.log(torch.where(t > 0, beta_tilde, torch.full_like(beta_tilde, bt1)))
    c1 = _bcast(ab_prev.sqrt() * beta / (1 - ab_t), x0)
    c2 = _bcast((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t), x0)
    true_mean = c1 * x0 + c2 * x_t
    model_mean = c1 * x0_hat.detach() + c2 * x_t
    frac = (var_values + 1) / 2
    model_logvar = frac * _bcast(torch.log(beta), x0) + (1 - frac) * _bcast(log_bt, x0)
    kl = normal_kl(true_mean, _bcast(log_bt, x0), model_mean, model_logvar).flatten(1).mean(1)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def diffusion_loss(model: torch.nn.Module, schedule: NoiseSchedule, cfg: TrainConfig, x0: torch.Tensor,
                   y: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample loss: MSE on the eps or v target (DDPM L_simple; Salimans & Ho 2022 for v), with
    optional Min-SNR-gamma weights, plus lambda * L_vlb (lambda = 0.001) for learned variance."""
    x_t = schedule.add_noise(x0, noise, t)
    target = noise if cfg.prediction == "epsilon" else schedule.velocity(x0, noise, t)
    out = model(x_t, t, y).float()
    C = x0.shape[1]
    pred = out[:, :C]
    loss = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
    if cfg.min_snr_gamma > 0:
        snr = schedule.snr.to(x0.device)[t].float()
        loss = loss * min_snr_weight(snr, cfg.min_snr_gamma, cfg.prediction)
    if out.shape[1] == 2 * C:
        ab = _bcast(schedule.alphas_cumprod.to(x0.device)[t].float(), x0)
        if cfg.prediction == "epsilon":
            x0_hat = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
        else:
            x0_hat = ab.sqrt() * x_t - (1 - ab).sqrt() * pred
        loss = loss + 0.001 * schedule.num_timesteps / 1000 * vlb_term(schedule, x0, x_t, t, x0_hat.clamp(-1, 1), out[:, C:])
    return loss


# --------------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------------


class RunDir:
    """config.json, metrics.jsonl, samples/step_NNNNNNN.png, checkpoints/, model.safetensors."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.samples = self.root / "samples"
        self.checkpoints = self.root / "checkpoints"
        self.model = self.root / "model.safetensors"
        self.cache = self.root / "data-cache.safetensors"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:07d}.safetensors"

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step_*.safetensors") if p.name[5:12].isdigit())


# --------------------------------------------------------------------------------------------------
# Training state: model, EMA, optimizer moments (safetensors only)
# --------------------------------------------------------------------------------------------------


def state_tensors(model: DiT, ema: DiT, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"opt.{key}.{name}"] = torch.as_tensor(st[key]).float()
    return tensors


def load_state_tensors(tensors: dict[str, torch.Tensor], model: DiT, ema: DiT, opt: torch.optim.Optimizer) -> None:
    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(sub("model."), strict=True)
    ema.load_state_dict(sub("ema."), strict=True)
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, opt.param_groups[0]["params"]):
        key = f"opt.exp_avg.{name}"
        if key in tensors:
            # fused (CUDA) AdamW keeps its step counter on the parameter's device, the plain one on the CPU
            step_device = p.device if opt.defaults.get("fused") else torch.device("cpu")
            opt.state[p] = {
                "step": tensors[f"opt.step.{name}"].to(torch.float32).reshape(()).to(step_device),
                "exp_avg": tensors[key].to(p.device, p.dtype),
                "exp_avg_sq": tensors[f"opt.exp_avg_sq.{name}"].to(p.device, p.dtype),
            }


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model_path: str
    run_dir: str
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    images_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up (Goyal et al. 2017), then constant or cosine decay to 0."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """The usual warm-up of the EMA decay: min(decay, (1 + step) / (10 + step))."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def sample_timesteps(cfg: TrainConfig, B: int, g: torch.Generator) -> torch.Tensor:
    T = cfg.timesteps
    if cfg.timestep_sampling == "logit-normal":
        # Esser et al. 2024 (SD3), logit-normal(0, 1) over the diffusion time, discretised
        u = torch.sigmoid(torch.randn(B, generator=g, dtype=torch.float64))
        return (u * T).long().clamp(0, T - 1)
    return torch.randint(0, T, (B,), generator=g)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits 130."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          progress: Callable[[int, int, str], None] | None = None,
          decode_progress: Callable[[int, int], None] | None = None) -> TrainResult:
    cfg.validate()
    d, device = init_distributed(cfg.device)
    try:
        result = _train(cfg, d, device, log if d.main else (lambda m: None), progress if d.main else None,
                        decode_progress if d.main else None)
        if d.active:  # let rank 0 finish writing before any rank tears the process group down
            import torch.distributed as dist

            dist.barrier()
        return result
    finally:
        if d.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resolve_resume(cfg: TrainConfig, run: RunDir) -> Path | None:
    if cfg.resume == "never":
        if run.list_checkpoints():
            raise OutputExistsError(
                f"{run.root} already holds a run; use --resume auto to continue it or choose another --out"
            )
        return None
    if cfg.resume == "auto":
        ckpts = run.list_checkpoints()
        return ckpts[-1] if ckpts else None
    path = Path(cfg.resume)
    if not path.exists():
        raise InputError(f"--resume: checkpoint not found: {path}")
    return path


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    from diffcli.generate import resolve_precision

    return resolve_precision(cfg.precision, device)


def _train(cfg: TrainConfig, d: Dist, device: torch.device, log: Callable[[str], None],
           progress: Callable[[int, int, str], None] | None,
           decode_progress: Callable[[int, int], None] | None) -> TrainResult:
    started = time.time()  # temporary files in the run folder older than this are from a killed run
    H, W = parse_resolution(cfg.resolution)
    run = RunDir(cfg.out)
    resume_path = _resolve_resume(cfg, run)
    start_step = 0
    state_meta: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    if resume_path is not None:
        state, state_meta = checkpoint.read_state(resume_path)  # every field and tensor checked
        saved = checkpoint.meta_json(state_meta, "train_config", resume_path)
        diff = [k for k in TrainConfig.IDENTITY if k in saved and saved[k] != getattr(cfg, k)]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {getattr(cfg, k)!r})" for k in diff[:4])
            raise UsageError(f"cannot resume {resume_path.name} with different options: it was trained with {shown}")
        start_step = int(state_meta.get("step", "0"))
        log(f"resuming from {resume_path} at step {start_step}")

    # ---- data ------------------------------------------------------------------------------------
    data = load_folder(cfg.data_dir, (H, W), cfg.channels, cfg.crop, cfg.unconditional, cfg.num_workers,
                       decode_progress, cache_path=run.cache if d.main else None, log=log)
    if data.skipped:
        names = ", ".join(Path(f).name for f, _ in data.skipped[:5])
        log(f"warning: skipped {len(data.skipped)} unreadable file(s): {names}{' ...' if len(data.skipped) > 5 else ''}")
    C = data.pixels.shape[1]
    K = len(data.class_names)
    log(f"data: {len(data.files)} images, {C} channel(s), {H}x{W}, "
        + (f"{K} classes ({', '.join(data.class_names[:10])}{', ...' if K > 10 else ''})" if K else "unconditional"))

    # ---- model, EMA, optimizer -----------------------------------------------------------------
    mcfg = preset_config(cfg.model, image_height=H, image_width=W, in_channels=C, num_classes=K,
                         learn_sigma=cfg.learn_sigma, long_skip=cfg.long_skip)
    with torch.random.fork_rng(devices=[]):  # initialisation from the seed, without touching global RNG
        torch.manual_seed(cfg.seed)
        model = DiT(mcfg)
    ema = DiT(mcfg)
    ema.load_state_dict(model.state_dict())
    model.to(device)
    ema.to(device).eval().requires_grad_(False)
    use_cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            **({"fused": True} if use_cuda else {}))
    if state:
        checkpoint.check_state_fits(state_meta, mcfg, resume_path)
        load_state_tensors(state, model, ema, opt)
    schedule = NoiseSchedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.zero_terminal_snr)
    dtype = _precision(cfg, device)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and use_cuda) else None
    net: torch.nn.Module = model
    if d.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[d.local_rank] if use_cuda else None)
    if cfg.compile:
        net = torch.compile(net)
    log(f"model: {cfg.model}{' +long-skip' if cfg.long_skip else ''}, {count_parameters(model) / 1e6:.2f} M parameters; "
        f"{device.type}{f' x{d.world}' if d.active else ''}, {str(dtype).removeprefix('torch.')}")

    # ---- run folder ------------------------------------------------------------------------------
    summary = {"dataset": {**data.summary(), "path": str(cfg.data_dir)}, "model_config": mcfg.to_dict(),
               "parameters": count_parameters(model), "world_size": d.world, "diffcli_version": __version__}
    if d.main:
        atomic.write_bytes(run.config, json.dumps({"train": cfg.to_dict(), **summary}, indent=2).encode())
        for folder in (run.root, run.checkpoints, run.samples):
            atomic.remove_stale_temps(folder, older_than=started)
        trim_metrics(run.metrics, start_step)
    tb = _tensorboard(cfg, run) if d.main else None

    pixels = data.pixels.to(device)  # the whole cached set lives on the training device
    labels = data.labels.to(device)
    order = DataOrder(len(data.files), cfg.batch_size, cfg.seed)
    B, world = cfg.batch_size, d.world
    if B % world:
        raise UsageError(f"--batch-size {B} must be divisible by the number of processes ({world})")
    per_rank = B // world
    if per_rank % cfg.grad_accum:
        raise UsageError(f"the per-process batch {per_rank} must be divisible by --grad-accum {cfg.grad_accum}")
    micro = per_rank // cfg.grad_accum
    null = K  # the null class index (unconditional models only have it)

    def save(step: int, final: bool = False) -> None:
        if not d.main:
            return
        meta = {"train_config": cfg.to_dict(), "step": str(step), "seconds": str(round(elapsed(), 3)),
                "class_names": data.class_names,
                "model_config": mcfg.to_dict(), "schedule": schedule.to_dict()}
        checkpoint.write(run.checkpoint_path(step), state_tensors(model, ema, opt), meta, checkpoint.STATE_FORMAT)
        for old in run.list_checkpoints()[: -cfg.keep_last]:
            old.unlink(missing_ok=True)
        checkpoint.save_model(run.model, ema, schedule, cfg.prediction, data.class_names,
                              training={"steps": step, "images_seen": step * B, "dataset_images": len(data.files),
                                        "dataset": str(cfg.data_dir), "preset": cfg.model, "batch_size": B,
                                        "lr": cfg.lr, "seconds": round(elapsed(), 1), "final": final},
                              sampling={"guidance": cfg.guidance if K else 1.0},
                              dtype=torch.float16 if cfg.save_dtype == "fp16" else torch.float32)

    # ---- loop ------------------------------------------------------------------------------------
    t_start = time.perf_counter()
    prior_seconds = float(state_meta.get("seconds", "0") or 0)
    elapsed = lambda: prior_seconds + time.perf_counter() - t_start  # noqa: E731
    window: list[torch.Tensor] = []
    window_gn: list[torch.Tensor] = []
    t_window, smooth = time.perf_counter(), None
    last_loss = float("nan")
    step = start_step
    with StopFlag() as stop:
        while step < cfg.steps:
            g = _gen(cfg.seed, 2, step)
            idx = order.batch_indices(step)  # (B,) global batch
            t_all = sample_timesteps(cfg, B, g)
            noise_all = torch.randn((B, C, H, W), generator=g)
            drop = torch.rand(B, generator=g) < cfg.class_dropout
            flip = torch.rand(B, generator=g) < 0.5
            lo = d.rank * per_rank
            mine = slice(lo, lo + per_rank)
            x0 = _augment(pixels[idx[mine].to(device)], cfg, H, W, flip[mine], g, lo, device)
            y = labels[idx[mine].to(device)].clone()
            y[drop[mine].to(device)] = null
            if not K:
                y.fill_(null)
            t_mine, noise_mine = t_all[mine].to(device), noise_all[mine].to(device)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for a in range(cfg.grad_accum):
                s = slice(a * micro, (a + 1) * micro)
                sync = not d.active or a == cfg.grad_accum - 1
                ctx = net.no_sync() if (d.active and not sync and hasattr(net, "no_sync")) else _null()
                with ctx, torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    per = diffusion_loss(net, schedule, cfg, x0[s], y[s], t_mine[s], noise_mine[s])
                    loss = per.mean() / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(opt)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            loss_avg = all_mean(loss_sum, d)
            if not torch.isfinite(loss_avg):
                raise DiffcliError(
                    f"loss is {float(loss_avg)} at step {step + 1}; training stopped. The last good checkpoint "
                    f"is kept in {run.checkpoints}; try a lower --lr or --precision fp32"
                )
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            _ema_update(ema, model, ema_decay_at(cfg, step))
            step += 1
            window.append(loss_avg)
            window_gn.append(gn.detach())
            if step % cfg.log_every == 0 or step == cfg.steps:
                losses = torch.stack(window).float().cpu()
                mean_loss = float(losses.mean())
                last_loss = mean_loss
                smooth = mean_loss if smooth is None else 0.9 * smooth + 0.1 * mean_loss
                now = time.perf_counter()
                ips = len(window) * B / max(now - t_window, 1e-9)
                rec = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": float(torch.stack(window_gn).float().mean()),
                       "images_per_second": round(ips, 2), "elapsed": round(elapsed(), 2), "images_seen": step * B}
                if d.main:
                    atomic.append_line(run.metrics, json.dumps(rec))
                    if tb is not None:
                        for k in ("loss", "lr", "grad_norm", "images_per_second"):
                            tb.add_scalar(k, rec[k], step)
                window, window_gn, t_window = [], [], now
                if progress:
                    progress(step, cfg.steps, f"loss {smooth:.4f}  {ips:.0f} img/s")
            elif progress:
                progress(step, cfg.steps, f"loss {smooth:.4f}" if smooth is not None else "")
            stop_now = _agree(stop.signal is not None, d, device)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_now:
                save(step, final=step == cfg.steps)
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps) and d.main:
                preview(ema, schedule, cfg, data.class_names, run.samples / f"step_{step:07d}.png", device)
            if stop_now:
                raise Interrupted(f"interrupted at step {step}; checkpoint saved in {run.checkpoints} "
                                  f"(continue with --resume auto)")
    if tb is not None:
        tb.close()
    secs = time.perf_counter() - t_start
    done = step - start_step
    return TrainResult(str(run.model), str(run.root), step, start_step, last_loss, round(elapsed(), 2),
                       round(done * B / max(secs, 1e-9), 2))


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics records up to the step training starts from. Records after it (logged before a
    crash, after the last checkpoint) are logged again, and a line cut short by a crash would
    otherwise end up in the middle of the file once new lines are appended."""
    if not path.exists():
        return
    raw = path.read_bytes()
    keep = []
    for line in raw.split(b"\n")[:-1]:  # what follows the last newline is a cut-short line
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and step <= last_step:
            keep.append(line + b"\n")
    if b"".join(keep) != raw:
        atomic.write_bytes(path, b"".join(keep))


# save() reads elapsed() through the closure defined before the loop
def _null():
    import contextlib

    return contextlib.nullcontext()


def _agree(flag: bool, d: Dist, device: torch.device) -> bool:
    """All ranks stop together when any rank received a signal."""
    if not d.active:
        return flag
    x = torch.tensor([1.0 if flag else 0.0], device=device)
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item() > 0)


@torch.no_grad()
def _ema_update(ema: DiT, model: DiT, decay: float) -> None:
    ema_p = list(ema.parameters())
    p = [q.detach() for q in model.parameters()]
    torch._foreach_lerp_(ema_p, p, 1 - decay)  # ema = decay * ema + (1 - decay) * p


def _augment(x: torch.Tensor, cfg: TrainConfig, H: int, W: int, flip: torch.Tensor, g: torch.Generator,
             offset: int, device: torch.device) -> torch.Tensor:
    """uint8 (b, C, h, w) -> float [-1, 1] (b, C, H, W): random crop (if cached larger) and flips."""
    if x.shape[-2:] != (H, W):
        b = x.shape[0]
        # crop offsets for the whole global batch come from g; this rank uses its slice
        ys = torch.randint(0, x.shape[-2] - H + 1, (cfg.batch_size,), generator=g)[offset : offset + b]
        xs = torch.randint(0, x.shape[-1] - W + 1, (cfg.batch_size,), generator=g)[offset : offset + b]
        x = torch.stack([x[i, :, int(ys[i]) : int(ys[i]) + H, int(xs[i]) : int(xs[i]) + W] for i in range(b)])
    x = x.float() / 127.5 - 1
    if cfg.flip:
        f = flip.to(device)
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    return x


def _tensorboard(cfg: TrainConfig, run: RunDir):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install 'diffcli[tensorboard]'") from None
    return SummaryWriter(str(run.root / "tensorboard"))


@torch.no_grad()
def preview(ema: DiT, schedule: NoiseSchedule, cfg: TrainConfig, class_names: list[str], path: Path,
            device: torch.device, steps: int = 25, per_class: int = 4) -> None:
    """A grid from a fixed seed with the EMA weights: one row per class (per_class images each), or
    16 images for an unconditional model."""
    from diffcli.images import make_grid, save_png, to_pil, to_uint8
    from diffcli.samplers import sample

    K = len(class_names)
    if K:
        per = per_class if K <= 16 else 1
        labels = torch.arange(K).repeat_interleave(per)
        cols = per if K <= 16 else math.ceil(math.sqrt(K))
    else:
        labels, cols = None, 4
    n = len(labels) if labels is not None else 16
    cfg_m = ema.config
    res = sample(ema, schedule, (cfg_m.in_channels, cfg_m.image_height, cfg_m.image_width), steps, "ddim",
                 seeds=list(range(n)), labels=labels, null_label=ema.null_class if K else None,
                 guidance=cfg.guidance if K else 1.0, prediction=cfg.prediction, device=device)
    grid = to_pil(make_grid(to_uint8(res.images), ncols=cols))
    scale = max(1, 64 // min(cfg_m.image_height, cfg_m.image_width))
    if scale > 1:
        from PIL import Image

        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    save_png(path, grid, overwrite=True)
