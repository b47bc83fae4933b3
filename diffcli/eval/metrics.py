"""Distances between two sets of image features: pure functions of feature matrices, in float64.

Each side is an (N, D) matrix of features, one row per image ("fake": the samples, "real": the
reference set). Nothing here knows about images, files or networks.

    fid              Frechet distance between Gaussians fitted to the two sets (Heusel et al. 2017)
    kid              unbiased MMD^2 with a cubic polynomial kernel, over random subsets (Binkowski et al. 2018)
    precision_recall k-nearest-neighbour manifolds of each set (Kynkaanniemi et al. 2019)

Legend (variable -> symbol):
    mu1, mu2        mean feature vectors mu_1, mu_2
    s1, s2          covariance matrices Sigma_1, Sigma_2 (unbiased, N - 1 in the denominator, as numpy.cov)
    r1              Sigma_1^{1/2}, the symmetric PSD square root
    m               the KID subset size; d the feature dimension
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KID_SUBSETS = 100  # torch-fidelity's defaults: 100 subsets of 1000 images per side
KID_SUBSET_SIZE = 1000
KID_SEED = 2020  # torch-fidelity's rng_seed; here it seeds a torch.Generator, so the subsets differ from its own
NEIGHBOURS = 3  # k of precision/recall


@dataclass(frozen=True)
class Gaussian:
    """The mean and covariance of a feature set, float64, and the covariance's square root when it has
    been worked out (the reference side keeps it: one of FID's two eigendecompositions)."""

    mu: torch.Tensor  # (D,)
    sigma: torch.Tensor  # (D, D)
    root: torch.Tensor | None = None  # (D, D), sqrtm_psd(sigma)

    def with_root(self) -> "Gaussian":
        return self if self.root is not None else Gaussian(self.mu, self.sigma, sqrtm_psd(self.sigma))


def gaussian(features: torch.Tensor) -> Gaussian:
    """Mean and unbiased covariance of (N, D) features (N >= 2)."""
    f = features.double()
    N = f.shape[0]
    if N < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {N}")
    mu = f.mean(0)
    c = f - mu
    return Gaussian(mu, (c.T @ c) / (N - 1))


def sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition;
    eigenvalues that rounding made slightly negative count as 0."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def trace_sqrt_product(s1: torch.Tensor, s2: torch.Tensor, r1: torch.Tensor | None = None) -> torch.Tensor:
    """Tr((Sigma_1 Sigma_2)^{1/2}) = Tr((r1 Sigma_2 r1)^{1/2}) with r1 = Sigma_1^{1/2}: the product
    r1 Sigma_2 r1 is similar to Sigma_1 Sigma_2 (same eigenvalues) but symmetric PSD, so its
    eigenvalues are real and >= 0 and eigh finds them stably (scipy.linalg.sqrtm works on the
    non-symmetric product and can return complex noise). r1 may be given when known."""
    r1 = sqrtm_psd(s1) if r1 is None else r1
    p = r1 @ s2 @ r1
    w = torch.linalg.eigvalsh((p + p.T) / 2)
    return w.clamp(min=0).sqrt().sum()


def frechet_distance(a: Gaussian, b: Gaussian) -> float:
    """||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^{1/2})  (Heusel et al. 2017, Eq. 6).
    Symmetric in a and b; b's square root is used when it has one. Never negative: rounding below 0
    returns 0."""
    d = a.mu - b.mu
    value = d @ d + torch.trace(a.sigma) + torch.trace(b.sigma) - 2 * trace_sqrt_product(b.sigma, a.sigma, b.root)
    return max(0.0, float(value))


def fid(fake: torch.Tensor, real: torch.Tensor) -> float:
    """FID of two (N, D) feature matrices."""
    return frechet_distance(gaussian(fake), gaussian(real))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / d + 1)^3, KID's kernel, for every pair of rows: (Nx, Ny)."""
    d = x.shape[1]
    return (x @ y.T / d + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 between two sets of m rows each (Gretton et al. 2012, Eq. 3;
    torch-fidelity's mmd2(..., mmd_est='unbiased')): the within-set means leave out the diagonal,
    the cross term keeps it."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid_subsets(n_fake: int, n_real: int, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                seed: int = KID_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The index pairs KID averages over: `subsets` draws without replacement of
    m = min(subset_size, n_fake, n_real) rows from each side, from a generator seeded with `seed`."""
    m = min(subset_size, n_fake, n_real)
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors on each side, got {n_fake} and {n_real}")
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n_fake, generator=g)[:m], torch.randperm(n_real, generator=g)[:m]) for _ in range(subsets)]


def kid(fake: torch.Tensor, real: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = KID_SEED) -> tuple[float, float]:
    """KID as (mean, standard deviation) of the unbiased MMD^2 over the subsets of `kid_subsets`
    (the population standard deviation, as torch-fidelity's np.std)."""
    f, r = fake.double(), real.double()
    values = torch.tensor([mmd2_unbiased(f[i], r[j]) for i, j in kid_subsets(len(f), len(r), subsets, subset_size, seed)],
                          dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False))


_CDIST_ELEMENTS = 8_000_000  # distances held at once (64 MB in float64)


def _rows(points: torch.Tensor) -> int:
    return max(1, _CDIST_ELEMENTS // max(1, len(points)))


def kth_neighbour_radii(x: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """For each row, the distance to its k-th nearest other row (the row itself, at distance 0, is
    not counted): the radius of its ball in the k-NN manifold estimate. (N,)"""
    b = _rows(x)
    # the (k+1)-th smallest distance, the row's own 0 being the first (topk is ~10x faster than kthvalue)
    return torch.cat([torch.cdist(x[i : i + b], x).topk(k + 1, dim=1, largest=False).values[:, -1]
                      for i in range(0, len(x), b)])


def inside_manifold(query: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query row, whether it lies within radii[j] of some points[j] (boundary included). (N,) bool"""
    b = _rows(points)
    return torch.cat([(torch.cdist(query[i : i + b], points) <= radii).any(dim=1) for i in range(0, len(query), b)])


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = NEIGHBOURS,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of fake rows
    inside the real set's k-NN manifold, recall the share of real rows inside the fake set's. Each
    side needs more than k rows. real_radii: kth_neighbour_radii(real, k) when known (the reference
    side keeps them: for 50,000 real images they are the largest part of the work)."""
    if min(len(fake), len(real)) <= k:
        raise ValueError(f"precision and recall with k={k} need more than {k} feature vectors on each side, "
                         f"got {len(fake)} and {len(real)}")
    f, r = fake.double(), real.double()
    radii = kth_neighbour_radii(r, k) if real_radii is None else real_radii.double()
    precision = inside_manifold(f, r, radii).double().mean()
    recall = inside_manifold(r, f, kth_neighbour_radii(f, k)).double().mean()
    return float(precision), float(recall)
