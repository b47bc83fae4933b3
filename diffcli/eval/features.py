"""From images to feature vectors: clean-fid-style resizing, then the `auto` classifier or the FID
Inception-v3.

Resizing follows clean-fid (Parmar et al. 2022): each decoded 8-bit image is resized straight to
the network's input size with PIL's bicubic filter (antialiased when it shrinks), never with a
tensor interpolation that aliases. The result is kept as 8-bit pixels, because torch-fidelity's
Inception takes uint8 input (clean-fid itself resizes in float; the difference is the rounding to
the nearest level). Both sides of an evaluation go through the same function.

The Inception-v3 is torch-fidelity's FeatureExtractorInceptionV3, the port of the TensorFlow FID
network that torch-fidelity checks against the original to the last digits, with its weights read
from a file the user gives (never downloaded; see README "Evaluating a model"). torch-fidelity's
package __init__ imports torchvision for its other extractors, and PyPI's torchvision does not load
beside every torch build (it fails beside the CPU torch 2.13.0 this project is tested with), so
only the Inception module and the three small modules it imports are loaded, under a temporary
stand-in for the package that is removed again afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from diffcli.digest import tensors_sha256 as weights_digest
from diffcli.errors import InputError, UsageError
from diffcli.files.images import to_pil
from diffcli.eval import classifier

INCEPTION_ENV = "DIFFCLI_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_SIZE = 299
INCEPTION_LAYER = "2048"  # the pool3 features FID, KID and precision/recall use
CHUNK = 256  # images decoded and embedded at a time


# --------------------------------------------------------------------------------------------------
# Images in, uint8 tensors at the network's size out
# --------------------------------------------------------------------------------------------------


def prepare(im: Image.Image, size: int, channels: int) -> torch.Tensor:
    """One decoded RGB image -> uint8 (channels, size, size): luma first for one channel (ITU-R 601,
    PIL's convert('L'), as the data loader), then PIL bicubic resizing (the clean-fid way)."""
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, channels).permute(2, 0, 1).contiguous()


def tensor_image(pixels: torch.Tensor) -> Image.Image:
    """One uint8 (C, H, W) image (C = 1 or 3) as a PIL RGB image."""
    return to_pil(pixels.permute(1, 2, 0)).convert("RGB")


# --------------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------------


class FeatureNet:
    """A network that maps uint8 images at its own size to feature vectors (and, for a classifier
    of the folder's classes, to class logits)."""

    kind: str  # "auto" or "inception": figures of different kinds are never compared
    digest: str  # SHA-256 of the weights (and the recipe): the feature network's identity in cache keys
    size: int
    channels: int
    dim: int

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, C, size, size) -> (features (B, dim) float32, logits (B, K) or None), on the CPU."""
        raise NotImplementedError


class AutoFeatures(FeatureNet):
    kind = "auto"
    size = classifier.SIZE
    dim = classifier.FEATURES

    def __init__(self, net: classifier.AutoNet, digest: str, class_names: list[str], accuracy: float | None,
                 device: torch.device) -> None:
        super().__init__(net, device)
        self.digest, self.class_names, self.accuracy = digest, class_names, accuracy
        self.channels = net.cfg.channels
        self.conditional = net.cfg.conditional

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.net.features(classifier.to_input(pixels).to(self.device))
        logits = self.net.out(f).float().cpu() if self.conditional else None
        return f.float().cpu(), logits


class InceptionFeatures(FeatureNet):
    kind = "inception"
    size = INCEPTION_SIZE
    channels = 3
    dim = 2048

    def __init__(self, net: torch.nn.Module, digest: str, device: torch.device) -> None:
        super().__init__(net, device)
        self.digest = digest

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        (f,) = self.net(pixels.to(self.device))  # torch-fidelity's forward takes uint8 (B, 3, H, W)
        return f.float().cpu(), None


# --------------------------------------------------------------------------------------------------
# Embedding many images
# --------------------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """Per network: features (N, D) and logits (N, K) or None, for the images that could be read;
    `kept` their indices among those asked for, `skipped` (index, reason) for the others."""

    features: list[torch.Tensor]
    logits: list[torch.Tensor | None]
    kept: list[int]
    skipped: list[tuple[int, str]]


def embed_images(nets: Sequence[FeatureNet], count: int, load: Callable[[int], Image.Image], workers: int = 0,
                 progress: Callable[[int, int], None] | None = None, chunk: int = CHUNK) -> Embedded:
    """Decode image i with load(i) (ValueError: unreadable, skipped), prepare it for each network and
    embed it, CHUNK images at a time, so memory holds one chunk of pixels whatever the count."""
    workers = workers or min(8, os.cpu_count() or 1)
    feats: list[list[torch.Tensor]] = [[] for _ in nets]
    logits: list[list[torch.Tensor]] = [[] for _ in nets]
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []

    def work(i: int) -> tuple[int, list[torch.Tensor] | None, str]:
        try:
            im = load(i)
            return i, [prepare(im, n.size, n.channels) for n in nets], ""
        except ValueError as e:
            return i, None, str(e)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, count, chunk):
            done = list(pool.map(work, range(start, min(count, start + chunk))))
            ok = [(i, t) for i, t, _ in done if t is not None]
            skipped += [(i, why) for i, t, why in done if t is None]
            if ok:
                kept += [i for i, _ in ok]
                for k, net in enumerate(nets):
                    f, lg = net.embed(torch.stack([t[k] for _, t in ok]))
                    feats[k].append(f)
                    if lg is not None:
                        logits[k].append(lg)
            if progress:
                progress(min(count, start + chunk), count)
    return Embedded(
        features=[torch.cat(f) if f else torch.zeros(0, n.dim) for f, n in zip(feats, nets)],
        logits=[torch.cat(lg) if lg else None for lg in logits],
        kept=kept, skipped=skipped,
    )


def read_pixels(count: int, load: Callable[[int], Image.Image], size: int, channels: int, workers: int = 0,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Decode and prepare every image into one uint8 (N, channels, size, size) tensor (for training the
    classifier): (pixels, kept indices, skipped (index, reason))."""
    workers = workers or min(8, os.cpu_count() or 1)

    def work(i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, prepare(load(i), size, channels), ""
        except ValueError as e:
            return i, None, str(e)

    out: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[tuple[int, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n, (i, t, why) in enumerate(pool.map(work, range(count)), 1):
            if t is None:
                skipped.append((i, why))
            else:
                out.append(t)
                kept.append(i)
            if progress:
                progress(n, count)
    pixels = torch.stack(out) if out else torch.zeros(0, channels, size, size, dtype=torch.uint8)
    return pixels, kept, skipped


# --------------------------------------------------------------------------------------------------
# The Inception-v3 of torch-fidelity, from the user's weights file
# --------------------------------------------------------------------------------------------------


def inception_weights_path(given: str | None) -> Path:
    """--inception-weights, else $DIFFCLI_INCEPTION_WEIGHTS; a usage error naming the file needed and
    where the public one comes from when neither is set."""
    path = given or os.environ.get(INCEPTION_ENV)
    if not path:
        raise UsageError(
            f"--features inception needs the FID Inception-v3 weights: give --inception-weights FILE or set "
            f"{INCEPTION_ENV}. The public file is {INCEPTION_FILE} (95 MB) from torch-fidelity's GitHub releases, "
            f"{INCEPTION_URL}; diffcli never downloads it"
        )
    return Path(path)


def read_inception_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: torch-fidelity's .pth (a torch.save file, read by torch's own
    weights-only loader, which builds tensors and plain containers and refuses anything else, so
    nothing in the file runs) or a .safetensors conversion of it. InputError (exit 4) otherwise."""
    if not path.exists():
        raise InputError(f"Inception weights not found: {path} (the public file is {INCEPTION_FILE}, {INCEPTION_URL})")
    if not path.is_file():
        raise InputError(f"Inception weights: not a file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise InputError(f"cannot read Inception weights {path}: {e.strerror or e}") from None
    bad = f"{path} is not an Inception-v3 weights file ({{}}); the expected file is {INCEPTION_FILE}"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch.save file: zip archive, or the older stream
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as e:
            raise InputError(f"cannot read Inception weights {path}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 (the weights-only loader's refusals and a damaged archive alike)
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise InputError(bad.format(f"a torch.save file the weights-only loader refuses: {first}")) from None
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(bad.format(f"neither a torch .pth nor a safetensors file: {type(e).__name__}")) from None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise InputError(bad.format("it does not hold a mapping of names to tensors"))
    for name, t in state.items():
        if t.numel() and t.numel() * t.element_size() > t.untyped_storage().nbytes():
            # e.g. a stride-0 view of 2^40 elements over one stored value: a clone would take terabytes
            raise InputError(bad.format(f"tensor {name[:120]} is larger than the data stored for it"))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: tensor {name[:120]} holds NaN or infinite values")
    return state


def _fidelity_inception_module() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3, imported without running torch_fidelity/__init__.py
    (which imports torchvision) unless the package is imported already."""
    if "torch_fidelity" in sys.modules:
        try:
            return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"torch-fidelity's Inception module does not load ({type(e).__name__}: {e})") from None
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("--features inception needs torch-fidelity: pip install 'diffcli[eval]' "
                         "(or pip install --no-deps torch-fidelity where torchvision cannot be installed)")
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stand_in
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"torch-fidelity's Inception module does not load ({type(e).__name__}: {e}); "
                         "reinstall it with pip install 'diffcli[eval]'") from None
    finally:  # the loaded module keeps its own references; a later `import torch_fidelity` is a normal import
        for name in [n for n in sys.modules if n == "torch_fidelity" or n.startswith("torch_fidelity.")]:
            del sys.modules[name]


def build_inception(state: dict[str, torch.Tensor], path: Path | str = "the weights") -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (pool3 features) with the given tensors. Its
    constructor fetches weights itself (a download, or torch.load without weights_only): both are
    bypassed by handing it these tensors through its module's loader function, so nothing is
    downloaded and no Python object is rebuilt from a file."""
    mod = _fidelity_inception_module()
    if not hasattr(mod, "load_state_dict_from_url") or not hasattr(mod, "FeatureExtractorInceptionV3"):
        raise UsageError("this torch-fidelity version's Inception module has another layout; install torch-fidelity 0.3 or 0.4")
    used = []

    def hand_over(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        used.append(True)
        return state

    original = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = hand_over
    try:
        net = mod.FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_LAYER])
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
        found = " ".join(str(e).split())
        raise InputError(f"{path} does not hold the FID Inception-v3 weights ({found[:300]})") from None
    finally:
        mod.load_state_dict_from_url = original
    if not used:
        raise UsageError("this torch-fidelity version did not take the given weights; install torch-fidelity 0.3 or 0.4")
    return net


def inception(weights: str | None, device: torch.device) -> InceptionFeatures:
    path = inception_weights_path(weights)
    state = read_inception_weights(path)
    net = build_inception(state, path)
    return InceptionFeatures(net, weights_digest(state, "inception-v3-compat|pil-bicubic-uint8"), device)
