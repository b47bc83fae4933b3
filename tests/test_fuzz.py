"""Fuzzing every reader of files from elsewhere: model files (pixel and latent), training state, the data
cache, tune's reference cache, autoencoder files, the latent cache, autoencoder training state, imported autoencoders (latent-
diffusion single files, diffusers folders), PNG text.

Each test mutates a valid file (tests/fuzzing.py: every metadata field removed, retyped, set to 0,
-1, 2**62, 1e308, NaN, Infinity; tensors dropped, renamed, reshaped, retyped; header entries and
length field corrupted; truncations, random bytes) and runs every mutant through the real reader
in this process. Each must end in an InputError with a one-line message, or in a correct result,
within TIME_LIMIT_S and a peak memory growth of 10x the file's size plus a constant: never another
exception (a traceback), a hang or a large allocation. A few mutants also go through the CLI, in
this process and in a real one: exit code 4 and a single `Error:` line.

The random part is seeded (DIFFCLI_FUZZ_SEED, default 0) and small by default; `make fuzz` sets
DIFFCLI_FUZZ=5000 random mutants per reader and prints how many each test tried.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from itertools import chain
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from diffcli import atomic
from diffcli.models import autoencoder as autoencoder_mod
from diffcli.files import autoencoder_file, checkpoint, convert
from diffcli.data import folder as data_mod
from diffcli.data import latents as latents_mod
from diffcli.models.autoencoder import AE_PRESETS, AutoencoderConfig, AutoencoderKL, LatentDecoder
from diffcli.files.autoencoder_file import load_autoencoder, read_autoencoder_spec, save_autoencoder
from diffcli.files.checkpoint import LatentSpec, load_model, read_schedule, save_model
from diffcli.cli import main
from diffcli.files.convert import import_autoencoder
from diffcli.data.folder import load_folder
from diffcli.errors import InputError, UsageError
from diffcli.files.images import generation_text, read_png_text
from diffcli.info import describe
from diffcli.data.latents import load_or_encode
from diffcli.models.dit import ModelConfig
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training.autoencoder import AE_STATE_FORMAT, AETrainConfig, train_autoencoder
from diffcli.training.autoencoder import _modules as _ae_modules, _resume as _ae_resume
from diffcli.training.rundir import RunDir

from fuzzing import (
    JSON_TOKENS, MEMORY_MEASURED, REMOVE, SEED, VALUES, Mutant, count, header_mutants, leaf_paths, metadata_mutants, pack,
    random_mutants, run_mutant, set_path, split, tensor_mutants,
)

MODEL_JSON = ("model_config", "schedule", "class_names", "training", "sampling", "image_size", "autoencoder")
STATE_JSON = ("model_config", "schedule", "class_names", "train_config")
CACHE_JSON = ("class_names", "files", "skipped")
TINY_TRAIN = ["--model", "DiT-T/4", "--resolution", "8", "--batch-size", "4", "--warmup-steps", "1",
              "--sample-every", "0", "--device", "cpu", "--quiet"]


def report(name: str, tally: Counter, seconds: float) -> None:
    """One line per test, shown by `make fuzz` (pytest -s)."""
    total = sum(tally.values())
    parts = ", ".join(f"{v} {k}" for k, v in sorted(tally.items()))
    memory = "" if MEMORY_MEASURED else "; peak memory NOT measured (/proc/self/clear_refs unavailable)"
    print(f"\nfuzz {name}: {total} mutants ({parts}) in {seconds:.1f} s (seed {SEED}){memory}")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DIFFCLI_DEBUG", raising=False)


# --------------------------------------------------------------------------------------------------
# Model files: load_model (sample), read_schedule (inspect-schedule --checkpoint) and describe (info)
# --------------------------------------------------------------------------------------------------


# the autoencoder of the latent readers: widths 8 and 16 (f = 2), 4 groups; 16x16 RGB <-> 4x8x8
AE_CFG = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)
AE_SCALE = 0.7


def tiny_autoencoder(seed: int = 0) -> AutoencoderKL:
    """Every parameter N(0, 0.05^2) away from its init (seeded), so biases and norms matter too."""
    torch.manual_seed(seed)
    model = AutoencoderKL(AE_CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, make_dit) -> dict[str, Path]:
    """fp32 and fp16 files of a conditional model with learned variance and one long skip (depth 3), and
    a latent one (fp32): the same kind of DiT on AE_CFG's 4x8x8 latents, with the autoencoder's decoder."""
    folder = tmp_path_factory.mktemp("fuzz-models")
    model = make_dit(num_classes=3, learn_sigma=True, long_skip=True, depth=3)
    schedule = NoiseSchedule("cosine", 100)
    top = float(schedule.sigmas[-1])
    tuned = [{"sampler": "dpm++2m", "steps": 3, "sigmas": [top, 5.0, 0.5, 0.0], "guidance": 2.0,  # diffcli tune's entry
              "reference": "dpm++2m:100", "distance": {"tuned": 0.01, "edm": 0.02}, "seeds": 4, "validation_seeds": 4,
              "guidance_interval": [0.3, 6.0], "accuracy": {"full": 90.0, "interval": 89.5}}]
    paths = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        paths[name] = folder / f"{name}.safetensors"
        save_model(paths[name], model, schedule, "v", ["a", "b", "c"],
                   training={"steps": 5, "note": "fuzz"}, sampling={"guidance": 2.0, "tuned": tuned}, dtype=dtype)
    decoder = LatentDecoder(AE_CFG, AE_SCALE)
    decoder.load_state_dict(tiny_autoencoder().decoder_state())
    spec = LatentSpec(AE_CFG, AE_SCALE, "ab" * 32, "ae.safetensors", (16, 16), 3)
    paths["latent"] = folder / "latent.safetensors"
    save_model(paths["latent"], make_dit(num_classes=3, learn_sigma=True, long_skip=True, depth=3, in_channels=4),
               schedule, "v", ["a", "b", "c"], training={"steps": 5, "note": "fuzz"},
               sampling={"guidance": 2.0, "tuned": tuned}, latent=(spec, decoder))
    return paths


def probe(model: torch.nn.Module) -> torch.Tensor:
    c = model.config
    x = torch.randn(2, c.in_channels, c.image_height, c.image_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x, torch.tensor([0.0, 99.0]), torch.tensor([0, 3]))


def probe_decoder(mf) -> torch.Tensor:
    """A latent model's embedded decoder on two latents of the model's size."""
    c = mf.config
    z = torch.randn(2, c.in_channels, c.image_height, c.image_width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return mf.decoder(z)


def model_mutants(data: bytes, rng: random.Random, n_random: int, json_keys: tuple[str, ...] = MODEL_JSON):
    return chain(metadata_mutants(data, json_keys), tensor_mutants(data, rng), header_mutants(data),
                 random_mutants(data, rng, n_random, json_keys))


@pytest.fixture
def shapes_once(monkeypatch):
    """The autoencoder readers size their tensors with autoencoder.tensor_shapes, which builds the
    model on the meta device (~8 ms for AE_CFG, on every read); here each config's shapes (a pure
    function of the config) are built once, so that a mutant read two or three ways, with the valid
    file's config, costs what the header check costs. A config first seen in a mutant is still built
    within that mutant's time and memory bounds."""
    real, cache = autoencoder_mod.tensor_shapes, {}

    def cached(cfg: AutoencoderConfig, prefix: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
        key = (cfg, tuple(prefix))
        if key not in cache:
            cache[key] = real(cfg, prefix)
        return dict(cache[key])

    for module in (checkpoint, autoencoder_file, convert):
        monkeypatch.setattr(module, "tensor_shapes", cached)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "latent"])
def test_model_file_mutants(tmp_path, model_files, dtype, shapes_once):
    """A latent model's file has its `autoencoder` metadata (config, scaling_factor, sha256, name) fuzzed
    field by field, and its decoder tensors (autoencoder.decoder.*) among those mutated; the metadata a
    pixel model reads the same way is left to the fp32 and fp16 files (model_config, image_size and
    channels, which a latent model reads differently, are still removed and retyped)."""
    valid = model_files[dtype]
    data = valid.read_bytes()
    json_keys = ("autoencoder",) if dtype == "latent" else MODEL_JSON
    same = re.compile(r"metadata (format|format_version|diffcli_version|weights_dtype|schedule|prediction|class_names"
                      r"|training|sampling) ")
    ref = load_model(valid)
    ref_out = probe(ref.model)
    ref_decoded = probe_decoder(ref) if ref.decoder is not None else None
    assert (ref.latent is not None) == (dtype == "latent")
    path = tmp_path / "mutant.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in model_mutants(data, random.Random(f"{SEED}-model-{dtype}"), count(25 if dtype == "latent" else 100), json_keys):
        if dtype == "latent" and same.match(m.what):
            continue
        path.write_bytes(m.data)
        loaded = run_mutant(m, lambda: load_model(path))
        schedule = run_mutant(m, lambda: read_schedule(path))
        described = run_mutant(m, lambda: describe(path))
        # info and inspect-schedule read the header alone, with sample's checks and messages: they
        # refuse what it refuses, except a file refused for its tensor data alone (NaN weights, say)
        # and one made a training checkpoint (`info` reads those too, and refuses it as one)
        as_state = loaded.error is not None and "is a 'diffcli.state' file" in str(loaded.error)
        if described.error is not None:
            assert loaded.error is not None, (m.what, str(described.error))
            assert as_state or str(described.error) == str(loaded.error) == str(schedule.error), m.what
        else:
            d = described.result
            assert d.kind == "model" and schedule.error is None, m.what
            assert d.schedule == schedule.result.to_dict() and d.sha256 == hashlib.sha256(m.data).hexdigest(), m.what
            assert loaded.error is None or re.search(r"holds NaN or infinite values|is truncated or corrupt",
                                                     str(loaded.error)), (m.what, str(loaded.error))
        if loaded.error is not None:
            tally["refused"] += 1
            continue
        tally["loaded"] += 1
        mf = loaded.result
        # a correct result: the schedule reads the same all three ways, info describes the model
        # loaded, the model runs, and where the weights are the valid file's, it computes exactly
        # what the valid file's model computes
        assert schedule.error is None and schedule.result == mf.schedule, m.what
        assert d.model_config == mf.config.to_dict() and d.prediction == mf.prediction, m.what
        assert (d.classes, d.training, d.sha256) == (mf.class_names, mf.training, mf.sha256), m.what
        assert d.parameters == sum(p.numel() for p in mf.model.parameters()), m.what
        assert d.sampling_defaults["guidance"] == mf.sampling.get("guidance", 1.0), m.what
        out = probe(mf.model)
        c = mf.config
        assert out.shape == (2, 2 * c.in_channels, c.image_height, c.image_width), m.what
        if not m.data_changed:
            assert mf.config == ref.config and torch.equal(out, ref_out), m.what
        # a latent model: what info says of its autoencoder is what was loaded, and the embedded decoder
        # (built from the metadata's config) turns latents into images of the size the file says
        assert (d.autoencoder is None) == (mf.latent is None) == (mf.decoder is None), m.what
        if mf.latent is not None:
            lat = mf.latent
            assert {k: d.autoencoder[k] for k in ("config", "scaling_factor", "sha256", "name")} == lat.to_dict(), m.what
            assert d.autoencoder["decoder_parameters"] == sum(p.numel() for p in mf.decoder.parameters()), m.what
            assert lat.config.latent_channels == c.in_channels and mf.decoder.scaling_factor == lat.scaling_factor, m.what
            assert lat.image_size == (c.image_height * lat.config.factor, c.image_width * lat.config.factor), m.what
            decoded = probe_decoder(mf)
            assert decoded.shape == (2, lat.channels, *lat.image_size), m.what
            if not m.data_changed and lat.config == ref.latent.config and lat.scaling_factor == ref.latent.scaling_factor:
                assert torch.equal(decoded, ref_decoded), m.what
    report(f"model files ({dtype})", tally, time.perf_counter() - t0)
    assert tally["refused"] > 300 and tally["loaded"] > (10 if dtype == "latent" else 20)  # both outcomes really happen


def refused_model_mutants(data: bytes, every: int, folder: Path) -> list[Mutant]:
    """Every `every`-th systematic mutant that the loader refuses (a spread over the kinds)."""
    out = []
    probe_path = folder / "probe.safetensors"
    for i, m in enumerate(chain(metadata_mutants(data, MODEL_JSON), tensor_mutants(data, random.Random(SEED)),
                                header_mutants(data))):
        if i % every:
            continue
        probe_path.write_bytes(m.data)
        try:
            load_model(probe_path)
        except InputError:
            out.append(m)
    return out


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_model_file_mutants_through_the_cli(tmp_path, model_files, monkeypatch, capsys):
    """Through main(), as `diffcli sample -c MUTANT`, `diffcli inspect-schedule --checkpoint MUTANT` and
    `diffcli info MUTANT`."""
    mutants = refused_model_mutants(model_files["fp32"].read_bytes(), every=40, folder=tmp_path)
    assert len(mutants) >= 15
    path = tmp_path / "mutant.safetensors"
    for m in mutants:
        path.write_bytes(m.data)
        commands = [["sample", "-c", path, "-n", 1, "--steps", 2, "-o", tmp_path / "out"]]
        try:
            read_schedule(path)  # reads the header alone: NaN weights, say, do not stop it
        except InputError:
            commands += [["inspect-schedule", "--checkpoint", path], ["info", path]]
        for args in commands:
            monkeypatch.setattr(sys, "argv", ["diffcli", *map(str, args)])
            with pytest.raises(SystemExit) as info:
                main()
            out, err = capsys.readouterr()
            assert info.value.code == 4, (m.what, err)
            assert str(path) in one_error_line(err) and out == "", m.what
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["sample", "inspect-schedule"])
def test_a_mutant_in_a_real_process(tmp_path, model_files, command):
    p = split(model_files["fp32"].read_bytes())
    cfg = json.loads(p.meta["model_config"])
    p.meta["model_config"] = json.dumps({**cfg, "depth": 10**6})  # would spin building a million blocks
    bad = tmp_path / "deep.safetensors"
    bad.write_bytes(pack(p))
    extra = ["-n", "1", "-o", str(tmp_path / "out")] if command == "sample" else []
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffcli", command, "--checkpoint", str(bad), *extra],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 4, proc.stderr
    line = one_error_line(proc.stderr)
    assert "model_config.depth must be an integer in [1, 1024], found 1000000" in line
    assert time.perf_counter() - t0 < 60


# --------------------------------------------------------------------------------------------------
# Training state (train --resume) and the data cache, from a real one-step run
# --------------------------------------------------------------------------------------------------


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["diffcli", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def one_step_run(tmp_path, toy_image_folder, monkeypatch, capsys) -> tuple[Path, Path]:
    """(data folder, run folder) after `diffcli train` for one step; the folder holds an unreadable file."""
    data = toy_image_folder(per_class=2)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    code, _, err = cli(monkeypatch, capsys, "train", data, "--out", run, *TINY_TRAIN, "--steps", 1)
    assert code == 0, err
    return data, run


def tiny_state(real: Path, path: Path) -> ModelConfig:
    """A training-state file laid out as the real one-step run's (its metadata, its tensor names) for a
    model small enough that each mutant takes milliseconds (a DiT-T/4 state is 14 MB)."""
    p = split(real.read_bytes())
    cfg = ModelConfig(image_height=8, image_width=8, patch_size=4, hidden_size=16, depth=3, num_heads=2,
                      num_classes=3, long_skip=True)
    real_cfg = ModelConfig.from_dict(json.loads(p.meta["model_config"]))
    assert set(checkpoint._state_expected(real_cfg, True)) == {t[0] for t in p.tensors}  # the real layout
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (shape, _) in checkpoint._state_expected(cfg, True).items():
        t = torch.randn(shape, generator=g) * 0.1
        tensors[name] = t.abs() if name.startswith("opt.exp_avg_sq.") else torch.ones(()) if name.startswith("opt.step.") else t
    checkpoint.write(path, tensors, {**{k: v for k, v in p.meta.items() if not k.startswith(("format", "diffcli_version"))},
                                     "model_config": cfg.to_dict()}, checkpoint.STATE_FORMAT)
    return cfg


def test_training_state_mutants(tmp_path, one_step_run):
    _, run = one_step_run
    valid = tmp_path / "state.safetensors"
    cfg = tiny_state(run / "checkpoints" / "step_0000001.safetensors", valid)
    data = valid.read_bytes()
    ref, _ = checkpoint.read_state(valid)
    rng = random.Random(f"{SEED}-state")
    path = tmp_path / "mutant.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in chain(metadata_mutants(data, STATE_JSON), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(60), STATE_JSON)):
        path.write_bytes(m.data)

        def resume():
            tensors, meta = checkpoint.read_state(path)
            checkpoint.check_state_fits(meta, cfg, path)  # what train does before loading the tensors
            return tensors

        out = run_mutant(m, resume)
        described = run_mutant(m, lambda: describe(path))  # `diffcli info`: the same checks, the header alone
        if described.error is not None:
            assert out.error is not None, (m.what, str(described.error))
        else:
            d = described.result
            assert d.kind == "checkpoint" and d.training["steps"] == int(split(m.data).meta.get("step", "0")), m.what
            assert out.error is None or re.search(r"holds (NaN or infinite|negative) values|is truncated or corrupt",
                                                  str(out.error)), (m.what, str(out.error))
        if out.error is not None:
            tally["refused"] += 1
            continue
        tally["loaded"] += 1
        assert set(out.result) == set(ref) or not any(k.startswith("opt.") for k in out.result), m.what
        if not m.data_changed:
            assert all(torch.equal(out.result[k], ref[k]) for k in out.result), m.what
    report("training state", tally, time.perf_counter() - t0)
    assert tally["refused"] > 300 and tally["loaded"] > 10


def test_resume_from_mutants_through_the_cli(tmp_path, one_step_run, monkeypatch, capsys):
    data, run = one_step_run
    valid = run / "checkpoints" / "step_0000001.safetensors"
    p = split(valid.read_bytes())
    def with_meta(**changes: str) -> bytes:
        q = p.copy()
        q.meta.update(changes)
        return pack(q)

    cfg = json.loads(p.meta["model_config"])
    cases = {
        "truncated": (valid.read_bytes()[:-100], "is truncated"),
        "depth retyped": (with_meta(model_config=json.dumps({**cfg, "depth": True})), "model_config.depth must be an integer"),
        "step negative": (with_meta(step="-3"), "step must be an integer"),
        "seconds NaN": (with_meta(seconds="NaN"), "seconds must be a finite number"),
    }
    for what, (content, words) in cases.items():
        bad = tmp_path / f"{what.replace(' ', '-')}.safetensors"
        bad.write_bytes(content)
        code, _, err = cli(monkeypatch, capsys, "train", data, "--out", tmp_path / "again", *TINY_TRAIN,
                           "--steps", 2, "--resume", bad)
        assert code == 4, (what, err)
        assert words in one_error_line(err), what
    # the data folder gained a class since the checkpoint: refused by name, not a traceback
    (data / "yellow").mkdir()
    Image.new("RGB", (8, 8), (200, 200, 0)).save(data / "yellow" / "0.png")
    code, _, err = cli(monkeypatch, capsys, "train", data, "--out", run, *TINY_TRAIN, "--steps", 2)
    assert code == 4, err
    assert "its model has num_classes 3, the data and options now give 4" in one_error_line(err)


def test_data_cache_mutants(tmp_path, one_step_run, monkeypatch):
    data_dir, run = one_step_run
    ref = load_folder(data_dir, (8, 8))
    assert ref.skipped  # the broken file: the cache records it
    valid = run / "data-cache.safetensors"
    assert load_folder(data_dir, (8, 8), cache_path=valid).files == ref.files
    data = valid.read_bytes()
    decoded = []
    real_decode = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda *a: (decoded.append(1), real_decode(*a))[1])
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: None)  # each rebuild rewrites the cache; durability is not tested here
    rng = random.Random(f"{SEED}-cache")
    path = tmp_path / "cache.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    pattern = re.compile(rf"data cache {re.escape(str(path))} is invalid \(.+\), rebuilding")
    for m in chain(metadata_mutants(data, CACHE_JSON), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(60), CACHE_JSON)):
        path.write_bytes(m.data)
        logs: list[str] = []
        decoded.clear()
        out = run_mutant(m, lambda logs=logs: load_folder(data_dir, (8, 8), cache_path=path, log=logs.append))
        assert out.error is None, (m.what, out.error)  # a bad cache is rebuilt, never an error
        s = out.result
        # the correct result: exactly what decoding the folder gives
        assert torch.equal(s.pixels, ref.pixels) and torch.equal(s.labels, ref.labels), m.what
        assert (s.class_names, s.files) == (ref.class_names, ref.files), m.what
        assert [f for f, _ in s.skipped] == [f for f, _ in ref.skipped], m.what  # the reason is free text
        assert len(logs) <= 1 and all(pattern.fullmatch(line) for line in logs), (m.what, logs)
        if decoded:
            tally["rebuilt (logged)" if logs else "rebuilt (stale key)"] += 1
            if not logs:  # quietly only when the cache is for another folder state
                assert m.what.startswith(("metadata key ", "random")), m.what
        else:
            tally["used"] += 1
            assert not logs, m.what
    report("data cache", tally, time.perf_counter() - t0)
    assert tally["rebuilt (logged)"] > 250


def test_tune_reference_cache_mutants(tmp_path):
    """diffcli tune --reference-cache: a mutant is either the cache itself (a change the reader does not
    depend on, such as the file name it records) and gives exactly its images, or it is recomputed after
    one line; never an error, never other images."""
    from diffcli.diffusion import tune

    g = torch.Generator().manual_seed(0)
    images = {"train": torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64),
              "validation": torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)}
    key = "a" * 64
    shapes = {k: tuple(v.shape) for k, v in images.items()}
    valid = tmp_path / "valid.safetensors"
    tune.write_reference_cache(valid, key, images, "ddim:1000", "m.safetensors")
    data = valid.read_bytes()
    assert tune.read_reference_cache(valid, key, shapes, lambda line: None) is not None
    rng = random.Random(f"{SEED}-tuneref")
    path = tmp_path / "cache.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    pattern = re.compile(rf"{re.escape(str(path))} (holds the reference of another .+|is damaged \(.+\)); "
                         "computing (it|the reference) again")
    for m in chain(metadata_mutants(data, ()), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(60))):
        path.write_bytes(m.data)
        logs: list[str] = []
        out = run_mutant(m, lambda logs=logs: tune.read_reference_cache(path, key, shapes, logs.append))
        assert out.error is None, (m.what, out.error)  # a bad cache is recomputed, never an error
        assert len(logs) == 1, (m.what, logs)
        if out.result is None:
            assert pattern.fullmatch(logs[0]), (m.what, logs)
            tally["recomputed (logged)"] += 1
        else:
            assert logs[0] == f"reference read from {path}", m.what
            assert all(torch.equal(out.result[k], images[k]) for k in images), m.what
            tally["used"] += 1
    report("tune reference cache", tally, time.perf_counter() - t0)
    assert tally["recomputed (logged)"] > 100


# --------------------------------------------------------------------------------------------------
# Latent diffusion: autoencoder files, the latent cache, autoencoder training state, imported autoencoders
# --------------------------------------------------------------------------------------------------

AE_JSON = ("autoencoder_config", "training", "source")
AE_STATE_JSON = ("train_config",)


def ae_probe(model: AutoencoderKL) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior mean, its reconstruction) of two 16x16 images."""
    x = torch.rand(2, model.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean = model.encode(x).mean
        return mean, model.decode(mean)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)


@pytest.fixture(scope="module")
def ae_files(tmp_path_factory) -> dict[str, Path]:
    """fp32 and fp16 autoencoder files of AE_CFG, with a scaling factor, a training summary and a source."""
    folder = tmp_path_factory.mktemp("fuzz-autoencoders")
    model = tiny_autoencoder()
    paths = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        paths[name] = folder / f"ae-{name}.safetensors"
        save_autoencoder(paths[name], model, AE_SCALE, training={"steps": 5, "psnr_holdout": 30.5, "final": True},
                         source={"layout": "ldm", "name": "vae.safetensors"}, dtype=dtype)
    return paths


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_autoencoder_file_mutants(tmp_path, ae_files, dtype, shapes_once):
    """load_autoencoder (sample --decoder, train --autoencoder, reconstruct) and read_autoencoder_spec,
    the header-only check `train --autoencoder` makes before any image is decoded: the same refusals
    with the same messages, but for a file refused for its tensor data alone."""
    valid = ae_files[dtype]
    data = valid.read_bytes()
    ref = load_autoencoder(valid)
    ref_out = ae_probe(ref.model)
    ref_state = ref.model.state_dict()
    path = tmp_path / "mutant.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    rng = random.Random(f"{SEED}-autoencoder-{dtype}")
    json_keys = AE_JSON if dtype == "fp32" else ()  # the fields of the JSON metadata: once, in the fp32 file
    for m in chain(metadata_mutants(data, json_keys), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(25 if dtype == "fp32" else 15), json_keys)):
        path.write_bytes(m.data)
        loaded = run_mutant(m, lambda: load_autoencoder(path))
        spec = run_mutant(m, lambda: read_autoencoder_spec(path))
        if spec.error is not None:
            assert loaded.error is not None and str(spec.error) == str(loaded.error), (m.what, str(spec.error))
        else:
            assert loaded.error is None or re.search(r"holds NaN or infinite values|is truncated or corrupt",
                                                     str(loaded.error)), (m.what, str(loaded.error))
        if loaded.error is not None:
            tally["refused"] += 1
            continue
        tally["loaded"] += 1
        f, s = loaded.result, spec.result
        # a correct result: what the header check read, a model of that config holding the file's
        # weights (the valid file's, where its bytes are), and the metadata as the file has it
        meta = split(m.data).meta
        assert (f.config, f.scaling_factor, f.training, f.source) == (s.config, s.scaling_factor, s.training, s.source), m.what
        assert f.scaling_factor is None or (math.isfinite(f.scaling_factor) and f.scaling_factor > 0), m.what
        assert f.scaling_factor == json.loads(meta.get("scaling_factor", "null")), m.what
        assert f.sha256 == hashlib.sha256(m.data).hexdigest() and f.path == str(path), m.what
        assert f.model.config == f.config and not f.model.training, m.what
        mean, rec = ae_probe(f.model)
        assert mean.shape == (2, f.config.latent_channels, 8, 8) and rec.shape == (2, 3, 16, 16), m.what
        if not m.data_changed:
            assert same_weights(f.model.state_dict(), ref_state), m.what
            if f.config == ref.config:
                assert torch.equal(mean, ref_out[0]) and torch.equal(rec, ref_out[1]), m.what
    report(f"autoencoder files ({dtype})", tally, time.perf_counter() - t0)
    assert tally["refused"] > 150 and tally["loaded"] > 20


def test_latent_cache_mutants(tmp_path, ae_files, monkeypatch):
    """load_or_encode with write=False (what DDP's other ranks and a resumed run read): a mutated
    latents.safetensors is refused, naming it (stale, does not fit, malformed), or read as exactly the
    valid cache's latents with the scaling factor its metadata gives; never written, never re-encoded."""
    ae = load_autoencoder(ae_files["fp32"])
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    digest = "cd" * 32
    args = (ae, pixels, digest, True, "16", torch.device("cpu"))
    valid = tmp_path / "valid" / "latents.safetensors"
    valid.parent.mkdir()
    made = load_or_encode(valid, *args, log=lambda _: None, write=True)
    data = valid.read_bytes()
    ref = load_or_encode(valid, *args, log=lambda _: None, write=False)
    assert ref.mean.shape == (6, 4, 8, 8) and torch.equal(ref.mean, made.mean) and ref.scaling_factor == AE_SCALE
    monkeypatch.setattr(latents_mod, "encode_pixels", lambda *a, **k: pytest.fail("encoded with write=False"))
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "latents.safetensors"
    rng = random.Random(f"{SEED}-latents")
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in chain(metadata_mutants(data, ()), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(60))):
        path.write_bytes(m.data)
        logs: list[str] = []
        out = run_mutant(m, lambda logs=logs: load_or_encode(path, *args, log=logs.append, write=False))
        assert [p.name for p in folder.iterdir()] == [path.name] and path.read_bytes() == m.data, m.what  # not written
        if out.error is not None:
            tally["refused"] += 1
            assert str(path) in str(out.error) and not logs, (m.what, str(out.error))
            continue
        tally["read"] += 1
        s = out.result
        assert logs == [f"latents: 6 read from {path}"], (m.what, logs)
        assert s.flipped and s.mean.dtype == s.logvar.dtype == torch.float16, m.what
        assert s.mean.shape == s.logvar.shape == (6, 4, 8, 8), m.what
        assert torch.isfinite(s.mean).all() and torch.isfinite(s.logvar).all(), m.what
        assert math.isfinite(s.scaling_factor) and s.scaling_factor > 0, m.what
        assert s.scaling_factor == float(split(m.data).meta["scaling_factor"]), m.what
        if not m.data_changed:
            assert torch.equal(s.mean, ref.mean) and torch.equal(s.logvar, ref.logvar), m.what
    report("latent cache", tally, time.perf_counter() - t0)
    assert tally["refused"] > 150 and tally["read"] > 5
    path.unlink()  # none at all: only the process that writes it may encode
    gone = run_mutant(Mutant("no cache", b""), lambda: load_or_encode(path, *args, log=print, write=False))
    assert "is missing" in str(gone.error) and not any(folder.iterdir())


@pytest.fixture
def ae_run(tmp_path, toy_image_folder, monkeypatch) -> AETrainConfig:
    """The options of a real 2-step `train-autoencoder` run on 6 16x16 images, of a preset registered for
    the test: one level of width 4, no attention (a state file of 360 tensors and 50 kB, where AE_CFG's
    has 620 and 700 kB; every mutant is read whole, so this halves the test's time); its checkpoint is
    checkpoints/step_0000002.safetensors in cfg.out."""
    monkeypatch.setitem(AE_PRESETS, "fuzz", {"block_out_channels": (4,), "layers_per_block": 1, "norm_num_groups": 2,
                                             "mid_attention": False})
    cfg = AETrainConfig(data_dir=str(toy_image_folder(per_class=2, size=16)), out=str(tmp_path / "ae-run"),
                        preset="fuzz", resolution="16", steps=2, batch_size=2, warmup_steps=1, holdout=1,
                        checkpoint_every=2, sample_every=0, device="cpu")
    result = train_autoencoder(cfg, log=lambda _: None)
    assert result.steps == 2
    return cfg


def test_autoencoder_training_state_mutants(tmp_path, ae_run):
    """_resume (train-autoencoder --resume): InputError for a damaged file, UsageError for one trained with
    other options, each one line naming it; or the modules loaded with what the file holds."""
    valid = Path(ae_run.out) / "checkpoints" / "step_0000002.safetensors"
    data = valid.read_bytes()
    ref = checkpoint.read(valid, AE_STATE_FORMAT, "autoencoder training checkpoint")[0]
    path = tmp_path / "mutant.safetensors"
    cfg = AETrainConfig(**{**ae_run.to_dict(), "resume": str(path)})
    model, ema, opt, disc, opt_d = _ae_modules(cfg, 3, torch.device("cpu"))
    assert disc is None
    params = dict(model.named_parameters())

    def resume():
        opt.state.clear()
        try:
            return _ae_resume(cfg, RunDir(cfg.out), model, ema, opt, disc, opt_d)
        except UsageError as e:  # options that differ from the checkpoint's: exit code 2
            return e

    def negative(name: str) -> Mutant:  # a value AdamW cannot take a step from (sqrt of a negative moment)
        p = split(data)
        t = next(t for t in p.tensors if t[0] == name)
        t[3] = struct.pack("<f", -1.0) + t[3][4:]
        return Mutant(f"tensor {name} with a negative value", pack(p), True)

    crafted = [negative("opt.exp_avg_sq.decoder.conv_in.weight"), negative("opt.step.encoder.conv_out.bias")]
    rng = random.Random(f"{SEED}-ae-state")
    tally: Counter = Counter()
    t0 = time.perf_counter()
    # 8 of train_config's 28 fields, picked by the seed (all of them with DIFFCLI_FUZZ): 15 are options a
    # resumed run may change, not read by _resume, so most of their mutants are whole loads (the slow kind)
    for m in chain(metadata_mutants(data, AE_STATE_JSON, max_fields=8), tensor_mutants(data, rng), header_mutants(data), crafted,
                   random_mutants(data, rng, count(20), AE_STATE_JSON)):
        path.write_bytes(m.data)
        out = run_mutant(m, resume)
        if out.error is not None:
            tally["refused"] += 1
            continue
        if isinstance(out.result, UsageError):
            tally["refused (other options)"] += 1
            message = str(out.result)
            assert message.startswith(f"cannot resume {path.name} with different options"), (m.what, message)
            assert "\n" not in message and len(message) < 1000, (m.what, message[:200])
            continue
        tally["loaded"] += 1
        meta = split(m.data).meta
        where, step, seconds = out.result
        assert where == path and step == int(meta["step"]) and seconds == float(meta.get("seconds", "0")), m.what
        # what was loaded: the file's weights (the valid file's, where its bytes are), and optimizer state
        # AdamW can take a step from: each moment finite, the second moments and the step counts >= 0
        assert all(torch.isfinite(t).all() for t in chain(model.state_dict().values(), ema.state_dict().values())), m.what
        for name, p in params.items():
            st = opt.state.get(p)
            if st:
                assert set(st) == {"step", "exp_avg", "exp_avg_sq"}, (m.what, name)
                assert st["exp_avg"].shape == st["exp_avg_sq"].shape == p.shape and st["step"].shape == (), (m.what, name)
                assert bool((st["exp_avg_sq"] >= 0).all()) and float(st["step"]) >= 0, (m.what, name)
        if not m.data_changed:
            assert same_weights({f"model.{k}": v for k, v in model.state_dict().items()},
                                {k: v for k, v in ref.items() if k.startswith("model.")}), m.what
            assert same_weights({f"ema.{k}": v for k, v in ema.state_dict().items()},
                                {k: v for k, v in ref.items() if k.startswith("ema.")}), m.what
    report("autoencoder training state", tally, time.perf_counter() - t0)
    assert tally["refused"] > 200 and tally["loaded"] > 20 and tally["refused (other options)"] > 0


# Imported autoencoders (diffcli convert-autoencoder): safetensors from other projects, no diffcli metadata


@pytest.fixture(scope="module")
def foreign_autoencoder(tmp_path_factory) -> tuple[AutoencoderKL, Path, Path]:
    """(the model, a latent-diffusion single file of it, a diffusers folder of it)."""
    from test_convert import diffusers_config, ldm_state

    folder = tmp_path_factory.mktemp("fuzz-foreign")
    model = tiny_autoencoder(seed=1)
    ldm = folder / "vae.safetensors"
    save_file(ldm_state(model), ldm, metadata={"format": "pt"})
    hub = folder / "vae"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(diffusers_config(AE_CFG)))
    save_file(model.state_dict(), hub / "diffusion_pytorch_model.safetensors")
    return model, ldm, hub


def check_import(m: Mutant, result, model: AutoencoderKL, weights: Path, layout: str) -> None:
    """A correct import: a model of a config diffcli builds whose weights are the file's (the valid file's,
    where its bytes are), the source recorded as the file is."""
    imported, _, source = result
    assert isinstance(imported.config, AutoencoderConfig) and not imported.training, m.what
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in imported.state_dict().values()), m.what
    assert source["layout"] == layout and source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest(), m.what
    mean, rec = ae_probe(imported)
    assert mean.shape == (2, imported.config.latent_channels, 8, 8) and rec.shape == (2, 3, 16, 16), m.what
    if not m.data_changed:
        assert same_weights(imported.state_dict(), model.state_dict()), m.what


def test_imported_ldm_file_mutants(tmp_path, foreign_autoencoder, shapes_once):
    """import_autoencoder on a latent-diffusion single file: its config comes from the tensors' shapes
    (widths, levels, resnets, attention), so every shape and name is a field of the config too."""
    model, valid, _ = foreign_autoencoder
    data = valid.read_bytes()
    path = tmp_path / "vae.safetensors"
    rng = random.Random(f"{SEED}-import-ldm")
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in chain(metadata_mutants(data, ()), tensor_mutants(data, rng), header_mutants(data),
                   random_mutants(data, rng, count(30))):
        path.write_bytes(m.data)
        out = run_mutant(m, lambda: import_autoencoder(path, norm_num_groups=4))
        if out.error is not None:
            tally["refused"] += 1
            continue
        tally["imported"] += 1
        check_import(m, out.result, model, path, "ldm")
        assert out.result[1] is None and out.result[2]["ignored_tensors"] == 0, m.what
    report("imported latent-diffusion files", tally, time.perf_counter() - t0)
    assert tally["refused"] > 150 and tally["imported"] > 10


def diffusers_config_mutants(text: str, rng: random.Random, n_random: int):
    """config.json: every field (and list item) set to each of VALUES, sizes no autoencoder has, files that
    are no JSON object, and random edits of the JSON text."""
    good = json.loads(text)
    for path in leaf_paths(good):
        for label, value in VALUES:
            yield Mutant(f"config.json {''.join(f'[{k!r}]' for k in path)} {label}",
                         json.dumps(set_path(good, path, value), allow_nan=True).encode())
    n = len(good["block_out_channels"])
    crafted = {
        "widths 2**40": {"block_out_channels": [2**40] * n},
        "widths 2**62, norm_num_groups 2**31": {"block_out_channels": [2**62] * n, "norm_num_groups": 2**31},
        "8 levels": {"block_out_channels": [8] * 8, "down_block_types": ["DownEncoderBlock2D"] * 8,
                     "up_block_types": ["UpDecoderBlock2D"] * 8},
        "10**6 layers per block": {"layers_per_block": 10**6},
        "2**40 latent channels": {"latent_channels": 2**40},
        "the largest config diffcli builds (6 levels of 4096, 16 layers)": {
            "block_out_channels": [4096] * 6, "layers_per_block": 16, "norm_num_groups": 1024, "latent_channels": 64,
            "down_block_types": ["DownEncoderBlock2D"] * 6, "up_block_types": ["UpDecoderBlock2D"] * 6},
        "another class": {"_class_name": "UNet2DConditionModel"},
        "another block type": {"down_block_types": ["AttnDownEncoderBlock2D"] * n},
        "one block type more": {"up_block_types": ["UpDecoderBlock2D"] * (n + 1)},
    }
    for what, change in crafted.items():
        yield Mutant(f"config.json (refused) {what}", json.dumps(good | change).encode())
    for what, content in [("empty", b""), ("not JSON", b"{not json"), ("a list", b"[1, 2]"), ("null", b"null"),
                          ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000), ("bad UTF-8", b'{"a": "\xff"}'),
                          ("a 5000-digit integer", b'{"layers_per_block": ' + b"9" * 5000 + b"}"),
                          ("2 MiB", text.encode() + b" " * 2**21)]:
        yield Mutant(f"config.json (refused) {what}", content)
    yield Mutant("config.json in UTF-16 (JSON as Python reads it: the same config)", text.encode("utf-16"))
    for i in range(n_random):
        pos = rng.randrange(len(text))
        edited = text[:pos] + rng.choice(JSON_TOKENS + ["", ",", "}", "{", '"']) + text[pos + rng.randint(0, 8):]
        yield Mutant(f"config.json random edit {i} at {pos}", edited.encode())


def test_imported_diffusers_folder_mutants(tmp_path, foreign_autoencoder, shapes_once):
    """import_autoencoder on a diffusers folder: its weights file mutated as the other safetensors
    readers', then its config.json. A config is checked before anything is sized from it: widths of
    2**40 are refused by name, and the largest config diffcli builds is refused for its tensors within
    the time and memory bounds."""
    import shutil

    model, _, valid = foreign_autoencoder
    folder = tmp_path / "vae"
    shutil.copytree(valid, folder)
    config, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    data, text = weights.read_bytes(), config.read_text()
    rng = random.Random(f"{SEED}-import-diffusers")
    tally: Counter = Counter()
    t0 = time.perf_counter()
    weight_mutants = chain(tensor_mutants(data, rng), header_mutants(data), random_mutants(data, rng, count(15)))
    for target, mutants in ((weights, weight_mutants), (config, diffusers_config_mutants(text, rng, count(25)))):
        for m in mutants:
            target.write_bytes(m.data)
            out = run_mutant(m, lambda: import_autoencoder(folder), file_size=len(data) + len(m.data))
            assert out.error is not None or "(refused)" not in m.what, m.what
            if out.error is not None:
                assert str(folder) in str(out.error), (m.what, str(out.error))
                tally[f"{target.name} refused"] += 1
                continue
            tally[f"{target.name} imported"] += 1
            check_import(m, out.result, model, weights, "diffusers")
            try:
                d = json.loads(m.data if target is config else text)
            except ValueError:
                raise AssertionError(f"{m.what}: imported from a config.json that is not JSON") from None
            assert out.result[0].config.block_out_channels == tuple(d["block_out_channels"]), m.what
            scale = d.get("scaling_factor")
            assert out.result[1] == (None if scale is None else float(scale)), m.what
        target.write_bytes(data if target is weights else text.encode())  # the valid one back
    report("imported diffusers folders", tally, time.perf_counter() - t0)
    assert tally["config.json refused"] > 150 and tally["config.json imported"] > 10
    assert tally[f"{weights.name} refused"] > 150 and tally[f"{weights.name} imported"] > 5


# --------------------------------------------------------------------------------------------------
# PNG text
# --------------------------------------------------------------------------------------------------


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_text() -> tuple[bytes, dict[str, str]]:
    info = PngImagePlugin.PngInfo()
    text = generation_text({"steps": 5, "sampler": "ddim", "seed": 3, "width": 8, "height": 8})
    for k, v in text.items():
        info.add_text(k, v)
    info.add_text("zipped", "z" * 300, zip=True)
    info.add_itxt("unicode", "größer € 🎲", zip=True)
    buf = Image.new("RGB", (8, 8), (10, 20, 30))
    import io

    out = io.BytesIO()
    buf.save(out, format="PNG", pnginfo=info)
    data = out.getvalue()
    return data, {**text, "zipped": "z" * 300, "unicode": "größer € 🎲"}


def png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def png_mutants(data: bytes, rng: random.Random, n_random: int):
    iend = data.rfind(b"IEND") - 4
    head = data[:iend]
    tail = data[iend:]
    yield Mutant("empty", b"")
    yield Mutant("not a PNG", b"GIF89a" + bytes(100))
    yield Mutant("the signature alone", data[:8])
    for cut in range(8, len(data)):
        yield Mutant(f"truncated at byte {cut}", data[:cut])
    for off, kind, length in png_chunks(data):
        yield Mutant(f"{kind} dropped", data[:off] + data[off + 12 + length :])
        for label, value in (("0", 0), ("+1", length + 1), ("2**31 - 1", 2**31 - 1), ("2**32 - 1", 2**32 - 1)):
            yield Mutant(f"{kind} length {label}", data[:off] + struct.pack(">I", value) + data[off + 4 :])
        crc_at = off + 8 + length
        yield Mutant(f"{kind} CRC flipped", data[:crc_at] + bytes([data[crc_at] ^ 1]) + data[crc_at + 1 :])
    big = 2 * PngImagePlugin.MAX_TEXT_CHUNK
    crafted = {
        "tEXt of 2 MiB": chunk(b"tEXt", b"big\0" + b"a" * big),
        "zTXt bomb (100 MB of zeros)": chunk(b"zTXt", b"bomb\0\0" + zlib.compress(bytes(100_000_000), 9)),
        "iTXt bomb (100 MB of zeros)": chunk(b"iTXt", b"bomb\0\1\0\0\0" + zlib.compress(bytes(100_000_000), 9)),
        "70 zTXt of 1 MiB each": b"".join(
            chunk(b"zTXt", f"k{i}\0".encode() + b"\0" + zlib.compress(b"q" * (PngImagePlugin.MAX_TEXT_CHUNK - 1), 9))
            for i in range(70)),
        "zTXt that is not zlib": chunk(b"zTXt", b"bad\0\0not zlib at all"),
        "zTXt with method 7": chunk(b"zTXt", b"m7\0\7" + zlib.compress(b"x")),
        "iTXt with bad UTF-8": chunk(b"iTXt", b"u\0\0\0\0\0\xff\xfe"),
        "iTXt too short": chunk(b"iTXt", b"u\0"),
        "tEXt without a keyword": chunk(b"tEXt", b"\0value"),
        "tEXt without a separator": chunk(b"tEXt", b"keyword only"),
        "10000 empty tEXt chunks": chunk(b"tEXt", b"k\0") * 10_000,
        "an unknown chunk of 1 MB": chunk(b"zzZz", bytes(1_000_000)),
    }
    for what, extra in crafted.items():
        yield Mutant(what, head + extra + tail)
    yield Mutant("a chunk after IEND", data + chunk(b"tEXt", b"late\0x"))
    for k in range(n_random):
        b = bytearray(data)
        spots = [rng.randrange(8, len(data)) for _ in range(rng.randint(1, 4))]
        for s in spots:
            b[s] = rng.randrange(256)
        yield Mutant(f"random #{k}: bytes {spots} set at random", bytes(b))


def test_png_text_mutants(tmp_path):
    data, expected = png_with_text()
    path = tmp_path / "image.png"
    path.write_bytes(data)
    assert read_png_text(path) == expected
    limit = PngImagePlugin.MAX_TEXT_MEMORY
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in png_mutants(data, random.Random(f"{SEED}-png"), count(150)):
        path.write_bytes(m.data)
        out = run_mutant(m, lambda: read_png_text(path))
        if out.error is not None:
            tally["refused"] += 1
            continue
        tally["read"] += 1
        text = out.result
        assert isinstance(text, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in text.items())
        assert sum(map(len, text.values())) <= limit, m.what
        # what comes back is the valid file's text (a damaged chunk fails its CRC; a chunk whose type
        # was changed is skipped), plus what a crafted chunk added within the limits
        added = {k: v for k, v in text.items() if expected.get(k) != v}
        assert not added or m.what in ("zTXt that is not zlib", "tEXt without a separator", "a chunk after IEND") \
            or m.what.startswith("10000"), (m.what, list(added)[:3])
    report("PNG text", tally, time.perf_counter() - t0)
    assert tally["refused"] > 400 and tally["read"] > 20


def test_png_text_limits_and_errors(tmp_path):
    """Named errors for what a hostile or broken PNG can hold."""
    data, _ = png_with_text()
    iend = data.rfind(b"IEND") - 4
    path = tmp_path / "x.png"
    for content, words in [
        (b"", "is not a PNG file"),
        (data[: len(data) // 2], "is truncated"),
        (data[:iend] + chunk(b"zTXt", b"bomb\0\0" + zlib.compress(bytes(10**8), 9)) + data[iend:], "decompresses to more than"),
        (data[:iend] + chunk(b"tEXt", b"big\0" + b"a" * 2**21) + data[iend:], "more than the 1048576 diffcli reads"),
    ]:
        path.write_bytes(content)
        with pytest.raises(InputError, match=words):
            read_png_text(path)
    with pytest.raises(InputError, match="not found"):
        read_png_text(tmp_path / "nope.png")


# --------------------------------------------------------------------------------------------------
# sample --from-png: the diffcli record inside a PNG
# --------------------------------------------------------------------------------------------------


def test_from_png_record_mutants(tmp_path):
    """Every field of the record removed or set to each VALUES entry, and random edits of its JSON
    text: recorded_parameters returns checked values (types and ranges as sample needs them) or
    refuses with one line; nothing else."""
    from diffcli.diffusion import registry
    from diffcli.sampling.generate import recorded_parameters

    good = {"seed": 7, "steps": 15, "sampler": "dpm++2m", "guidance": 1.5, "model_hash": "2fdb805a99",
            "class": "7", "sigmas": "edm", "clip": True, "precision": "fp32", "width": 28, "nfe": 15}
    path = tmp_path / "in.png"

    def write(record_text: str) -> bytes:
        buf = io.BytesIO()
        info = PngImagePlugin.PngInfo()
        info.add_text("diffcli", record_text)
        Image.new("L", (4, 4), 0).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    mutants = []
    for key in good:
        for what, value in VALUES:
            rec = {k: v for k, v in good.items() if k != key}
            if value is not REMOVE:
                rec[key] = value
            mutants.append(Mutant(f"{key} {what}", write(json.dumps(rec))))
    rng = random.Random(f"{SEED}-from-png")
    text = json.dumps(good)
    for i in range(count(150)):
        pos = rng.randrange(len(text))
        edited = text[:pos] + rng.choice(JSON_TOKENS + ["", ",", "}", "{", '"']) + text[pos + rng.randint(0, 8):]
        mutants.append(Mutant(f"record edit {i}", write(edited)))
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in mutants:
        path.write_bytes(m.data)
        out = run_mutant(m, lambda: recorded_parameters(path))
        if out.error is not None:
            tally["refused"] += 1
            continue
        tally["read"] += 1
        r = out.result
        assert type(r["seed"]) is int and 0 <= r["seed"] < 2**63 - 2**32, m.what
        assert type(r["steps"]) is int and 1 <= r["steps"] <= 100_000, m.what
        assert r["sampler"] in registry.NAMES and r["sigmas"] in (None, "karras", "edm", "tuned"), m.what
        assert isinstance(r["guidance"], float) and math.isfinite(r["guidance"]) and r["guidance"] >= 0, m.what
        assert r["class"] is None or isinstance(r["class"], str), m.what
    report("from-png record", tally, time.perf_counter() - t0)
    assert tally["refused"] > 100 and tally["read"] > 20
