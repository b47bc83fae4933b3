"""Learning curve on the CPU: how good a training recipe's model is after 5, 10, 20, 30 minutes.

Trains on a class folder (by default ../shared/data/mnist-10k) with `diffcli train --time-limit`,
one run folder continued with `--resume auto` up to each snapshot time, so the minutes are the
training loop's own clock (data decoding, start-up and the scoring between snapshots are not
counted). At every snapshot the EMA model (the run's model.safetensors) draws --images samples, as
many of each class, with every --sampler (by default the `sample` default, DPM++ 2M 15 steps, and
DDIM 50), and `diffcli eval`'s machinery scores them against the folder:

  accuracy  recognised-as-requested: the share of samples that the eval classifier (a small CNN
            trained on the folder itself, 90% of it; its own accuracy on the other 10% is printed)
            puts in the class they were drawn for
  fd        Frechet distance in that classifier's feature space (the `auto` FID of `diffcli eval`)

Throughput is reported in images/s and as a share of this machine's fp32 matmul peak (torch.mm of
two 2048x2048 matrices on the same threads, measured once before training; training FLOPs counted
as 3 x the DiT forward, benchmarks/run.py's dit_flops).

    python benchmarks/cpu_curve.py --recipe quick   --run /tmp/curve-quick   --results benchmarks/cpu_curve_quick.json
    python benchmarks/cpu_curve.py --recipe default --run /tmp/curve-default --results benchmarks/cpu_curve_default.json
    python benchmarks/cpu_curve.py --plot benchmarks/cpu_curve.png benchmarks/cpu_curve_default.json benchmarks/cpu_curve_quick.json

Arguments after `--` go to `diffcli train` unchanged (e.g. `-- --lr 3e-3`): that is how a change to
a recipe is measured. The run folder is kept: run again with larger --minutes to extend the curve
(snapshots already scored in --results are kept, not redone). Wall-clock minutes mean something
only on an otherwise idle machine: the load average before and after each segment is recorded.
Exit codes: 2 bad options, 3/4 from `diffcli train` or the folder (a too small folder: 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

MIN_PER_CLASS = 20  # the classifier holds back 10% of the folder: fewer than this per class is too few


def torch_inference(fn: Any) -> Any:
    """fn under torch.inference_mode(): sampling must not keep an autograd graph of every step."""
    def wrapped(*a: Any, **k: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*a, **k)
    return wrapped


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_minutes(text: str) -> list[float]:
    try:
        mins = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise SystemExit(f"error: --minutes must be comma-separated numbers, got {text!r}") from None
    if not mins or any(m <= 0 for m in mins) or mins != sorted(set(mins)):
        raise SystemExit(f"error: --minutes must be positive and increasing, got {text!r}")
    return mins


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the best of `reps` fp32 torch.mm of n x n matrices on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def check_folder(data: Path) -> dict[str, int]:
    """Images per class folder; exits 4 when the folder cannot feed the classifier's held-out slice."""
    from diffcli.data.folder import find_images

    if not data.is_dir():
        log(f"Error: no such folder: {data}")
        raise SystemExit(4)
    files, labels, names = find_images(data)
    if not names:
        log(f"Error: {data} has no class subfolders: the curve scores recognised-as-requested samples")
        raise SystemExit(4)
    counts = {n: 0 for n in names}
    for k in labels:
        counts[names[k]] += 1
    few = {n: c for n, c in counts.items() if c < MIN_PER_CLASS}
    if few:
        shown = ", ".join(f"{n} ({c})" for n, c in list(few.items())[:5])
        log(f"Error: {data} is too small for the classifier's held-out slice: fewer than {MIN_PER_CLASS} "
            f"images in class {shown}")
        raise SystemExit(4)
    return counts


def train_segment(args: argparse.Namespace, minutes: float, extra: list[str]) -> dict[str, Any]:
    """Continue the run to `minutes` of training; the summary record of `diffcli train --json`."""
    cmd = [sys.executable, "-m", "diffcli", "train", str(args.data), "--out", str(args.run), "--preset", args.recipe,
           "--resolution", args.resolution, "--steps", str(args.max_steps), "--time-limit", f"{minutes:g}",
           "--threads", str(args.threads), "--resume", "auto", "--json", "--log-every", "60", *extra]
    log(f"train to {minutes:g} min: {' '.join(cmd[2:])}")
    load_before = os.getloadavg()[0]
    with open(args.run.parent / f"{args.run.name}.train.log", "a") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    summary = None
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "summary":
            summary = rec
        elif rec.get("kind") == "error":
            log(f"Error: diffcli train: {rec.get('message')}")
    if proc.returncode != 0 or summary is None:
        log(f"Error: diffcli train exited with {proc.returncode} (log: {args.run.parent / (args.run.name + '.train.log')}); "
            f"the run folder {args.run} is kept and resumable")
        raise SystemExit(proc.returncode or 1)
    summary["load_before"], summary["load_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return summary


def trained_seconds(run: Path) -> float:
    """Training seconds of the run's model file (0 when there is none yet)."""
    from diffcli.files.checkpoint import read_model_spec

    model = run / "model.safetensors"
    return float(read_model_spec(model).training.get("seconds", 0)) if model.exists() else 0.0


def resume_summary(args: argparse.Namespace, minutes: float) -> dict[str, Any] | None:
    """When the run already stands at this snapshot (a call cut short after training it and before
    scoring it), the figures of its model file instead of training; None when it has not got there."""
    secs = trained_seconds(args.run)
    if secs < minutes * 60:
        return None
    if secs > minutes * 60 + 60:
        log(f"Error: the run {args.run} has trained {secs / 60:.1f} minutes, past the {minutes:g}-minute snapshot; "
            f"use another --run for this curve")
        raise SystemExit(2)
    from diffcli.files.checkpoint import read_model_spec

    t = read_model_spec(args.run / "model.safetensors").training
    rows = [json.loads(x) for x in (args.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ips = [r["images_per_second"] for r in rows if "images_per_second" in r and "loss" in r]
    log(f"{args.run} already stands at {secs / 60:.1f} minutes (step {t['steps']}): scoring it")
    return {"steps": t["steps"], "seconds": secs, "images_per_second": round(sum(ips) / max(1, len(ips)), 2),
            "load_before": None, "load_after": None}


@torch_inference
def score(args: argparse.Namespace, evaluator: Any, samplers: list[str]) -> dict[str, Any]:
    """Samples of the run's model.safetensors with each sampler, scored."""
    import torch

    from diffcli.files.checkpoint import load_model
    from diffcli.diffusion import registry
    from diffcli.files.images import to_uint8

    mf = load_model(args.run / "model.safetensors", torch.device("cpu"))
    mc = mf.config
    K = len(mf.class_names)
    n = args.images
    labels = torch.arange(n) % K
    out: dict[str, Any] = {}
    for spec in samplers:
        name, _, steps = spec.partition(":")
        name = registry.DEFAULT_SAMPLER if name == "default" else name
        steps_n = int(steps) if steps else registry.DEFAULT_STEPS
        sigmas = registry.resolve_sigmas(name, "auto") if name in registry.ODE_SAMPLERS else None
        t0 = time.perf_counter()
        chunks = []
        for start in range(0, n, 100):
            seeds = list(range(start, min(n, start + 100)))
            res = registry.sample(mf.model, mf.schedule, (mc.in_channels, mc.image_height, mc.image_width), steps_n,
                                  name, seeds=seeds, labels=labels[seeds], null_label=mf.model.null_class,
                                  guidance=float(mf.sampling.get("guidance", 1.0)), prediction=mf.prediction,
                                  device=torch.device("cpu"), sigmas=sigmas,
                                  clip_x0=None if mf.decoder is not None else 1.0)
            x = res.images
            if mf.decoder is not None:  # a latent model: its embedded decoder makes the pixels
                with torch.inference_mode():
                    x = mf.decoder(x).clamp(-1, 1)
            chunks.append(to_uint8(x).permute(0, 3, 1, 2))
        s = evaluator.score_pixels(torch.cat(chunks), [mf.class_names[int(k)] for k in labels])
        out[spec] = {"accuracy": round(100 * s.accuracy, 2), "fd": round(s.fid, 4),
                     "sample_seconds": round(time.perf_counter() - t0, 1)}
        log(f"  {spec:>10}: {out[spec]['accuracy']:.1f}% recognised as requested, FD {s.fid:.3f}")
    return out


def run_curve(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from diffcli.eval.evaluate import Evaluator
    from diffcli.models.dit import ModelConfig
    from run import dit_flops

    counts = check_folder(args.data)
    minutes = parse_minutes(args.minutes)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    if args.results.exists():
        results = json.loads(args.results.read_text())
        if results.get("recipe") != args.recipe or results.get("train_args") != extra:
            log(f"Error: {args.results} holds another recipe's curve ({results.get('recipe')} "
                f"{' '.join(results.get('train_args', []))}); choose another --results")
            return 2
    peak = results.get("matmul_peak_gflops") or round(matmul_peak(args.threads), 1)
    log(f"fp32 matmul peak on {args.threads} threads: {peak:.0f} GFLOP/s")
    log(f"classifier and real features of {args.data} (cached by diffcli eval)")
    evaluator = Evaluator.prepare(args.data, "auto", device=torch.device("cpu"), want_accuracy=True, log=log)
    done = {s["minutes"]: s for s in results.get("snapshots", [])}
    for m in minutes:
        if m in done:
            continue
        summary = resume_summary(args, m) or train_segment(args, m, extra)
        cfg = json.loads((args.run / "config.json").read_text())
        flops_per_image = 3 * dit_flops(ModelConfig.from_dict(cfg["model_config"]))
        ips = summary["images_per_second"]
        snap = {"minutes": m, "steps": summary["steps"], "images_seen": summary["steps"] * cfg["train"]["batch_size"],
                "train_seconds": summary["seconds"], "images_per_second": ips,
                "share_of_peak": round(ips * flops_per_image / 1e9 / peak, 3),
                "load_before": summary["load_before"], "load_after": summary["load_after"],
                "samples": score(args, evaluator, samplers)}
        done[m] = snap
        results = {"recipe": args.recipe, "train_args": extra, "data": str(args.data), "images_per_class": counts,
                   "resolution": args.resolution, "threads": args.threads, "matmul_peak_gflops": peak,
                   "train_config": {k: cfg["train"][k] for k in ("model", "batch_size", "lr", "warmup_steps",
                                                                  "ema_decay", "prediction", "min_snr_gamma",
                                                                  "timestep_sampling", "long_skip")},
                   "parameters": cfg["parameters"], "gflop_per_image": round(flops_per_image / 1e9, 4),
                   "classifier_accuracy": evaluator.clf.accuracy if evaluator.clf is not None else None,
                   "images": args.images, "samplers": samplers,
                   "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "torch": torch.__version__},
                   "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "snapshots": [done[k] for k in sorted(done)]}
        args.results.write_text(json.dumps(results, indent=2) + "\n")
        log(f"{m:g} min: step {snap['steps']}, {ips:.0f} img/s ({100 * snap['share_of_peak']:.0f}% of peak) -> {args.results}")
    return 0


def plot(out: Path, files: list[Path], sampler: str) -> int:
    from diffcli.plot import Series, line_chart

    series = []
    for f in files:
        r = json.loads(f.read_text())
        snaps = r["snapshots"]
        args, tc = r["train_args"], r["train_config"]
        if "--autoencoder" in args:  # a latent run: the label says which latents, not every option
            ae = Path(args[args.index("--autoencoder") + 1]).name
            label = f"{r['recipe']}, {tc['model']} on the latents of {ae}, batch {tc['batch_size']}"
        else:
            label = r["recipe"] + (" " + " ".join(args) if args else "") + f" ({tc['model']}, batch {tc['batch_size']})"
        series.append(Series(label, [s["minutes"] for s in snaps], [s["samples"][sampler]["accuracy"] for s in snaps],
                             marks=tuple(range(len(snaps)))))
    where = str(r.get("data", "mnist")).lower()
    data = "MNIST" if "mnist" in where else "CIFAR-10" if "cifar" in where else Path(where).name
    img = line_chart(series, title=f"{data} on {r['threads']} CPU threads: samples recognised as requested ({sampler})",
                     x_label="minutes of training", y_label="% recognised as requested", y_range=(0, 100))
    img.save(out)
    log(f"plot: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist-10k")
    p.add_argument("--recipe", default="quick", help="train --preset")
    p.add_argument("--run", type=Path, help="run folder (kept; continued by later calls)")
    p.add_argument("--minutes", default="5,10,20,30", help="snapshot times, minutes of training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", default="28")
    p.add_argument("--images", type=int, default=500, help="samples per snapshot and sampler")
    p.add_argument("--samplers", default="default,ddim:50", help="`default` (sample's) and/or SAMPLER:STEPS")
    p.add_argument("--max-steps", type=int, default=1_000_000, help="train --steps (the time limit stops it first)")
    p.add_argument("--results", type=Path, help="JSON results (read back to skip snapshots already scored)")
    p.add_argument("--plot", type=Path, help="draw the curves of the JSON files given and exit")
    p.add_argument("--plot-sampler", default="default")
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args(argv)
    if args.plot:
        return plot(args.plot, args.files, args.plot_sampler)
    if args.run is None or args.results is None:
        p.error("--run and --results are needed to train a curve")
    if args.threads < 1 or args.images < 10:
        p.error("--threads must be >= 1 and --images >= 10")
    args.run.parent.mkdir(parents=True, exist_ok=True)
    return run_curve(args, extra)


if __name__ == "__main__":
    sys.exit(main())
