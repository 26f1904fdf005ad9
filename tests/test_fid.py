"""gpudl.fid: the Fréchet distance against its closed forms on known Gaussians, its numerics on
rank-deficient covariances, and its input errors. That the GANs log it: tests/test_train.py."""

import math

import pytest
import torch

from gpudl.fid import fid, frechet_distance, gaussian_fit


def _samples(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


def test_identical_sets_are_at_distance_zero():
    x = _samples(300, 16)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert fid(x.float(), x.float()) == pytest.approx(0.0, abs=1e-4)  # float32 features are upcast first


def test_a_shifted_set_is_at_the_squared_shift():
    x = _samples(300, 16)
    shift = torch.linspace(-1, 2, 16, dtype=torch.float64)
    # Same covariance, so the trace terms cancel and only |shift|² remains.
    assert fid(x, x + shift) == pytest.approx((shift @ shift).item(), rel=1e-9, abs=1e-8)


def test_diagonal_gaussians_match_the_closed_form():
    # Commuting covariances: d² = |μ₁ - μ₂|² + Σᵢ (√a_i - √b_i)².
    f64 = torch.float64
    a, b = torch.tensor([1.0, 4.0, 9.0, 0.25], dtype=f64), torch.tensor([4.0, 1.0, 9.0, 2.0], dtype=f64)
    m1, m2 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=f64), torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=f64)
    expected = ((m1 - m2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected.item(), rel=1e-12)
    # One dimension: (μ₁ - μ₂)² + (σ₁ - σ₂)².
    one = frechet_distance(*(torch.tensor(v, dtype=f64) for v in ([0.5], [[4.0]], [-1.0], [[0.09]])))
    assert one == pytest.approx(1.5**2 + (2 - 0.3) ** 2, rel=1e-12)


def test_general_covariances_match_a_direct_matrix_square_root():
    """Non-commuting covariances against tr(sqrtm(Σ₁ Σ₂)) computed directly by scipy."""
    linalg = pytest.importorskip("scipy.linalg")
    x, y = _samples(400, 12, seed=1), _samples(400, 12, seed=2) + 0.3
    (m1, c1), (m2, c2) = gaussian_fit(x), gaussian_fit(y)
    root = linalg.sqrtm((c1 @ c2).numpy())
    direct = ((m1 - m2) @ (m1 - m2)).item() + c1.trace().item() + c2.trace().item() - 2 * root.trace().real
    assert fid(x, y) == pytest.approx(direct, rel=1e-9)
    assert fid(x, y) == pytest.approx(fid(y, x), rel=1e-9)  # symmetric


def test_gaussian_fit_is_numpys_mean_and_unbiased_covariance():
    x = _samples(50, 5)
    mean, cov = gaussian_fit(x)
    assert mean.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(cov, torch.cov(x.T))


def test_fewer_samples_than_features_stays_finite_and_non_negative():
    # Rank-deficient covariances (N < D), as the GANs' 256 judge features from few held-out images.
    x, y = _samples(20, 64, seed=3), _samples(30, 64, seed=4)
    value = fid(x, y)
    assert math.isfinite(value) and value > 0
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda: fid([[1.0, 2.0]], torch.zeros(3, 2)), TypeError, "features_1 must be a torch.Tensor"),
    (lambda: fid(torch.zeros(1, 2), torch.zeros(3, 2)), ValueError, r"N >= 2.*\(1, 2\)"),
    (lambda: fid(torch.zeros(3), torch.zeros(3, 2)), ValueError, r"features \[N, D\]"),
    (lambda: fid(torch.zeros(3, 2), torch.zeros(3, 4)), ValueError, "features_1 has 2 features.*features_2 has 4"),
    (lambda: fid(torch.tensor([[0.0], [float("nan")]]), torch.zeros(3, 1)), ValueError, "finite"),
    (lambda: frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2)), ValueError, "cov_1"),
    (lambda: frechet_distance(torch.zeros(2), torch.eye(2), 0.0, torch.eye(2)), TypeError, "mean_2"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
