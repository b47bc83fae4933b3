"""Model files and training state: safetensors with JSON metadata. Loading never runs code from the file.

A model file holds the EMA weights of the plain module plus everything needed to sample:
    format            "diffcli.model"            format_version  "1"
    model_config      ModelConfig as JSON        schedule        NoiseSchedule.to_dict() as JSON
    prediction        "epsilon" | "v"            image_size      [H, W]      channels  C
    class_names       ["0", "1", ...] (index -> name; [] for an unconditional model)
    training          summary (steps, images seen, dataset size, ...)
    sampling          defaults for sampling (guidance, tuned settings, ...)
    weights_dtype     "float32" | "float16"      diffcli_version
Training state ("diffcli.state") holds model, EMA and optimizer moments as tensors, with the training
options, step and model config in the metadata (resuming needs no RNG state: see train.py).

Files travel, so each is checked in one step before any module is built or any memory is sized from
it: the safetensors header (every tensor's dtype, shape and byte range, which must tile the file's
data exactly), then every metadata field (types and ranges, see diffcli/validate.py), then the tensors
the config says the file must hold: names, shapes and dtypes, nothing missing or extra. Only then are
tensors read, so what loading allocates is bounded by the file's size. The first disagreement is an
InputError (exit code 4) naming the field or tensor, with what was expected and what was found.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcli import __version__, atomic
from diffcli.errors import InputError
from diffcli.models.autoencoder import DECODER_PARTS, AutoencoderConfig, LatentDecoder, tensor_shapes
from diffcli.models.dit import DiT, ModelConfig, state_dict_shapes
from diffcli.diffusion.registry import Tuned, read_tuned
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.models.text import TextSpec
from diffcli.validate import Invalid, check_names, check_record, check_scalars, describe, parse_json
from diffcli.validate import field as spec

MODEL_FORMAT = "diffcli.model"
STATE_FORMAT = "diffcli.state"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024

# safetensors dtypes diffcli can read, with their item sizes and their torch names (for messages)
_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"), "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"),
    "BF16": (2, "bfloat16"), "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"),
}
_MAX_RANK = 16


def dtype_name(dtype: str) -> str:
    return _DTYPES[dtype][1] if dtype in _DTYPES else describe(dtype)


def _name(name: str) -> str:
    """A tensor name as shown in a message (a hostile file may hold very long ones)."""
    return name if len(name) <= 120 else name[:117] + "..."


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


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; begin and end are byte offsets into the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    """A checked safetensors header: metadata strings and the tensors in the file's order."""

    meta: dict[str, str]
    tensors: dict[str, TensorInfo]
    file_size: int


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))  # type: ignore[func-returns-value]
    return d


def _parse_header_json(head: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensor entries) from the header bytes; Invalid says what is wrong."""
    if head[:1] != b"{":
        raise Invalid("the header is not a JSON object")
    try:
        obj = json.loads(head.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise Invalid(f"the header names {_name(str(e))!r} twice") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Invalid("the header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise Invalid("the header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise Invalid("__metadata__ is not an object")
    bad = next((k for k, v in meta.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise Invalid(f"__metadata__ entry {_name(bad)!r} is {describe(meta[bad])}, not a string")
    return meta, obj


def _check_entries(entries: dict[str, Any], data_size: int) -> dict[str, TensorInfo]:
    """Every entry's dtype, shape and byte range, and that the ranges tile the data exactly (no gaps,
    no overlaps, nothing after the last): what safetensors' own loader needs, checked here so that
    a bad file is named precisely and nothing is allocated from its claims."""
    out: dict[str, TensorInfo] = {}
    for name, e in entries.items():
        t = f"tensor {_name(name)}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise Invalid(f"{t}: the entry must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise Invalid(f"{t} has dtype {describe(dtype)}, which diffcli does not read")
        if (not isinstance(shape, list) or len(shape) > _MAX_RANK
                or not all(type(d) is int and 0 <= d <= 2**62 for d in shape)):
            raise Invalid(f"{t} has shape {describe(shape)}; a shape is a list of at most {_MAX_RANK} non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise Invalid(f"{t} has data_offsets {describe(offsets)}; expected [begin, end] with 0 <= begin <= end")
        need = math.prod(shape) * _DTYPES[dtype][0]
        if offsets[1] - offsets[0] != need:
            raise Invalid(f"{t} has {offsets[1] - offsets[0]} bytes of data, its shape {shape} of "
                          f"{dtype_name(dtype)} needs {need}")
        out[name] = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    pos, prev = 0, None
    for name, info in sorted(out.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin > pos:
            raise Invalid(f"bytes {pos} to {info.begin} of the data belong to no tensor")
        if info.begin < pos:
            raise Invalid(f"the data of tensors {_name(prev or '')} and {_name(name)} overlap")
        pos, prev = info.end, name
    if pos > data_size:
        raise _Truncated(f"the tensors need {pos} bytes of data, the file holds {data_size}")
    if pos < data_size:
        extra = data_size - pos
        raise Invalid(f"{extra} byte{'s' if extra != 1 else ''} after the last tensor's data belong to no tensor")
    return out


class _Truncated(Invalid):
    pass


def _other_format(head: bytes) -> str | None:
    """What a file that is not safetensors holds, told from its first bytes, so that the usual
    mistake (a PyTorch .pt/.ckpt file) is named. Only the bytes are compared: nothing is decoded."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (such as a PyTorch .pt/.ckpt file)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "serialised Python objects (such as a PyTorch .pt/.ckpt file)"
    return None


def read_header(path: str | Path, fmt: str | tuple[str, ...], what: str = "model file",
                whole: bool = True) -> tuple[Header, bytes | None]:
    """Open a diffcli safetensors file and check its header: (header, the file's bytes or None when
    whole=False, which reads the 8-byte length field and the header alone, however large the file).
    fmt is the format the file must have, or a tuple of those accepted (`diffcli info` reads both
    model files and training state). InputError if it is missing, not safetensors (a PyTorch
    .pt/.ckpt file is named as one), truncated, foreign, from a newer format version, or its tensor
    entries are inconsistent."""
    path = Path(path)
    formats = (fmt,) if isinstance(fmt, str) else fmt
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    bad = f"{path} is not a diffcli {what} (not a valid safetensors file)"
    other = f"{path} holds {{}}, not safetensors; diffcli reads only safetensors"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if whole else f.read(8)
            if len(data) < 8:
                raise InputError(bad)
            (n,) = struct.unpack("<Q", data[:8])
            if n > min(size - 8, _MAX_HEADER):
                found = _other_format(data[:8])
                raise InputError(other.format(found) if found else f"{path} is truncated or not a safetensors file")
            head = data[8 : 8 + n] if whole else f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if whole:
        size = len(data)
    if len(head) != n:  # the file shrank after its size was taken
        raise InputError(f"{path} is truncated (it changed while being read)")
    try:
        meta, entries = _parse_header_json(head)
    except Invalid as e:
        found = _other_format(data[:8])
        raise InputError(other.format(found) if found else f"{bad[:-1]}: {e})") from None
    if meta.get("format") not in formats:
        found = meta.get("format")
        kind = f"a {_name(found)!r} file" if found else "a safetensors file without diffcli metadata"
        raise InputError(f"{path} is {kind}, not a diffcli {what}")
    version = meta.get("format_version", "")
    if not (version.isascii() and version.isdigit() and len(version) <= 9):
        raise InputError(f"{path} has a malformed format_version")
    if int(version) > FORMAT_VERSION:
        raise InputError(
            f"{path} uses format version {int(version)}, newer than this diffcli's {FORMAT_VERSION}; upgrade diffcli"
        )
    try:
        tensors = _check_entries(entries, size - 8 - n)
    except _Truncated as e:
        raise InputError(f"{path} is truncated ({e})") from None
    except Invalid as e:
        raise InputError(f"{path} is corrupt ({e})") from None
    return Header(meta, tensors, size), (data if whole else None)


def load_tensors(data: bytes, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a file whose header read_header has checked (so this allocates no more than the
    file holds)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types; the header check leaves none)
        raise InputError(f"{path} is truncated or corrupt ({type(e).__name__})") from None


def read(path: str | Path, fmt: str, what: str = "model file") -> tuple[dict[str, torch.Tensor], dict[str, str], bytes]:
    """Read a diffcli safetensors file whose header checks out: (tensors, metadata, raw bytes)."""
    header, data = read_header(path, fmt, what)
    assert data is not None
    return load_tensors(data, path), header.meta, data


def meta_json(meta: dict[str, str], key: str, path: Path | str, default: Any = ...) -> Any:
    if key not in meta:
        if default is not ...:
            return default
        raise InputError(f"{path} lacks the '{key}' metadata")
    try:
        return parse_json(meta[key], key)
    except Invalid:
        raise InputError(f"{path} has malformed '{key}' metadata") from None


Expected = dict[str, tuple[tuple[int, ...], tuple[str, ...]]]  # name -> (shape, allowed dtypes)


def tensor_problem(found: dict[str, TensorInfo], expected: Expected, needs: str = "the config needs",
                   of: str = "the model the config describes") -> str | None:
    """The first disagreement between the tensors a header lists and those expected (in the expected
    order, then anything extra), or None."""
    for name, (shape, dtypes) in expected.items():
        t = found.get(name)
        if t is None:
            return f"tensor {_name(name)} is missing"
        if t.shape != shape:
            return f"tensor {_name(name)} has shape {list(t.shape)}, {needs} {list(shape)}"
        if t.dtype not in dtypes:
            return f"tensor {_name(name)} is {dtype_name(t.dtype)}, {needs} {' or '.join(dtype_name(d) for d in dtypes)}"
    extra = next((k for k in found if k not in expected), None)
    if extra is not None:
        return f"tensor {_name(extra)} is not part of {of}"
    return None


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path, nonnegative: tuple[str, ...] = ()) -> None:
    """Every floating-point tensor finite (and those named by a prefix in `nonnegative` >= 0)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{path}: tensor {_name(name)} holds NaN or infinite values")
        if name.startswith(nonnegative) and t.is_floating_point() and bool((t < 0).any()):
            raise InputError(f"{path}: tensor {_name(name)} holds negative values")


# --------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentSpec:
    """A latent model's `autoencoder` metadata: the decoder it embeds and what the images are."""

    config: AutoencoderConfig
    scaling_factor: float  # the DiT sees z * scaling_factor
    sha256: str  # of the autoencoder file the model was trained with
    name: str  # that file's name
    image_size: tuple[int, int]
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "scaling_factor": self.scaling_factor, "sha256": self.sha256,
                "name": self.name}


_LATENT = (spec("scaling_factor", float, gt=0, max=1e6), spec("sha256", str, max_len=64), spec("name", str, max_len=255))


def _latent_meta(value: Any, cfg: ModelConfig) -> LatentSpec:
    if not isinstance(value, dict):
        raise Invalid(f"autoencoder must be an object, found {describe(value)}")
    rec = check_record({k: v for k, v in value.items() if k != "config"}, _LATENT, "autoencoder")
    if "config" not in value:
        raise Invalid("autoencoder.config is missing")
    ae = AutoencoderConfig.from_dict(value["config"], "autoencoder.config")
    if ae.latent_channels != cfg.in_channels:
        raise Invalid(f"autoencoder.config.latent_channels is {ae.latent_channels}, the model config has "
                      f"in_channels {cfg.in_channels}")
    f = ae.factor
    return LatentSpec(ae, rec["scaling_factor"], rec["sha256"], rec["name"],
                      (cfg.image_height * f, cfg.image_width * f), ae.out_channels)


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
    tuned: list[Tuned] = field(default_factory=list)  # sigmas (and guidance intervals) diffcli tune stored
    latent: LatentSpec | None = None  # a latent model: the autoencoder it was trained with
    decoder: LatentDecoder | None = None  # ... and its embedded decoder (scaled latents -> pixels)
    decoder_file: Any = None  # sample --decoder: the autoencoder file whose decoder replaced the embedded one
    text: TextSpec | None = None  # a text-to-image model: its vocabulary, or the CLIP folder it needs

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model makes (decoded, for a latent model)."""
        if self.latent is not None:
            return self.latent.channels, self.latent.image_size[0], self.latent.image_size[1]
        return self.config.in_channels, self.config.image_height, self.config.image_width

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
    latent: tuple[LatentSpec, LatentDecoder] | None = None,
    text: TextSpec | None = None,
) -> None:
    """Write a model file. dtype=torch.float16 halves the file; loading casts back to float32. A latent
    model embeds its decoder (tensors autoencoder.decoder.*, autoencoder.post_quant_conv.*)."""
    cfg = model.config
    meta = {
        "model_config": cfg.to_dict(),
        "schedule": schedule.to_dict(),
        "prediction": prediction,
        "image_size": list(latent[0].image_size) if latent else [cfg.image_height, cfg.image_width],
        "channels": latent[0].channels if latent else cfg.in_channels,
        "class_names": list(class_names),
        "training": training or {},
        "sampling": sampling or {},
        "weights_dtype": str(dtype).removeprefix("torch."),
    }
    state = dict(model.state_dict())
    if text is not None:
        meta["text_encoder"] = text.to_dict()
    if latent is not None:
        meta["autoencoder"] = latent[0].to_dict()
        state |= {f"autoencoder.{k}": v for k, v in latent[1].state_dict().items()}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    write(path, tensors, meta, MODEL_FORMAT, overwrite=overwrite)


# The optional metadata of a model file, each checked when present
_SAMPLING = (spec("guidance", float, min=0, default=1.0),)
_WEIGHT_DTYPES = {"float32": "F32", "float16": "F16"}
_PREDICTION = spec("prediction", str, choices=("epsilon", "v"))
_VERSION = spec("diffcli_version", str, max_len=64)


def _check_sampling(value: Any, schedule: NoiseSchedule) -> tuple[dict[str, Any], list[Tuned]]:
    """The `sampling` metadata: scalars (guidance >= 0), plus the optional `tuned` list that
    `diffcli tune` writes (registry.read_tuned checks every entry against the schedule)."""
    if not isinstance(value, dict):
        raise Invalid(f"sampling must be an object, found {describe(value)}")
    check_scalars({k: v for k, v in value.items() if k != "tuned"}, "sampling")
    check_record(value, _SAMPLING, "sampling", extra=True)
    tuned = read_tuned(value["tuned"], schedule) if "tuned" in value else []
    return value, tuned


@dataclass
class ModelSpec:
    """What a model file's metadata says, every field checked."""

    config: ModelConfig
    schedule: NoiseSchedule
    prediction: str
    class_names: list[str]
    training: dict[str, Any]
    sampling: dict[str, Any]
    weights_dtype: str | None  # the safetensors dtype every weight has, or None when not recorded
    tuned: list[Tuned] = field(default_factory=list)  # sampling.tuned, parsed
    latent: LatentSpec | None = None  # the `autoencoder` metadata of a latent model
    text: TextSpec | None = None  # the `text_encoder` metadata of a text-to-image model


def _text_meta(meta: dict[str, str], cfg: ModelConfig, path: str | Path) -> TextSpec | None:
    """A text model's `text_encoder` metadata (required), checked against its config; none for others."""
    if not cfg.text:
        if "text_encoder" in meta:
            raise Invalid("text_encoder is set but the model config has no text encoder")
        return None
    if "text_encoder" not in meta:
        raise Invalid("text_encoder is missing (the model config reads captions)")
    return TextSpec.from_meta(meta_json(meta, "text_encoder", path), cfg)


def _model_meta(meta: dict[str, str], path: str | Path) -> ModelSpec:
    def load(key: str, default: Any = ...) -> Any:
        return meta_json(meta, key, path, default)

    cfg_json, schedule_json = load("model_config"), load("schedule")  # "lacks"/"malformed" before field checks
    try:
        cfg = ModelConfig.from_dict(cfg_json)
        schedule = NoiseSchedule.from_dict(schedule_json)
        if "prediction" not in meta:
            raise Invalid("prediction is missing")
        prediction = _PREDICTION.check(meta["prediction"])
        if prediction == "epsilon" and schedule.spec.zero_terminal_snr:
            raise Invalid("prediction 'epsilon' cannot be sampled with schedule.zero_terminal_snr (alpha_bar reaches 0)")
        names = check_names(load("class_names", []), "class_names", count=cfg.num_classes)
        latent = _latent_meta(load("autoencoder"), cfg) if "autoencoder" in meta else None
        text = _text_meta(meta, cfg, path)
        if latent is None and cfg.in_channels not in (1, 3):
            raise Invalid(f"model_config.in_channels is {cfg.in_channels}: a pixel model has 1 or 3 channels "
                          f"(a latent model says what its autoencoder is)")
        size = list(latent.image_size) if latent else [cfg.image_height, cfg.image_width]
        channels = latent.channels if latent else cfg.in_channels
        if "image_size" in meta and load("image_size") != size:
            raise Invalid(f"image_size is {describe(load('image_size'))}, the model config has {size}")
        if "channels" in meta and load("channels") != channels:
            raise Invalid(f"channels is {describe(load('channels'))}, the model config has {channels}")
        weights = meta.get("weights_dtype")
        if weights is not None:
            spec("weights_dtype", str, choices=tuple(_WEIGHT_DTYPES)).check(weights)
        sampling, tuned = _check_sampling(load("sampling", {}), schedule)
        training = check_scalars(load("training", {}), "training")
        if "diffcli_version" in meta:
            _VERSION.check(meta["diffcli_version"])
    except Invalid as e:
        raise InputError(f"{path} has invalid model metadata: {e}") from None
    return ModelSpec(cfg, schedule, prediction, names, training, sampling,
                     _WEIGHT_DTYPES.get(weights) if weights else None, tuned, latent, text)


def validate_model_file(header: Header, path: str | Path) -> ModelSpec:
    """The one check of a model file before anything is built from it: every metadata field, then
    the tensors the config needs against those the header lists (names, shapes and dtypes, nothing
    missing or extra). Costs what the header's size allows: the config's sizes are bounded first."""
    ms = _model_meta(header.meta, path)
    dtypes = (ms.weights_dtype,) if ms.weights_dtype else tuple(_WEIGHT_DTYPES.values())
    expected = {k: (shape, dtypes) for k, shape in state_dict_shapes(ms.config).items()}
    if ms.latent is not None:
        expected |= {f"autoencoder.{k}": (shape, dtypes) for k, shape in tensor_shapes(ms.latent.config, DECODER_PARTS).items()}
    problem = tensor_problem(header.tensors, expected)
    if problem:
        raise InputError(f"{path}: tensors do not match the model config ({problem})")
    return ms


def with_sampling(path: str | Path, sampling: dict[str, Any]) -> bytes:
    """The bytes of a model file with its `sampling` metadata replaced and nothing else changed: the
    tensor data is copied byte for byte behind a re-encoded header (safetensors offsets are relative
    to the data, so they stay). The result is checked like any model file before it is returned."""
    header, data = read_header(path, MODEL_FORMAT)
    assert data is not None
    validate_model_file(header, path)
    (n,) = struct.unpack("<Q", data[:8])
    raw = json.loads(data[8 : 8 + n])
    raw["__metadata__"] = {**raw.get("__metadata__", {}), "sampling": json.dumps(sampling)}
    head = json.dumps(raw, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to a multiple of 8 bytes
    out = struct.pack("<Q", len(head)) + head + data[8 + n :]
    meta, entries = _parse_header_json(head)
    validate_model_file(Header(meta, _check_entries(entries, len(out) - 8 - len(head)), len(out)), path)
    return out


def read_model_spec(path: str | Path) -> ModelSpec:
    """What a model file's metadata says (schedule, tuned sigmas, ...), read from its header alone; a file
    that could not be sampled (bad metadata, tensors that disagree with the config) is refused here too."""
    header, _ = read_header(path, MODEL_FORMAT, whole=False)
    return validate_model_file(header, path)


def read_schedule(path: str | Path) -> NoiseSchedule:
    return read_model_spec(path).schedule


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    header, data = read_header(path, MODEL_FORMAT)
    assert data is not None
    ms = validate_model_file(header, path)
    tensors = load_tensors(data, path)
    check_finite(tensors, path)
    decoder = None
    if ms.latent is not None:
        decoder = LatentDecoder(ms.latent.config, ms.latent.scaling_factor)
        decoder.load_state_dict({k[12:]: tensors.pop(k) for k in list(tensors) if k.startswith("autoencoder.")})
        decoder.to(device).eval()
    model = DiT(ms.config)  # the same parameters the file holds, in float32: at most twice its size
    model.load_state_dict(tensors, strict=True)  # names and shapes checked above; fp16 is cast up
    del tensors
    model.to(device).eval()
    return ModelFile(
        model=model,
        config=ms.config,
        schedule=ms.schedule,
        prediction=ms.prediction,
        class_names=ms.class_names,
        training=ms.training,
        sampling=ms.sampling,
        sha256=hashlib.sha256(data).hexdigest(),
        path=str(path),
        tuned=ms.tuned,
        latent=ms.latent,
        decoder=decoder,
        text=ms.text,
    )


# --------------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------------

_MAX_STEP = 10**12


def _state_expected(cfg: ModelConfig, with_optimizer: bool) -> Expected:
    """model.*, ema.* and (after the first step) AdamW's moments and step counter per parameter, all float32."""
    shapes = state_dict_shapes(cfg)
    f32 = ("F32",)
    out: Expected = {f"model.{k}": (s, f32) for k, s in shapes.items()}
    out |= {f"ema.{k}": (s, f32) for k, s in shapes.items()}
    if with_optimizer:
        for k, s in shapes.items():
            out |= {f"opt.exp_avg.{k}": (s, f32), f"opt.exp_avg_sq.{k}": (s, f32), f"opt.step.{k}": ((), f32)}
    return out


@dataclass
class StateSpec:
    """What a training-state file's metadata says, every field checked."""

    config: ModelConfig
    schedule: NoiseSchedule
    prediction: str  # train_config.prediction
    class_names: list[str]
    train_config: dict[str, Any]  # the training options, scalars
    step: int
    seconds: float


def _state_meta(meta: dict[str, str], path: str | Path) -> StateSpec:
    def load(key: str, default: Any = ...) -> Any:
        return meta_json(meta, key, path, default)

    cfg_json, schedule_json, train_json = load("model_config"), load("schedule"), load("train_config")
    try:
        cfg = ModelConfig.from_dict(cfg_json)
        schedule = NoiseSchedule.from_dict(schedule_json)
        train = check_scalars(train_json, "train_config")
        if "prediction" not in train:
            raise Invalid("train_config.prediction is missing")
        prediction = _PREDICTION.check(train["prediction"], "train_config")
        names = check_names(load("class_names", []), "class_names", count=cfg.num_classes)
        _text_meta(meta, cfg, path)
        step = meta.get("step", "0")
        if not (step.isascii() and step.isdigit() and len(step) <= 13 and int(step) <= _MAX_STEP):
            raise Invalid(f"step must be an integer in [0, {_MAX_STEP}], found {describe(step)}")
        seconds = meta.get("seconds", "0")
        try:
            ok = len(seconds) <= 32 and math.isfinite(float(seconds)) and float(seconds) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise Invalid(f"seconds must be a finite number >= 0, found {describe(seconds)}")
        if "diffcli_version" in meta:
            _VERSION.check(meta["diffcli_version"])
    except Invalid as e:
        raise InputError(f"{path} has invalid training-state metadata: {e}") from None
    return StateSpec(cfg, schedule, prediction, names, train, int(step), float(seconds))


def validate_state_file(header: Header, path: str | Path) -> StateSpec:
    """The one check of a training-state file's header, as validate_model_file is for model files:
    every metadata field, then the tensors its model config needs (model, EMA and, after the first
    step, the optimizer moments) against those the header lists. The tensor data is not needed."""
    st = _state_meta(header.meta, path)
    with_opt = any(k.startswith("opt.") for k in header.tensors)
    problem = tensor_problem(header.tensors, _state_expected(st.config, with_opt))
    if problem:
        raise InputError(f"{path}: tensors do not match the model config ({problem})")
    return st


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A training-state file for --resume, checked in one step like a model file: metadata fields,
    then the tensors its model config needs (model, EMA, optimizer moments), then their values
    (finite; second moments and step counters >= 0). InputError names the first disagreement."""
    header, data = read_header(path, STATE_FORMAT, "training checkpoint")
    assert data is not None
    validate_state_file(header, path)
    tensors = load_tensors(data, path)
    check_finite(tensors, path, nonnegative=("opt.exp_avg_sq.", "opt.step."))
    return tensors, header.meta


def check_state_fits(meta: dict[str, str], cfg: ModelConfig, path: str | Path, text: TextSpec | None = None) -> None:
    """The model a training state holds against the one the data and options give now (the data
    folder may have gained a class or changed channels since): InputError naming the first difference."""
    saved = ModelConfig.from_dict(meta_json(meta, "model_config", path))
    diff = [(k, v, getattr(cfg, k)) for k, v in saved.to_dict().items() if v != getattr(cfg, k)]
    if diff:
        k, was, now = diff[0]
        raise InputError(f"cannot resume {path}: its model has {k} {was!r}, the data and options now give {now!r} "
                         f"(has the data folder changed?)")
    if text is not None and meta_json(meta, "text_encoder", path) != text.to_dict():
        what = "vocabulary" if text.kind == "builtin" else "CLIP text encoder"
        raise InputError(f"cannot resume {path}: it was trained with another {what} than the captions and "
                         f"--text-encoder give now (have the captions changed?)")
