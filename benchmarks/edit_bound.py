"""Development tool: how far can ANY natural redraw of the 12x12 centre turn a digit into another class?
(Not part of the package.)

edit_bench.py measures `diffcli sample --init-image --mask` redrawing the centre square of 500 held-out
MNIST digits as class (y + 1) % 10, with every pixel outside the square kept. This script asks what a
perfect inpainter could reach under the same rule: it pastes the 12x12 centre of K real digits of the
target class (taken from the classifier's training part, so never one of the edited digits) into each
input, and judges every paste with the same classifier (diffcli eval's auto network on the folder).

  paste_mean   share of (input, donor) pastes recognised as the target: a redraw that copies a typical
               real centre of the target class
  paste_best   share of inputs for which at least one of the K donors' centres is recognised as the
               target: an inpainter that always picks the best of K real centres

Both are reported overall and per input class, beside the diffusion model's figures from
benchmarks/edit_results.json when present.

    python benchmarks/edit_bound.py --data ../shared/data/mnist-10k      # writes benchmarks/edit_bound.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffcli.data.folder import load_folder  # noqa: E402
from edit_bench import MASK_BOX, pick, predict, train_classifier  # noqa: E402


def paste(inputs: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) inputs and (K, 1, 28, 28) donors -> (N, K, 1, 28, 28): each input with each
    donor's MASK_BOX square in place of its own."""
    lo, hi = MASK_BOX
    out = inputs[:, None].repeat(1, len(donors), 1, 1, 1)
    out[:, :, :, lo:hi, lo:hi] = donors[None, :, :, lo:hi, lo:hi]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist-10k"))
    ap.add_argument("--n", type=int, default=500, help="edited digits, as edit_bench.py picks them")
    ap.add_argument("--donors", type=int, default=50, help="real digits of each target class whose centres are pasted")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "edit_bound.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    s = load_folder(a.data, (28, 28), channels="1")
    y = s.labels
    net, clf_acc, held = train_classifier(s.pixels, y)
    idx = pick(y, held, a.n // 10)
    digits, labels = s.pixels[idx], y[idx]
    target = (labels + 1) % 10
    held_set = set(held.tolist())
    donors = {k: [i for i in range(len(y)) if int(y[i]) == k and i not in held_set][: a.donors] for k in range(10)}

    hit = torch.zeros(a.n, a.donors, dtype=torch.bool)
    for k in range(10):
        rows = (target == k).nonzero().flatten()
        pasted = paste(digits[rows], s.pixels[donors[k]])  # (n_k, K, 1, 28, 28)
        pred = predict(net, pasted.flatten(0, 1)).view(len(rows), a.donors)
        hit[rows] = pred == k
    mean_rate, best_rate = hit.float().mean(1), hit.any(1).float()

    def per_class(v: torch.Tensor) -> list[float]:
        return [round(v[labels == k].mean().item(), 3) for k in range(10)]

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "digits": f"the {a.n} held-out digits edit_bench.py edits, target class (y + 1) % 10, mask rows and "
                  f"columns {MASK_BOX[0]}-{MASK_BOX[1] - 1}",
        "donors": f"the first {a.donors} digits of each target class in the classifier's training part",
        "classifier_heldout_accuracy": clf_acc,
        "paste_mean": round(mean_rate.mean().item(), 4),
        "paste_best": round(best_rate.mean().item(), 4),
        "paste_mean_per_input_class": per_class(mean_rate),
        "paste_best_per_input_class": per_class(best_rate),
    }
    bench = ROOT / "benchmarks" / "edit_results.json"
    if bench.is_file():
        inp = json.loads(bench.read_text())["inpainting"]
        result["diffusion"] = {k: {"accuracy": v["accuracy"], "guidance": v["guidance"], "n": v["n"]}
                               for k, v in inp.items() if k.startswith("other_class")}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
