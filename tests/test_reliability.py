"""Bad input, bad model files and unwritable outputs, run through the real entry point (`main()`, which
CliRunner bypasses): every one is a single `Error: ...` line on stderr, the documented exit code, and
nothing written.

What tests/test_cli_sample.py, test_cli_train.py, test_data.py and test_checkpoint.py already cover
(most bad values through CliRunner, each kind of bad image and bad model file at the library level)
is not repeated here; this file adds the parser's own errors, the CLI side of bad model files for
both commands that read them, and the output-side failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from diffcli.files.checkpoint import save_model
from diffcli.cli import main
from diffcli.data.folder import load_folder
from diffcli.diffusion.schedule import NoiseSchedule

DIGITS = [str(i) for i in range(10)]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIFFCLI_DEBUG")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="80")
    return env


def diffcli_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffcli", *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def diffcli(monkeypatch, capsys):
    """diffcli(*args) -> (exit code, stdout, stderr), through main() in this process."""
    monkeypatch.delenv("DIFFCLI_DEBUG", raising=False)

    def run(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["diffcli", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        out, err = capsys.readouterr()
        return info.value.code, out, err

    return run


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err and "╭" not in err  # no traceback, no boxed usage panel
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_dit) -> dict[str, Path]:
    """ten: 10 classes named 0..9; uncond: no classes."""
    folder = tmp_path_factory.mktemp("models")
    paths = {"ten": folder / "ten.safetensors", "uncond": folder / "uncond.safetensors"}
    save_model(paths["ten"], make_dit(num_classes=10, seed=1), NoiseSchedule("linear", 1000), "v", DIGITS,
               sampling={"guidance": 2.0})
    save_model(paths["uncond"], make_dit(seed=2), NoiseSchedule("cosine", 1000), "v", [])
    return paths


# --------------------------------------------------------------------------------------------------
# The parser's own errors: one line, exit 2, like diffcli's
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["sample", "--steps", "abc"], "Invalid value for '--steps'"),
        (["sample", "--eta", "half"], "Invalid value for '--eta'"),
        (["sample", "--bogus"], "No such option: --bogus"),
        (["sample", "--num-images"], "requires an argument"),
        (["train"], "Missing argument"),
        (["train", "data", "--steps", "abc"], "Invalid value for '--steps'"),
        (["train", "data", "--lr", "fast"], "Invalid value for '--lr'"),
        (["inspect-schedule", "--timesteps", "1.5"], "Invalid value for '--timesteps'"),
        (["paint"], "No such command 'paint'"),
    ],
)
def test_parser_errors_are_one_line_exit_2_and_write_nothing(tmp_path, args, words):
    result = diffcli_process(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert words in line
    assert line.endswith("--help')")  # points at the command's help
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []  # no samples/ or runs/ folder


def test_help_and_version_still_work(tmp_path):
    result = diffcli_process("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage: diffcli" in result.stdout and "sample" in result.stdout and "train" in result.stdout
    result = diffcli_process("sample", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--skip-existing" in result.stdout
    result = diffcli_process("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("diffcli ")
    # no arguments: the help on stdout, and click's exit code for a missing command
    result = diffcli_process(cwd=tmp_path)
    assert result.returncode == 2 and "Usage: diffcli" in result.stdout and "Error" not in result.stderr


def test_a_range_error_in_a_real_process(tmp_path, models):
    result = diffcli_process("sample", "-c", models["ten"], "--class", "12", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "class 12 is out of range: this model has classes 0..9" in one_error_line(result.stderr)
    assert result.stdout == "" and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Values out of range: exit 2, one line, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, args, words",
    [
        ("ten", ["--steps", "0"], "--steps must be >= 1"),
        ("ten", ["--steps", "-5"], "--steps must be >= 1"),
        ("ten", ["--steps", "5000"], "at most the model's 1000"),
        ("ten", ["--eta", "2"], "--eta must be in [0, 1]"),
        ("ten", ["--eta", "nan"], "--eta"),
        ("ten", ["--guidance", "-1"], "--guidance must be >= 0"),
        ("ten", ["--guidance", "inf"], "--guidance"),
        ("ten", ["--batch-size", "0"], "--batch-size must be >= 1"),
        ("ten", ["-n", "-3"], "--num-images"),
        ("ten", ["-n", "100000000000"], "--num-images must be between 1 and"),
        ("ten", ["--seed", "-1"], "--seed"),
        ("ten", ["--class", "12"], "class 12 is out of range"),
        ("ten", ["--class", "²"], "unknown class '²'"),  # a digit to isdigit(), not to int()
        ("ten", ["--class", "--1"], "unknown class '--1'"),
        ("ten", ["--class", "zebra"], "unknown class 'zebra'; this model's classes are: 0, 1, 2"),
        ("uncond", ["--class", "3"], "unconditional"),
    ],
)
def test_sample_values_out_of_range(diffcli, tmp_path, models, model, args, words):
    out = tmp_path / "out"
    code, stdout, err = diffcli("sample", "-c", models[model], "--seed", 0, "-n", 2, "-o", out, *args)
    assert code == 2, err
    assert words in one_error_line(err)
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--resolution", "0"], "--resolution"),
        (["--resolution", "33", "--model", "DiT-T/2"], "not a multiple of the patch size 2"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--steps", "-5"], "--steps"),
        (["--steps", "abc"], "Invalid value for '--steps'"),
        (["--ema-decay", "1"], "--ema-decay"),
    ],
)
def test_train_values_out_of_range(diffcli, tmp_path, toy_image_folder, args, words):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    code, stdout, err = diffcli("train", data, "--out", run, "--model", "DiT-T/4", "--resolution", "8",
                                "--device", "cpu", *args)
    assert code == 2, err
    assert words in one_error_line(err)
    assert stdout == "" and not run.exists()


# --------------------------------------------------------------------------------------------------
# Data folders (the other cases are in test_cli_train.py)
# --------------------------------------------------------------------------------------------------


def test_data_path_that_is_a_file_or_holds_no_images_exits_4(diffcli, tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    (tmp_path / "docs" / "table.csv").write_text("1,2")
    for data, words in ((tmp_path / "file.png", "not a folder"), (tmp_path / "docs", "no images found")):
        code, stdout, err = diffcli("train", data, "--out", tmp_path / "run", "--model", "DiT-T/4",
                                    "--resolution", "8", "--device", "cpu")
        assert code == 4, err
        assert words in one_error_line(err) and str(data) in err
        assert stdout == "" and not (tmp_path / "run").exists()


def test_a_huge_image_decodes(tmp_path):
    """5000 x 3000 (15 M pixels) is below the 80 M pixel limit: decoded, resized and center-cropped."""
    im = Image.new("RGB", (5000, 3000), (255, 0, 0))
    im.paste((0, 0, 255), (2500, 0, 5000, 3000))  # right half blue
    im.save(tmp_path / "big.png")
    s = load_folder(tmp_path, (8, 8))
    assert s.skipped == [] and s.pixels.shape == (1, 3, 8, 8)
    # scaled to 13 x 8, then columns 2..10 kept: red on the left, blue on the right
    assert s.pixels[0, :, 4, 0].tolist() == [255, 0, 0]
    assert s.pixels[0, :, 4, 7].tolist() == [0, 0, 255]


# --------------------------------------------------------------------------------------------------
# Bad model files: exit 4 from both commands that read one
# --------------------------------------------------------------------------------------------------


def _meta_and_tensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes: str) -> None:
    meta, tensors = _meta_and_tensors(src)
    meta = {k: v for k, v in {**meta, **changes}.items() if k not in drop}
    save_file(tensors, dst, metadata=meta)


def _wider(src: Path, dst: Path) -> None:
    meta, _ = _meta_and_tensors(src)
    cfg = json.loads(meta["model_config"])
    _rewrite(src, dst, model_config=json.dumps({**cfg, "hidden_size": 64}))


BAD_FILES = {
    "missing": (lambda src, dst: None, "not found"),
    "folder": (lambda src, dst: dst.mkdir(), "not a file"),
    "empty": (lambda src, dst: dst.write_bytes(b""), "not a diffcli model file"),
    "not-safetensors": (lambda src, dst: dst.write_bytes(b"PK\x03\x04 a zip file, say" + bytes(500)),
                        "holds a zip archive (such as a PyTorch .pt/.ckpt file), not safetensors"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3]), "truncated"),
    "foreign": (lambda src, dst: save_file({"w": torch.ones(2)}, dst), "without diffcli metadata"),
    "no-model-config": (lambda src, dst: _rewrite(src, dst, drop=("model_config",)), "lacks the 'model_config' metadata"),
    "malformed-schedule": (lambda src, dst: _rewrite(src, dst, schedule="{'kind': linear"), "malformed 'schedule'"),
    "shape-mismatch": (_wider, "tensors do not match the model config"),
    "future-version": (lambda src, dst: _rewrite(src, dst, format_version="7"), "newer than this diffcli's"),
}


@pytest.mark.parametrize("command", ["sample", "inspect-schedule"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_model_files_exit_4(diffcli, tmp_path, models, command, kind):
    make, words = BAD_FILES[kind]
    bad = tmp_path / "bad.safetensors"
    make(models["uncond"], bad)
    extra = ["-o", tmp_path / "out", "-n", "1"] if command == "sample" else ["--plot", tmp_path / "out" / "p.png"]
    code, stdout, err = diffcli(command, "--checkpoint", bad, *extra)
    assert code == 4, err
    line = one_error_line(err)
    assert words in line and str(bad) in line
    assert stdout == "" and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Outputs: names that escape the folder, folders that cannot be written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, words",
    [
        ("{seed}/../../x.png", "outside the output folder"),
        ("~/x.png", "not an absolute path"),
        (".", "gives no file name"),  # would have written the image in place of the output folder
        ("{seed}/..", "gives no file name"),
        ("{seed}/", "gives no file name"),
        ("{seed.real}.png", "unknown field {seed.real}"),  # attribute access would reach into Python objects
        ("{index[0]}.png", "unknown field {index[0]}"),
        ("{seed.__class__.__init__.__globals__}.png", "unknown field"),
        ("{}.png", "unknown field {}"),
        ("{seed:q}.png", "bad --name template"),
    ],
)
def test_names_that_escape_or_use_unknown_fields_exit_2(diffcli, tmp_path, models, name, words):
    out = tmp_path / "a" / "b"
    code, stdout, err = diffcli("sample", "-c", models["uncond"], "-n", 2, "--seed", 0, "-o", out, "--name", name)
    assert code == 2, err
    assert words in one_error_line(err)
    assert stdout == "" and list(tmp_path.rglob("*")) == []


def test_output_folder_under_a_regular_file_exits_1_with_the_path(diffcli, tmp_path, models, toy_image_folder):
    """A path whose parent is a file cannot be created, even by root (for whom chmod blocks nothing)."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    code, stdout, err = diffcli("sample", "-c", models["uncond"], "-n", 2, "--steps", 2, "--seed", 0,
                                "-o", blocker / "samples", "--quiet")
    assert code == 1, err
    assert str(blocker / "samples") in one_error_line(err)

    # --plot never creates folders: one under a file is a missing folder like any other (exit 2)
    code, stdout, err = diffcli("inspect-schedule", "--plot", blocker / "plots" / "s.png", "--quiet")
    assert code == 2, err
    assert f"the folder of --plot does not exist: {blocker / 'plots'}" in one_error_line(err)
    assert stdout == ""
    # a folder that exists but the plot cannot be written there (a folder where the file should go,
    # which even root cannot replace): exit 1, the path named, nothing left behind
    taken = tmp_path / "plots" / "s.png"
    taken.mkdir(parents=True)
    code, stdout, err = diffcli("inspect-schedule", "--plot", taken, "--overwrite", "--quiet")
    assert code == 1, err
    assert str(taken) in one_error_line(err)
    assert stdout == "" and [p.name for p in taken.parent.iterdir()] == ["s.png"] and list(taken.iterdir()) == []

    data = toy_image_folder(per_class=1)
    code, stdout, err = diffcli("train", data, "--out", blocker / "run", "--model", "DiT-T/4", "--resolution", "8",
                                "--batch-size", "2", "--steps", "1", "--device", "cpu", "--quiet")
    assert code == 1, err
    assert str(blocker / "run") in one_error_line(err)
    assert stdout == ""
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_exits_1(diffcli, tmp_path, models):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = diffcli("sample", "-c", models["uncond"], "-n", 1, "--steps", 2, "-o", locked, "--quiet")
    finally:
        locked.chmod(0o700)
    assert code == 1, err
    assert str(locked) in one_error_line(err)
    assert os.listdir(locked) == []
