"""The targets of `diffcli eval` (issue #15), measured: results to benchmarks/eval_results.json.

    correctness  on identical features, diffcli's FID, KID and precision/recall against torch-fidelity's
                 own functions (within 1e-6 relative), and the Inception features of diffcli's adapter
                 against torch-fidelity's extractor with the same randomly initialised weights (1e-5);
                 skipped when torch-fidelity is not installed (make bench installs it)
    sense        `auto` features on MNIST: FID(real half vs the other half) against FID(real vs uniform
                 noise) (< 5%) and FID(real vs the other half blurred with a 2-px Gaussian) (< 25%)
    accuracy     class accuracy of the shipped model's samples (1,000 images, its default sampler)
    speed        `diffcli eval` of 10,000 images against a cached real side, timed as a whole process (< 2 min)

    python benchmarks/eval_bench.py [--data ../shared/data/mnist-10k] [--parts correctness,sense,accuracy,speed]

The sense, accuracy and speed parts need the MNIST folder (python -m diffcli.data.mnist makes one); they
work in a scratch folder (--work, default a temporary one) and their own eval cache inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffcli.data.folder import find_images  # noqa: E402
from diffcli.eval import metrics  # noqa: E402

DIFFCLI = [sys.executable, "-m", "diffcli"]


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()[0]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_eval(*args: str, env: dict | None = None) -> tuple[dict, float]:
    """`diffcli eval ... --json` as a whole process: (its result record, wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run([*DIFFCLI, "eval", *args, "--json", "--quiet"], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"diffcli eval {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout.splitlines()[-1]), seconds


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------


def link_half(data: Path, out: Path, half: int) -> int:
    """Half `half` (0: even positions, 1: odd) of each class folder, as symbolic links: disjoint halves."""
    files, labels, names = find_images(data)
    n = 0
    for i, (f, y) in enumerate(zip(files, labels)):
        if i % 2 == half:
            dest = out / (names[y] if names else "") / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), dest)
            n += 1
    return n


def write_transformed(data: Path, out: Path, half: int, how: str, seed: int = 0) -> int:
    """The images of half `half`, blurred with a Gaussian of std 2 px (how='blur'), or as many images
    of uniform noise of the same size and mode (how='noise'), as PNGs in one flat folder."""
    from PIL import Image, ImageFilter

    files, _, _ = find_images(data)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, f in enumerate(files):
        if i % 2 != half:
            continue
        with Image.open(f) as im:
            im.load()
            if how == "blur":
                new = im.filter(ImageFilter.GaussianBlur(radius=2))  # PIL's radius is the Gaussian's std dev
            else:
                C = len(im.getbands())
                px = torch.randint(0, 256, (im.height, im.width, C), generator=g, dtype=torch.uint8)
                new = Image.frombytes(im.mode, im.size, bytes(px.flatten().tolist()))
        new.save(out / f"{n:05d}.png")
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


def sense(data: Path, work: Path) -> dict:
    real, half = work / "real-half", work / "other-half"
    link_half(data, real, 0)
    link_half(data, half, 1)
    write_transformed(data, work / "blurred", 1, "blur")
    write_transformed(data, work / "noise", 1, "noise")
    cache = str(work / "cache")
    out = {}
    for name in ("other-half", "blurred", "noise"):
        rec, seconds = run_eval(str(work / name), "--real", str(real), "--cache", cache, "--features", "auto")
        out[name] = {k: rec[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "n_samples", "n_real")}
        out[name]["seconds"] = round(seconds, 1)
        print(f"  auto FID real half vs {name}: {rec['fid']:.4f}  (KID {rec['kid_mean']:.5f}, "
              f"P {rec['precision']:.3f} R {rec['recall']:.3f}, {seconds:.0f} s)", flush=True)
    halves, noise, blur = out["other-half"]["fid"], out["noise"]["fid"], out["blurred"]["fid"]
    out["ratio_to_noise"] = halves / noise
    out["ratio_to_blur"] = halves / blur
    out["target_noise"] = {"target": "< 0.05", "met": halves / noise < 0.05}
    out["target_blur"] = {"target": "< 0.25", "met": halves / blur < 0.25}
    print(f"  halves / noise = {halves / noise:.4%} (target < 5%), halves / blur = {halves / blur:.2%} (target < 25%)")
    return out


def accuracy(data: Path, work: Path, n: int) -> dict:
    model = ROOT / "weights" / "diffcli-mnist.safetensors"
    rec, seconds = run_eval(str(model), "--real", str(data), "--num-images", str(n), "--seed", "0",
                            "--cache", str(work / "cache-full"))
    print(f"  shipped model, {n} samples: class accuracy {rec['accuracy']:.4f} (classifier on real: "
          f"{rec['classifier_accuracy']:.4f}), auto FID {rec['fid']:.4f}, {seconds:.0f} s", flush=True)
    return {"n_samples": rec["n_samples"], "accuracy": rec["accuracy"], "per_class_accuracy": rec["per_class_accuracy"],
            "classifier_accuracy": rec["classifier_accuracy"], "fid": rec["fid"], "kid_mean": rec["kid_mean"],
            "precision": rec["precision"], "recall": rec["recall"], "seconds": round(seconds, 1),
            "sampler": "model defaults (dpm++2m, 15 steps, edm sigmas, guidance 1.5)", "seed": 0}


def speed(data: Path, work: Path) -> dict:
    """10,000 images (the MNIST folder itself, 28x28) against a cached real side (the first half)."""
    real, cache = work / "real-half", str(work / "cache-speed")
    if not real.exists():
        link_half(data, real, 0)
    # a cold run first: it trains the classifier and extracts the real side into an empty cache
    warm, warm_s = run_eval(str(data), "--real", str(real), "--cache", cache, "--features", "auto")
    rec, seconds = run_eval(str(data), "--real", str(real), "--cache", cache, "--features", "auto")
    assert rec["real_cached"], "the second run should read the real side from the cache"
    print(f"  eval of {rec['n_samples']} images against a cached real side of {rec['n_real']}: {seconds:.1f} s "
          f"as a whole process (target < 120 s); the first, cold run {warm_s:.1f} s", flush=True)
    return {"n_samples": rec["n_samples"], "n_real": rec["n_real"], "seconds": round(seconds, 1),
            "cold_run_seconds": round(warm_s, 1), "target": "< 120 s", "met": seconds < 120,
            "images": "MNIST 28x28 grayscale PNGs (resized to 32x32 for the auto network)"}


def correctness(data: Path | None) -> dict:
    """diffcli's metric functions and Inception adapter against torch-fidelity's own code."""
    try:
        fidelity = load_fidelity()
    except ImportError as e:
        print(f"  skipped: torch-fidelity is not installed ({e}); make bench installs it")
        return {"skipped": str(e)}
    fid_mod, kid_mod, prc_mod, version = fidelity
    import numpy as np

    out: dict = {"torch_fidelity": version}
    g = torch.Generator().manual_seed(0)
    worst_fid = worst_kid = 0.0
    cases = []
    for n1, n2, d in ((500, 700, 64), (3000, 2000, 2048), (1200, 1000, 128)):
        f1 = torch.randn(n1, d, generator=g).relu() * 0.5
        f2 = (torch.randn(n2, d, generator=g) + 0.1).relu() * 0.5
        theirs_fid = fid_mod.fid_statistics_to_metric(fid_mod.fid_features_to_statistics(f1.double()),
                                                      fid_mod.fid_features_to_statistics(f2.double()), False)
        theirs_fid = theirs_fid[fid_mod.KEY_METRIC_FID]
        ours_fid = metrics.fid(f1, f2)
        # KID: the same subsets through their mmd2 and kernel, and the whole sets through kid_features_to_metric
        subsets = metrics.kid_subsets(n1, n2)
        theirs = np.array([kid_mod.mmd2(*_kernels(kid_mod, f1[i].double().numpy(), f2[j].double().numpy()))
                           for i, j in subsets])
        ours_kid = metrics.kid(f1, f2)
        m = min(n1, n2)
        whole = kid_mod.kid_features_to_metric(f1[:m].double(), f2[:m].double(), kid_subsets=1, kid_subset_size=m,
                                               verbose=False)
        ours_whole = metrics.kid(f1[:m], f2[:m], subsets=1, subset_size=m)
        p_theirs = prc_mod.calculate_precision_recall_full(f2.double(), f1.double(), neighborhood=3)
        p_ours = metrics.precision_recall(f2, f1)
        rel = lambda a, b: abs(a - b) / max(abs(b), 1e-300)  # noqa: E731
        case = {"n": [n1, n2], "dim": d, "fid": ours_fid, "fid_torch_fidelity": theirs_fid, "fid_rel": rel(ours_fid, theirs_fid),
                "kid_mean_rel": rel(ours_kid[0], float(theirs.mean())), "kid_std_rel": rel(ours_kid[1], float(theirs.std())),
                "kid_whole_rel": rel(ours_whole[0], whole[kid_mod.KEY_METRIC_KID_MEAN]),
                "precision_recall": list(p_ours), "precision_recall_torch_fidelity": list(p_theirs)}
        cases.append(case)
        worst_fid = max(worst_fid, case["fid_rel"])
        worst_kid = max(worst_kid, case["kid_mean_rel"], case["kid_std_rel"], case["kid_whole_rel"])
        print(f"  {n1}x{d} vs {n2}x{d}: FID {ours_fid:.6f} vs {theirs_fid:.6f} (rel {case['fid_rel']:.1e}); KID rel "
              f"{max(case['kid_mean_rel'], case['kid_std_rel'], case['kid_whole_rel']):.1e}; P/R {p_ours} vs {p_theirs}", flush=True)
    out["metrics"] = cases
    out["fid_worst_rel"], out["kid_worst_rel"] = worst_fid, worst_kid
    out["metrics_met"] = worst_fid < 1e-6 and worst_kid < 1e-6
    out["inception"] = inception_features(data)
    return out


def _kernels(kid_mod, x, y):
    kw = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}
    return kid_mod.kernel_poly(x, x, **kw), kid_mod.kernel_poly(x, y, **kw), kid_mod.kernel_poly(y, y, **kw)


def inception_features(data: Path | None, n: int = 6) -> dict:
    """Random Inception weights in a .pth and a .safetensors file; diffcli's adapter (PIL-bicubic to
    299, uint8, its own reading of the file) against torch-fidelity's extractor built by its own
    constructor from the .pth, on the same images resized the same way."""
    from PIL import Image
    from safetensors.torch import save_file

    from diffcli.data.folder import load_rgb
    from diffcli.eval import features

    mod = features._fidelity_inception_module()
    cls = mod.FeatureExtractorInceptionV3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        keep, mod.load_state_dict_from_url = mod.load_state_dict_from_url, lambda *a, **k: None
        keep_load, cls.load_state_dict = cls.load_state_dict, lambda self, sd, strict=True: None
        try:
            net = cls("random", ["2048"])  # torch's default initialisation, seeded
        finally:
            mod.load_state_dict_from_url, cls.load_state_dict = keep, keep_load
    state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for k, v in state.items():  # move BatchNorm's running statistics off 0 and 1 too
        if v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=g) * 0.05)
    tmp = Path(tempfile.mkdtemp())
    try:
        torch.save(state, tmp / "random.pth")
        save_file(state, str(tmp / "random.safetensors"))
        images = []
        if data is not None and data.exists():
            files, _, _ = find_images(data)
            images = [load_rgb(f) for f in files[:n]]
        else:
            images = [Image.effect_noise((28, 28), 60 + 10 * i).convert("RGB") for i in range(n)]
        pixels = torch.stack([features.prepare(im, 299, 3) for im in images])
        theirs = cls("theirs", ["2048"], feature_extractor_weights_path=str(tmp / "random.pth"))  # its own loading
        with torch.no_grad():
            (ref,) = theirs(pixels)
        out = {}
        for suffix in ("pth", "safetensors"):
            ours = features.inception(str(tmp / f"random.{suffix}"), torch.device("cpu"))
            f, _ = ours.embed(pixels)
            err = float((f - ref).abs().max() / ref.abs().max())
            out[suffix] = {"max_abs_diff_relative_to_max": err, "met": err < 1e-5}
            print(f"  Inception features, random weights from .{suffix}: max |diff| / max |f| = {err:.2e} (target < 1e-5)")
        return {"images": len(images), **out}
    finally:
        shutil.rmtree(tmp)


def load_fidelity():
    """torch-fidelity's metric modules. Where torchvision imports, plainly; otherwise (the CPU torch
    2.13.0 that PyPI's torchvision does not load beside) its three metric modules are loaded with a
    stand-in for torch_fidelity.utils, which they import only for their dataset plumbing: the
    functions compared here run unchanged."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise ImportError("no module named torch_fidelity")
    try:
        import torch_fidelity
        from torch_fidelity import metric_fid, metric_kid, metric_prc

        return metric_fid, metric_kid, metric_prc, torch_fidelity.__version__
    except Exception:  # noqa: BLE001 (no torchvision, or one that fails with a RuntimeError beside this torch)
        pass
    for name in [n for n in sys.modules if n.startswith(("torch_fidelity", "torchvision"))]:
        del sys.modules[name]
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("torch_fidelity.utils")
    for name in ("get_cacheable_input_name", "cache_lookup_one_recompute_on_miss", "extract_featuresdict_from_input_id_cached",
                 "create_feature_extractor", "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
        setattr(utils, name, None)
    sys.modules["torch_fidelity"], sys.modules["torch_fidelity.utils"] = pkg, utils
    mods = [importlib.import_module(f"torch_fidelity.{m}") for m in ("metric_fid", "metric_kid", "metric_prc", "version")]
    return mods[0], mods[1], mods[2], mods[3].__version__ + " (metric modules loaded without torchvision)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist-10k"))
    ap.add_argument("--parts", default="correctness,sense,accuracy,speed")
    ap.add_argument("--accuracy-images", type=int, default=1000)
    ap.add_argument("--work", help="scratch folder (kept); default: a temporary one, removed at the end")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "eval_results.json"))
    a = ap.parse_args()
    data = Path(a.data)
    parts = a.parts.split(",")
    if any(p in parts for p in ("sense", "accuracy", "speed")) and not data.is_dir():
        raise SystemExit(f"Error: no MNIST folder at {data}; make one with python -m diffcli.data.mnist (see weights/README.md)")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="diffcli-eval-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    previous = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    try:
        for part in parts:
            print(f"{part}:", flush=True)
            t0 = time.perf_counter()
            if part == "correctness":
                results[part] = correctness(data if data.is_dir() else None)
            elif part == "sense":
                results[part] = sense(data, work)
            elif part == "accuracy":
                results[part] = accuracy(data, work, a.accuracy_images)
            elif part == "speed":
                results[part] = speed(data, work)
            else:
                raise SystemExit(f"unknown part {part!r}")
            results[part]["part_seconds"] = round(time.perf_counter() - t0, 1)
            results[part]["machine"] = machine()
            results[part]["data"] = str(data)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    merged = {**previous, **results}  # parts not run this time keep their last figures
    Path(a.out).write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
