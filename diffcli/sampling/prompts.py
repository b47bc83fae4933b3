"""The prompts of a `sample` job for a text-to-image model: --prompt, --prompts FILE, --negative-prompt -> token rows."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffcli.errors import InputError, UsageError
from diffcli.models.text import PAD

MAX_PROMPT_CHARS = 4096  # per prompt; a longer line in --prompts is refused (the model reads its first words only)
MAX_PROMPTS_FILE = 16 * 1024 * 1024
PROMPT_NAME_CHARS = 60  # {prompt} in --name: the prompt sanitised, at most this long
DEFAULT_PER_PROMPT = 4  # images for a single --prompt without -n (one per line for --prompts)


@dataclass
class Prompts:
    """The prompt texts, which prompt each image has, and the token rows the denoiser is given."""

    texts: list[str]
    of_image: list[int]  # image i -> index into texts
    rows: torch.Tensor  # (P, L) int64, one token row per prompt
    null: torch.Tensor  # (1, L): the negative prompt's row, or the null caption (all PAD)
    negative: str | None = None
    warnings: list[str] = field(default_factory=list)

    def labels(self, images: list[int]) -> torch.Tensor:
        """(B, L) token rows of these images."""
        return self.rows[[self.of_image[i] for i in images]]


def check_prompt_options(opts: Any, mf: Any, ckpt: Path) -> None:
    """The prompt options against the kind of model (usage errors, exit 2)."""
    given = opts.prompt is not None or opts.prompts_file is not None
    if not mf.config.text:
        for flag, value in (("--prompt", opts.prompt), ("--prompts", opts.prompts_file),
                            ("--negative-prompt", opts.negative_prompt), ("--text-encoder", opts.text_encoder)):
            if value is not None:
                what = "a class model: use --class" if mf.class_names else "an unconditional model"
                raise UsageError(f"{flag} applies to text-to-image models; {ckpt} is {what}")
        return
    if opts.classes:
        raise UsageError(f"--class applies to class models; {ckpt} is a text-to-image model: use --prompt")
    if opts.prompt is not None and opts.prompts_file is not None:
        raise UsageError("--prompt and --prompts exclude each other")
    if not given:
        raise UsageError(f"{ckpt} is a text-to-image model: give --prompt TEXT or --prompts FILE "
                         f"(--prompt \"\" samples without a caption)")


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt a line (UTF-8; blank lines skipped). InputError names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts: no such file: {p}")
    if p.stat().st_size > MAX_PROMPTS_FILE:
        raise InputError(f"--prompts: {p} is larger than {MAX_PROMPTS_FILE // 2**20} MiB")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"--prompts: {p} line {line} is not UTF-8 text") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise InputError(f"--prompts: {p} line {n} is longer than {MAX_PROMPT_CHARS} characters")
        out.append(line)
    if not out:
        raise InputError(f"--prompts: {p} holds no prompt (one a line; blank lines are skipped)")
    return out


def resolve(opts: Any, mf: Any, num_images: int | None, editing: bool) -> Prompts:
    """Prompt texts, one per image (num_images per prompt), and their token rows."""
    if opts.prompt is not None:
        if len(opts.prompt) > MAX_PROMPT_CHARS:
            raise UsageError(f"--prompt is longer than {MAX_PROMPT_CHARS} characters")
        texts = [opts.prompt.strip()]
    else:
        texts = read_prompts_file(opts.prompts_file)
        if editing and len(texts) > 1:
            raise UsageError("an edit takes one --prompt (a --prompts file makes images from noise)")
    if opts.negative_prompt is not None and len(opts.negative_prompt) > MAX_PROMPT_CHARS:
        raise UsageError(f"--negative-prompt is longer than {MAX_PROMPT_CHARS} characters")
    per = num_images if num_images is not None else (DEFAULT_PER_PROMPT if opts.prompt is not None else 1)
    warnings: list[str] = []
    rows = token_rows(mf, texts, warnings.append)
    if opts.negative_prompt:
        null = token_rows(mf, [opts.negative_prompt.strip()], warnings.append)
    else:
        null = torch.full((1, mf.config.text_length), PAD, dtype=torch.long)
    of_image = [k for k in range(len(texts)) for _ in range(per)]
    return Prompts(texts, of_image, rows, null, opts.negative_prompt or None, list(dict.fromkeys(warnings)))


def token_rows(mf: Any, texts: list[str], warn: Any) -> torch.Tensor:
    """(P, L) token rows of these prompts for the model's text encoder (an empty prompt: the null caption
    for the builtin encoder)."""
    if mf.text.kind == "builtin":
        return mf.text.vocabulary.rows(texts, mf.config.text_length, warn)
    return mf.model.external_text.tokenize(texts, warn=warn)


def load_text_encoder(mf: Any, folder: str | None, ckpt: Path) -> None:
    """A CLIP text model: attach its frozen encoder from the folder the user gives, which must hold the
    weights the model was trained with."""
    if mf.text is None or mf.text.kind != "clip":
        if folder is not None:
            raise UsageError(f"--text-encoder applies to models trained with a CLIP text encoder; {ckpt} has its own")
        return
    if folder is None:
        raise UsageError(f"{ckpt} reads prompts with the CLIP text encoder {mf.text.folder!r} (model.safetensors "
                         f"sha256 {mf.text.sha256[:12]}...): give its folder with --text-encoder PATH")
    from diffcli.models.clip import ClipTextEncoder, check_identity

    enc = ClipTextEncoder.load(folder)
    check_identity(enc, {"folder": mf.text.folder, "sha256": mf.text.sha256})
    mf.model.external_text = enc


_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


def name_part(prompt: str) -> str:
    """{prompt} in --name: letters and digits, runs of anything else as one '_', at most PROMPT_NAME_CHARS."""
    return _UNSAFE.sub("_", prompt).strip("_")[:PROMPT_NAME_CHARS].rstrip("_") or "empty"
