"""ODE samplers in sigma space (Karras et al. 2022; DPM-Solver++, Lu et al. 2022).

These samplers integrate the probability-flow ODE of the schedule in its variance-exploding (VE) view.
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", EDM) write
every DDPM-type schedule as x = x_0 + sigma n; a DDPM state x_t maps to it by x = x_t / sqrt(ab_t).

Legend (variable -> paper symbol):
    x               x in the VE view (EDM Eq. 1 with s(t) = 1): x = x_t / sqrt(ab) = x_0 + sigma n
    sigma, sigma_n  sigma_i, sigma_{i+1} (EDM Algorithm 1: t_i, t_{i+1}, since sigma(t) = t there)
    denoise(x, s)   D_theta(x; sigma), the model's estimate of E[x_0 | x] (EDM Eq. 2)
    d               dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (EDM Eq. 3, Alg. 1 l. 4)
    sigma_up/down   the ancestral split of a step (see euler_a)
    lam             lambda = -log sigma, the half log-SNR of DPM-Solver++ (Lu et al. 2022, Sec. 3:
                    lambda_t = log(alpha_t / sigma_t), which is -log sigma in the VE view)
    h, h_last       h_i = lambda_{t_i} - lambda_{t_{i-1}} of this and the previous step
    r               r_i = h_{i-1} / h_i (DPM-Solver++ Algorithm 2)

The model itself is a DDPM denoiser f(x_t, t, y) -> eps or v. At a noise level sigma it is queried at
the (fractional) timestep t whose sigma it is, found by interpolating log sigma linearly over the
schedule's table, as k-diffusion and diffusers do; its input is x_t = x sqrt(ab) with the alpha_bar
that belongs to that sigma, ab = 1 / (1 + sigma^2), so x_t has the variance of the training inputs.

Step schedules (the sigmas visited, descending, always ending at sigma = 0):
    default   the --spacing timesteps of the DDIM/DDPM samplers, sigma_t = schedule.sigmas[t]
    karras    EDM Eq. 5 with rho = 7 between the schedule's sigma_min = sigmas[0] and sigma_max = sigmas[-1]
    edm       the same with EDM's sigma_max = 80 (Karras et al. 2022, Sec. 5) when the schedule's is larger:
              one first-order step from the schedule's sigma_max down to 80, then rho = 7 from 80 to
              sigma_min. A clipped cosine schedule has sigma 2e4 at t = 999 (641 at t = 998), so plain
              karras spends about half of a 10-step budget above sigma = 600, where the image does not
              change; edm spends it where it does.
With a zero-terminal-SNR schedule sigma at t = T - 1 is infinite (alpha_bar = 0); the ODE samplers
clamp it to the largest finite sigma of the table (t = T - 2; about 1.5e4 for the linear schedule)
rather than refuse. Starting from x = sigma_max n leaves out the x_0 in x = x_0 + sigma_max n, a
relative error of 1 / sigma_max (as for every schedule), negligible at that size; ddim takes the
sigma = inf step exactly instead.

Every sampler takes the final step to sigma = 0 as a first-order (Euler) step, which returns
D(x; sigma_last): the ODE is singular at sigma = 0 and the denoised estimate is its limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from diffcli.errors import UsageError
from diffcli.diffusion.samplers import (
    Constraint,
    Denoiser,
    ImageNoise,
    Level,
    SampleResult,
    Start,
    _split,
    guided,
    predict_eps_x0,
    renoise,
    times,
)
from diffcli.diffusion.schedule import NoiseSchedule

SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "heun", "dpm++2m")
SIGMA_SCHEDULES: tuple[str, ...] = ("karras", "edm")
KARRAS_RHO = 7.0  # EDM Sec. 3: rho = 7 spends more steps at low noise, where the image takes shape
DEFAULT_SAMPLER = "dpm++2m"  # with edm sigmas, 15 steps come as close to the ODE's solution as DDIM's 50
DEFAULT_STEPS = 15
DEFAULT_SPACING = "trailing"
EDM_SIGMA_MAX = 80.0  # EDM Table 1: sigma_max = 80


# --------------------------------------------------------------------------------------------------
# Sigmas, timesteps and step schedules
# --------------------------------------------------------------------------------------------------


def resolve_sigmas(sampler: str, sigmas: str | None) -> str | None:
    """The one rule `sample` and `inspect-schedule` share: --sigmas auto is edm for the ODE samplers
    and the --spacing timesteps (None) for ddim/ddpm; none (or None) is the latter."""
    if sigmas in (None, "none"):
        return None
    if sigmas == "auto":
        return "edm" if sampler in SAMPLERS else None
    return sigmas


def resolve_spacing(sigmas: str | None, spacing: str | None) -> str:
    """--spacing applies to the schedule's own timesteps only: with step sigmas it is a mistake to give it."""
    if spacing is not None and sigmas is not None:
        raise UsageError(f"--spacing does not apply to --sigmas {sigmas} (the default for ODE samplers); "
                         "add --sigmas none to step through --spacing timesteps")
    return spacing or DEFAULT_SPACING


def check_sigmas(sampler: str, sigmas: str | None) -> None:
    """--sigmas is None (the --spacing timesteps), 'karras' or 'edm', and only for the ODE samplers."""
    if sigmas is None:
        return
    if sigmas not in SIGMA_SCHEDULES:
        raise UsageError(
            f"unknown sigmas {sigmas!r}; choose karras or edm (or leave it out for the --spacing timesteps)"
        )
    if sampler not in SAMPLERS:
        raise UsageError(
            f"--sigmas {sigmas} needs an ODE sampler ({', '.join(SAMPLERS)}); {sampler} visits the schedule's "
            "own timesteps (choose them with --spacing)"
        )


def nfe(sampler: str, steps: int, sigmas: str | None = None, schedule: NoiseSchedule | None = None,
        span: int | None = None) -> int:
    """Model evaluations per image: heun evaluates twice per step except the last (to sigma = 0) and
    the first-order edm jump (see edm_jump). span: as for step_sigmas."""
    if sampler != "heun":
        return steps
    jump = schedule is not None and edm_jump(step_sigmas(schedule, steps, "trailing", sigmas, span), sigmas)
    return 2 * steps - 1 - (1 if jump else 0)


def edm_jump(sig: Sequence[float], sigmas: str | None) -> bool:
    """Whether an 'edm' step list starts with the first-order step from the schedule's sigma_max to 80."""
    return sigmas == "edm" and len(sig) > 2 and sig[0] > EDM_SIGMA_MAX and sig[1] == EDM_SIGMA_MAX


def _finite_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """sigma_t over the timesteps with finite sigma (all but t = T - 1 under zero terminal SNR)."""
    s = schedule.sigmas
    return s[torch.isfinite(s)]  # (T,) or (T - 1,) float64, increasing


def sigma_max(schedule: NoiseSchedule) -> float:
    """The largest finite sigma of the schedule (the clamp for zero terminal SNR, see the module doc)."""
    return float(_finite_sigmas(schedule)[-1])


def sigma_to_t(schedule: NoiseSchedule, sigma: float) -> float:
    """The fractional timestep whose sigma is `sigma`: log sigma interpolated linearly over the table
    (clamped to its ends). A sigma that is a table value gives its integer t exactly."""
    table = _finite_sigmas(schedule)
    last = len(table) - 1
    if sigma <= float(table[0]):
        return 0.0
    if sigma >= float(table[last]):
        return float(last)
    i = int(torch.searchsorted(table, torch.tensor(sigma, dtype=table.dtype), right=True)) - 1  # table[i] <= sigma
    lo, hi = float(table[i]), float(table[i + 1])
    if sigma == lo:
        return float(i)
    return i + (math.log(sigma) - math.log(lo)) / (math.log(hi) - math.log(lo))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> list[float]:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..N-1; the ends are set exactly (the powers round)."""
    if steps == 1:
        return [sigma_max]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    out = [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)]
    out[0], out[-1] = sigma_max, sigma_min
    return out


def step_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "trailing", sigmas: str | None = None,
                span: int | None = None) -> list[float]:
    """The N + 1 sigmas an ODE sampler with N steps visits, descending, the last one 0.

    span: only the timesteps [0, span) of the schedule are run (image-to-image, diffcli.edit): the
    --spacing timesteps are those of an N-step schedule over them, and karras/edm sigmas start at
    sigma(span - 1) instead of sigma_max. None (or T) is the whole schedule."""
    check_sigmas(SAMPLERS[0], sigmas)  # the value only; any ODE sampler accepts it
    top = sigma_max(schedule)
    if span is not None:
        schedule.timesteps(1, spacing, span)  # the same checks of span as for the timesteps
        top = min(float(schedule.sigmas[span - 1]), top)
    if sigmas in SIGMA_SCHEDULES:
        if not isinstance(steps, int) or steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        low = float(schedule.sigmas[0])
        if sigmas == "edm" and top > EDM_SIGMA_MAX and steps >= 2:
            out = [top] + karras_sigmas(steps - 1, low, EDM_SIGMA_MAX)
        else:
            out = karras_sigmas(steps, low, top)
    else:
        out = [min(float(schedule.sigmas[t]), top) for t in schedule.timesteps(steps, spacing, span).tolist()]
    return out + [0.0]


# --------------------------------------------------------------------------------------------------
# The denoiser in the VE view
# --------------------------------------------------------------------------------------------------


class VEDenoiser:
    """D(x; sigma) = x0_hat from a DDPM model f(x_t, t, y) -> eps or v, counting evaluations."""

    def __init__(
        self, f: Callable, schedule: NoiseSchedule, labels: torch.Tensor | None, prediction: str,
        clip_x0: float | bool | None, t_dtype: torch.dtype,
    ) -> None:
        self.f, self.schedule, self.labels = f, schedule, labels
        self.prediction, self.clip_x0, self.t_dtype = prediction, clip_x0, t_dtype
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        B = x.shape[0]
        ab = 1.0 / (1.0 + sigma**2)  # alpha_bar consistent with sigma: sigma^2 = (1 - ab) / ab
        x_t = x * math.sqrt(ab)  # back to the DDPM view the model was trained on
        t = torch.full((B,), sigma_to_t(self.schedule, sigma), device=x.device, dtype=self.t_dtype)
        out, _ = _split(x_t, self.f(x_t, t, self.labels))
        self.calls += 1
        _, x0 = predict_eps_x0(x_t, out, ab, self.prediction, self.clip_x0)
        return x0


# --------------------------------------------------------------------------------------------------
# The samplers: each a loop over sigmas[0] > sigmas[1] > ... > sigmas[N] = 0
# --------------------------------------------------------------------------------------------------

Step = Callable[[int, int], None]

# Each stepper takes an optional Constraint (diffcli.diffusion.samplers; diffcli.edit's inpainting): after every
# step it puts back what is known at the new level, and each step but the last is taken
# times(constraint, ...) times, going back up from sigma_n to sigma with _back in between. Without
# one, `times` is 1 and _known returns x itself, so a plain run does exactly what it did before.


def _known(constraint: Constraint | None, x: torch.Tensor, sigma: float, noise: ImageNoise) -> torch.Tensor:
    """x after the constraint at noise level sigma (the VE view: a = 1, s = sigma); x itself without one."""
    return x if constraint is None else constraint(x, Level(1.0, sigma), noise)


def _back(x: torch.Tensor, sigma_n: float, sigma: float, noise: ImageNoise) -> torch.Tensor:
    """RePaint's resampling: from sigma_n back up to sigma by the forward process, x + sqrt(sigma^2 - sigma_n^2) z."""
    return renoise(x, Level(1.0, sigma_n), Level(1.0, sigma), noise)


def euler(denoise: VEDenoiser, x: torch.Tensor, sigmas: Sequence[float], noise: ImageNoise, callback: Step,
          constraint: Constraint | None = None) -> torch.Tensor:
    """EDM Algorithm 1 without the correction (line 7 onwards): x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i.
    In this parametrisation it is the same update as DDIM with eta = 0, which Song et al. 2021 (DDIM,
    Sec. 4.3, Eq. 14) derive as Euler's method for the same ODE."""
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_n = sigmas[i], sigmas[i + 1]
        for r in range(times(constraint, sigma_n == 0)):
            if r:
                x = _back(x, sigma_n, sigma, noise)
            d = (x - denoise(x, sigma)) / sigma
            x = x + (sigma_n - sigma) * d
            x = _known(constraint, x, sigma_n, noise)
        callback(i + 1, N)
    return x


def euler_a(denoise: VEDenoiser, x: torch.Tensor, sigmas: Sequence[float], noise: ImageNoise, callback: Step,
            constraint: Constraint | None = None) -> torch.Tensor:
    """Euler ancestral: each step goes deterministically down to sigma_down, then fresh noise brings the
    level back up to sigma_n. The split makes the step the DDPM posterior q(x_n | x, x0_hat) (DDIM Eq. 16
    with eta = 1, written in the VE view): with ab = 1 / (1 + sigma^2),
        sigma_up^2   = sigma_n^2 (sigma^2 - sigma_n^2) / sigma^2   (DDIM's sigma_t(1)^2 / ab_n)
        sigma_down^2 = sigma_n^2 - sigma_up^2                      (noise kept along the predicted eps)
    so x_n = x0_hat + sigma_down eps_hat + sigma_up z, with eps_hat = d. No noise on the step to sigma = 0.
    The noise z comes from each image's own generator, one draw per step, in order."""
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_n = sigmas[i], sigmas[i + 1]
        sigma_up = min(sigma_n, math.sqrt(max(sigma_n**2 * (sigma**2 - sigma_n**2) / sigma**2, 0.0)))
        sigma_down = math.sqrt(max(sigma_n**2 - sigma_up**2, 0.0))
        for r in range(times(constraint, sigma_n == 0)):
            if r:
                x = _back(x, sigma_n, sigma, noise)
            d = (x - denoise(x, sigma)) / sigma
            x = x + (sigma_down - sigma) * d
            if sigma_up > 0:
                x = x + sigma_up * noise.draw()
            x = _known(constraint, x, sigma_n, noise)
        callback(i + 1, N)
    return x


def heun(denoise: VEDenoiser, x: torch.Tensor, sigmas: Sequence[float], noise: ImageNoise, callback: Step,
         constraint: Constraint | None = None) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, no churn): an Euler step to sigma_{i+1}, then the trapezoidal
    correction with the slope there (lines 7-8); the step to sigma = 0 stays Euler (line 6).

    The correction weighs the slope at sigma_{i+1} over the whole step, so a step over a large sigma
    ratio goes far wrong: the cosine schedule's last timestep (beta clipped at 0.999) has sigma 2e4
    against 640 one timestep earlier, and with its --spacing timesteps heun's first step runs from 2e4
    to a few. Use Karras sigmas with heun on such a schedule (their ratios stay moderate)."""
    N = len(sigmas) - 1
    for i in range(N):
        sigma, sigma_n = sigmas[i], sigmas[i + 1]
        for r in range(times(constraint, sigma_n == 0)):
            if r:
                x = _back(x, sigma_n, sigma, noise)
            d = (x - denoise(x, sigma)) / sigma
            x_euler = x + (sigma_n - sigma) * d
            if sigma_n == 0:
                x = x_euler
            else:
                d_n = (x_euler - denoise(x_euler, sigma_n)) / sigma_n  # d'_i
                x = x + (sigma_n - sigma) * (0.5 * d + 0.5 * d_n)
            x = _known(constraint, x, sigma_n, noise)
        callback(i + 1, N)
    return x


def dpmpp_2m(denoise: VEDenoiser, x: torch.Tensor, sigmas: Sequence[float], noise: ImageNoise, callback: Step,
             constraint: Constraint | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, in the VE view (alpha_t = 1, sigma_t = sigma):
        x_n = (sigma_n / sigma) x - (e^{-h} - 1) D_bar,            h = lam_n - lam = log(sigma / sigma_n)
        D_bar = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},                 r = h_last / h
    The first step has no previous D and uses D_bar = D_i (DPM-Solver++(1), which is DDIM); the step to
    sigma = 0 (h = inf, e^{-h} = 0) is first order too and returns D_i, as in k-diffusion.
    A step taken again for a constraint (u > 0, after going back up with fresh noise) is first order too:
    the trajectory was restarted, so D_{i-1} no longer belongs to it, and extrapolating from it on every
    retry compounds (on a Gaussian toy, 3 tries drifted the inpainted mean from 1.3 to 3.3)."""
    N = len(sigmas) - 1
    D_prev: torch.Tensor | None = None
    h_last = 0.0
    for i in range(N):
        sigma, sigma_n = sigmas[i], sigmas[i + 1]
        h = math.log(sigma / sigma_n) if sigma_n > 0 else math.inf  # lam_n - lam with lam = -log sigma
        for u in range(times(constraint, sigma_n == 0)):
            if u:
                x = _back(x, sigma_n, sigma, noise)
            D = denoise(x, sigma)
            if sigma_n == 0:
                x = D
            else:
                D_bar = D
                if D_prev is not None and h_last > 0 and h > 0 and u == 0:
                    r = h_last / h
                    D_bar = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev
                x = (sigma_n / sigma) * x - math.expm1(-h) * D_bar
            x = _known(constraint, x, sigma_n, noise)
        if sigma_n > 0:
            h_last = h
        D_prev = D
        callback(i + 1, N)
    return x


STEPPERS = {"euler": euler, "euler_a": euler_a, "heun": heun, "dpm++2m": dpmpp_2m}


# --------------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------------


def sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    steps: int,
    sampler: str = "heun",
    *,
    seeds: Sequence[int] = (0,),
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance: float = 1.0,
    prediction: str = "epsilon",
    spacing: str = "trailing",
    clip_x0: float | bool | None = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    sigmas: str | None = None,
    start: Start | None = None,
    constraint: Constraint | None = None,
) -> SampleResult:
    """Turn per-image noise into images with an ODE sampler; the arguments are those of samplers.sample.

    sigmas: None (the `spacing` timesteps), 'karras' or 'edm'. With dtype float64 the timestep handed to the
    model is float64 too (for tests against closed forms); otherwise float32, as in samplers.sample.
    start: begin at sigma(start.span - 1) from start.x0 + sigma eps instead of at the top from noise alone.
    """
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown ODE sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_sigmas(sampler, sigmas)
    device = torch.device(device)
    B = len(seeds)
    if labels is None and null_label is not None:
        labels = torch.full((B,), null_label, dtype=torch.long)
    if labels is not None:
        labels = labels.to(device)
    sig = step_sigmas(schedule, steps, spacing, sigmas, span=start.span if start is not None else None)
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    denoise = VEDenoiser(guided(denoiser, guidance, null_label), schedule, labels, prediction, clip_x0, t_dtype)
    noise = ImageNoise(seeds, shape, device, dtype)
    if start is None:
        x = noise.draw() * sig[0]  # x = x_0 + sigma_max n with the signal negligible: (B, C, H, W)
    else:
        # SDEdit (Meng et al. 2022, Sec. 4.1) in the VE view: x = x_0 + sigma_0 eps at the first level visited
        # (= x_t0 / sqrt(ab_t0) of the DDPM view), eps the image's first draw
        x = start.x0.to(device=device, dtype=dtype) + sig[0] * noise.draw()
    cb = callback or (lambda i, n: None)
    if edm_jump(sig, sigmas):
        # edm: the step from the schedule's sigma_max down to 80 is one Euler step for every sampler
        # (a trapezoidal or multistep correction over a 250x sigma ratio is no better than Euler and
        # heun's goes far wrong); the sampler proper starts at sigma = 80
        N = len(sig) - 1
        for r in range(times(constraint, False)):
            if r:
                x = _back(x, sig[1], sig[0], noise)
            x = x + (sig[1] - sig[0]) * (x - denoise(x, sig[0])) / sig[0]
            x = _known(constraint, x, sig[1], noise)
        cb(1, N)
        x = STEPPERS[sampler](denoise, x, sig[1:], noise, lambda i, n: cb(i + 1, N), constraint)
    else:
        x = STEPPERS[sampler](denoise, x, sig, noise, cb, constraint)
    ts = [sigma_to_t(schedule, s) for s in sig[:-1]]
    return SampleResult(images=x, nfe=denoise.calls, timesteps=ts, sigmas=sig)
