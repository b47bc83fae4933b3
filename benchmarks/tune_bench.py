"""The targets of `diffcli tune` (issue: automatic tuning of the noise steps), measured on one model file.

Parts (--parts, comma-separated; all by default):
  quality    mean per-pixel RMSE (in [0, 1] units) to a DDIM-1000 reference from the same noise, on the
             tune command's validation seeds (never seen by its search), for the model's tuned sigmas at
             N and every fixed family at N and at 1.5 N (and at the step count of every other tuned entry
             the file holds). Targets: tuned at N >= 30% closer than the best
             fixed family at N, and at least as close as the best fixed family at 1.5 N.
  interval   sampling wall time of the default sampler and steps (tuned sigmas) with full guidance and with
             the stored guidance interval, interleaved, and the class accuracy of both (diffcli eval's
             classifier of --data). Targets: >= 25% less time, accuracy within 1 point. The same figures
             (one run each) for every other tuned entry that holds an interval.
  e2e        whole-process time of `diffcli sample` with no option but -n/--seed/--out, against
             benchmarks/diffusers_pipeline.py (a diffusers DiT + DDIM-50 job of the same size), and the
             distance of both settings to the reference (the diffusers job's images are those of DDIM-50,
             computed with diffcli's DDIM on the same model). Target: >= 4x faster at no larger distance.
             With the quality part, also at equal distance: diffcli given the fewest --steps (of 15 to 18,
             20, 25; sigmas and guidance interval as `sample` picks them) that come as close as DDIM-50.
  tune       the wall time of `diffcli tune MODEL --steps N` with its defaults. Target: under 10 minutes.

    python benchmarks/tune_bench.py --checkpoint weights/diffcli-mnist.safetensors --data ../shared/data/mnist-10k

Results: a table, and benchmarks/tune_results.json (--results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcli.files.checkpoint import load_model  # noqa: E402
from diffcli.diffusion import registry  # noqa: E402
from diffcli.diffusion import tune  # noqa: E402
from diffcli.diffusion.tune import VALIDATION_BASE, Solver, distance  # noqa: E402

HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


DDIM_CURVE = (20, 25, 30, 35, 40, 45, 50)  # DDIM step counts: distance against steps, beside the ODE samplers
OURS_CURVE = (15, 16, 17, 18, 20, 25)  # step counts of `diffcli sample`'s default sampler, with the sigmas it picks


def reference(solver: Solver, mf, val: list[int], ref_steps: int, cache: str | None) -> torch.Tensor:
    """The DDIM reference of the validation seeds, read from / written to a cache file of `diffcli tune
    --reference-cache`'s kind when given (it is most of the quality part's time). Its key covers the
    weights, not the metadata, so storing a tuned entry in the model file keeps the cache valid."""
    ref = f"ddim:{ref_steps}"
    key = tune.reference_key(mf, ref, solver.guidance, {"validation": (val, solver.labels(val, VALIDATION_BASE))})
    if cache:
        path = tune.check_reference_cache(cache)
        found = tune.read_reference_cache(path, key, {"validation": (len(val), *solver.shape)}, log)
        if found is not None:
            return found["validation"]
    t0 = time.perf_counter()
    images = solver.images(val, VALIDATION_BASE, ref_steps, "ddim", None)
    log(f"reference {ref} on {len(val)} validation seeds: {time.perf_counter() - t0:.0f} s")
    if cache:
        tune.write_reference_cache(path, key, {"validation": images}, ref, Path(mf.path).name)
    return images


def quality(mf, steps: int, seeds: int, ref_steps: int, batch: int, cache: str | None = None) -> dict:
    entry = registry.find_tuned(mf.tuned, registry.DEFAULT_SAMPLER, steps)
    if entry is None:
        raise SystemExit(f"the model has no tuned {registry.DEFAULT_SAMPLER} sigmas at {steps} steps: "
                         f"diffcli tune MODEL --steps {steps} --in-place")
    classes = list(range(len(mf.class_names))) or [None]
    solver = Solver(mf, entry.sampler, entry.guidance, classes, batch, torch.device("cpu"))
    val = [VALIDATION_BASE + i for i in range(seeds)]
    ref = reference(solver, mf, val, ref_steps, cache)
    rows: dict[str, float] = {}
    more = round(1.5 * steps)
    entries = {t.steps: t for t in mf.tuned if t.sampler == registry.DEFAULT_SAMPLER}
    for n in sorted({steps, more, *entries}):
        if n in entries:
            rows[f"tuned@{n}"] = distance(solver.images(val, VALIDATION_BASE, n, sigmas=list(entries[n].sigmas)), ref)
        for fam in registry.FIXED:
            rows[f"{fam}@{n}"] = distance(solver.images(val, VALIDATION_BASE, n, sigmas=None if fam == "none" else fam), ref)
    for n in DDIM_CURVE:
        rows[f"ddim@{n}"] = distance(solver.images(val, VALIDATION_BASE, n, "ddim", None), ref)
    # `diffcli sample --steps n` with the default sampler: the sigmas (and guidance interval) it picks itself
    ours = {}
    for n in OURS_CURVE:
        family = registry.resolve_sigmas(registry.DEFAULT_SAMPLER, "auto", n, mf.tuned)
        found = registry.find_tuned(mf.tuned, registry.DEFAULT_SAMPLER, n) if family == "tuned" else None
        sig = list(found.sigmas) if found else family
        ours[n] = distance(solver.images(val, VALIDATION_BASE, n, sigmas=sig,
                                         interval=found.guidance_interval if found else None), ref)
    best_n = min(registry.FIXED, key=lambda f: rows[f"{f}@{steps}"])
    best_more = min(registry.FIXED, key=lambda f: rows[f"{f}@{more}"])
    improvement = 1 - rows[f"tuned@{steps}"] / rows[f"{best_n}@{steps}"]
    for k, v in rows.items():
        log(f"  {k:>14}: {v:.4f}")
    for n, v in ours.items():
        log(f"  sample --steps {n}: {v:.4f}")
    return {"reference": f"ddim:{ref_steps}", "validation_seeds": seeds, "sampler": entry.sampler,
            "guidance": entry.guidance, "distance": {k: round(v, 6) for k, v in rows.items()},
            "best_fixed": f"{best_n}@{steps}", "improvement": round(improvement, 4),
            "target_improvement": 0.30, "met_improvement": improvement >= 0.30,
            "default_sample": {str(n): round(v, 6) for n, v in ours.items()},
            "best_fixed_at_1_5n": f"{best_more}@{more}",
            "met_1_5n": rows[f"tuned@{steps}"] <= rows[f"{best_more}@{more}"]}


def interval(mf, data: str, images: int, reps: int, batch: int) -> dict:
    from diffcli.eval.evaluate import Evaluator

    steps, sampler = registry.DEFAULT_STEPS, registry.DEFAULT_SAMPLER
    entry = registry.find_tuned(mf.tuned, sampler, steps)
    if entry is None or entry.guidance_interval is None:
        raise SystemExit(f"the model has no guidance interval with its {sampler} {steps}-step sigmas: "
                         f"diffcli tune MODEL --steps {steps} --guidance-interval --real DIR --in-place")
    evaluator = Evaluator.prepare(data, "auto", want_accuracy=True, log=log)
    K = len(mf.class_names)
    solver = Solver(mf, sampler, entry.guidance, list(range(K)), batch, torch.device("cpu"))
    seeds = list(range(images))
    names = [mf.class_names[i % K] for i in seeds]
    times: dict[str, list[float]] = {"full": [], "interval": []}
    acc: dict[str, float] = {}
    for r in range(reps):
        for name in (("full", "interval") if r % 2 == 0 else ("interval", "full")):
            t0 = time.perf_counter()
            imgs = solver.images(seeds, 0, steps, sigmas=list(entry.sigmas),
                                 interval=entry.guidance_interval if name == "interval" else None)
            times[name].append(time.perf_counter() - t0)
            if name not in acc:
                acc[name] = 100 * evaluator.score_pixels((imgs * 255).round().to(torch.uint8), names).accuracy
    med = {k: statistics.median(v) for k, v in times.items()}
    saving = 1 - med["interval"] / med["full"]
    log(f"  interval {entry.guidance_interval}: {med['interval']:.1f} s vs {med['full']:.1f} s full "
        f"({100 * saving:.1f}% less); accuracy {acc['interval']:.2f}% vs {acc['full']:.2f}%")
    # every other entry with an interval (e.g. one judged by distance): the class accuracy it keeps, one run each
    others = {}
    for e in mf.tuned:
        if e is entry or e.guidance_interval is None:
            continue
        row = {"interval": list(e.guidance_interval), "seconds": {}, "accuracy": {}}
        for name in ("full", "interval"):
            t0 = time.perf_counter()
            imgs = solver.images(seeds, 0, e.steps, e.sampler, sigmas=list(e.sigmas),
                                 interval=e.guidance_interval if name == "interval" else None)
            row["seconds"][name] = round(time.perf_counter() - t0, 2)
            row["accuracy"][name] = round(100 * evaluator.score_pixels((imgs * 255).round().to(torch.uint8),
                                                                       names).accuracy, 2)
        others[f"{e.sampler}@{e.steps}"] = row
        log(f"  interval {e.guidance_interval} at {e.steps} steps: {row['seconds']['interval']:.1f} s vs "
            f"{row['seconds']['full']:.1f} s full; accuracy {row['accuracy']['interval']:.2f}% vs {row['accuracy']['full']:.2f}%")
    return {"sampler": sampler, "steps": steps, "images": images, "reps": reps, "interval": list(entry.guidance_interval),
            "seconds": {k: [round(s, 2) for s in v] for k, v in times.items()},
            "median_seconds": {k: round(v, 2) for k, v in med.items()}, "time_saving": round(saving, 4),
            "accuracy": {k: round(v, 2) for k, v in acc.items()},
            "met_time": saving >= 0.25, "met_accuracy": acc["full"] - acc["interval"] <= 1.0, "other_entries": others}


def whole_process(cmd: list[str]) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.monotonic() - t0


def e2e(checkpoint: str, images: int, reps: int, quality_rows: dict | None) -> dict:
    """Whole-process time of `diffcli sample` against the diffusers DDIM-50 job, two ways: diffcli as shipped
    (its defaults) and, with the quality part's distances, diffcli given the fewest --steps that come as
    close to the reference as DDIM-50 (equal distance). The default's own distance is reported too: with
    a stored guidance interval it solves another ODE than the full-guidance reference on purpose, so its
    distance measures that choice as well as the step error."""
    exe = Path(sys.executable).with_name("diffcli")
    ours = [str(exe) if exe.exists() else sys.executable] + ([] if exe.exists() else ["-m", "diffcli"])
    plan = {"default": (None, 50)}  # name -> (diffcli --steps or None for its default, DDIM steps)
    out: dict = {"images": images, "reps": reps}
    if quality_rows:
        d, mine = quality_rows["distance"], {int(k): v for k, v in quality_rows["default_sample"].items()}
        default = mine[registry.DEFAULT_STEPS]
        out.update(default_distance=default, ddim50_distance=d["ddim@50"], met_distance=default <= d["ddim@50"])
        if f"tuned@{registry.DEFAULT_STEPS}" in d:
            out["default_sigmas_full_guidance_distance"] = d[f"tuned@{registry.DEFAULT_STEPS}"]
        n_ours = next((n for n in sorted(mine) if mine[n] <= d["ddim@50"]), None)
        if n_ours is not None:
            plan["diffcli_as_close_as_ddim50"] = (n_ours, 50)
            out["diffcli_steps_as_close_as_ddim50"] = {"steps": n_ours, "distance": mine[n_ours]}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n_ours, n_ddim) in plan.items():
            cmds = {"diffcli": [*ours, "sample", "-c", checkpoint, "-n", str(images), "--seed", "0", "--out",
                                f"{tmp}/ours", "--overwrite", "-q", *([] if n_ours is None else ["--steps", str(n_ours)])],
                    "diffusers": [sys.executable, str(HERE / "diffusers_pipeline.py"), "-n", str(images),
                                  "--steps", str(n_ddim), "--out", f"{tmp}/theirs"]}
            times: dict[str, list[float]] = {"diffcli": [], "diffusers": []}
            for cmd in cmds.values():  # warm-up: file caches, first imports
                whole_process(cmd)
            for r in range(reps):
                for who in (("diffcli", "diffusers") if r % 2 == 0 else ("diffusers", "diffcli")):
                    times[who].append(whole_process(cmds[who]))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["diffusers"] / med["diffcli"]
            row = {"diffcli_steps": n_ours or registry.DEFAULT_STEPS, "ddim_steps": n_ddim,
                   "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                   "median_seconds": {k: round(v, 2) for k, v in med.items()}, "speedup": round(ratio, 2)}
            if name == "default":  # the fields earlier results files had
                out.update(seconds=row["seconds"], median_seconds=row["median_seconds"], speedup=row["speedup"],
                           met_speed=ratio >= 4)
            else:
                out[name] = row
            log(f"  e2e {name}: diffcli {row['diffcli_steps']} steps {med['diffcli']:.1f} s, diffusers DDIM-{n_ddim} "
                f"{med['diffusers']:.1f} s: {ratio:.2f}x")
    if "diffcli_as_close_as_ddim50" in out:
        out["met_speed_at_equal_distance"] = out["diffcli_as_close_as_ddim50"]["speedup"] >= 4
    return out


def tune_time(checkpoint: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(sys.executable).with_name("diffcli")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "diffcli"]
        t = whole_process([*cmd, "tune", checkpoint, "--steps", str(steps), "--out", f"{tmp}/t.safetensors", "-q"])
    log(f"  tune --steps {steps}: {t / 60:.1f} minutes")
    return {"steps": steps, "seconds": round(t, 1), "met": t < 600}


def machine_info() -> dict:
    sys.path.insert(0, str(HERE))
    from run import machine_info as info  # the CPU's model name, cores and threads, as every benchmark records them

    return info()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(HERE.parent / "weights" / "diffcli-mnist.safetensors"))
    ap.add_argument("--data", default=None, help="the class folder for the interval part's classifier")
    ap.add_argument("--parts", default="quality,interval,e2e,tune")
    ap.add_argument("--steps", type=int, default=10, help="N of the quality and tune parts")
    ap.add_argument("--seeds", type=int, default=32, help="validation seeds of the quality part")
    ap.add_argument("--reference-steps", type=int, default=1000)
    ap.add_argument("--reference-cache", help="a .safetensors file to keep the quality part's reference in")
    ap.add_argument("--interval-images", type=int, default=500)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--results", default=str(HERE / "tune_results.json"))
    args = ap.parse_args()
    parts = args.parts.split(",")
    mf = load_model(args.checkpoint)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res: dict = {"date": now, "dates": {}, "checkpoint": args.checkpoint, "model_hash": mf.model_hash,
                 "machine": machine_info()}
    earlier = Path(args.results)
    if earlier.is_file():  # keep the parts not run now when they measured the same model file
        old = json.loads(earlier.read_text())
        if old.get("model_hash") == mf.model_hash:
            kept = [p for p in ("quality", "interval", "e2e", "tune") if p in old and p not in parts]
            res["dates"] = {p: old.get("dates", {}).get(p, old.get("date")) for p in kept}
            res.update({p: old[p] for p in kept})
    res["dates"].update({p: now for p in parts})
    if "quality" in parts:
        res["quality"] = quality(mf, args.steps, args.seeds, args.reference_steps, args.batch_size,
                                 args.reference_cache)
    if "interval" in parts:
        if not args.data:
            raise SystemExit("the interval part needs --data (the class folder for the classifier)")
        res["interval"] = interval(mf, args.data, args.interval_images, args.reps, args.batch_size)
    if "e2e" in parts:
        res["e2e"] = e2e(args.checkpoint, 64, max(args.reps, 3), res.get("quality"))
    if "tune" in parts:
        res["tune"] = tune_time(args.checkpoint, args.steps)
    Path(args.results).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
