"""`diffcli info`: what a model file or training checkpoint holds, read from its safetensors header.

No tensor is loaded and no model is built: the header (a few kB) gives every tensor's shape, hence
the parameter count, and the JSON metadata gives the rest. The file is streamed once for its SHA-256.
Everything read is checked before it is used, and nothing is allocated from a size the header claims
beyond the file's real size, so a hostile or broken file costs a clear InputError and nothing more.

Two places to extend: FILE_KINDS (a new file format, such as an autoencoder file) and model_kind (a
new kind of model in a model file, such as latent or text-conditioned).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffcli.checkpoint import _MAX_HEADER, FORMAT_VERSION, MODEL_FORMAT, STATE_FORMAT
from diffcli.errors import InputError, UsageError
from diffcli.model import PRESETS, ModelConfig
from diffcli.schedule import KINDS, ScheduleSpec

if TYPE_CHECKING:
    from rich.table import Table

# Bytes per element of the safetensors dtypes, and the names torch gives them.
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"), "I8": (1, "int8"),
    "U64": (8, "uint64"), "U32": (4, "uint32"), "U16": (2, "uint16"), "U8": (1, "uint8"), "BOOL": (1, "bool"),
}


@dataclass
class Info:
    """What `diffcli info` reports; to_dict() is the --json object, `kind` first."""

    kind: str  # "model" (a file `diffcli sample` reads) or "checkpoint" (training state)
    path: str
    file_size: int  # bytes
    sha256: str
    model_hash: str  # the first 10 hex digits of sha256, as `sample` prints and writes into PNGs
    format: str
    format_version: int
    diffcli_version: str  # of the diffcli that wrote the file
    model_kind: str  # see model_kind()
    preset: str  # "DiT-M/4", or "custom" when the config matches no preset
    parameters: int  # of the network (a checkpoint's EMA copy and optimiser moments not counted)
    weights_dtype: str
    image_size: list[int]  # [H, W]
    channels: int
    classes: list[str]  # index -> name; [] when unconditional
    model_config: dict[str, Any]
    schedule: dict[str, Any]
    prediction: str
    sampling_defaults: dict[str, Any]  # what `diffcli sample` uses with no flags; {} for a checkpoint
    tuned: list[Any] | dict[str, Any] = field(default_factory=dict)  # sampling "tuned" entries, as stored
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


# --------------------------------------------------------------------------------------------------
# The safetensors header
# --------------------------------------------------------------------------------------------------


@dataclass
class Header:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    metadata: dict[str, str]
    file_size: int


def _known_other_format(head: bytes) -> str | None:
    """What a non-safetensors file looks like from its first bytes, so that PyTorch files are named."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (such as a PyTorch .pt/.ckpt file)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "serialised Python objects (such as a PyTorch .pt/.ckpt file)"
    return None


def read_header(path: Path, what: str = "model file") -> Header:
    """The tensor table and metadata of a safetensors file, checked; the tensor data is not read."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > _MAX_HEADER:  # checked before reading: n is only a claim
                other = _known_other_format(head)
                if other:
                    raise InputError(f"{path} holds {other}, not safetensors; diffcli reads only safetensors")
                raise InputError(f"{path} is not a safetensors file, or is truncated "
                                 f"(its header length field says {n} bytes, the file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(raw) != n:
        raise InputError(f"{path} is truncated (it changed while being read)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InputError(f"{path} has malformed safetensors metadata (not an object of strings)")
    return Header(_tensor_table(path, header, data_size=size - 8 - n), meta, size)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_table(path: Path, header: dict[str, Any], data_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check every entry (dtype, shape, offsets) and that the tensors tile the data exactly, as the
    safetensors loader requires; a file cut short is reported as truncated."""
    table, spans = {}, []
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in DTYPES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] \
                or math.prod(shape) * DTYPES[entry["dtype"]][0] != offsets[1] - offsets[0]:
            raise InputError(f"{path} has a malformed safetensors header (tensor {str(name)[:80]!r})")
        table[name] = (entry["dtype"], tuple(shape))
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise InputError(f"{path} has a malformed safetensors header (tensor data overlaps or has gaps)")
        end = stop
    if end > data_size:
        raise InputError(f"{path} is truncated ({end - data_size} bytes of tensor data missing)")
    if end < data_size:
        raise InputError(f"{path} has {data_size - end} bytes after its tensor data (corrupt or not safetensors)")
    return table


def file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e


# --------------------------------------------------------------------------------------------------
# Metadata values
# --------------------------------------------------------------------------------------------------


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # 1e999; and NaN/Infinity below: --json must print valid JSON
        raise ValueError(text)
    return x


def _reject(text: str) -> None:
    raise ValueError(text)


_WANT = {dict: "an object", list: "a list", int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is no number and an int is a float."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _meta(meta: dict[str, str], key: str, path: Path, kind: type, default: Any = ...) -> Any:
    """meta[key] parsed as JSON and of the given type; InputError naming the key otherwise."""
    if key not in meta:
        if default is ...:
            raise InputError(f"{path} lacks the '{key}' metadata")
        return default
    try:
        value = json.loads(meta[key], parse_float=_finite, parse_constant=_reject)
    except (ValueError, RecursionError):
        raise InputError(f"{path} has malformed '{key}' metadata (not JSON)") from None
    if not _is(value, kind):
        raise InputError(f"{path} has malformed '{key}' metadata (expected {_WANT[kind]})")
    return value


def _typed_dataclass(cls: type, d: dict[str, Any], key: str, path: Path) -> Any:
    """Build a config dataclass from JSON, checking each field's type against its default's (int,
    float, bool, str) so that a string where a number belongs is refused, not carried along."""
    fs = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(fs))
    if unknown:
        raise InputError(f"{path} has unknown '{key}' fields: {', '.join(unknown)[:100]}")
    for name, value in d.items():
        want = type(fs[name].default)
        if not _is(value, want):
            raise InputError(f"{path} has malformed '{key}' metadata ({name} should be {_WANT[want]})")
    return cls(**d)


def _model_config(meta: dict[str, str], path: Path) -> ModelConfig:
    cfg = _typed_dataclass(ModelConfig, _meta(meta, "model_config", path, dict), "model_config", path)
    try:
        return cfg.validate()
    except UsageError as e:
        raise InputError(f"{path} has invalid model metadata: {e}") from None


def _schedule(meta: dict[str, str], path: Path) -> dict[str, Any]:
    spec = _typed_dataclass(ScheduleSpec, _meta(meta, "schedule", path, dict), "schedule", path)
    if spec.kind not in KINDS or spec.num_timesteps < 2:
        raise InputError(f"{path} has an invalid schedule ({spec.kind!r}, {spec.num_timesteps} timesteps)")
    return asdict(spec)  # every field, defaults included; no NoiseSchedule is built (T is only a claim)


def _check_shapes(cfg: ModelConfig, tensors: dict[str, tuple[str, tuple[int, ...]]], path: Path) -> None:
    """The tensors' names and shapes against the config, as `sample` checks them, so that info does
    not describe a file sample would refuse. The expected shapes come from a DiT on the meta device,
    built for a one-patch image (no stored tensor depends on the image size, and the fixed positional
    table, computed on the CPU, would otherwise be sized by the claimed resolution). A config's depth
    and width are first bounded by the tensors really in the file, so nothing sized by a claim is built."""
    import torch

    from diffcli.model import DiT

    widest = max((d for _, shape in tensors.values() for d in shape), default=0)
    if cfg.depth > len(tensors) or cfg.hidden_size > widest:
        raise InputError(f"{path}: tensors do not match the model config (depth {cfg.depth}, width "
                         f"{cfg.hidden_size}, but {len(tensors)} tensors at most {widest} wide)")
    one_patch = replace(cfg, image_height=cfg.patch_size, image_width=cfg.patch_size)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(one_patch).state_dict().items()}
    found = {k: shape for k, (_, shape) in tensors.items()}
    if found != expected:
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        else:
            k = next(k for k in sorted(expected) if expected[k] != found[k])
            detail = f"{k} has shape {list(found[k])}, the config needs {list(expected[k])}"
        raise InputError(f"{path}: tensors do not match the model config ({detail[:200]})")


def _class_names(meta: dict[str, str], cfg: ModelConfig, path: Path) -> list[str]:
    names = _meta(meta, "class_names", path, list, default=[])
    if len(names) != cfg.num_classes or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: class_names do not match the model's {cfg.num_classes} classes")
    return names


def _prediction(value: Any, path: Path) -> str:
    if value not in ("epsilon", "v"):
        raise InputError(f"{path} has an unknown prediction type {str(value)[:40]!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Derived facts: preset, model kind, parameters, sampling defaults
# --------------------------------------------------------------------------------------------------


def preset_of(cfg: ModelConfig, stored: Any = None) -> str:
    """The preset name stored at training time if it is one, else the preset whose depth, width,
    heads, patch and MLP ratio the config has, else "custom"."""
    if isinstance(stored, str):
        key = next((k for k in PRESETS if k.lower() == stored.lower()), None)
        if key is not None:
            return key
    base = ModelConfig()
    for name, p in PRESETS.items():
        if (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.mlp_ratio) == \
                (p["depth"], p["hidden_size"], p["num_heads"], p["patch_size"], base.mlp_ratio):
            return name
    return "custom"


def model_kind(cfg: ModelConfig, meta: dict[str, str]) -> str:
    """What a model makes images from. The one place to recognise a new kind (latent, text)."""
    return "class-conditional" if cfg.num_classes else "unconditional"


def _weights(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[int, str]:
    """(parameter count, dtype name) of the network's tensors."""
    dtypes = sorted({DTYPES[dt][1] for dt, _ in tensors.values()})
    return sum(math.prod(shape) for _, shape in tensors.values()), "+".join(dtypes) or "none"


def sampling_defaults(cfg: ModelConfig, sampling: dict[str, Any], path: Path) -> dict[str, Any]:
    """What `diffcli sample --checkpoint FILE` uses with no other flag (the sampler's defaults)."""
    from diffcli import ode

    sampler, steps = ode.DEFAULT_SAMPLER, ode.DEFAULT_STEPS
    guidance = sampling.get("guidance", 1.0)
    if not _is(guidance, float) or guidance < 0:
        raise InputError(f"{path} has a malformed sampling guidance {str(guidance)[:40]!r}")
    sigmas = ode.resolve_sigmas(sampler, "auto")
    return {
        "sampler": sampler,
        "steps": steps,
        "sigmas": sigmas,
        "spacing": None if sigmas else ode.DEFAULT_SPACING,  # the timesteps visited when no sigma schedule
        "guidance": float(guidance) if cfg.num_classes else 1.0,  # unconditional: nothing to guide
        "num_images": cfg.num_classes or 16,
    }


# --------------------------------------------------------------------------------------------------
# File kinds: each format's reader fills in the model fields
# --------------------------------------------------------------------------------------------------


def _model_file(path: Path, header: Header) -> dict[str, Any]:
    meta = header.metadata
    cfg = _model_config(meta, path)
    image_size = _meta(meta, "image_size", path, list, default=[cfg.image_height, cfg.image_width])
    channels = _meta(meta, "channels", path, int, default=cfg.in_channels)
    if image_size != [cfg.image_height, cfg.image_width] or channels != cfg.in_channels:
        raise InputError(f"{path}: image_size/channels metadata disagree with its model_config")
    sampling = _meta(meta, "sampling", path, dict, default={})
    tuned = sampling.get("tuned", {})
    if not isinstance(tuned, (list, dict)):
        raise InputError(f"{path} has malformed 'sampling' metadata (tuned should be a list or an object)")
    training = _meta(meta, "training", path, dict, default={})
    _check_shapes(cfg, header.tensors, path)
    parameters, dtype = _weights(header.tensors)
    return dict(
        model_kind=model_kind(cfg, meta), preset=preset_of(cfg, training.get("preset")), parameters=parameters,
        weights_dtype=dtype, image_size=image_size, channels=channels, classes=_class_names(meta, cfg, path),
        model_config=cfg.to_dict(), schedule=_schedule(meta, path), prediction=_prediction(meta.get("prediction"), path),
        sampling_defaults=sampling_defaults(cfg, sampling, path), tuned=tuned, training=training,
    )


def _training_state(path: Path, header: Header) -> dict[str, Any]:
    meta = header.metadata
    cfg = _model_config(meta, path)
    train = _meta(meta, "train_config", path, dict)
    step = _meta(meta, "step", path, int)
    seconds = _meta(meta, "seconds", path, float, default=0.0)
    if step < 0:
        raise InputError(f"{path} has a negative step")
    model = {name.removeprefix("model."): t for name, t in header.tensors.items() if name.startswith("model.")}
    _check_shapes(cfg, model, path)
    parameters, dtype = _weights(model)
    batch = train.get("batch_size")
    training = {
        "steps": step,
        "target_steps": train.get("steps"),
        "images_seen": step * batch if _is_int(batch) else None,
        "dataset": train.get("data_dir"),
        "preset": train.get("model"),
        "batch_size": batch,
        "lr": train.get("lr"),
        "seconds": seconds,
    }
    return dict(
        model_kind=model_kind(cfg, meta), preset=preset_of(cfg, train.get("model")), parameters=parameters,
        weights_dtype=dtype, image_size=[cfg.image_height, cfg.image_width], channels=cfg.in_channels,
        classes=_class_names(meta, cfg, path), model_config=cfg.to_dict(), schedule=_schedule(meta, path),
        prediction=_prediction(train.get("prediction"), path), sampling_defaults={}, tuned={}, training=training,
    )


# format -> (the --json "kind", its reader). A new file format (an autoencoder's) is one more entry.
FILE_KINDS: dict[str, tuple[str, Callable[[Path, Header], dict[str, Any]]]] = {
    MODEL_FORMAT: ("model", _model_file),
    STATE_FORMAT: ("checkpoint", _training_state),
}


def describe(path: str | Path) -> Info:
    """Everything `diffcli info` reports about one file; InputError (exit 4) for anything else."""
    path = Path(path)
    header = read_header(path)
    fmt = header.metadata.get("format")
    if fmt not in FILE_KINDS:
        found = f"a {fmt[:40]!r} file" if fmt else "a safetensors file without diffcli metadata"
        raise InputError(f"{path} is {found}, not a diffcli model file or training checkpoint")
    try:
        version = int(header.metadata.get("format_version", ""))
    except ValueError:
        raise InputError(f"{path} has a malformed format_version") from None
    if version > FORMAT_VERSION:
        raise InputError(f"{path} uses format version {version}, newer than this diffcli's {FORMAT_VERSION}; upgrade diffcli")
    kind, reader = FILE_KINDS[fmt]
    described = reader(path, header)
    sha = file_sha256(path)
    return Info(
        kind=kind, path=str(path), file_size=header.file_size, sha256=sha, model_hash=sha[:10], format=fmt,
        format_version=version, diffcli_version=header.metadata.get("diffcli_version", ""), **described,
    )


# --------------------------------------------------------------------------------------------------
# The rich view
# --------------------------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f} M)" if n >= 1e5 else f"{n:,}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB ({n:,} bytes)" if n >= 1e5 else f"{n:,} bytes"


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return f"{v:,}" if _is(v, int) else json.dumps(v)


def _classes_text(names: list[str], shown: int = 20) -> str:
    if not names:
        return "none (unconditional)"
    text = ", ".join(names[:shown])
    return f"{len(names)}: {text}" + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def rows(info: Info) -> list[tuple[str, list[tuple[str, str]]]]:
    """The view as (section, [(key, value), ...]): what the table shows, as plain text."""
    c, s, d = info.model_config, info.schedule, info.sampling_defaults
    H, W = info.image_size
    what = "model file" if info.kind == "model" else "training checkpoint"
    arch = f"depth {c['depth']}, width {c['hidden_size']}, {c['num_heads']} heads, patch {c['patch_size']}"
    arch += ", long skips" if c.get("long_skip") else ""
    arch += ", learned sigma" if c.get("learn_sigma") else ""
    sched = f"{s['kind']}, T = {s['num_timesteps']}"
    if s["kind"] in ("linear", "scaled_linear", "sigmoid"):
        sched += f", beta {s['beta_start']:g} to {s['beta_end']:g}"
    sched += ", zero terminal SNR" if s["zero_terminal_snr"] else ""
    out = [
        ("File", [
            ("path", info.path),
            ("kind", f"{what} ({info.format} v{info.format_version}, written by diffcli {info.diffcli_version or '?'})"),
            ("size", _size(info.file_size)),
            ("sha256", info.sha256),
            ("model hash", info.model_hash),
        ]),
        ("Model", [
            ("model kind", info.model_kind),
            ("preset", f"{info.preset} ({arch})"),
            ("parameters", f"{_count(info.parameters)}, {info.weights_dtype} weights"),
            ("resolution", f"{H}x{W}, {info.channels} channel{'s' if info.channels > 1 else ''}"),
            ("classes", _classes_text(info.classes)),
        ]),
        ("Diffusion", [("schedule", sched), ("prediction", info.prediction)]),
    ]
    if info.kind == "model":
        where = f"{d['sigmas']} sigmas" if d["sigmas"] else f"{d['spacing']} spacing"
        out.append(("Sampling defaults", [
            ("sampler", f"{d['sampler']}, {d['steps']} steps, {where}"),
            ("guidance", f"{d['guidance']:g}"),
            ("images", f"{d['num_images']}" + (" (one per class)" if info.classes else "")),
            ("tuned", json.dumps(info.tuned) if info.tuned else "none"),
        ]))
    training = [(k.replace("_", " "), _value(v)) for k, v in info.training.items()]
    out.append(("Training", training or [("", "no training metadata")]))
    return out


def table(info: Info) -> Table:
    from rich.table import Table
    from rich.text import Text

    tab = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    tab.add_column(style="bold", no_wrap=True)
    tab.add_column()
    for i, (section, pairs) in enumerate(rows(info)):
        if i:
            tab.add_row("", "")
        tab.add_row(Text(section, style="bold underline"), "")
        for key, value in pairs:
            tab.add_row(Text("  " + key), Text(value))  # Text: brackets in values are not markup
    return tab
