"""Metric inputs: image conversions reproducing FlowMo's `evaluate.py` bit for bit, and the default device.

FlowMo evaluates on tensors in [-1, 1]. Its evaluation code clamps to [-1, 1], maps to
[0, 1] with `(x + 1) / 2`, and for PSNR/SSIM quantises with
`(x * 255).to(torch.uint8)` (truncation, not rounding) before converting back to
`float32 / 255`. These helpers perform exactly those float32 operations, in the same
order, so the numbers match the paper's code.
"""

from __future__ import annotations

import numpy as np
import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device`, or CUDA when available and the CPU otherwise: where the metric networks run by default."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_image_batch(images: torch.Tensor, name: str = "images") -> None:
    """Raise a ValueError unless `images` is a [B, 3, H, W] tensor."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, 3, H, W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [B, 3, H, W], got {tuple(images.shape)}")


def check_image_pair(originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """Raise unless `originals` and `reconstructions` are [B, 3, H, W] tensors of the same shape."""
    check_image_batch(originals, "originals")
    check_image_batch(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"shape mismatch: originals {tuple(originals.shape)} vs reconstructions {tuple(reconstructions.shape)}"
        )


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] as FlowMo's evaluation does.

    Args:
        images (`torch.Tensor`):
            [B, 3, H, W] images nominally in [-1, 1]; values outside are clamped.

    Returns:
        `torch.Tensor`: [B, 3, H, W] float32 images in [0, 1], on the input's device.
    """
    check_image_batch(images)
    return (images.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0


def unit_range_to_uint8_hwc(images_unit_range: torch.Tensor) -> np.ndarray:
    """Quantise [0, 1] images to uint8 HWC the way FlowMo did: `(x * 255).to(torch.uint8)`.

    The cast truncates toward zero (it does not round); that is what the paper's code did.

    Args:
        images_unit_range (`torch.Tensor`):
            [B, 3, H, W] float images in [0, 1].

    Returns:
        `np.ndarray`: [B, H, W, 3] uint8 images.
    """
    check_image_batch(images_unit_range, "images_unit_range")
    return (images_unit_range.float() * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def images_to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] images in [-1, 1] -> [B, H, W, 3] uint8 (clamp, `(x+1)/2`, `*255`, truncate)."""
    return unit_range_to_uint8_hwc(images_to_unit_range(images))


def uint8_to_unit_float32(images_uint8_hwc: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] uint8 -> float32 in [0, 1] (`astype(float32) / 255`), FlowMo's PSNR/SSIM input."""
    if images_uint8_hwc.dtype != np.uint8:
        raise TypeError(f"expected a uint8 array, got {images_uint8_hwc.dtype}")
    return images_uint8_hwc.astype(np.float32) / 255.0


def check_quantised_pair(originals_hwc: np.ndarray, reconstructions_hwc: np.ndarray) -> None:
    """Raise unless both are float32 [B, H, W, 3] arrays of one shape, as [`quantised_image_pairs`] returns them."""
    for name, array in (("originals_hwc", originals_hwc), ("reconstructions_hwc", reconstructions_hwc)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(
                f"{name} must be a float32 [B, H, W, 3] array from quantised_image_pairs, got "
                f"{getattr(array, 'dtype', type(array).__name__)} {getattr(array, 'shape', '')}"
            )
    if originals_hwc.shape != reconstructions_hwc.shape:
        raise ValueError(
            f"shape mismatch: originals_hwc {originals_hwc.shape} vs reconstructions_hwc {reconstructions_hwc.shape}"
        )


def quantised_image_pairs(originals: torch.Tensor, reconstructions: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """FlowMo's PSNR/SSIM inputs of two image batches: checked, quantised to uint8, then float32 / 255, HWC.

    Args:
        originals (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1].
        reconstructions (`torch.Tensor`):
            [B, 3, H, W] images in [-1, 1], the same shape.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: Two [B, H, W, 3] float32 arrays in [0, 1].
    """
    check_image_pair(originals, reconstructions)
    return (
        uint8_to_unit_float32(images_to_uint8_hwc(originals)),
        uint8_to_unit_float32(images_to_uint8_hwc(reconstructions)),
    )
