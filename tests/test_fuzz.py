"""Fuzzing every reader of files from elsewhere: model files, training state, the data cache, PNG text.

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

from diffcli import atomic, checkpoint, data as data_mod
from diffcli.checkpoint import load_model, read_schedule, save_model
from diffcli.cli import main
from diffcli.data import load_folder
from diffcli.errors import InputError
from diffcli.images import generation_text, read_png_text
from diffcli.info import describe
from diffcli.model import ModelConfig
from diffcli.diffusion.schedule import NoiseSchedule

from fuzzing import (
    JSON_TOKENS, MEMORY_MEASURED, REMOVE, SEED, VALUES, Mutant, count, header_mutants, metadata_mutants, pack, random_mutants, run_mutant, split, tensor_mutants,
)

MODEL_JSON = ("model_config", "schedule", "class_names", "training", "sampling", "image_size")
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


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, make_dit) -> dict[str, Path]:
    """fp32 and fp16 files of a conditional model with learned variance and one long skip (depth 3)."""
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
    return paths


def probe(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x, torch.tensor([0.0, 99.0]), torch.tensor([0, 3]))


def model_mutants(data: bytes, rng: random.Random, n_random: int):
    return chain(metadata_mutants(data, MODEL_JSON), tensor_mutants(data, rng), header_mutants(data),
                 random_mutants(data, rng, n_random, MODEL_JSON))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_model_file_mutants(tmp_path, model_files, dtype):
    valid = model_files[dtype]
    data = valid.read_bytes()
    ref = load_model(valid)
    ref_out = probe(ref.model)
    path = tmp_path / "mutant.safetensors"
    tally: Counter = Counter()
    t0 = time.perf_counter()
    for m in model_mutants(data, random.Random(f"{SEED}-model-{dtype}"), count(100)):
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
        assert out.shape == (2, 6, 8, 8), m.what
        if not m.data_changed:
            assert mf.config == ref.config and torch.equal(out, ref_out), m.what
    report(f"model files ({dtype})", tally, time.perf_counter() - t0)
    assert tally["refused"] > 300 and tally["loaded"] > 20  # both kinds of outcome really happen


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
    from diffcli.generate import recorded_parameters

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
