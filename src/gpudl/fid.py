"""The Fréchet distance between two Gaussians, the FID of GAN papers (Heusel et al. 2017).

Fit a Gaussian (mean, covariance) to each of two feature sets; their distance is
    d² = |μ₁ - μ₂|² + tr(Σ₁) + tr(Σ₂) - 2 tr((Σ₁ Σ₂)^½).
FID uses an Inception network's features; the GANs here use their judge classifier's penultimate
layer instead (see gpudl.models.gan), so the numbers are comparable within this project only.

Numerics: everything is float64. Σ₁ Σ₂ is not symmetric, so its square root is not computed
directly: with S = Σ₁^½ (a symmetric square root from an eigendecomposition),
Σ₁ Σ₂ = S (S Σ₂ S) S⁻¹ is similar to the symmetric positive semi-definite S Σ₂ S, so both have the
same eigenvalues and tr((Σ₁ Σ₂)^½) = Σᵢ √λᵢ(S Σ₂ S). Eigenvalues a rounding pushed below zero are
clamped to 0, which keeps rank-deficient covariances (fewer samples than features) finite.
"""

from __future__ import annotations

import torch


def _check_features(name: str, features) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of features [N, D], got {type(features).__name__}")
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"{name} must be features [N, D] with N >= 2 (a covariance needs two samples), "
                         f"got shape {tuple(features.shape)}")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} must be finite, got NaN or infinite values")
    return features


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features [N, D] (N >= 2) -> (mean [D], covariance [D, D]), float64 on the CPU; the
    covariance is the unbiased one (divided by N - 1), as numpy.cov."""
    x = _check_features("features", features)
    mean = x.mean(0)
    centered = x - mean
    return mean, centered.T @ centered / (x.shape[0] - 1)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean_1: torch.Tensor, cov_1: torch.Tensor, mean_2: torch.Tensor, cov_2: torch.Tensor) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mean_1, cov_1) and N(mean_2, cov_2):
    means [D], symmetric positive semi-definite covariances [D, D]."""
    for name, value in (("mean_1", mean_1), ("cov_1", cov_1), ("mean_2", mean_2), ("cov_2", cov_2)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"frechet_distance: {name} must be a torch.Tensor, got {type(value).__name__}")
    d = mean_1.shape[-1] if mean_1.dim() == 1 else -1
    for name, value, shape in (("mean_1", mean_1, (d,)), ("cov_1", cov_1, (d, d)), ("mean_2", mean_2, (d,)),
                               ("cov_2", cov_2, (d, d))):
        if d < 1 or tuple(value.shape) != shape:
            raise ValueError(f"frechet_distance: {name} has shape {tuple(value.shape)}, expected {shape} "
                             f"(means [D] and covariances [D, D] of one D; mean_1 is {tuple(mean_1.shape)})")
    mean_1, cov_1, mean_2, cov_2 = (v.detach().to("cpu", torch.float64) for v in (mean_1, cov_1, mean_2, cov_2))
    # Symmetrize: a covariance accumulated in floating point is symmetric only up to rounding.
    cov_1, cov_2 = (cov_1 + cov_1.T) / 2, (cov_2 + cov_2.T) / 2
    root_1 = _symmetric_sqrt(cov_1)
    middle = root_1 @ cov_2 @ root_1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mean_1 - mean_2
    distance = diff @ diff + cov_1.trace() + cov_2.trace() - 2 * trace_root
    return max(distance.item(), 0.0)  # >= 0 exactly; a rounding can leave it at -1e-13


def fid(features_1: torch.Tensor, features_2: torch.Tensor) -> float:
    """The Fréchet distance between Gaussian fits of two feature sets [N₁, D] and [N₂, D]."""
    f1, f2 = _check_features("features_1", features_1), _check_features("features_2", features_2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"fid: features_1 has {f1.shape[1]} features per sample and features_2 has {f2.shape[1]}; "
                         "they must match")
    return frechet_distance(*gaussian_fit(f1), *gaussian_fit(f2))
