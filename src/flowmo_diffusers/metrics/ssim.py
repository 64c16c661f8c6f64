"""Structural similarity, computed with scikit-image exactly as FlowMo's evaluation did."""

from __future__ import annotations

import numpy as np
import torch

from ._optional_dependencies import require
from .image_conversion import check_quantised_pair, quantised_image_pairs


def ssim_per_image(originals: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """SSIM of every image pair.

    Images go through FlowMo's conversion (clamp to [-1, 1], `(x+1)/2`, `*255`, truncate to uint8, `float32 / 255`)
    and then `skimage.metrics.structural_similarity(reconstruction, original, data_range=1.0, channel_axis=-1)` with
    scikit-image's defaults otherwise: a 7x7 uniform window, sample covariance, K1=0.01, K2=0.03, and the mean over
    channels.

    Args:
        originals (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1], H and W at least 7.
        reconstructions (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1].

    Returns:
        `np.ndarray`: [B] float64 SSIM values in [-1, 1].
    """
    return quantised_ssim_per_image(*quantised_image_pairs(originals, reconstructions))


def quantised_ssim_per_image(originals_hwc: np.ndarray, reconstructions_hwc: np.ndarray) -> np.ndarray:
    """[`ssim_per_image`] of images already converted by [`quantised_image_pairs`] (convert once, measure several).

    Args:
        originals_hwc, reconstructions_hwc (`np.ndarray`):
            [B, H, W, 3] float32 arrays in [0, 1] from [`quantised_image_pairs`], H and W at least 7.

    Returns:
        `np.ndarray`: [B] float64 SSIM values in [-1, 1].
    """
    skimage_metrics = require("skimage.metrics")
    check_quantised_pair(originals_hwc, reconstructions_hwc)
    # Argument order (reconstruction, original) follows the paper's code; SSIM is symmetric.
    return np.array(
        [
            skimage_metrics.structural_similarity(reconstruction, original, data_range=1.0, channel_axis=-1)
            for original, reconstruction in zip(originals_hwc, reconstructions_hwc)
        ],
        dtype=np.float64,
    )
