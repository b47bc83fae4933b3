"""diffcli.eval.metrics on feature matrices with known answers."""

import math

import pytest
import torch

from diffcli.eval import metrics
from diffcli.eval.metrics import Gaussian


def exact_samples(mu: torch.Tensor, cov: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n rows whose empirical mean is mu and whose unbiased covariance is cov, exactly (up to rounding):
    random rows, whitened, then coloured with the Cholesky factor of cov."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, len(mu), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    w = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(w, z.T, upper=False).T  # empirical covariance I
    return z @ torch.linalg.cholesky(cov).T + mu


def test_gaussian_is_the_unbiased_mean_and_covariance():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    g = metrics.gaussian(x)
    assert g.mu.dtype == torch.float64
    assert torch.allclose(g.mu, torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(g.sigma, torch.cov(x.double().T))
    with pytest.raises(ValueError):
        metrics.gaussian(x[:1])


def test_fid_of_identical_statistics_is_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert metrics.fid(x, x.flip(0)) == pytest.approx(0.0, abs=1e-9)  # the order of rows does not matter


def test_fid_of_diagonal_gaussians_is_the_closed_form():
    # commuting covariances: ||mu1 - mu2||^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    v1, v2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([4.0, 1.0, 0.25])
    a, b = Gaussian(mu1.double(), torch.diag(v1).double()), Gaussian(mu2.double(), torch.diag(v2).double())
    expected = 5.0 + float((v1 + v2 - 2 * (v1 * v2).sqrt()).sum())  # 5 + (1 + 1 + 0) = 7
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(7.0)


def test_fid_of_two_full_gaussians_from_their_samples():
    """Non-commuting 2x2 covariances: Tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)), since
    S1 S2 has positive eigenvalues l1, l2 and (sqrt(l1) + sqrt(l2))^2 = l1 + l2 + 2 sqrt(l1 l2)."""
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([-1.0, 0.5], dtype=torch.float64)
    tr_sqrt = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    expected = float((mu1 - mu2) @ (mu1 - mu2) + torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
    x, y = exact_samples(mu1, s1, 50, seed=1), exact_samples(mu2, s2, 80, seed=2)
    assert metrics.fid(x.float(), y.float()) == pytest.approx(expected, rel=1e-5)  # float32 input rounding
    assert metrics.fid(x, y) == pytest.approx(expected, rel=1e-10)
    assert metrics.fid(y, x) == pytest.approx(expected, rel=1e-10)  # symmetric
    # the reference side's square root, computed once and kept (the cache stores it): the same figure
    a, b = metrics.gaussian(x), metrics.gaussian(y).with_root()
    assert torch.allclose(b.root @ b.root, b.sigma, atol=1e-12)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_fid_with_singular_covariances_is_finite_and_not_negative():
    """Fewer rows than dimensions (a rank-deficient covariance), and constant features."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 32, generator=g), torch.randn(6, 32, generator=g)
    v = metrics.fid(x, y)
    assert math.isfinite(v) and v > 0
    const = torch.ones(4, 8)
    assert metrics.fid(const, const) == 0.0
    assert metrics.fid(const, const + 1) == pytest.approx(8.0)  # only the means differ


def test_mmd2_matches_a_hand_computed_example():
    """k(a, b) = (ab + 1)^3 in one dimension. X = {0, 1}: off-diagonal k(0,1) = 1 twice; Y = {0, 2}:
    k(0,2) = 1 twice, so the within-set terms give (2 + 2) / (2 * 1) = 2. The cross sum is
    k(0,0) + k(0,2) + k(1,0) + k(1,2) = 1 + 1 + 1 + 27 = 30, giving 2 * 30 / 4 = 15: MMD^2 = -13."""
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(-13.0)
    assert metrics.polynomial_kernel(x, y).tolist() == [[1.0, 1.0], [1.0, 27.0]]


def test_kid_is_about_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same_mean, same_std = metrics.kid(a, b, subsets=20, subset_size=200)
    shifted, _ = metrics.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same_mean) and shifted > 0.05
    # seeded: the same subsets, the same figure
    assert metrics.kid(a, b, subsets=20, subset_size=200) == (same_mean, same_std)


def test_kid_subsets_are_drawn_without_replacement_and_capped_by_the_smaller_side():
    pairs = metrics.kid_subsets(50, 30, subsets=3, subset_size=1000)
    assert len(pairs) == 3
    for i, j in pairs:
        assert len(i) == len(j) == 30 and len(set(i.tolist())) == 30 and int(i.max()) < 50 and int(j.max()) < 30
    with pytest.raises(ValueError):
        metrics.kid_subsets(1, 30)


def test_precision_and_recall_on_hand_made_point_clouds():
    # real: the corners of the unit square; each corner's 3rd nearest other corner is the opposite one,
    # so every ball has radius sqrt(2)
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert metrics.kth_neighbour_radii(real.double(), 3).tolist() == pytest.approx([math.sqrt(2)] * 4)
    # fake: two points near the square, two far away; the far pair's balls cover nothing real
    fake = torch.tensor([[0.5, 0.5], [1.2, 1.0], [10.0, 10.0], [11.0, 10.0]])
    precision, recall = metrics.precision_recall(fake, real)
    assert precision == 0.5
    # fake radii: (0.5,0.5) -> 3rd NN is (10,10) at ~13.4, so its ball covers all of real
    assert recall == 1.0
    # one far cluster only: nothing of it lies near real, and real is not covered
    far = real + 100
    assert metrics.precision_recall(far, real) == (0.0, 0.0)
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    # the real side's radii, computed once and kept: the same figures
    radii = metrics.kth_neighbour_radii(real.double(), 3)
    assert metrics.precision_recall(fake, real, real_radii=radii) == (precision, recall)
    with pytest.raises(ValueError):
        metrics.precision_recall(real[:3], real)
