"""clip: a tiny random CLIP text model and a hand-written BPE tokenizer saved as a Hugging Face folder.
The encoder's features are checked against transformers' CLIPTextModel run on token ids written by hand
(both tokenizer layouts, a whole CLIP folder, truncation); then every refusal, by class and by the file
it names; then the weights' identity check, and that nothing is imported or downloaded that should not be."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcli.models.clip import INSTALL_HINT, ClipTextEncoder, check_identity
from diffcli.errors import InputError, UsageError

transformers = pytest.importorskip("transformers")

# The tokenizer: single letters, letters ending a word, and merges that make "cat" and "dog" one token each
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
LETTERS = string.ascii_lowercase
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(LETTERS) + [c + "</w>" for c in LETTERS]
                                    + [a + b for a, b in MERGES])}
BOS, EOS = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"]  # EOS also pads, as in OpenAI's CLIP
# Each word's tokens, written out by hand rather than by running BPE
WORDS = {"a": ["a</w>"], "cat": ["cat</w>"], "dog": ["dog</w>"], "the": ["t", "h", "e</w>"]}
L = 16  # max_position_embeddings: 14 prompt tokens between the start and end tokens
TEXT_CONFIG = {"vocab_size": len(VOCAB), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 37, "max_position_embeddings": L, "bos_token_id": BOS, "eos_token_id": EOS,
               "pad_token_id": EOS}
PROMPTS = ["a cat", "The  DOG the cat", "", "dog " * 14]  # case and spacing; empty; exactly full


def hand_ids(prompt: str, length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (length,) and attention mask (length,) of a prompt, from WORDS, padded with EOS."""
    tokens = [VOCAB[t] for word in prompt.lower().split() for t in WORDS[word]]
    ids = [BOS] + tokens[:length - 2] + [EOS]
    mask = [1] * len(ids) + [0] * (length - len(ids))
    return torch.tensor(ids + [EOS] * (length - len(ids))), torch.tensor(mask)


def reference(model: torch.nn.Module, prompts: list[str], length: int = L) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [hand_ids(p, length) for p in prompts]
    ids, mask = torch.stack([i for i, _ in pairs]), torch.stack([m for _, m in pairs])  # (B, L)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state, mask.bool()


def write_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt by hand, then transformers' own save adds tokenizer.json and its config."""
    (folder / "vocab.json").write_text(json.dumps(VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    transformers.CLIPTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A folder with config.json, model.safetensors, tokenizer.json, vocab.json, merges.txt, and its model."""
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    folder.mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder)
    return folder, model


@pytest.fixture
def copy_folder(clip_folder, tmp_path):
    """A copy of the tiny folder to change, with `remove` files taken out."""
    def make(*remove: str) -> Path:
        folder = tmp_path / "tiny-clip"
        shutil.copytree(clip_folder[0], folder)
        for name in remove:
            (folder / name).unlink()
        return folder
    return make


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------

def test_features_equal_transformers_on_hand_written_tokens(clip_folder):
    folder, model = clip_folder
    encoder = ClipTextEncoder.load(folder)
    warnings: list[str] = []
    features, mask = encoder.encode(PROMPTS, warn=warnings.append)
    expected, expected_mask = reference(model, PROMPTS)
    assert features.shape == (4, L, 32) and features.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)
    assert mask.sum(1).tolist() == [4, 10, 2, 16]
    assert (features - expected).abs().max().item() <= 1e-5
    assert warnings == []  # 14 prompt tokens fill the context exactly
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert encoder.identity == {"kind": "clip", "folder": "tiny-clip", "sha256": sha, "width": 32, "max_length": L}


@pytest.mark.parametrize("remove", [("tokenizer.json",), ("vocab.json", "merges.txt")],
                         ids=["vocab-and-merges", "tokenizer-json"])
def test_either_tokenizer_layout(clip_folder, copy_folder, remove):
    features, mask = ClipTextEncoder.load(copy_folder(*remove)).encode(PROMPTS)
    expected, expected_mask = reference(clip_folder[1], PROMPTS)
    assert torch.equal(mask, expected_mask)
    assert (features - expected).abs().max().item() <= 1e-5


def test_long_prompt_truncated_with_one_warning(clip_folder):
    encoder = ClipTextEncoder.load(clip_folder[0])
    prompts = ["a cat", "cat dog " * 10]  # 20 prompt tokens; 14 fit
    warnings: list[str] = []
    features, mask = encoder.encode(prompts, warn=warnings.append)
    expected, expected_mask = reference(clip_folder[1], prompts)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "prompt 2" in warnings[0] and "20 tokens" in warnings[0] and "first 14" in warnings[0]
    assert torch.equal(mask, expected_mask) and mask[1].all()
    assert (features - expected).abs().max().item() <= 1e-5
    assert torch.equal(encoder.encode(prompts)[0], features)  # without a warn callback: the same, silently


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_weights_named_with_or_without_text_model(clip_folder, copy_folder, prefix):
    """Stable Diffusion's and OpenAI's folders name tensors text_model.*; transformers 5 saves them without,
    a layout transformers 4 cannot read: then the folder is refused, not filled with random weights."""
    folder = copy_folder()
    tensors = {prefix + k.removeprefix("text_model."): v for k, v in load_file(folder / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if not prefix and int(transformers.__version__.split(".")[0]) < 5:
        with pytest.raises(InputError, match="lacks 36 of the text model's tensors"):
            ClipTextEncoder.load(folder)
        return
    features, _ = ClipTextEncoder.load(folder).encode(PROMPTS)
    assert (features - reference(clip_folder[1], PROMPTS)[0]).abs().max().item() <= 1e-5


def test_tokenizer_context_shorter_than_the_model(copy_folder, clip_folder):
    folder = copy_folder()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10}))
    encoder = ClipTextEncoder.load(folder)
    warnings: list[str] = []
    features, mask = encoder.encode(["a cat", "dog " * 9], warn=warnings.append)
    expected, expected_mask = reference(clip_folder[1], ["a cat", "dog " * 9], length=10)
    assert encoder.max_length == 10 and features.shape == (2, 10, 32)
    assert torch.equal(mask, expected_mask) and (features - expected).abs().max().item() <= 1e-5
    assert len(warnings) == 1 and "first 8" in warnings[0]


def test_whole_clip_folder_gives_its_text_half(tmp_path):
    folder = tmp_path / "clip-full"
    config = transformers.CLIPConfig(text_config=TEXT_CONFIG, projection_dim=8,
                                     vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "intermediate_size": 20, "image_size": 8, "patch_size": 4})
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = transformers.CLIPModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "clip"
    features, _ = ClipTextEncoder.load(folder).encode(PROMPTS)
    expected, _ = reference(model.text_model, PROMPTS)
    assert (features - expected).abs().max().item() <= 1e-5


def test_no_prompts(clip_folder):
    features, mask = ClipTextEncoder.load(clip_folder[0]).encode([])
    assert features.shape == (0, L, 32) and mask.shape == (0, L)


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("remove, named", [
    (("config.json",), ["config.json"]),
    (("model.safetensors",), ["model.safetensors"]),
    (("tokenizer.json", "vocab.json", "merges.txt"), ["tokenizer.json", "vocab.json", "merges.txt"]),
    (("tokenizer.json", "merges.txt"), ["merges.txt"]),
    (("config.json", "model.safetensors"), ["config.json", "model.safetensors"]),
])
def test_missing_file_named(copy_folder, remove, named):
    folder = copy_folder(*remove)
    with pytest.raises(InputError) as e:
        ClipTextEncoder.load(folder)
    assert str(folder) in str(e.value)
    assert all(name in str(e.value) for name in named)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ClipTextEncoder.load(tmp_path / "nowhere")


def test_pickle_weights_refused_and_never_unpickled(copy_folder, clip_folder, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")
    monkeypatch.setattr(torch, "load", no_unpickling)
    folder = copy_folder("model.safetensors")
    torch.save(clip_folder[1].state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(InputError, match="pytorch_model.bin but no model.safetensors"):
        ClipTextEncoder.load(folder)
    # beside a safetensors file, the pickle is ignored
    shutil.copy(clip_folder[0] / "model.safetensors", folder)
    features, _ = ClipTextEncoder.load(folder).encode(PROMPTS)
    assert (features - reference(clip_folder[1], PROMPTS)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("config", ['{"model_type": "bert", "hidden_size": 32}', "[1, 2]", "{not json"],
                         ids=["bert", "list", "bad-json"])
def test_config_not_clip(copy_folder, config):
    folder = copy_folder()
    (folder / "config.json").write_text(config)
    with pytest.raises(InputError) as e:
        ClipTextEncoder.load(folder)
    assert str(folder / "config.json") in str(e.value)


def test_weights_lacking_a_tensor_refused(copy_folder):
    """from_pretrained would fill the gap with random numbers and only log a warning."""
    folder = copy_folder()
    tensors = load_file(folder / "model.safetensors")
    name = next(k for k in tensors if k.endswith("encoder.layers.1.mlp.fc2.weight"))
    del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="lacks 1 of the text model's tensors") as e:
        ClipTextEncoder.load(folder)
    assert name in str(e.value)


def test_tokenizer_of_another_model_refused(copy_folder):
    folder = copy_folder()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": len(VOCAB) - 4}))
    model = load_file(folder / "model.safetensors")
    name = next(k for k in model if k.endswith("token_embedding.weight"))
    save_file({**model, name: model[name][:len(VOCAB) - 4].contiguous()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"has {len(VOCAB)} tokens, more than the {len(VOCAB) - 4}"):
        ClipTextEncoder.load(folder)


@pytest.mark.parametrize("name, content", [("model.safetensors", b"\xff" * 100),
                                           ("tokenizer.json", b'{"version": "1.0", "model": {"type": "nope"}}')])
def test_corrupt_file_is_an_input_error(copy_folder, name, content):
    folder = copy_folder("vocab.json", "merges.txt")  # the tokenizer can only come from tokenizer.json
    (folder / name).write_bytes(content)
    with pytest.raises(InputError) as e:
        ClipTextEncoder.load(folder)
    assert str(folder) in str(e.value) and len(str(e.value)) < 400


def test_without_transformers(clip_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UsageError) as e:
        ClipTextEncoder.load(clip_folder[0])
    assert str(e.value) == INSTALL_HINT
    assert "pip install 'diffcli[clip]'" in str(e.value)


# --------------------------------------------------------------------------------------------------
# Identity, imports, network
# --------------------------------------------------------------------------------------------------

def test_check_identity_detects_changed_weights(copy_folder):
    folder = copy_folder()
    before = ClipTextEncoder.load(folder)
    check_identity(before, before.identity)
    tensors = load_file(folder / "model.safetensors")
    tensors[next(k for k in tensors if k.endswith("final_layer_norm.bias"))] += 0.01
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    after = ClipTextEncoder.load(folder)
    with pytest.raises(InputError) as e:
        check_identity(after, before.identity)
    message = str(e.value)
    assert str(folder) in message and before.sha256[:10] in message and after.sha256[:10] in message
    with pytest.raises(InputError, match="none recorded"):
        check_identity(after, {"kind": "clip"})


def test_load_opens_no_connection(clip_folder, monkeypatch):
    attempts: list[object] = []

    def connect(self, address):
        attempts.append(address)
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    ClipTextEncoder.load(clip_folder[0]).encode(["a cat"])
    assert attempts == []


def test_import_is_cheap():
    code = "import sys, diffcli.models.clip; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False"
