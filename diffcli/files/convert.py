"""Import other projects' autoencoders (diffusers folders, latent-diffusion single files) as diffcli autoencoder files.

Two layouts are read, both from safetensors only (a pickle file is named and refused, never opened):

    diffusers         a folder with config.json + diffusion_pytorch_model.safetensors (or a pipeline
                      folder holding them in vae/); the names are diffcli's own, but for the attention
                      of diffusers before 0.15 (query, key, value, proj_attn), renamed by DIFFUSERS_NAMES
    latent-diffusion  one .safetensors file with encoder.*, decoder.*, quant_conv.*, post_quant_conv.*,
                      or a whole Stable Diffusion checkpoint with them under first_stage_model. (the rest
                      is ignored); renamed by LDM_NAMES, the config inferred from the tensors' shapes

Every tensor is accounted for before anything is built: one that maps to nothing, one the config needs
that is missing, or one with the wrong shape is listed by name in a single InputError, and nothing is
written. The header is checked as checkpoint.read_header checks diffcli's own files, then only the
tensors the autoencoder needs are read from their byte ranges (a 4 GB checkpoint is not loaded whole).
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from diffcli.digest import file_sha256
from diffcli.models.autoencoder import AutoencoderConfig, AutoencoderKL, tensor_shapes
from diffcli.files.autoencoder_file import save_autoencoder
from diffcli.files.checkpoint import (
    _MAX_HEADER,
    TensorInfo,
    _check_entries,
    _other_format,
    _parse_header_json,
    _Truncated,
    dtype_name,
)
from diffcli.errors import InputError, OutputExistsError, UsageError
from diffcli.validate import Invalid, check_record, describe, parse_json
from diffcli.validate import field as spec

# --------------------------------------------------------------------------------------------------
# Name tables: their names -> ours, prefix by prefix (the longest matching prefix wins)
# --------------------------------------------------------------------------------------------------

# Latent diffusion (ldm/modules/diffusionmodules/model.py, also Stable Diffusion's first_stage_model).
# {p}: encoder or decoder; {i}: a level as diffcli counts it, in the order the data passes, {j}: a
# resnet in it. The encoder's down.{i} runs in that order too, but the decoder's up.{u} is indexed by
# resolution (up.0 is the full-resolution level, which runs last): u = levels - 1 - i.
LDM_NAMES: tuple[tuple[str, str], ...] = (
    ("{p}.conv_in.", "{p}.conv_in."),
    ("{p}.conv_out.", "{p}.conv_out."),
    ("{p}.norm_out.", "{p}.conv_norm_out."),
    ("{p}.mid.block_1.", "{p}.mid_block.resnets.0."),
    ("{p}.mid.block_2.", "{p}.mid_block.resnets.1."),
    ("{p}.mid.attn_1.norm.", "{p}.mid_block.attentions.0.group_norm."),
    ("{p}.mid.attn_1.q.", "{p}.mid_block.attentions.0.to_q."),  # 1x1 convs there, Linear here
    ("{p}.mid.attn_1.k.", "{p}.mid_block.attentions.0.to_k."),
    ("{p}.mid.attn_1.v.", "{p}.mid_block.attentions.0.to_v."),
    ("{p}.mid.attn_1.proj_out.", "{p}.mid_block.attentions.0.to_out.0."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsamplers.0.conv."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ("decoder.up.{u}.block.{j}.nin_shortcut.", "decoder.up_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{u}.upsample.conv.", "decoder.up_blocks.{i}.upsamplers.0.conv."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
)

# diffusers: the same names as ours, but for the attention of files saved before diffusers 0.15
DIFFUSERS_NAMES: tuple[tuple[str, str], ...] = (
    ("{p}.mid_block.attentions.0.query.", "{p}.mid_block.attentions.0.to_q."),
    ("{p}.mid_block.attentions.0.key.", "{p}.mid_block.attentions.0.to_k."),
    ("{p}.mid_block.attentions.0.value.", "{p}.mid_block.attentions.0.to_v."),
    ("{p}.mid_block.attentions.0.proj_attn.", "{p}.mid_block.attentions.0.to_out.0."),
)

LDM_PREFIX = "first_stage_model."  # where a whole Stable Diffusion checkpoint keeps its autoencoder


def expand(table: tuple[tuple[str, str], ...], cfg: AutoencoderConfig) -> dict[str, str]:
    """The table written out for one config: {their prefix: our prefix}."""
    n = len(cfg.block_out_channels)
    out: dict[str, str] = {}
    for theirs, ours in table:
        for p in ("encoder", "decoder"):
            for i in range(n):
                for j in range(cfg.layers_per_block + 1):  # the decoder's levels have one resnet more
                    keys = {"p": p, "i": i, "j": j, "u": n - 1 - i}
                    out[theirs.format(**keys)] = ours.format(**keys)
    return out


def rename(name: str, prefixes: dict[str, str], keep: bool) -> str | None:
    """`name` with its longest prefix in the table replaced; unmatched: the name itself when keep, else None."""
    cut = len(name)
    while cut > 0:
        cut = name.rfind(".", 0, cut)
        if cut < 0:
            break
        if name[: cut + 1] in prefixes:
            return prefixes[name[: cut + 1]] + name[cut + 1 :]
    return name if keep else None


# --------------------------------------------------------------------------------------------------
# Foreign safetensors, read without trusting them
# --------------------------------------------------------------------------------------------------

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _pickle_refusal(path: Path, found: str = "") -> InputError:
    what = f"holds {found}, not safetensors" if found else "is a PyTorch pickle file"
    return InputError(f"{path} {what}; diffcli reads only .safetensors (convert it with a tool you trust)")


def read_entries(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """The tensor entries of a safetensors file from another project and where its data starts. The
    header gets checkpoint.read_header's checks (the byte ranges tile the data exactly) but no diffcli
    metadata is required. A pickle file is refused by its name or its first bytes, never opened by torch."""
    if not path.is_file():
        raise InputError(f"autoencoder to import not found: {path}" if not path.exists() else f"{path} is not a file")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            found = _other_format(first)
            if found:
                raise _pickle_refusal(path, found)
            if len(first) < 8:
                raise InputError(f"{path} is not a safetensors file ({size} bytes long)")
            (n,) = struct.unpack("<Q", first)
            if n > min(size - 8, _MAX_HEADER):
                raise InputError(f"{path} is truncated or not a safetensors file")
            head = f.read(n)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    if len(head) != n:
        raise InputError(f"{path} is truncated (it changed while being read)")
    try:
        _, entries = _parse_header_json(head)
        return _check_entries(entries, size - 8 - n), 8 + n
    except _Truncated as e:
        raise InputError(f"{path} is truncated ({e})") from None
    except Invalid as e:
        raise InputError(f"{path} is not a valid safetensors file ({e})") from None


def read_tensors(path: Path, infos: dict[str, TensorInfo], start: int, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{our name: float32 tensor} for names {their name: our name}, each read from its own byte range."""
    out: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            for theirs, ours in names.items():
                info = infos[theirs]
                f.seek(start + info.begin)
                raw = f.read(info.end - info.begin)
                if len(raw) != info.end - info.begin:
                    raise InputError(f"{path} is truncated (it changed while being read)")
                t = torch.frombuffer(bytearray(raw), dtype=_FLOATS[info.dtype]).reshape(info.shape)
                if not bool(torch.isfinite(t).all()):
                    raise InputError(f"{path}: tensor {theirs} holds NaN or infinite values; nothing was written")
                out[ours] = t.to(torch.float32)  # fp16/bf16 sources are cast: diffcli runs autoencoders in fp32
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    return out


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(n if len(n) <= 120 else n[:117] + "..." for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _listing(lists: list[tuple[str, list[str]]], budget: int = 600) -> str:
    """'what: a, b and 3 more; ...' for the non-empty lists, naming up to 10 of each, fewer where that
    keeps it within budget characters (the error stays one short line however many tensors are wrong)."""
    for limit in (10, 5, 3, 1):
        said = "; ".join(f"{what}: {_names(v, limit)}" for what, v in lists if v)
        if len(said) <= budget:
            return said
    return said[: budget - 3] + "..."


def match_tensors(path: Path, infos: dict[str, TensorInfo], cfg: AutoencoderConfig, prefixes: dict[str, str],
                  keep: bool, described_by: str, shown_prefix: str = "") -> dict[str, str]:
    """{their name: our name} for every tensor the config needs, after checking that each of the file's
    tensors maps to one of those with the right shape; otherwise one InputError listing every culprit,
    by the name the file uses. keep: names no prefix matches are ours already (diffusers)."""
    expected = tensor_shapes(cfg)
    unmapped, wrong, mapping, taken = [], [], {}, set()
    for theirs, info in infos.items():
        ours = rename(theirs, prefixes, keep)
        if ours not in expected or ours in taken:  # taken: old and new attention names side by side
            unmapped.append(shown_prefix + theirs)
            continue
        mapping[theirs] = ours
        taken.add(ours)
        want = expected[ours]
        # latent diffusion's attention projections are 1x1 convs: (C, C, 1, 1) holds a Linear's (C, C)
        fits = info.shape == want or (not keep and len(want) == 2 and info.shape == (*want, 1, 1))
        if not fits:
            wrong.append(f"{shown_prefix}{theirs} {list(info.shape)} (needs {list(want)})")
        elif info.dtype not in _FLOATS:
            wrong.append(f"{shown_prefix}{theirs} is {dtype_name(info.dtype)} (needs floating point)")
    # a missing tensor is named as the file would name it (diffusers: the current names, which are ours)
    back = {} if keep else {o: t for t, o in prefixes.items()}
    missing = [shown_prefix + (rename(o, back, keep=True) or o) for o in expected if o not in taken]
    if unmapped or missing or wrong:
        said = _listing([(f"{len(v)} {k}", v) for k, v in
                         (("unknown", unmapped), ("missing", missing), ("with the wrong shape or type", wrong))])
        raise InputError(f"{path}: the tensors do not match the autoencoder {described_by} ({said}); nothing was written")
    return mapping


# --------------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------------

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
_MAX_CONFIG = 1 << 20
# diffusers' config fields whose names differ from ours, or that diffcli does not keep, each checked
_DIFFUSERS_FIELDS = (
    spec("mid_block_add_attention", bool, default=True),
    spec("use_quant_conv", bool, default=True),
    spec("use_post_quant_conv", bool, default=True),
    spec("scaling_factor", float, gt=0, max=1e6, default=None),
    spec("shift_factor", float, min=-1e6, max=1e6, default=None),
    spec("act_fn", str, choices=("silu",), default="silu"),
)
_NULLABLE = ("scaling_factor", "shift_factor")
# diffusers' defaults for fields a hand-written config may leave out (block_out_channels has none that fits)
_DIFFUSERS_DEFAULTS = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                       "norm_num_groups": 32}


def find_diffusers_folder(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights) of a diffusers autoencoder folder, or of a pipeline folder's vae/."""
    if not (folder / "config.json").exists() and (folder / "vae").is_dir():
        folder = folder / "vae"  # a whole pipeline: model_index.json, unet/, vae/, ...
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"{folder} has no config.json (a diffusers autoencoder folder holds config.json "
                         f"and diffusion_pytorch_model.safetensors)")
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return config, folder / name
    if (folder / "diffusion_pytorch_model.bin").exists():
        raise _pickle_refusal(folder / "diffusion_pytorch_model.bin")
    raise InputError(f"{folder} has no diffusion_pytorch_model.safetensors")


def diffusers_config(path: Path) -> tuple[AutoencoderConfig, float | None, float | None]:
    """(config, scaling_factor, shift_factor) from a diffusers config.json, every field used checked."""
    try:
        if path.stat().st_size > _MAX_CONFIG:
            raise InputError(f"{path} is larger than {_MAX_CONFIG} bytes; not a diffusers config")
        text = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        d = parse_json(text, "config")
        if not isinstance(d, dict):
            raise Invalid(f"config must be an object, found {describe(d)}")
        if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise Invalid(f"config._class_name is {describe(d['_class_name'])}; diffcli imports AutoencoderKL only")
        # diffusers writes null for a factor a model has none of: the same as absent
        extra = check_record({k: v for k, v in d.items() if not (k in _NULLABLE and v is None)},
                             _DIFFUSERS_FIELDS, "config", extra=True)
        ours = {k: d.get(k, v) for k, v in _DIFFUSERS_DEFAULTS.items()} | {"block_out_channels": d.get("block_out_channels")}
        cfg = AutoencoderConfig.from_dict(ours | {"mid_attention": extra["mid_block_add_attention"],
                                                  "use_quant_conv": extra["use_quant_conv"],
                                                  "use_post_quant_conv": extra["use_post_quant_conv"]}, "config")
        n = len(cfg.block_out_channels)
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = d.get(key, [block] * n)
            if not isinstance(types, list) or any(t != block for t in types):
                raise Invalid(f"config.{key} is {describe(types)}; diffcli builds {block} blocks only")
            if len(types) != n:
                raise Invalid(f"config.{key} has {len(types)} entries, block_out_channels {n}")
    except Invalid as e:
        raise InputError(f"{path} has an invalid value: {e}") from None
    return cfg, extra["scaling_factor"], extra["shift_factor"]


# --------------------------------------------------------------------------------------------------
# latent-diffusion single files: the config from the tensors' shapes
# --------------------------------------------------------------------------------------------------

_LDM_RESNET = re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight")


def ldm_config(path: Path, infos: dict[str, TensorInfo], norm_num_groups: int, shown_prefix: str = "") -> AutoencoderConfig:
    """The AutoencoderConfig a latent-diffusion autoencoder's tensors describe. Widths: each level's
    first resnet conv1; layers per level: the encoder's resnets at level 0; the group count is not
    in the shapes (SD and diffusers use 32)."""
    levels: dict[int, set[int]] = {}
    for name in infos:
        m = _LDM_RESNET.fullmatch(name)
        if m and len(m.group(1)) < 3 and len(m.group(2)) < 3:
            levels.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    needed = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    needed += [f"encoder.down.{i}.block.0.conv1.weight" for i in range(max(levels, default=0) + 1)]
    missing = [shown_prefix + k for k in needed if k not in infos]
    bad = [f"{shown_prefix}{k} {list(infos[k].shape)}" for k in needed if k in infos and len(infos[k].shape) != 4]
    if missing or bad:
        said = _listing([("missing", missing), ("not 4-d conv weights", bad)])
        raise InputError(f"{path}: cannot tell the autoencoder's layout from its tensors ({said}); nothing was written")
    n = max(levels) + 1
    d = {
        "in_channels": infos["encoder.conv_in.weight"].shape[1],
        "out_channels": infos["decoder.conv_out.weight"].shape[0],
        "latent_channels": infos["decoder.conv_in.weight"].shape[1],
        "block_out_channels": [infos[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n)],
        "layers_per_block": len(levels[0]),
        "norm_num_groups": norm_num_groups,
        "mid_attention": any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in infos),
        "use_quant_conv": "quant_conv.weight" in infos,
        "use_post_quant_conv": "post_quant_conv.weight" in infos,
    }
    try:
        return AutoencoderConfig.from_dict(d, "autoencoder")
    except Invalid as e:
        hint = " (the group count is not in the file: pass norm_num_groups)" if "norm_num_groups" in str(e) else ""
        raise InputError(f"{path}: its tensors describe an autoencoder diffcli does not build: {e}{hint}") from None


# --------------------------------------------------------------------------------------------------
# Import and convert
# --------------------------------------------------------------------------------------------------


def _check_scale(scaling_factor: Any) -> float | None:
    if scaling_factor is None:
        return None
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
            or not math.isfinite(scaling_factor) or not 0 < scaling_factor <= 1e6:
        raise UsageError(f"scaling factor must be a finite number > 0, found {describe(scaling_factor)}")
    return float(scaling_factor)


def import_autoencoder(src: str | Path, scaling_factor: float | None = None,
                       norm_num_groups: int | None = None) -> tuple[AutoencoderKL, float | None, dict[str, Any]]:
    """(model, scaling factor, source description) of a diffusers folder or a latent-diffusion
    .safetensors file. scaling_factor overrides the one a diffusers config gives; a latent-diffusion
    file gives none (SD 1.x/2.x use 0.18215, SDXL 0.13025). norm_num_groups (default 32) sets the
    group count a latent-diffusion file does not record; a diffusers config must agree with it."""
    scale = _check_scale(scaling_factor)
    if norm_num_groups is not None and (isinstance(norm_num_groups, bool) or not isinstance(norm_num_groups, int)
                                        or not 1 <= norm_num_groups <= 1024):
        raise UsageError(f"norm_num_groups must be an integer in [1, 1024], found {describe(norm_num_groups)}")
    src = Path(src)
    if src.is_dir():
        config_path, weights = find_diffusers_folder(src)
        cfg, file_scale, shift = diffusers_config(config_path)
        if norm_num_groups is not None and norm_num_groups != cfg.norm_num_groups:
            raise UsageError(f"norm_num_groups {norm_num_groups} disagrees with {config_path} "
                             f"({cfg.norm_num_groups}); leave it out for a diffusers folder")
        infos, start = read_entries(weights)
        mapping = match_tensors(weights, infos, cfg, expand(DIFFUSERS_NAMES, cfg), keep=True,
                                described_by=f"{config_path.name} describes")
        source: dict[str, Any] = {"layout": "diffusers", "name": src.resolve().name, "file": weights.name}
        if shift is not None:
            source["shift_factor"] = shift  # SD3/FLUX latents are (z - shift) * scale: kept for the record
        scale = scale if scale is not None else file_scale
        ignored = 0
    else:
        weights = src
        infos, start = read_entries(weights)
        # a whole SD checkpoint: take its autoencoder, ignore the UNet, text encoder, EMA, ...
        prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in infos) else ""
        ignored = sum(not k.startswith(prefix) for k in infos)
        ae = {k[len(prefix):]: v for k, v in infos.items() if k.startswith(prefix)}
        if not any(k.startswith(("encoder.down.", "decoder.up.")) for k in ae):
            if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in ae):
                raise InputError(f"{src} holds diffusers names: import the folder that holds it and its config.json")
            raise InputError(f"{src} holds no latent-diffusion autoencoder (no encoder.down.* or "
                             f"{LDM_PREFIX}encoder.down.* tensors)")
        cfg = ldm_config(src, ae, norm_num_groups or 32, prefix)
        mapping = match_tensors(src, ae, cfg, expand(LDM_NAMES, cfg), keep=False,
                                described_by="its tensors' shapes describe", shown_prefix=prefix)
        mapping = {prefix + k: v for k, v in mapping.items()}
        source = {"layout": "ldm", "name": src.name}
    tensors = read_tensors(weights, infos, start, mapping)
    expected = tensor_shapes(cfg)
    with torch.device("meta"):  # every weight comes from the file: skip the random init (a second at SD's size)
        model = AutoencoderKL(cfg)
    model.load_state_dict({k: t.reshape(expected[k]) for k, t in tensors.items()}, strict=True, assign=True)
    model.eval()
    source |= {"sha256": file_sha256(weights), "ignored_tensors": ignored}
    return model, scale, source


def convert_autoencoder(src: str | Path, out: str | Path, scaling_factor: float | None = None,
                        overwrite: bool = False, norm_num_groups: int | None = None) -> dict[str, Any]:
    """Import SRC (see import_autoencoder) and write it to OUT as a diffcli autoencoder file, atomically.
    OutputExistsError before any work when OUT exists and overwrite is False. Returns a summary."""
    _check_scale(scaling_factor)
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
        raise UsageError(f"{out} is the file being converted; write the result elsewhere")
    model, scale, source = import_autoencoder(src, scaling_factor, norm_num_groups)
    save_autoencoder(out, model, scale, source=source, overwrite=overwrite)
    state = model.state_dict()
    return {
        "source": str(src),
        "layout": source["layout"],
        "source_sha256": source["sha256"],
        "ignored_tensors": source["ignored_tensors"],
        "config": model.config.to_dict(),
        "scaling_factor": scale,
        "factor": model.config.factor,
        "tensors": len(state),
        "parameters": sum(t.numel() for t in state.values()),
        "out": str(out),
        "sha256": file_sha256(out),
    }
