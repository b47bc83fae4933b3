"""inspect-schedule: pick rows of one or more noise schedules and lay them out as a table, JSON, CSV
or a plot.

Every number comes from NoiseSchedule (float64); this module only chooses which timesteps to show and
formats them. Columns, in the paper notation of diffcli.schedule:
    beta        beta_t
    alpha_bar   alpha_bar_t, the fraction of signal variance left in x_t
    sqrt_alpha_bar, sqrt_one_minus_alpha_bar
                the coefficients of x_0 and eps in x_t (DDPM Eq. 4)
    snr_db      10 log10 SNR_t; -inf where alpha_bar_t = 0 (zero terminal SNR)
    sigma       sqrt((1 - alpha_bar_t) / alpha_bar_t); inf where alpha_bar_t = 0
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rich.table import Table

from diffcli import images, plot
from diffcli.errors import OutputExistsError, UsageError
from diffcli.schedule import NoiseSchedule, ScheduleSpec

TABLE_ROWS = 11  # rows of the table when neither --rows nor --steps is given
DB = 10 / math.log(10)  # 10 log10(x) = DB * ln(x): log-SNR in decibels


@dataclass(frozen=True)
class Row:
    """One timestep of one schedule."""

    t: int
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
    timesteps: list[int]
    steps: int | None = None  # set when the rows are the timesteps a sampler visits
    spacing: str | None = None


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
        from diffcli.checkpoint import read_schedule

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
) -> Inspection:
    """Rows for the timesteps a sampler visits (`steps`), `rows` evenly spaced ones, or by default
    every timestep (every_row, for JSON and CSV) or TABLE_ROWS of them."""
    T = schedules[0].num_timesteps
    if steps is not None:
        if rows is not None:
            raise UsageError("give either --rows or --steps, not both")
        spacing = spacing or "trailing"
        visited = [int(t) for t in schedules[0].timesteps(steps, spacing)]
        return Inspection(schedules, visited, steps, spacing)
    if spacing is not None:
        raise UsageError("--spacing needs --steps")
    if rows is None:
        return Inspection(schedules, list(range(T)) if every_row else evenly_spaced(T, min(TABLE_ROWS, T)))
    return Inspection(schedules, evenly_spaced(T, rows))


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


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


def zero_db_crossing(schedule: NoiseSchedule) -> int | None:
    """The first t with SNR_t < 1 (0 dB), i.e. alpha_bar_t < 1/2; None if SNR stays at or above 0 dB."""
    below = (schedule.log_snr < 0).nonzero()
    return int(below[0]) if len(below) else None


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
    if inspection.steps is not None:
        text += f": the {inspection.steps} timesteps a sampler visits ({inspection.spacing} spacing), in order"
    return text


def tables(inspection: Inspection) -> list[Table]:
    """One schedule: one table with every column. Several: a table of alpha_bar and one of SNR, with
    the schedules side by side (so that four of them still fit 80 columns)."""
    schedules, ts = inspection.schedules, inspection.timesteps
    if len(schedules) == 1:
        tab = Table()
        for header in ("t", "beta", "alpha_bar", "sqrt(ab)", "sqrt(1-ab)", "SNR dB", "sigma"):
            tab.add_column(header, justify="right")
        for t in ts:
            r = row(schedules[0], t)
            cells = [r.beta, r.alpha_bar, r.sqrt_alpha_bar, r.sqrt_one_minus_alpha_bar]
            tab.add_row(str(t), *map(_short, cells), f"{r.snr_db:.2f}", _short(r.sigma))
        return [tab]
    out = []
    for quantity, cell in (("alpha_bar", lambda r: _short(r.alpha_bar)), ("SNR dB", lambda r: f"{r.snr_db:.2f}")):
        tab = Table(title=quantity, title_justify="left")
        tab.add_column("t", justify="right")
        for s in schedules:
            tab.add_column(s.kind, justify="right")
        for t in ts:
            tab.add_row(str(t), *(cell(row(s, t)) for s in schedules))
        out.append(tab)
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(inspection: Inspection) -> str:
    """Every value at full float64 precision; inf and -inf become null."""
    out = {
        "sampling": None
        if inspection.steps is None
        else {"steps": inspection.steps, "spacing": inspection.spacing, "timesteps": inspection.timesteps},
        "schedules": [
            {
                "schedule": s.to_dict(),
                "terminal_snr_db": _finite_or_none(row(s, s.num_timesteps - 1).snr_db),
                "snr_below_0db_from_t": zero_db_crossing(s),
                "rows": [{k: _finite_or_none(v) for k, v in asdict(row(s, t)).items()} for t in inspection.timesteps],
            }
            for s in inspection.schedules
        ],
    }
    return json.dumps(out, indent=2, allow_nan=False)


def to_csv(inspection: Inspection) -> str:
    """One line per schedule and timestep; floats written with every digit (inf as `inf`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("schedule",) + COLUMNS)
    for s in inspection.schedules:
        for t in inspection.timesteps:
            writer.writerow([s.kind, *(repr(v) for v in asdict(row(s, t)).values())])
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
    if Path(path).exists() and not overwrite:  # fail before drawing; the write itself is exclusive too
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    marks = inspection.timesteps if inspection.steps is not None else []
    mark_label = f"{inspection.steps} steps, {inspection.spacing}" if marks else None
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
