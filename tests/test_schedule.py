"""NoiseSchedule against closed forms and independent float64 computations (numpy, math).

The references below are written out from the papers' formulas; none of them calls diffcli's own
beta functions.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from diffcli.errors import UsageError
from diffcli.diffusion.schedule import NoiseSchedule

T = 1000
B0, B1 = 1e-4, 0.02


def ref_betas(kind: str, T: int, b0: float = B0, b1: float = B1) -> np.ndarray:
    t = np.arange(T, dtype=np.float64)
    if kind == "linear":  # DDPM: beta_t = b0 + t (b1 - b0) / (T - 1)
        return b0 + t * (b1 - b0) / (T - 1)
    if kind == "scaled_linear":  # linear in sqrt(beta)
        return (math.sqrt(b0) + t * (math.sqrt(b1) - math.sqrt(b0)) / (T - 1)) ** 2
    if kind == "sigmoid":  # sigmoid on [-6, 6], scaled to [b0, b1]
        x = -6 + 12 * t / (T - 1)
        return b0 + (b1 - b0) / (1 + np.exp(-x))
    raise ValueError(kind)


def improved_ddpm_f(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def ref_alpha_bar(kind: str, T: int) -> np.ndarray:
    if kind == "cosine":  # alpha_bar_t = f((t + 1) / T) / f(0), with betas clipped at 0.999
        ab = np.array([improved_ddpm_f((t + 1) / T) / improved_ddpm_f(0) for t in range(T)])
        prev = np.concatenate([[1.0], ab[:-1]])
        betas = np.minimum(1 - ab / prev, 0.999)
    else:
        betas = ref_betas(kind, T)
    return np.cumprod(1 - betas)


# --------------------------------------------------------------------------------------------------
# Betas and alpha_bar
# --------------------------------------------------------------------------------------------------


def test_golden_values():
    # Numbers that must never drift: they define what every model file trained with diffcli means.
    linear = NoiseSchedule("linear", 1000)
    assert float(linear.alphas_cumprod[999]) == pytest.approx(4.0358e-5, rel=1e-4)
    assert math.prod(1 - (1e-4 + t * (0.02 - 1e-4) / 999) for t in range(1000)) == pytest.approx(
        float(linear.alphas_cumprod[999]), rel=1e-12
    )
    cosine = NoiseSchedule("cosine", 1000)
    assert float(cosine.alphas_cumprod[500]) == pytest.approx(0.4923, abs=1e-4)
    assert float(cosine.alphas_cumprod[500]) == pytest.approx(
        improved_ddpm_f(501 / 1000) / improved_ddpm_f(0), rel=1e-12
    )


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "sigmoid"])
def test_betas_match_closed_form(kind):
    s = NoiseSchedule(kind, T, B0, B1)
    assert s.betas.dtype == torch.float64
    np.testing.assert_allclose(s.betas.numpy(), ref_betas(kind, T), rtol=1e-12, atol=0)
    assert float(s.betas[0]) == pytest.approx(ref_betas(kind, T)[0], rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("num_timesteps", [10, 1000])
def test_alpha_bar_matches_reference(kind, num_timesteps):
    s = NoiseSchedule(kind, num_timesteps)
    ref = ref_alpha_bar(kind, num_timesteps)
    ts = [0, 1, num_timesteps // 4, num_timesteps // 2, num_timesteps - 2, num_timesteps - 1]
    for t in ts:
        assert float(s.alphas_cumprod[t]) == pytest.approx(ref[t], rel=1e-10), t
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())  # strictly decreasing


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_derived_tables(kind):
    s = NoiseSchedule(kind, T)
    ab = ref_alpha_bar(kind, T)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod.numpy(), np.sqrt(ab), rtol=1e-10)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - ab), rtol=1e-10)
    np.testing.assert_allclose(s.snr.numpy(), ab / (1 - ab), rtol=1e-8)
    np.testing.assert_allclose(s.log_snr.numpy(), np.log(ab / (1 - ab)), rtol=1e-8)
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt((1 - ab) / ab), rtol=1e-8)
    assert s.alpha_bar(-1) == 1.0 and s.alpha_bar(7) == float(s.alphas_cumprod[7])


def test_cosine_last_beta_is_clipped():
    s = NoiseSchedule("cosine", T)
    assert float(s.betas[-1]) == 0.999
    assert float(s.alphas_cumprod[-1]) == pytest.approx(float(s.alphas_cumprod[-2]) * 0.001, rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_zero_terminal_snr(kind):
    plain, zsnr = NoiseSchedule(kind, T), NoiseSchedule(kind, T, zero_terminal_snr=True)
    assert float(zsnr.alphas_cumprod[-1]) == 0.0  # exactly
    assert float(zsnr.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-14)
    # Lin et al. 2024, Alg. 1: sqrt(alpha_bar) shifted and scaled, so an affine map of the old one.
    old = np.sqrt(ref_alpha_bar(kind, T))
    new = (old - old[-1]) * old[0] / (old[0] - old[-1])
    np.testing.assert_allclose(zsnr.sqrt_alphas_cumprod.numpy(), new, rtol=1e-9, atol=1e-15)
    assert float(zsnr.betas[-1]) == 1.0
    assert float(zsnr.snr[-1]) == 0.0
    assert float(zsnr.log_snr[-1]) == -math.inf and float(zsnr.sigmas[-1]) == math.inf
    assert bool(torch.isfinite(zsnr.sigmas[:-1]).all())


# --------------------------------------------------------------------------------------------------
# Sampling timesteps
# --------------------------------------------------------------------------------------------------


def ref_timesteps(spacing: str, T: int, N: int) -> np.ndarray:
    if spacing == "leading":
        return (np.arange(N) * (T // N))[::-1]
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / N)).astype(int) - 1
    return np.round(np.linspace(0, T - 1, N)).astype(int)[::-1]


def test_timesteps_golden():
    s = NoiseSchedule("linear", 1000)
    assert s.timesteps(50, "leading").tolist() == list(range(980, -1, -20))
    assert s.timesteps(50, "trailing").tolist() == list(range(999, 18, -20))
    assert s.timesteps(50).tolist() == list(range(999, 18, -20))  # trailing is the default
    assert s.timesteps(3, "linspace").tolist() == [999, 500, 0]
    assert s.timesteps(50, "leading").dtype == torch.int64


# N that divide T and N that do not; chosen away from the exact .5 ties of test_timesteps_ties below.
CASES = [(1000, 50), (1000, 7), (1000, 13), (1000, 30), (1000, 3), (1000, 1), (1000, 1000), (10, 3), (10, 4), (100, 7)]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T_, N", CASES)
def test_timesteps_match_numpy(spacing, T_, N):
    got = NoiseSchedule("linear", T_).timesteps(N, spacing).numpy()
    np.testing.assert_array_equal(got, ref_timesteps(spacing, T_, N))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T_", [2, 10, 37, 1000])
def test_timesteps_are_n_distinct_descending_in_range(spacing, T_):
    s = NoiseSchedule("linear", T_)
    for N in range(1, T_ + 1):
        ts = s.timesteps(N, spacing).tolist()
        assert len(ts) == N
        assert all(a > b for a, b in itertools.pairwise(ts))
        assert 0 <= ts[-1] and ts[0] <= T_ - 1
        if spacing == "trailing":
            assert ts[0] == T_ - 1
        if spacing == "linspace":
            assert ts[-1] == 0 and (N == 1 or ts[0] == T_ - 1)  # one step: linspace(0, T-1, 1) = [0]


@pytest.mark.parametrize("spacing, T_, N", [("trailing", 7, 6), ("trailing", 1000, 48), ("linspace", 1000, 27)])
def test_timesteps_ties(spacing, T_, N):
    """Exact .5 ties round as numpy's do: the values are computed as numpy's arange/linspace compute them."""
    got = NoiseSchedule("linear", T_).timesteps(N, spacing).numpy()
    np.testing.assert_array_equal(got, ref_timesteps(spacing, T_, N))


# --------------------------------------------------------------------------------------------------
# Forward process
# --------------------------------------------------------------------------------------------------


def test_add_noise_and_velocity_closed_forms():
    s = NoiseSchedule("cosine", T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g)  # (B, C, H, W)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = torch.tensor([ref_alpha_bar("cosine", T)[i] for i in t.tolist()], dtype=torch.float32)
    a, b = ab.sqrt().view(3, 1, 1, 1), (1 - ab).sqrt().view(3, 1, 1, 1)

    xt = s.add_noise(x0, eps, t)
    v = s.velocity(x0, eps, t)
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    torch.testing.assert_close(xt, a * x0 + b * eps)
    torch.testing.assert_close(v, a * eps - b * x0)
    # x_0 and eps back from (x_t, v): the rotation identity of Salimans & Ho 2022
    torch.testing.assert_close(a * xt - b * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b * xt + a * v, eps, atol=1e-5, rtol=1e-5)


def test_add_noise_in_float64_keeps_precision():
    s = NoiseSchedule("linear", T)
    x0 = torch.ones(1, 1, dtype=torch.float64)
    eps = torch.zeros(1, 1, dtype=torch.float64)
    xt = s.add_noise(x0, eps, torch.tensor([999]))
    assert xt.dtype == torch.float64
    assert float(xt) == pytest.approx(math.sqrt(ref_alpha_bar("linear", T)[999]), rel=1e-13)


# --------------------------------------------------------------------------------------------------
# Persistence and validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"kind": "cosine", "num_timesteps": 250}, {"kind": "sigmoid", "beta_start": 1e-3, "beta_end": 0.05, "zero_terminal_snr": True}],
)
def test_dict_round_trip(kwargs):
    s = NoiseSchedule(**kwargs)
    d = json.loads(json.dumps(s.to_dict()))  # as stored in a model file's JSON metadata
    back = NoiseSchedule.from_dict(d)
    assert back == s and back.to_dict() == s.to_dict()
    assert torch.equal(back.alphas_cumprod, s.alphas_cumprod)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(UsageError, match="schedule.colour is not a known field"):
        NoiseSchedule.from_dict({**NoiseSchedule().to_dict(), "colour": "blue"})


@pytest.mark.parametrize(
    "change, words",
    [
        ({"num_timesteps": 10**9}, "schedule.num_timesteps must be an integer in [2, 100000], found 1000000000"),
        ({"num_timesteps": True}, "schedule.num_timesteps must be an integer"),
        ({"beta_end": float("inf")}, "schedule.beta_end must be a finite number in (0, 1), found Infinity"),
        ({"kind": "quadratic"}, 'schedule.kind must be one of "linear", "scaled_linear", "cosine", "sigmoid"'),
        ({"zero_terminal_snr": "yes"}, "schedule.zero_terminal_snr must be true or false"),
        ({"num_timesteps": 100_000}, "alpha_bar underflows"),
    ],
)
def test_from_dict_checks_every_field(change, words):
    with pytest.raises(UsageError) as info:
        NoiseSchedule.from_dict({**NoiseSchedule().to_dict(), **change})
    assert words in str(info.value)


def test_a_schedule_whose_alpha_bar_underflows_is_refused():
    """Long schedules with large betas reach alpha_bar = 0 (sigma infinite) before the last step, which
    the samplers cannot use; only zero terminal SNR may set the last one to 0."""
    with pytest.raises(UsageError, match="alpha_bar underflows to .* at timestep 917 of 1000"):
        NoiseSchedule("linear", 1000, 1e-4, 0.999)
    assert NoiseSchedule("cosine", 100_000).alphas_cumprod[-1] > 0
    assert NoiseSchedule("linear", 1000, zero_terminal_snr=True).alphas_cumprod[-1] == 0


def test_from_dict_rejects_missing_fields():
    d = NoiseSchedule("cosine").to_dict()
    del d["kind"]  # must not silently become the default 'linear'
    with pytest.raises(UsageError, match="schedule.kind is missing"):
        NoiseSchedule.from_dict(d)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "quadratic"}, "unknown schedule"),
        ({"num_timesteps": 0}, "timesteps must be an integer >= 2"),
        ({"num_timesteps": 1}, "timesteps must be an integer >= 2"),
        ({"num_timesteps": 10.0}, "timesteps must be an integer >= 2"),
        ({"beta_end": 2.0}, "beta end must be in"),
        ({"beta_start": 0.0}, "beta start must be in"),
        ({"beta_start": float("nan")}, "beta start must be in"),
        ({"beta_start": 0.1, "beta_end": 0.01}, "must not exceed"),
    ],
)
def test_invalid_arguments_raise_usage_error(kwargs, message):
    with pytest.raises(UsageError, match=message):
        NoiseSchedule(**kwargs)


@pytest.mark.parametrize(
    "steps, spacing, message",
    [(0, "trailing", "steps must be between 1"), (1001, "trailing", "steps must be between 1"), (10, "even", "unknown spacing")],
)
def test_invalid_timesteps_raise_usage_error(steps, spacing, message):
    with pytest.raises(UsageError, match=message):
        NoiseSchedule("linear", 1000).timesteps(steps, spacing)
