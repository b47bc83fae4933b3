"""The JSON Lines every `--json` command prints: one object a line, its `kind` first, and for each
command and kind a fixed set of fields (the README's "JSON output" table is this one, in words).

`emit(command, kind, **fields)` is the one writer: it checks the fields against SCHEMA, so a record
that drifts from the documented shape fails in the tests that print it, not in a user's pipeline.
"""

from __future__ import annotations

import json
import math
import sys
from typing import IO, Any

# command -> kind -> (required fields, optional fields)
_IMAGE_OPTIONAL = (
    "class", "steps", "sampler", "guidance", "spacing", "sigmas", "eta", "width", "height", "model_hash",
    "diffcli_version", "nfe", "seconds", "clip", "precision", "device", "from_png", "guidance_interval",
    # an edited image (--init-image): its files and how they were used
    "init_image", "init_sha256", "strength", "mask", "mask_sha256", "resample", "mask_blur",
    # a latent model: its autoencoder (name, sha256, scaling_factor) and the decoder used
    "autoencoder",
    # a text-to-image model: the image's prompt, its line in --prompts (0 for --prompt), the negative prompt
    "prompt", "prompt_index", "negative_prompt",
)
_PROGRESS = (("task", "completed", "total", "elapsed", "eta"), ("loss", "images_per_second"))
_ERROR = (("message", "exit_code"), ())
_INFO = (
    "path", "file_size", "sha256", "model_hash", "format", "format_version", "diffcli_version", "model_kind", "preset",
    "parameters", "weights_dtype", "image_size", "channels", "classes", "model_config", "schedule", "prediction",
    "sampling_defaults",
)

_TUNED = ("sampler", "steps", "sigmas", "guidance", "reference", "distance", "seeds", "validation_seeds")
_TUNED_OPTIONAL = ("guidance_interval", "accuracy", "interval_distance")

SCHEMA: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "sample": {
        "image": (("path", "index", "seed", "skipped"), _IMAGE_OPTIONAL),
        "grid": (("path", "images"), ()),
        "progress": _PROGRESS,
        "summary": (("images", "skipped", "seconds", "out"), ("grid",)),
        "error": _ERROR,
    },
    "train": {
        "progress": _PROGRESS,
        "summary": (("model_path", "run_dir", "steps", "resumed_from", "final_loss", "seconds", "images_per_second",
                     "stopped_by"), ("best_fid", "best_fid_step")),
        "error": _ERROR,
    },
    "train-autoencoder": {
        "progress": _PROGRESS,
        "summary": (("model_path", "run_dir", "steps", "resumed_from", "final_loss", "psnr", "seconds",
                     "images_per_second", "stopped_by"), ()),
        "error": _ERROR,
    },
    "convert-autoencoder": {
        "result": (("source", "layout", "source_sha256", "ignored_tensors", "config", "scaling_factor", "factor", "tensors",
                    "parameters", "out", "sha256"), ()),
        "error": _ERROR,
    },
    "reconstruct": {
        "image": (("file", "out", "psnr", "ssim", "height", "width"), ()),
        "summary": (("images", "psnr_mean", "psnr_worst", "worst_psnr_file", "ssim_mean", "ssim_worst", "worst_ssim_file",
                     "autoencoder", "autoencoder_hash", "factor", "seconds"), ()),
        "progress": _PROGRESS,
        "error": _ERROR,
    },
    "info": {kind: (_INFO, ("tuned", "training", "autoencoder", "text_encoder")) for kind in ("model", "checkpoint")} | {"error": _ERROR},
    "eval": {
        "result": (("fid", "kid_mean", "kid_std", "precision", "recall", "accuracy", "per_class_accuracy", "features",
                    "n_samples", "n_real", "kid_subsets", "kid_subset_size", "neighbours", "samples", "real",
                    "model_hash", "seed", "classifier_accuracy", "real_cached", "seconds"), ()),
        "progress": _PROGRESS,
        "error": _ERROR,
    },
    "inspect-schedule": {
        "sampling": (("steps", "spacing", "sampler", "sigmas", "nfe", "timesteps", "step_sigmas"), ()),
        "schedule": (("schedule", "terminal_snr_db", "snr_below_0db_from_t"), ()),
        "row": (("schedule", "t", "beta", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar", "snr_db",
                 "sigma"), ()),
        "tuned": (_TUNED, _TUNED_OPTIONAL),
        "error": _ERROR,
    },
    "tune": {
        "result": (("model", "sampler", "steps", "guidance", "reference", "seeds", "validation_seeds", "sigmas",
                    "train_distance", "distance", "best_fixed", "improvement", "start", "better", "stored", "evaluations",
                    "seconds", "stored_before"), ("guidance_interval", "guided_steps", "accuracy", "interval_seconds",
                                                   "interval_distance")),
        "progress": _PROGRESS,
        "error": _ERROR,
    },
}


def check(command: str, record: dict[str, Any]) -> None:
    """Raise ValueError when a record is not one SCHEMA documents for the command."""
    kinds = SCHEMA[command]
    kind = record.get("kind")
    if kind not in kinds:
        raise ValueError(f"{command}: unknown record kind {kind!r}")
    if next(iter(record)) != "kind":
        raise ValueError(f"{command}: 'kind' must be the first field of a {kind} record")
    required, optional = kinds[kind]
    fields = set(record) - {"kind"}
    missing = set(required) - fields
    extra = fields - set(required) - set(optional)
    if missing or extra:
        raise ValueError(f"{command} {kind} record: missing {sorted(missing)}, unexpected {sorted(extra)}")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null (documented per field in the README)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def line(command: str, kind: str, **fields: Any) -> str:
    record = {"kind": kind, **fields}
    check(command, record)
    return json.dumps(_finite(record), allow_nan=False)


def emit(command: str, kind: str, stream: IO[str] | None = None, **fields: Any) -> None:
    """Print one record as a line (stdout unless a stream is given) and flush it."""
    print(line(command, kind, **fields), file=stream or sys.stdout, flush=True)
