"""Development tool: how good are samples of an MNIST model? (Not part of the package.)

Trains a small CNN digit classifier on the image folder (9,000 images; 1,000 held out to report
its own accuracy), then for each model file samples `n` images per class and reports:
  accuracy    fraction of samples the classifier assigns to the requested digit
  fd          Frechet distance between the classifier's penultimate features of the samples and of
              the real digits (an FID computed with this small MNIST network instead of Inception)
  nn_rmse     mean per-pixel RMSE (in [0, 1] units) from each sample to its nearest training image,
              next to the same figure for the held-out real digits (copies of training images would
              score far below the held-out figure)
  diversity   mean per-pixel RMSE between pairs of samples of the same class

    python benchmarks/mnist_eval.py --data ../shared/data/mnist-10k --model weights/diffcli-mnist.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcli.checkpoint import load_model  # noqa: E402
from diffcli.data import load_folder  # noqa: E402
from diffcli.samplers import sample  # noqa: E402


class DigitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128 * 3 * 3, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)  # 14
        x = F.max_pool2d(F.relu(self.c2(x)), 2)  # 7
        x = F.max_pool2d(F.relu(self.c3(x)), 2)  # 3
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def load_digits(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = load_folder(data, (28, 28), channels="1")
    return s.pixels.float() / 255.0, s.labels  # (N, 1, 28, 28) in [0, 1]


def train_classifier(x: torch.Tensor, y: torch.Tensor, device: torch.device, epochs: int = 15, seed: int = 0,
                     cache: str | None = None):
    """Train on 9,000 digits (1,000 held out), or load the weights cached at `cache`."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    held, tr = perm[:1000], perm[1000:]
    torch.manual_seed(seed)
    net = DigitNet().to(device)
    if cache and Path(cache).exists():
        from safetensors.torch import load_file

        net.load_state_dict(load_file(cache))
        epochs = 0
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = x[tr].to(device), y[tr].to(device)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=g).to(device)
        for i in range(0, len(xt), 128):
            b = order[i : i + 128]
            xb = xt[b]
            # small random shifts so the classifier does not depend on exact centring
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    if cache and epochs:
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in net.state_dict().items()}, cache)
    with torch.no_grad():
        acc = (net(x[held].to(device)).argmax(1).cpu() == y[held]).float().mean().item()
    return net, acc, held, tr


def frechet(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    r1 = sqrtm(s1)
    cross = sqrtm(r1 @ s2 @ r1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1 + s2 - 2 * cross))


def nn_rmse(q: torch.Tensor, ref: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-pixel RMSE from each query image to its nearest reference image."""
    qf, rf = q.flatten(1).to(device), ref.flatten(1).to(device)
    out = []
    for i in range(0, len(qf), 256):
        d = torch.cdist(qf[i : i + 256], rf).min(1).values
        out.append(d.cpu())
    return torch.cat(out) / (qf.shape[1] ** 0.5)


@torch.no_grad()
def evaluate(path: str, net: DigitNet, x: torch.Tensor, held: torch.Tensor, device: torch.device,
             n_per_class: int, steps: int, guidance: float | None, sampler: str, batch: int, seed: int) -> dict:
    mf = load_model(path, device)
    g = float(mf.sampling.get("guidance", 1.0)) if guidance is None else guidance
    labels = torch.arange(10).repeat_interleave(n_per_class)
    imgs = []
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        lab = labels[i : i + batch]
        res = sample(mf.model, mf.schedule, (1, 28, 28), steps, sampler, seeds=list(range(seed + i, seed + i + len(lab))),
                     labels=lab, null_label=mf.model.null_class, guidance=g, prediction=mf.prediction, device=device)
        imgs.append(((res.images.float().clamp(-1, 1) + 1) / 2).cpu())
    seconds = time.perf_counter() - t0
    s = torch.cat(imgs)
    s = (s * 255).round() / 255  # what a PNG would hold
    pred = net(s.to(device)).argmax(1).cpu()
    acc = (pred == labels).float().mean().item()
    per_class = [(pred[labels == k] == k).float().mean().item() for k in range(10)]
    fd = frechet(net.features(s.to(device)).cpu(), net.features(x.to(device)).cpu())
    nn_s = nn_rmse(s, x, device).mean().item()
    div = []
    for k in range(10):
        sk = s[labels == k].flatten(1)
        d = torch.cdist(sk, sk) / (sk.shape[1] ** 0.5)
        m = len(sk)
        div.append((d.sum() / (m * (m - 1))).item())
    return {"model": path, "steps": int(mf.training.get("steps", -1)), "sampling_steps": steps, "sampler": sampler,
            "guidance": g, "n": len(labels), "accuracy": acc, "per_class": per_class, "fd": fd,
            "nn_rmse": nn_s, "diversity": sum(div) / 10, "seconds": seconds,
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
    ap.add_argument("--classifier", help="cache of the classifier's weights (.safetensors): loaded if present")
    a = ap.parse_args()
    device = torch.device(a.device)
    x, y = load_digits(a.data)
    t0 = time.perf_counter()
    net, clf_acc, held, tr = train_classifier(x, y, device, cache=a.classifier)
    ref_nn = nn_rmse(x[held], x[tr], device).mean().item()
    ref_fd = frechet(net.features(x[held].to(device)).detach().cpu(), net.features(x[tr].to(device)).detach().cpu())
    head = {"classifier_heldout_accuracy": clf_acc, "heldout_nn_rmse": ref_nn, "heldout_fd": ref_fd,
            "classifier_seconds": time.perf_counter() - t0}
    print(json.dumps(head), flush=True)
    lines = [head]
    for path in a.model:
        for steps in a.steps:
            for g in a.guidance:
                r = evaluate(path, net, x, held, device, a.n_per_class, steps, g, a.sampler, a.batch, a.seed)
                print(json.dumps(r), flush=True)
                lines.append(r)
    if a.out:
        Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in lines))


if __name__ == "__main__":
    main()
