"""Development tool: does a text-to-image model draw what its caption asks? (Not part of the package.)

Samples --per-triple K images for the caption of every triple of the shapes set (benchmarks/shapes.py)
with `diffcli sample --prompts FILE -n K --seed 0 --json`, once for the 136 seen triples and once for
the 32 held-back ones no training set contains, reads each PNG back with shapes.judge and reports, per
set, the share of images right on all three attributes and on each (fg colour, bg colour, shape), and
the sampling wall time.

Targets: seen >= 90% right on all three; held back >= 50% (the goal: 80%), which needs the model to
compose a colour, a background and a shape it never saw together.

    python benchmarks/text_bench.py --model weights/diffcli-shapes.safetensors --per-triple 10
    python benchmarks/text_bench.py --real ../diffcli-runs/shapes-test     # the judge on a shapes.py folder: 100%

--sampler, --steps and --guidance go to `diffcli sample` as given (default: the model file's).
Writes --out (benchmarks/text_results.json) with the machine, the date and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import shapes  # noqa: E402
from shapes import Triple  # noqa: E402

FILE_KEY, PROMPT_KEY = "path", "prompt"  # the fields of `diffcli sample --json`'s image records used here
SEEN_TARGET, HELD_BACK_TARGET, HELD_BACK_GOAL = 0.90, 0.50, 0.80
SETS = (("seen", False), ("held_back", True))  # result key, shapes.triples' argument


def write_prompts(path: Path, held_back: bool) -> list[Triple]:
    """One caption a line, the seen or the held-back triples; returns the triples in line order."""
    chosen = shapes.triples(held_back)
    path.write_text("".join(shapes.caption(*t) + "\n" for t in chosen))
    return chosen


def image_records(stdout: str) -> list[tuple[Path, Triple]]:
    """`diffcli sample --json` output -> (PNG, the triple its prompt names) for each image record; other
    records (grid, summary) lack the fields and are passed over."""
    found = []
    for text in stdout.splitlines():
        if not text.strip():
            continue
        rec = json.loads(text)
        if FILE_KEY in rec and PROMPT_KEY in rec:
            found.append((Path(rec[FILE_KEY]), shapes.parse_caption(rec[PROMPT_KEY])))
    return found


def sample(model: Path, prompts: Path, per_triple: int, out: Path, passed: list[str]) -> tuple[str, float]:
    """Run `diffcli sample` on one prompt file; its stdout and wall seconds (progress goes to stderr)."""
    cmd = [sys.executable, "-m", "diffcli", "sample", "-c", str(model), "--prompts", str(prompts),
           "-n", str(per_triple), "--seed", "0", "--out", str(out), "--json", *passed]
    print("  " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"diffcli sample exited with {done.returncode}")
    return done.stdout, seconds


def score(expected: list[Triple], judged: list[Triple]) -> dict:
    """Shares of images judged right on all three attributes and on each; None for an empty set."""
    n = len(expected)

    def share(right: int) -> float | None:
        return right / n if n else None

    pairs = list(zip(expected, judged, strict=True))
    return {
        "images": n,
        "triples": len(set(expected)),
        "all_three": share(sum(e == j for e, j in pairs)),
        **{name: share(sum(e[i] == j[i] for e, j in pairs)) for i, name in enumerate(("fg", "bg", "shape"))},
        # asked shape -> how often each shape (or "none": nothing off the background) was judged
        "shape_confusion": {asked: {judged: sum(e[2] == a and j[2] == b for e, j in pairs)
                                    for b, judged in [*enumerate(shapes.SHAPES), (-1, "none")]}
                            for a, asked in enumerate(shapes.SHAPES)},
    }


def judge_files(found: list[tuple[Path, Triple]]) -> dict:
    """(PNG, asked triple) pairs -> {"seen": score, "held_back": score}."""
    judged = shapes.judge(shapes.read_pngs([p for p, _ in found])) if found else []
    result = {}
    for key, held in SETS:
        pairs = [(t, j) for (_, t), j in zip(found, judged) if shapes.held_back(*t) == held]
        result[key] = score([t for t, _ in pairs], [j for _, j in pairs])
    return result


def judge_folder(folder: str | Path) -> dict:
    """A shapes.py folder judged against its own captions: {"seen": score, "held_back": score}."""
    return judge_files(shapes.read_set(folder))


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": gpu}


def targets(result: dict) -> dict:
    seen, held = result["seen"]["all_three"], result["held_back"]["all_three"]
    return {f"seen all three >= {SEEN_TARGET:.0%}": seen is not None and seen >= SEEN_TARGET,
            f"held back all three >= {HELD_BACK_TARGET:.0%}": held is not None and held >= HELD_BACK_TARGET,
            f"held back all three >= {HELD_BACK_GOAL:.0%} (goal)": held is not None and held >= HELD_BACK_GOAL}


def report(result: dict) -> str:
    def pc(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    beside = {"seen": f">= {SEEN_TARGET:.0%}",
              "held_back": f">= {HELD_BACK_TARGET:.0%} (goal {HELD_BACK_GOAL:.0%})"}
    rows = [f"{'':10} {'images':>7} {'all three':>10} {'fg':>7} {'bg':>7} {'shape':>7}   target (all three)"]
    for key, _ in SETS:
        s = result[key]
        rows.append(f"{key.replace('_', ' '):10} {s['images']:7d} {pc(s['all_three']):>10} {pc(s['fg']):>7} "
                    f"{pc(s['bg']):>7} {pc(s['shape']):>7}   {beside[key]}")
    for key, _ in SETS:
        conf = result[key].get("shape_confusion")
        if conf and result[key]["images"]:
            rows.append(f"{key.replace('_', ' ')} shapes, asked -> judged: " + "; ".join(
                f"{asked} " + " ".join(f"{judged} {n}" for judged, n in row.items() if n)
                for asked, row in conf.items() if any(row.values())))
    rows.append("targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()))
    secs = result["sampling_seconds"]
    if secs is not None:
        rows.append(f"sampling: {secs['total']:.1f} s (seen {secs['seen']:.1f} s, held back {secs['held_back']:.1f} s)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "weights" / "diffcli-shapes.safetensors")
    ap.add_argument("--per-triple", type=int, default=10, help="images sampled for each caption")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "text_results.json")
    ap.add_argument("--real", type=Path, help="judge this shapes.py folder instead of sampling (a check of the judge)")
    ap.add_argument("--sampler", help="passed to diffcli sample")
    ap.add_argument("--steps", type=int, help="passed to diffcli sample")
    ap.add_argument("--guidance", type=float, help="passed to diffcli sample")
    a = ap.parse_args(argv)
    passed = [arg for flag, value in (("--sampler", a.sampler), ("--steps", a.steps), ("--guidance", a.guidance))
              if value is not None for arg in (flag, str(value))]
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": machine()}

    if a.real is not None:
        if not a.real.is_dir():
            print(f"Error: {a.real} is not a folder", file=sys.stderr)
            return 2
        result |= {"real": str(a.real), **judge_folder(a.real), "sampling_seconds": None}
    else:
        if not a.model.is_file():
            print(f"Error: no model file {a.model}", file=sys.stderr)
            return 2
        if a.per_triple < 1:
            print(f"Error: --per-triple must be at least 1, not {a.per_triple}", file=sys.stderr)
            return 2
        found, seconds = [], {}
        with tempfile.TemporaryDirectory(prefix="text-bench-") as tmp:
            for key, held in SETS:
                prompts = Path(tmp) / f"{key}.txt"
                chosen = write_prompts(prompts, held)
                try:
                    stdout, seconds[key] = sample(a.model.resolve(), prompts, a.per_triple, Path(tmp) / key, passed)
                except RuntimeError as e:
                    print(f"Error: {e}", file=sys.stderr)
                    return 1
                images = image_records(stdout)
                asked = sorted(chosen * a.per_triple)
                if sorted(t for _, t in images) != asked:
                    print(f"Error: diffcli sample reported {len(images)} images for {key}, not {a.per_triple} "
                          f"for each of its {len(chosen)} captions", file=sys.stderr)
                    return 1
                found += images
            result |= judge_files(found)  # inside the with: the PNGs go with the folder
        result |= {"model": str(a.model), "per_triple": a.per_triple, "seed": 0,
                   "sample_options": passed or "the model file's defaults",
                   "sampling_seconds": {**{k: round(v, 1) for k, v in seconds.items()},
                                        "total": round(sum(seconds.values()), 1)}}
    result["targets"] = targets(result)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
