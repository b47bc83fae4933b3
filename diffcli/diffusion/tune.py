"""`diffcli tune`: the N + 1 sigmas (and a guidance interval) that suit one model, found on its own samples.

Align Your Steps (Sabour et al. 2024) shows that step schedules chosen for a model beat the fixed
families (edm, karras); the criterion here is the direct one: the mean per-pixel RMSE, in [0, 1] pixel
units, between an N-step sample and a reference solve of many steps from the same noise, averaged over
the training seeds. The search is a coordinate descent on log sigma: each interior sigma in turn moves a
fraction of the way towards a neighbour and the move is kept when the training distance falls; the
fraction halves after a sweep that keeps nothing. It starts from the best fixed family, so on the
training seeds it can only improve; the result is then measured on separate validation seeds against
every fixed family and stored only when it beats the best of them there.

Guidance interval (Kynkaanniemi et al. 2024): guidance is dropped from the steps at the ends of the
schedule, one step at a time from the top and then from the bottom, as long as the class accuracy of the
tune set's samples (the classifier `diffcli eval` trains on --real) stays within the tolerance of full
guidance. The interval is stored in sigma, half way (in log sigma) between the last guided and the
first unguided level, so it means the same to any step list.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from diffcli import atomic
from diffcli.diffusion import ode, registry
from diffcli.diffusion.registry import Tuned
from diffcli.digest import tensors_sha256
from diffcli.errors import InputError, OutputExistsError, UsageError

REFERENCE_FORMAT = "diffcli.tunereference"
VALIDATION_BASE = 1_000_000  # validation seeds are VALIDATION_BASE + i: never a training seed
INTERVAL_BASE = 2_000_000  # seeds of the guidance interval's accuracy check
DEFAULT_REFERENCE = "dpm++2m:100"
MIN_FRACTION = 1 / 64  # the search stops when a move of this fraction of the gap to a neighbour helps no more

Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]


@dataclass
class TuneOptions:
    model: str
    steps: int
    sampler: str | None = None  # default: registry.DEFAULT_SAMPLER, what `sample` uses
    guidance: float | None = None  # default: the model file's
    classes: list[str] = field(default_factory=list)  # the classes cycled over the seeds (default: all)
    seeds: int = 32  # training seeds 0 .. seeds - 1
    validation_seeds: int = 32  # VALIDATION_BASE + i
    reference: str = DEFAULT_REFERENCE  # SAMPLER:STEPS
    max_evaluations: int = 200  # N-step solves of the training seeds during the search
    start: str | None = None  # edm, karras, none or tuned (the file's entry); default: the best fixed family
    reference_cache: str | None = None  # a file keeping the reference solves for the next tune of this model
    guidance_interval: bool = False  # also search where guidance is needed
    real: str | None = None  # the class folder for the interval's classifier; None: the interval is judged by distance
    interval_images: int = 200
    accuracy_tolerance: float = 1.0  # percentage points the interval may cost
    distance_tolerance: float = 2.0  # without --real: percent of the full-guidance distance the interval may add
    out: str | None = None
    in_place: bool = False
    overwrite: bool = False
    batch_size: int = 64
    device: str = "auto"
    cache: str | None = None  # diffcli eval's cache folder (its classifier)


@dataclass
class TuneResult:
    model: str
    sampler: str
    steps: int
    guidance: float
    reference: str
    seeds: int
    validation_seeds: int
    sigmas: list[float]
    train_distance: dict[str, float]
    distance: dict[str, float]  # validation
    best_fixed: str
    improvement: float  # 1 - tuned / best fixed, on validation
    start: str  # the fixed family the search started from (the best on the training seeds)
    better: bool
    stored: str | None
    evaluations: int
    seconds: float
    stored_before: bool = False  # the file already held a tuned entry here at least as close on validation
    guidance_interval: tuple[float, float] | None = None
    accuracy: dict[str, float] | None = None
    interval_seconds: dict[str, float] | None = None
    interval_distance: dict[str, float] | None = None  # judged by distance: validation, {full, interval}
    interval_steps: tuple[int, int] | None = None  # the guided steps, 1-based, first and last

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("model", "sampler", "steps", "guidance", "reference", "seeds",
                                           "validation_seeds", "sigmas", "train_distance", "distance", "best_fixed",
                                           "improvement", "start", "better", "stored", "evaluations", "seconds",
                                           "stored_before")}
        if self.accuracy is not None or self.interval_distance is not None:
            d.update(guidance_interval=list(self.guidance_interval) if self.guidance_interval else None,
                     guided_steps=list(self.interval_steps) if self.interval_steps else None)
        if self.accuracy is not None:
            d.update(accuracy=self.accuracy, interval_seconds=self.interval_seconds)
        if self.interval_distance is not None:
            d.update(interval_distance=self.interval_distance)
        return d


# --------------------------------------------------------------------------------------------------
# Checks, before anything is computed
# --------------------------------------------------------------------------------------------------


def parse_reference(text: str, num_timesteps: int) -> tuple[str, int]:
    """SAMPLER:STEPS of a deterministic sampler (the same noise must give the same image)."""
    name, _, steps = text.partition(":")
    if not steps.isdecimal():
        raise UsageError(f"--reference must be SAMPLER:STEPS, e.g. ddim:1000, got {text!r}")
    s = registry.spec(name)
    if s.stochastic:
        raise UsageError(f"--reference needs a deterministic sampler (ddim or {', '.join(registry.TUNABLE)}), not {name}")
    n = int(steps)
    if not 2 <= n <= num_timesteps:
        raise UsageError(f"--reference steps must be between 2 and the model's {num_timesteps} timesteps, got {n}")
    return name, n


def check_destination(opts: TuneOptions) -> Path | None:
    """Where the tuned model file goes (None: report only), refused now rather than after the search."""
    if opts.out and opts.in_place:
        raise UsageError("give either --out FILE or --in-place, not both")
    if opts.in_place:
        path = Path(opts.model)
        if not os.access(path, os.W_OK) or not os.access(path.resolve().parent, os.W_OK):
            raise InputError(f"{path} is read-only (or its folder is): --in-place cannot replace it; write a copy "
                             "with --out FILE")
        return path
    if opts.out:
        path = Path(opts.out)
        if Path(opts.out).resolve() == Path(opts.model).resolve():
            raise UsageError("--out is the model file itself; use --in-place to replace it")
        if path.suffix != ".safetensors":
            raise UsageError(f"--out must end in .safetensors, got {str(path)!r}")
        if not path.resolve().parent.is_dir():
            raise UsageError(f"the folder of --out does not exist: {path.parent} (create it first)")
        if path.exists() and not opts.overwrite:
            raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
        return path
    return None


# --------------------------------------------------------------------------------------------------
# Sampling the seed sets
# --------------------------------------------------------------------------------------------------


class Memo:
    """The model with a memory of its recent outputs. The search's candidates differ from the current best
    in one sigma, so they share the start of its trajectory: the same inputs reach the model, and their
    outputs are looked up instead of computed again (about half the evaluations of a search). An input
    is recognised by its timestep, shape, labels and two float64 checksums of x; the model is deterministic,
    so the same input gives the same output bit for bit."""

    def __init__(self, model: Callable, size: int) -> None:
        from collections import OrderedDict

        self.model, self.size = model, size
        self.store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        xd = x.detach().double()
        key = (tuple(x.shape), float(t[0]), float(xd.sum()), float(xd.square().sum()),
               None if y is None else tuple(y.tolist()))
        if key in self.store:
            self.store.move_to_end(key)
            self.hits += 1
            return self.store[key]
        out = self.model(x, t, y)
        self.misses += 1
        self.store[key] = out
        if len(self.store) > self.size:
            self.store.popitem(last=False)
        return out


class Solver:
    """Solves the probability-flow ODE of one model for a set of seeds with given step sigmas."""

    def __init__(self, mf: Any, sampler: str, guidance: float, classes: list[int | None], batch_size: int,
                 device: torch.device, memo: int = 0) -> None:
        self.mf, self.sampler, self.guidance, self.classes = mf, sampler, guidance, classes
        self.batch_size, self.device = batch_size, device
        cfg = mf.config
        self.shape = (cfg.in_channels, cfg.image_height, cfg.image_width)
        self.null = mf.model.null_class if cfg.num_classes else None
        self.denoiser: Callable = Memo(mf.model, memo) if memo else mf.model

    def labels(self, seeds: Sequence[int], offset: int) -> torch.Tensor | None:
        if self.null is None:
            return None
        return torch.tensor([self.null if c is None else c for c in
                             (self.classes[(s - offset) % len(self.classes)] for s in seeds)], dtype=torch.long)

    @torch.inference_mode()
    def images(self, seeds: Sequence[int], offset: int, steps: int, sampler: str | None = None,
               sigmas: str | list[float] | None = None, interval: tuple[float, float] | None = None,
               guidance: float | None = None, callback: Callable[[int], None] | None = None) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], float64 for the distances; image i from seed seeds[i]. callback(k) after
        every step of every batch, k counting the steps of all batches so far."""
        out = []
        for b, start in enumerate(range(0, len(seeds), self.batch_size)):
            chunk = list(seeds[start:start + self.batch_size])
            each = (lambda i, n, b=b: callback(b * steps + i)) if callback else None
            res = registry.sample(self.denoiser, self.mf.schedule, self.shape, steps, sampler or self.sampler,
                                  sigmas=sigmas, seeds=chunk, labels=self.labels(chunk, offset), null_label=self.null,
                                  guidance=self.guidance if guidance is None else guidance,
                                  prediction=self.mf.prediction, device=self.device, guidance_interval=interval,
                                  callback=each)
            out.append(((res.images.double().clamp(-1, 1) + 1) / 2).cpu())
        return torch.cat(out)


def distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of the per-pixel RMSE (as the step study measures)."""
    return float(((images - reference) ** 2).flatten(1).mean(1).sqrt().mean())


# --------------------------------------------------------------------------------------------------
# The reference cache
# --------------------------------------------------------------------------------------------------


def check_reference_cache(path: str | None) -> Path | None:
    """--reference-cache FILE: refused before any work when it could not be ours to write (a file of another
    kind is never replaced by a cache)."""
    if path is None:
        return None
    from diffcli.files import checkpoint

    p = Path(path)
    if p.suffix != ".safetensors":
        raise UsageError(f"--reference-cache must end in .safetensors, got {path!r}")
    if not p.resolve().parent.is_dir():
        raise UsageError(f"the folder of --reference-cache does not exist: {p.parent} (create it first)")
    if p.exists():
        try:
            checkpoint.read_header(p, REFERENCE_FORMAT, "tune reference cache", whole=False)
        except InputError as e:
            raise InputError(f"--reference-cache {p} exists and is not a tune reference cache ({e}); give another "
                             "file") from None
    return p


def reference_key(mf: Any, reference: str, guidance: float, sets: dict[str, tuple[list[int], torch.Tensor | None]]) -> str:
    """What a reference solve depends on: the model's weights, config, schedule and prediction, the
    reference sampler and steps, the guidance, and each seed set with its labels."""
    import hashlib
    import json

    h = hashlib.sha256(f"{REFERENCE_FORMAT} v1\n".encode())
    h.update(tensors_sha256(mf.model.state_dict(), REFERENCE_FORMAT).encode())
    h.update(json.dumps([mf.config.to_dict(), mf.schedule.to_dict(), mf.prediction, reference, repr(float(guidance))],
                        sort_keys=True).encode())
    for name, (seeds, labels) in sets.items():
        h.update(f"|{name}|{seeds}|{None if labels is None else labels.tolist()}".encode())
    return h.hexdigest()


def _images_digest(tensors: dict[str, torch.Tensor]) -> str:
    return tensors_sha256(tensors, REFERENCE_FORMAT)


def write_reference_cache(path: Path, key: str, images: dict[str, torch.Tensor], reference: str, model: str) -> None:
    """Atomically, with a SHA-256 of the images that the reader checks."""
    from diffcli.files import checkpoint

    images = {k: v.double().contiguous() for k, v in images.items()}
    checkpoint.write(path, images, {"key": key, "digest": _images_digest(images), "reference": reference,
                                    "model": model}, REFERENCE_FORMAT)


def read_reference_cache(path: Path, key: str, shapes: dict[str, tuple[int, ...]],
                         log: Log) -> dict[str, torch.Tensor] | None:
    """The cached reference images when the file holds exactly these (same key, shapes, values in [0, 1]);
    None, after a line saying why, when it is missing, made for something else, or damaged."""
    from diffcli.files import checkpoint

    if not path.exists():
        return None
    try:
        header, data = checkpoint.read_header(path, REFERENCE_FORMAT, "tune reference cache")
        if header.meta.get("key") != key:
            log(f"{path} holds the reference of another model, seed set or reference; computing it again")
            return None
        problem = checkpoint.tensor_problem(header.tensors, {k: (v, ("F64",)) for k, v in shapes.items()},
                                            "the cache needs", "the cache")
        if problem:
            raise InputError(problem)
        tensors = checkpoint.load_tensors(data, path)
        if _images_digest(tensors) != header.meta.get("digest"):
            raise InputError("the images do not match their recorded SHA-256")
        checkpoint.check_finite(tensors, path)
        if any(bool((t < 0).any() or (t > 1).any()) for t in tensors.values()):
            raise InputError("pixel values outside [0, 1]")
    except InputError as e:
        log(f"{path} is damaged ({str(e).replace(str(path), 'the file')}); computing the reference again")
        return None
    log(f"reference read from {path}")
    return tensors


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


def coordinate_descent(start: list[float], top: float, floor: float, objective: Callable[[list[float]], float],
                       max_evaluations: int, progress: Callable[[int], None] | None = None) -> tuple[list[float], float, int]:
    """Minimise objective(sigmas) over the interior sigmas of start (top, s_1 > ... > s_{N-1}, 0), each kept
    strictly between its neighbours (top above the first, floor below the last) in log sigma.
    Returns (best sigmas, best value, evaluations)."""
    u = [math.log(s) for s in start[1:-1]]
    lo_end, hi_end = math.log(floor), math.log(top)

    def sigmas(v: list[float]) -> list[float]:
        return [top] + [math.exp(x) for x in v] + [0.0]

    best = objective(sigmas(u))
    evals, frac = 1, 0.5
    while frac >= MIN_FRACTION and evals < max_evaluations:
        kept = False
        for i in range(len(u)):
            upper = hi_end if i == 0 else u[i - 1]
            lower = lo_end if i == len(u) - 1 else u[i + 1]
            for target in (upper, lower):
                if evals >= max_evaluations:
                    break
                cand = list(u)
                cand[i] = u[i] + frac * (target - u[i])
                if not (lower < cand[i] < upper):  # a move too small to tell apart in floating point
                    continue
                value = objective(sigmas(cand))
                evals += 1
                if progress:
                    progress(evals)
                if value < best:
                    u, best, kept = cand, value, True
                    break
        if not kept:
            frac /= 2
    return sigmas(u), best, evals


def _guided_window(sig: list[float], first: int, last: int) -> tuple[float, float]:
    """The interval (lo, hi] that guides exactly the steps first..last of sig (their starting sigmas):
    its ends half way in log sigma to the neighbouring levels (sig[-1] = 0: half the last level)."""
    hi = sig[0] if first == 0 else math.sqrt(sig[first] * sig[first - 1])
    nxt = sig[last + 1]
    lo = sig[last] / 2 if nxt == 0 else math.sqrt(sig[last] * nxt)
    return lo, hi


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def tune(opts: TuneOptions, log: Log | None = None, progress: Progress | None = None) -> TuneResult:
    from diffcli.files.checkpoint import load_model, with_sampling
    from diffcli.device import resolve_device
    from diffcli.sampling.generate import resolve_classes

    log = log or (lambda message: None)
    started = time.perf_counter()
    sampler = opts.sampler or registry.DEFAULT_SAMPLER
    s = registry.spec(sampler)
    if not s.tunable:
        raise UsageError(f"tune needs a deterministic ODE sampler ({', '.join(registry.TUNABLE)}); {sampler} "
                         + ("adds noise at every step" if s.stochastic else "visits the schedule's own timesteps "
                            "(euler takes the same steps as ddim and can be tuned)"))
    if not 1 <= opts.seeds <= 100_000 or not 1 <= opts.validation_seeds <= 100_000:
        raise UsageError("--seeds and --validation-seeds must be between 1 and 100000")
    if opts.max_evaluations < 1:
        raise UsageError(f"--max-evaluations must be >= 1, got {opts.max_evaluations}")
    if opts.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.start is not None and opts.start not in (*registry.FIXED, "tuned"):
        raise UsageError(f"--start must be one of {', '.join(registry.FIXED)} or tuned, got {opts.start!r}")
    if opts.guidance is not None and (not math.isfinite(opts.guidance) or opts.guidance < 0):
        raise UsageError(f"--guidance must be >= 0, got {opts.guidance}")
    if opts.guidance_interval and opts.real:
        if not 10 <= opts.interval_images <= 100_000:
            raise UsageError(f"--interval-images must be between 10 and 100000, got {opts.interval_images}")
        if not 0 <= opts.accuracy_tolerance <= 100:
            raise UsageError(f"--accuracy-tolerance must be between 0 and 100 points, got {opts.accuracy_tolerance}")
    elif opts.real:
        raise UsageError("--real is for --guidance-interval")
    if opts.guidance_interval and not opts.real and not (math.isfinite(opts.distance_tolerance)
                                                         and 0 <= opts.distance_tolerance <= 100):
        raise UsageError(f"--distance-tolerance must be between 0 and 100 percent, got {opts.distance_tolerance}")
    dest = check_destination(opts)
    cache_file = check_reference_cache(opts.reference_cache)
    device = resolve_device(opts.device)
    mf = load_model(opts.model, device)
    T = mf.schedule.num_timesteps
    if not 2 <= opts.steps <= T:
        raise UsageError(f"--steps must be between 2 and the model's {T} timesteps, got {opts.steps}")
    ref_sampler, ref_steps = parse_reference(opts.reference, T)
    previous = registry.find_tuned(mf.tuned, sampler, opts.steps)
    if opts.start == "tuned" and previous is None:
        raise UsageError(f"--start tuned: {opts.model} holds no tuned {sampler} sigmas at {opts.steps} steps "
                         f"(it has: {registry.listing(mf.tuned)})")
    guidance = opts.guidance if opts.guidance is not None else float(mf.sampling.get("guidance", 1.0))
    if not mf.class_names:
        guidance = 1.0
        if opts.classes:
            raise UsageError("--class was given but this model is unconditional (it has no classes)")
        if opts.guidance_interval:
            raise UsageError("--guidance-interval needs a class-conditional model (an unconditional one has no guidance)")
    elif opts.guidance_interval and guidance == 1.0:
        raise UsageError("--guidance-interval needs guidance: the model's default is 1 (off); give --guidance")
    picked = resolve_classes(opts.classes, mf, len(mf.class_names) if not opts.classes else len(opts.classes))
    N = opts.steps
    batches = -(-opts.seeds // opts.batch_size)
    solver = Solver(mf, sampler, guidance, picked or [None], opts.batch_size, device, memo=4 * N * batches)
    train = list(range(opts.seeds))
    val = [VALIDATION_BASE + i for i in range(opts.validation_seeds)]
    say = progress or (lambda i, n, task: None)

    # the reference, from the same noise as every N-step solve
    ref_sigmas = registry.resolve_sigmas(ref_sampler, "auto", ref_steps)
    log(f"tuning {sampler} at {N} steps, guidance {guidance:g}, against {ref_sampler}:{ref_steps} on "
        f"{len(train)} training and {len(val)} validation seeds")
    sets = {"train": (train, 0), "validation": (val, VALIDATION_BASE)}
    key = reference_key(mf, f"{ref_sampler}:{ref_steps}", guidance,
                        {k: (seeds, solver.labels(seeds, off)) for k, (seeds, off) in sets.items()})
    refs = None
    if cache_file is not None:
        shapes = {k: (len(seeds), *solver.shape) for k, (seeds, _) in sets.items()}
        refs = read_reference_cache(cache_file, key, shapes, log)
    if refs is None:  # a step of progress per reference step of each batch: a 1000-step solve takes minutes
        refs, done = {}, 0
        work = {name: -(-len(seeds) // opts.batch_size) * ref_steps for name, (seeds, _) in sets.items()}
        for name, (seeds, off) in sets.items():
            refs[name] = solver.images(seeds, off, ref_steps, ref_sampler, ref_sigmas,
                                       callback=lambda k, done=done: say(done + k, sum(work.values()), "reference"))
            done += work[name]
        if cache_file is not None:
            write_reference_cache(cache_file, key, refs, f"{ref_sampler}:{ref_steps}", Path(opts.model).name)
            log(f"reference kept in {cache_file} for the next tune of this model")
    ref_train, ref_val = refs["train"], refs["validation"]

    schedule = mf.schedule
    fixed = {name: ode.step_sigmas(schedule, N, registry.DEFAULT_SPACING, None if name == "none" else name)
             for name in registry.FIXED}
    train_distance = {name: distance(solver.images(train, 0, N, sigmas=name if name != "none" else None), ref_train)
                      for name in fixed}
    if previous is not None:  # what the file holds now: the result must beat it too before it replaces it
        train_distance["stored"] = distance(solver.images(train, 0, N, sigmas=list(previous.sigmas)), ref_train)
    start_family = opts.start or min((k for k in train_distance if k != "stored"), key=train_distance.get)
    top, floor = ode.sigma_max(schedule), float(schedule.sigmas[0])
    # the start as values: a list that begins above sigma 80 takes its first step first order, as edm does
    # (ode.edm_jump), so from edm the search starts exactly where edm is; from karras or none it starts from
    # their levels under that rule; --start tuned continues from the file's entry (a longer search, or one
    # on more seeds or against another reference)
    start = list(previous.sigmas) if start_family == "tuned" else list(fixed[start_family])
    start[0] = top  # every family starts at the schedule's top; only rounding could differ
    log("fixed families on the training seeds: " + ", ".join(f"{k} {v:.4f}" for k, v in train_distance.items())
        + f"; the search starts from {start_family}")

    def objective(sig: list[float]) -> float:
        return distance(solver.images(train, 0, N, sigmas=sig), ref_train)

    best, best_train, evals = coordinate_descent(
        start, top, floor, objective, opts.max_evaluations,
        lambda k: say(k, opts.max_evaluations, "search"))
    train_distance["tuned"] = best_train
    if isinstance(solver.denoiser, Memo):
        m = solver.denoiser
        log(f"search: {evals} solves, {m.hits} of {m.hits + m.misses} model evaluations looked up rather than run")
    say(opts.max_evaluations, opts.max_evaluations, "search")

    # validation: the tuned sigmas against every fixed family, on seeds the search never saw
    dist = {"tuned": distance(solver.images(val, VALIDATION_BASE, N, sigmas=best), ref_val)}
    for name in fixed:
        dist[name] = distance(solver.images(val, VALIDATION_BASE, N, sigmas=name if name != "none" else None), ref_val)
    if previous is not None:
        dist["stored"] = distance(solver.images(val, VALIDATION_BASE, N, sigmas=list(previous.sigmas)), ref_val)
    best_fixed = min((k for k in dist if k not in ("tuned", "stored")), key=dist.get)
    stored_before = previous is not None and dist["stored"] <= dist["tuned"]
    better = dist["tuned"] < dist[best_fixed] and not stored_before
    improvement = 1 - dist["tuned"] / dist[best_fixed] if dist[best_fixed] > 0 else 0.0

    # the interval: for the new sigmas, or for the stored ones when they stay (a tune of the file's entry
    # that adds the interval it lacks, or judges it again, without moving its sigmas)
    interval = accuracy = seconds = near = window = None
    keep = stored_before and opts.guidance_interval
    if opts.guidance_interval and (better or keep):
        sig, sig_val = (best, dist["tuned"]) if better else (list(previous.sigmas), dist["stored"])
        if opts.real:
            interval, accuracy, seconds, window = search_interval(solver, opts, sig, log, say)
        else:
            interval, near, window = interval_by_distance(solver, opts, sig, (train, ref_train), (val, ref_val),
                                                          sig_val, log, say)

    stored = None
    if better and dest is not None:
        entry = Tuned(sampler, N, tuple(best), guidance, f"{ref_sampler}:{ref_steps}",
                      {k: round(v, 6) for k, v in dist.items() if k != "stored"}, len(train), len(val), interval,
                      accuracy or {}, near or {})
    elif keep and interval is not None and dest is not None:
        entry = replace(previous, guidance_interval=interval, accuracy=accuracy or {}, interval_distance=near or {})
    else:
        entry = None
    if entry is not None:
        kept = [t.to_dict() for t in mf.tuned if (t.sampler, t.steps) != (sampler, N)]
        if len(kept) >= registry.MAX_TUNED:
            raise UsageError(f"{opts.model} already holds {registry.MAX_TUNED} tuned entries; remove some first")
        sampling = {**mf.sampling, "tuned": kept + [entry.to_dict()]}
        data = with_sampling(opts.model, sampling)
        atomic.write_bytes(dest, data, overwrite=opts.in_place or opts.overwrite)
        stored = str(dest)
    return TuneResult(str(opts.model), sampler, N, guidance, f"{ref_sampler}:{ref_steps}", len(train), len(val),
                      [float(v) for v in best], train_distance, dist, best_fixed, improvement, start_family, better,
                      stored, evals,
                      round(time.perf_counter() - started, 2), stored_before, interval, accuracy, seconds, near,
                      (window[0] + 1, window[1] + 1) if window else None)


def narrowest_window(N: int, measure: Callable[[tuple[int, int] | None], tuple[float, float]], tolerance: float,
                     step: Callable[[], None] | None = None, relative: bool = False
                     ) -> tuple[tuple[int, int] | None, float, float, float, float]:
    """The run of guided steps first..last (0-based) to keep: measure(window) gives (score, seconds) of
    samples guided at those steps only (None: every step); a higher score is better (class accuracy, or
    minus the distance to the reference). Steps are dropped from the top end while the score stays
    >= full - tolerance (relative: tolerance times |full|), then from the bottom end. Returns (window, or
    None when no step could go; score and seconds with it; score and seconds with full guidance)."""
    full, full_s = measure(None)
    floor = full - (tolerance * abs(full) if relative else tolerance)
    first, last, acc, acc_s = 0, N - 1, full, full_s
    for end in ("top", "bottom"):
        while first < last:
            cand = (first + 1, last) if end == "top" else (first, last - 1)
            a, secs = measure(cand)
            if step:
                step()
            if a < floor:
                break
            (first, last), acc, acc_s = cand, a, secs
    if (first, last) == (0, N - 1):
        return None, full, full_s, full, full_s
    return (first, last), acc, acc_s, full, full_s


def interval_by_distance(solver: Solver, opts: TuneOptions, sig: list[float],
                         train: tuple[list[int], torch.Tensor], val: tuple[list[int], torch.Tensor],
                         val_full: float, log: Log, say: Progress) -> tuple[tuple[float, float] | None, dict[str, float] | None,
                                                 tuple[int, int] | None]:
    """narrowest_window judged by the distance to the reference, with no data and no classifier: guided
    steps are dropped from each end while the training seeds' distance stays within --distance-tolerance
    percent of its value with guidance at every step. The reference is a full-guidance solve, so samples
    that stay this close to it keep what guidance does to them; the steps that go are those whose
    guidance changes the result least (on the shipped model's 16 steps: the last 4, where the image is
    already decided). val_full: the validation distance of sig with guidance at every step, which tune
    has measured already. Returns (interval or None, the validation distance with full guidance and
    with the interval, the window)."""
    N = len(sig) - 1
    seeds, ref = train

    def measure(window: tuple[int, int] | None) -> tuple[float, float]:
        imgs = solver.images(seeds, 0, N, sigmas=sig, interval=_guided_window(sig, *window) if window else None)
        return -distance(imgs, ref), 0.0

    done = [0]

    def step() -> None:
        done[0] += 1
        say(done[0], N, "interval")

    window, near, _, full, _ = narrowest_window(N, measure, opts.distance_tolerance / 100, step, relative=True)
    if window is None:
        log(f"guidance interval: every step needs guidance (leaving out any end step moves the samples more than "
            f"{opts.distance_tolerance:g}% further from the reference)")
        return None, None, None
    lo, hi = _guided_window(sig, *window)
    seeds_v, ref_v = val
    on_val = {"full": val_full,
              "interval": distance(solver.images(seeds_v, VALIDATION_BASE, N, sigmas=sig, interval=(lo, hi)), ref_v)}
    log(f"guidance interval: sigma {lo:.4g} to {hi:.4g} (steps {window[0] + 1}-{window[1] + 1} of {N} guided); distance "
        f"{-near:.4f} against {-full:.4f} with guidance at every step on the training seeds, {on_val['interval']:.4f} "
        f"against {on_val['full']:.4f} on the validation seeds")
    return (lo, hi), {k: round(v, 6) for k, v in on_val.items()}, window


def search_interval(solver: Solver, opts: TuneOptions, sig: list[float], log: Log, say: Progress
                    ) -> tuple[tuple[float, float] | None, dict[str, float], dict[str, float], tuple[int, int] | None]:
    """narrowest_window on the tune set's samples, judged by diffcli eval's classifier of --real. Returns
    (interval or None when every step needs guidance, accuracy in percent {full, interval}, sampling
    seconds of both, the window)."""
    from diffcli.eval.evaluate import Evaluator

    evaluator = Evaluator.prepare(opts.real, "auto", cache_dir=opts.cache, device=solver.device,
                                  want_accuracy=True, log=log)
    names = solver.mf.class_names
    seeds = [INTERVAL_BASE + i for i in range(opts.interval_images)]
    classes = [names[c] if c is not None else "" for c in
               (solver.classes[i % len(solver.classes)] for i in range(len(seeds)))]
    N = len(sig) - 1

    def measure(window: tuple[int, int] | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        imgs = solver.images(seeds, INTERVAL_BASE, N, sigmas=sig,
                             interval=_guided_window(sig, *window) if window else None)
        secs = time.perf_counter() - t0
        score = evaluator.score_pixels((imgs * 255).round().to(torch.uint8), classes)
        if score.accuracy is None:
            raise InputError(f"{opts.real}: its class folders do not match the model's classes ({', '.join(names)})")
        return 100 * score.accuracy, secs

    done = [0]

    def step() -> None:
        done[0] += 1
        say(done[0], N, "interval")

    window, acc, secs, full, full_s = narrowest_window(N, measure, opts.accuracy_tolerance, step)
    accuracy = {"full": round(full, 2), "interval": round(acc, 2)}
    seconds = {"full": round(full_s, 2), "interval": round(secs, 2)}
    if window is None:
        log(f"guidance interval: every step needs guidance (accuracy {full:.1f}% with it)")
        return None, accuracy, seconds, None
    lo, hi = _guided_window(sig, *window)
    log(f"guidance interval: sigma {lo:.4g} to {hi:.4g} (steps {window[0] + 1}-{window[1] + 1} of {N}); class accuracy "
        f"{acc:.1f}% against {full:.1f}% with guidance at every step")
    return (lo, hi), accuracy, seconds, window


def table(result: TuneResult) -> Any:
    """The rich table `diffcli tune` prints: distance to the reference per step schedule, both seed sets."""
    from rich.table import Table

    tab = Table(title=f"{result.sampler}, {result.steps} steps, guidance {result.guidance:g}: mean per-pixel RMSE "
                      f"to {result.reference}")
    for header in ("sigmas", f"training ({result.seeds} seeds)", f"validation ({result.validation_seeds} seeds)", ""):
        tab.add_column(header, justify="right" if header else "left")
    order = ["tuned"] + sorted((k for k in result.distance if k != "tuned"), key=result.distance.get)
    for name in order:
        note = ""
        if name == "tuned":
            note = (f"{100 * result.improvement:.1f}% closer than {result.best_fixed}" if result.better
                    else "no better than the stored sigmas: not stored" if result.stored_before
                    else f"no better than {result.best_fixed}: not stored")
        elif name == "stored":
            note = "the file's tuned sigmas now"
        elif name == result.best_fixed:
            note = "best fixed"
        tab.add_row(name, f"{result.train_distance[name]:.4f}", f"{result.distance[name]:.4f}", note)
    gi = result.guidance_interval
    where = f"sigma {gi[0]:.4g} to {gi[1]:.4g}" if gi else "every step"
    if result.interval_steps:
        where += f" (steps {result.interval_steps[0]}-{result.interval_steps[1]} of {result.steps} guided)"
    if result.accuracy is not None:
        tab.caption = (f"guidance interval: {where}; class accuracy {result.accuracy['interval']:.1f}% "
                       f"(full guidance {result.accuracy['full']:.1f}%); sampling {result.interval_seconds['interval']:.1f} s "
                       f"vs {result.interval_seconds['full']:.1f} s")
    elif result.interval_distance is not None:
        tab.caption = (f"guidance interval: {where}; validation distance {result.interval_distance['interval']:.4f} "
                       f"(full guidance {result.interval_distance['full']:.4f})")
    return tab
