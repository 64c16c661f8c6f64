"""Peak signal-to-noise ratio, computed with scikit-image exactly as FlowMo's evaluation did."""

from __future__ import annotations

import numpy as np
import torch

from ._optional_dependencies import require
from .image_conversion import check_quantised_pair, quantised_image_pairs


def psnr_per_image(originals: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """PSNR of every image pair, in dB.

    Each image is clamped to [-1, 1], mapped to [0, 1], quantised to uint8 by truncation
    and brought back to float32 / 255 (FlowMo's conversion), then passed to
    `skimage.metrics.peak_signal_noise_ratio(original, reconstruction, data_range=1.0)`.
    That equals the PSNR of the uint8 images with `data_range=255`.

    Args:
        originals (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1].
        reconstructions (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1].

    Returns:
        `np.ndarray`: [B] float64 PSNRs. Identical images give `inf` (as scikit-image does).
    """
    return quantised_psnr_per_image(*quantised_image_pairs(originals, reconstructions))


def quantised_psnr_per_image(originals_hwc: np.ndarray, reconstructions_hwc: np.ndarray) -> np.ndarray:
    """[`psnr_per_image`] of images already converted by [`quantised_image_pairs`] (convert once, measure several).

    Args:
        originals_hwc, reconstructions_hwc (`np.ndarray`):
            Two [B, H, W, 3] float32 arrays in [0, 1], uint8-quantised, as [`quantised_image_pairs`] returns them.

    Returns:
        `np.ndarray`: [B] float64 PSNRs in dB.
    """
    skimage_metrics = require("skimage.metrics")
    check_quantised_pair(originals_hwc, reconstructions_hwc)
    # Identical images have zero error: PSNR is inf by definition, not worth a warning.
    with np.errstate(divide="ignore"):
        return np.array(
            [
                skimage_metrics.peak_signal_noise_ratio(original, reconstruction, data_range=1.0)
                for original, reconstruction in zip(originals_hwc, reconstructions_hwc)
            ],
            dtype=np.float64,
        )


def psnr_pooled_over_batch(originals: torch.Tensor, reconstructions: torch.Tensor) -> float:
    """PSNR of the whole batch at once (mean squared error pooled over all its images).

    This is what FlowMo's released `evaluate.py` reports: its per-image loop calls
    `peak_signal_noise_ratio(rgb_gt, rgb_restored)` on the full [B, H, W, 3] batch, so
    the published PSNR is the mean over batches of this value and depends on the batch
    size. Use [`psnr_per_image`] for the usual per-image definition.

    Args:
        originals (`torch.Tensor`):
            The batch, [B, 3, H, W] in [-1, 1].
        reconstructions (`torch.Tensor`):
            Its reconstruction, the same shape.

    Returns:
        `float`: The batch PSNR in dB.
    """
    return quantised_psnr_pooled_over_batch(*quantised_image_pairs(originals, reconstructions))


def quantised_psnr_pooled_over_batch(originals_hwc: np.ndarray, reconstructions_hwc: np.ndarray) -> float:
    """[`psnr_pooled_over_batch`] of images already converted by [`quantised_image_pairs`]; arguments as for
    [`quantised_psnr_per_image`]. Returns the batch PSNR in dB."""
    check_quantised_pair(originals_hwc, reconstructions_hwc)
    with np.errstate(divide="ignore"):
        psnr = require("skimage.metrics").peak_signal_noise_ratio(originals_hwc, reconstructions_hwc, data_range=1.0)
    return float(psnr)
