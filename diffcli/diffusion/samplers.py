"""Samplers: each an explicit loop over one NoiseSchedule, driven by any denoiser f(x, t, y).

Legend (variable -> paper symbol):
    ab_t, ab_prev   alpha_bar_t, alpha_bar_{t_prev}   (DDPM; alpha_bar_prev = 1 after the last step)
    eps             epsilon_theta(x_t, t), the predicted noise
    x0              x_0 hat, the predicted clean image (DDIM's "predicted x_0", Eq. 12)
    v               v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022)
    sigma           DDIM's sigma_t(eta) (Song et al. 2021, Eq. 16)

Every image gets its own CPU torch.Generator seeded with its own seed, and draws its initial noise and
then each step's noise from it in order, so an image depends only on its seed (not on the batch it is
in, the number of images around it, or the device).

Editing (diffcli.sampling.edit) enters through two small hooks that every loop here and in diffcli.diffusion.ode takes:
a `Start` (begin from noised images part way down the schedule instead of from pure noise) and a
`Constraint` (called after every step with the new x, to put back what is known; it may ask for each
step to be taken several times, going back up by the forward process in between).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from diffcli.errors import UsageError
from diffcli.diffusion.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

PREDICTIONS = ("epsilon", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned")
LOOPS = ("ddim", "ddpm")  # the samplers of this module's loop; diffcli.diffusion.registry lists every sampler


# --------------------------------------------------------------------------------------------------
# From the model output to (eps, x0)
# --------------------------------------------------------------------------------------------------


def _clip_value(clip_x0: float | bool | None) -> float | None:
    if clip_x0 is None or clip_x0 is False:
        return None
    return 1.0 if clip_x0 is True else float(clip_x0)


def predict_eps_x0(
    x_t: torch.Tensor, model_output: torch.Tensor, ab_t: float, prediction: str, clip_x0: float | bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from the model's output at a step with alpha_bar_t = ab_t.

    epsilon: x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)          (DDPM Eq. 15, DDIM Eq. 12)
    v:       x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v,  eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v
    When x0 is clipped, eps is recomputed from the clipped x0 so that the update stays on the line
    through x_t and x0 (as in the guided-diffusion reference implementation).
    """
    a, s = math.sqrt(ab_t), math.sqrt(1.0 - ab_t)
    if prediction == "epsilon":
        if a == 0.0:
            raise UsageError("epsilon prediction cannot be sampled at alpha_bar = 0 (zero terminal SNR); use v")
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction == "v":
        x0 = a * x_t - s * model_output
        eps = s * x_t + a * model_output
    else:
        raise UsageError(f"unknown prediction type {prediction!r}; choose epsilon or v")
    c = _clip_value(clip_x0)
    if c is not None:
        x0 = x0.clamp(-c, c)
        if s > 0:
            eps = (x_t - a * x0) / s
    return eps, x0


def _split(x_t: torch.Tensor, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A learn_sigma model outputs 2C channels: (prediction, variance values)."""
    C = x_t.shape[1]
    if model_output.shape[1] == 2 * C:
        return model_output[:, :C], model_output[:, C:]
    return model_output, None


# --------------------------------------------------------------------------------------------------
# One step of each sampler
# --------------------------------------------------------------------------------------------------


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
    clip_x0: float | bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM (Song et al. 2021, Eq. 12): t_prev = -1 means alpha_bar_prev = 1.

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
    sigma  = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)   (Eq. 16)
    """
    out, _ = _split(x_t, model_output)
    ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    eps, x0 = predict_eps_x0(x_t, out, ab_t, prediction, clip_x0)
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev) if eta > 0 else 0.0
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def ddpm_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: int,
    t_prev: int,
    noise: torch.Tensor | None = None,
    prediction: str = "epsilon",
    variance: str = "fixed_small",
    clip_x0: float | bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPM ancestral step from t to t_prev (any stride), t_prev = -1 meaning alpha_bar_prev = 1.

    For a strided step the forward variance is recomputed: beta' = 1 - ab_t / ab_prev.
    Posterior q(x_prev | x_t, x0) (DDPM Eqs. 6-7):
        mean   = sqrt(ab_prev) beta' / (1 - ab_t) x0 + sqrt(1 - beta') (1 - ab_prev) / (1 - ab_t) x_t
        var    = fixed_small: beta_tilde = (1 - ab_prev) / (1 - ab_t) beta';  fixed_large: beta'
                 learned (Improved DDPM Eq. 15): exp(f log beta' + (1 - f) log beta_tilde), f = (v + 1) / 2
    No noise is added on the last step (t_prev = -1), as DDPM Algorithm 2.
    """
    out, var_values = _split(x_t, model_output)
    ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    eps, x0 = predict_eps_x0(x_t, out, ab_t, prediction, clip_x0)
    beta = 1 - ab_t / ab_prev
    beta_tilde = (1 - ab_prev) / (1 - ab_t) * beta
    mean = (math.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x_t
    if t_prev < 0:
        return mean, x0
    if noise is None:
        raise ValueError("ddpm_step needs noise except on the last step")
    if variance == "fixed_small":
        std: torch.Tensor | float = math.sqrt(beta_tilde)
    elif variance == "fixed_large":
        std = math.sqrt(beta)
    elif variance == "learned":
        if var_values is None:
            raise UsageError("variance 'learned' needs a model trained with learn_sigma")
        frac = (var_values + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(max(beta_tilde, 1e-20))
        std = torch.exp(0.5 * log_var)
    else:
        raise UsageError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
    return mean + std * noise, x0


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance and per-image noise
# --------------------------------------------------------------------------------------------------


class Guided:
    """f(x, t, y) with classifier-free guidance (Ho & Salimans 2022):
    out = out_u + w (out_c - out_u), cond and uncond in one batched forward; w = 1 skips the uncond half.
    null_label: the null class, or for a text model a (1, L) token row for the uncond half (the null
    caption, or a negative prompt as in Stable Diffusion's negative prompting).
    For a learn_sigma model the variance half is the conditional one.

    interval (lo, hi): guidance only where lo < sigma <= hi, a single conditional forward elsewhere
    (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution
    Quality in Diffusion Models", Eq. 6); the caller passes the sigma of the step. guided_calls counts the
    evaluations that were guided."""

    def __init__(self, denoiser: Denoiser, guidance: float, null_label: int | torch.Tensor | None,
                 interval: tuple[float, float] | None = None) -> None:
        self.denoiser, self.guidance, self.null_label, self.interval = denoiser, guidance, null_label, interval
        self.guided_calls = 0

    def guides(self, sigma: float | None) -> bool:
        if self.guidance == 1.0 or self.null_label is None:
            return False
        if self.interval is None or sigma is None:
            return True
        lo, hi = self.interval
        return lo < sigma <= hi

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                 sigma: float | None = None) -> torch.Tensor:
        if not self.guides(sigma):
            return self.denoiser(x, t, y)
        self.guided_calls += 1
        B, C = x.shape[:2]
        if isinstance(self.null_label, torch.Tensor):  # a text model: the null caption's or a negative prompt's token row
            y_null = self.null_label.to(y.device).expand_as(y)
        else:
            y_null = torch.full_like(y, self.null_label)
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = out[:B], out[B:]
        pred = uncond[:, :C] + self.guidance * (cond[:, :C] - uncond[:, :C])
        return pred if out.shape[1] == C else torch.cat([pred, cond[:, C:]], dim=1)


class ImageNoise:
    """One CPU generator per image, seeded with that image's seed."""

    def __init__(self, seeds: Sequence[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
        self.gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape, self.device, self.dtype = tuple(shape), device, dtype

    def draw(self) -> torch.Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])  # (B, C, H, W) fp32 CPU
        return z.to(device=self.device, dtype=self.dtype)


# --------------------------------------------------------------------------------------------------
# Editing hooks: where a run starts, and what is put back after each step (used by diffcli.sampling.edit)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """A noise level as a loop's x holds it: x = a x_0 + s eps. In this module's DDPM view a = sqrt(ab_t),
    s = sqrt(1 - ab_t); in diffcli.diffusion.ode's VE view a = 1, s = sigma. Level(1.0, 0.0) is the clean image."""

    a: float
    s: float


def ddpm_level(schedule: NoiseSchedule, t: int) -> Level:
    """The level of timestep t in the DDPM view (t = -1: the clean image, a = 1, s = 0 exactly)."""
    ab = schedule.alpha_bar(t)
    return Level(math.sqrt(ab), math.sqrt(1.0 - ab))


@dataclass
class Start:
    """Begin from images instead of pure noise (SDEdit, Meng et al. 2022, Sec. 4.1): the steps are spread
    over the timesteps [0, span) of the schedule only, and x0 (B, C, H, W, model space) is noised to the
    first level visited with the image's first noise draw. span = T starts at the top, like plain sampling."""

    x0: torch.Tensor
    span: int


class Constraint(Protocol):
    """Called after every step with x at its new level; returns x with what is known put back (RePaint,
    Lugmayr et al. 2022: diffcli.sampling.edit.Inpaint). Every step but the last (the one to the clean image) is
    taken `resample` times, going back up one step with `renoise` in between (1: once)."""

    resample: int

    def __call__(self, x: torch.Tensor, level: Level, noise: "ImageNoise") -> torch.Tensor: ...


def times(constraint: Constraint | None, to_clean: bool) -> int:
    """How many times a loop takes a step: RePaint's resampling repeats each step except the last
    (Lugmayr et al. 2022, Algorithm 1: 'if u < U and t > 1')."""
    return 1 if constraint is None or to_clean else constraint.resample


def renoise(x: torch.Tensor, lower: Level, higher: Level, noise: "ImageNoise") -> torch.Tensor:
    """One forward step back up, q(x_higher | x_lower) (RePaint Algorithm 1, line 9: x_t ~ N(sqrt(1 - beta_t)
    x_{t-1}, beta_t I)), for any two levels of one view:
        x_h = r x_l + sqrt(s_h^2 - r^2 s_l^2) z,   r = a_h / a_l
    DDPM view: r^2 = ab_h / ab_l and the variance is 1 - ab_h / ab_l, the strided beta; VE view: r = 1 and
    the variance sigma_h^2 - sigma_l^2. z is the image's next draw from its own generator."""
    r = higher.a / lower.a
    std = math.sqrt(max(higher.s**2 - (r * lower.s) ** 2, 0.0))
    return r * x + std * noise.draw()


# --------------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W), model space, about [-1, 1]
    nfe: int  # model evaluations per image (a guided evaluation counts once)
    timesteps: list[int] | list[float]  # where each step queries the model; fractional for diffcli.diffusion.ode
    sigmas: list[float] | None = None  # diffcli.diffusion.ode: the VE noise levels visited, the last one 0
    guided: int = 0  # evaluations with classifier-free guidance (all of them without a guidance interval)


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    steps: int,
    sampler: str = "ddim",
    *,
    seeds: Sequence[int] = (0,),
    labels: torch.Tensor | None = None,
    null_label: int | torch.Tensor | None = None,
    guidance: float = 1.0,
    prediction: str = "epsilon",
    eta: float = 0.0,
    spacing: str = "trailing",
    variance: str = "fixed_small",
    clip_x0: float | bool | None = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    start: Start | None = None,
    constraint: Constraint | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> SampleResult:
    """Turn per-image noise into images with DDIM or DDPM: one image per seed, shape (C, H, W) each.
    (diffcli.diffusion.registry.sample runs any sampler, these and the ODE ones.)

    labels: (B,) class indices (None: unconditional, the null class when the model has one).
    callback(step_index, total_steps) is called after every step (for progress bars).
    start, constraint: the editing hooks (see Start and Constraint; diffcli.sampling.edit builds them).
    guidance_interval: guide only at the timesteps whose sigma is in (lo, hi] (see Guided).
    """
    if sampler not in LOOPS:
        raise UsageError(f"unknown sampler {sampler!r} for this loop; choose one of {', '.join(LOOPS)}")
    device = torch.device(device)
    B = len(seeds)
    if labels is None and null_label is not None:
        labels = torch.full((B,), null_label, dtype=torch.long)
    if labels is not None:
        labels = labels.to(device)
    f = Guided(denoiser, guidance, null_label, guidance_interval)
    noise = ImageNoise(seeds, shape, device, dtype)
    ts = schedule.timesteps(steps, spacing, span=start.span if start is not None else None).tolist()
    x = noise.draw()  # x_T ~ N(0, I), also the first step's input when it is not t = T - 1
    if start is not None:
        # SDEdit (Meng et al. 2022, Sec. 4.1): start from q(x_t0 | x_0) at the first timestep visited,
        # x_t0 = sqrt(ab_t0) x_0 + sqrt(1 - ab_t0) eps (DDPM Eq. 4), eps the image's first draw
        ab = schedule.alpha_bar(ts[0])
        x = math.sqrt(ab) * start.x0.to(device=device, dtype=dtype) + math.sqrt(1.0 - ab) * x
    calls = 0
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        for r in range(times(constraint, t_prev < 0)):
            if r:  # RePaint resampling: back up from t_prev to t by the forward process, take the step again
                x = renoise(x, ddpm_level(schedule, t_prev), ddpm_level(schedule, t), noise)
            t_in = torch.full((B,), float(t), device=device, dtype=torch.float32)
            out = f(x, t_in, labels, float(schedule.sigmas[t]))
            calls += 1
            if sampler == "ddim":
                z = noise.draw() if eta > 0 else None
                x, _ = ddim_step(schedule, x, out, t, t_prev, eta=eta, noise=z, prediction=prediction, clip_x0=clip_x0)
            else:
                z = noise.draw() if t_prev >= 0 else None
                x, _ = ddpm_step(
                    schedule, x, out, t, t_prev, noise=z, prediction=prediction, variance=variance, clip_x0=clip_x0
                )
            if constraint is not None:
                x = constraint(x, ddpm_level(schedule, t_prev), noise)
        if callback is not None:
            callback(i + 1, len(ts))
    return SampleResult(images=x, nfe=calls, timesteps=ts, guided=f.guided_calls)
