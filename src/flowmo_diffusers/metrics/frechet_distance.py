"""Frechet distance between two Gaussians, as in pytorch-fid and FlowMo's evaluation."""

from __future__ import annotations

import warnings

import numpy as np

from ._optional_dependencies import require


# By hand: pytorch-fid's version calls sqrtm(disp=False) (gone in SciPy 1.18), prints, asserts, keeps the dtype.
def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance `||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`.

    Same algorithm as pytorch-fid's `calculate_frechet_distance` (Dougal Sutherland's
    stable version) used by FlowMo: `scipy.linalg.sqrtm` of `sigma1 @ sigma2`; if the
    result is not finite (nearly singular product), `eps` is added to both diagonals;
    a small imaginary part from numerical error is dropped, a large one is an error.

    Args:
        mu1 (`np.ndarray`):
            [D] mean of the first Gaussian.
        sigma1 (`np.ndarray`):
            [D, D] covariance of the first Gaussian.
        mu2 (`np.ndarray`):
            [D] mean of the second Gaussian.
        sigma2 (`np.ndarray`):
            [D, D] covariance of the second Gaussian.
        eps (`float`, *optional*, defaults to `1e-6`):
            Diagonal offset used only when the plain square root is not finite.

    Returns:
        `float`: The squared Frechet distance (what is reported as FID), computed in float64.

    Raises:
        ValueError: Shapes differ, or the square root has a significant imaginary part.
    """
    scipy_linalg = require("scipy.linalg")
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances must both be [{mu1.shape[0]}, {mu1.shape[0]}], got {sigma1.shape} and {sigma2.shape}"
        )

    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular products (fewer samples than dimensions) are expected; the finiteness
        # check below is what decides whether to regularise, as in pytorch-fid.
        warnings.simplefilter("ignore", scipy_linalg.LinAlgWarning)
        covmean = scipy_linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy_linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))

    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: matrix square root has imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real

    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
