"""Captions -> token rows -> text features: the word vocabulary and the built-in text encoder of text-to-image models.

A caption becomes a row of `length` token ids padded with PAD (-1); a row of only PAD is the null
caption, which the denoiser replaces by its learned null embedding (classifier-free guidance, Ho &
Salimans 2022). An empty prompt is therefore the null caption: `--prompt ""` samples unconditionally.

The built-in encoder is trained jointly with the denoiser from scratch, so its vocabulary is the
words of the training captions (the most frequent MAX_VOCAB of them; id 0 stands for any other word),
stored in the model file beside the weights: no download and no other file is ever needed.
Shapes: B captions, L tokens per caption, W text width.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffcli.validate import Invalid, describe

PAD = -1  # a padding position in a token row
UNK = 0  # the id of a word outside the vocabulary
MAX_VOCAB = 8192  # words kept from the training captions (plus UNK)
MAX_WORD = 64  # characters; longer runs of letters are cut into pieces of this size
_WORD = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)  # runs of letters/digits, or one punctuation mark


def words(text: str) -> list[str]:
    """A caption's words: NFKC-normalised, lower case, runs of letters and digits and single punctuation marks."""
    out = []
    for w in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        out.extend(w[i : i + MAX_WORD] for i in range(0, len(w), MAX_WORD))
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id. Id 0 is UNK; words[i] has id i + 1."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, captions: Iterable[str | None], max_size: int = MAX_VOCAB) -> "Vocabulary":
        """The max_size most frequent words of the captions (ties in alphabetical order: the same
        captions always give the same vocabulary, so a resumed run rebuilds it exactly)."""
        counts = Counter(w for c in captions if c for w in words(c))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[:max_size]
        return cls(tuple(sorted(ranked)))

    @property
    def size(self) -> int:
        """Rows of the embedding table: the words and UNK."""
        return len(self.words) + 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {w: i + 1 for i, w in enumerate(self.words)})

    def encode(self, text: str, length: int, warn: Callable[[str], None] | None = None) -> list[int]:
        """The caption's token row: ids, then PAD up to `length`. A longer caption is cut to its first
        `length` words (with a warning through `warn`); unknown words become UNK (with a warning)."""
        ws = words(text)
        if len(ws) > length and warn:
            warn(f"prompt {describe(text, 60)} has {len(ws)} words; the model reads the first {length}")
        ws = ws[:length]
        ids = [self._ids.get(w, UNK) for w in ws]  # type: ignore[attr-defined]
        unknown = sorted({w for w, i in zip(ws, ids) if i == UNK})
        if unknown and warn:
            warn(f"words the model never saw in training (read as unknown): {', '.join(unknown[:8])}"
                 + (" ..." if len(unknown) > 8 else ""))
        return ids + [PAD] * (length - len(ids))

    def rows(self, texts: list[str | None], length: int, warn: Callable[[str], None] | None = None) -> torch.Tensor:
        """(B, L) int64 token rows; None gives the null caption (all PAD)."""
        return torch.tensor([self.encode(t, length, warn) if t is not None else [PAD] * length for t in texts],
                            dtype=torch.long).reshape(len(texts), length)

    def to_json(self) -> list[str]:
        return list(self.words)

    @classmethod
    def from_json(cls, value: object, size: int, where: str = "text_encoder.vocabulary") -> "Vocabulary":
        """A model file's vocabulary, checked: `size - 1` distinct words, each a non-empty string of at
        most MAX_WORD characters without whitespace or control characters."""
        if not isinstance(value, list) or len(value) != size - 1:
            raise Invalid(f"{where} must be a list of {size - 1} words (the model's table has {size} rows), "
                          f"found {describe(value)}")
        for w in value:
            if (not isinstance(w, str) or not 0 < len(w) <= MAX_WORD
                    or any(c.isspace() or unicodedata.category(c).startswith("C") for c in w)):
                raise Invalid(f"{where} holds {describe(w)}: words are 1 to {MAX_WORD} printable characters")
        if len(set(value)) != len(value):
            raise Invalid(f"{where} lists a word twice")
        return cls(tuple(value))


# --------------------------------------------------------------------------------------------------
# The built-in text encoder: a small pre-LN transformer over word embeddings
# --------------------------------------------------------------------------------------------------


def key_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at real tokens. A null row attends to its first position, so that attention
    over it stays finite (the denoiser replaces its features by the null embedding anyway)."""
    mask = tokens != PAD
    return mask | ((~mask.any(1, keepdim=True)) & (torch.arange(tokens.shape[1], device=tokens.device) == 0))


class EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, W = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # padding keys masked out
        h = h + self.proj(a.transpose(1, 2).reshape(B, L, W))
        return h + self.mlp(self.norm2(h))  # (B, L, W)


class TextEncoder(nn.Module):
    """Token rows (B, L) -> features (B, L, W) and their key mask (B, L)."""

    def __init__(self, vocab_size: int, length: int, width: int, depth: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width, _weight=torch.empty(vocab_size, width))  # drawn in initialize_weights
        self.position_embedding = nn.Parameter(torch.zeros(length, width))
        self.layers = nn.ModuleList(EncoderLayer(width, text_heads(width)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def initialize_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # as GPT-2 / CLIP's text tower
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = key_mask(tokens)
        L = tokens.shape[1]
        h = self.token_embedding(tokens.clamp(min=0)) + self.position_embedding[:L]  # (B, L, W)
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h), tokens != PAD


def text_heads(width: int) -> int:
    """Attention heads of the built-in encoder: 64-wide heads, at least one."""
    return max(1, width // 64) if width % 64 == 0 else 1


def encoder_shapes(vocab_size: int, length: int, width: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of TextEncoder(...).state_dict(), from the numbers alone."""
    out: dict[str, tuple[int, ...]] = {"position_embedding": (length, width), "token_embedding.weight": (vocab_size, width)}
    for i in range(depth):
        b = f"layers.{i}."
        out |= {b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                b + "qkv.weight": (3 * width, width), b + "qkv.bias": (3 * width,),
                b + "proj.weight": (width, width), b + "proj.bias": (width,),
                b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                b + "mlp.0.weight": (4 * width, width), b + "mlp.0.bias": (4 * width,),
                b + "mlp.2.weight": (width, 4 * width), b + "mlp.2.bias": (width,)}
    return out | {"norm.weight": (width,), "norm.bias": (width,)}


# --------------------------------------------------------------------------------------------------
# What a model file says about its text encoder (metadata "text_encoder")
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSpec:
    """builtin: the vocabulary (the weights are in the file); clip: which frozen encoder folder the model
    was trained with (its name and the SHA-256 of its model.safetensors), which `sample` must be given."""

    kind: str  # "builtin" | "clip"
    vocabulary: Vocabulary | None = None
    folder: str = ""  # clip: the folder's name when the model was trained
    sha256: str = ""  # clip: of the folder's model.safetensors

    def to_dict(self) -> dict:
        if self.kind == "builtin":
            assert self.vocabulary is not None
            return {"kind": "builtin", "vocabulary": self.vocabulary.to_json()}
        return {"kind": "clip", "folder": self.folder, "sha256": self.sha256}

    @classmethod
    def from_meta(cls, value: object, cfg) -> "TextSpec":
        """The `text_encoder` metadata of a model or state file, checked against its model config."""
        if not isinstance(value, dict) or value.get("kind") != cfg.text_encoder:
            raise Invalid(f"text_encoder must be an object with kind {cfg.text_encoder!r} (the model config's), "
                          f"found {describe(value)}")
        if cfg.text_encoder == "builtin":
            if set(value) != {"kind", "vocabulary"}:
                raise Invalid(f"text_encoder has keys {describe(sorted(value))}, expected kind and vocabulary")
            return cls("builtin", Vocabulary.from_json(value["vocabulary"], cfg.text_vocab))
        if set(value) != {"kind", "folder", "sha256"}:
            raise Invalid(f"text_encoder has keys {describe(sorted(value))}, expected kind, folder and sha256")
        folder, sha = value["folder"], value["sha256"]
        if not isinstance(folder, str) or not 0 < len(folder) <= 255 or not folder.isprintable():
            raise Invalid(f"text_encoder.folder must be a printable folder name, found {describe(folder)}")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise Invalid(f"text_encoder.sha256 must be 64 hexadecimal digits, found {describe(sha)}")
        return cls("clip", None, folder, sha)
