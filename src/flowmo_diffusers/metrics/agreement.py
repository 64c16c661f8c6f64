"""Agreement of two decodings of the same inputs and noise (another dtype, another solver): float PSNR without
uint8 quantisation, the largest difference, token-id agreement."""

from __future__ import annotations

import math

import torch


def output_agreement(reference: torch.Tensor, other: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """How closely `other` reproduces `reference`.

    Unlike [`psnr_per_image`] (uint8-quantised, FlowMo's evaluation), nothing is rounded, so agreement far beyond
    48 dB (one uint8 level) is still resolved.

    Args:
        reference (`torch.Tensor` of shape `(B, C, H, W)`): the reference images (e.g. float32 weights).
        other (`torch.Tensor` of the same shape): the images compared with it (e.g. float16 weights).
        data_range (`float`, *optional*, defaults to 2.0): the value range, 2 for images in [-1, 1].

    Returns:
        `dict` with `psnr_db` (mean over images of the per-image PSNR, capped at 200 dB for identical images),
        `max_abs_diff` and `nonfinite` (count of NaN / inf values of `other`).
    """
    if reference.shape != other.shape:
        raise ValueError(f"reference and other must have one shape, got {tuple(reference.shape)} and {tuple(other.shape)}")
    if reference.ndim != 4:
        raise ValueError(f"reference must have shape (B, C, H, W), got {tuple(reference.shape)}")
    reference, other = reference.double(), other.double()
    nonfinite = int((~torch.isfinite(other)).sum())
    errors = (reference - other).pow(2).flatten(1).mean(1)
    psnrs = [min(200.0, 10 * math.log10(data_range**2 / error)) if error > 0 else 200.0 for error in errors.tolist()]
    return dict(
        psnr_db=float(sum(psnrs) / len(psnrs)) if nonfinite == 0 else float("nan"),
        max_abs_diff=float((reference - other).abs().max()),
        nonfinite=nonfinite,
    )


def id_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Fraction of token ids equal in `reference` and `other` (integer tensors of one shape)."""
    if reference.shape != other.shape:
        raise ValueError(f"reference and other must have one shape, got {tuple(reference.shape)} and {tuple(other.shape)}")
    if reference.dtype.is_floating_point or other.dtype.is_floating_point:
        raise ValueError(f"token ids must be integer tensors, got {reference.dtype} and {other.dtype}")
    return float((reference == other).double().mean()) if reference.numel() else 1.0
