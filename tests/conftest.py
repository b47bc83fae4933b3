"""Shared fixtures: tiny DiT models whose weights are perturbed away from the adaLN-Zero init.

An untrained DiT outputs exactly zero, which would make sampler and checkpoint tests pass for the
wrong reasons; `make_dit` adds seeded Gaussian noise to every parameter so outputs are O(0.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from diffcli.models.dit import DiT, ModelConfig


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread. With two OpenMP threads on a busy two-core machine
    (other test processes running) a forward pass of a 32-wide model was ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> ModelConfig:
    """8x8 RGB, patch 4 (a 2x2 token grid), width 32, depth 2: a forward pass takes about 1 ms."""
    base = dict(image_height=8, image_width=8, in_channels=3, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return ModelConfig(**{**base, **overrides})


def perturbed_dit(config: ModelConfig, seed: int = 0, scale: float = 0.05) -> DiT:
    """A DiT whose every parameter has N(0, scale^2) noise added (seeded, so reproducible)."""
    model = DiT(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


@pytest.fixture(scope="session")
def make_config() -> Callable[..., ModelConfig]:
    return tiny_config


@pytest.fixture(scope="session")
def make_dit() -> Callable[..., DiT]:
    """make_dit(config=None, seed=0, scale=0.05, **config_overrides) -> a perturbed tiny DiT."""

    def make(config: ModelConfig | None = None, seed: int = 0, scale: float = 0.05, **overrides) -> DiT:
        return perturbed_dit(config or tiny_config(**overrides), seed=seed, scale=scale)

    return make


@pytest.fixture
def toy_image_folder(tmp_path_factory) -> Callable[..., Path]:
    """toy_image_folder(classes=("blue", "green", "red"), per_class=4, size=8, noise=25, seed=0) -> a
    folder of class subfolders of PNGs: each image a solid colour (the class's colour name, or gray
    for other names) with seeded per-pixel noise of +-noise. classes=() makes a flat folder of gray images."""
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}

    def make(classes=("blue", "green", "red"), per_class: int = 4, size: int = 8, noise: int = 25, seed: int = 0) -> Path:
        root = tmp_path_factory.mktemp("images")
        g = torch.Generator().manual_seed(seed)
        for name in classes or ("",):
            base = torch.tensor(colours.get(name, (128, 128, 128)))
            for i in range(per_class):
                jitter = torch.randint(-noise, noise + 1, (size, size, 3), generator=g)
                pixels = (base + jitter).clamp(0, 255).to(torch.uint8)
                path = root / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.frombytes("RGB", (size, size), bytes(pixels.flatten().tolist())).save(path)
        return root

    return make
