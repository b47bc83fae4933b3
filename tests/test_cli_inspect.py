"""`diffcli inspect-schedule`, run the way a user would: invoke, check the exit code, then the output."""

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcli.cli import app
from diffcli.diffusion.schedule import NoiseSchedule

runner = CliRunner()


def inspect(*args: str):
    return runner.invoke(app, ["inspect-schedule", *args])


def records(stdout: str) -> list[dict]:
    """The JSON Lines of --json; every record names its kind first."""
    recs = [json.loads(line) for line in stdout.splitlines()]
    assert all(next(iter(r)) == "kind" for r in recs), recs
    return recs


def one_schedule(stdout: str) -> tuple[dict, list[dict]]:
    """The `schedule` record and its `row` records, when no `sampling` record comes first."""
    head, *rows = records(stdout)
    assert head["kind"] == "schedule" and {r["kind"] for r in rows} == {"row"}
    assert {r["schedule"] for r in rows} == {head["schedule"]["kind"]}
    return head, rows


def table_timesteps(stdout: str) -> list[int]:
    """The t column of the rich table(s) printed on stdout."""
    return [int(line.split("│")[1]) for line in stdout.splitlines() if line.startswith("│")]


def test_default_table():
    # the default schedule is train's, cosine (it has no beta range to show)
    result = inspect()
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("cosine schedule, T=1000\n")
    assert table_timesteps(result.stdout) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
    assert "│ 999 │      0.999 │ 2.4288e-09 │" in result.stdout
    assert "cosine: terminal SNR -86.15 dB (alpha_bar 2.4288e-09) at t=999; SNR crosses 0 dB between t=495 and t=496" in result.stdout
    assert result.stdout == inspect("--schedule", "cosine").stdout

    result = inspect("--schedule", "linear")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith("linear schedule, T=1000, beta 0.0001 to 0.02\n")
    for header in ("t", "beta", "alpha_bar", "sqrt(ab)", "sqrt(1-ab)", "SNR dB", "sigma"):
        assert f" {header} " in out
    assert table_timesteps(out) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999]
    assert "│ 999 │     0.02 │ 4.0358e-05 │" in out
    assert "linear: terminal SNR -43.94 dB (alpha_bar 4.0358e-05) at t=999; SNR crosses 0 dB between t=258 and t=259" in out


def test_rows():
    result = inspect("--rows", "4", "--timesteps", "100")
    assert result.exit_code == 0, result.output
    assert table_timesteps(result.stdout) == [0, 33, 66, 99]


def test_json_has_every_value_at_full_precision():
    result = inspect("--json", "--schedule", "cosine")
    assert result.exit_code == 0, result.output
    entry, rows = one_schedule(result.stdout)  # no `sampling` record without --steps
    s = NoiseSchedule("cosine", 1000)
    assert entry["schedule"] == s.to_dict()
    assert [r["t"] for r in rows] == list(range(1000))
    for t in (0, 1, 500, 998, 999):
        r = rows[t]
        assert r["schedule"] == "cosine"
        assert r["beta"] == float(s.betas[t])
        assert r["alpha_bar"] == float(s.alphas_cumprod[t])
        assert r["sqrt_alpha_bar"] == float(s.sqrt_alphas_cumprod[t])
        assert r["sqrt_one_minus_alpha_bar"] == float(s.sqrt_one_minus_alphas_cumprod[t])
        assert r["sigma"] == float(s.sigmas[t])
        assert r["snr_db"] == pytest.approx(10 * math.log10(float(s.snr[t])), rel=1e-14)
    assert entry["terminal_snr_db"] == rows[999]["snr_db"]
    assert entry["snr_below_0db_from_t"] == 496  # alpha_bar[495] > 1/2 > alpha_bar[496]
    assert float(s.alphas_cumprod[495]) > 0.5 > float(s.alphas_cumprod[496])


def test_json_writes_null_for_infinite_values():
    result = inspect("--json", "--zero-terminal-snr", "--rows", "2")
    assert result.exit_code == 0, result.output
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
    entry, rows = one_schedule(result.stdout)
    assert entry["schedule"]["kind"] == "cosine" and entry["schedule"]["zero_terminal_snr"] is True
    assert [r["t"] for r in rows] == [0, 999]
    last = rows[-1]
    assert last["t"] == 999 and last["alpha_bar"] == 0.0
    assert last["snr_db"] is None and last["sigma"] is None
    assert entry["terminal_snr_db"] is None


def test_csv_parses():
    result = inspect("--csv", "--compare", "linear,cosine", "--rows", "3")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["schedule"], int(r["t"])) for r in rows] == [
        ("linear", 0), ("linear", 500), ("linear", 999), ("cosine", 0), ("cosine", 500), ("cosine", 999)
    ]
    cosine = NoiseSchedule("cosine", 1000)
    assert float(rows[4]["alpha_bar"]) == float(cosine.alphas_cumprod[500])
    assert float(rows[5]["sigma"]) == float(cosine.sigmas[999])


def test_csv_has_every_row_by_default():
    result = inspect("--csv", "--timesteps", "50", "--zero-terminal-snr")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [int(r["t"]) for r in rows] == list(range(50))
    assert float(rows[-1]["sigma"]) == math.inf


def test_compare_side_by_side():
    result = inspect("--compare", "linear,cosine")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("linear, cosine schedules, T=1000")
    assert "alpha_bar" in out and "SNR dB" in out
    assert "│ 500 │   0.077797 │    0.49229 │" in out  # alpha_bar of linear and cosine at t=500
    assert "│ 500 │ -10.74 │  -0.13 │" in out  # their SNR in dB
    assert "linear: terminal SNR" in out and "cosine: terminal SNR" in out


def test_steps_show_the_visited_timesteps():
    result = inspect("--steps", "50", "--sampler", "ddim", "--spacing", "leading")
    assert result.exit_code == 0, result.output
    assert "the 50 timesteps ddim visits (leading spacing), in order" in result.stdout
    assert table_timesteps(result.stdout) == list(range(980, -1, -20))

    result = inspect("--steps", "50", "--sampler", "ddim", "--json")
    assert result.exit_code == 0, result.output
    sampling, entry, *rows = records(result.stdout)
    assert sampling == {"kind": "sampling", "steps": 50, "spacing": "trailing", "sampler": "ddim", "sigmas": None,
                        "nfe": 50, "timesteps": list(range(999, 18, -20)), "step_sigmas": None}
    assert entry["kind"] == "schedule" and entry["schedule"]["kind"] == "cosine"
    assert [(r["kind"], r["t"]) for r in rows] == [("row", t) for t in range(999, 18, -20)]

    # without --sampler: sample's default, dpm++2m with edm sigmas (a jump from sigma_max to 80, then Karras)
    from diffcli.diffusion import ode

    result = inspect("--steps", "6", "--json")
    assert result.exit_code == 0, result.output
    sampling, entry, *rows = records(result.stdout)
    cosine = NoiseSchedule("cosine", 1000)
    want = ode.step_sigmas(cosine, 6, sigmas="edm")
    assert want[1] == 80.0 and want[-1] == 0.0
    assert {k: sampling[k] for k in ("kind", "steps", "spacing", "sampler", "sigmas", "nfe")} == {
        "kind": "sampling", "steps": 6, "spacing": None, "sampler": "dpm++2m", "sigmas": "edm", "nfe": 6}
    assert sampling["step_sigmas"] == want
    assert sampling["timesteps"][0] == 999 and sampling["timesteps"][-1] == 0
    assert sampling["timesteps"] == pytest.approx([ode.sigma_to_t(cosine, s) for s in want[:-1]], rel=1e-15)
    assert [r["t"] for r in rows] == sampling["timesteps"]
    assert [r["sigma"] for r in rows] == want[:-1]
    table = inspect("--steps", "6")
    assert table.exit_code == 0, table.output
    assert "the 6 noise levels dpm++2m steps from (edm sigmas, rho 7), in order, then sigma 0; 6 model evaluations" in table.stdout

    # --spacing does not apply to those sigmas: an error, not silently ignored
    result = inspect("--steps", "50", "--spacing", "leading")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: --spacing does not apply to --sigmas edm")


def test_plot_writes_png_of_the_size_asked(tmp_path):
    path = tmp_path / "schedules.png"
    result = inspect("--compare", "linear,cosine", "--steps", "10", "--sampler", "ddim", "--plot", str(path),
                     "--width", "640", "--height", "400")
    assert result.exit_code == 0, result.output
    assert result.stderr == f"wrote {path} (640x400)\n"
    assert "linear, cosine schedules" in result.stdout  # the table still goes to stdout
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (640, 400)
        rgb = img.convert("RGB")
    colors = {c for _, c in rgb.getcolors(maxcolors=1 << 20)}
    assert len(colors) > 50  # lines, text and antialiasing, not a blank canvas

    def seen(ref):
        return any(all(abs(a - b) < 30 for a, b in zip(c, ref)) for c in colors)

    assert seen((0x1F, 0x77, 0xB4))  # the first series' blue
    assert seen((0xFF, 0x7F, 0x0E))  # the second series' orange
    assert sorted(p.name for p in tmp_path.iterdir()) == ["schedules.png"]  # no temp file left


def test_plot_quiet(tmp_path):
    result = inspect("--plot", str(tmp_path / "a.png"), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert (tmp_path / "a.png").stat().st_size > 0


def test_plot_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"keep me")
    result = inspect("--plot", str(path))
    assert result.exit_code == 3
    assert result.stderr == f"Error: {path} exists; pass --overwrite to replace it\n"
    assert result.stdout == ""
    assert path.read_bytes() == b"keep me"

    result = inspect("--plot", str(path), "--overwrite")
    assert result.exit_code == 0, result.output
    with Image.open(path) as img:
        assert img.size == (900, 600)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timesteps", "0"], "the number of timesteps must be an integer >= 2, got 0"),
        (["--beta-end", "2"], "beta end must be in (0, 1), got 2.0"),
        (["--steps", "2000"], "steps must be between 1 and the schedule's 1000 timesteps, got 2000"),
        (["--steps", "2000", "--sampler", "ddim"], "steps must be between 1 and the schedule's 1000 timesteps, got 2000"),
        (["--schedule", "quadratic"], "unknown schedule 'quadratic'"),
        (["--steps", "10", "--sampler", "ddim", "--spacing", "even"], "unknown spacing 'even'"),
        (["--steps", "10", "--sigmas", "none", "--spacing", "even"], "unknown spacing 'even'"),
        (["--steps", "10", "--spacing", "leading"], "--spacing does not apply to --sigmas edm"),
        (["--steps", "10", "--sampler", "euler", "--sigmas", "karras", "--spacing", "leading"],
         "--spacing does not apply to --sigmas karras"),
        (["--compare", "linear,cosine", "--steps", "10"], "one schedule at a time"),
        (["--rows", "1"], "rows must be between 2 and the schedule's 1000 timesteps, got 1"),
        (["--rows", "5", "--steps", "5"], "give either --rows or --steps"),
        (["--spacing", "leading"], "--spacing needs --steps"),
        (["--compare", "linear,linear"], "lists a schedule twice"),
        (["--compare", "linear,"], "kinds separated by commas"),
        (["--schedule", "cosine", "--compare", "linear,cosine"], "either --schedule or --compare"),
        (["--json", "--csv"], "either --json or --csv"),
        (["--checkpoint", "model.safetensors", "--timesteps", "10"], "--checkpoint reads the schedule"),
        (["--plot", "out.jpg"], "give a file name ending in .png"),
        (["--plot", "out.png", "--width", "10"], "the plot must be 400..4000 pixels wide"),
        (["--plot", "no-such-folder/out.png"], "the folder of --plot does not exist: no-such-folder"),
        (["--json", "--steps", "10", "--spacing", "leading"], "--spacing does not apply"),
    ],
)
def test_bad_values_exit_2_with_one_line(args, message):
    result = inspect(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    if "--json" in args:  # the same error as a record on stdout, for a pipeline
        assert records(result.stdout) == [
            {"kind": "error", "message": result.stderr.removeprefix("Error: ").rstrip("\n"), "exit_code": 2}
        ]
    else:
        assert result.stdout == ""
    assert not Path("no-such-folder").exists()


def test_checkpoint_reads_the_stored_schedule(tmp_path):
    from diffcli.files.checkpoint import save_model
    from diffcli.models.dit import DiT, ModelConfig

    cfg = ModelConfig(image_height=8, image_width=8, in_channels=1, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    stored = NoiseSchedule("cosine", 250, zero_terminal_snr=True)
    path = tmp_path / "model.safetensors"
    save_model(path, DiT(cfg), stored, "v", [])

    result = inspect("--checkpoint", str(path), "--json", "--rows", "2")
    assert result.exit_code == 0, result.output
    entry, rows = one_schedule(result.stdout)
    assert entry["schedule"] == stored.to_dict()
    assert [r["t"] for r in rows] == [0, 249]
    assert rows[0]["alpha_bar"] == float(stored.alphas_cumprod[0])


def test_checkpoint_missing_exits_4(tmp_path):
    result = inspect("--checkpoint", str(tmp_path / "nope.safetensors"))
    assert result.exit_code == 4
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1


def test_help_does_not_import_torch():
    code = "import sys, diffcli.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------------
# inspect-schedule --steps lists the timesteps `sample` really queries the model at
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_models(tmp_path_factory, make_dit):
    """cosine: sigma_max 2e4 > 80, so edm sigmas jump to 80 first; short: linear over 500 timesteps with
    zero terminal SNR (sigma_max clamped to t = 498's, below 80: edm is plain karras)."""
    folder = tmp_path_factory.mktemp("step-models")
    out = {}
    for key, schedule in (("cosine", NoiseSchedule("cosine", 1000)),
                          ("short", NoiseSchedule("linear", 500, zero_terminal_snr=True))):
        from diffcli.files.checkpoint import save_model

        out[key] = folder / f"{key}.safetensors"
        save_model(out[key], make_dit(in_channels=1, seed=4), schedule, "v", [])
    return out


SAMPLE_DEFAULT_STEPS = 15  # `sample` without --steps


@pytest.mark.parametrize("model", ["cosine", "short"])
@pytest.mark.parametrize(
    "options",
    [
        {},  # sample's defaults: dpm++2m, 15 steps, --sigmas auto (edm)
        {"sampler": "ddim", "steps": 10},
        {"sampler": "ddim", "spacing": "leading", "steps": 7},
        {"sampler": "euler", "steps": 8, "sigmas": "karras"},
        {"sampler": "dpm++2m", "steps": 12, "sigmas": "none", "spacing": "linspace"},
        {"sampler": "heun", "steps": 5},
    ],
    ids=lambda o: "-".join(map(str, o.values())) or "defaults",
)
def test_inspected_steps_are_the_timesteps_sample_gives_the_model(tmp_path, monkeypatch, step_models, model, options):
    from diffcli.sampling import generate

    checkpoint = step_models[model]
    steps = options.get("steps", SAMPLE_DEFAULT_STEPS)
    args = ["--checkpoint", str(checkpoint), "--steps", str(steps), "--json"]
    for key in ("sampler", "sigmas", "spacing"):
        if key in options:
            args += [f"--{key}", options[key]]
    result = inspect(*args)
    assert result.exit_code == 0, result.output
    sampling = records(result.stdout)[0]
    assert sampling["kind"] == "sampling" and sampling["steps"] == steps
    assert len(sampling["timesteps"]) == steps

    calls: list[float] = []

    def recording(model, device, dtype):
        def f(x, t, y):
            assert t.shape == (x.shape[0],) and bool((t == t[0]).all())  # one timestep for the whole batch
            calls.append(float(t[0]))
            return model(x, t, y)

        return f

    monkeypatch.setattr(generate, "autocast_denoiser", recording)
    opts = generate.SampleOptions(checkpoint=str(checkpoint), num_images=1, out=str(tmp_path / "out"), seed=0,
                                  device="cpu", **options)
    recs = list(generate.run(opts))
    image = next(r for r in recs if r["kind"] == "image")
    assert (image["sampler"], image["steps"], image.get("sigmas")) == (sampling["sampler"], steps, sampling["sigmas"])
    assert image["nfe"] == sampling["nfe"] == len(calls)

    # heun evaluates at the next noise level too, where its next step starts: keep each level once
    visited = [t for i, t in enumerate(calls) if i == 0 or abs(t - calls[i - 1]) > 1e-9]
    assert visited == pytest.approx(sampling["timesteps"], rel=1e-6, abs=1e-6)  # float32 as the model sees it
    if sampling["sampler"] != "heun":
        assert len(visited) == len(calls)  # one evaluation per step, each at a new level


def test_a_piped_table_is_never_cut():
    """CliRunner's stdout is not a terminal: the 7-column table keeps every digit (at rich's default
    80 columns for a pipe it was cut to '2.4288e-…')."""
    for args in (("--steps", "15"), ("--compare", "linear,cosine,scaled_linear,sigmoid", "--rows", "3")):
        result = inspect(*args)
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout
        assert "2.4288e-09" in result.stdout  # cosine's alpha_bar at t=999
