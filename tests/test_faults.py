"""Faults lose nothing: SIGKILL at random moments, SIGTERM, a full disk, a NaN loss and two sampling
jobs racing for the same files. After each, every file diffcli wrote is whole and loads, and the run
continues where it stopped.

The kill moments come from a seeded generator, so a failure names a reproducible schedule (the timing
of the process itself still varies from run to run).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcli import atomic
from diffcli.files import checkpoint
from diffcli.files.checkpoint import load_model, save_model
from diffcli.cli import app, main
from diffcli.files.images import read_png_text
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.training import loop
from diffcli.training.rundir import trim_metrics

TINY_TRAIN = ["--model", "DiT-T/4", "--resolution", "8", "--batch-size", "4", "--warmup-steps", "1",
              "--device", "cpu", "--quiet"]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DIFFCLI_DEBUG")}
    env.update(OMP_NUM_THREADS="1")
    return env


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffcli", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 90) -> bool:
    """Poll until ready() or the process ends; True when ready() while the process still runs."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if ready():
            return True
        assert time.monotonic() < deadline, "the process made no progress"
        time.sleep(0.02)
    return False


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return out, err


def is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def check_png(path: Path) -> dict:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im.load()
    return json.loads(read_png_text(path).get("diffcli", "{}"))


def check_run_folder(run: Path) -> int:
    """Every file of a training run loads; the only others are hidden temporary files. Returns the
    newest checkpoint's step (0 when there is none)."""
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if p.is_dir():
            assert rel in ("checkpoints", "samples"), rel
        elif is_temp(p):
            continue  # a write cut off by SIGKILL: never under the final name
        elif rel == "config.json":
            json.loads(p.read_text())
        elif rel == "metrics.jsonl":
            raw = p.read_text()
            assert raw == "" or raw.endswith("\n"), "a metrics line was cut short"
            for line in raw.splitlines():
                json.loads(line)
        elif rel == "data-cache.safetensors":
            checkpoint.read(p, "diffcli.datacache", "data cache")
        elif rel == "model.safetensors":
            load_model(p)
        elif rel.startswith("checkpoints/step_") and rel.endswith(".safetensors"):
            checkpoint.read(p, checkpoint.STATE_FORMAT, "training checkpoint")
        elif rel.startswith("samples/step_") and rel.endswith(".png"):
            check_png(p)
        else:
            raise AssertionError(f"unexpected file {rel}")
    steps = [int(p.name[5:12]) for p in (run / "checkpoints").glob("step_*.safetensors")]
    return max(steps, default=0)


def newest_step(run: Path) -> int:
    steps = [int(p.name[5:12]) for p in (run / "checkpoints").glob("step_*.safetensors")]
    return max(steps, default=0)


# --------------------------------------------------------------------------------------------------
# SIGKILL and SIGTERM during training
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_killed_at_random_moments_loses_nothing_and_resumes(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    run = tmp_path / "run"
    # a checkpoint every step and a preview every 2: most moments fall in or near a write
    args = ["train", data, "--out", run, *TINY_TRAIN, "--checkpoint-every", 1, "--keep-last", 2,
            "--sample-every", 2, "--metrics-every", 1]
    rng = random.Random(20240607)
    for _ in range(3):
        # the moment: after 1 to 3 more steps (on the machine's own clock), then 0 to 150 ms into the next
        target = newest_step(run) + rng.randint(1, 3)
        proc = start(*args, "--steps", 100000)
        assert wait_until(proc, lambda t=target: newest_step(run) >= t), proc.communicate()
        time.sleep(rng.uniform(0.0, 0.15))
        kill(proc)
        assert proc.returncode == -signal.SIGKILL
        assert check_run_folder(run) >= target  # a kill never takes a checkpoint away

    # SIGTERM: a checkpoint at the step it stopped, exit 130, and a notice (the work was saved: no "Error: ")
    target = newest_step(run) + rng.randint(1, 3)
    proc = start(*args, "--steps", 100000)
    assert wait_until(proc, lambda: newest_step(run) >= target), proc.communicate()
    time.sleep(rng.uniform(0.0, 0.15))
    _, err = kill(proc, signal.SIGTERM)
    assert proc.returncode == 130, err
    assert err.startswith("interrupted at step") and "Error" not in err, err
    stopped = check_run_folder(run)
    assert f"interrupted at step {stopped}; checkpoint saved in {run / 'checkpoints'} (" in err, err
    assert err.rstrip("\n").endswith("--resume auto)"), err
    assert load_model(run / "model.safetensors").training["steps"] == stopped

    # resume to the end: exit 0, the step records continuous, no temporary file left anywhere
    done = subprocess.run([sys.executable, "-m", "diffcli", *map(str, args), "--steps", str(stopped + 2)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert check_run_folder(run) == stopped + 2
    assert [p for p in run.rglob("*") if is_temp(p)] == []
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))  # steps logged after the last checkpoint were dropped
    mf = load_model(run / "model.safetensors")
    assert mf.training["steps"] == stopped + 2 and mf.training["final"] is True


def test_stale_temporary_files_are_swept_when_a_run_starts(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / ".model.safetensors.k2j4h5g6.tmp", run / "checkpoints" / ".step_0000003.safetensors.abc_1234.tmp"]
    kept = [run / "notes.tmp", run / ".notes.tmp", run / "checkpoints" / "mine.safetensors.abcd1234.tmp"]
    for p in stale + kept:
        p.write_bytes(b"partial")
        os.utime(p, (time.time() - 60, time.time() - 60))
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(run), *TINY_TRAIN, "--steps", "1",
                                      "--sample-every", "0"])
    assert result.exit_code == 0, result.output
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in kept)  # not the writer's pattern: not ours to delete


def test_remove_stale_temps_spares_fresh_files(tmp_path):
    old, fresh = tmp_path / ".a.png.12345678.tmp", tmp_path / ".b.png.87654321.tmp"
    for p in (old, fresh):
        p.write_bytes(b"x")
    os.utime(old, (1000, 1000))
    assert atomic.remove_stale_temps(tmp_path, older_than=time.time() - 5) == [old]
    assert fresh.exists() and not old.exists()
    assert atomic.remove_stale_temps(tmp_path / "missing", older_than=time.time()) == []


def test_trim_metrics_drops_records_after_the_checkpoint_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')
    trim_metrics(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    before = path.stat().st_mtime_ns
    trim_metrics(path, 3)  # nothing to drop: the file is not rewritten
    assert path.stat().st_mtime_ns == before
    trim_metrics(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# A full disk, a refused rename, a NaN loss: exit 1, one line, the previous checkpoint intact
# --------------------------------------------------------------------------------------------------


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["diffcli", *map(str, args)])
    monkeypatch.delenv("DIFFCLI_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


def fail_when_writing(monkeypatch, name_part: str, how: str) -> None:
    """Make the OS refuse the atomic write of any file whose path contains name_part: the fsync of its
    temporary file fails with ENOSPC, or its final rename with EACCES."""
    if how == "fsync":
        real = os.fsync

        def fsync(fd):
            if name_part in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            if name_part in str(dst):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real_replace(src, dst, *a, **k)

        monkeypatch.setattr(os, "replace", replace)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to find a file descriptor's path")
@pytest.mark.parametrize(
    "target, how, words",
    [("step_0000004.safetensors", "fsync", "No space left on device"),
     ("model.safetensors", "rename", "Permission denied")],
)
def test_a_failed_save_keeps_the_previous_files(tmp_path, toy_image_folder, monkeypatch, capsys, target, how, words):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    args = ["train", data, "--out", run, *TINY_TRAIN, "--checkpoint-every", 2, "--sample-every", 0, "--steps", 6]
    saved = []
    real_save_model = checkpoint.save_model

    def save_model_spy(path, *a, **k):
        real_save_model(path, *a, **k)
        saved.append(k["training"]["steps"])

    monkeypatch.setattr(checkpoint, "save_model", save_model_spy)
    calls = {"n": 0}
    real_write = checkpoint.write

    def write(path, *a, **k):  # the fault starts once step 2 is safely saved
        calls["n"] += 1
        if saved == [2] and calls.get("armed") is None:
            fail_when_writing(monkeypatch, target, how)
            calls["armed"] = True
        return real_write(path, *a, **k)

    monkeypatch.setattr(checkpoint, "write", write)
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 1, err
    line = err.strip()
    assert line.startswith("Error: cannot write ") and target in line and words in line
    assert len(err.splitlines()) == 1 and out == ""
    monkeypatch.undo()

    # the model file still holds step 2 and loads; the checkpoints that exist load
    assert load_model(run / "model.safetensors").training["steps"] == 2
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    expected = ["step_0000002.safetensors"] + (["step_0000004.safetensors"] if how == "rename" else [])
    assert names == expected  # no temporary file left behind
    assert check_run_folder(run) == int(expected[-1][5:12])
    # and the run continues once the disk is fine again
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert load_model(run / "model.safetensors").training["steps"] == 6


def test_nan_loss_from_the_cli_exits_1_naming_the_step(tmp_path, toy_image_folder, monkeypatch, capsys):
    data = toy_image_folder(per_class=1)
    run = tmp_path / "run"
    calls = {"n": 0}
    real = loop.diffusion_loss

    def inf_at_step_5(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss + float("inf") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop, "diffusion_loss", inf_at_step_5)
    code, out, err = run_main(monkeypatch, capsys, "train", data, "--out", run, *TINY_TRAIN, "--steps", 10,
                              "--checkpoint-every", 2, "--sample-every", 0)
    assert code == 1, err
    assert len(err.splitlines()) == 1 and out == ""
    assert err.startswith("Error: loss is inf at step 5;") and str(run / "checkpoints") in err
    assert check_run_folder(run) == 4
    assert max(p.name for p in (run / "checkpoints").iterdir()) == "step_0000004.safetensors"
    assert load_model(run / "model.safetensors").training["steps"] == 4


# --------------------------------------------------------------------------------------------------
# Sampling: SIGKILL, SIGTERM, and two jobs racing for the same files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, make_dit) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(path, make_dit(in_channels=1, seed=3), NoiseSchedule("cosine", 1000), "v", [])
    return path


def check_sample_folder(out: Path) -> set[int]:
    """Every PNG is whole and holds the seed its name says; returns those seeds."""
    seeds = set()
    for p in out.iterdir():
        if is_temp(p):
            continue
        doc = check_png(p)
        if p.name.startswith("grid-"):
            assert doc["grid"] is True
            continue
        assert doc["seed"] == int(p.stem), p.name
        seeds.add(doc["seed"])
    return seeds


@pytest.mark.slow
def test_sampling_killed_at_random_moments_then_finished_with_skip_existing(tmp_path, model_file):
    n = 24
    args = ["sample", "-c", model_file, "-n", n, "--seed", 100, "--steps", 20, "--batch-size", 2,
            "--name", "{seed}.png", "--no-grid", "--device", "cpu", "--skip-existing", "--quiet"]
    out = tmp_path / "out"
    rng = random.Random(99)
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL, signal.SIGKILL):
        # the moment: after 1 to 4 more images, then 0 to 50 ms into the next batch
        have = check_sample_folder(out) if out.exists() else set()
        temps = {p for p in out.iterdir() if is_temp(p)} if out.exists() else set()
        target = len(have) + rng.randint(1, 4)
        proc = start(*args, "-o", out)
        wait_until(proc, lambda t=target: out.exists() and len([p for p in out.iterdir() if not is_temp(p)]) >= t)
        time.sleep(rng.uniform(0.0, 0.05))
        _, err = kill(proc, sig)
        if proc.returncode == 0:
            break  # it finished before the signal
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and err == "Error: interrupted\n", err
            assert {p for p in out.iterdir() if is_temp(p)} == temps  # SIGTERM removes its temporary file
        else:
            assert proc.returncode == -signal.SIGKILL
        assert have <= check_sample_folder(out) <= set(range(100, 100 + n))

    done = subprocess.run([sys.executable, "-m", "diffcli", *map(str, args), "-o", str(out)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert check_sample_folder(out) == set(range(100, 100 + n))

    # the images made across interrupted runs are exactly those of one uninterrupted run
    whole = tmp_path / "whole"
    result = CliRunner().invoke(app, [str(a) for a in args] + ["-o", str(whole)])
    assert result.exit_code == 0, result.output
    for seed in range(100, 100 + n):
        with Image.open(out / f"{seed}.png") as a, Image.open(whole / f"{seed}.png") as b:
            assert a.tobytes() == b.tobytes(), seed


@pytest.mark.slow
def test_two_skip_existing_jobs_with_overlapping_seeds_never_clobber(tmp_path, model_file):
    out = tmp_path / "shared"
    common = ["sample", "-c", model_file, "-n", 12, "--steps", 20, "--batch-size", 1, "--name", "{seed}.png",
              "--skip-existing", "--json", "--device", "cpu", "--quiet", "-o", out]
    jobs = [start(*common, "--seed", 0), start(*common, "--seed", 6)]  # seeds 0..11 and 6..17
    results = [job.communicate(timeout=120) for job in jobs]
    for job, (_, err) in zip(jobs, results):
        assert job.returncode == 0, err
    written: dict[str, int] = {}
    for stdout, _ in results:
        records = list(map(json.loads, stdout.splitlines()))
        assert [r["kind"] for r in records] == ["image"] * 12 + ["summary"]  # no grid unless --grid
        images, summary = records[:-1], records[-1]
        made = [r for r in images if not r["skipped"]]
        assert (summary["images"], summary["skipped"]) == (len(made), 12 - len(made))
        for rec in made:
            written[rec["path"]] = written.get(rec["path"], 0) + 1
    # every file was created by exactly one of the two jobs, and the other kept it
    assert sorted(written) == sorted(str(out / f"{s}.png") for s in range(18))
    assert set(written.values()) == {1}
    assert check_sample_folder(out) == set(range(18))
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}.png" for s in range(18))  # the images, nothing else
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # and no grid beside the folder
