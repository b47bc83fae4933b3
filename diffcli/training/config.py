"""TrainConfig: every option of a training run, the ones that must match to resume, and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from diffcli.data.folder import parse_resolution
from diffcli.errors import UsageError
from diffcli.models.dit import preset_config


AUTO_WARMUP = 500  # learning-rate warm-up steps of a long run (the shipped recipe's)


# Training recipes for `train --preset`: option values that replace TrainConfig's defaults (options the
# user gives replace both). `default` is TrainConfig itself, the shipped model's recipe (hours of a
# CPU, best for long runs on a GPU). `quick` is what benchmarks/cpu_curve.py measured to learn fastest
# in the first half hour on a 2-core CPU (README "Training on a CPU"): a model a sixth the cost per
# image, more and smaller steps at a higher learning rate, and an EMA short enough to follow a model
# that is still improving quickly.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "model": "DiT-XS/4",
        "batch_size": 64,
        "lr": 2e-3,
        "warmup_steps": 200,
        "ema_decay": 0.999,
        "checkpoint_every": 500,
        "sample_every": 500,
    },
}

# a folder this small trained on a CPU with the default recipe gets a tip about --preset quick
QUICK_TIP_IMAGES = 50_000


def auto_warmup(steps: int) -> int:
    """500 steps, or a tenth of a shorter run: a 300-step try-out warms up for 30 steps, not all 300."""
    return min(AUTO_WARMUP, steps // 10)


@dataclass
class TrainConfig:
    data_dir: str = ""
    out: str = "runs/default"
    preset: str = "default"  # the recipe (RECIPES) the other defaults came from
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
    warmup_steps: int | None = None  # None: auto_warmup(steps), resolved (and recorded) when the run starts
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
    metrics_every: int = 50  # steps per metrics.jsonl record
    resume: str = "auto"
    tensorboard: bool = False
    save_dtype: str = "fp32"  # weights in model.safetensors: fp32, or fp16 for half the size
    # evaluation while training (diffcli/training/evaluation.py); off by default
    eval_every: int = 0  # steps between evaluations; 0: never
    eval_real: str | None = None  # folder of real images to measure the EMA model's samples against
    eval_images: int = 1000  # samples per evaluation
    time_limit: float | None = None  # minutes of training (all runs of the folder together); None: --steps only
    autoencoder: str | None = None  # an autoencoder file: train on its latents (diffcli/data/latents.py)
    # text-to-image (diffcli/models/text.py, diffcli/data/captions.py): captions from .txt sidecars or metadata.jsonl
    text_encoder: str = "auto"  # auto (builtin when the folder has captions), none, builtin, or a CLIP folder
    caption_column: str = "text"  # metadata.jsonl's column
    caption_dropout: float = 0.1  # captions replaced by the null caption, for classifier-free guidance
    caption_tokens: int = 32  # the builtin encoder's tokens per caption (words; longer captions are cut)
    text_depth: int = 2  # the builtin encoder's transformer layers

    # options that define what is trained: they must match when resuming
    IDENTITY = (
        "preset", "model", "long_skip", "learn_sigma", "resolution", "channels", "crop", "flip", "unconditional",
        "batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "grad_accum",
        "ema_decay", "schedule", "timesteps", "beta_start", "beta_end", "zero_terminal_snr", "prediction",
        "class_dropout", "min_snr_gamma", "timestep_sampling", "seed",
        "text_encoder", "caption_column", "caption_dropout", "caption_tokens", "text_depth",
    )

    @classmethod
    def from_options(cls, preset: str = "default", **given: Any) -> "TrainConfig":
        """A config from a recipe's values and the options given (None: not given, the recipe's or
        TrainConfig's default)."""
        if preset not in RECIPES:
            raise UsageError(f"unknown --preset {preset!r}; choose one of {', '.join(RECIPES)}")
        names = {f.name for f in fields(cls)}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"unknown TrainConfig fields: {sorted(unknown)}")
        values = {**RECIPES[preset], **{k: v for k, v in given.items() if v is not None}}
        return cls(preset=preset, **values)

    def resolve_warmup(self, saved: dict[str, Any] | None = None) -> str | None:
        """Fill in warmup_steps when it was left to diffcli: the resumed run's value, else auto_warmup.
        Returns a line saying what was chosen, or None when the user gave it."""
        if self.warmup_steps is not None:
            return None
        if saved is not None and isinstance(saved.get("warmup_steps"), int):
            self.warmup_steps = saved["warmup_steps"]
            return None
        self.warmup_steps = auto_warmup(self.steps)
        return f"warm-up: {self.warmup_steps} steps (auto: {AUTO_WARMUP} steps, or a tenth of a run shorter than {10 * AUTO_WARMUP})"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        need(self.preset in RECIPES, f"--preset must be one of {', '.join(RECIPES)}, got {self.preset!r}")
        need(self.time_limit is None or (finite(self.time_limit) and self.time_limit > 0),
             f"--time-limit must be a positive number of minutes, got {self.time_limit}")
        need(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(finite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(finite(self.max_grad_norm) and self.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables)")
        need(self.grad_accum >= 1, "--grad-accum must be >= 1")
        need(self.batch_size % self.grad_accum == 0, "--batch-size must be divisible by --grad-accum")
        need(finite(self.ema_decay) and 0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)")
        need(self.prediction in ("epsilon", "v"), "--prediction must be epsilon or v")
        need(finite(self.class_dropout) and 0 <= self.class_dropout <= 1, "--class-dropout must be in [0, 1]")
        need(finite(self.min_snr_gamma) and self.min_snr_gamma >= 0, "--min-snr-gamma must be >= 0 (0 disables)")
        need(finite(self.caption_dropout) and 0 <= self.caption_dropout <= 1, "--caption-dropout must be in [0, 1]")
        need(1 <= self.caption_tokens <= 512, f"--caption-tokens must be between 1 and 512, got {self.caption_tokens}")
        need(0 <= self.text_depth <= 24, f"--text-depth must be between 0 and 24, got {self.text_depth}")
        need(bool(self.caption_column) and len(self.caption_column) <= 255 and self.caption_column.isprintable(),
             "--caption-column must be a column name of metadata.jsonl")
        need(self.text_encoder in ("auto", "none") or not self.unconditional,
             "--unconditional and --text-encoder exclude each other (a text model is conditioned on captions)")
        need(self.timestep_sampling in ("uniform", "logit-normal"), "--timestep-sampling must be uniform or logit-normal")
        need(self.lr_schedule in ("constant", "cosine"), "--lr-schedule must be constant or cosine")
        need(finite(self.guidance) and self.guidance >= 0, "--guidance must be >= 0")
        need(self.checkpoint_every >= 1 and self.sample_every >= 0 and self.metrics_every >= 1,
             "--checkpoint-every and --metrics-every must be >= 1, --sample-every >= 0")
        need(self.keep_last >= 1, "--keep-last must be >= 1")
        need(self.num_workers >= 0, "--num-workers must be >= 0")
        need(self.save_dtype in ("fp32", "fp16"), "--save-dtype must be fp32 or fp16")
        need(self.eval_every >= 0, "--eval-every must be >= 0 (0: never)")
        need(not self.eval_every or self.eval_real, "--eval-every needs --eval-real DIR, the real images to measure against")
        need(not self.eval_real or self.eval_every, "--eval-real needs --eval-every K")
        need(2 <= self.eval_images <= 100_000, f"--eval-images must be between 2 and 100000, got {self.eval_images}")
        need(not (self.zero_terminal_snr and self.prediction == "epsilon"),
             "--zero-terminal-snr needs --prediction v (epsilon cannot be sampled at alpha_bar = 0)")
        need(not (self.autoencoder and self.crop == "random"),
             "--crop random cannot be used with --autoencoder (each image is encoded once, at one crop)")
        need(not (self.autoencoder and self.eval_every),
             "--eval-every is not available for latent models yet; run diffcli eval on the model file")
        H, W = parse_resolution(self.resolution)
        if self.autoencoder:
            return  # the patch size is checked against the latent's size once the autoencoder is read
        # an unknown preset or a resolution the patch size does not divide fails now, not after decoding
        preset_config(self.model, image_height=H, image_width=W, learn_sigma=self.learn_sigma, long_skip=self.long_skip)
