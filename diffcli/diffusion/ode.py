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
    Guided,
    ImageNoise,
    Level,
    SampleResult,
    Start,
    _split,
    predict_eps_x0,
    renoise,
    times,
)
from diffcli.diffusion.schedule import NoiseSchedule

KARRAS_RHO = 7.0  # EDM Sec. 3: rho = 7 spends more steps at low noise, where the image takes shape
EDM_SIGMA_MAX = 80.0  # EDM Table 1: sigma_max = 80
FAMILIES: tuple[str, ...] = ("karras", "edm")  # the step schedules computed here (diffcli.diffusion.registry names all)


# --------------------------------------------------------------------------------------------------
# Sigmas, timesteps and step schedules
# --------------------------------------------------------------------------------------------------


def explicit_sigmas(schedule: NoiseSchedule, steps: int, values: Sequence[float]) -> list[float]:
    """Given sigmas (tuned for a model): N + 1 finite values, strictly decreasing, the last 0 and the first
    at most the schedule's sigma_max (a start above it would leave the range the model was trained on)."""
    out = [float(v) for v in values]
    if len(out) != steps + 1:
        raise UsageError(f"{steps} steps need {steps + 1} sigmas, got {len(out)}")
    if not all(math.isfinite(v) for v in out) or out[-1] != 0.0:
        raise UsageError("sigmas must be finite and end at 0")
    if any(a <= b for a, b in zip(out, out[1:])):
        raise UsageError("sigmas must be strictly decreasing")
    top = sigma_max(schedule)
    if out[0] > top * (1 + 1e-9):
        raise UsageError(f"the first sigma {out[0]:g} is above the schedule's sigma_max {top:g}")
    return out


def nfe(sampler: str, steps: int, sigmas: str | Sequence[float] | None = None, schedule: NoiseSchedule | None = None,
        span: int | None = None) -> int:
    """Model evaluations per image: heun evaluates twice per step except the last (to sigma = 0) and
    the first-order edm jump (see edm_jump). span: as for step_sigmas; sigmas may be values (tuned)."""
    if sampler != "heun":
        return steps
    jump = schedule is not None and edm_jump(step_sigmas(schedule, steps, "trailing", sigmas, span), sigmas)
    return 2 * steps - 1 - (1 if jump else 0)


def edm_jump(sig: Sequence[float], sigmas: str | Sequence[float] | None) -> bool:
    """Whether a step list starts with one first-order step down from the schedule's top: an 'edm' list
    (from sigma_max to 80), and a given (tuned) list that starts above 80, so that the edm list given as
    values runs exactly as 'edm' does and a tuned list found from it keeps its first step's rule."""
    if len(sig) <= 2 or sig[0] <= EDM_SIGMA_MAX:
        return False
    if sigmas is not None and not isinstance(sigmas, str):
        return True
    return sigmas == "edm" and sig[1] == EDM_SIGMA_MAX


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


def step_sigmas(schedule: NoiseSchedule, steps: int, spacing: str = "trailing",
                sigmas: str | Sequence[float] | None = None, span: int | None = None) -> list[float]:
    """The N + 1 sigmas an ODE sampler with N steps visits, descending, the last one 0.

    sigmas: None (the --spacing timesteps), 'karras', 'edm', or the N + 1 values themselves (tuned ones,
    diffcli.diffusion.tune), checked by explicit_sigmas.

    span: only the timesteps [0, span) of the schedule are run (image-to-image, diffcli.sampling.edit): the
    --spacing timesteps are those of an N-step schedule over them, and karras/edm sigmas start at
    sigma(span - 1) instead of sigma_max. None (or T) is the whole schedule."""
    if sigmas is not None and not isinstance(sigmas, str):
        return explicit_sigmas(schedule, steps, sigmas)
    if sigmas is not None and sigmas not in FAMILIES:
        raise UsageError(f"unknown sigmas {sigmas!r}; choose karras or edm (or None for the --spacing timesteps)")
    top = sigma_max(schedule)
    if span is not None:
        schedule.timesteps(1, spacing, span)  # the same checks of span as for the timesteps
        top = min(float(schedule.sigmas[span - 1]), top)
    if sigmas in FAMILIES:
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
    """D(x; sigma) = x0_hat from a DDPM model f(x_t, t, y) -> eps or v, counting evaluations (and those
    that were guided: f is a samplers.Guided, which guides only inside its interval of sigma)."""

    def __init__(
        self, f: Guided, schedule: NoiseSchedule, labels: torch.Tensor | None, prediction: str,
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
        out, _ = _split(x_t, self.f(x_t, t, self.labels, sigma))
        self.calls += 1
        _, x0 = predict_eps_x0(x_t, out, ab, self.prediction, self.clip_x0)
        return x0


# --------------------------------------------------------------------------------------------------
# The samplers: each a loop over sigmas[0] > sigmas[1] > ... > sigmas[N] = 0
# --------------------------------------------------------------------------------------------------

Step = Callable[[int, int], None]

# Each stepper takes an optional Constraint (diffcli.diffusion.samplers; diffcli.sampling.edit's inpainting): after every
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
    null_label: int | torch.Tensor | None = None,
    guidance: float = 1.0,
    prediction: str = "epsilon",
    spacing: str = "trailing",
    clip_x0: float | bool | None = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    callback: Callable[[int, int], None] | None = None,
    sigmas: str | Sequence[float] | None = None,
    start: Start | None = None,
    constraint: Constraint | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> SampleResult:
    """Turn per-image noise into images with an ODE sampler; the arguments are those of samplers.sample.

    sigmas: None (the `spacing` timesteps), 'karras', 'edm' or the N + 1 sigmas themselves. With dtype
    float64 the timestep handed to the model is float64 too (for tests against closed forms); otherwise
    float32, as in samplers.sample.
    start: begin at sigma(start.span - 1) from start.x0 + sigma eps instead of at the top from noise alone.
    guidance_interval: (lo, hi): guide only at lo < sigma <= hi (samplers.Guided).
    """
    if sampler not in STEPPERS:
        raise UsageError(f"unknown ODE sampler {sampler!r}; choose one of {', '.join(STEPPERS)}")
    if start is not None and sigmas is not None and not isinstance(sigmas, str):
        raise UsageError("given sigmas start at the top of the schedule; an edit (--init-image) needs edm, karras or none")
    device = torch.device(device)
    B = len(seeds)
    if labels is None and null_label is not None:
        labels = torch.full((B,), null_label, dtype=torch.long)
    if labels is not None:
        labels = labels.to(device)
    sig = step_sigmas(schedule, steps, spacing, sigmas, span=start.span if start is not None else None)
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    denoise = VEDenoiser(Guided(denoiser, guidance, null_label, guidance_interval), schedule, labels, prediction,
                         clip_x0, t_dtype)
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
    return SampleResult(images=x, nfe=denoise.calls, timesteps=ts, sigmas=sig, guided=denoise.f.guided_calls)
