"""The `sample` job: a model file and options -> PNG files (and a grid), one record per image."""

from __future__ import annotations

import math
import os
import secrets
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from diffcli import __version__
from diffcli.sampling import edit, prompts
from diffcli.sampling.prompts import MAX_PROMPT_CHARS
from diffcli.files.checkpoint import ModelFile, load_model
from diffcli.device import autocast_denoiser, resolve_device, resolve_precision
from diffcli.errors import InputError, OutputExistsError, UsageError
from diffcli.files.images import generation_text, make_grid, save_png, to_pil, to_uint8
from diffcli.diffusion import ode, registry
from diffcli.diffusion.registry import sample

DEFAULT_NAME = "{seed}-{index:04d}.png"
DEFAULT_EDIT_NAME = "{stem}-{seed}.png"  # --init-image: named after the input image
NAME_FIELDS = {"seed", "index", "class", "steps", "sampler", "stem", "prompt", "prompt_index"}
DEFAULT_WEIGHTS = "diffcli-mnist.safetensors"
MAX_IMAGES = 100_000  # per run; every name is planned up front, so a typo like -n 10000000000 fails fast


def all_sampler_names() -> tuple[str, ...]:
    return registry.NAMES


def default_checkpoint() -> Path:
    """$DIFFCLI_WEIGHTS, else the model shipped in the repository's weights/ folder."""
    env = os.environ.get("DIFFCLI_WEIGHTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "weights" / DEFAULT_WEIGHTS


# --------------------------------------------------------------------------------------------------
# Options, classes and names
# --------------------------------------------------------------------------------------------------


@dataclass
class SampleOptions:
    checkpoint: str | None = None
    steps: int = registry.DEFAULT_STEPS
    sampler: str = registry.DEFAULT_SAMPLER
    eta: float = 0.0
    spacing: str | None = None  # the timesteps of ddim/ddpm and of --sigmas none; default trailing
    num_images: int | None = None  # default: one per class (conditional) or 16
    batch_size: int = 16
    seed: int | None = None
    classes: list[str] = field(default_factory=list)
    guidance: float | None = None  # default: the model file's, else 1.0
    out: str = "samples"
    name: str | None = None  # DEFAULT_NAME, or DEFAULT_EDIT_NAME with init_image
    grid: str | None = None  # a grid PNG of all the images, written only when asked for
    grid_beside_out: bool = False  # interactive use: a grid beside --out (OUT-grid-SEED.png), never inside it
    overwrite: bool = False
    skip_existing: bool = False
    metadata: bool = True
    device: str = "auto"
    threads: int | None = None
    precision: str = "auto"
    clip_x0: bool = True
    sigmas: str | None = "auto"  # auto (the model's tuned sigmas, else edm for ODE samplers), none, karras, edm, tuned
    guidance_interval: str | None = "auto"  # LO,HI in sigma; auto: the tuned entry's interval (if any); none
    from_png: str | None = None  # set when the options were read from this PNG's parameters (in the --json record)
    expect_model_hash: str | None = None  # --from-png: the model hash the PNG records
    force: bool = False  # --from-png: render with a model of another hash
    # editing (diffcli.sampling.edit): image-to-image from init_image, inpainting with a mask as well
    init_image: str | None = None  # a file, or a folder (one image per file in it)
    strength: float | None = None  # edit.DEFAULT_STRENGTH, or edit.MASK_STRENGTH with a mask
    mask: str | None = None  # a file for every init image, or a folder of masks matched by file stem
    resample: int = 1  # RePaint: each step taken this many times
    mask_blur: float = 0.0  # feather the mask inward over about this many pixels
    expect_init_sha256: str | None = None  # --from-png: the recorded hashes of the files it was made from
    expect_mask_sha256: str | None = None
    decoder: str | None = None  # a latent model: decode with this autoencoder file's decoder instead of the embedded one
    # a text-to-image model: --prompt, or --prompts FILE (one a line, num_images each), and CFG's negative prompt
    prompt: str | None = None
    prompts_file: str | None = None
    negative_prompt: str | None = None
    text_encoder: str | None = None  # a CLIP text model: the folder of its frozen text encoder
    prompt_index_base: int = 0  # --from-png: the recorded prompt_index of the image (its line in a --prompts file)


def resolve_classes(tokens: list[str], mf: ModelFile, n: int, editing: bool = False) -> list[int | None]:
    """The class index of each of the n images; `all` (the default for a conditional model) cycles.
    An edit without --class is unconditional (None: the model's null class)."""
    names = mf.class_names
    if not names:
        if tokens:
            raise UsageError("--class was given but this model is unconditional (it has no classes)")
        return [None] * n
    if editing and not tokens:
        return [None] * n
    if not tokens or tokens == ["all"]:
        return [i % len(names) for i in range(n)]
    picked: list[int] = []
    for tok in tokens:
        if tok == "all":
            picked.extend(range(len(names)))
        elif tok in names:
            picked.append(names.index(tok))
        elif tok.removeprefix("-").isdecimal():  # not isdigit: int() refuses "²"
            i = int(tok)
            if not 0 <= i < len(names):
                raise UsageError(f"class {i} is out of range: this model has classes 0..{len(names) - 1}")
            picked.append(i)
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise UsageError(f"unknown class {tok!r}; this model's classes are: {shown}")
    return [picked[i % len(picked)] for i in range(n)]


def check_template(template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"bad --name template {template!r}: {e}") from None
    for _, fld, _, _ in parsed:
        if fld is not None and fld not in NAME_FIELDS:  # bare fields only: {seed.real}, {index[0]} reach into Python objects
            raise UsageError(f"unknown field {{{fld}}} in --name; use {', '.join(sorted(NAME_FIELDS))}")
    if os.path.isabs(template) or template.startswith("~"):
        raise UsageError(f"--name must be a file name inside --out, not an absolute path: {template!r}")


def render_name(template: str, out: Path, fields_: dict[str, Any]) -> Path:
    try:
        name = template.format(**fields_)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"bad --name template {template!r}: {e}") from None
    path = (out / name).resolve()
    if path != out.resolve() and out.resolve() not in path.parents:
        raise UsageError(f"--name {template!r} would write outside the output folder: {name}")
    if not name or name.endswith(("/", os.sep)) or Path(name).name in ("", ".."):
        # "." or "sub/.." would name a folder: the image would replace --out itself, or fail with exit 3
        raise UsageError(f"--name {template!r} gives no file name: {name!r}")
    return out / name


def grid_layout(classes: list[int | None], num_classes: int) -> tuple[list[int | None], int]:
    """Order and column count for the grid: one row per class when the images cycle through all
    classes at least twice (None: an empty cell ending a short row), one row when there is one image
    per class, otherwise a near-square grid in image order."""
    n = len(classes)
    cycling = num_classes and n >= num_classes and all(c == i % num_classes for i, c in enumerate(classes))
    if cycling and n == num_classes:
        return list(range(n)), n
    if cycling:
        cols = math.ceil(n / num_classes)
        order = [r + c * num_classes for r in range(num_classes) for c in range(cols)]
        return [i if i < n else None for i in order], cols  # keep the hole, or later rows shift
    return list(range(n)), math.ceil(math.sqrt(n))


# --------------------------------------------------------------------------------------------------
# Reproduce from a PNG
# --------------------------------------------------------------------------------------------------

_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch dtype -> --precision name


def _recorded_fields() -> tuple:
    """What `sample` records in each PNG ('diffcli' text chunk) and --from-png reads back, as typed
    specs (diffcli.validate); other recorded fields (width, nfe, version, ...) are not needed to redo it."""
    from diffcli.validate import field

    return (
        field("seed", int, min=0, max=2**63 - 2**32 - 1),
        field("steps", int, min=1, max=100_000),
        field("sampler", str, choices=registry.NAMES),
        field("guidance", float, min=0),
        field("model_hash", str, max_len=64),
        field("class", str, max_len=255, default=None),
        field("sigmas", str, choices=("karras", "edm", "tuned"), default=None),
        field("guidance_interval", str, max_len=64, default=None),
        field("spacing", str, choices=("trailing", "leading", "linspace"), default=None),
        field("eta", float, min=0, max=1, default=None),
        field("clip", bool, default=None),
        field("precision", str, choices=("fp32", "bf16", "fp16"), default=None),
        # an edit (diffcli.sampling.edit): the files it was made from, by path and hash, and how
        field("init_image", str, max_len=4096, default=None),
        field("init_sha256", str, max_len=64, default=None),
        field("strength", float, gt=0, max=1, default=None),
        field("mask", str, max_len=4096, default=None),
        field("mask_sha256", str, max_len=64, default=None),
        field("resample", int, min=1, max=edit.MAX_RESAMPLE, default=None),
        field("mask_blur", float, min=0, max=edit.MAX_MASK_BLUR, default=None),
        field("prompt", str, max_len=MAX_PROMPT_CHARS, default=None),
        field("negative_prompt", str, max_len=MAX_PROMPT_CHARS, default=None),
        field("prompt_index", int, min=0, max=10**9, default=None),
    )


def _check_edit_record(rec: dict[str, Any], path: Path) -> None:
    """An edit's record names its files with their hashes: an init image with its hash and strength, a
    mask only beside an init image and with its hash; paths without control characters."""
    def bad(message: str) -> InputError:
        return InputError(f"--from-png: {path}: diffcli.{message}")

    for name, sha in (("init_image", "init_sha256"), ("mask", "mask_sha256")):
        if rec[name] is None:
            continue
        if not rec[name] or any(ord(c) < 32 or ord(c) == 127 for c in rec[name]):
            raise bad(f"{name} must be a file path without control characters")
        if rec[sha] is None or not rec[sha] or not all(c in "0123456789abcdef" for c in rec[sha]):
            raise bad(f"{sha} must be the hexadecimal hash of {name}, found {rec[sha]!r}"[:200])
    if rec["init_image"] is not None and rec["strength"] is None:
        raise bad("strength is missing (the record has an init_image)")
    if rec["mask"] is not None and rec["init_image"] is None:
        raise bad("mask is recorded without an init_image")


def recorded_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters diffcli embedded in a PNG, checked field by field (InputError, exit 4,
    naming what is missing or wrong); fields a version of diffcli did not record are None."""
    from diffcli.files.images import read_png_text
    from diffcli.validate import Invalid, check_record, parse_json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--from-png: no such file: {path}")
    try:
        text = read_png_text(path)  # chunks walked with bounds, pixels never decoded
    except InputError as e:
        raise InputError(f"--from-png: {e}") from None
    raw = text.get("diffcli")
    if raw is None:
        if "parameters" in text:
            raise InputError(f"--from-png: {path} has another tool's generation text ('parameters') but no diffcli "
                             "record; only PNGs written by diffcli sample can be reproduced")
        raise InputError(f"--from-png: {path} has no diffcli generation parameters (written with --no-metadata, "
                         "or not made by diffcli sample)")
    try:
        record = parse_json(raw, "its diffcli record")
        if isinstance(record, dict) and record.get("grid") is True:
            raise InputError(f"--from-png: {path} is a grid; reproduce one of its images (seed + index) instead")
        if isinstance(record, dict):  # null: does not apply (the class of an unconditional image), as if absent
            record = {k: v for k, v in record.items() if v is not None}
        rec = check_record(record, _recorded_fields(), "diffcli", extra=True)
    except Invalid as e:
        raise InputError(f"--from-png: {path}: {e}") from None
    if not all(c in "0123456789abcdef" for c in rec["model_hash"]):
        raise InputError(f"--from-png: {path}: diffcli.model_hash must be hexadecimal, found {rec['model_hash'][:80]!r}")
    _check_edit_record(rec, path)
    return rec


def apply_recorded(opts: SampleOptions, rec: dict[str, Any], given: set[str], png: str) -> SampleOptions:
    """Fill the options the user did not give (`given`: SampleOptions field names) from a PNG's record.
    What decides the pixels (sigmas or spacing, eta, clip, precision) is taken as recorded, so the
    image comes out bit-exact on the same device."""
    values: dict[str, Any] = {
        "seed": rec["seed"], "steps": rec["steps"], "sampler": rec["sampler"], "guidance": rec["guidance"],
        "sigmas": rec["sigmas"] or "none", "num_images": 1,
    }
    if rec["class"] is not None:
        values["classes"] = [rec["class"]]
    if rec["prompt"] is not None and "prompts_file" not in given:
        values["prompt"] = rec["prompt"]
    if rec["negative_prompt"] is not None:
        values["negative_prompt"] = rec["negative_prompt"]
    if rec["prompt_index"] is not None and "prompt" not in given and "prompts_file" not in given:
        opts.prompt_index_base = rec["prompt_index"]
    if rec["sigmas"] is None:
        values["spacing"] = rec["spacing"] or registry.DEFAULT_SPACING
    values["guidance_interval"] = rec["guidance_interval"] or "none"  # as made: no interval unless recorded
    optional = {"eta": rec["eta"], "clip_x0": rec["clip"], "precision": rec["precision"],
                "strength": rec["strength"], "resample": rec["resample"], "mask_blur": rec["mask_blur"]}
    values.update({k: v for k, v in optional.items() if v is not None})
    for k, v in values.items():
        if k not in given:
            setattr(opts, k, v)
    # an edit: the files it was made from, which must still hold what they held (plan checks the
    # hashes), unless given again
    if rec["init_image"] is not None and "init_image" not in given:
        opts.init_image, opts.expect_init_sha256 = rec["init_image"], rec["init_sha256"]
    if rec["mask"] is not None and "mask" not in given:
        opts.mask, opts.expect_mask_sha256 = rec["mask"], rec["mask_sha256"]
    opts.from_png, opts.expect_model_hash = png, rec["model_hash"]
    return opts


def _check_recorded_file(path: str, sha: str, what: str, flag: str, png: str | None) -> None:
    """--from-png: the file an edit was made from must be where the PNG says, with the hash it records."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{png} was made from the {what} {path} (sha256 {sha}...), which is missing; "
                         f"give it with {flag}")
    found = edit.short_sha256(p)
    if found != sha:
        raise InputError(f"{png} was made from the {what} {path} with sha256 {sha}..., but that file now has "
                         f"{found}...; give the original with {flag}")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    mf: ModelFile
    seeds: list[int]
    classes: list[int | None]
    paths: list[Path]
    grid: Path | None
    guidance: float
    base_seed: int
    device: torch.device
    dtype: torch.dtype
    edits: edit.EditFiles | None = None  # --init-image: the images (and masks), decoded and checked
    inputs: list[int] = field(default_factory=list)  # with edits: the input image of each image
    strength: float | None = None
    span: int | None = None  # with edits: the timesteps [0, span) the steps are spread over
    interval: tuple[float, float] | None = None  # guidance only at lo < sigma <= hi
    prompts: prompts.Prompts | None = None  # a text-to-image model: each image's prompt
    prompt_index_base: int = 0  # added to the prompt_index each image records (--from-png)


def _check_edit_options(opts: SampleOptions) -> float | None:
    """The edit options' usage errors (exit 2), before any file is read; the strength to use."""
    if opts.init_image is None:
        for flag, value in (("--mask", opts.mask), ("--strength", opts.strength)):
            if value is not None:
                raise UsageError(f"{flag} needs --init-image")
        if opts.resample != 1 or opts.mask_blur != 0:
            raise UsageError(f"{'--resample' if opts.resample != 1 else '--mask-blur'} needs --init-image and --mask")
        return None
    if opts.strength is not None:
        strength = opts.strength
    else:
        strength = edit.MASK_STRENGTH if opts.mask is not None else edit.DEFAULT_STRENGTH
    edit.check_options(strength, opts.resample, opts.mask_blur, opts.mask is not None)
    if Path(opts.init_image).is_dir():
        if opts.from_png:
            raise UsageError("--from-png redoes one image: give --init-image a file, not a folder")
        if opts.num_images is not None:
            raise UsageError("--num-images does not apply to a folder of init images: each one makes one image")
    return strength


def plan(opts: SampleOptions) -> Plan:
    """Validate everything and decide every output name before any compute or write."""
    if opts.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {opts.steps}")
    if not 0 <= opts.eta <= 1 or math.isnan(opts.eta):
        raise UsageError(f"--eta must be in [0, 1], got {opts.eta}")
    if opts.guidance is not None and (not math.isfinite(opts.guidance) or opts.guidance < 0):
        raise UsageError(f"--guidance must be >= 0, got {opts.guidance}")
    if opts.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.num_images is not None and not 1 <= opts.num_images <= MAX_IMAGES:
        raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES} (split bigger jobs with --seed), "
                         f"got {opts.num_images}")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {opts.threads}")
    if opts.sampler not in all_sampler_names():
        raise UsageError(f"unknown sampler {opts.sampler!r}; choose one of {', '.join(all_sampler_names())}")
    interval = registry.parse_interval(opts.guidance_interval)
    # the usage checks that need no model file now (the model's tuned sigmas are applied once it is read)
    registry.resolve_spacing(registry.resolve_sigmas(opts.sampler, opts.sigmas), opts.spacing)
    if opts.overwrite and opts.skip_existing:
        raise UsageError("--overwrite and --skip-existing exclude each other")
    if opts.seed is not None and not 0 <= opts.seed < 2**63 - 2**32:
        raise UsageError(f"--seed must be in [0, 2^63 - 2^32), got {opts.seed}")
    strength = _check_edit_options(opts)
    editing = strength is not None
    template = opts.name or (DEFAULT_EDIT_NAME if editing else DEFAULT_NAME)
    check_template(template)
    if not editing and "{stem" in template:
        raise UsageError("--name field {stem} (the input image's name) needs --init-image")
    device = resolve_device(opts.device)
    dtype = resolve_precision(opts.precision, device)

    ckpt = Path(opts.checkpoint) if opts.checkpoint else default_checkpoint()
    if opts.checkpoint is None and not ckpt.exists():
        raise InputError(f"no --checkpoint given and the default model {ckpt} is missing")
    mf = load_model(ckpt, device)
    if opts.expect_model_hash and mf.model_hash != opts.expect_model_hash and not opts.force:
        raise InputError(f"{opts.from_png} was made with model hash {opts.expect_model_hash}, but {ckpt} has hash "
                         f"{mf.model_hash}; give the model it was made with (-c), or --force to use this one")
    if mf.latent is None and opts.decoder is not None:
        raise UsageError(f"--decoder applies to latent models; {ckpt} denoises pixels")
    if mf.latent is not None:
        if editing:
            raise UsageError(f"{ckpt} is a latent model: --init-image and --mask work with pixel models only (for now)")
        if opts.decoder is not None:
            swap_decoder(mf, opts.decoder, device)
    if opts.steps > mf.schedule.num_timesteps:
        raise UsageError(f"--steps must be at most the model's {mf.schedule.num_timesteps} timesteps")
    prompts.check_prompt_options(opts, mf, ckpt)
    if "{prompt" in template and not mf.config.text:
        raise UsageError("--name fields {prompt} and {prompt_index} need a text-to-image model")
    prompts.load_text_encoder(mf, opts.text_encoder, ckpt)
    opts.sigmas = registry.resolve_sigmas(opts.sampler, opts.sigmas, opts.steps, mf.tuned, editing)
    opts.spacing = registry.resolve_spacing(opts.sigmas, opts.spacing)
    gi = registry.resolve_interval(interval, mf.schedule, opts.sampler, opts.steps, opts.sigmas, mf.tuned)
    edits, span, inputs = None, None, []
    if editing:
        span = edit.span(strength, mf.schedule, opts.steps)
        if opts.expect_init_sha256 is not None:
            _check_recorded_file(opts.init_image, opts.expect_init_sha256, "init image", "--init-image", opts.from_png)
        if opts.expect_mask_sha256 is not None and opts.mask is not None:
            _check_recorded_file(opts.mask, opts.expect_mask_sha256, "mask", "--mask", opts.from_png)
        cfg = mf.config
        edits = edit.load(opts.init_image, opts.mask, cfg.in_channels, cfg.image_height, cfg.image_width, opts.mask_blur)
    if edits is not None and len(edits.inits) > 1:
        n = len(edits.inits)
        if n > MAX_IMAGES:
            raise UsageError(f"{opts.init_image} holds {n} images, more than the {MAX_IMAGES} one job makes; split it")
        inputs = list(range(n))  # a folder: one image per input
    else:
        n = opts.num_images or (1 if editing else (len(mf.class_names) or 16))
        inputs = [0] * n if editing else []
    wanted = None
    if mf.config.text:  # the images per prompt: -n each (n images in all for an edit)
        wanted = prompts.resolve(opts, mf, n if editing else opts.num_images, editing)
        n = len(wanted.of_image)
        if n > MAX_IMAGES:
            raise UsageError(f"{len(wanted.texts)} prompts x {n // len(wanted.texts)} images is more than the "
                             f"{MAX_IMAGES} one job makes; split the prompts file")
    classes = resolve_classes(opts.classes, mf, n, editing)
    base = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    seeds = [base + i for i in range(n)]  # image i's own seed: `--seed s+i -n 1` reproduces it alone
    guidance = opts.guidance if opts.guidance is not None else float(mf.sampling.get("guidance", 1.0))
    if not mf.class_names and not mf.config.text:
        guidance = 1.0 if opts.guidance is None else guidance
    elif editing and not mf.config.text and all(c is None for c in classes):  # an unconditional edit: nothing to guide towards
        if opts.guidance not in (None, 1.0):
            raise UsageError("--guidance needs --class: an edit without --class is unconditional")
        guidance = 1.0
    out = Path(opts.out)
    paths = []
    for i, (s, c) in enumerate(zip(seeds, classes)):
        cname = mf.class_names[c] if c is not None else "uncond"
        stem = edits.inits[inputs[i]].stem if edits is not None else ""
        k = wanted.of_image[i] if wanted is not None else 0
        text = prompts.name_part(wanted.texts[k]) if wanted is not None else ""
        paths.append(render_name(template, out, {"seed": s, "index": i, "class": cname, "steps": opts.steps,
                                                 "sampler": opts.sampler, "stem": stem, "prompt": text,
                                                 "prompt_index": k + opts.prompt_index_base}))
    if len(set(paths)) != len(paths):
        raise UsageError(f"--name {template!r} gives the same file name to several images; add {{index}} or {{seed}}")
    grid = None
    if opts.grid:
        grid = Path(opts.grid)
        if grid.resolve() in {q.resolve() for q in paths}:
            raise UsageError(f"the grid {grid} would overwrite one of the images")
        if not grid.parent.resolve().is_dir() and grid.parent.resolve() != out.resolve():
            raise UsageError(f"the folder of --grid does not exist: {grid.parent} (create it first)")
    elif opts.grid_beside_out:
        where = out.resolve()
        grid = where.parent / f"{where.name or 'out'}-grid-{base}.png"
    if not opts.overwrite:
        existing = [p for p in paths if p.exists()]
        if opts.grid and grid.exists() and not opts.skip_existing:  # the interactive preview is replaced
            existing.append(grid)
        if existing and not opts.skip_existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputExistsError(f"{existing[0]} exists{more}; pass --overwrite or --skip-existing")
    if gi is not None and (guidance == 1.0 or not (mf.class_names or mf.config.text)):
        if interval != "auto":
            raise UsageError("--guidance-interval needs guidance: a conditional model and --guidance other than 1")
        gi = None
    return Plan(mf, seeds, classes, paths, grid, guidance, base, device, dtype, edits, inputs, strength, span, gi,
                wanted, opts.prompt_index_base)


def swap_decoder(mf: ModelFile, path: str, device: torch.device) -> None:
    """Decode a latent model's samples with another autoencoder file's decoder: one for the same latent
    space (the same latent channels and factor, e.g. a decoder fine-tuned further), at the model's scale."""
    from diffcli.models.autoencoder import LatentDecoder
    from diffcli.files.autoencoder_file import load_autoencoder

    ae = load_autoencoder(path, device)
    want, got = mf.latent.config, ae.config  # type: ignore[union-attr]
    if (got.latent_channels, got.factor, got.out_channels) != (want.latent_channels, want.factor, want.out_channels):
        raise InputError(f"{path} does not fit {mf.path}: it decodes {got.latent_channels}-channel latents at factor "
                         f"{got.factor} to {got.out_channels} channels, the model makes {want.latent_channels}-channel "
                         f"latents at factor {want.factor} for {want.out_channels}-channel images")
    dec = LatentDecoder(got, mf.latent.scaling_factor)  # type: ignore[union-attr]
    dec.load_state_dict(ae.model.decoder_state())
    mf.decoder = dec.to(device).eval()
    mf.decoder_file = ae


def _interval_text(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" at sigma {interval[0]:.3g} to {interval[1]:.3g}"


def first_timestep(opts: SampleOptions, p: Plan) -> float:
    """Where an edit's steps start (the log line): the first timestep the sampler visits."""
    if opts.sigmas:
        return ode.sigma_to_t(p.mf.schedule, registry.visited_sigmas(p.mf.schedule, opts.sampler, opts.steps, opts.spacing,
                                                                      opts.sigmas, p.mf.tuned, p.span)[0])
    return float(p.mf.schedule.timesteps(opts.steps, opts.spacing, p.span)[0])


def edit_parameters(opts: SampleOptions, p: Plan, i: int) -> dict[str, Any]:
    """What an edited image records beside the usual parameters (PNG and --json): its files and how."""
    if p.edits is None:
        return {}
    k = p.inputs[i]
    params: dict[str, Any] = {"init_image": str(p.edits.inits[k]), "init_sha256": p.edits.init_sha256[k],
                              "strength": p.strength}
    if p.edits.masks is not None:
        params.update(mask=str(p.edits.masks[k]), mask_sha256=p.edits.mask_sha256[k], resample=opts.resample,
                      mask_blur=float(opts.mask_blur))
    return params


def prompt_parameters(p: Plan, i: int) -> dict[str, Any]:
    """A text model's image records its prompt, its index in the job, and the negative prompt (PNG and --json)."""
    if p.prompts is None:
        return {}
    k = p.prompts.of_image[i]
    return {"prompt": p.prompts.texts[k], "prompt_index": k + p.prompt_index_base,
            **({"negative_prompt": p.prompts.negative} if p.prompts.negative else {})}


def run(
    opts: SampleOptions,
    progress: Callable[..., None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Sample and write. Yields records (see diffcli.records): one `image` per image as it is written
    (or skipped), a `grid` when one was asked for, and a closing `summary`."""
    p = plan(opts)
    started = time.perf_counter()
    if log:
        how = "given" if opts.seed is not None else "random"
        log(f"model {p.mf.path} ({p.mf.model_hash}); seed {p.base_seed} ({how}); {len(p.seeds)} images, "
            f"{opts.sampler} {opts.steps} steps{' (tuned sigmas)' if opts.sigmas == 'tuned' else ''}, "
            f"guidance {p.guidance:g}{_interval_text(p.interval)}, {p.device.type}")
        if p.edits is not None:
            what = "inpainting" if p.edits.masks is not None else "img2img"
            extra = (f", resample {opts.resample}" if opts.resample > 1 else "") + (
                f", mask blur {opts.mask_blur:g}" if opts.mask_blur > 0 else "")
            inputs = f"{len(p.edits.inits)} input images" if len(p.edits.inits) > 1 else f"input {p.edits.inits[0]}"
            log(f"{what}: strength {p.strength:g}, {opts.steps} steps from t={first_timestep(opts, p):g}{extra}; {inputs}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    mf, cfg = p.mf, p.mf.config
    shape = (cfg.in_channels, cfg.image_height, cfg.image_width)  # a latent model: the latent's shape
    if mf.latent is not None:
        opts.clip_x0 = False  # latents have no [-1, 1] range to clip x0 to
        if log:
            ae = getattr(mf, "decoder_file", None)
            log(f"latent model: {shape[0]}x{shape[1]}x{shape[2]} latents, decoded by "
                + (f"{ae.path} ({ae.hash})" if ae else f"the embedded decoder of {mf.latent.name}")
                + f" to {mf.image_shape[2]}x{mf.image_shape[1]}")
    denoiser = autocast_denoiser(mf.model, p.device, p.dtype)
    null: Any = mf.model.null_class if cfg.num_classes else None
    if p.prompts is not None:
        null = p.prompts.null  # the null caption's token row, or the negative prompt's
        if log:
            for w in p.prompts.warnings:
                log(f"warning: {w}")
    todo = [i for i in range(len(p.seeds)) if not (opts.skip_existing and p.paths[i].exists())]
    total_steps = len(todo) * opts.steps
    done_steps = 0
    pixels: dict[int, torch.Tensor] = {}
    # everything needed to render an image again (`sample --from-png`), beside its seed and class
    common = {
        "steps": opts.steps, "sampler": opts.sampler, "guidance": p.guidance,
        "width": mf.image_shape[2], "height": mf.image_shape[1], "model_hash": mf.model_hash,
        "diffcli_version": __version__, "clip": opts.clip_x0, "precision": _PRECISION[str(p.dtype).removeprefix("torch.")],
        "device": p.device.type,
    }
    if opts.sampler == "ddim":
        common["eta"] = opts.eta
    if opts.sigmas:
        common["sigmas"] = opts.sigmas  # the step schedule, needed to reproduce the image
    else:
        common["spacing"] = opts.spacing  # the timesteps, when they are the schedule's own
    if p.interval is not None:
        common["guidance_interval"] = f"{p.interval[0]!r},{p.interval[1]!r}"  # every digit: --from-png redoes it
    sigmas = registry.sigmas_for(opts.sigmas, opts.sampler, opts.steps, mf.tuned)
    latent_fields: dict[str, Any] = {}
    if mf.latent is not None:  # the --json image record says the model is latent and what decodes it
        swapped = getattr(mf, "decoder_file", None)
        latent_fields = {"autoencoder": {"name": mf.latent.name, "sha256": mf.latent.sha256,
                                         "scaling_factor": mf.latent.scaling_factor,
                                         "decoder": swapped.path if swapped else "embedded"}}
    skipped = 0

    def skip(i: int) -> dict[str, Any]:
        nonlocal skipped
        skipped += 1
        return {"kind": "image", "path": str(p.paths[i]), "index": i, "seed": p.seeds[i], "skipped": True}

    for i in range(len(p.seeds)):
        if i not in todo:
            yield skip(i)
    with torch.inference_mode():
        for start in range(0, len(todo), opts.batch_size):
            idx = todo[start : start + opts.batch_size]
            labels = None
            if p.prompts is not None:
                labels = p.prompts.labels(idx)
            elif null is not None:
                labels = torch.tensor([null if p.classes[i] is None else p.classes[i] for i in idx], dtype=torch.long)
            begin = constraint = init = weight = None  # an edit: where the run begins, what each step keeps
            if p.edits is not None:
                ks = [p.inputs[i] for i in idx]
                init = p.edits.init[ks]  # (B, C, H, W) uint8
                begin = edit.start(init, p.span)
                if p.edits.weight is not None:
                    weight = p.edits.weight[ks]
                    constraint = edit.Inpaint(begin.x0, weight, opts.resample)
            t0 = time.perf_counter()

            def cb(step: int, total: int, _base: int = done_steps, _k: int = len(idx)) -> None:
                if progress:
                    progress(_base + step * _k, total_steps)

            res = sample(
                denoiser, mf.schedule, shape, opts.steps, opts.sampler, seeds=[p.seeds[i] for i in idx],
                labels=labels, null_label=null, guidance=p.guidance, prediction=mf.prediction, eta=opts.eta,
                spacing=opts.spacing, clip_x0=1.0 if opts.clip_x0 else None, device=p.device, callback=cb,
                sigmas=sigmas, start=begin, constraint=constraint, guidance_interval=p.interval,
            )
            done_steps += opts.steps * len(idx)
            seconds = (time.perf_counter() - t0) / len(idx)
            x = res.images if mf.decoder is None else mf.decoder(res.images.to(p.device)).clamp(-1, 1).cpu()
            imgs = to_uint8(x)
            if init is not None:
                imgs = edit.compose(imgs, init, weight)  # outside the mask: the init image's bytes
            for j, i in enumerate(idx):
                c = p.classes[i]
                params = {**common, "seed": p.seeds[i], "class": mf.class_names[c] if c is not None else None,
                          "nfe": res.nfe, **edit_parameters(opts, p, i), **prompt_parameters(p, i)}
                text = generation_text(params) if opts.metadata else None
                try:
                    save_png(p.paths[i], to_pil(imgs[j]), text, overwrite=opts.overwrite)
                except OutputExistsError:
                    if not opts.skip_existing:
                        raise
                    yield skip(i)
                    continue
                pixels[i] = imgs[j]
                yield {"kind": "image", "path": str(p.paths[i]), "index": i, **params, "seconds": round(seconds, 4),
                       "skipped": False, **({"from_png": opts.from_png} if opts.from_png else {}), **latent_fields}
    summary: dict[str, Any] = {"kind": "summary", "images": len(pixels), "skipped": skipped,
                               "seconds": round(time.perf_counter() - started, 3), "out": opts.out}
    if p.grid is not None:
        yield write_grid(p, pixels, opts)
        summary["grid"] = str(p.grid)
    yield summary


def write_grid(p: Plan, pixels: dict[int, torch.Tensor], opts: SampleOptions) -> dict[str, Any]:
    from PIL import Image

    cfg = p.mf.config
    C, H, W = p.mf.image_shape
    cells = []
    for i, path in enumerate(p.paths):
        if i in pixels:
            cells.append(pixels[i])
            continue
        try:  # skipped: an earlier run wrote it
            with Image.open(path) as im:
                im = im.convert("L" if C == 1 else "RGB")
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            cells.append(data.reshape(H, W, C))
        except Exception:
            cells.append(torch.zeros(H, W, C, dtype=torch.uint8))
    order, cols = grid_layout(p.classes, cfg.num_classes)
    if p.prompts is not None and len(p.prompts.texts) > 1 and len(p.prompts.of_image) > len(p.prompts.texts):
        cols = len(p.prompts.of_image) // len(p.prompts.texts)  # a row per prompt
    blank = torch.zeros_like(cells[0])
    grid = make_grid(torch.stack([cells[i] if i is not None else blank for i in order]), ncols=cols)
    img = to_pil(grid)
    scale = max(1, 64 // max(1, min(H, W)))  # small images: cells >= 64 px
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    text = None
    if opts.metadata:
        text = generation_text({"grid": True, "seed": p.base_seed, "steps": opts.steps, "sampler": opts.sampler,
                                "guidance": p.guidance, "model_hash": p.mf.model_hash, "images": len(cells)})
    save_png(p.grid, img, text, overwrite=opts.overwrite or opts.skip_existing or opts.grid_beside_out)
    return {"kind": "grid", "path": str(p.grid), "images": len(cells)}
