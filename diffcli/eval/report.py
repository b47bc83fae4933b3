"""The `eval` table: each figure with what it means, then class accuracy per class."""

from __future__ import annotations

from rich.table import Table

from diffcli.eval.evaluate import EvalResult


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def tables(result: EvalResult) -> list[Table]:
    s = result.scores
    if s.features == "auto":
        source = "auto: a small CNN diffcli trained on REAL"
        if result.classifier_accuracy is not None:
            source += f" ({result.classifier_accuracy:.1%} held-out accuracy)"
        source += "; not comparable with Inception figures"
    else:
        source = "inception: the FID Inception-v3 (pool3, 2048 features), comparable with published FIDs at equal image counts"
    t = Table(title=f"{result.samples} against {result.real}", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    t.add_row("FID", f"{s.fid:.4f}", "Frechet distance between Gaussians fitted to the two feature sets; 0 is a perfect match")
    t.add_row("KID", f"{s.kid_mean:.6f} ± {s.kid_std:.6f}",
              f"unbiased MMD^2, cubic kernel, {s.kid_subsets} subsets of {s.kid_subset_size}; about 0 for one distribution")
    t.add_row(f"precision (k={s.neighbours})", _num(s.precision),
              "share of samples inside the real images' k-NN manifold: fidelity")
    t.add_row(f"recall (k={s.neighbours})", _num(s.recall), "share of real images inside the samples' k-NN manifold: coverage")
    t.add_row("class accuracy", _num(s.accuracy),
              "share of samples the auto classifier puts in their own class" if s.accuracy is not None
              else "needs classes on both sides (a class model or class folders, and class folders in REAL)")
    t.add_row("images", f"{s.n_samples:,} / {s.n_real:,}", "samples / real")
    t.add_row("features", s.features, source)
    out = [t]
    if s.per_class_accuracy:
        per = Table(title="class accuracy per class", title_justify="left")
        per.add_column("class")
        per.add_column("accuracy", justify="right")
        for name, acc in s.per_class_accuracy.items():
            per.add_row(name, f"{acc:.4f}")
        out.append(per)
    return out
