"""Where and in what precision torch runs: --device and --precision, shared by sampling and training."""

from __future__ import annotations

from typing import Callable

import torch

from diffcli.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise UsageError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (bf16 matmuls run ~100x slower on plain CPUs), bf16 on a GPU that has it."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in table:
        raise UsageError(f"unknown precision {name!r}; choose auto, fp32, bf16 or fp16")
    return table[name]


def autocast_denoiser(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Callable:
    """The model as f(x, t, y) in fp32 outside; inside, autocast when a lower precision is asked."""
    if dtype == torch.float32:
        return model

    def f(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=dtype):
            return model(x, t, y).float()

    return f
