"""evaluate(): SAMPLES (a folder of images, or a model file to sample first) against a REAL folder:
FID, KID, precision/recall and class accuracy.

The real side is prepared once by Evaluator.prepare (the feature network, for `auto` the classifier
trained on REAL, and REAL's features and statistics, all from the cache when it holds them); then
Evaluator.score measures any number of sample sets against it. `diffcli eval` scores one set;
training scores the EMA model's samples every --eval-every steps (diffcli/training/evaluation.py).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from diffcli.data.folder import EXTENSIONS, find_images, load_rgb
from diffcli.device import resolve_device
from diffcli.errors import InputError, UsageError
from diffcli.eval import cache, classifier, features, metrics
from diffcli.eval.features import AutoFeatures, FeatureNet

FEATURE_KINDS = ("auto", "inception")
DEFAULT_MODEL_IMAGES = 1000  # images drawn from a model file when --num-images is not given
MAX_MODEL_IMAGES = 100_000  # as `sample`
CLASSIFIER_SEED = 0

Log = Callable[[str], None]
Progress = Callable[[int, int, str], None]  # (completed, total, task)


def resolve_features(kind: str | None, inception_weights: str | None) -> str:
    """--features: `inception` when a weights file is set (--inception-weights or the environment),
    else `auto`."""
    if kind is None:
        return "inception" if (inception_weights or os.environ.get(features.INCEPTION_ENV)) else "auto"
    if kind not in FEATURE_KINDS:
        raise UsageError(f"--features must be auto or inception, got {kind!r}")
    return kind


def _at_least_two(n: int, side: str, where: Path | str) -> None:
    if n < 2:
        found = "no readable image" if n == 0 else "only 1 readable image"
        raise InputError(f"{side} {where} has {found}; FID needs at least 2 images on each side "
                         "(the covariance of fewer is undefined)")


def _no_images(where: Path) -> InputError:
    return InputError(f"no images found in {where} (looked for {', '.join(sorted(EXTENSIONS))})")


def _skipped_line(side: str, files: Sequence[Path | str], skipped: list[tuple[int, str]]) -> str:
    names = ", ".join(Path(files[i]).name for i, _ in skipped[:5])
    return f"warning: {side}: skipped {len(skipped)} unreadable file(s): {names}{' ...' if len(skipped) > 5 else ''}"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """The figures of one sample set against the reference."""

    features: str  # "auto" or "inception": figures of different kinds are not comparable
    fid: float
    kid_mean: float
    kid_std: float
    precision: float | None  # None when a side has no more than NEIGHBOURS images
    recall: float | None
    accuracy: float | None  # share of samples the auto classifier puts in their own class; None: not measurable
    per_class_accuracy: dict[str, float] | None
    n_samples: int
    n_real: int
    kid_subsets: int
    kid_subset_size: int
    neighbours: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def class_accuracy(logits: torch.Tensor, sample_classes: Sequence[str], class_names: list[str]
                   ) -> tuple[float, dict[str, float]]:
    """The share of samples whose predicted class is their own, overall and per class (by name)."""
    index = {name: k for k, name in enumerate(class_names)}
    target = torch.tensor([index[c] for c in sample_classes])
    correct = logits.argmax(1) == target
    per = {name: float(correct[target == k].double().mean()) for k, name in enumerate(class_names) if (target == k).any()}
    return float(correct.double().mean()), per


# --------------------------------------------------------------------------------------------------
# The real side, prepared once
# --------------------------------------------------------------------------------------------------


class Evaluator:
    """REAL's feature network(s) and reference statistics; score() measures sample sets against them."""

    def __init__(self, main: FeatureNet, clf: AutoFeatures | None, reference: cache.Reference, real: Path,
                 workers: int = 0) -> None:
        self.main, self.clf, self.reference, self.real, self.workers = main, clf, reference, real, workers

    @property
    def kind(self) -> str:
        return self.main.kind

    @classmethod
    def prepare(cls, real: str | Path, kind: str = "auto", inception_weights: str | None = None,
                cache_dir: str | Path | None = None, device: str | torch.device = "cpu", want_accuracy: bool = True,
                workers: int = 0, log: Log | None = None, progress: Progress | None = None) -> "Evaluator":
        """Everything the real side needs. The classifier is trained (or read from the cache) when the
        features are `auto`, or when want_accuracy and REAL has class folders."""
        log = log or (lambda message: None)
        step = (lambda task: (lambda i, n: progress(i, n, task))) if progress else (lambda task: None)
        device = torch.device(device) if not isinstance(device, torch.device) else device
        root = Path(real)
        inception = features.inception(inception_weights, device) if kind == "inception" else None
        try:
            files, labels, names = find_images(root)
        except InputError as e:
            raise InputError(f"REAL: {e}") from None
        if not files:
            raise _no_images(root)
        _at_least_two(len(files), "REAL", root)
        cache_dir = Path(cache_dir) if cache_dir else cache.default_dir()
        key = cache.folder_key(root, files, labels, names)

        def load(i: int) -> Image.Image:
            return load_rgb(files[i])

        clf = None
        pixels: torch.Tensor | None = None
        kept: list[int] = []
        if kind == "auto" or (want_accuracy and len(names) >= 2):
            net_file = cache.net_path(cache_dir, key)
            cached = cache.read_net(net_file, key, log)
            if cached is None:
                pixels, kept, skipped = features.read_pixels(len(files), load, classifier.SIZE, 3, workers,
                                                             step("decoding REAL"))
                _at_least_two(len(kept), "REAL", root)
                if skipped:
                    log(_skipped_line("REAL", files, skipped))
                if bool((pixels[:, 0] == pixels[:, 1]).all() and (pixels[:, 1] == pixels[:, 2]).all()):
                    pixels = pixels[:, :1].contiguous()  # every image gray: a one-channel network
                y = torch.tensor([labels[i] for i in kept]) if len(names) >= 2 else None
                task = f"{len(names)} classes" if y is not None else "real vs blurred, noisy and ghosted views"
                log(f"training the auto classifier on {len(kept)} images of {root} ({task}); cached for next time")
                trained = classifier.train(pixels, y, len(names), seed=CLASSIFIER_SEED, device=device,
                                           progress=step("training the auto classifier"))
                cached = cache.write_net(net_file, key, trained, names if y is not None else [])
                if trained.accuracy is not None:
                    log(f"auto classifier: {trained.accuracy:.1%} held-out accuracy "
                        f"({'classes' if y is not None else 'views'}), {trained.steps} steps")
            clf = AutoFeatures(cached.net, cached.digest, cached.class_names, cached.accuracy, device)
        main: FeatureNet = inception or clf  # type: ignore[assignment]

        skey = cache.stats_key(key, main.kind, main.digest)
        spath = cache.stats_path(cache_dir, skey)
        reference = cache.read_stats(spath, skey, main.dim, log)
        if reference is None:
            if main is clf and pixels is not None and pixels.shape[1] == clf.channels:
                feats = torch.cat([clf.embed(pixels[i : i + features.CHUNK])[0] for i in range(0, len(pixels), features.CHUNK)])
            else:
                emb = features.embed_images([main], len(files), load, workers, step("embedding REAL"))
                feats, kept = emb.features[0], emb.kept
                _at_least_two(len(kept), "REAL", root)
                if emb.skipped and pixels is None:
                    log(_skipped_line("REAL", files, emb.skipped))
            reference = cache.Reference.build(feats, torch.tensor([labels[i] for i in kept], dtype=torch.long), names, key)
            cache.write_stats(spath, skey, main.kind, reference)
        else:
            log(f"REAL: {len(reference.features)} images' {main.kind} features from the cache ({spath})")
        return cls(main, clf, reference, root, workers)

    def score(self, count: int, load: Callable[[int], Image.Image], classes: Sequence[str] | None = None,
              side: str = "SAMPLES", log: Log | None = None, progress: Callable[[int, int], None] | None = None,
              where: str | Path = "") -> Scores:
        """Embed `count` samples (load(i) decodes sample i; ValueError skips it) and measure them.
        `classes[i]` is sample i's class name, for class accuracy (None: no classes)."""
        log = log or (lambda message: None)
        accuracy_net = self.clf if (classes is not None and self.clf is not None and self.clf.conditional) else None
        nets = [self.main] + ([accuracy_net] if accuracy_net is not None and accuracy_net is not self.main else [])
        emb = features.embed_images(nets, count, load, self.workers, progress)
        _at_least_two(len(emb.kept), side, where)
        if emb.skipped:
            log(f"warning: {side}: skipped {len(emb.skipped)} unreadable image(s)")
        fake, real = emb.features[0], self.reference.features
        k = metrics.NEIGHBOURS
        fid = metrics.frechet_distance(metrics.gaussian(fake), self.reference.gaussian)
        kid_mean, kid_std = metrics.kid(fake, real)
        precision = recall = None
        if min(len(fake), len(real)) > k:
            precision, recall = metrics.precision_recall(fake, real, k, self.reference.radii)
        else:
            log(f"precision and recall need more than {k} images on each side; not measured")
        accuracy = per_class = None
        if accuracy_net is not None:
            logits = emb.logits[nets.index(accuracy_net)]
            kept_classes = [classes[i] for i in emb.kept]
            missing = sorted(set(kept_classes) - set(accuracy_net.class_names))
            if missing:
                shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
                log(f"warning: no class accuracy: the samples' classes {shown} are not class folders of REAL {self.real}")
            elif logits is not None:
                accuracy, per_class = class_accuracy(logits, kept_classes, accuracy_net.class_names)
        return Scores(self.main.kind, fid, kid_mean, kid_std, precision, recall, accuracy, per_class, len(fake),
                      len(real), metrics.KID_SUBSETS, min(metrics.KID_SUBSET_SIZE, len(fake), len(real)), k)

    def score_pixels(self, pixels: torch.Tensor, classes: Sequence[str] | None = None) -> Scores:
        """Measure uint8 (N, C, H, W) images held in memory (training's samples)."""
        return self.score(len(pixels), lambda i: features.tensor_image(pixels[i]), classes, side="samples")


# --------------------------------------------------------------------------------------------------
# The `eval` command
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    samples: str
    real: str
    features: str | None = None  # auto | inception; None: inception when a weights file is set, else auto
    inception_weights: str | None = None  # else $DIFFCLI_INCEPTION_WEIGHTS
    num_images: int | None = None  # SAMPLES a model file: images to draw (default DEFAULT_MODEL_IMAGES)
    seed: int = 0  # SAMPLES a model file: image i gets seed + i, as `sample`
    batch_size: int = 64  # SAMPLES a model file: images per forward batch
    cache: str | None = None  # default: cache.default_dir()
    device: str = "auto"
    workers: int = 0


@dataclass
class EvalResult:
    scores: Scores
    samples: str
    real: str
    model_hash: str | None  # SAMPLES a model file: its hash, as `sample` prints
    seed: int | None
    classifier_accuracy: float | None  # the auto classifier's held-out accuracy on REAL; None: not used
    real_cached: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = self.scores.to_dict()
        return {**d, "samples": self.samples, "real": self.real, "model_hash": self.model_hash, "seed": self.seed,
                "classifier_accuracy": self.classifier_accuracy, "real_cached": self.real_cached,
                "seconds": round(self.seconds, 2)}


def evaluate(opts: EvalOptions, log: Log | None = None, progress: Progress | None = None) -> EvalResult:
    """Check every input, prepare the real side, draw the samples when SAMPLES is a model file, measure."""
    from diffcli.files import checkpoint

    started = time.perf_counter()
    log = log or (lambda message: None)
    kind = resolve_features(opts.features, opts.inception_weights)
    samples = Path(opts.samples)
    if opts.num_images is not None and not 2 <= opts.num_images <= MAX_MODEL_IMAGES:
        raise UsageError(f"--num-images must be between 2 and {MAX_MODEL_IMAGES}, got {opts.num_images}")
    if not samples.exists():
        raise InputError(f"SAMPLES not found: {samples}")
    device = resolve_device(opts.device)
    model_classes: list[str] = []
    classes: list[str] | None = None
    if samples.is_dir():
        if opts.num_images is not None:
            raise UsageError("--num-images applies when SAMPLES is a model file; SAMPLES is a folder")
        try:
            files, labels, names = find_images(samples)
        except InputError as e:
            raise InputError(f"SAMPLES: {e}") from None
        if not files:
            raise _no_images(samples)
        _at_least_two(len(files), "SAMPLES", samples)
        classes = [names[y] for y in labels] if names else None
    else:  # a model file: its header is checked now, before any work on REAL
        header, _ = checkpoint.read_header(samples, checkpoint.MODEL_FORMAT, whole=False)
        model_classes = checkpoint.validate_model_file(header, samples).class_names
    evaluator = Evaluator.prepare(opts.real, kind, opts.inception_weights, opts.cache, device,
                                  want_accuracy=bool(model_classes) or classes is not None,
                                  workers=opts.workers, log=log, progress=progress)
    step = (lambda task: (lambda i, n: progress(i, n, task))) if progress else (lambda task: None)
    model_hash = seed = None
    if samples.is_dir():
        scores = evaluator.score(len(files), lambda i: load_rgb(files[i]), classes, log=log,
                                 progress=step("embedding SAMPLES"), where=samples)
    else:
        with tempfile.TemporaryDirectory(prefix="diffcli-eval-") as tmp:
            paths, classes, model_hash = _draw(opts, samples, Path(tmp), device, log, step("sampling"))
            seed = opts.seed
            scores = evaluator.score(len(paths), lambda i: load_rgb(paths[i]), classes if model_classes else None,
                                     side="samples", log=log, progress=step("embedding samples"), where=samples)
    clf_acc = evaluator.clf.accuracy if evaluator.clf is not None else None
    return EvalResult(scores, str(samples), str(opts.real), model_hash, seed, clf_acc, evaluator.reference.cached,
                      time.perf_counter() - started)


def _draw(opts: EvalOptions, model: Path, tmp: Path, device: torch.device, log: Log,
          progress: Callable[[int, int], None] | None) -> tuple[list[Path], list[str], str]:
    """Sample --num-images images with the model file's defaults (one class after another for a class
    model) into tmp, as `diffcli sample` would: (paths, class names, model hash)."""
    from diffcli.sampling import generate

    n = opts.num_images or DEFAULT_MODEL_IMAGES
    sample_opts = generate.SampleOptions(checkpoint=str(model), num_images=n, seed=opts.seed, out=str(tmp),
                                         metadata=False, batch_size=opts.batch_size, device=device.type)
    paths: list[Path] = []
    classes: list[str] = []
    model_hash = ""
    for rec in generate.run(sample_opts, progress=progress, log=log):
        if rec["kind"] == "image":
            paths.append(Path(rec["path"]))
            classes.append(rec.get("class") or "")
            model_hash = rec.get("model_hash", model_hash)
    return paths, classes, model_hash
