"""Step-count study: how close does each sampler get, in how many steps, to a many-step solution?

All the deterministic samplers solve the same probability-flow ODE from the same noise, so for fixed
seeds and classes they converge to the same images as the steps grow. This renders a fixed set of
images (each seed once per class for a conditional model) with every sampler and step count asked
for, and with a reference sampler at many steps, then reports per setting:
    rmse        mean over images of the per-pixel RMSE to the reference image, in [0, 1] pixel units
                (model output clamped to [-1, 1] and mapped to [0, 1], before rounding to 8 bits)
    max         the largest of those per-image RMSEs
    nfe         model evaluations per image (a guided evaluation counts once)
    s/img       wall time per image (all images in one batch; depends on what else the machine runs)
and writes a grid PNG per setting (rows: seeds, columns: classes), a labelled overview of all of them,
and results.json into --out. The reference is cached in --out (reference-*.safetensors) and reused by
later runs with the same model, seeds, classes and guidance.

The default reference is heun with Karras sigmas at 250 steps (second order, 499 evaluations). DDIM
at 250 steps is first order and its own error is of the size of the differences being measured (on
the MNIST model about a quarter of DDIM-50's distance; see it with `--samplers ddim --steps 250`).
Heun with the default (--spacing) sigmas is no reference for a cosine schedule: its first step spans
sigma 2e4 -> a few, where the trapezoidal correction is far off (see diffcli.diffusion.ode.heun).

    python benchmarks/step_study.py --checkpoint weights/diffcli-mnist.safetensors --out runs/steps \\
        --samplers ddim,euler,heun,dpm++2m --steps 5,10,15,20,25,50 --seeds 0..1 --threads 2

A sampler may carry a step schedule: `heun:karras`, `dpm++2m:karras` (see diffcli.diffusion.ode), or `dpm++2m:tuned`,
the sigmas `diffcli tune` stored in the model file for that sampler and step count (step counts without
them are skipped); a trailing `+gi` (`dpm++2m:tuned+gi`) also applies the guidance interval stored with
them. `--real DIR` adds each setting's class accuracy (diffcli eval's classifier of DIR). On one CPU
thread the shipped MNIST model (20 images, guidance 1.5) takes about 0.25 s per guided evaluation of
the batch: 2 minutes for the reference, 2.5 more for the default samplers and steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcli.diffusion import ode
from diffcli.files.checkpoint import ModelFile, load_model
from diffcli.device import autocast_denoiser, resolve_device, resolve_precision
from diffcli.files.images import make_grid, save_png, to_pil, to_uint8
from diffcli.diffusion import registry
from diffcli.diffusion.registry import sample


@dataclass(frozen=True)
class Setting:
    sampler: str
    sigmas: str | None
    steps: int
    interval: bool = False  # the guidance interval stored with the tuned sigmas

    @property
    def name(self) -> str:
        return self.sampler + (f":{self.sigmas}" if self.sigmas else "") + ("+gi" if self.interval else "")

    @property
    def file_stem(self) -> str:
        stem = f"{self.sampler}{'-' + self.sigmas if self.sigmas else ''}{'-gi' if self.interval else ''}"
        return f"{stem}-{self.steps:03d}".replace("+", "p")


@dataclass
class Result:
    sampler: str
    sigmas: str | None
    steps: int
    nfe: int
    rmse: float
    max_rmse: float
    seconds_per_image: float
    grid: str
    interval: bool = False
    guided: int = 0  # guided evaluations per image (nfe without a guidance interval)
    accuracy: float | None = None  # with --real: share of images recognised as their class


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    """'0..3' (inclusive) or '0,5,7'."""
    if ".." in text:
        a, b = text.split("..")
        seeds = list(range(int(a), int(b) + 1))
    else:
        seeds = [int(s) for s in text.split(",")]
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def parse_sampler(token: str) -> tuple[str, str | None, bool]:
    interval = token.endswith("+gi")
    name, _, sigmas = token.removesuffix("+gi").partition(":")
    sigmas = sigmas or None
    if name not in registry.NAMES:
        raise SystemExit(f"unknown sampler {name!r}; choose from {', '.join(registry.NAMES)}")
    registry.check_sigmas(name, sigmas)
    if interval and sigmas != "tuned":
        raise SystemExit(f"{token}: +gi is the guidance interval stored with tuned sigmas (name:tuned+gi)")
    return name, sigmas, interval


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


class Renderer:
    """Samples the study's fixed images (row r: seed r, column c: class c) with any setting."""

    def __init__(self, mf: ModelFile, seeds: list[int], device: torch.device, dtype: torch.dtype, guidance: float):
        cfg = mf.config
        self.mf, self.device, self.guidance = mf, device, guidance
        self.shape = (cfg.in_channels, cfg.image_height, cfg.image_width)
        self.denoiser = autocast_denoiser(mf.model, device, dtype)
        self.null = mf.model.null_class if cfg.num_classes else None
        self.classes = list(range(cfg.num_classes)) if cfg.num_classes else [None]
        self.cols = len(self.classes)
        self.seeds = [s for s in seeds for _ in self.classes]  # each row's seed, once per class
        self.labels = None if self.null is None else torch.tensor([c for _ in seeds for c in self.classes])

    def available(self, s: Setting) -> bool:
        """False for tuned sigmas the model file lacks (or +gi where the entry has no interval)."""
        if s.sigmas != "tuned":
            return True
        entry = registry.find_tuned(self.mf.tuned, s.sampler, s.steps)
        return entry is not None and (not s.interval or entry.guidance_interval is not None)

    def __call__(self, s: Setting) -> tuple[torch.Tensor, int, float, int]:
        """(images in [0, 1], float32 CPU, (B, C, H, W); nfe; seconds per image; guided evaluations)."""
        sigmas = registry.sigmas_for(s.sigmas, s.sampler, s.steps, self.mf.tuned)
        interval = None
        if s.interval:
            interval = registry.find_tuned(self.mf.tuned, s.sampler, s.steps).guidance_interval
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            res = sample(
                self.denoiser, self.mf.schedule, self.shape, s.steps, s.sampler, seeds=self.seeds, labels=self.labels,
                null_label=self.null, guidance=self.guidance, prediction=self.mf.prediction, spacing="trailing",
                clip_x0=1.0, device=self.device, sigmas=sigmas, guidance_interval=interval,
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / len(self.seeds)
        return (res.images.float().clamp(-1, 1).cpu() + 1) / 2, res.nfe, seconds, res.guided


def grid_image(images01: torch.Tensor, cols: int, scale: int) -> Image.Image:
    img = to_pil(make_grid(to_uint8(images01 * 2 - 1), ncols=cols))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def overview(rows: list[tuple[str, torch.Tensor]], scale: int) -> Image.Image:
    """One line per setting: its label, then all its images in one row."""
    strips = [grid_image(x, len(x), scale) for _, x in rows]
    label_w, line_h = 260, max(s.height for s in strips) + 4
    out = Image.new("RGB", (label_w + max(s.width for s in strips), line_h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, ((label, _), strip) in enumerate(zip(rows, strips)):
        draw.text((6, i * line_h + line_h // 2), label, fill="black", anchor="lm")
        out.paste(strip.convert("RGB"), (label_w, i * line_h + 2))
    return out


def class_accuracy(real: str, mf: ModelFile, device: torch.device):
    """A function (images in [0, 1], labels) -> share recognised as their class, by diffcli eval's classifier of REAL."""
    from diffcli.eval.evaluate import Evaluator

    evaluator = Evaluator.prepare(real, "auto", device=device, want_accuracy=True, log=lambda m: print(m, file=sys.stderr))

    def score(images01: torch.Tensor, labels: torch.Tensor | None) -> float | None:
        if labels is None:
            return None
        pixels = (images01 * 255).round().to(torch.uint8)
        return evaluator.score_pixels(pixels, [mf.class_names[int(k)] for k in labels]).accuracy

    return score


def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image RMSE over all pixels and channels: (B,)."""
    return ((a - b) ** 2).flatten(1).mean(1).sqrt()


# --------------------------------------------------------------------------------------------------
# The reference, cached
# --------------------------------------------------------------------------------------------------


def reference(render: Renderer, s: Setting, out: Path, seeds: list[int]) -> tuple[torch.Tensor, float, bool]:
    """(images, seconds per image, reused?) of the reference setting, cached in `out`."""
    from safetensors.torch import load_file, save_file

    key = {
        "model_hash": render.mf.model_hash, "setting": s.name, "steps": str(s.steps),
        "seeds": json.dumps(seeds), "guidance": repr(render.guidance), "classes": json.dumps(render.classes),
    }
    path = out / f"reference-{s.file_stem}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if all(meta.get(k) == v for k, v in key.items()):
            return load_file(str(path))["images"], float(meta["seconds_per_image"]), True
    images, _, seconds, _ = render(s)
    save_file({"images": images.contiguous()}, str(path), metadata={**key, "seconds_per_image": repr(seconds)})
    return images, seconds, False


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model file")
    ap.add_argument("--out", required=True, help="folder for grids, overview.png and results.json")
    ap.add_argument("--samplers", default="ddim,euler,heun,dpm++2m", help="comma-separated; name or name:karras")
    ap.add_argument("--steps", default="5,10,15,20,25,50", help="comma-separated step counts")
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0..1"), help="'a..b' (inclusive) or 'a,b,c'")
    ap.add_argument("--reference", default="heun:karras", help="reference sampler (name or name:karras)")
    ap.add_argument("--reference-steps", type=int, default=250)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model file's")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--scale", type=int, default=2, help="pixel scale of the PNGs")
    ap.add_argument("--no-overview", action="store_true", help="skip the labelled overview.png")
    ap.add_argument("--real", default=None, help="class folder: add each setting's class accuracy (diffcli eval's classifier)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = []
    for tok in args.samplers.split(","):
        name, sigmas, interval = parse_sampler(tok.strip())
        settings += [Setting(name, sigmas, int(n), interval) for n in args.steps.split(",")]
    ref_setting = Setting(*parse_sampler(args.reference)[:2], args.reference_steps)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    mf = load_model(args.checkpoint, device)
    guidance = args.guidance if args.guidance is not None else float(mf.sampling.get("guidance", 1.0))
    if not mf.config.num_classes:
        guidance = 1.0
    out = Path(args.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    render = Renderer(mf, args.seeds, device, dtype, guidance)
    print(f"model {args.checkpoint} ({mf.model_hash}), guidance {guidance:g}, {len(render.seeds)} images "
          f"({len(args.seeds)} seeds x {render.cols} classes), {device.type}, {torch.get_num_threads()} threads",
          file=sys.stderr)

    t0 = time.perf_counter()
    ref, ref_seconds, reused = reference(render, ref_setting, out, args.seeds)
    print(f"reference {ref_setting.name} {ref_setting.steps} steps: "
          f"{'reused from ' + str(out) if reused else f'{ref_seconds:.3f} s/image'}", file=sys.stderr)
    save_png(out / "grids" / f"reference-{ref_setting.file_stem}.png", grid_image(ref, render.cols, args.scale), overwrite=True)

    accuracy = class_accuracy(args.real, mf, device) if args.real else None
    results: list[Result] = []
    strips: list[tuple[str, torch.Tensor]] = [(f"reference {ref_setting.name} {ref_setting.steps}", ref)]
    for s in settings:
        if not render.available(s):
            print(f"  {s.name:>16} {s.steps:4d} steps  skipped: the model file has no tuned entry for it", file=sys.stderr)
            continue
        images, nfe, seconds, guided = render(s)
        d = rmse(images, ref)
        grid = out / "grids" / f"{s.file_stem}.png"
        save_png(grid, grid_image(images, render.cols, args.scale), overwrite=True)
        acc = accuracy(images, render.labels) if accuracy else None
        r = Result(s.sampler, s.sigmas, s.steps, nfe, float(d.mean()), float(d.max()), seconds, str(grid), s.interval,
                   guided, acc)
        results.append(r)
        strips.append((f"{s.name} {s.steps} ({nfe} NFE) rmse {r.rmse:.4f}", images))
        print(f"  {s.name:>16} {s.steps:4d} steps  nfe {nfe:4d}  guided {guided:4d}  rmse {r.rmse:.4f}  "
              f"{seconds:.3f} s/image" + (f"  accuracy {acc:.3f}" if acc is not None else ""), file=sys.stderr)
    if not args.no_overview:
        save_png(out / "overview.png", overview(strips, args.scale), overwrite=True)

    doc = {
        "checkpoint": str(args.checkpoint), "model_hash": mf.model_hash, "guidance": guidance,
        "seeds": args.seeds, "classes": render.classes, "images": len(render.seeds), "device": device.type,
        "threads": torch.get_num_threads(), "metric": "mean per-image per-pixel RMSE in [0,1] units to the reference",
        "reference": {**asdict(ref_setting), "nfe": ode.nfe(ref_setting.sampler, ref_setting.steps)
                      if registry.spec(ref_setting.sampler).takes_sigmas else ref_setting.steps, "seconds_per_image": ref_seconds},
        "results": [asdict(r) for r in results], "wall_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print_table(results, ref_setting)


def print_table(results: list[Result], ref: Setting) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"distance to {ref.name} at {ref.steps} steps (per-pixel RMSE, [0, 1] units)")
    for header in ("sampler", "steps", "NFE", "guided", "rmse", "max", "s/image", "accuracy"):
        tab.add_column(header, justify="right")
    for r in results:
        name = r.sampler + (f":{r.sigmas}" if r.sigmas else "") + ("+gi" if r.interval else "")
        tab.add_row(name, str(r.steps), str(r.nfe), str(r.guided), f"{r.rmse:.4f}", f"{r.max_rmse:.4f}",
                    f"{r.seconds_per_image:.3f}", "" if r.accuracy is None else f"{r.accuracy:.3f}")
    Console().print(tab)
    target = [r for r in results if r.sampler == "ddim" and r.sigmas is None and r.steps == 50]
    if target:
        bar = target[0].rmse
        fast = [r for r in results if r.steps <= 15 and r.sampler != "ddim" and r.rmse <= bar]
        names = ", ".join(f"{r.sampler}{':' + r.sigmas if r.sigmas else ''} {r.steps}" for r in fast) or "none"
        print(f"ddim 50 steps: rmse {bar:.4f}; settings of <= 15 steps at least as close: {names}")
    if not math.isfinite(sum(r.rmse for r in results)):
        print("warning: some distances are not finite", file=sys.stderr)


if __name__ == "__main__":
    main()
