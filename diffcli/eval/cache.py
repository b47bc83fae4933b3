"""The evaluation cache: the real side's features and statistics, and the `auto` classifier trained on
it, as safetensors files with JSON metadata in one folder (--cache, default ~/.cache/diffcli/eval).

A real folder is identified by its content, not its location: the key hashes every image file's
path relative to the folder, size, class and SHA-256 of its bytes (reading bytes costs a fraction of
decoding them), so a moved or copied folder keeps its cache and an edited image invalidates it.

    auto-KEY.safetensors    the classifier trained on the folder with KEY ("diffcli.evalnet")
    real-KEY2.safetensors   features (N, D) float32, labels (N,), mu (D,), sigma and its square root
                            sigma_root (D, D), the k-NN radii (N,) of precision/recall, float64
                            ("diffcli.evalstats"); KEY2 hashes KEY with the feature network's digest

Both are files from elsewhere as far as diffcli is concerned: before use, the header, every
metadata field, the tensors' names, shapes and dtypes, finiteness and a SHA-256 of the tensors are
checked (as for model files, diffcli/files/checkpoint.py). A file that fails is never trusted and never
an error: a line says why and it is rebuilt. Files are written atomically, only once everything
they hold has been computed, so a failed run leaves no partial or stale entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from diffcli.digest import tensors_sha256 as weights_digest
from diffcli.files import checkpoint
from diffcli.errors import InputError
from diffcli.eval import classifier, metrics
from diffcli.eval.metrics import Gaussian
from diffcli.validate import Invalid, check_names, check_record, field

STATS_FORMAT = "diffcli.evalstats"
NET_FORMAT = "diffcli.evalnet"
_HEX = 64
_MAX_IMAGES = 10_000_000


def default_dir() -> Path:
    """$XDG_CACHE_HOME/diffcli/eval, else ~/.cache/diffcli/eval."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffcli" / "eval"


def folder_key(root: Path, files: list[Path], labels: list[int], class_names: list[str]) -> str:
    """SHA-256 over the class names and, per image file, its path relative to root, its size, its
    class and the SHA-256 of its bytes."""
    h = hashlib.sha256(b"diffcli.eval folder v1\n" + json.dumps(class_names).encode() + b"\n")
    for f, y in zip(files, labels):
        try:
            data = f.read_bytes()
        except OSError:
            data = None  # unreadable now: decoding will skip it too
        rel = f.relative_to(root).as_posix()
        h.update(f"{rel}|{-1 if data is None else len(data)}|{y}|".encode())
        h.update(hashlib.sha256(data or b"").digest())
    return h.hexdigest()


def _check_hex(value: str, name: str) -> None:
    if len(value) != _HEX or any(c not in "0123456789abcdef" for c in value):
        raise Invalid(f"{name} must be {_HEX} hexadecimal digits")


def _read(path: Path, fmt: str, what: str, log: Callable[[str], None], check: Callable[[checkpoint.Header, bytes], object]):
    """check(header, data) on an existing cache file; None (after a log line) when it fails."""
    if not path.exists():
        return None
    try:
        header, data = checkpoint.read_header(path, fmt, what)
        assert data is not None
        return check(header, data)
    except (InputError, Invalid) as e:
        log(f"{what} {path} is invalid ({str(e).replace(str(path), 'the file')}), rebuilding")
        return None


def _fields(header: checkpoint.Header, path: Path, strings: tuple[str, ...], numbers: tuple[str, ...],
            specs: tuple) -> dict[str, object]:
    """The metadata fields a cache file must hold, checked against their specs: `strings` are stored as
    they are, `numbers` as JSON."""
    meta = header.meta
    record: dict[str, object] = {k: meta[k] for k in strings if k in meta}
    record.update({k: checkpoint.meta_json(meta, k, path) for k in numbers if k in meta})
    return check_record(record, specs, "metadata")


def _tensors(header: checkpoint.Header, data: bytes, path: Path, expected: checkpoint.Expected) -> dict[str, torch.Tensor]:
    problem = checkpoint.tensor_problem(header.tensors, expected, "a cache entry needs", "a cache entry")
    if problem:
        raise Invalid(problem)
    tensors = checkpoint.load_tensors(data, path)
    checkpoint.check_finite(tensors, path)
    return tensors


# --------------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------------


@dataclass
class CachedNet:
    net: classifier.AutoNet
    digest: str
    class_names: list[str]
    accuracy: float | None


def net_path(cache: Path, key: str) -> Path:
    return cache / f"auto-{key[:32]}.safetensors"


_NET_FIELDS = (
    field("key", str, max_len=_HEX),
    field("recipe", str, choices=(classifier.RECIPE,)),
    field("digest", str, max_len=_HEX),
    field("steps", int, min=1, max=10**9),
)


def read_net(path: Path, key: str, log: Callable[[str], None]) -> CachedNet | None:
    def check(header: checkpoint.Header, data: bytes) -> CachedNet:
        meta = header.meta
        rec = _fields(header, path, ("key", "recipe", "digest"), ("steps",), _NET_FIELDS)
        accuracy = checkpoint.meta_json(meta, "accuracy", path)
        if accuracy is not None:
            accuracy = field("accuracy", float, min=0, max=1).check(accuracy, "metadata")
        _check_hex(rec["digest"], "metadata.digest")
        _check_hex(rec["key"], "metadata.key")
        if rec["key"] != key:
            raise Invalid("it was made for another folder")
        cfg = classifier.AutoConfig.from_dict(checkpoint.meta_json(meta, "config", path), "metadata.config")
        names = check_names(checkpoint.meta_json(meta, "class_names", path), "metadata.class_names")
        if cfg.conditional != bool(names) or (names and len(names) != cfg.outputs):
            raise Invalid("metadata.class_names do not match metadata.config")
        expected = {k: (shape, ("F32",)) for k, shape in classifier.tensor_shapes(cfg).items()}
        tensors = _tensors(header, data, path, expected)
        digest = weights_digest(tensors, classifier.RECIPE)
        if digest != rec["digest"]:
            raise Invalid("the weights do not match their recorded SHA-256")
        net = classifier.AutoNet(cfg)
        net.load_state_dict(tensors)
        return CachedNet(net.eval().requires_grad_(False), digest, names, accuracy)

    return _read(path, NET_FORMAT, "eval cache", log, check)


def write_net(path: Path, key: str, trained: classifier.Trained, class_names: list[str]) -> CachedNet:
    tensors = {k: v.detach().float().contiguous() for k, v in trained.net.state_dict().items()}
    digest = weights_digest(tensors, classifier.RECIPE)
    accuracy = None if trained.accuracy is None else round(trained.accuracy, 6)
    meta = {"key": key, "recipe": classifier.RECIPE, "digest": digest, "steps": trained.steps,
            "accuracy": accuracy, "config": trained.net.cfg.to_dict(), "class_names": class_names}
    checkpoint.write(path, tensors, meta, NET_FORMAT)
    return CachedNet(trained.net, digest, class_names, accuracy)


# --------------------------------------------------------------------------------------------------
# The real side's features and statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The real side of an evaluation: features (N, D) float32, their labels (N,) and Gaussian (with
    the covariance's square root)."""

    features: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    gaussian: Gaussian
    radii: torch.Tensor  # (N,) float64: each image's distance to its NEIGHBOURS-th nearest other (0 when N <= k)
    folder_key: str
    cached: bool  # read from the cache rather than computed in this run

    @classmethod
    def build(cls, features: torch.Tensor, labels: torch.Tensor, class_names: list[str], folder_key: str) -> "Reference":
        k = metrics.NEIGHBOURS
        f = features.double()
        radii = metrics.kth_neighbour_radii(f, k) if len(f) > k else torch.zeros(len(f), dtype=torch.float64)
        return cls(features, labels, class_names, metrics.gaussian(features).with_root(), radii, folder_key, cached=False)


def stats_key(folder: str, feature_kind: str, feature_digest: str) -> str:
    return hashlib.sha256(f"{folder}|{feature_kind}|{feature_digest}".encode()).hexdigest()


def stats_path(cache: Path, key: str) -> Path:
    return cache / f"real-{key[:32]}.safetensors"


_STATS_FIELDS = (
    field("key", str, max_len=_HEX),
    field("folder_key", str, max_len=_HEX),
    field("kind", str, choices=("auto", "inception")),
    field("digest", str, max_len=_HEX),
    field("n", int, min=2, max=_MAX_IMAGES),
    field("dim", int, min=1, max=65_536),
    field("neighbours", int, choices=(metrics.NEIGHBOURS,)),
)


def _stats_digest(t: dict[str, torch.Tensor]) -> str:
    return weights_digest(t, STATS_FORMAT)


def read_stats(path: Path, key: str, dim: int, log: Callable[[str], None]) -> Reference | None:
    def check(header: checkpoint.Header, data: bytes) -> Reference:
        meta = header.meta
        rec = _fields(header, path, ("key", "folder_key", "kind", "digest"), ("n", "dim", "neighbours"), _STATS_FIELDS)
        for name in ("key", "folder_key", "digest"):
            _check_hex(rec[name], f"metadata.{name}")
        if rec["key"] != key:
            raise Invalid("it was made for another folder or feature network")
        if rec["dim"] != dim:
            raise Invalid(f"metadata.dim is {rec['dim']}, the feature network gives {dim}")
        names = check_names(checkpoint.meta_json(meta, "class_names", path), "metadata.class_names")
        N, D = rec["n"], rec["dim"]
        expected = {"features": ((N, D), ("F32",)), "labels": ((N,), ("I64",)), "mu": ((D,), ("F64",)),
                    "sigma": ((D, D), ("F64",)), "sigma_root": ((D, D), ("F64",)), "radii": ((N,), ("F64",))}
        t = _tensors(header, data, path, expected)
        if _stats_digest(t) != rec["digest"]:
            raise Invalid("the tensors do not match their recorded SHA-256")
        labels = t["labels"]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= max(1, len(names))):
            raise Invalid("labels out of range of the class names")
        if bool((t["radii"] < 0).any()):
            raise Invalid("tensor radii holds negative distances")
        return Reference(t["features"], labels, names, Gaussian(t["mu"], t["sigma"], t["sigma_root"]), t["radii"],
                         rec["folder_key"], cached=True)

    return _read(path, STATS_FORMAT, "eval cache", log, check)


def write_stats(path: Path, key: str, kind: str, ref: Reference) -> None:
    g = ref.gaussian.with_root()
    t = {"features": ref.features.float().contiguous(), "labels": ref.labels.long().contiguous(),
         "mu": g.mu.double().contiguous(), "sigma": g.sigma.double().contiguous(), "sigma_root": g.root.contiguous(),
         "radii": ref.radii.double().contiguous()}
    meta = {"key": key, "folder_key": ref.folder_key, "kind": kind, "digest": _stats_digest(t),
            "n": int(t["features"].shape[0]), "dim": int(t["features"].shape[1]), "neighbours": metrics.NEIGHBOURS,
            "class_names": ref.class_names}
    checkpoint.write(path, t, meta, STATS_FORMAT)
