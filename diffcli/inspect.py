"""inspect-schedule: pick rows of one or more noise schedules and lay them out as a table, JSON, CSV
or a plot.

Every number comes from NoiseSchedule (float64); this module only chooses which timesteps to show and
formats them. Columns, in the paper notation of diffcli.diffusion.schedule:
    beta        beta_t
    alpha_bar   alpha_bar_t, the fraction of signal variance left in x_t
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar
                the coefficients of x_0 and eps in x_t (DDPM Eq. 4)
    snr_db      10 log10 SNR_t; -inf where alpha_bar_t = 0 (zero terminal SNR)
    sigma       sqrt((1 - alpha_bar_t) / alpha_bar_t); inf where alpha_bar_t = 0

With --sampler naming an ODE sampler (diffcli.diffusion.ode) the rows are the noise levels it steps from, which
with --sigmas karras lie between timesteps: such a row has a fractional t (log sigma interpolated over
the table, as the sampler queries the model), alpha_bar = 1 / (1 + sigma^2) and beta interpolated
linearly in t.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.table import Table

from diffcli import plot
from diffcli.files import images
from diffcli.diffusion import ode, registry
from diffcli.diffusion.registry import Tuned
from diffcli.diffusion.schedule import NoiseSchedule, ScheduleSpec
from diffcli.errors import OutputExistsError, UsageError

TABLE_ROWS = 11  # rows of the table when neither --rows nor --steps is given
DB = 10 / math.log(10)  # 10 log10(x) = DB * ln(x): log-SNR in decibels


@dataclass(frozen=True)
class Row:
    """One timestep of one schedule (t fractional only between timesteps, see the module doc)."""

    t: int | float
    beta: float
    alpha_bar: float
    sqrt_alpha_bar: float
    sqrt_one_minus_alpha_bar: float
    snr_db: float
    sigma: float


COLUMNS = tuple(f.name for f in fields(Row))


@dataclass(frozen=True)
class Inspection:
    """What to show: the schedules (all with the same T) and the timesteps of the rows, in order."""

    schedules: list[NoiseSchedule]
    timesteps: list[int | float]  # fractional only for ODE steps between timesteps
    steps: int | None = None  # set when the rows are the timesteps a sampler visits
    spacing: str | None = None
    sampler: str | None = None  # set when --sampler was given
    sigmas: str | None = None  # the ODE step schedule: None (the spacing's timesteps), karras, edm or tuned
    step_sigmas: list[float] | None = None  # ODE samplers: the N + 1 sigmas visited, the last one 0
    nfe: int | None = None  # model evaluations per image of that sampler
    tuned: list[Tuned] = field(default_factory=list)  # --checkpoint: the sigmas diffcli tune stored in it


# --------------------------------------------------------------------------------------------------
# Which schedules, which rows
# --------------------------------------------------------------------------------------------------


def load_schedules(
    schedule: str | None = None,
    compare: str | None = None,
    num_timesteps: int | None = None,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
    checkpoint: Path | None = None,
) -> list[NoiseSchedule]:
    """The schedules to inspect: one kind, a comma-separated list of kinds to compare, or the schedule
    stored in a model file. Options left as None take ScheduleSpec's defaults."""
    if schedule is not None and compare is not None:
        raise UsageError("give either --schedule or --compare, not both")
    if checkpoint is not None:
        given = [schedule, compare, num_timesteps, beta_start, beta_end, zero_terminal_snr or None]
        if any(v is not None for v in given):
            raise UsageError("--checkpoint reads the schedule from the model file; drop the other schedule options")
        # the model-file code (and the model) is imported only when a model file is asked for
        from diffcli.files.checkpoint import read_schedule

        return [read_schedule(checkpoint)]

    default = ScheduleSpec()
    kinds = [schedule or default.kind] if compare is None else [k.strip() for k in compare.split(",")]
    if "" in kinds:
        raise UsageError(f"--compare takes kinds separated by commas, got {compare!r}")
    if len(set(kinds)) < len(kinds):
        raise UsageError(f"--compare lists a schedule twice: {compare!r}")
    return [
        NoiseSchedule(
            kind,
            default.num_timesteps if num_timesteps is None else num_timesteps,
            default.beta_start if beta_start is None else beta_start,
            default.beta_end if beta_end is None else beta_end,
            zero_terminal_snr,
        )
        for kind in kinds
    ]


def load_tuned(checkpoint: Path | None) -> list[Tuned]:
    """The tuned entries of a model file (none without one)."""
    if checkpoint is None:
        return []
    from diffcli.files.checkpoint import read_model_spec

    return read_model_spec(checkpoint).tuned


def evenly_spaced(T: int, rows: int) -> list[int]:
    """`rows` timesteps from 0 to T - 1: multiples of T // (rows - 1), then T - 1 (0, 100, ..., 900, 999)."""
    if not isinstance(rows, int) or not 2 <= rows <= T:
        raise UsageError(f"rows must be between 2 and the schedule's {T} timesteps, got {rows}")
    step = T // (rows - 1)
    return [i * step for i in range(rows - 1)] + [T - 1]


def choose_rows(
    schedules: list[NoiseSchedule],
    rows: int | None = None,
    steps: int | None = None,
    spacing: str | None = None,
    every_row: bool = False,
    sampler: str | None = None,
    sigmas: str | None = None,
    tuned: list[Tuned] | None = None,
) -> Inspection:
    """Rows for the timesteps a sampler visits (`steps`; `sampler` and `sigmas` as for sampling),
    `rows` evenly spaced ones, or by default every timestep (every_row, for JSON and CSV) or
    TABLE_ROWS of them. tuned: the model file's tuned entries (--checkpoint), for --sigmas auto/tuned."""
    tuned = list(tuned or [])
    T = schedules[0].num_timesteps
    if steps is None and (sampler is not None or sigmas is not None):
        raise UsageError(f"--{'sampler' if sampler is not None else 'sigmas'} needs --steps")
    if steps is not None:
        if rows is not None:
            raise UsageError("give either --rows or --steps, not both")
        if not isinstance(steps, int) or not 1 <= steps <= T:  # sample refuses more steps than timesteps too
            raise UsageError(f"steps must be between 1 and the schedule's {T} timesteps, got {steps}")
        # the same defaults and the same rule as `sample`, so the rows are the steps it takes
        sampler = sampler or registry.DEFAULT_SAMPLER
        registry.spec(sampler)
        asked = sigmas
        sigmas = registry.resolve_sigmas(sampler, "auto" if sigmas is None else sigmas, steps, tuned)
        spacing = registry.resolve_spacing(sigmas, spacing)
        if not registry.spec(sampler).takes_sigmas:
            visited = [int(t) for t in schedules[0].timesteps(steps, spacing)]
            return Inspection(schedules, visited, steps, spacing, sampler, nfe=steps, tuned=tuned)
        if sigmas is not None and len(schedules) > 1:
            how = f"--sigmas {sigmas}" if asked not in (None, "auto") else f"{sampler}'s default {sigmas} sigmas"
            raise UsageError(f"{how} depend on each schedule's sigma range; inspect one schedule at a time, "
                             "or compare timesteps with --sampler ddim or --sigmas none")
        given = registry.sigmas_for(sigmas, sampler, steps, tuned)
        sig = ode.step_sigmas(schedules[0], steps, spacing, given)
        visited = [_int_if_whole(ode.sigma_to_t(schedules[0], s)) for s in sig[:-1]]
        spacing = None if sigmas is not None else spacing
        return Inspection(schedules, visited, steps, spacing, sampler, sigmas, sig,
                          ode.nfe(sampler, steps, given, schedules[0]), tuned)
    if spacing is not None:
        raise UsageError("--spacing needs --steps")
    if rows is None:
        return Inspection(schedules, list(range(T)) if every_row else evenly_spaced(T, min(TABLE_ROWS, T)), tuned=tuned)
    return Inspection(schedules, evenly_spaced(T, rows), tuned=tuned)


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def _int_if_whole(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t


def row(schedule: NoiseSchedule, t: int) -> Row:
    s = schedule
    return Row(
        t=t,
        beta=float(s.betas[t]),
        alpha_bar=float(s.alphas_cumprod[t]),
        sqrt_alpha_bar=float(s.sqrt_alphas_cumprod[t]),
        sqrt_one_minus_alpha_bar=float(s.sqrt_one_minus_alphas_cumprod[t]),
        snr_db=float(s.log_snr[t]) * DB,
        sigma=float(s.sigmas[t]),
    )


def row_between(schedule: NoiseSchedule, t: float, sigma: float) -> Row:
    """A noise level between timesteps (t = ode.sigma_to_t(sigma), fractional): alpha_bar = 1 / (1 + sigma^2)
    as the ODE samplers use it, beta interpolated linearly in t."""
    i, frac = math.floor(t), t - math.floor(t)
    ab = 1 / (1 + sigma**2)
    beta = (1 - frac) * float(schedule.betas[i]) + frac * float(schedule.betas[i + 1])
    return Row(t, beta, ab, math.sqrt(ab), math.sqrt(1 - ab), -2 * math.log(sigma) * DB, sigma)


def rows_of(inspection: Inspection, schedule: NoiseSchedule) -> list[Row]:
    """The rows of one schedule: table rows at whole timesteps, row_between at the visited sigma elsewhere."""
    out = []
    for i, t in enumerate(inspection.timesteps):
        if isinstance(t, int):
            out.append(row(schedule, t))
        else:
            assert inspection.step_sigmas is not None  # only ODE step sigmas fall between timesteps
            out.append(row_between(schedule, t, inspection.step_sigmas[i]))
    return out


def zero_db_crossing(schedule: NoiseSchedule) -> int | None:
    """The first t with SNR_t < 1 (0 dB), i.e. alpha_bar_t < 1/2; None if SNR stays at or above 0 dB."""
    below = (schedule.log_snr < 0).nonzero()
    return int(below[0]) if len(below) else None


def tuned_lines(inspection: Inspection) -> list[str]:
    """One line per tuned entry of the model file: what it is for, its sigmas, how it compared."""
    out = []
    for t in inspection.tuned:
        sig = ", ".join(f"{v:.4g}" for v in t.sigmas)
        fixed = {k: v for k, v in t.distance.items() if k != "tuned"}
        vs = ", ".join(f"{k} {v:.4f}" for k, v in sorted(fixed.items(), key=lambda kv: kv[1]))
        line = (f"tuned: {t.sampler} {t.steps} steps at guidance {t.guidance:g}: sigmas {sig}; distance to "
                f"{t.reference} on {t.validation_seeds} validation seeds {t.distance.get('tuned', float('nan')):.4f}"
                f" (fixed: {vs})")
        if t.guidance_interval is not None:
            line += f"; guidance interval {t.guidance_interval[0]:.4g} to {t.guidance_interval[1]:.4g}"
            if t.interval_distance.get("interval") is not None:
                line += f" (distance {t.interval_distance['interval']:.4f} with it)"
        out.append(line)
    return out


def summary(schedule: NoiseSchedule) -> str:
    """One line: the terminal SNR and where the SNR crosses 0 dB."""
    T = schedule.num_timesteps
    last = row(schedule, T - 1)
    if last.alpha_bar == 0:
        terminal = f"terminal SNR 0 (-inf dB) at t={T - 1}"
    else:
        terminal = f"terminal SNR {last.snr_db:.2f} dB (alpha_bar {last.alpha_bar:.5g}) at t={T - 1}"
    t0 = zero_db_crossing(schedule)
    if t0 is None:
        crossing = "SNR stays above 0 dB"
    elif t0 == 0:
        crossing = "SNR is below 0 dB from t=0"
    else:
        crossing = f"SNR crosses 0 dB between t={t0 - 1} and t={t0}"
    return f"{schedule.kind}: {terminal}; {crossing}"


# --------------------------------------------------------------------------------------------------
# Layouts: rich table, JSON, CSV
# --------------------------------------------------------------------------------------------------


def _short(x: float) -> str:
    """5 significant digits: enough to tell 0.99995 from 1 in a table; --json has every digit."""
    return f"{x:.5g}"


def heading(inspection: Inspection) -> str:
    """What the tables show, e.g. `linear schedule, T=1000, beta 0.0001 to 0.02`."""
    schedules = inspection.schedules
    spec = schedules[0].spec
    text = f"{', '.join(s.kind for s in schedules)} schedule{'s' if len(schedules) > 1 else ''}, T={spec.num_timesteps}"
    if any(s.kind != "cosine" for s in schedules):  # cosine has no beta range
        text += f", beta {spec.beta_start:g} to {spec.beta_end:g}"
    if spec.zero_terminal_snr:
        text += ", zero terminal SNR"
    n, sampler = inspection.steps, inspection.sampler
    if n is not None and inspection.step_sigmas is not None:
        how = (f"{inspection.sigmas} sigmas" + (", rho 7" if inspection.sigmas in ode.FAMILIES else "")
               if inspection.sigmas else f"{inspection.spacing} spacing")
        text += (
            f": the {n} noise levels {sampler} steps from ({how}), in order, then sigma 0; "
            f"{inspection.nfe} model evaluations"
        )
    elif n is not None:
        text += f": the {n} timesteps {sampler or 'a sampler'} visits ({inspection.spacing} spacing), in order"
    return text


def _t_text(t: float) -> str:
    return str(t) if isinstance(t, int) else f"{t:.2f}"


def tables(inspection: Inspection) -> list[Table]:
    """One schedule: one table with every column. Several: a table of alpha_bar and one of SNR, with
    the schedules side by side (so that four of them still fit 80 columns)."""
    schedules, ts = inspection.schedules, inspection.timesteps
    if len(schedules) == 1:
        tab = Table()
        for header in ("t", "beta", "alpha_bar", "sqrt(ab)", "sqrt(1-ab)", "SNR dB", "sigma"):
            tab.add_column(header, justify="right")
        for t, r in zip(ts, rows_of(inspection, schedules[0])):
            cells = [r.beta, r.alpha_bar, r.sqrt_alpha_bar, r.sqrt_one_minus_alpha_bar]
            tab.add_row(_t_text(t), *map(_short, cells), f"{r.snr_db:.2f}", _short(r.sigma))
        return [tab]
    out = []
    for quantity, cell in (("alpha_bar", lambda r: _short(r.alpha_bar)), ("SNR dB", lambda r: f"{r.snr_db:.2f}")):
        tab = Table(title=quantity, title_justify="left")
        tab.add_column("t", justify="right")
        for s in schedules:
            tab.add_column(s.kind, justify="right")
        columns = [rows_of(inspection, s) for s in schedules]
        for k, t in enumerate(ts):
            tab.add_row(_t_text(t), *(cell(rows[k]) for rows in columns))
        out.append(tab)
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json_lines(inspection: Inspection) -> list[str]:
    """JSON Lines (diffcli.records): a `sampling` record when the rows are a sampler's steps, then per
    schedule a `schedule` record and one `row` record per timestep. Every value at full float64
    precision; inf and -inf become null."""
    from diffcli.records import line

    out = []
    if inspection.steps is not None:
        out.append(line(
            "inspect-schedule", "sampling", steps=inspection.steps, spacing=inspection.spacing,
            sampler=inspection.sampler, sigmas=inspection.sigmas, nfe=inspection.nfe,
            timesteps=inspection.timesteps, step_sigmas=inspection.step_sigmas,  # step_sigmas: ODE samplers only
        ))
    for s in inspection.schedules:
        out.append(line(
            "inspect-schedule", "schedule", schedule=s.to_dict(),
            terminal_snr_db=_finite_or_none(row(s, s.num_timesteps - 1).snr_db),
            snr_below_0db_from_t=zero_db_crossing(s),
        ))
        for r in rows_of(inspection, s):
            out.append(line("inspect-schedule", "row", schedule=s.kind, **asdict(r)))
    for t in inspection.tuned:
        out.append(line("inspect-schedule", "tuned", **t.to_dict()))
    return out


def to_csv(inspection: Inspection) -> str:
    """One line per schedule and timestep; floats written with every digit (inf as `inf`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("schedule",) + COLUMNS)
    for s in inspection.schedules:
        for r in rows_of(inspection, s):
            writer.writerow([s.kind, *(repr(v) for v in asdict(r).values())])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot_schedules(inspection: Inspection, path: Path, width: int, height: int, overwrite: bool = False) -> None:
    """Two panels, alpha_bar and log-SNR (dB) against t, one line per schedule; the visited timesteps
    are dotted on each line when the inspection is of sampling steps."""
    if not (400 <= width <= 4000 and 200 <= height <= 4000):
        raise UsageError(f"the plot must be 400..4000 pixels wide and 200..4000 high, got {width}x{height}")
    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"the plot is written as PNG; give a file name ending in .png, got {str(path)!r}")
    if not Path(path).parent.resolve().is_dir():  # never create folders the user did not ask for
        raise UsageError(f"the folder of --plot does not exist: {Path(path).parent} (create it first)")
    if Path(path).exists() and not overwrite:  # fail before drawing; the write itself is exclusive too
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    marks = [round(t) for t in inspection.timesteps] if inspection.steps is not None else []  # nearest t
    mark_label = None
    if marks:
        how = inspection.sigmas or inspection.spacing
        mark_label = f"{inspection.sampler + ' ' if inspection.sampler else ''}{inspection.steps} steps, {how}"
    T = inspection.schedules[0].num_timesteps
    alpha_bar, snr_db = [], []
    for s in inspection.schedules:
        xs = list(range(T))
        alpha_bar.append(plot.Series(s.kind, xs, s.alphas_cumprod.tolist(), marks))
        snr_db.append(plot.Series(s.kind, xs, (s.log_snr * DB).tolist(), marks))
    half = width // 2
    left = plot.line_chart(
        alpha_bar, size=(half, height), title="alpha_bar", x_label="timestep t", y_range=(0.0, 1.0), mark_label=mark_label
    )
    right = plot.line_chart(
        snr_db, size=(width - half, height), title="log-SNR (dB)", x_label="timestep t", legend=False
    )
    images.save_png(path, plot.side_by_side([left, right]), overwrite=overwrite)
