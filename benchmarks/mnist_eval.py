"""Development tool: how good are samples of an MNIST model, beyond `diffcli eval`? (Not part of the package.)

The classifier and the feature distance are the package's (`diffcli.eval`: the `auto` network trained
on the image folder, cached in the eval cache, and its FID); this script adds figures in pixel space
and sweeps over models, step counts and guidance scales. For each model file it samples `n` images
per class and reports:
  accuracy    fraction of samples the classifier assigns to the requested digit (`diffcli eval`'s class accuracy)
  fid         FID with the auto features against the real digits (`diffcli eval --features auto`)
  nn_rmse     mean per-pixel RMSE (in [0, 1] units) from each sample to its nearest real image, next to
              the same figure for a tenth of the real digits against the rest (copies of real images
              would score far below that)
  diversity   mean per-pixel RMSE between pairs of samples of the same class

    python benchmarks/mnist_eval.py --data ../shared/data/mnist-10k --model weights/diffcli-mnist.safetensors

(Before diffcli eval existed this script trained its own copy of the classifier, DigitNet; the figures
in weights/README.md dated before it were measured with that copy.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcli.files.checkpoint import load_model  # noqa: E402
from diffcli.data.folder import load_folder  # noqa: E402
from diffcli.eval.evaluate import Evaluator  # noqa: E402
from diffcli.files.images import to_uint8  # noqa: E402
from diffcli.diffusion.registry import sample  # noqa: E402


def load_digits(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = load_folder(data, (28, 28), channels="1")
    return s.pixels.float() / 255.0, s.labels  # (N, 1, 28, 28) in [0, 1]


def nn_rmse(q: torch.Tensor, ref: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-pixel RMSE from each query image to its nearest reference image."""
    qf, rf = q.flatten(1).to(device), ref.flatten(1).to(device)
    out = []
    for i in range(0, len(qf), 256):
        d = torch.cdist(qf[i : i + 256], rf).min(1).values
        out.append(d.cpu())
    return torch.cat(out) / (qf.shape[1] ** 0.5)


@torch.no_grad()
def evaluate(path: str, evaluator: Evaluator, x: torch.Tensor, device: torch.device, n_per_class: int, steps: int,
             guidance: float | None, sampler: str, batch: int, seed: int) -> dict:
    mf = load_model(path, device)
    g = float(mf.sampling.get("guidance", 1.0)) if guidance is None else guidance
    labels = torch.arange(10).repeat_interleave(n_per_class)
    imgs = []
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        lab = labels[i : i + batch]
        res = sample(mf.model, mf.schedule, (1, 28, 28), steps, sampler, seeds=list(range(seed + i, seed + i + len(lab))),
                     labels=lab, null_label=mf.model.null_class, guidance=g, prediction=mf.prediction, device=device)
        imgs.append(to_uint8(res.images).permute(0, 3, 1, 2))  # what a PNG would hold
    seconds = time.perf_counter() - t0
    pixels = torch.cat(imgs)
    scores = evaluator.score_pixels(pixels, [mf.class_names[int(k)] for k in labels])
    s = pixels.float() / 255.0
    div = []
    for k in range(10):
        sk = s[labels == k].flatten(1)
        d = torch.cdist(sk, sk) / (sk.shape[1] ** 0.5)
        m = len(sk)
        div.append((d.sum() / (m * (m - 1))).item())
    return {"model": path, "steps": int(mf.training.get("steps", -1)), "sampling_steps": steps, "sampler": sampler,
            "guidance": g, "n": len(labels), "accuracy": scores.accuracy, "per_class": scores.per_class_accuracy,
            "fid": scores.fid, "kid": scores.kid_mean, "precision": scores.precision, "recall": scores.recall,
            "nn_rmse": nn_rmse(s, x, device).mean().item(), "diversity": sum(div) / 10, "seconds": seconds,
            "images_seen": mf.training.get("images_seen"), "train_seconds": mf.training.get("seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, nargs="+", default=[50])
    ap.add_argument("--guidance", type=float, nargs="+", default=[None])
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=10_000)
    ap.add_argument("--out", help="write results as JSON lines here")
    ap.add_argument("--cache", help="the eval cache folder (default: diffcli eval's)")
    a = ap.parse_args()
    device = torch.device(a.device)
    x, _ = load_digits(a.data)
    t0 = time.perf_counter()
    evaluator = Evaluator.prepare(a.data, "auto", cache_dir=a.cache, device=device, log=lambda m: print(m, file=sys.stderr))
    held = torch.arange(len(x)) % 10 == 0
    head = {"classifier_heldout_accuracy": evaluator.clf.accuracy, "heldout_nn_rmse": nn_rmse(x[held], x[~held], device).mean().item(),
            "classifier_seconds": time.perf_counter() - t0}
    print(json.dumps(head), flush=True)
    lines = [head]
    for path in a.model:
        for steps in a.steps:
            for g in a.guidance:
                r = evaluate(path, evaluator, x, device, a.n_per_class, steps, g, a.sampler, a.batch, a.seed)
                print(json.dumps(r), flush=True)
                lines.append(r)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
