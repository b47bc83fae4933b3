"""Autoencoder files: an AutoencoderKL's weights in safetensors with its config in the metadata.

    format               "diffcli.autoencoder"      format_version  "1"
    autoencoder_config   AutoencoderConfig as JSON  scaling_factor  number or null (latents are
                         multiplied by it before diffusion; null: a latent run measures 1/std itself)
    training             summary (steps, PSNR, ...) source          where an imported file came from
    weights_dtype        "float32" | "float16"

Checked like a model file (checkpoint.read_header, then every field, then every tensor's name,
shape and dtype against the config) before anything is built from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcli.models.autoencoder import DECODER_PARTS, AutoencoderConfig, AutoencoderKL, tensor_shapes  # noqa: F401
from diffcli.files.checkpoint import (
    Expected, Header, check_finite, load_tensors, meta_json, read_header, tensor_problem, write,
)
from diffcli.errors import InputError
from diffcli.validate import Invalid, check_scalars
from diffcli.validate import field as spec

AE_FORMAT = "diffcli.autoencoder"
_WEIGHT_DTYPES = {"float32": "F32", "float16": "F16"}
_SCALE = spec("scaling_factor", float, gt=0, max=1e6)


@dataclass
class AutoencoderFile:
    model: AutoencoderKL
    config: AutoencoderConfig
    scaling_factor: float | None
    training: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    path: str = ""

    @property
    def hash(self) -> str:
        return self.sha256[:10]


def save_autoencoder(path: str | Path, model: AutoencoderKL, scaling_factor: float | None = None,
                     training: dict[str, Any] | None = None, source: dict[str, Any] | None = None,
                     overwrite: bool = True, dtype: torch.dtype = torch.float32) -> None:
    meta = {
        "autoencoder_config": model.config.to_dict(),
        "scaling_factor": scaling_factor,
        "training": training or {},
        "source": source or {},
        "weights_dtype": str(dtype).removeprefix("torch."),
    }
    tensors = {k: v.to(dtype) for k, v in model.state_dict().items()}
    write(path, tensors, meta, AE_FORMAT, overwrite=overwrite)


@dataclass
class AutoencoderSpec:
    config: AutoencoderConfig
    scaling_factor: float | None
    training: dict[str, Any]
    source: dict[str, Any]
    weights_dtype: str | None


def check_config_json(value: Any, path: str | Path, where: str = "autoencoder_config") -> AutoencoderConfig:
    try:
        return AutoencoderConfig.from_dict(value, where)
    except Invalid as e:
        raise InputError(f"{path} has invalid autoencoder metadata: {e}") from None


def validate_autoencoder_file(header: Header, path: str | Path) -> AutoencoderSpec:
    """Every metadata field, then the tensors the config needs against those the header lists."""
    meta = header.meta
    cfg = check_config_json(meta_json(meta, "autoencoder_config", path), path)
    try:
        scale = meta_json(meta, "scaling_factor", path, None)
        if scale is not None:
            scale = _SCALE.check(scale)
        training = check_scalars(meta_json(meta, "training", path, {}), "training")
        source = check_scalars(meta_json(meta, "source", path, {}), "source")
        weights = meta.get("weights_dtype")
        if weights is not None:
            spec("weights_dtype", str, choices=tuple(_WEIGHT_DTYPES)).check(weights)
    except Invalid as e:
        raise InputError(f"{path} has invalid autoencoder metadata: {e}") from None
    dtypes = (_WEIGHT_DTYPES[weights],) if weights else tuple(_WEIGHT_DTYPES.values())
    expected: Expected = {k: (s, dtypes) for k, s in tensor_shapes(cfg).items()}
    problem = tensor_problem(header.tensors, expected, of="the autoencoder the config describes")
    if problem:
        raise InputError(f"{path}: tensors do not match the autoencoder config ({problem})")
    return AutoencoderSpec(cfg, scale, training, source, weights)


def read_autoencoder_spec(path: str | Path) -> AutoencoderSpec:
    header, _ = read_header(path, AE_FORMAT, what="autoencoder file", whole=False)
    return validate_autoencoder_file(header, path)


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> AutoencoderFile:
    header, data = read_header(path, AE_FORMAT, what="autoencoder file")
    assert data is not None
    s = validate_autoencoder_file(header, path)
    tensors = load_tensors(data, path)
    check_finite(tensors, path)
    model = AutoencoderKL(s.config)
    model.load_state_dict(tensors, strict=True)
    del tensors
    model.to(device).eval()
    return AutoencoderFile(model, s.config, s.scaling_factor, s.training, s.source,
                           hashlib.sha256(data).hexdigest(), str(path))
