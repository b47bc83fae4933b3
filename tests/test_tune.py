"""`diffcli tune`, the sampler registry's tuned sigmas and the guidance interval.

The search itself is checked on objectives with a known minimum; the command on a tiny model file,
run the way a user would (exit code first, then output); the stored entry through `sample`,
`inspect-schedule` and `info`, which must use exactly the stored values.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli.files.checkpoint import load_model, read_header, save_model, with_sampling
from diffcli.cli import app
from diffcli.diffusion import ode, registry, tune
from diffcli.diffusion.registry import Tuned, read_tuned
from diffcli.diffusion.samplers import Guided
from diffcli.diffusion.schedule import NoiseSchedule
from diffcli.errors import UsageError
from diffcli.files.images import to_uint8
from diffcli.validate import Invalid

runner = CliRunner()
CLASSES = ["a", "b"]
SCHEDULE = NoiseSchedule("cosine", 100)


def diffcli(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def model_file(tmp_path, make_dit) -> Path:
    path = tmp_path / "m.safetensors"
    save_model(path, make_dit(num_classes=2, in_channels=1), SCHEDULE, "v", CLASSES, sampling={"guidance": 2.0})
    return path


def entry(sigmas: list[float], sampler: str = "dpm++2m", interval=None) -> dict:
    return Tuned(sampler, len(sigmas) - 1, tuple(sigmas), 2.0, "dpm++2m:40", {"tuned": 0.01, "edm": 0.02}, 4, 4,
                 interval, {"full": 90.0, "interval": 89.5} if interval else {}).to_dict()


def tuned_copy(src: Path, dst: Path, entries: list[dict]) -> Path:
    dst.write_bytes(with_sampling(src, {"guidance": 2.0, "tuned": entries}))
    return dst


def hand_sigmas(steps: int) -> list[float]:
    """A valid step list: the schedule's top, then geometric from 40 down to 0.05, then 0."""
    top = ode.sigma_max(SCHEDULE)
    inner = [40 * (0.05 / 40) ** (i / (steps - 2)) for i in range(steps - 1)] if steps > 2 else [1.0]
    return [top] + inner + [0.0]


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------


def test_coordinate_descent_finds_a_known_minimum_and_keeps_the_order():
    """Objective: squared distance in log sigma to a target list; the search must get close to it and
    every candidate it tries must be a valid step list (strictly decreasing, between the ends)."""
    top, floor = 1000.0, 0.01
    target = [top, 30.0, 4.0, 0.7, 0.08, 0.0]
    start = [top, 500.0, 100.0, 10.0, 1.0, 0.0]
    seen = []

    def objective(sig):
        seen.append(sig)
        return sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(sig[1:-1], target[1:-1]))

    best, value, evals = tune.coordinate_descent(start, top, floor, objective, max_evaluations=400)
    assert evals == len(seen) <= 400
    assert value < 0.01 * objective(start)
    assert all(abs(math.log(a / b)) < 0.15 for a, b in zip(best[1:-1], target[1:-1]))
    for sig in seen:
        assert sig[0] == top and sig[-1] == 0.0
        assert all(a > b for a, b in zip(sig, sig[1:])) and sig[-2] > floor


def test_coordinate_descent_never_returns_worse_than_its_start_and_obeys_the_budget():
    calls = []

    def objective(sig):  # the start is the minimum: every move away from it is worse
        calls.append(sig)
        return abs(math.log(sig[1] / 2)) + abs(math.log(sig[2] / 0.5))

    start = [50.0, 2.0, 0.5, 0.0]
    best, value, evals = tune.coordinate_descent(start, 50.0, 1e-3, objective, max_evaluations=7)
    assert best == pytest.approx(start, rel=1e-12) and value < 1e-12
    assert evals == 7 and len(calls) == 7  # the start, then the 6 tries the budget allows


def test_narrowest_window_drops_steps_from_both_ends_while_accuracy_holds():
    """Steps 3..6 of 10 carry the accuracy; dropping any of them costs 5 points, the others nothing."""
    needed = set(range(3, 7))

    def measure(window):
        first, last = window if window else (0, 9)
        kept = set(range(first, last + 1))
        return 95.0 - 5 * len(needed - kept), 1.0 + 0.1 * len(kept)

    window, acc, secs, full, full_s = tune.narrowest_window(10, measure, tolerance=1.0)
    assert window == (3, 6) and acc == full == 95.0
    assert secs < full_s
    # a tolerance above 5 points lets one needed step go at each end
    assert tune.narrowest_window(10, measure, tolerance=5.0)[0] == (4, 6)


def test_narrowest_window_with_a_relative_tolerance_judges_by_distance():
    """Scores are minus distances: each dropped step of 0..2 or 8..9 adds 1% of the full distance 0.02, each
    of 3..7 adds 50%. A 2.5% tolerance lets two cheap steps go: both from the top end, which is tried first."""
    def measure(window):
        first, last = window if window else (0, 9)
        dropped = set(range(10)) - set(range(first, last + 1))
        return -0.02 * (1 + sum(0.01 if i < 3 or i > 7 else 0.5 for i in dropped)), 0.0

    window, score, _, full, _ = tune.narrowest_window(10, measure, 0.025, relative=True)
    assert window == (2, 9) and full == -0.02 and score == pytest.approx(-0.02 * 1.02)
    assert tune.narrowest_window(10, measure, 0.06, relative=True)[0] == (3, 7)  # all five cheap steps
    assert tune.narrowest_window(10, measure, 0.005, relative=True)[0] is None


def test_narrowest_window_keeps_full_guidance_when_every_step_matters():
    window, acc, _, full, _ = tune.narrowest_window(4, lambda w: (90.0 if w is None else 80.0, 1.0), 1.0)
    assert window is None and acc == full == 90.0


def test_guided_window_guides_exactly_the_chosen_steps():
    sig = hand_sigmas(8)
    for first, last in ((0, 7), (2, 5), (3, 3), (1, 7)):
        lo, hi = tune._guided_window(sig, first, last)
        guided = [i for i, s in enumerate(sig[:-1]) if lo < s <= hi]
        assert guided == list(range(first, last + 1)), (first, last)


# --------------------------------------------------------------------------------------------------
# Guidance interval in the samplers
# --------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return torch.sin(x + (y[:, None, None, None] if y is not None else 0) * 0.3) * 0.5


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpm++2m"])
def test_guidance_interval_guides_only_inside_it(sampler):
    """With an interval, the guided (doubled) batches are exactly the evaluations whose sigma is inside;
    an interval that holds every level gives the same images as no interval."""
    f = Recorder()
    kw = dict(seeds=[0, 1], labels=torch.tensor([0, 1]), null_label=2, guidance=3.0, prediction="v")
    kind = {} if sampler == "ddim" else {"sigmas": "karras"}
    full = registry.sample(f, SCHEDULE, (1, 4, 4), 6, sampler, **kind, **kw)
    f.batches.clear()
    sig = registry.visited_sigmas(SCHEDULE, sampler, 6, "trailing", kind.get("sigmas"))
    lo, hi = sig[4], sig[1]  # guided: levels 2..4 (lo itself is outside)
    part = registry.sample(f, SCHEDULE, (1, 4, 4), 6, sampler, guidance_interval=(lo, hi), **kind, **kw)
    inside = [s for s in sig[:-1] if lo < s <= hi]
    assert part.guided == f.batches.count(4) >= len(inside) == 3
    assert f.batches.count(2) == part.nfe - part.guided > 0
    assert not torch.allclose(part.images, full.images)
    whole = registry.sample(f, SCHEDULE, (1, 4, 4), 6, sampler, guidance_interval=(0.0, sig[0]), **kind, **kw)
    assert torch.equal(whole.images, full.images) and whole.guided == full.guided == full.nfe


def test_guided_is_the_conditional_model_outside_the_interval():
    f = Recorder()
    g = Guided(f, 4.0, 2, interval=(1.0, 5.0))
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([3.0, 3.0]), torch.tensor([0, 1])
    assert torch.equal(g(x, t, y, sigma=0.5), f(x, t, y)) and torch.equal(g(x, t, y, sigma=1.0), f(x, t, y))
    cond, uncond = f(x, t, y), f(x, t, torch.tensor([2, 2]))
    torch.testing.assert_close(g(x, t, y, sigma=5.0), uncond + 4.0 * (cond - uncond))
    assert g.guided_calls == 1


# --------------------------------------------------------------------------------------------------
# Tuned entries in the model file
# --------------------------------------------------------------------------------------------------


def test_with_sampling_changes_the_metadata_and_nothing_else(model_file, tmp_path):
    out = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(hand_sigmas(5))])
    before, after = model_file.read_bytes(), out.read_bytes()
    nb, na = (struct.unpack("<Q", b[:8])[0] for b in (before, after))
    assert before[8 + nb:] == after[8 + na:]  # the tensor data, byte for byte
    a, b = load_model(model_file), load_model(out)
    assert all(torch.equal(a.model.state_dict()[k], v) for k, v in b.model.state_dict().items())
    assert [t.to_dict() for t in b.tuned] == [entry(hand_sigmas(5))] and a.tuned == []
    assert a.model_hash != b.model_hash  # the hash covers the whole file, metadata included


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e.update(sigmas=e["sigmas"][:-1]), "5 steps need 6 sigmas, got 5"),
    (lambda e: e.update(sigmas=[*e["sigmas"][:-1], 0.01]), "sigmas must be finite and end at 0"),
    (lambda e: e["sigmas"].__setitem__(0, 1e9), "above the schedule's sigma_max"),
    (lambda e: e.update(sigmas="edm"), "sigmas must be a list of numbers"),
    (lambda e: e.update(sampler="ddim"), 'sampler must be one of "euler", "heun", "dpm++2m"'),
    (lambda e: e.update(steps=1000), "steps must be an integer in [1, 100]"),
    (lambda e: e.update(guidance_interval=[3.0, 1.0]), "needs LO < HI"),
    (lambda e: e.update(guidance_interval=[0.1, 1e12]), "outside the model's sigma range"),
    (lambda e: e.update(distance={"edm": "far"}), "distance.edm must be a number"),
    (lambda e: e.update(interval_distance={"full": "near"}), "interval_distance.full must be a number"),
    (lambda e: e.update(interval_distance=[0.1]), "interval_distance must be an object"),
    (lambda e: e.update(extra=1), "extra is not a known field"),
])
def test_a_bad_tuned_entry_is_refused_naming_the_field(mutate, message):
    e = entry(hand_sigmas(5))
    mutate(e)
    with pytest.raises(Invalid) as info:
        read_tuned([e], SCHEDULE)
    assert message in str(info.value) and "sampling.tuned[0]" in str(info.value)


def test_two_entries_for_the_same_sampler_and_steps_are_refused():
    with pytest.raises(Invalid, match="repeats sampler dpm\\+\\+2m at 5 steps"):
        read_tuned([entry(hand_sigmas(5)), entry(hand_sigmas(5))], SCHEDULE)


def test_sample_uses_the_stored_sigmas_exactly(model_file, tmp_path):
    sig = hand_sigmas(6)
    tuned = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(sig, interval=(0.5, 20.0))])
    res = diffcli("inspect-schedule", "--checkpoint", tuned, "--steps", 6, "--json")
    assert res.exit_code == 0, res.output
    recs = records(res)
    sampling = next(r for r in recs if r["kind"] == "sampling")
    assert sampling["sigmas"] == "tuned" and sampling["step_sigmas"] == sig
    assert [r for r in recs if r["kind"] == "tuned"] == [{"kind": "tuned", **entry(sig, interval=(0.5, 20.0))}]
    res = diffcli("inspect-schedule", "--checkpoint", tuned, "--steps", 6)
    assert res.exit_code == 0, res.output
    assert "the 6 noise levels dpm++2m steps from (tuned sigmas)" in res.stdout
    assert "tuned: dpm++2m 6 steps at guidance 2: sigmas" in res.stdout and "guidance interval 0.5 to 20" in res.stdout
    # sample: auto picks them (and the stored interval) at 6 steps, edm at 7; the pixels are those of the
    # sampler run on the stored values
    out = tmp_path / "out"
    res = diffcli("sample", "-c", tuned, "--steps", 6, "-n", 2, "--seed", 3, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    img = [r for r in records(res) if r["kind"] == "image"]
    assert {r["sigmas"] for r in img} == {"tuned"} and {r["guidance_interval"] for r in img} == {"0.5,20.0"}
    assert 'Sigmas: tuned, Guidance interval: "0.5,20.0"' in Image.open(img[0]["path"]).text["parameters"]
    mf = load_model(tuned)
    want = registry.sample(mf.model, mf.schedule, (1, 8, 8), 6, "dpm++2m", sigmas=sig, seeds=[3, 4],
                           labels=torch.tensor([0, 1]), null_label=2, guidance=2.0, prediction="v",
                           guidance_interval=(0.5, 20.0))
    got = torch.stack([torch.from_numpy(np.array(Image.open(r["path"]))) for r in img])
    assert torch.equal(got, to_uint8(want.images)[..., 0])
    res = diffcli("sample", "-c", tuned, "--steps", 7, "-n", 1, "--seed", 3, "--out", tmp_path / "o7", "--json")
    assert res.exit_code == 0 and records(res)[0]["sigmas"] == "edm" and "guidance_interval" not in records(res)[0]
    # --from-png redoes the tuned image bit for bit
    res = diffcli("sample", "-c", tuned, "--from-png", img[1]["path"], "--out", tmp_path / "again", "--json")
    assert res.exit_code == 0, res.output
    again = records(res)[0]
    assert again["sigmas"] == "tuned" and again["guidance_interval"] == "0.5,20.0"
    assert Image.open(again["path"]).tobytes() == Image.open(img[1]["path"]).tobytes()


def test_info_shows_the_sampling_defaults_a_tuned_file_gives(model_file, tmp_path):
    tuned = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(hand_sigmas(15), interval=(0.5, 20.0))])
    res = diffcli("info", tuned, "--json")
    assert res.exit_code == 0, res.output
    d = records(res)[0]["sampling_defaults"]
    assert d["sigmas"] == "tuned" and d["guidance_interval"] == [0.5, 20.0]


@pytest.mark.parametrize("args, message", [
    (["--steps", 6, "--sigmas", "tuned"], "the model has no tuned sigmas for dpm++2m at 6 steps (it has: dpm++2m 5)"),
    (["--steps", 5, "--sigmas", "tuned", "--sampler", "euler_a"], "--sigmas tuned needs a deterministic ODE sampler"),
    (["--steps", 5, "--sigmas", "tuned", "--sampler", "ddim"], "--sigmas tuned needs an ODE sampler"),
    (["--guidance-interval", "3,1"], "guidance interval 3,1 needs LO < HI"),
    (["--guidance-interval", "0.1,1e9"], "is outside the model's sigma range"),
    (["--guidance-interval", "-1,2"], "is outside the model's sigma range"),
    (["--guidance-interval", "a,b"], "--guidance-interval must be LO,HI"),
    (["--guidance-interval", "0.1,2", "--guidance", "1"], "--guidance-interval needs guidance"),
])
def test_sample_refuses_bad_tuned_and_interval_options(model_file, tmp_path, args, message):
    tuned = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(hand_sigmas(5))])
    out = tmp_path / "out"
    res = diffcli("sample", "-c", tuned, "-n", 1, "--out", out, *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

FAST = ["--seeds", 4, "--validation-seeds", 4, "--reference", "dpm++2m:30", "--batch-size", 8]


def test_tune_searches_validates_and_stores(model_file, tmp_path):
    out = tmp_path / "tuned.safetensors"
    res = diffcli("tune", model_file, "--steps", 4, *FAST, "--max-evaluations", 12, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    assert r["kind"] == "result" and r["steps"] == 4 and r["sampler"] == "dpm++2m" and r["guidance"] == 2.0
    fixed = {k: v for k, v in r["train_distance"].items() if k != "tuned"}
    assert set(fixed) == {"edm", "karras", "none"} and set(r["distance"]) == {"tuned", *fixed}
    assert r["start"] == min(fixed, key=fixed.get)  # the search starts from the best family on the training seeds
    if r["start"] == "edm":  # whose values run exactly as edm does: the search can only improve on it there
        assert r["train_distance"]["tuned"] <= fixed["edm"]
    assert r["evaluations"] <= 12 and len(r["sigmas"]) == 5 and r["sigmas"][-1] == 0
    assert r["better"] == (r["distance"]["tuned"] < min(v for k, v in r["distance"].items() if k != "tuned"))
    if r["better"]:
        assert r["stored"] == str(out)
        stored = load_model(out).tuned
        assert len(stored) == 1 and list(stored[0].sigmas) == r["sigmas"]
        assert stored[0].distance == pytest.approx(r["distance"], abs=1e-6)
    else:
        assert r["stored"] is None and not out.exists()


def test_tune_stores_nothing_when_it_does_not_beat_the_fixed_families(model_file, tmp_path):
    """One evaluation: the 'tuned' sigmas are the best fixed family's own, so on validation they tie
    with it, which is not better: nothing is written, and the message says so."""
    out = tmp_path / "tuned.safetensors"
    before = model_file.read_bytes()
    res = diffcli("tune", model_file, "--steps", 3, *FAST, "--max-evaluations", 1, "--out", out)
    assert res.exit_code == 0, res.output
    assert "do not beat" in res.stderr and "nothing stored" in res.stderr
    assert not out.exists() and model_file.read_bytes() == before


def test_tune_start_tuned_continues_from_the_entry_and_never_replaces_a_closer_one(model_file, tmp_path):
    """--start tuned begins at the file's own entry; with a budget of one solve the search cannot move,
    so the result ties with what the file holds: not closer, so nothing is replaced, and it says so."""
    sig = hand_sigmas(4)
    copy = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(sig)])
    before = copy.read_bytes()
    res = diffcli("tune", copy, "--steps", 4, *FAST, "--max-evaluations", 1, "--start", "tuned", "--in-place",
                  "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    assert r["start"] == "tuned" and r["sigmas"] == pytest.approx(sig, rel=1e-12)
    assert r["distance"]["stored"] == pytest.approx(r["distance"]["tuned"], abs=1e-12)
    assert r["train_distance"]["stored"] == pytest.approx(r["train_distance"]["tuned"], abs=1e-12)
    assert r["stored_before"] and not r["better"] and r["stored"] is None
    assert copy.read_bytes() == before
    res = diffcli("tune", copy, "--steps", 4, *FAST, "--max-evaluations", 1, "--start", "tuned", "--in-place")
    assert "no closer than the ones" in res.stderr and "nothing stored" in res.stderr


def test_tune_replaces_a_stored_entry_only_when_closer_on_validation(model_file, tmp_path):
    """A poor stored entry (levels bunched at the bottom) is a rival like the fixed families: the new
    sigmas replace it only when they beat both it and the best fixed family on the validation seeds."""
    top = ode.sigma_max(SCHEDULE)
    poor = [top, 0.4, 0.3, 0.2, 0.0]
    copy = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(poor)])
    res = diffcli("tune", copy, "--steps", 4, *FAST, "--max-evaluations", 12, "--in-place", "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    d = r["distance"]
    fixed = min(d[k] for k in registry.FIXED)
    assert d["stored"] > fixed  # the poor entry loses to the fixed families, so it cannot hold the new one back
    assert r["stored_before"] == (d["stored"] <= d["tuned"])
    assert r["better"] == (d["tuned"] < fixed and d["tuned"] < d["stored"])
    (now,) = load_model(copy).tuned
    assert list(now.sigmas) == (r["sigmas"] if r["better"] else pytest.approx(poor))
    if r["better"]:
        assert "stored" not in now.distance  # the entry keeps the figures of the families, not of its forerunner


def test_tune_guidance_interval_by_distance_stores_what_it_measured(model_file, tmp_path):
    """Without --real the interval is judged by the distance to the reference: the stored interval
    guides exactly the reported steps, and its validation distance is that of an independent solve."""
    out = tmp_path / "t.safetensors"
    res = diffcli("tune", model_file, "--steps", 6, *FAST, "--max-evaluations", 6, "--guidance-interval",
                  "--distance-tolerance", 100, "--out", out, "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    assert r["better"], r  # the fixture's model: a few solves beat the fixed families (see above)
    lo, hi = r["guidance_interval"]
    first, last = r["guided_steps"]
    sig = r["sigmas"]
    assert [i + 1 for i, s in enumerate(sig[:-1]) if lo < s <= hi] == list(range(first, last + 1))
    assert (first, last) != (1, 6)  # a 100% tolerance lets at least one end step go
    (entry_,) = load_model(out).tuned
    assert entry_.guidance_interval == pytest.approx((lo, hi)) and entry_.accuracy == {}
    assert entry_.interval_distance == pytest.approx(r["interval_distance"], abs=1e-6)
    mf = load_model(model_file)
    solver = tune.Solver(mf, "dpm++2m", 2.0, [0, 1], 8, torch.device("cpu"))
    val = [tune.VALIDATION_BASE + i for i in range(4)]
    ref = solver.images(val, tune.VALIDATION_BASE, 30, "dpm++2m", registry.resolve_sigmas("dpm++2m", "auto", 30))
    own = tune.distance(solver.images(val, tune.VALIDATION_BASE, 6, sigmas=sig, interval=(lo, hi)), ref)
    assert own == pytest.approx(r["interval_distance"]["interval"], abs=1e-6)
    assert r["interval_distance"]["full"] == pytest.approx(r["distance"]["tuned"], abs=1e-6)


def test_tune_adds_an_interval_to_the_stored_sigmas_without_moving_them(model_file, tmp_path):
    """--start tuned with no budget to move: the stored sigmas stay, and --guidance-interval stores the
    interval found for them (the file's entry gains it; the sigmas are the same numbers)."""
    sig = hand_sigmas(6)
    copy = tuned_copy(model_file, tmp_path / "t.safetensors", [entry(sig)])
    res = diffcli("tune", copy, "--steps", 6, *FAST, "--max-evaluations", 1, "--start", "tuned",
                  "--guidance-interval", "--distance-tolerance", 100, "--in-place", "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    assert r["stored_before"] and not r["better"] and r["stored"] == str(copy)
    (now,) = load_model(copy).tuned
    assert list(now.sigmas) == pytest.approx(sig, rel=1e-12) and now.guidance_interval == pytest.approx(r["guidance_interval"])
    assert now.interval_distance == pytest.approx(r["interval_distance"], abs=1e-6)
    res = diffcli("tune", copy, "--steps", 6, *FAST, "--max-evaluations", 1, "--start", "tuned",
                  "--guidance-interval", "--distance-tolerance", 100, "--in-place")
    assert "the stored sigmas stay" in res.stderr and "guidance interval is stored" in res.stderr


def test_tune_reports_progress_through_every_reference_step(model_file):
    """A many-step reference takes minutes: progress counts its steps over all batches of both seed sets
    (5 training seeds in batches of 4 are 2 batches, 3 validation seeds 1: 3 x 30 steps)."""
    calls = []
    opts = tune.TuneOptions(model=str(model_file), steps=3, seeds=5, validation_seeds=3, reference="dpm++2m:30",
                            batch_size=4, max_evaluations=2)
    tune.tune(opts, progress=lambda i, n, task: calls.append((i, n, task)))
    ref = [(i, n) for i, n, task in calls if task == "reference"]
    assert [i for i, _ in ref] == list(range(1, 91)) and {n for _, n in ref} == {90}
    assert calls.index((90, 90, "reference")) < min(k for k, c in enumerate(calls) if c[2] == "search")


def test_reference_cache_holds_the_reference_and_is_read_back(model_file, tmp_path, monkeypatch):
    """The cache holds the reference solves themselves (checked against an independent solve), and a
    second tune reads them instead of solving again, with the same result."""
    from safetensors.torch import load_file

    cache = tmp_path / "ref.safetensors"
    args = ["tune", model_file, "--steps", 3, *FAST, "--max-evaluations", 3, "--reference-cache", cache, "--json"]
    first = diffcli(*args)
    assert first.exit_code == 0, first.output
    assert "reference kept in" in first.stderr
    mf = load_model(model_file)
    solver = tune.Solver(mf, "dpm++2m", 2.0, [0, 1], 8, torch.device("cpu"))
    val = [tune.VALIDATION_BASE + i for i in range(4)]
    own = solver.images(val, tune.VALIDATION_BASE, 30, "dpm++2m", registry.resolve_sigmas("dpm++2m", "auto", 30))
    assert torch.equal(load_file(cache)["validation"], own)
    stamp = cache.stat().st_mtime_ns
    calls = []
    real = tune.Solver.images

    def images(self, seeds, offset, steps, *a, **kw):
        calls.append(steps)
        return real(self, seeds, offset, steps, *a, **kw)

    monkeypatch.setattr(tune.Solver, "images", images)
    second = diffcli(*args)
    assert second.exit_code == 0, second.output
    assert "reference read from" in second.stderr and 30 not in calls and cache.stat().st_mtime_ns == stamp
    assert records(second)[0]["distance"] == records(first)[0]["distance"]


def test_reference_cache_of_another_reference_or_damaged_is_computed_again(model_file, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "ref.safetensors"
    base = ["tune", model_file, "--steps", 3, "--seeds", 4, "--validation-seeds", 4, "--batch-size", 8,
            "--max-evaluations", 1, "--reference-cache", cache]
    assert diffcli(*base, "--reference", "dpm++2m:20").exit_code == 0
    res = diffcli(*base, "--reference", "dpm++2m:30")
    assert res.exit_code == 0 and "holds the reference of another" in res.stderr
    good = load_file(cache)
    header = tune.REFERENCE_FORMAT
    from diffcli.files import checkpoint

    meta = checkpoint.read_header(cache, header, "x")[0].meta
    bad = {**good, "train": torch.full_like(good["train"], float("nan"))}
    meta["digest"] = tune._images_digest(bad)  # damage the digest does not catch: values no solve gives
    checkpoint.write(cache, bad, meta, header)
    res = diffcli(*base, "--reference", "dpm++2m:30")
    assert res.exit_code == 0 and "is damaged" in res.stderr and "NaN" in res.stderr
    assert torch.equal(load_file(cache)["train"], good["train"])


def test_reference_cache_never_replaces_a_file_of_another_kind(model_file, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(model_file.read_bytes())
    res = diffcli("tune", model_file, "--steps", 3, *FAST, "--reference-cache", other)
    assert res.exit_code == 4 and "is not a tune reference cache" in res.output and res.output.count("\n") == 1
    assert other.read_bytes() == model_file.read_bytes()
    res = diffcli("tune", model_file, "--steps", 3, *FAST, "--reference-cache", tmp_path / "ref.pt")
    assert res.exit_code == 2 and "--reference-cache must end in .safetensors" in res.output


def test_tune_in_place_replaces_only_the_metadata(model_file):
    before = load_model(model_file)
    res = diffcli("tune", model_file, "--steps", 4, *FAST, "--max-evaluations", 12, "--in-place", "--json")
    assert res.exit_code == 0, res.output
    (r,) = records(res)
    after = load_model(model_file)
    if r["better"]:
        assert r["stored"] == str(model_file) and len(after.tuned) == 1
    assert all(torch.equal(before.model.state_dict()[k], v) for k, v in after.model.state_dict().items())
    assert not [p for p in model_file.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_an_interrupted_tune_leaves_the_model_file_untouched(model_file, monkeypatch):
    before = model_file.read_bytes()
    calls = [0]
    real = tune.Solver.images

    def images(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(tune.Solver, "images", images)
    res = diffcli("tune", model_file, "--steps", 4, *FAST, "--in-place")
    assert res.exit_code == 130 and "interrupted" in res.output
    assert model_file.read_bytes() == before


@pytest.mark.parametrize("args, code, message", [
    (["--steps", 1], 2, "--steps must be between 2 and the model's 100 timesteps, got 1"),
    (["--steps", 101], 2, "--steps must be between 2 and the model's 100 timesteps, got 101"),
    (["--steps", 4, "--sampler", "euler_a"], 2, "tune needs a deterministic ODE sampler"),
    (["--steps", 4, "--sampler", "ddim"], 2, "euler takes the same steps as ddim and can be tuned"),
    (["--steps", 4, "--reference", "ddpm:100"], 2, "--reference needs a deterministic sampler"),
    (["--steps", 4, "--reference", "ddim"], 2, "--reference must be SAMPLER:STEPS"),
    (["--steps", 4, "--out", "x.safetensors", "--in-place"], 2, "give either --out FILE or --in-place"),
    (["--steps", 4, "--guidance-interval", "--distance-tolerance", -1], 2,
     "--distance-tolerance must be between 0 and 100 percent, got -1.0"),
    (["--steps", 4, "--class", "zebra"], 2, "unknown class 'zebra'"),
    (["--steps", 4, "--start", "best"], 2, "--start must be one of edm, karras, none or tuned, got 'best'"),
    (["--steps", 4, "--start", "tuned"], 2, "holds no tuned dpm++2m sigmas at 4 steps (it has: none)"),
])
def test_tune_refuses_bad_options_with_one_line(model_file, args, code, message):
    before = model_file.read_bytes()
    res = diffcli("tune", model_file, *args)
    assert res.exit_code == code, res.output
    assert message in res.output and res.output.count("\n") == 1
    assert model_file.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only files")
def test_tune_in_place_refuses_a_read_only_model_before_any_work(model_file):
    model_file.chmod(0o444)
    res = diffcli("tune", model_file, "--steps", 4, "--in-place")
    assert res.exit_code == 4 and "is read-only" in res.output


def test_tune_in_place_refuses_a_model_in_a_read_only_folder(model_file, monkeypatch):
    """Root ignores file modes, so the check is made to see a read-only file the way os.access reports it."""
    real = os.access
    monkeypatch.setattr(tune.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    res = diffcli("tune", model_file, "--steps", 4, "--in-place")
    assert res.exit_code == 4, res.output
    assert f"{model_file} is read-only" in res.output and res.output.count("\n") == 1


def test_tune_refuses_an_existing_out_file_before_any_work(model_file, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    res = diffcli("tune", model_file, "--steps", 4, "--out", out)
    assert res.exit_code == 3 and "exists" in res.output and out.read_bytes() == b"keep"


def test_explicit_sigmas_are_checked():
    top = ode.sigma_max(SCHEDULE)
    assert ode.explicit_sigmas(SCHEDULE, 2, [top, 1.0, 0]) == [top, 1.0, 0.0]
    for bad in ([top, 1.0], [top, 2.0, 3.0, 0.0], [top * 2, 1.0, 0.0], [top, float("nan"), 0.0]):
        with pytest.raises(UsageError):
            ode.explicit_sigmas(SCHEDULE, len(bad) - 1 if len(bad) != 2 else 2, bad)


def test_the_edm_list_given_as_values_runs_exactly_as_edm(make_dit):
    """A tuned list starts with the same first-order step from the top as edm, so the search's start
    (the edm list as values) is the edm family itself, for every sampler."""
    model = make_dit(num_classes=2, in_channels=1)
    for sampler in ("heun", "dpm++2m", "euler"):
        sig = ode.step_sigmas(SCHEDULE, 5, "trailing", "edm")
        kw = dict(seeds=[0, 1], labels=torch.tensor([0, 1]), null_label=2, guidance=2.0, prediction="v")
        a = registry.sample(model, SCHEDULE, (1, 8, 8), 5, sampler, sigmas="edm", **kw)
        b = registry.sample(model, SCHEDULE, (1, 8, 8), 5, sampler, sigmas=sig, **kw)
        assert torch.equal(a.images, b.images) and a.nfe == b.nfe, sampler


def test_memo_gives_the_models_own_outputs_and_skips_the_shared_start(make_dit):
    """Two step lists that differ from their 4th level on: the second run looks up the evaluations at the
    first three levels (the same inputs) and its images are those of the bare model, bit for bit."""
    model = make_dit(num_classes=2, in_channels=1)
    memo = tune.Memo(model, size=64)
    a, b = hand_sigmas(6), hand_sigmas(6)
    b[3] = math.sqrt(b[3] * b[4])
    kw = dict(seeds=[0, 1], labels=torch.tensor([0, 1]), null_label=2, guidance=2.0, prediction="v")
    for sig in (a, b):
        bare = registry.sample(model, SCHEDULE, (1, 8, 8), 6, "dpm++2m", sigmas=sig, **kw)
        memoised = registry.sample(memo, SCHEDULE, (1, 8, 8), 6, "dpm++2m", sigmas=sig, **kw)
        assert torch.equal(bare.images, memoised.images)
    assert memo.misses == 6 + 3 and memo.hits == 3
