"""benchmarks/cpu_curve.py, the learning-curve benchmark of the quick recipe, run end to end on a tiny
folder (seconds of training, a handful of samples): the snapshots continue one run, the figures are
in range and consistent with the run folder, and bad input is refused before anything is trained."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import cpu_curve  # noqa: E402


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the eval classifier's cache


def test_curve_snapshots_continue_one_run(tmp_path, toy_image_folder, cache_home):
    data = toy_image_folder(per_class=cpu_curve.MIN_PER_CLASS)
    run, results = tmp_path / "run", tmp_path / "curve.json"
    args = ["--data", str(data), "--run", str(run), "--results", str(results), "--minutes", "0.001,0.03",
            "--threads", "1", "--resolution", "8", "--images", "12", "--samplers", "default,ddim:2",
            "--", "--model", "DiT-T/4", "--batch-size", "4", "--sample-every", "0"]
    assert cpu_curve.main(args) == 0
    r = json.loads(results.read_text())
    assert r["recipe"] == "quick" and r["train_args"][:2] == ["--model", "DiT-T/4"]
    assert r["train_config"]["lr"] == 2e-3 and r["train_config"]["batch_size"] == 4
    snaps = r["snapshots"]
    assert [s["minutes"] for s in snaps] == [0.001, 0.03]
    assert 1 <= snaps[0]["steps"] < snaps[1]["steps"]  # the second segment resumed the first run
    # (0.03 min leaves room for several steps after a slow first one: a CI machine took 0.27 s for it)
    assert snaps[1]["train_seconds"] >= 0.03 * 60
    assert snaps[1]["images_seen"] == 4 * snaps[1]["steps"]
    for s in snaps:
        assert 0 <= s["samples"]["ddim:2"]["accuracy"] <= 100 and s["samples"]["ddim:2"]["fd"] >= 0
        assert 0 < s["share_of_peak"] < 1
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == snaps[1]["steps"]

    # called again: the snapshots already scored are kept, a later one extends the curve
    assert cpu_curve.main([*args[:7], "0.001,0.03,0.06", *args[8:]]) == 0
    r2 = json.loads(results.read_text())
    assert r2["snapshots"][:2] == snaps and r2["snapshots"][2]["steps"] > snaps[1]["steps"]

    plot = tmp_path / "curve.png"
    assert cpu_curve.main(["--plot", str(plot), str(results), "--plot-sampler", "ddim:2"]) == 0
    from PIL import Image

    assert Image.open(plot).size == (900, 600)


def test_too_small_a_folder_is_refused_before_training(tmp_path, toy_image_folder, cache_home, capsys):
    data = toy_image_folder(per_class=3)
    with pytest.raises(SystemExit) as e:
        cpu_curve.main(["--data", str(data), "--run", str(tmp_path / "run"), "--results", str(tmp_path / "r.json")])
    assert e.value.code == 4
    assert "too small for the classifier's held-out slice" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("minutes", ["5,5", "10,5", "0,5", "x"])
def test_bad_snapshot_times(minutes):
    with pytest.raises(SystemExit, match="--minutes"):
        cpu_curve.parse_minutes(minutes)
