"""`diffcli info`, run the way a user would: invoke, check the exit code first, then the output.

Model files are tiny DiTs saved with save_model; the training checkpoint comes from a 3-step
`diffcli train` run. Bad inputs must give one `Error:` line, exit 4, and never run code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffcli.files.checkpoint import save_model
from diffcli.cli import app
from diffcli.info import describe
from diffcli.models.dit import DiT, ModelConfig, preset_config
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent
CLASSES = ["cat", "dog", "fish"]


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


def info_json(path: Path) -> dict:
    result = diffcli("info", path, "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def view_row(out: str, key: str) -> str:
    """The value of the first `  key   value` line of the rich view."""
    match = re.search(rf"^  {re.escape(key)}  +(.*)$", out, re.MULTILINE)
    assert match, (key, out)
    return match.group(1)


def assert_one_error_line(result) -> str:
    """One `Error:` line on stderr; stdout empty, or with --json exactly one `error` record."""
    if result.stdout:
        (record,) = [json.loads(text) for text in result.stdout.splitlines()]
        assert record == {"kind": "error", "message": record["message"], "exit_code": result.exit_code}
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    assert not result.stdout or lines[0] == "Error: " + json.loads(result.stdout)["message"]
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, tuple[Path, DiT]]:
    """cond: 3 classes, 8x8 RGB, linear schedule, v, guidance 2.5 stored, fp16 weights;
    uncond: 1 channel, 8x12, cosine with zero terminal SNR (so v: `sample` refuses epsilon there), a guidance
    stored that does not apply. The training checkpoint below is the epsilon case."""
    folder = tmp_path_factory.mktemp("models")
    cond, uncond = folder / "cond.safetensors", folder / "uncond.safetensors"
    m_cond = make_dit(num_classes=3, seed=1)
    save_model(cond, m_cond, NoiseSchedule("linear", 1000, 2e-4, 0.03), "v", CLASSES,
               training={"steps": 42, "dataset": "toys", "preset": "custom-name"}, sampling={"guidance": 2.5},
               dtype=torch.float16)
    m_uncond = make_dit(in_channels=1, image_width=12, seed=2)
    save_model(uncond, m_uncond, NoiseSchedule("cosine", 500, zero_terminal_snr=True), "v", [],
               sampling={"guidance": 3.0})
    return {"cond": (cond, m_cond), "uncond": (uncond, m_uncond)}


# --------------------------------------------------------------------------------------------------
# Model files
# --------------------------------------------------------------------------------------------------


def test_json_of_a_class_conditional_model(models):
    path, model = models["cond"]
    result = diffcli("info", path, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1 and result.stdout.startswith('{"kind": "model", ')
    d = json.loads(result.stdout)
    assert next(iter(d)) == "kind" and d["kind"] == "model"
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    assert d["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d["model_hash"] == d["sha256"][:10]
    assert d["file_size"] == path.stat().st_size
    assert (d["format"], d["format_version"]) == ("diffcli.model", 1)
    assert d["model_kind"] == "class-conditional"
    assert d["classes"] == CLASSES
    assert d["image_size"] == [8, 8] and d["channels"] == 3
    assert d["weights_dtype"] == "float16"
    assert d["schedule"] == {"kind": "linear", "num_timesteps": 1000, "beta_start": 2e-4, "beta_end": 0.03,
                             "zero_terminal_snr": False}
    assert d["prediction"] == "v"
    assert d["model_config"] == model.config.to_dict()
    assert d["preset"] == "custom"  # width 32 is no preset, and the stored name is not one either
    assert d["sampling_defaults"] == {"sampler": "dpm++2m", "steps": 15, "sigmas": "edm", "spacing": None, "guidance_interval": None,
                                      "guidance": 2.5, "num_images": 3}
    assert d["tuned"] == []
    assert d["training"] == {"steps": 42, "dataset": "toys", "preset": "custom-name"}


def test_json_of_an_unconditional_model(models):
    path, model = models["uncond"]
    d = info_json(path)
    assert d["model_kind"] == "unconditional" and d["classes"] == []
    assert d["image_size"] == [8, 12] and d["channels"] == 1
    assert d["parameters"] == sum(p.numel() for p in model.parameters())
    assert d["weights_dtype"] == "float32"
    assert d["schedule"]["kind"] == "cosine" and d["schedule"]["num_timesteps"] == 500
    assert d["schedule"]["zero_terminal_snr"] is True
    assert d["prediction"] == "v"
    assert d["sampling_defaults"]["guidance"] == 1.0  # what sample uses: guidance needs classes
    assert d["sampling_defaults"]["num_images"] == 16


def test_no_tensor_is_loaded(models, monkeypatch):
    """info reads the header only: the loaders that read tensor data are not called."""
    import safetensors.torch

    import diffcli.files.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was loaded")

    for module, name in ((safetensors.torch, "load"), (safetensors.torch, "load_file"),
                         (diffcli.files.checkpoint, "read"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    path, model = models["cond"]
    assert info_json(path)["parameters"] == sum(p.numel() for p in model.parameters())


def test_preset_from_training_metadata_or_from_the_config(tmp_path):
    named, derived = tmp_path / "named.safetensors", tmp_path / "derived.safetensors"
    cfg = preset_config("DiT-T/8", image_height=16, image_width=16, in_channels=1)
    model = DiT(cfg)
    save_model(named, model, NoiseSchedule("linear", 100), "v", [], training={"preset": "dit-t/8"})
    save_model(derived, model, NoiseSchedule("linear", 100), "v", [])
    assert info_json(named)["preset"] == "DiT-T/8"  # the stored name, spelt as the preset table does
    assert info_json(derived)["preset"] == "DiT-T/8"  # no name stored: matched from the config
    assert describe(derived).parameters == sum(p.numel() for p in model.parameters())


def test_tuned_entries_are_shown_when_present(tmp_path, make_dit):
    path = tmp_path / "tuned.safetensors"
    schedule = NoiseSchedule("linear", 100)
    top = float(schedule.sigmas[-1])
    tuned = [{"sampler": "heun", "steps": 3, "sigmas": [top, top / 4, top / 40, 0.0], "guidance": 1.5, "reference": "ddim:100",
              "distance": {"tuned": 0.01, "edm": 0.02, "karras": 0.03, "none": 0.05}, "seeds": 8, "validation_seeds": 8}]
    save_model(path, make_dit(num_classes=2), schedule, "v", ["a", "b"], sampling={"guidance": 1.5, "tuned": tuned})
    assert info_json(path)["tuned"] == tuned
    result = diffcli("info", path)
    assert result.exit_code == 0, result.output
    assert "heun 3 steps, distance 0.0100 (best fixed: edm 0.0200)" in result.stdout


def test_rich_view(models):
    path, model = models["cond"]
    result = diffcli("info", path)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha in out  # not cut: a pipe gets a wide table
    n = sum(p.numel() for p in model.parameters())
    assert view_row(out, "model kind") == "class-conditional"
    assert view_row(out, "parameters") == f"{n:,}, float16 weights"
    assert view_row(out, "resolution") == "8x8, 3 channels"
    assert view_row(out, "classes") == "3: cat, dog, fish"
    assert view_row(out, "schedule") == "linear, T = 1000, beta 0.0002 to 0.03"
    assert view_row(out, "prediction") == "v"
    assert view_row(out, "sampler") == "dpm++2m, 15 steps, edm sigmas"
    assert view_row(out, "guidance") == "2.5"
    assert view_row(out, "tuned") == "none"
    assert view_row(out, "model hash") == sha[:10]
    assert all(line == line.rstrip() for line in out.splitlines())


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


def test_a_training_checkpoint(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    trained = diffcli("train", data, "--out", run, "--model", "DiT-T/4", "--resolution", "8", "--batch-size", 4,
                      "--steps", 3, "--warmup-steps", 1, "--sample-every", 0, "--checkpoint-every", 100,
                      "--device", "cpu", "--prediction", "epsilon", "--quiet")
    assert trained.exit_code == 0, trained.output
    [ckpt] = (run / "checkpoints").glob("*.safetensors")
    d = info_json(ckpt)
    assert d["kind"] == "checkpoint" and d["format"] == "diffcli.state"
    assert d["training"]["steps"] == 3 and d["training"]["images_seen"] == 12 and d["training"]["batch_size"] == 4
    assert d["preset"] == "DiT-T/4"
    assert d["classes"] == ["blue", "green", "red"] and d["model_kind"] == "class-conditional"
    assert d["image_size"] == [8, 8] and d["channels"] == 3 and d["prediction"] == "epsilon"
    assert d["sampling_defaults"] == {}
    # the network's parameters only: not the EMA copy, not the optimiser moments
    model_file = info_json(run / "model.safetensors")
    assert model_file["kind"] == "model"
    assert d["parameters"] == model_file["parameters"]
    assert d["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()

    result = diffcli("info", ckpt)
    assert result.exit_code == 0, result.output
    assert "training checkpoint (diffcli.state v1" in result.stdout
    assert view_row(result.stdout, "steps") == "3"


# --------------------------------------------------------------------------------------------------
# Bad input: one Error line, exit 4, nothing executed
# --------------------------------------------------------------------------------------------------


class _Marker:
    """Unpickling this would create the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_pickle_is_refused_and_never_run(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = tmp_path / f"x{suffix}"
    path.write_bytes(pickle.dumps(_Marker(str(marker)), protocol=4))
    result = diffcli("info", path)
    assert result.exit_code == 4
    line = assert_one_error_line(result)
    assert str(path) in line and "not safetensors" in line
    assert not marker.exists()
    assert diffcli("info", path, "--json").exit_code == 4 and not marker.exists()


def test_a_torch_save_zip_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(3)}, path)
    result = diffcli("info", path)
    assert result.exit_code == 4
    assert "zip archive" in assert_one_error_line(result)


def _header_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _bad_files(tmp_path: Path, models) -> dict[str, Path]:
    good = models["cond"][0].read_bytes()
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2, 3)}, foreign)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other, metadata={"format": "pt"})
    (tmp_path / "folder").mkdir()
    n = struct.unpack("<Q", good[:8])[0]
    return {
        "missing": tmp_path / "nope.safetensors",
        "directory": tmp_path / "folder",
        "empty": _write(tmp_path / "empty.safetensors", b""),
        "short": _write(tmp_path / "short.safetensors", b"\x01\x02\x03"),
        "random bytes": _write(tmp_path / "random.safetensors", os.urandom(4096)),
        "truncated": _write(tmp_path / "truncated.safetensors", good[: len(good) // 2]),
        "truncated in the header": _write(tmp_path / "cut.safetensors", good[: 8 + n // 2]),
        "header length beyond the file": _header_file(tmp_path / "long.safetensors", b"{}", length=1 << 60),
        "header not JSON": _header_file(tmp_path / "notjson.safetensors", b"\xff\xfe{not json"),
        "header a JSON list": _header_file(tmp_path / "list.safetensors", b"[1, 2, 3]"),
        "no diffcli metadata": foreign,
        "foreign format": other,
        "metadata not strings": _header_file(
            tmp_path / "meta.safetensors", json.dumps({"__metadata__": {"format": ["diffcli.model"]}}).encode()),
        "tensor beyond the data": _header_file(
            tmp_path / "offsets.safetensors",
            json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}).encode(), b"\0" * 16),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", [
    "missing", "directory", "empty", "short", "random bytes", "truncated", "truncated in the header",
    "header length beyond the file", "header not JSON", "header a JSON list", "no diffcli metadata",
    "foreign format", "metadata not strings", "tensor beyond the data",
])
def test_bad_files_exit_4_with_one_line(tmp_path, models, case):
    path = _bad_files(tmp_path, models)[case]
    for args in ([], ["--json"]):
        result = diffcli("info", path, *args)
        assert result.exit_code == 4, (case, result.output)
        line = assert_one_error_line(result)
        assert str(path) in line, line


CFG = ModelConfig(image_height=4, image_width=4, in_channels=1, patch_size=2, hidden_size=8, depth=1, num_heads=2,
                  num_classes=2).to_dict()
SCHEDULE = NoiseSchedule("linear", 10).to_dict()


def _with_metadata(tmp_path: Path, name: str = "edited", edit_tensors: Callable[[dict], object] | None = None,
                   **changes: str | None) -> Path:
    """A copy of a valid model file, tmp_path/NAME.safetensors, with some metadata values replaced
    (None: removed) and its tensor dict edited in place by edit_tensors."""
    model = DiT(ModelConfig(**CFG))
    src = tmp_path / "src.safetensors"
    save_model(src, model, NoiseSchedule("linear", 10), "v", ["a", "b"], sampling={"guidance": 2.0})
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    if edit_tensors is not None:
        edit_tensors(tensors)
    out = tmp_path / f"{name}.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize("changes, words", [
    ({"model_config": "[1, 2]"}, "model_config must be an object, found [1, 2]"),
    ({"model_config": "{not json"}, "has malformed 'model_config' metadata"),
    ({"model_config": None}, "lacks the 'model_config' metadata"),
    ({"model_config": json.dumps({**CFG, "depth": "8"})}, 'model_config.depth must be an integer in [1, 1024], found "8"'),
    ({"model_config": json.dumps({"depth": 2})}, "model_config.image_height is missing"),
    ({"model_config": json.dumps({"depth": 1 << 40, "hidden_size": 6, "num_heads": 4})}, "invalid model metadata"),
    ({"schedule": json.dumps({**SCHEDULE, "kind": "wavy"})}, 'schedule.kind must be one of "linear", '),
    ({"schedule": json.dumps({**SCHEDULE, "num_timesteps": 1e999})},
     "schedule.num_timesteps must be an integer in [2, "),
    ({"class_names": '"a b"'}, 'class_names must be a list of strings, found "a b"'),
    ({"class_names": '["a"]'}, "class_names has 1 names, the model config has 2 classes"),
    ({"prediction": "x0"}, 'prediction must be one of "epsilon", "v", found "x0"'),
    ({"schedule": json.dumps({**SCHEDULE, "zero_terminal_snr": True}), "prediction": "epsilon"},
     "prediction 'epsilon' cannot be sampled with schedule.zero_terminal_snr"),
    ({"sampling": '{"guidance": NaN}'}, "sampling.guidance must be a finite number, found NaN"),
    ({"sampling": '{"guidance": "high"}'}, 'sampling.guidance must be a finite number >= 0, found "high"'),
    ({"sampling": '{"tuned": 3}'}, "sampling.tuned must be a list of objects, found 3"),
    ({"sampling": '{"tuned": [{"steps": [1]}]}'}, "sampling.tuned[0].sampler is missing"),
    ({"sampling": '{"tuned": [{"sampler": "euler_a", "steps": 2}]}'}, 'sampling.tuned[0].sampler must be one of "euler", "heun", "dpm++2m", found "euler_a"'),
    ({"sampling": json.dumps({"tuned": [{"sampler": "euler", "steps": 2, "guidance": 1, "reference": "x", "seeds": 1,
                                          "validation_seeds": 1, "sigmas": [1.0, 2.0, 0.0]}]})},
     "sampling.tuned[0].sigmas: sigmas must be strictly decreasing"),
    ({"training": "7"}, "training must be an object, found 7"),
    ({"image_size": "[9, 9]"}, "image_size is [9, 9], the model config has [4, 4]"),
    ({"model_config": json.dumps({**CFG, "hidden_size": 16})},
     "tensor x_embedder.weight has shape [8, 1, 2, 2], the config needs [16, 1, 2, 2]"),
    ({"model_config": json.dumps({**CFG, "depth": 2})},
     "tensors do not match the model config (tensor blocks.1.attn.qkv.weight is missing)"),
    ({"model_config": json.dumps({**CFG, "depth": 1 << 40})}, "depth must be an integer in [1, 1024]"),
    ({"model_config": json.dumps({**CFG, "hidden_size": 1 << 40, "num_heads": 1})}, "hidden_size must be an integer"),
    ({"format_version": "99"}, "newer than this diffcli's"),
    ({"format_version": "one"}, "malformed format_version"),
])
def test_bad_metadata_exit_4(tmp_path, changes, words):
    path = _with_metadata(tmp_path, **changes)
    result = diffcli("info", path, "--json")
    assert result.exit_code == 4, result.output
    line = assert_one_error_line(result)
    assert words in line and str(path) in line, line


def test_info_and_sample_refuse_a_corrupt_file_with_the_same_message(tmp_path):
    """One validator (checkpoint.py) for both commands: each corrupt file is exit 4 for `info` and for
    `sample`, with the identical message after `Error: `."""
    torch.save({"w": torch.zeros(3)}, tmp_path / "model.pt")
    good = _with_metadata(tmp_path, "good")
    cases = {
        "bad depth": (_with_metadata(tmp_path, "depth", model_config=json.dumps({**CFG, "depth": -3})),
                      "has invalid model metadata: model_config.depth must be an integer in [1, 1024], found -3"),
        "missing tensor": (_with_metadata(tmp_path, "missing", edit_tensors=lambda t: t.pop("final_layer.linear.bias")),
                           "tensors do not match the model config (tensor final_layer.linear.bias is missing)"),
        "reshaped tensor": (
            _with_metadata(tmp_path, "reshaped",
                           edit_tensors=lambda t: t.update({"x_embedder.weight": t["x_embedder.weight"].reshape(8, 4)})),
            "tensor x_embedder.weight has shape [8, 4], the config needs [8, 1, 2, 2]"),
        "truncated": (_write(tmp_path / "truncated.safetensors", good.read_bytes()[:-100]), "is truncated ("),
        "NaN guidance": (_with_metadata(tmp_path, "nan", sampling='{"guidance": NaN}'),
                         "has invalid model metadata: sampling.guidance must be a finite number, found NaN"),
        "a .pt zip": (tmp_path / "model.pt",
                      "holds a zip archive (such as a PyTorch .pt/.ckpt file), not safetensors; diffcli reads only safetensors"),
    }
    for what, (path, words) in cases.items():
        messages = []
        for args in (["info", path], ["sample", "-c", path, "-o", tmp_path / "out"]):
            result = diffcli(*args)
            assert result.exit_code == 4, (what, args[0], result.output)
            messages.append(assert_one_error_line(result).removeprefix("Error: "))
        assert messages[0] == messages[1], what
        assert messages[0].startswith(str(path)) and words in messages[0], (what, messages[0])
    assert not (tmp_path / "out").exists()


def test_a_huge_claimed_resolution_is_refused_as_sample_refuses_it(tmp_path):
    """A 2**40 x 2**40 image claim: the same field check as `sample` refuses it, before anything
    sized by it (a positional table of that size would not fit any memory) is built."""
    side = 1 << 40
    path = _with_metadata(tmp_path, model_config=json.dumps({**CFG, "image_height": side, "image_width": side}),
                          image_size=json.dumps([side, side]))
    for command in (["info", path], ["sample", "-c", path, "-o", tmp_path / "out"]):
        result = diffcli(*command)
        assert result.exit_code == 4, result.output
        assert "image_height" in assert_one_error_line(result)


def test_a_huge_claimed_header_is_not_allocated(tmp_path):
    """The length field says 2**63 bytes: refused from the file size before any read of that size."""
    path = _header_file(tmp_path / "huge.safetensors", b"{}" + b" " * 100, length=(1 << 63) - 1)
    result = diffcli("info", path)
    assert result.exit_code == 4
    assert "truncated" in assert_one_error_line(result)


# --------------------------------------------------------------------------------------------------
# The shipped model
# --------------------------------------------------------------------------------------------------


def test_the_shipped_model(monkeypatch):
    monkeypatch.chdir(REPO)
    d = info_json(Path("weights/diffcli-mnist.safetensors"))
    assert d["kind"] == "model" and d["path"] == "weights/diffcli-mnist.safetensors"
    assert d["classes"] == [str(i) for i in range(10)] and len(d["classes"]) == 10
    assert d["image_size"] == [28, 28] and d["channels"] == 1
    assert d["preset"] == "DiT-M/4" and d["model_kind"] == "class-conditional"
    assert d["sampling_defaults"]["guidance"] == 1.5
