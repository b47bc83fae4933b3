"""Latent against pixel diffusion at 64x64 RGB: training images per second and the whole `sample`
command, DiT-S/2 on f=8 latents (8x8x4, 16 tokens) against DiT-S/4 on pixels (256 tokens).

Random weights serve: speed does not depend on what was learned. The folder is synthetic (64 coloured
64x64 images, two classes); the autoencoder is the f8 preset, untrained. The latent run's one-off
encoding happens before training starts and is not counted; sampling figures are the wall time of whole `diffcli
sample` processes (start-up, model load, sampling, decoding and PNG writing), median of --repeats.
Training figures are the median over steps 2.. of the per-step metrics records.

    python benchmarks/latent_speed.py --out benchmarks/latent_speed.json
Targets (issue 12): training >= 8x, sampling >= 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIFFCLI = [sys.executable, "-m", "diffcli"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_folder(root: Path, n: int = 64, size: int = 64) -> Path:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        cls = "warm" if i % 2 else "cool"
        base = torch.tensor([200, 90, 40] if cls == "warm" else [40, 90, 200])
        px = (base + torch.randint(-40, 41, (size, size, 3), generator=g)).clamp(0, 255).to(torch.uint8)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.frombytes("RGB", (size, size), bytes(px.flatten().tolist())).save(root / cls / f"{i:03d}.png")
    return root


def run(args: list[str], threads: int) -> tuple[float, str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run(DIFFCLI + args, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"diffcli {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt, p.stdout, p.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "latent_speed.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images", type=int, default=8, help="images per sample command")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    import torch

    from diffcli.models.autoencoder import AutoencoderKL, ae_preset_config
    from diffcli.files.autoencoder_file import save_autoencoder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_folder(tmp / "data")
        torch.manual_seed(0)
        ae = tmp / "f8.safetensors"
        save_autoencoder(ae, AutoencoderKL(ae_preset_config("f8")))
        common = ["--resolution", "64", "--steps", str(a.train_steps), "--batch-size", str(a.batch_size),
                  "--warmup-steps", "1", "--sample-every", "0", "--checkpoint-every", "1000", "--metrics-every", "1",
                  "--json", "-q", "--device", "cpu"]
        kinds = {"pixel": ["--model", "DiT-S/4"], "latent": ["--model", "DiT-S/2", "--autoencoder", str(ae)]}
        res: dict[str, dict] = {}
        for kind, extra in kinds.items():
            log(f"training {kind}: {' '.join(extra[:2])}, {a.train_steps} steps of {a.batch_size}")
            wall, out, err = run(["train", str(data), "--out", str(tmp / kind), *extra, *common], a.threads)
            # steady state: the per-step records after the first (which pays for start-up), not the
            # summary's figure, which also counts writing the checkpoint at the end
            recs = [json.loads(x) for x in (tmp / kind / "metrics.jsonl").read_text().splitlines()]
            ips = statistics.median(r["images_per_second"] for r in recs if r["step"] > 1)
            res[kind] = {"model": extra[1], "train_images_per_second": round(ips, 2),
                         "train_command_seconds": round(wall, 2)}
            log(f"  {ips:.1f} images/s (median of steps 2-{a.train_steps})")
        for kind in kinds:
            model = tmp / kind / "model.safetensors"
            times = []
            for r in range(a.repeats + 1):  # the first is a warm-up (file cache)
                o = tmp / f"s-{kind}-{r}"
                wall, _, _ = run(["sample", "-c", str(model), "-n", str(a.images), "--steps", str(a.steps),
                                  "--seed", "0", "-o", str(o), "-q", "--device", "cpu"], a.threads)
                if r:
                    times.append(wall)
            res[kind]["sample_seconds_median"] = round(statistics.median(times), 2)
            res[kind]["sample_seconds"] = [round(t, 2) for t in times]
            log(f"sample {kind}: {a.images} images, {a.steps} steps: median {statistics.median(times):.2f} s")
    ratio_train = res["latent"]["train_images_per_second"] / res["pixel"]["train_images_per_second"]
    ratio_sample = res["pixel"]["sample_seconds_median"] / res["latent"]["sample_seconds_median"]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "threads": a.threads, "cpus": os.cpu_count(), "resolution": "64x64 RGB", "settings": vars(a) | {"out": str(a.out)},
           **res, "train_speedup": round(ratio_train, 2), "sample_speedup": round(ratio_sample, 2),
           "targets": {"train_speedup": 8, "sample_speedup": 5}}
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"training: latent {res['latent']['train_images_per_second']:.1f} img/s vs pixel "
          f"{res['pixel']['train_images_per_second']:.1f} img/s = {ratio_train:.1f}x (target 8x)")
    print(f"sampling ({a.images} images, {a.steps} steps, whole command): pixel {res['pixel']['sample_seconds_median']:.2f} s "
          f"vs latent {res['latent']['sample_seconds_median']:.2f} s = {ratio_sample:.1f}x (target 5x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
