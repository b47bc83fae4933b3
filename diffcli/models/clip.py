"""A frozen CLIP text encoder from a local Hugging Face folder: prompts -> token features and a mask.

The folder is one the user already has; nothing is downloaded. It holds

    config.json          a CLIPTextConfig (model_type "clip_text_model"), or a whole CLIPConfig ("clip"),
                         whose text half is used and whose vision weights are ignored
    model.safetensors    the weights; a pickle file (pytorch_model.bin) is never loaded
    tokenizer.json       the tokenizer, or vocab.json + merges.txt (CLIP's byte-level BPE)

transformers is an optional extra (pip install 'diffcli[clip]') and is imported only when a folder
is loaded, so importing this module costs nothing without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from diffcli.digest import file_sha256
from diffcli.errors import InputError, UsageError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = "pytorch_model.bin"
# Either layout of the tokenizer will do: the fast tokenizer's single file, or the BPE vocabulary and merges
TOKENIZER_LAYOUTS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
MODEL_TYPES = ("clip_text_model", "clip")
CACHE_ROWS = 2048  # prompts whose features are kept (a real CLIP's row is 77 x 768 floats, 0.2 MB)
INSTALL_HINT = "the CLIP text encoder needs the transformers package: pip install 'diffcli[clip]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return transformers


def _short(text: str, limit: int = 200) -> str:
    """One line of at most `limit` characters: error texts from transformers can be pages long."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def check_folder(folder: Path) -> None:
    """Every file the encoder needs is there and config.json describes a CLIP text model; else InputError."""
    if not folder.is_dir():
        raise InputError(f"CLIP folder {folder} does not exist or is not a folder")
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if not any(all((folder / name).is_file() for name in layout) for layout in TOKENIZER_LAYOUTS):
        # name what is missing of the fuller layout the folder has started, tokenizer.json when it has neither
        bpe = [name for name in TOKENIZER_LAYOUTS[1] if not (folder / name).is_file()]
        missing += bpe if len(bpe) < 2 else ["tokenizer.json (or vocab.json + merges.txt)"]
    if WEIGHTS in missing and (folder / PICKLE_WEIGHTS).is_file():
        raise InputError(f"CLIP folder {folder} has {PICKLE_WEIGHTS} but no {WEIGHTS}: diffcli does not load "
                         "pickle files; convert the weights to safetensors")
    if missing:
        raise InputError(f"CLIP folder {folder} lacks {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{folder / CONFIG} is not readable JSON: {_short(e)}") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in MODEL_TYPES:
        raise InputError(f"{folder / CONFIG} is not a CLIP text model's config (model_type {_short(repr(kind), 60)}, "
                         f"expected {' or '.join(MODEL_TYPES)})")


@contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' warnings and progress bars off while loading; diffcli checks the loading report itself."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


@dataclass
class ClipTextEncoder:
    model: Any                  # transformers.CLIPTextModel, eval mode, float32, gradients off
    tokenizer: Any              # transformers.CLIPTokenizerFast
    folder: Path
    sha256: str                 # of model.safetensors
    width: int                  # hidden size: the features' last dimension
    max_length: int             # context length in tokens, start and end tokens included (77 for CLIP)
    device: torch.device
    _cache: dict[bytes, torch.Tensor] = field(default_factory=dict, repr=False)  # token row -> features (L, width)

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> ClipTextEncoder:
        folder = Path(folder)
        check_folder(folder)
        transformers = _transformers()
        path = str(folder.resolve())  # a path that exists is never taken for a Hub repository id
        with _quiet(transformers):
            try:
                tokenizer = transformers.CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
            except Exception as e:  # noqa: BLE001 (tokenizers reports a malformed file as a bare Exception)
                raise InputError(f"cannot load the CLIP tokenizer in {folder}: {_short(e)}") from None
            try:
                model, report = transformers.CLIPTextModel.from_pretrained(
                    path, local_files_only=True, use_safetensors=True, output_loading_info=True)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
                raise InputError(f"cannot load the CLIP text encoder in {folder}: {_short(e)}") from None
        # from_pretrained initialises absent weights at random and only warns: that would encode noise
        missing = sorted(report["missing_keys"]) + [str(k) for k in report["mismatched_keys"]]
        if missing:
            raise InputError(f"{folder / WEIGHTS} lacks {len(missing)} of the text model's tensors "
                             f"(first: {_short(missing[0], 80)})")
        # a tokenizer from another model would hand out ids past the embedding table
        if len(tokenizer) > model.config.vocab_size:
            raise InputError(f"the tokenizer in {folder} has {len(tokenizer)} tokens, more than the "
                             f"{model.config.vocab_size} of the text model in {CONFIG}: they are not one model's")
        device = torch.device(device)
        model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        # the tokenizer may declare a shorter context than the position table (real CLIP: both 77)
        max_length = min(model.config.max_position_embeddings, tokenizer.model_max_length)
        return cls(model, tokenizer, folder, file_sha256(folder / WEIGHTS), model.config.hidden_size, max_length,
                   device)

    @property
    def identity(self) -> dict[str, Any]:
        """What a model file records about the encoder it was trained with."""
        return {"kind": "clip", "folder": self.folder.name, "sha256": self.sha256, "width": self.width,
                "max_length": self.max_length}

    def encode(self, prompts: list[str], warn: Callable[[str], None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, width) float32 of each prompt padded to L = max_length, and its mask (B, L), True
        on real tokens. A prompt longer than the context keeps its first tokens, with a warning."""
        return self.features(self.tokenize(prompts, warn))

    def tokenize(self, prompts: list[str | None], warn: Callable[[str], None] | None = None) -> torch.Tensor:
        """(B, L) token ids, diffcli.models.text.PAD after each prompt's end token; None (no caption) gives an
        all-PAD row, the denoiser's null caption. A prompt longer than the context keeps its first tokens,
        with a warning."""
        from diffcli.models.text import PAD

        L = self.max_length
        texts = [p for p in prompts if p is not None]
        out = torch.full((len(prompts), L), PAD, dtype=torch.long)
        if not texts:
            return out
        # verbose=False: the tokenizer's own too-long warning is replaced by ours, which says what was kept
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        for i, n in enumerate(counts):
            if n > L - 2 and warn is not None:
                shown = texts[i] if len(texts[i]) <= 40 else texts[i][:37] + "..."
                warn(f"prompt {i + 1} ({shown!r}) is {n} tokens long; the CLIP text encoder kept its first {L - 2} "
                     f"(context {L} with the start and end tokens)")
        batch = self.tokenizer(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        ids = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], PAD))
        out[[i for i, p in enumerate(prompts) if p is not None]] = ids.long()
        return out

    def features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token rows (B, L) from tokenize -> features (B, L, width) float32 and the mask (B, L) of real
        tokens. Rows seen before come from a small cache: sampling asks for the same prompts at every step,
        training for the same captions every epoch."""
        from diffcli.models.text import PAD

        mask = tokens != PAD
        if not len(tokens):
            return torch.zeros(0, tokens.shape[1], self.width, device=tokens.device), mask
        keys = [bytes(r.cpu().numpy().tobytes()) for r in tokens]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            rows = torch.stack([tokens[keys.index(k)] for k in todo]).to(self.device)
            attention = rows != PAD
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            ids = torch.where(attention, rows, torch.full_like(rows, pad_id))
            # CLIP's attention is causal, so a real token's features do not depend on the padding after it; the
            # mask is for whoever reads the features (cross-attention), and passing it changes only pad positions
            with torch.no_grad():
                feats = self.model(input_ids=ids, attention_mask=attention.long()).last_hidden_state.float()
            if len(self._cache) + len(todo) > CACHE_ROWS:
                self._cache.clear()
            self._cache.update({k: feats[i] for i, k in enumerate(todo)})
        features = torch.stack([self._cache[k] for k in keys]).to(tokens.device)
        return features, mask


def check_identity(encoder: ClipTextEncoder, recorded: dict[str, Any]) -> None:
    """InputError unless the encoder's weights are those a model file recorded it was trained with."""
    expected = str(recorded.get("sha256", ""))
    if expected != encoder.sha256:
        raise InputError(f"CLIP folder {encoder.folder} is not the text encoder the model was trained with: its "
                         f"{WEIGHTS} is {encoder.sha256[:10]}, the model file expects {expected[:10] or 'none recorded'}")
