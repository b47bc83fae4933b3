"""Model files and training state: safetensors with JSON metadata. Loading never runs code from the file.

A model file holds the EMA weights of the plain module plus everything needed to sample:
    format            "diffcli.model"            format_version  "1"
    model_config      ModelConfig as JSON        schedule        NoiseSchedule.to_dict() as JSON
    prediction        "epsilon" | "v"            image_size      [H, W]      channels  C
    class_names       ["0", "1", ...] (index -> name; [] for an unconditional model)
    training          summary (steps, images seen, dataset size, ...)
    sampling          defaults for sampling (guidance, ...)
    diffcli_version
Training state ("diffcli.state") holds model, EMA, optimizer moments and RNG states as tensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcli import __version__, atomic
from diffcli.errors import DiffcliError, InputError
from diffcli.model import DiT, ModelConfig
from diffcli.schedule import NoiseSchedule

MODEL_FORMAT = "diffcli.model"
STATE_FORMAT = "diffcli.state"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# safetensors with JSON metadata
# --------------------------------------------------------------------------------------------------


def encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str) -> bytes:
    from safetensors.torch import save

    header = {"format": fmt, "format_version": str(FORMAT_VERSION), "diffcli_version": __version__}
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return save(plain, metadata=header)


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], fmt: str, overwrite: bool = True) -> None:
    atomic.write_bytes(path, encode(tensors, meta, fmt), overwrite=overwrite)


def read(path: str | Path, fmt: str, what: str = "model file") -> tuple[dict[str, torch.Tensor], dict[str, str], bytes]:
    """Read and validate a diffcli safetensors file: (tensors, metadata, raw bytes). InputError if it
    is missing, not safetensors, truncated, foreign, or from a newer format version."""
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    bad = f"{path} is not a diffcli {what} (not a valid safetensors file)"
    if len(data) < 8:
        raise InputError(bad)
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _MAX_HEADER):
        raise InputError(f"{path} is truncated or not a safetensors file")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise InputError(bad) from None
    if meta.get("format") != fmt:
        found = meta.get("format")
        kind = f"a {found!r} file" if found else "a safetensors file without diffcli metadata"
        raise InputError(f"{path} is {kind}, not a diffcli {what}")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise InputError(f"{path} has a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise InputError(
            f"{path} uses format version {version}, newer than this diffcli's {FORMAT_VERSION}; upgrade diffcli"
        )
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types on truncation or bad offsets
        raise InputError(f"{path} is truncated or corrupt ({type(e).__name__})") from None
    return tensors, meta, data


def meta_json(meta: dict[str, str], key: str, path: Path | str, default: Any = ...) -> Any:
    if key not in meta:
        if default is not ...:
            return default
        raise InputError(f"{path} lacks the '{key}' metadata")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise InputError(f"{path} has malformed '{key}' metadata") from None


# --------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelFile:
    model: DiT
    config: ModelConfig
    schedule: NoiseSchedule
    prediction: str
    class_names: list[str]
    training: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    @property
    def model_hash(self) -> str:
        """First 10 hex digits of the file's SHA-256 (the form image tools print as 'Model hash')."""
        return self.sha256[:10]


def save_model(
    path: str | Path,
    model: DiT,
    schedule: NoiseSchedule,
    prediction: str,
    class_names: list[str],
    training: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    overwrite: bool = True,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a model file. dtype=torch.float16 halves the file; loading casts back to float32."""
    cfg = model.config
    meta = {
        "model_config": cfg.to_dict(),
        "schedule": schedule.to_dict(),
        "prediction": prediction,
        "image_size": [cfg.image_height, cfg.image_width],
        "channels": cfg.in_channels,
        "class_names": list(class_names),
        "training": training or {},
        "sampling": sampling or {},
        "weights_dtype": str(dtype).removeprefix("torch."),
    }
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    write(path, tensors, meta, MODEL_FORMAT, overwrite=overwrite)


def _parse_model_meta(meta: dict[str, str], path: str | Path) -> tuple[ModelConfig, NoiseSchedule, str, list[str]]:
    try:
        cfg = ModelConfig.from_dict(meta_json(meta, "model_config", path)).validate()
        schedule = NoiseSchedule.from_dict(meta_json(meta, "schedule", path))
    except (DiffcliError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path} has invalid model metadata: {e}") from None
    prediction = meta.get("prediction", "")
    if prediction not in ("epsilon", "v"):
        raise InputError(f"{path} has an unknown prediction type {prediction!r}")
    names = meta_json(meta, "class_names", path, default=[])
    if not isinstance(names, list) or len(names) != cfg.num_classes:
        raise InputError(f"{path}: class_names do not match the model's {cfg.num_classes} classes")
    return cfg, schedule, prediction, [str(n) for n in names]


def _check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """The tensors' names and shapes against a model built on the meta device (no memory), so that a
    file whose config and weights disagree (or whose config claims a huge model) fails before any
    weights are allocated."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found == expected:
        return
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
    else:
        k = next(k for k in sorted(expected) if expected[k] != found[k])
        detail = f"{k} has shape {list(found[k])}, the config needs {list(expected[k])}"
    raise InputError(f"{path}: tensors do not match the model config ({detail[:200]})")


def read_schedule(path: str | Path) -> NoiseSchedule:
    tensors, meta, _ = read(path, MODEL_FORMAT)
    cfg, schedule, _, _ = _parse_model_meta(meta, path)
    _check_tensors(cfg, tensors, path)  # a model file that cannot be sampled is refused here too
    return schedule


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    tensors, meta, data = read(path, MODEL_FORMAT)
    cfg, schedule, prediction, names = _parse_model_meta(meta, path)
    _check_tensors(cfg, tensors, path)
    model = DiT(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise InputError(f"{path}: tensors do not match the model config ({detail[:200]})") from None
    model.to(device).eval()
    return ModelFile(
        model=model,
        config=cfg,
        schedule=schedule,
        prediction=prediction,
        class_names=names,
        training=meta_json(meta, "training", path, default={}),
        sampling=meta_json(meta, "sampling", path, default={}),
        sha256=hashlib.sha256(data).hexdigest(),
        path=str(path),
    )
