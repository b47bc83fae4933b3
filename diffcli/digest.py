"""SHA-256 of files (the model hash, the provenance of edits, imported weights and CLIP folders) and of
tensors (the eval cache's classifiers and statistics, tune's reference cache)."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from diffcli.errors import InputError

if TYPE_CHECKING:
    import torch


def file_sha256(path: Path) -> str:
    """The file's SHA-256 in hex, read in chunks; InputError naming the file when it cannot be read."""
    try:
        with Path(path).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e


def tensor_memory(t: "torch.Tensor") -> ctypes.Array:
    """The bytes of a contiguous CPU tensor, as a buffer over its own memory (not its storage's, which
    may hold a whole batch; and without bytes(storage), which copies one byte at a time). The caller
    keeps t alive while the buffer is used."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())


def tensors_sha256(tensors: dict[str, "torch.Tensor"], recipe: str) -> str:
    """SHA-256 of a recipe name and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(recipe.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(tensor_memory(t))
    return h.hexdigest()
