"""`diffcli info`: what a model file or training checkpoint holds, read from its safetensors header.

No tensor is loaded and no model is built: the header (a few kB) gives every tensor's shape, hence
the parameter count, and the JSON metadata gives the rest. The file is streamed once for its SHA-256.
Every check is checkpoint.py's, the one validation step for files diffcli reads (read_header, then
validate_model_file or validate_state_file), so `info` refuses exactly what `sample` and
`train --resume` refuse, with the same message; this module only derives and shows.

Two places to extend: FILE_KINDS (a new file format, such as an autoencoder file) and model_kind (a
new kind of model in a model file, such as latent or text-conditioned).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffcli.digest import file_sha256
from diffcli.files import checkpoint
from diffcli.files.checkpoint import MODEL_FORMAT, STATE_FORMAT, Header, TensorInfo
from diffcli.errors import InputError
from diffcli.models.dit import PRESETS, ModelConfig

if TYPE_CHECKING:
    from rich.table import Table


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
    tuned: list[dict[str, Any]] = field(default_factory=list)  # sampling.tuned entries (diffcli tune), checked
    training: dict[str, Any] = field(default_factory=dict)
    autoencoder: dict[str, Any] | None = None  # a latent model: the embedded decoder's autoencoder (name, sha256, ...)
    text_encoder: dict[str, Any] | None = None  # a text model: kind, tokens, and its vocabulary size or CLIP folder

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("autoencoder", "text_encoder"):
            if d[k] is None:  # another kind of model: no key at all
                del d[k]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


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
    kind = "text-to-image" if cfg.text else "class-conditional" if cfg.num_classes else "unconditional"
    return f"latent {kind}" if "autoencoder" in meta else kind


def _weights(tensors: dict[str, TensorInfo]) -> tuple[int, str]:
    """(parameter count, dtype name) of the network's tensors."""
    dtypes = sorted({checkpoint.dtype_name(t.dtype) for t in tensors.values()})
    return sum(math.prod(t.shape) for t in tensors.values()), "+".join(dtypes) or "none"


def _tuned_text(t: dict[str, Any]) -> str:
    """One tuned entry in a line: `dpm++2m 10 steps, distance 0.0102 (best fixed: edm 0.0161)`."""
    dist = t["distance"]
    fixed = min(((k, v) for k, v in dist.items() if k != "tuned"), key=lambda kv: kv[1], default=None)
    text = f"{t['sampler']} {t['steps']} steps"
    if "tuned" in dist:
        text += f", distance {dist['tuned']:.4f}"
    if fixed:
        text += f" (best fixed: {fixed[0]} {fixed[1]:.4f})"
    if t.get("guidance_interval"):
        lo, hi = t["guidance_interval"]
        text += f", guidance at sigma {lo:.3g} to {hi:.3g}"
    return text


def sampling_defaults(cfg: ModelConfig, sampling: dict[str, Any], tuned: list[Any] = ()) -> dict[str, Any]:
    """What `diffcli sample --checkpoint FILE` uses with no other flag (the sampler's defaults, the
    model's tuned sigmas when it has them for those), from metadata validate_model_file has checked."""
    from diffcli.diffusion import registry

    sampler, steps = registry.DEFAULT_SAMPLER, registry.DEFAULT_STEPS
    sigmas = registry.resolve_sigmas(sampler, "auto", steps, tuned)
    entry = registry.find_tuned(tuned, sampler, steps) if sigmas == "tuned" else None
    return {
        "sampler": sampler,
        "steps": steps,
        "sigmas": sigmas,
        "spacing": None if sigmas else registry.DEFAULT_SPACING,  # the timesteps visited when no sigma schedule
        "guidance_interval": list(entry.guidance_interval) if entry and entry.guidance_interval else None,
        "guidance": float(sampling.get("guidance", 1.0)) if cfg.num_classes or cfg.text else 1.0,  # unconditional: nothing to guide
        "num_images": 4 if cfg.text else cfg.num_classes or 16,  # a text model: per --prompt
    }


# --------------------------------------------------------------------------------------------------
# File kinds: each format's reader validates the header (checkpoint.py) and fills in the model fields
# --------------------------------------------------------------------------------------------------


def _model_file(path: Path, header: Header) -> dict[str, Any]:
    ms = checkpoint.validate_model_file(header, path)
    cfg = ms.config
    parameters, dtype = _weights({k: t for k, t in header.tensors.items() if not k.startswith("autoencoder.")})
    lat = ms.latent
    ae = None
    if lat is not None:
        ae = {**lat.to_dict(), "factor": lat.config.factor, "latent_size": [cfg.in_channels, cfg.image_height, cfg.image_width],
              "decoder_parameters": _weights({k: t for k, t in header.tensors.items() if k.startswith("autoencoder.")})[0]}
    return dict(
        model_kind=model_kind(cfg, header.meta), preset=preset_of(cfg, ms.training.get("preset")),
        parameters=parameters, weights_dtype=dtype,
        image_size=list(lat.image_size) if lat else [cfg.image_height, cfg.image_width],
        channels=lat.channels if lat else cfg.in_channels, classes=ms.class_names, autoencoder=ae, model_config=cfg.to_dict(), schedule=ms.schedule.to_dict(),
        prediction=ms.prediction, sampling_defaults=sampling_defaults(cfg, ms.sampling, ms.tuned),
        tuned=[t.to_dict() for t in ms.tuned], training=ms.training, text_encoder=_text_info(cfg, ms.text),
    )


def _text_info(cfg: ModelConfig, text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    out: dict[str, Any] = {"kind": text.kind, "tokens": cfg.text_length, "width": cfg.context_dim,
                           "pooled": cfg.text_pooled}
    if text.kind == "builtin":
        return out | {"words": text.vocabulary.size - 1, "layers": cfg.text_depth}
    return out | {"folder": text.folder, "sha256": text.sha256}


def _training_state(path: Path, header: Header) -> dict[str, Any]:
    st = checkpoint.validate_state_file(header, path)
    cfg, train = st.config, st.train_config
    model = {name: t for name, t in header.tensors.items() if name.startswith("model.")}
    parameters, dtype = _weights(model)
    batch = train.get("batch_size")
    training = {
        "steps": st.step,
        "target_steps": train.get("steps"),
        "images_seen": st.step * batch if isinstance(batch, int) and not isinstance(batch, bool) else None,
        "dataset": train.get("data_dir"),
        "preset": train.get("model"),
        "batch_size": batch,
        "lr": train.get("lr"),
        "seconds": st.seconds,
    }
    return dict(
        model_kind=model_kind(cfg, header.meta), preset=preset_of(cfg, train.get("model")), parameters=parameters,
        weights_dtype=dtype, image_size=[cfg.image_height, cfg.image_width], channels=cfg.in_channels,
        classes=st.class_names, model_config=cfg.to_dict(), schedule=st.schedule.to_dict(),
        prediction=st.prediction, sampling_defaults={}, tuned=[], training=training,
    )


# format -> (the --json "kind", its reader). A new file format (an autoencoder's) is one more entry.
FILE_KINDS: dict[str, tuple[str, Callable[[Path, Header], dict[str, Any]]]] = {
    MODEL_FORMAT: ("model", _model_file),
    STATE_FORMAT: ("checkpoint", _training_state),
}


def describe(path: str | Path) -> Info:
    """Everything `diffcli info` reports about one file; InputError (exit 4) for anything else, with
    the message `sample` gives for the same file. Only the header is read (whole=False)."""
    path = Path(path)
    header, _ = checkpoint.read_header(path, tuple(FILE_KINDS), "model file", whole=False)
    fmt = header.meta["format"]
    kind, reader = FILE_KINDS[fmt]
    described = reader(path, header)
    sha = file_sha256(path)
    return Info(
        kind=kind, path=str(path), file_size=header.file_size, sha256=sha, model_hash=sha[:10], format=fmt,
        format_version=int(header.meta["format_version"]), diffcli_version=header.meta.get("diffcli_version", ""),
        **described,
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
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else json.dumps(v)


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
            ("classes", "none (captions are the condition)" if info.text_encoder else _classes_text(info.classes)),
        ]),
        ("Diffusion", [("schedule", sched), ("prediction", info.prediction)]),
    ]
    if info.autoencoder:
        a = info.autoencoder
        c, h, w = a["latent_size"]
        out.insert(2, ("Latent", [
            ("autoencoder", f"{a['name']} ({a['sha256'][:10]}), factor {a['factor']}"),
            ("latent", f"{c}x{h}x{w}, scaled by {a['scaling_factor']:.5g}"),
            ("decoder", f"embedded, {_count(a['decoder_parameters'])}"),
        ]))
    if info.text_encoder:
        t = info.text_encoder
        what = (f"builtin, {t['layers']} layers, {t['words']:,} words" if t["kind"] == "builtin"
                else f"CLIP {t['folder']} ({t['sha256'][:10]}), frozen: sample needs --text-encoder")
        out.insert(2, ("Text", [("encoder", what), ("tokens", f"{t['tokens']} per prompt, width {t['width']}"),
                                ("condition", "cross-attention" + (" and pooled into adaLN" if t["pooled"] else ""))]))
    if info.kind == "model":
        where = f"{d['sigmas']} sigmas" if d["sigmas"] else f"{d['spacing']} spacing"
        out.append(("Sampling defaults", [
            ("sampler", f"{d['sampler']}, {d['steps']} steps, {where}"),
            ("guidance", f"{d['guidance']:g}" + (f" at sigma {d['guidance_interval'][0]:.3g} to "
                                                  f"{d['guidance_interval'][1]:.3g}" if d["guidance_interval"] else "")),
            ("images", f"{d['num_images']}" + (" (one per class)" if info.classes else " per prompt" if info.text_encoder else "")),
            ("tuned", "; ".join(_tuned_text(t) for t in info.tuned) or "none"),
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
