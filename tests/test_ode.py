"""The ODE samplers (diffcli.diffusion.ode) against a problem whose answer is known in closed form.

Toy data: x0 ~ N(mu, s^2) per pixel. In the VE view x = x0 + sigma n the ideal denoiser is
    D(x; sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)
and the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, Eq. 3) is solved by
    x(sigma) - mu = (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).
Every sampler ends with the step sigma_min -> 0, which returns D(x; sigma_min); what it computes is
therefore exact(sigma_max -> sigma_min) followed by D, and that is what the convergence tests compare
to (the true x(0) differs from it by O(sigma_min^2 / s^2), about 2e-4 here).

The toy is wrapped as the DDPM model the samplers query, f(x_t, t, y) -> eps or v: it finds sigma_t
by interpolating log sigma over the schedule's table at the (fractional) t it is given, written here
independently of diffcli.diffusion.ode with numpy.
"""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffcli.diffusion import ode, registry
from diffcli.cli import app
from diffcli.errors import UsageError
from diffcli.diffusion.registry import sample
from diffcli.diffusion.samplers import ImageNoise
from diffcli.diffusion.schedule import NoiseSchedule

LINEAR = NoiseSchedule("linear", 1000)
COSINE = NoiseSchedule("cosine", 1000)
ZERO_SNR = NoiseSchedule("linear", 1000, zero_terminal_snr=True)
MU, S = 0.3, 0.5
SHAPE = (1, 3, 3)
F64 = torch.float64
DETERMINISTIC = ("euler", "heun", "dpm++2m")


def table_sigma(schedule: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    """sigma at fractional t: log sigma interpolated linearly between timesteps (finite part of the table)."""
    sig = schedule.sigmas.numpy()
    sig = sig[np.isfinite(sig)]
    return np.exp(np.interp(t, np.arange(len(sig)), np.log(sig)))


def gaussian_model(schedule: NoiseSchedule, prediction: str = "epsilon", mu_of_label=None, calls: list | None = None):
    """The ideal DDPM model for x0 ~ N(mu, S^2): eps (or v) = E[eps | x_t] at timestep t.
    mu_of_label(y) -> (B,) means per image (None: MU for all)."""

    def f(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if calls is not None:
            calls.append((x_t.shape[0], t.clone()))
        sig = torch.from_numpy(table_sigma(schedule, t.double().numpy())).to(x_t).reshape(-1, 1, 1, 1)
        mu = MU if mu_of_label is None else mu_of_label(y).to(x_t).reshape(-1, 1, 1, 1)
        ab = 1 / (1 + sig**2)
        x = x_t / ab.sqrt()  # VE view
        D = mu + S**2 / (S**2 + sig**2) * (x - mu)
        eps = (x - D) / sig
        return eps if prediction == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * D

    return f


def run(sampler, steps, schedule=LINEAR, seeds=(0, 1), shape=SHAPE, **kw):
    kw = {"dtype": F64, "clip_x0": None, **kw}
    model = kw.pop("model", None) or gaussian_model(schedule, kw.get("prediction", "epsilon"))
    return sample(model, schedule, shape, steps, sampler, seeds=list(seeds), **kw)


def exact(schedule, steps, sigmas="karras", seeds=(0, 1), spacing="trailing"):
    """exact(sigma_max -> sigma_min) then D(.; sigma_min), and the true x(0), from the same initial noise."""
    sig = ode.step_sigmas(schedule, steps, spacing, sigmas)
    s_max, s_min = sig[0], sig[-2]
    x = ImageNoise(list(seeds), SHAPE, torch.device("cpu"), F64).draw() * s_max
    x_min = MU + (x - MU) * math.sqrt(S**2 + s_min**2) / math.sqrt(S**2 + s_max**2)
    return MU + S**2 / (S**2 + s_min**2) * (x_min - MU), MU + (x - MU) * S / math.sqrt(S**2 + s_max**2)


# --------------------------------------------------------------------------------------------------
# Sigmas and timesteps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [LINEAR, COSINE, ZERO_SNR])
def test_sigma_to_t_inverts_the_table(schedule):
    for t in (0, 1, 17, 500, 997, 998):
        assert ode.sigma_to_t(schedule, float(schedule.sigmas[t])) == t  # exactly, table values
    for t in (0.25, 10.5, 512.75, 997.9):
        sigma = float(table_sigma(schedule, np.array(t)))
        assert ode.sigma_to_t(schedule, sigma) == pytest.approx(t, abs=1e-9)
    assert ode.sigma_to_t(schedule, 1e-9) == 0.0  # clamped to the ends of the table
    assert ode.sigma_to_t(schedule, 1e9) == (998.0 if schedule is ZERO_SNR else 999.0)


def test_step_sigmas_default_are_the_spacing_timesteps_then_zero():
    for spacing in ("trailing", "leading", "linspace"):
        ts = LINEAR.timesteps(7, spacing).tolist()
        assert ode.step_sigmas(LINEAR, 7, spacing) == [float(LINEAR.sigmas[t]) for t in ts] + [0.0]
    assert run("euler", 7).timesteps == [float(t) for t in LINEAR.timesteps(7).tolist()]


def test_karras_sigmas_follow_eq_5_between_the_schedule_ends():
    sig = ode.step_sigmas(COSINE, 6, sigmas="karras")
    s_min, s_max = float(COSINE.sigmas[0]), float(COSINE.sigmas[-1])
    rho = 7.0
    want = [(s_max ** (1 / rho) + i / 5 * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho for i in range(6)]
    assert sig[0] == s_max and sig[5] == s_min and sig[6] == 0.0
    np.testing.assert_allclose(sig[:6], want, rtol=1e-12)
    assert all(a > b for a, b in pairwise(sig))
    assert ode.step_sigmas(COSINE, 1, sigmas="karras") == [s_max, 0.0]


def test_zero_terminal_snr_clamps_sigma_max_to_the_last_finite_sigma():
    top = float(ZERO_SNR.sigmas[998])
    assert math.isinf(float(ZERO_SNR.sigmas[999])) and ode.sigma_max(ZERO_SNR) == top
    assert ode.step_sigmas(ZERO_SNR, 4)[0] == top
    assert ode.step_sigmas(ZERO_SNR, 4, sigmas="karras")[0] == top
    res = run("heun", 6, ZERO_SNR, prediction="v")
    assert res.timesteps[0] == 998.0 and torch.isfinite(res.images).all()


# --------------------------------------------------------------------------------------------------
# Convergence to the exact solution, at the expected order
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, steps, ratio",
    [("euler", (20, 40, 80), (1.6, 2.5)), ("heun", (40, 80, 160), (3.0, 5.5)), ("dpm++2m", (40, 80, 160), (3.0, 5.5))],
)
def test_converges_to_the_exact_ode_solution_at_its_order(sampler, steps, ratio):
    """Karras sigmas keep sigma_min and sigma_max fixed, so doubling N halves every step (in sigma^(1/rho))."""
    errors = []
    for n in steps:
        res = run(sampler, n, sigmas="karras")
        target, _ = exact(LINEAR, n)
        errors.append(float((res.images - target).abs().max()))
    lo, hi = ratio
    for coarse, fine in pairwise(errors):
        assert lo <= coarse / fine <= hi, errors
    assert errors[-1] < (0.06 if sampler == "euler" else 2e-3), errors


def test_the_result_is_the_true_x0_up_to_the_last_step():
    res = run("dpm++2m", 160, sigmas="karras")
    target, x0 = exact(LINEAR, 160)
    floor = float((target - x0).abs().max())  # the last step's O(sigma_min^2) error, the same for all samplers
    assert 1e-5 < floor < 1e-3
    assert float((res.images - x0).abs().max()) < floor + 1e-3


def test_samplers_agree_with_each_other_and_with_ddim_at_many_steps():
    ddim = run("ddim", 250).images
    euler = run("euler", 250).images
    heun = run("heun", 250).images
    dpm = run("dpm++2m", 250).images
    target, _ = exact(LINEAR, 250, sigmas=None)
    assert float((heun - target).abs().max()) < 3e-4  # measured 1.3e-4
    assert float((dpm - target).abs().max()) < 3e-3  # 1.4e-3: uneven steps in lambda slow it down here
    assert float((heun - dpm).abs().max()) < 3e-3
    assert float((euler - ddim).abs().max()) < 1e-4  # the same update (only the initial noise scale differs)
    assert float((euler - target).abs().max()) < 0.02  # first order: further off (0.012), the same answer


# --------------------------------------------------------------------------------------------------
# Euler is DDIM; Euler ancestral is DDIM with eta = 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_euler_is_ddim_and_euler_ancestral_is_ddim_eta_one(prediction):
    """In the VE view a DDIM step is x_n = D + (sigma_n / sigma)(x - D), Euler's step written out; with
    eta = 1 it is the ancestral split. The one difference: DDIM starts from x_T = n, the ODE samplers
    from sigma_max n (x_T = sqrt(1 - ab_T) n), a relative 1e-9 for the cosine schedule."""
    kw = {"prediction": prediction, "seeds": (3, 4, 5)}
    ddim = run("ddim", 12, COSINE, **kw).images
    euler = run("euler", 12, COSINE, **kw).images
    torch.testing.assert_close(euler, ddim, rtol=0, atol=1e-8)
    ddim1 = run("ddim", 12, COSINE, eta=1.0, **kw).images
    euler_a = run("euler_a", 12, COSINE, **kw).images
    torch.testing.assert_close(euler_a, ddim1, rtol=0, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Seeds, predictions, guidance, clipping, NFE
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", registry.ODE_SAMPLERS)
def test_an_image_depends_only_on_its_seed(make_dit, sampler):
    """Bit-identical from the same seed; independent of the batch around it (up to batched-matmul rounding)."""
    model = make_dit(in_channels=1, learn_sigma=False)
    kw = {"dtype": torch.float32, "clip_x0": 1.0, "model": model, "prediction": "v", "shape": (1, 8, 8)}
    with torch.inference_mode():
        a = run(sampler, 4, seeds=(7, 8, 9), **kw).images
        b = run(sampler, 4, seeds=(7, 8, 9), **kw).images
        alone = run(sampler, 4, seeds=(8,), **kw).images
    assert torch.equal(a, b)
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=1e-5)


def test_euler_ancestral_draws_its_noise_per_image():
    a = run("euler_a", 10, seeds=(1, 2, 1)).images
    assert torch.equal(a[0], a[2])  # same seed, same image, even within one batch
    assert float((a[0] - a[1]).abs().max()) > 0.1
    deterministic = run("euler", 10, seeds=(1,)).images
    assert float((a[0] - deterministic[0]).abs().max()) > 0.01  # the fresh noise does change the path


@pytest.mark.parametrize("sampler", registry.ODE_SAMPLERS)
def test_v_and_epsilon_models_give_the_same_images(sampler):
    eps = run(sampler, 8, COSINE, prediction="epsilon").images
    v = run(sampler, 8, COSINE, prediction="v").images
    torch.testing.assert_close(v, eps, rtol=0, atol=1e-8)  # float64 rounding, scaled up by sigma_max = 2e4


def test_guidance():
    """The toy's eps is affine in mu, so guidance w turns means (mu_u, mu_c) into mu_u + w (mu_c - mu_u)."""
    null = 9
    mu = {null: 0.0, 0: 0.4, 1: -0.2}

    def means(y, table=mu):
        return torch.tensor([table[int(c)] for c in y])

    labels = torch.tensor([0, 1])
    calls: list = []
    model = gaussian_model(LINEAR, mu_of_label=means, calls=calls)
    kw = {"labels": labels, "null_label": null, "model": model}
    cond = run("heun", 6, **kw)
    assert len(calls) == 11 and all(B == 2 for B, _ in calls)
    same = run("heun", 6, guidance=1.0, **kw)
    assert torch.equal(same.images, cond.images)  # w = 1 is the conditional model, no extra evaluation

    calls.clear()
    guided = run("heun", 6, guidance=2.5, **kw)
    assert guided.nfe == 11 and len(calls) == 11 and all(B == 4 for B, _ in calls)  # one batched call
    shifted = {0: 0.0 + 2.5 * 0.4, 1: 0.0 + 2.5 * -0.2}
    plain = run("heun", 6, labels=labels, model=gaussian_model(LINEAR, mu_of_label=lambda y: means(y, shifted)))
    torch.testing.assert_close(guided.images, plain.images, rtol=0, atol=1e-7)  # rounding, scaled by sigma_max


@pytest.mark.parametrize("sampler", registry.ODE_SAMPLERS)
def test_clipping_keeps_the_image_in_range(sampler):
    model = gaussian_model(LINEAR)

    def loud(x, t, y):  # an overconfident model: x0 far beyond +-1 without clipping
        return 3 * model(x, t, y)

    free = run(sampler, 6, model=loud, clip_x0=None).images
    clipped = run(sampler, 6, model=loud, clip_x0=1.0).images
    assert float(free.abs().max()) > 1.5
    assert float(clipped.abs().max()) <= 1 + 1e-12


@pytest.mark.parametrize("sampler, steps, nfe", [("euler", 7, 7), ("euler_a", 7, 7), ("heun", 7, 13), ("dpm++2m", 7, 7), ("heun", 1, 1)])
def test_nfe_is_the_number_of_model_calls(sampler, steps, nfe):
    calls: list = []
    progress: list = []
    res = run(sampler, steps, model=gaussian_model(LINEAR, calls=calls), callback=lambda i, n: progress.append((i, n)))
    assert res.nfe == len(calls) == nfe == ode.nfe(sampler, steps)
    assert progress == [(i + 1, steps) for i in range(steps)]
    assert len(res.sigmas) == steps + 1 and res.sigmas[-1] == 0.0


def test_the_model_sees_the_fractional_timestep_and_the_matching_alpha_bar():
    calls: list = []
    run("euler", 5, model=gaussian_model(LINEAR, calls=calls), sigmas="karras", seeds=(0,))
    ts = [float(t[0]) for _, t in calls]
    sig = ode.step_sigmas(LINEAR, 5, sigmas="karras")[:-1]
    np.testing.assert_allclose(table_sigma(LINEAR, np.array(ts)), sig, rtol=1e-12)
    assert ts[0] == 999.0 and ts[-1] == 0.0 and not float(ts[2]).is_integer()


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_bad_sigmas_and_samplers_raise_usage_errors():
    with pytest.raises(UsageError, match="unknown sigmas 'exponential'"):
        run("heun", 4, sigmas="exponential")
    with pytest.raises(UsageError, match="--sigmas karras needs an ODE sampler"):
        run("ddim", 4, sigmas="karras")
    with pytest.raises(UsageError, match="unknown ODE sampler"):
        ode.sample(gaussian_model(LINEAR), LINEAR, SHAPE, 4, "rk4")


# --------------------------------------------------------------------------------------------------
# The command line: sample --sigmas, inspect-schedule --sampler
# --------------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "ddim", "--sigmas", "karras"], "--sigmas karras needs an ODE sampler"),
        (["--sampler", "heun", "--sigmas", "polyexponential"], "unknown sigmas 'polyexponential'"),
    ],
)
def test_sample_rejects_bad_sigmas_before_reading_the_model(tmp_path, args, message):
    result = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def json_records(stdout: str) -> list[dict]:
    """inspect-schedule --json: JSON Lines, each record's kind first."""
    import json

    records = [json.loads(line) for line in stdout.splitlines()]
    assert all(next(iter(r)) == "kind" for r in records), records
    return records


def test_inspect_schedule_shows_the_karras_noise_levels():
    result = runner.invoke(app, ["inspect-schedule", "--schedule", "linear", "--steps", "5", "--sampler", "heun",
                                 "--sigmas", "karras", "--json"])
    assert result.exit_code == 0, result.output
    sampling, schedule, *rows = json_records(result.stdout)
    assert (sampling["kind"], schedule["kind"], schedule["schedule"]) == ("sampling", "schedule", LINEAR.to_dict())
    assert [r["kind"] for r in rows] == ["row"] * 5
    want = ode.step_sigmas(LINEAR, 5, sigmas="karras")
    assert sampling["sampler"] == "heun" and sampling["sigmas"] == "karras" and sampling["nfe"] == 9
    assert sampling["step_sigmas"] == want
    assert sampling["timesteps"][0] == 999 and sampling["timesteps"][-1] == 0
    assert sampling["timesteps"][1:-1] == pytest.approx([ode.sigma_to_t(LINEAR, s) for s in want[1:-2]])
    assert [r["t"] for r in rows] == sampling["timesteps"]
    assert [r["sigma"] for r in rows] == want[:-1]
    assert rows[2]["alpha_bar"] == pytest.approx(1 / (1 + want[2] ** 2), rel=1e-15)

    table = runner.invoke(app, ["inspect-schedule", "--schedule", "linear", "--steps", "5", "--sampler", "heun",
                                "--sigmas", "karras"])
    assert table.exit_code == 0, table.output
    assert "the 5 noise levels heun steps from (karras sigmas, rho 7), in order, then sigma 0; 9 model evaluations" in table.stdout
    assert f"│ {sampling['timesteps'][1]:.2f} │" in table.stdout


def test_inspect_schedule_default_ode_steps_and_ddim(tmp_path):
    ztsnr = NoiseSchedule("linear", 1000, zero_terminal_snr=True)
    # an ODE sampler at the --spacing timesteps (--sigmas none)
    result = runner.invoke(app, ["inspect-schedule", "--schedule", "linear", "--steps", "4", "--sampler", "dpm++2m",
                                 "--sigmas", "none", "--zero-terminal-snr", "--json"])
    assert result.exit_code == 0, result.output
    sampling = json_records(result.stdout)[0]
    assert sampling["kind"] == "sampling" and (sampling["sigmas"], sampling["spacing"]) == (None, "trailing")
    assert sampling["timesteps"] == [998, 749, 499, 249]  # t = 999 has sigma = inf: clamped to t = 998
    assert sampling["nfe"] == 4 and sampling["step_sigmas"] == ode.step_sigmas(ztsnr, 4)
    assert sampling["step_sigmas"][-1] == 0.0

    # the default (--sigmas auto) for an ODE sampler is edm, as for sample: no spacing
    result = runner.invoke(app, ["inspect-schedule", "--schedule", "linear", "--steps", "4", "--sampler", "dpm++2m",
                                 "--zero-terminal-snr", "--json"])
    assert result.exit_code == 0, result.output
    sampling = json_records(result.stdout)[0]
    assert (sampling["sampler"], sampling["sigmas"], sampling["spacing"], sampling["nfe"]) == ("dpm++2m", "edm", None, 4)
    assert sampling["step_sigmas"] == ode.step_sigmas(ztsnr, 4, sigmas="edm")
    assert sampling["step_sigmas"][1] == ode.EDM_SIGMA_MAX  # sigma_max (t = 998) > 80: the jump to 80
    assert sampling["timesteps"][0] == 998 and sampling["timesteps"][-1] == 0
    assert sampling["timesteps"] == pytest.approx([ode.sigma_to_t(ztsnr, s) for s in sampling["step_sigmas"][:-1]])

    result = runner.invoke(app, ["inspect-schedule", "--steps", "4", "--sampler", "ddim", "--json"])
    assert result.exit_code == 0, result.output
    sampling = json_records(result.stdout)[0]
    assert sampling["timesteps"] == [999, 749, 499, 249] and sampling["step_sigmas"] is None
    assert (sampling["sigmas"], sampling["spacing"]) == (None, "trailing")

    plot = tmp_path / "karras.png"
    result = runner.invoke(app, ["inspect-schedule", "--steps", "8", "--sampler", "euler", "--sigmas", "karras", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert plot.stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampler", "heun"], "--sampler needs --steps"),
        (["--sigmas", "karras"], "--sigmas needs --steps"),
        (["--steps", "5", "--sampler", "ddim", "--sigmas", "karras"], "--sigmas karras needs an ODE sampler"),
        (["--steps", "5", "--sampler", "ddpm", "--sigmas", "edm"], "--sigmas edm needs an ODE sampler"),
        (["--steps", "5", "--spacing", "leading"], "--spacing does not apply to --sigmas edm"),
        (["--steps", "5", "--sampler", "heun", "--compare", "linear,cosine"], "heun's default edm sigmas depend on each"),
        (["--steps", "5", "--sampler", "rk4"], "unknown sampler 'rk4'"),
        (["--steps", "5", "--sampler", "heun", "--sigmas", "exp"], "unknown sigmas 'exp'"),
        (["--steps", "5", "--sampler", "heun", "--sigmas", "karras", "--spacing", "leading"], "--spacing does not apply"),
        (["--steps", "5", "--sampler", "heun", "--sigmas", "karras", "--compare", "linear,cosine"], "one schedule at a time"),
    ],
)
def test_inspect_schedule_bad_sampler_options_exit_2(args, message):
    result = runner.invoke(app, ["inspect-schedule", *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr


def test_edm_sigmas_jump_from_sigma_max_to_80_then_karras():
    from diffcli.diffusion.ode import EDM_SIGMA_MAX, karras_sigmas, nfe, sigma_max, step_sigmas

    s = NoiseSchedule("cosine", 1000)
    sig = step_sigmas(s, 15, sigmas="edm")
    assert len(sig) == 16 and sig[-1] == 0.0
    assert sig[0] == sigma_max(s) and sig[0] > 20000  # the clipped cosine schedule's last timestep
    assert sig[1:-1] == karras_sigmas(14, float(s.sigmas[0]), EDM_SIGMA_MAX)
    assert nfe("heun", 15, "edm", s) == 2 * 15 - 2  # the jump is one first-order evaluation
    # a schedule whose sigma_max is below 80 gets plain karras sigmas
    small = NoiseSchedule("linear", 1000, beta_end=0.005)
    assert sigma_max(small) < EDM_SIGMA_MAX
    assert step_sigmas(small, 10, sigmas="edm") == step_sigmas(small, 10, sigmas="karras")
