"""NoiseSchedule: betas, alpha_bar and the timesteps a sampler visits.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", DDPM):
    beta_t          variance of the forward step q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    alpha_t         1 - beta_t
    alpha_bar_t     prod_{s<=t} alpha_s, so q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    SNR_t           alpha_bar_t / (1 - alpha_bar_t)
    sigma_t         sqrt((1 - alpha_bar_t) / alpha_bar_t), the noise level of the variance-exploding
                    view x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps used by Karras et al. 2022

Timesteps are 0-based: t = 0 is the least noisy step, t = T - 1 the noisiest. Every table is computed
in float64; the samplers cast what they need to the working dtype at the point of use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diffcli.errors import UsageError
from diffcli.validate import Field, Invalid, check_record, field

KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
MAX_TIMESTEPS = 100_000

# A schedule stored in a model file: every field's type and range (checked before anything is computed)
FIELDS: tuple[Field, ...] = (
    field("kind", str, choices=KINDS),
    field("num_timesteps", int, min=2, max=MAX_TIMESTEPS),
    field("beta_start", float, gt=0, lt=1),
    field("beta_end", float, gt=0, lt=1),
    field("zero_terminal_snr", bool),
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# Beta schedules: small pure functions, float64
# --------------------------------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Sec. 4): betas linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, T, dtype=F64)


def scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Linear in sqrt(beta) (the Stable Diffusion schedule)."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=F64) ** 2


def cosine_alpha_bar(u: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 (Improved DDPM), Eq. 17: f(u) = cos^2(((u + s) / (1 + s)) * pi / 2)."""
    return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM, Eq. 17: alpha_bar_t = f(t/T) / f(0), betas = 1 - alpha_bar_t / alpha_bar_{t-1},
    clipped at 0.999 to avoid the singularity at t = T. Timestep index i covers u in (i/T, (i+1)/T]."""
    u = torch.arange(T + 1, dtype=F64) / T
    f = cosine_alpha_bar(u)
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start (GeoDiff, Xu et al. 2022);
    sigmoid(+-6) is 0.0025 / 0.9975 away from 0 / 1, so the ends sit just inside [beta_start, beta_end]."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift sqrt(alpha_bar) so its last value is 0 and scale it so its first value is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


# --------------------------------------------------------------------------------------------------
# The schedule object
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """What defines a schedule; stored in model files. The defaults are `train`'s (cosine, as the
    shipped model), so inspect-schedule without options shows what a new model trains with."""

    kind: str = "cosine"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False


class NoiseSchedule:
    """The single owner of every beta and alpha_bar in diffcli.

    >>> s = NoiseSchedule("linear", 1000)
    >>> round(float(s.alphas_cumprod[999]), 9)
    4.0358e-05
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise UsageError(f"unknown schedule {kind!r}; choose one of {', '.join(KINDS)}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise UsageError(f"the number of timesteps must be an integer >= 2, got {num_timesteps}")
        if num_timesteps > MAX_TIMESTEPS:
            raise UsageError(f"the number of timesteps must be at most {MAX_TIMESTEPS}, got {num_timesteps}")
        for name, value in (("beta start", beta_start), ("beta end", beta_end)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
                raise UsageError(f"{name} must be in (0, 1), got {value}")
        if beta_start > beta_end:
            raise UsageError(f"beta start ({beta_start}) must not exceed beta end ({beta_end})")
        self.spec = ScheduleSpec(kind, num_timesteps, float(beta_start), float(beta_end), bool(zero_terminal_snr))
        T = num_timesteps
        if kind == "linear":
            betas = linear_betas(T, beta_start, beta_end)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(T, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(T)
        else:
            betas = sigmoid_betas(T, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float64
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        if zero_terminal_snr:
            self.alphas_cumprod[-1] = 0.0  # exact, not 1e-17 from round-off
        ab = self.alphas_cumprod
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ab).sqrt()
        self.snr = ab / (1 - ab)
        self.log_snr = torch.log(ab) - torch.log1p(-ab)
        self.sigmas = ((1 - ab) / ab).sqrt()
        # every table finite up to the last step, whose alpha_bar only a zero-terminal-SNR schedule sets
        # to 0 (the ODE samplers rely on it): long schedules with large betas underflow to 0 earlier
        live = slice(0, T - 1 if zero_terminal_snr else T)
        finite = torch.isfinite(self.sigmas[live]) & torch.isfinite(self.log_snr[live]) & torch.isfinite(betas[live])
        if not bool(finite.all()):
            t = int(finite.logical_not().nonzero()[0])
            raise UsageError(f"alpha_bar underflows to {float(ab[t]):.3g} at timestep {t} of {T}, where sigma is "
                             f"infinite; use fewer timesteps or smaller betas")

    # -- convenience -------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.spec.num_timesteps

    @property
    def kind(self) -> str:
        return self.spec.kind

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a Python float; t = -1 means 'before the first step', alpha_bar = 1."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"NoiseSchedule(kind={s.kind!r}, num_timesteps={s.num_timesteps}, beta_start={s.beta_start}, "
            f"beta_end={s.beta_end}, zero_terminal_snr={s.zero_terminal_snr})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    # -- forward process ---------------------------------------------------------------------------

    def _coef(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=table.device).long().reshape(-1)
        c = table[t].to(device=like.device, dtype=like.dtype)
        return c.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM Eq. 4): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return self._coef(self.sqrt_alphas_cumprod, t, x0) * x0 + self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v target (Salimans & Ho 2022, Sec. 4): v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0."""
        return self._coef(self.sqrt_alphas_cumprod, t, x0) * noise - self._coef(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * x0

    # -- sampling timesteps ------------------------------------------------------------------------

    def timesteps(self, num_steps: int, spacing: str = "trailing", span: int | None = None) -> torch.Tensor:
        """The N timesteps a sampler visits, descending (int64).

        leading  = arange(N) * (T // N), reversed          (DDIM, Song et al. 2021; diffusers 'leading')
        trailing = round(arange(T, 0, -T / N)) - 1         (Lin et al. 2024, Table 2; ends at t = T - 1)
        linspace = round(linspace(0, T - 1, N)), reversed  (diffusers 'linspace')
        Rounding is half-to-even, as numpy's round.

        span: spread the N steps over the timesteps [0, span) only, as if the schedule had span
        timesteps (T above is then span): an image-to-image run that starts part way down (SDEdit,
        diffcli.sampling.edit) still takes N steps. None is the whole schedule.
        """
        T = self.num_timesteps
        if span is not None:
            if not isinstance(span, int) or not 1 <= span <= T:
                raise UsageError(f"span must be between 1 and the schedule's {T} timesteps, got {span}")
            if not isinstance(num_steps, int) or not 1 <= num_steps <= span:
                raise UsageError(f"steps must be between 1 and the {span} timesteps spanned, got {num_steps}")
            T = span
        if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise UsageError(f"steps must be between 1 and the schedule's {T} timesteps, got {num_steps}")
        if spacing not in SPACINGS:
            raise UsageError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        N = num_steps
        if spacing == "leading":
            ts = torch.arange(N, dtype=torch.int64) * (T // N)
            return ts.flip(0)
        if spacing == "trailing":
            # the first N values of numpy's arange(T, 0, -T/N), computed as numpy does
            # (start + k * delta with delta = (start + step) - start), so .5 ties round alike
            delta = (T - T / N) - T
            vals = T + torch.arange(N, dtype=F64) * delta
            return torch.round(vals).to(torch.int64) - 1
        # numpy's linspace(0, T - 1, N): k * step, the last value set to the end point exactly
        vals = torch.arange(N, dtype=F64) * ((T - 1) / (N - 1)) if N > 1 else torch.zeros(1, dtype=F64)
        vals[-1] = T - 1 if N > 1 else 0
        return torch.round(vals).to(torch.int64).flip(0)

    # -- persistence -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "kind": s.kind,
            "num_timesteps": s.num_timesteps,
            "beta_start": s.beta_start,
            "beta_end": s.beta_end,
            "zero_terminal_snr": s.zero_terminal_snr,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> "NoiseSchedule":
        """The schedule a JSON object describes; every field is required and checked (Invalid names
        the first bad one), so a missing kind never silently becomes the default."""
        checked = check_record(d, FIELDS, where)
        try:
            return cls(**checked)
        except UsageError as e:
            raise Invalid(f"{where}: {e}") from None
