"""Development tool: how well does `diffcli sample --init-image` edit MNIST digits? (Not part of the package.)

Runs the sample job itself (diffcli.sampling.generate.run, as `diffcli sample` does) on digits of the MNIST
folder with the shipped model and its defaults (dpm++2m, 15 steps, edm sigmas, guidance 1.5), and
measures the targets of issue #19 with the classifier `diffcli eval` trains on the folder (diffcli.eval.classifier):

  inpainting   a 12x12 centre square of each digit redrawn (--mask, strength 1), guided by the digit's
               own class and by another class ((y + 1) % 10): pixels outside the mask that differ from
               the input (target 0), and how often the classifier sees the class asked for (targets
               >= 95% own class, >= 60% other class)
  img2img      --strength 0.2 ... 1.0, guided by the own class: mean per-pixel RMSE to the input in
               [0, 1] units (target: growing with the strength), and at strength 1 the classifier's
               accuracy against plain samples of the same classes (target: within 2 points)

The digits are the first 500 (50 per class, in index order, interleaved 0 1 2 ... 9 0 1 ...) of
the 1,000 that the classifier holds out, so the classifier never saw them; the shipped diffusion
model was trained on all 10,000 digits of the folder, so they are NOT unseen by the model being
measured (no other MNIST digits are on this machine).

    python benchmarks/edit_bench.py --data ../shared/data/mnist-10k        # writes benchmarks/edit_results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffcli.sampling import generate  # noqa: E402
from diffcli.data.folder import load_folder  # noqa: E402
from diffcli.eval import classifier  # noqa: E402
from diffcli.eval.features import prepare, tensor_image  # noqa: E402

MASK_BOX = (8, 20)  # rows and columns 8..19: the 12x12 centre square of 28x28
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)


def pick(labels: torch.Tensor, held: torch.Tensor, per_class: int) -> list[int]:
    """per_class digits of each class from the classifier's held-out set, in index order, interleaved by class."""
    held = sorted(held.tolist())
    by_class = [[i for i in held if int(labels[i]) == k][:per_class] for k in range(10)]
    if min(len(b) for b in by_class) < per_class:
        raise SystemExit(f"the held-out set has fewer than {per_class} digits of some class")
    return [by_class[k][j] for j in range(per_class) for k in range(10)]


def write_inputs(folder: Path, pixels: torch.Tensor) -> None:
    """uint8 (N, 1, 28, 28) -> folder/000.png ... (names sort in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a folder of init images is taken whole: leave no earlier run's files
        old.unlink()
    for i, px in enumerate(pixels):
        Image.frombytes("L", (28, 28), bytes(px.flatten().tolist())).save(folder / f"{i:03d}.png")


def read(paths: list[str]) -> torch.Tensor:
    """PNGs -> uint8 (N, 1, 28, 28)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8).reshape(1, 28, 28))
    return torch.stack(out)


def run_job(label: str, out: Path, **options) -> tuple[torch.Tensor, float]:
    """One `diffcli sample` job in this process; its images as uint8 and its seconds."""
    opts = generate.SampleOptions(out=str(out), device="cpu", threads=1, batch_size=100, overwrite=True, **options)
    t0 = time.perf_counter()
    recs = [r for r in generate.run(opts) if r["kind"] == "image"]
    seconds = time.perf_counter() - t0
    print(f"  {label}: {len(recs)} images in {seconds:.0f} s", file=sys.stderr, flush=True)
    return read([r["path"] for r in sorted(recs, key=lambda r: r["index"])]), seconds


def at_net_size(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> uint8 (N, 1, 32, 32), resized as `diffcli eval` resizes (PIL bicubic)."""
    return torch.stack([prepare(tensor_image(im), classifier.SIZE, 1) for im in images])


def train_classifier(pixels: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """diffcli eval's auto classifier trained on the folder (as `diffcli eval --real` trains it), its
    accuracy on its held-out tenth, and the indices of that tenth (the same seeded draw train() makes)."""
    trained = classifier.train(at_net_size(pixels), labels, 10, seed=seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return trained.net, trained.accuracy, order[: int(len(labels) * classifier.HOLD_OUT)]


@torch.no_grad()
def predict(net, images: torch.Tensor) -> torch.Tensor:
    return net(classifier.to_input(at_net_size(images))).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist-10k"))
    ap.add_argument("--model", default=str(ROOT / "weights" / "diffcli-mnist.safetensors"))
    ap.add_argument("--n", type=int, default=500, help="digits for inpainting and strength 1 (a multiple of 10)")
    ap.add_argument("--n-sweep", type=int, default=100, help="digits for strengths 0.2 ... 0.8 (the first of the n)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "edit-bench"), help="inputs, outputs and the classifier cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "edit_results.json"))
    ap.add_argument("--seed", type=int, default=0, help="edits use seeds seed.., plain samples seed + 100000..")
    a = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    s = load_folder(a.data, (28, 28), channels="1")
    y = s.labels
    net, clf_acc, held = train_classifier(s.pixels, y)
    idx = pick(y, held, a.n // 10)
    digits, labels = s.pixels[idx], y[idx]  # (n, 1, 28, 28) uint8, (n,)
    other = (labels + 1) % 10
    write_inputs(work / "inputs", digits)
    write_inputs(work / "inputs-sweep", digits[: a.n_sweep])
    mask = torch.zeros(28, 28, dtype=torch.uint8)
    lo, hi = MASK_BOX
    mask[lo:hi, lo:hi] = 255
    Image.frombytes("L", (28, 28), bytes(mask.flatten().tolist())).save(work / "mask.png")
    outside = mask == 0
    common = {"checkpoint": a.model, "name": "{stem}.png"}
    print(f"classifier: {clf_acc:.1%} on its 1,000 held-out digits; {a.n} digits edited", file=sys.stderr)

    # inpainting: own class, another class (and, on the first n_sweep digits, another class with more guidance)
    inpaint = {}
    for key, target, n, extra in (("own_class", labels, a.n, {}), ("other_class", other, a.n, {}),
                                  ("other_class_guidance_3", other, a.n_sweep, {"guidance": 3.0})):
        folder = work / ("inputs" if n == a.n else "inputs-sweep")
        imgs, secs = run_job(f"inpaint {key}", work / key, init_image=str(folder), mask=str(work / "mask.png"),
                             classes=[str(int(c)) for c in target[:n]], seed=a.seed, **common, **extra)
        diff = (imgs != digits[:n])[:, 0] & outside  # (n, 28, 28)
        pred, y_n, t_n = predict(net, imgs), labels[:n], target[:n]
        inpaint[key] = {"n": n, "guidance": extra.get("guidance", 1.5), "outside_mask_differences": int(diff.sum()),
                        "accuracy": (pred == t_n).float().mean().item(),
                        "still_the_input_class": (pred == y_n).float().mean().item(),
                        "per_input_class": [(pred[y_n == k] == t_n[y_n == k]).float().mean().item() for k in range(10)],
                        "seconds": round(secs, 1)}

    # image-to-image: distance to the input against the strength; strength 1 against plain samples
    sweep = []
    for strength in STRENGTHS:
        n = a.n if strength == 1.0 else a.n_sweep
        folder = work / ("inputs" if n == a.n else "inputs-sweep")
        imgs, secs = run_job(f"img2img {strength}", work / f"img2img-{strength}", init_image=str(folder),
                             strength=strength, classes=[str(int(c)) for c in labels[:n]], seed=a.seed, **common)
        rmse = ((imgs.float() - digits[:n].float()) / 255).pow(2).mean((1, 2, 3)).sqrt()
        sweep.append({"strength": strength, "n": n, "rmse_to_input": rmse.mean().item(),
                      "rmse_to_input_first_100": rmse[:100].mean().item(),
                      "accuracy": (predict(net, imgs) == labels[:n]).float().mean().item(), "seconds": round(secs, 1)})
    plain, secs = run_job("plain samples", work / "plain", classes=[str(int(c)) for c in labels], num_images=a.n,
                          seed=a.seed + 100_000, checkpoint=a.model)
    plain_acc = (predict(net, plain) == labels).float().mean().item()
    plain_rmse = ((plain.float() - digits.float()) / 255).pow(2).mean((1, 2, 3)).sqrt()

    firsts = [r["rmse_to_input_first_100"] for r in sweep]
    monotonic = all(b > a_ for a_, b in zip(firsts, firsts[1:]))
    at_one = sweep[-1]["accuracy"]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}",
        "model": a.model,
        "settings": "dpm++2m, 15 steps, edm sigmas, guidance 1.5 (the model file's), fp32 CPU; inpainting strength 1, "
                    "resample 1, no mask blur; mask: the 12x12 centre square (rows and columns 8-19)",
        "digits": f"{a.n} of ../shared/data/mnist-10k: 50 per class from the classifier's 1,000 held-out digits; "
                  "the shipped model was trained on all 10,000, so they are not unseen by it",
        "classifier_heldout_accuracy": clf_acc,
        "classifier_on_the_inputs": (predict(net, digits) == labels).float().mean().item(),
        "inpainting": inpaint,
        "img2img": sweep,
        "img2img_rmse_monotonic": monotonic,
        "plain_samples": {"n": a.n, "accuracy": plain_acc, "rmse_to_input": plain_rmse.mean().item(),
                          "seconds": round(secs, 1), "seeds": f"{a.seed + 100_000}.."},
        "targets": {
            "outside_mask_differences == 0": all(r["outside_mask_differences"] == 0 for r in inpaint.values()),
            "own class >= 95%": inpaint["own_class"]["accuracy"] >= 0.95,
            "other class >= 60%": inpaint["other_class"]["accuracy"] >= 0.60,
            "img2img distance grows with strength": monotonic,
            "strength 1 accuracy within 2 points of plain": abs(at_one - plain_acc) <= 0.02,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
