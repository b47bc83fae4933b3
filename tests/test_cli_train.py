"""`diffcli train`, run the way a user would: invoke, check the exit code first, then the output."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from diffcli.files.checkpoint import load_model
from diffcli.cli import app

runner = CliRunner()

TINY = ["--model", "DiT-T/4", "--resolution", "8", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1",
        "--sample-every", "0", "--checkpoint-every", "100", "--device", "cpu"]


def train(*args: str):
    return runner.invoke(app, ["train", *args])


def test_train_then_sample_by_class_name(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    result = train(str(data), "--out", str(run), *TINY)
    assert result.exit_code == 0, result.output
    model = run / "model.safetensors"
    assert f"model: {model}\n" in result.stdout
    assert f"run: {run}\n" in result.stdout
    assert "steps: 3" in result.stdout
    assert "3 classes (blue, green, red)" in result.stderr  # logs go to stderr
    assert load_model(model).class_names == ["blue", "green", "red"]

    out = tmp_path / "samples"
    sampled = runner.invoke(app, ["sample", "--checkpoint", str(model), "--class", "green", "-n", "2", "--steps", "5",
                                  "--seed", "7", "--out", str(out), "--name", "{class}-{index}.png", "--json",
                                  "--device", "cpu"])
    assert sampled.exit_code == 0, sampled.output
    records = [json.loads(line) for line in sampled.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["image", "image", "summary"]
    images = records[:2]
    assert [(r["class"], r["seed"], Path(r["path"]).name) for r in images] == [
        ("green", 7, "green-0.png"), ("green", 8, "green-1.png")
    ]
    for r in images:
        with Image.open(r["path"]) as im:
            assert im.size == (8, 8) and im.mode == "RGB"
    assert (records[2]["images"], records[2]["skipped"], records[2]["out"]) == (2, 0, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["green-0.png", "green-1.png"]  # no grid unless --grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "samples"]

    wrong = runner.invoke(app, ["sample", "--checkpoint", str(model), "--class", "purple", "-n", "1", "--steps", "2",
                                "--out", str(out), "--device", "cpu"])
    assert wrong.exit_code == 2
    assert "unknown class 'purple'" in wrong.stderr and "blue, green, red" in wrong.stderr


def test_json_summary(tmp_path, toy_image_folder):
    data = toy_image_folder(classes=(), per_class=3)
    result = train(str(data), "--out", str(tmp_path / "run"), *TINY, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert next(iter(summary)) == "kind" and summary["kind"] == "summary"
    assert summary["steps"] == 3 and summary["resumed_from"] == 0
    assert summary["model_path"] == str(tmp_path / "run" / "model.safetensors")
    assert load_model(summary["model_path"]).class_names == []
    assert summary["stopped_by"] == "steps"


def test_time_limit_ends_the_run_with_exit_0_and_says_so(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    result = train(str(data), "--out", str(run), *TINY, "--time-limit", "0.0000001", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["stopped_by"] == "time_limit" and summary["steps"] == 1
    assert (run / "model.safetensors").exists() and (run / "checkpoints" / "step_0000001.safetensors").exists()
    again = train(str(data), "--out", str(run), *TINY, "--time-limit", "0.0000001")
    assert again.exit_code == 2
    assert again.stderr.startswith("Error: the run in ") and "give a larger --time-limit" in again.stderr
    rest = train(str(data), "--out", str(run), *TINY, "--json", "--quiet")
    assert rest.exit_code == 0 and json.loads(rest.stdout)["steps"] == 3


def test_quick_preset_from_the_command_line(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    result = train(str(data), "--out", str(run), "--preset", "quick", *TINY, "--lr", "0.003")
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["preset"] == "quick" and saved["lr"] == 0.003  # given options win over the recipe
    assert saved["ema_decay"] == 0.999 and saved["model"] == "DiT-T/4"
    assert "preset quick: --model DiT-T/4, --batch-size 4, --lr 0.003" in result.stderr


def test_empty_folder_exit_4(tmp_path):
    (tmp_path / "empty").mkdir()
    result = train(str(tmp_path / "empty"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: no images found in")
    assert result.stdout == ""
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_missing_folder_exit_4(tmp_path):
    result = train(str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 4
    assert "Error: data folder not found" in result.stderr


def test_unreadable_only_folder_exit_4(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("not a png")
    result = train(str(tmp_path / "bad"), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 4
    assert "all unreadable" in result.stderr


def test_resolution_not_a_multiple_of_the_patch_exit_2(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    result = train(str(data), "--out", str(tmp_path / "run"), *TINY, "--model", "DiT-T/2", "--resolution", "33")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: resolution 33x33 is not a multiple of the patch size 2")  # before decoding
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_numbers_exit_2(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    for option, value, words in (("--batch-size", "0", "--batch-size"), ("--lr", "nan", "--lr"),
                                 ("--steps", "0", "--steps"), ("--lr", "-1", "--lr"),
                                 ("--resolution", "8x", "--resolution"), ("--model", "DiT-Q/4", "unknown model preset"),
                                 ("--prediction", "x0", "--prediction"), ("--threads", "0", "--threads"),
                                 ("--time-limit", "0", "--time-limit"), ("--time-limit", "-2", "--time-limit"),
                                 ("--preset", "fast", "--preset")):
        result = train(str(data), "--out", str(tmp_path / "run"), *TINY, option, value)
        assert result.exit_code == 2, (option, value, result.output)
        assert result.stderr.startswith("Error: ") and words in result.stderr, (option, value, result.stderr)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_mixed_good_and_bad_files_trains_and_warns(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "blue" / "empty.jpg").write_bytes(b"")
    (data / "green" / "readme.txt").write_text("not even looked at")
    result = train(str(data), "--out", str(tmp_path / "run"), *TINY)
    assert result.exit_code == 0, result.output
    assert "warning: skipped 2 unreadable file(s)" in result.stderr
    assert "broken.png" in result.stderr and "empty.jpg" in result.stderr and "readme.txt" not in result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"]["images"] == 6 and config["dataset"]["skipped"] == 2


def test_resume_never_on_an_existing_run_exit_3(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    assert train(str(data), "--out", str(run), *TINY).exit_code == 0
    result = train(str(data), "--out", str(run), *TINY, "--resume", "never")
    assert result.exit_code == 3
    assert "already holds a run" in result.stderr


def test_resume_with_changed_lr_exit_2(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    assert train(str(data), "--out", str(run), *TINY).exit_code == 0
    result = train(str(data), "--out", str(run), *TINY, "--steps", "5", "--lr", "5e-4")
    assert result.exit_code == 2
    assert "cannot resume" in result.stderr and "--lr" in result.stderr


TINY_AUTO_WARMUP = [a for a in TINY if a not in ("--warmup-steps", "1")]


def test_warmup_fits_a_short_run_and_stays_on_resume(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    result = train(str(data), "--out", str(run), *TINY_AUTO_WARMUP, "--steps", "30")
    assert result.exit_code == 0, result.output
    assert "warm-up: 3 steps (auto" in result.stderr  # a tenth of 30, said in the log ...
    assert json.loads((run / "config.json").read_text())["train"]["warmup_steps"] == 3  # ... and in the config
    # a longer run resumed from it keeps its warm-up (auto would now be 5): not an identity mismatch
    longer = train(str(data), "--out", str(run), *TINY_AUTO_WARMUP, "--steps", "50")
    assert longer.exit_code == 0, longer.output
    assert "warm-up:" not in longer.stderr
    assert json.loads((run / "config.json").read_text())["train"]["warmup_steps"] == 3
    # given explicitly, it is what was given, and a change is refused on resume as before
    given = train(str(data), "--out", str(tmp_path / "r2"), *TINY_AUTO_WARMUP, "--steps", "30", "--warmup-steps", "7")
    assert given.exit_code == 0 and "warm-up:" not in given.stderr
    assert json.loads((tmp_path / "r2" / "config.json").read_text())["train"]["warmup_steps"] == 7
    assert train(str(data), "--out", str(run), *TINY_AUTO_WARMUP, "--steps", "60", "--warmup-steps", "6").exit_code == 2
    # long runs keep the recipe's 500
    from diffcli.training.config import auto_warmup

    assert [auto_warmup(n) for n in (1, 9, 300, 4999, 5000, 11262)] == [0, 0, 30, 499, 500, 500]


def test_in_a_log_training_prints_progress_lines(tmp_path, toy_image_folder):
    """As under nohup: stderr is not a terminal, so plain lines (here every update, --log-every 0)."""
    data = toy_image_folder(per_class=1)
    result = train(str(data), "--out", str(tmp_path / "run"), *TINY, "--steps", "4", "--metrics-every", "2",
                   "--log-every", "0")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("training ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert re.fullmatch(r"training 4/4  loss \d+\.\d{4}  \d+ img/s  elapsed \d+s  ETA \d+s", lines[-1]), lines[-1]
    decoding = [line for line in result.stderr.splitlines() if line.startswith("decoding images ")]
    assert decoding and decoding[-1].startswith("decoding images 3/3")


def test_json_progress_records_on_stderr_and_the_summary_on_stdout(tmp_path, toy_image_folder):
    from diffcli import records

    data = toy_image_folder(per_class=1)
    result = train(str(data), "--out", str(tmp_path / "run"), *TINY, "--steps", "3", "--metrics-every", "1",
                   "--log-every", "0", "--json")
    assert result.exit_code == 0, result.output
    progress = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    for rec in progress:
        records.check("train", rec)
    steps = [r for r in progress if r["task"] == "training"]
    assert [r["completed"] for r in steps] == [1, 2, 3] and steps[-1]["total"] == 3
    assert all(isinstance(r["loss"], float) and r["images_per_second"] > 0 for r in steps)
    (summary,) = [json.loads(line) for line in result.stdout.splitlines()]
    records.check("train", summary)
    assert summary["kind"] == "summary" and summary["steps"] == 3
