"""train --eval-every: FID/KID/accuracy of the EMA model's samples in metrics.jsonl and the summary."""

import json

import pytest
from typer.testing import CliRunner

from diffcli import records
from diffcli.cli import app
from diffcli.errors import UsageError
from diffcli.training import TrainConfig, train


@pytest.fixture(autouse=True)
def eval_cache_in_tmp(tmp_path, monkeypatch):
    """The eval cache goes under $XDG_CACHE_HOME: keep it out of the user's home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DIFFCLI_INCEPTION_WEIGHTS", raising=False)


def tiny(data, out, **overrides) -> TrainConfig:
    base = dict(data_dir=str(data), out=str(out), model="DiT-T/4", resolution="8", steps=4, batch_size=4, lr=1e-3,
                warmup_steps=2, checkpoint_every=2, sample_every=0, metrics_every=1, device="cpu",
                eval_every=2, eval_real=str(data), eval_images=6)
    return TrainConfig(**{**base, **overrides})


def test_eval_records_and_the_best_fid(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=4)
    lines: list[str] = []
    result = train(tiny(data, tmp_path / "run"), log=lines.append)
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["features"] == "auto" and r["eval_images"] == 6 and r["fid"] >= 0
        assert r["accuracy"] is not None and 0 <= r["accuracy"] <= 1  # the model's classes are REAL's folders
        assert set(r) == {"step", "fid", "kid", "kid_std", "precision", "recall", "accuracy", "features",
                          "eval_images", "eval_seconds"}
    best = min(evals, key=lambda r: r["fid"])
    assert (result.best_fid, result.best_fid_step) == (best["fid"], best["step"])
    assert any(l.startswith("eval at step 2 (auto features, 6 samples): FID ") for l in lines)
    assert (tmp_path / "xdg" / "diffcli" / "eval").is_dir()  # the real side went to the eval cache

    # resumed to 6 steps: the earlier records count towards the best, one more evaluation at step 6
    again = train(tiny(data, tmp_path / "run", steps=6), log=lines.append)
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"fid"' in l]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = min(evals, key=lambda r: r["fid"])
    assert (again.best_fid, again.best_fid_step) == (best["fid"], best["step"])


def test_eval_options_are_checked_before_any_data_is_read(tmp_path):
    for bad, words in (({"eval_real": None}, "--eval-every needs --eval-real"),
                       ({"eval_every": 0}, "--eval-real needs --eval-every"),
                       ({"eval_every": -1}, "--eval-every must be >= 0"),
                       ({"eval_images": 1}, "--eval-images must be between 2")):
        with pytest.raises(UsageError, match=words):
            train(tiny(tmp_path / "missing", tmp_path / "run", **bad), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_bad_eval_folder_fails_before_the_run_folder_is_written(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--model", "DiT-T/4",
                                 "--resolution", "8", "--steps", "2", "--batch-size", "2", "--eval-every", "1",
                                 "--eval-real", str(empty), "--device", "cpu", "--json"])
    assert r.exit_code == 4, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("Error: no images found in")
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_summary_names_the_best_fid(tmp_path, toy_image_folder):
    data = toy_image_folder(per_class=2)
    r = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run"), "--model", "DiT-T/4",
                                 "--resolution", "8", "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                                 "--eval-every", "2", "--eval-real", str(data), "--eval-images", "4",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(l) for l in r.stdout.splitlines()]
    records.check("train", rec)
    assert rec["kind"] == "summary" and rec["best_fid_step"] == 2 and rec["best_fid"] >= 0
    plain = CliRunner().invoke(app, ["train", str(data), "--out", str(tmp_path / "run2"), "--model", "DiT-T/4",
                                     "--resolution", "8", "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                                     "--eval-every", "2", "--eval-real", str(data), "--eval-images", "4", "--device", "cpu"])
    assert plain.exit_code == 0, plain.output
    assert "best FID: " in plain.stdout and "at step 2" in plain.stdout
