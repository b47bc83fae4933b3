"""Every sampler and step schedule diffcli has, what each needs, and `sample`, which runs any of them.

The one place that names them: `sample`, `tune`, `inspect-schedule`, `info` and the step study read
these tables and rules; samplers.py (the DDIM/DDPM loop over the schedule's timesteps) and ode.py (the
ODE samplers over a list of sigmas) implement them and import nothing from here.

Step schedules ("sigma families") of the ODE samplers:
    none     the --spacing timesteps of the schedule (what ddim and ddpm always visit)
    karras   Karras et al. 2022, Eq. 5, rho 7 over the schedule's whole sigma range
    edm      the same from EDM's sigma_max = 80 (one first-order step down to it first)
    tuned    sigmas `diffcli tune` searched for this model, sampler and step count, stored in the model
             file (sampling.tuned); `auto` picks them when the file has them, else edm
A tuned entry may also hold a guidance interval (Kynkaanniemi et al. 2024): classifier-free guidance
only at lo < sigma <= hi, which `--guidance-interval auto` (the default) applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffcli.diffusion import ode, samplers
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.errors import UsageError

# --------------------------------------------------------------------------------------------------
# The samplers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    loop: str  # "timesteps": samplers.sample over the schedule's integer timesteps; "sigmas": ode.sample
    order: int  # order of accuracy of a step of the probability-flow ODE (1 for the stochastic ones)
    stochastic: bool  # draws fresh noise at every step (ddim only with --eta > 0)
    evals_per_step: int  # model evaluations per step (heun: 2, except its last step)
    about: str

    @property
    def takes_sigmas(self) -> bool:
        return self.loop == "sigmas"

    @property
    def tunable(self) -> bool:
        """Deterministic ODE samplers: the same noise gives the same image, so their sigmas can be
        tuned against a reference solve from that noise (diffcli.diffusion.tune)."""
        return self.takes_sigmas and not self.stochastic


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("ddim", "timesteps", 1, False, 1, "DDIM (Song et al. 2021); --eta > 0 adds noise"),
    SamplerSpec("ddpm", "timesteps", 1, True, 1, "DDPM ancestral sampling (Ho et al. 2020)"),
    SamplerSpec("euler", "sigmas", 1, False, 1, "Euler on the probability-flow ODE (EDM Alg. 1 without the correction)"),
    SamplerSpec("euler_a", "sigmas", 1, True, 1, "Euler ancestral: the DDPM posterior in the VE view"),
    SamplerSpec("heun", "sigmas", 2, False, 2, "Heun's second-order method (EDM Alg. 1)"),
    SamplerSpec("dpm++2m", "sigmas", 2, False, 1, "DPM-Solver++(2M), multistep (Lu et al. 2022)"),
)}
NAMES: tuple[str, ...] = tuple(SAMPLERS)
ODE_SAMPLERS: tuple[str, ...] = tuple(n for n, s in SAMPLERS.items() if s.takes_sigmas)
TUNABLE: tuple[str, ...] = tuple(n for n, s in SAMPLERS.items() if s.tunable)

DEFAULT_SAMPLER = "dpm++2m"  # with edm sigmas, 15 steps come as close to the ODE's solution as DDIM's 50
DEFAULT_STEPS = 15
DEFAULT_SPACING = "trailing"


def spec(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(NAMES)}")
    return SAMPLERS[sampler]


# --------------------------------------------------------------------------------------------------
# The step schedules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    needs: str
    about: str


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("none", "any sampler", "the schedule's own --spacing timesteps"),
    Family("karras", "an ODE sampler", "Karras et al. 2022 Eq. 5, rho 7, over the schedule's sigma range"),
    Family("edm", "an ODE sampler", "Karras rho 7 from sigma 80 (one first-order step down to it first)"),
    Family("tuned", "a deterministic ODE sampler and a model file tuned for it at that step count (diffcli tune)",
           "sigmas searched for this model by diffcli tune"),
)}
FIXED: tuple[str, ...] = ("edm", "karras", "none")  # what tune compares its result against


@dataclass(frozen=True)
class Tuned:
    """One entry of a model file's sampling.tuned list: sigmas for (sampler, steps), maybe a guidance interval."""

    sampler: str
    steps: int
    sigmas: tuple[float, ...]
    guidance: float  # the scale it was tuned at
    reference: str  # SAMPLER:STEPS of the reference solve
    distance: dict[str, float]  # validation distance to the reference: tuned and every fixed family
    seeds: int  # training seeds (0 .. seeds-1)
    validation_seeds: int
    guidance_interval: tuple[float, float] | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # class accuracy with and without the interval
    interval_distance: dict[str, float] = field(default_factory=dict)  # or its validation distance, when judged so

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sampler": self.sampler, "steps": self.steps, "sigmas": list(self.sigmas),
                             "guidance": self.guidance, "reference": self.reference, "distance": dict(self.distance),
                             "seeds": self.seeds, "validation_seeds": self.validation_seeds}
        if self.guidance_interval is not None:
            d["guidance_interval"] = list(self.guidance_interval)
            d["accuracy"] = dict(self.accuracy)
            if self.interval_distance:
                d["interval_distance"] = dict(self.interval_distance)
        return d


MAX_TUNED = 64


def read_tuned(value: Any, schedule: NoiseSchedule, where: str = "sampling.tuned") -> list[Tuned]:
    """The tuned entries of a model file, every field checked (the file may come from elsewhere):
    raises diffcli.validate.Invalid naming the field."""
    from diffcli.validate import Invalid, check_record, check_scalars, describe
    from diffcli.validate import field as spec_

    if not isinstance(value, list):
        raise Invalid(f"{where} must be a list of objects, found {describe(value)}")
    if len(value) > MAX_TUNED:
        raise Invalid(f"{where} has {len(value)} entries, at most {MAX_TUNED} are allowed")
    fields = (
        spec_("sampler", str, choices=TUNABLE), spec_("steps", int, min=1, max=schedule.num_timesteps),
        spec_("guidance", float, min=0), spec_("reference", str, max_len=64),
        spec_("seeds", int, min=1, max=1_000_000), spec_("validation_seeds", int, min=0, max=1_000_000),
    )
    out: list[Tuned] = []
    for i, entry in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise Invalid(f"{at} must be an object, found {describe(entry)}")
        lists = {k: entry[k] for k in ("sigmas", "guidance_interval", "distance", "accuracy", "interval_distance")
                 if k in entry}
        rec = check_record({k: v for k, v in entry.items() if k not in lists}, fields, at)
        if "sigmas" not in lists:
            raise Invalid(f"{at}.sigmas is missing")
        sig = lists["sigmas"]
        if not isinstance(sig, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sig):
            raise Invalid(f"{at}.sigmas must be a list of numbers, found {describe(sig)}")
        try:
            sig = ode.explicit_sigmas(schedule, rec["steps"], sig)
        except UsageError as e:
            raise Invalid(f"{at}.sigmas: {e}") from None
        interval = None
        if lists.get("guidance_interval") is not None:
            try:
                interval = check_interval(lists["guidance_interval"], schedule)
            except UsageError as e:
                raise Invalid(f"{at}.guidance_interval: {e}") from None
        distance = check_scalars(lists.get("distance", {}), f"{at}.distance", max_items=16)
        accuracy = check_scalars(lists.get("accuracy", {}), f"{at}.accuracy", max_items=16)
        near = check_scalars(lists.get("interval_distance", {}), f"{at}.interval_distance", max_items=16)
        for name, d in (("distance", distance), ("accuracy", accuracy), ("interval_distance", near)):
            for k, v in d.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise Invalid(f"{at}.{name}.{k} must be a number, found {describe(v)}")
        if any((t.sampler, t.steps) == (rec["sampler"], rec["steps"]) for t in out):
            raise Invalid(f"{at} repeats sampler {rec['sampler']} at {rec['steps']} steps")
        out.append(Tuned(rec["sampler"], rec["steps"], tuple(sig), rec["guidance"], rec["reference"],
                         {k: float(v) for k, v in distance.items()}, rec["seeds"], rec["validation_seeds"],
                         interval, {k: float(v) for k, v in accuracy.items()}, {k: float(v) for k, v in near.items()}))
    return out


def find_tuned(entries: Sequence[Tuned], sampler: str, steps: int) -> Tuned | None:
    return next((t for t in entries if t.sampler == sampler and t.steps == steps), None)


def listing(entries: Sequence[Tuned]) -> str:
    return ", ".join(f"{t.sampler} {t.steps}" for t in entries) or "none"


def resolve_sigmas(sampler: str, sigmas: str | None, steps: int | None = None, tuned: Sequence[Tuned] = (),
                   editing: bool = False) -> str | None:
    """The family a run uses, from --sigmas: auto is the model's tuned sigmas for this sampler and step
    count when it has them (not for an edit, which starts part way down), else edm for the ODE samplers
    and the --spacing timesteps (None) for ddim/ddpm; none is the latter; tuned demands the tuned ones."""
    s = spec(sampler)
    if sigmas in (None, "none"):
        return None
    if sigmas == "auto":
        if s.takes_sigmas and not editing and steps is not None and find_tuned(tuned, sampler, steps):
            return "tuned"
        return "edm" if s.takes_sigmas else None
    check_sigmas(sampler, sigmas)
    if sigmas == "tuned":
        if editing:
            raise UsageError("--sigmas tuned starts at the top of the schedule; an edit (--init-image) starts part "
                             "way down: use --sigmas edm, karras or none")
        if steps is not None and find_tuned(tuned, sampler, steps) is None:
            raise UsageError(f"the model has no tuned sigmas for {sampler} at {steps} steps (it has: {listing(tuned)}); "
                             f"make them with: diffcli tune MODEL --sampler {sampler} --steps {steps} --in-place")
    return sigmas


def check_sigmas(sampler: str, sigmas: str | None) -> None:
    """--sigmas is None (the --spacing timesteps) or a family, and the families are for ODE samplers only."""
    if sigmas is None or sigmas == "none":
        return
    if sigmas not in FAMILIES:
        raise UsageError(f"unknown sigmas {sigmas!r}; choose auto, {', '.join(FAMILIES)}")
    s = spec(sampler)
    if not s.takes_sigmas:
        raise UsageError(
            f"--sigmas {sigmas} needs an ODE sampler ({', '.join(ODE_SAMPLERS)}); {sampler} visits the schedule's "
            "own timesteps (choose them with --spacing)"
        )
    if sigmas == "tuned" and not s.tunable:
        raise UsageError(f"--sigmas tuned needs a deterministic ODE sampler ({', '.join(TUNABLE)}); {sampler} adds noise "
                         "at every step")


def resolve_spacing(sigmas: str | None, spacing: str | None) -> str:
    """--spacing applies to the schedule's own timesteps only: with step sigmas it is a mistake to give it."""
    if spacing is not None and sigmas is not None:
        raise UsageError(f"--spacing does not apply to --sigmas {sigmas} (the default for ODE samplers); "
                         "add --sigmas none to step through --spacing timesteps")
    return spacing or DEFAULT_SPACING


def sigmas_for(sigmas: str | None, sampler: str, steps: int, tuned: Sequence[Tuned]) -> str | list[float] | None:
    """What ode.sample takes: the family name, or the tuned values themselves."""
    if sigmas != "tuned":
        return sigmas
    entry = find_tuned(tuned, sampler, steps)
    if entry is None:
        raise UsageError(f"the model has no tuned sigmas for {sampler} at {steps} steps")
    return list(entry.sigmas)


def visited_sigmas(schedule: NoiseSchedule, sampler: str, steps: int, spacing: str, sigmas: str | None,
                   tuned: Sequence[Tuned] = (), span: int | None = None) -> list[float]:
    """The N + 1 noise levels a run visits (the last 0): for ddim/ddpm those of its timesteps."""
    if not spec(sampler).takes_sigmas:
        ts = schedule.timesteps(steps, spacing, span).tolist()
        return [float(schedule.sigmas[t]) for t in ts] + [0.0]
    return ode.step_sigmas(schedule, steps, spacing, sigmas_for(sigmas, sampler, steps, tuned), span)


# --------------------------------------------------------------------------------------------------
# Guidance interval
# --------------------------------------------------------------------------------------------------


def parse_interval(text: str | None) -> str | tuple[float, float] | None:
    """--guidance-interval: 'auto', 'none' (None: guide at every step) or 'LO,HI' in sigma."""
    if text is None or text == "auto":
        return "auto"
    if text == "none":
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--guidance-interval must be LO,HI (two numbers, in sigma), auto or none; got {text!r}") from None
    return lo, hi


def check_interval(value: Any, schedule: NoiseSchedule) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi, both finite and inside the model's sigma range [0, sigma_max]."""
    from diffcli.validate import describe

    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise UsageError(f"a guidance interval is two numbers LO,HI, got {describe(list(value) if isinstance(value, tuple) else value)}")
    lo, hi = float(value[0]), float(value[1])
    top = ode.sigma_max(schedule)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UsageError(f"guidance interval {lo:g},{hi:g} must be finite")
    if not lo < hi:
        raise UsageError(f"guidance interval {lo:g},{hi:g} needs LO < HI")
    if lo < 0 or hi > top * (1 + 1e-9):
        raise UsageError(f"guidance interval {lo:g},{hi:g} is outside the model's sigma range [0, {top:.6g}]")
    return lo, hi


def resolve_interval(interval: str | tuple[float, float] | None, schedule: NoiseSchedule, sampler: str, steps: int,
                     sigmas: str | None, tuned: Sequence[Tuned] = ()) -> tuple[float, float] | None:
    """auto: the interval of the tuned entry in use (its sampler and steps, with its sigmas), else none."""
    if interval == "auto":
        entry = find_tuned(tuned, sampler, steps) if sigmas == "tuned" else None
        return entry.guidance_interval if entry is not None else None
    if interval is None:
        return None
    return check_interval(interval, schedule)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sample(
    denoiser: samplers.Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    steps: int,
    sampler: str = DEFAULT_SAMPLER,
    *,
    sigmas: str | Sequence[float] | None = None,
    eta: float = 0.0,
    variance: str = "fixed_small",
    callback: Callable[[int, int], None] | None = None,
    **common: Any,
) -> samplers.SampleResult:
    """Run any sampler: the DDIM/DDPM loop (samplers.sample) or an ODE sampler (ode.sample).

    sigmas: None (the `spacing` timesteps), 'karras', 'edm', or the N + 1 sigmas themselves (tuned ones:
    resolve 'tuned' with sigmas_for first); only for the ODE samplers. eta and variance are DDIM's and
    DDPM's. Everything else (seeds, labels, null_label, guidance, guidance_interval, prediction, spacing,
    clip_x0, device, dtype, start, constraint) goes to the sampler as it is.
    """
    s = spec(sampler)
    if s.takes_sigmas:
        if sigmas == "tuned":
            raise UsageError("resolve --sigmas tuned to the model's values first (registry.sigmas_for)")
        if isinstance(sigmas, str):
            check_sigmas(sampler, sigmas)
        return ode.sample(denoiser, schedule, shape, steps, sampler, sigmas=sigmas, callback=callback, **common)
    if sigmas is not None:
        check_sigmas(sampler, sigmas if isinstance(sigmas, str) else "tuned")
    return samplers.sample(denoiser, schedule, shape, steps, sampler, eta=eta, variance=variance, callback=callback,
                           **common)

