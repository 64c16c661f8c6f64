"""Decoding and preprocessing of one image: raw value -> RGB PIL image -> ``[3, R, R]`` tensor in ``[-1, 1]``.

Images are decoded here rather than by ``datasets``: the image column is cast to ``datasets.Image(decode=False)``
(see :func:`~flowmo_diffusers.data.datasets.prepare_columns`) so that the raw bytes/path reach
:class:`ImageDecoder`, which decodes inside a ``try`` block and counts failures instead of raising.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import PIL.Image
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ..utils.images import to_rgb
from ..utils.validation import check_float, check_int

logger = logging.getLogger(__name__)


# Bad images are logged at WARNING level this many times per worker, then at DEBUG level, so that a dataset
# with many broken files does not flood the training log (the counter still counts all of them).
_MAX_SKIP_WARNINGS_PER_WORKER = 10

# datasets' own decoder: handles {"bytes", "path"} dicts, local and remote (hf://, https://) paths, calls
# image.load() (so truncated files fail here, not later) and applies the EXIF orientation like datasets does.
_DATASETS_IMAGE_DECODER = datasets.Image()


# One conversion for every path (training, evaluation, sampling, the pipeline): flowmo_diffusers.utils.images.
convert_to_rgb = to_rgb


def decode_image(value: Any) -> PIL.Image.Image:
    """Decode one raw image value to an RGB PIL image (raises on undecodable data; callers catch).

    Args:
        value (`dict`, `bytes`, `str` or `PIL.Image.Image`):
            ``{"bytes": ..., "path": ...}`` (a ``datasets.Image(decode=False)`` value), raw ``bytes``, a file path/URL
            ``str``, or an already decoded ``PIL.Image.Image``.

    Returns:
        `PIL.Image.Image`: the image in RGB mode.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = {"bytes": bytes(value), "path": None}
    elif isinstance(value, str):
        value = {"bytes": None, "path": value}
    image = _DATASETS_IMAGE_DECODER.decode_example(value)
    return convert_to_rgb(image)


def _describe_image_value(value: Any) -> str:
    """Short human-readable origin of an image value for log messages."""
    if isinstance(value, dict):
        return str(value.get("path") or f"<{len(value.get('bytes') or b'')} bytes>")
    if isinstance(value, str):
        return value
    return f"<{type(value).__name__}>"


class ImageTransform:
    """PIL image -> float32 tensor ``[3, resolution, resolution]`` in ``[-1, 1]``, as in the original FlowMo.

    FlowMo (``flowmo/data.py``) used ``torchvision.transforms.Resize(size)`` on PIL images, i.e. the shorter side
    is resized to ``resolution`` with PIL's **bilinear** filter (PIL always antialiases when downscaling), then
    ``CenterCrop`` (evaluation) or ``RandomCrop`` (training), then ``x / 127.5 - 1``. We keep bilinear as the
    default so that reconstructions/metrics match the paper's preprocessing; pass
    ``interpolation=InterpolationMode.BICUBIC`` for bicubic.

    Args:
        resolution (`int`):
            Output side length ``R``.
        random_crop (`bool`):
            Random ``R x R`` crop (training) instead of the center crop (evaluation).
        random_flip (`bool`, *optional*, defaults to `False`):
            Horizontal flip with probability 1/2.
        interpolation (`InterpolationMode`, *optional*, defaults to `InterpolationMode.BILINEAR`):
            Resampling filter for the resize.
        crop_scale (`Tuple[float, float]`, *optional*):
            With `random_crop`: instead of resizing the whole image, crop a random square whose side is a uniform
            fraction in `[low, high]` of the image's shorter side (never below `R` pixels) and resize it to `R`, so
            that a few photographs give many different training images (zoomed details as well as whole views).
            A square-only variant of torchvision's `RandomResizedCrop`, drawn from `generator` (which
            `RandomResizedCrop` cannot take) so that batches stay reproducible on resume.
    """

    def __init__(
        self,
        resolution: int,
        random_crop: bool,
        random_flip: bool = False,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        crop_scale: tuple[float, float] | None = None,
    ):
        self.resolution = check_int("resolution", resolution, 1)
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)
        self.interpolation = interpolation
        if crop_scale is not None:
            if not self.random_crop:
                raise ValueError("crop_scale needs random_crop=True (evaluation images are center-cropped whole)")
            if not isinstance(crop_scale, (tuple, list)) or len(crop_scale) != 2:
                raise ValueError(f"crop_scale must be a pair (low, high) of fractions, got {crop_scale!r}")
            low = check_float("crop_scale[0]", crop_scale[0], 0.0, 1.0, exclusive_minimum=True)
            high = check_float("crop_scale[1]", crop_scale[1], low, 1.0)
            crop_scale = (low, high)
        self.crop_scale = crop_scale

    @property
    def is_random(self) -> bool:
        """Whether the transform consumes random numbers (and so needs a generator to be reproducible)."""
        return self.random_crop or self.random_flip

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one image.

        Args:
            image (`PIL.Image.Image`):
                The image (converted to RGB here if needed).
            generator (`torch.Generator`, *optional*):
                Source of the crop offsets and flip decision; ``None`` uses torch's global RNG.

        Returns:
            `torch.Tensor`: ``[3, R, R]`` float32 in ``[-1, 1]``.
        """
        image = convert_to_rgb(image)
        resolution = self.resolution
        if self.crop_scale is not None:
            width, height = image.size
            low, high = self.crop_scale
            fraction = low + (high - low) * float(torch.rand((), generator=generator))
            side = min(max(round(fraction * min(width, height)), resolution), width, height)
            top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
            image = TF.resized_crop(image, top, left, side, side, [resolution, resolution],
                                    interpolation=self.interpolation, antialias=True)
        else:
            image = TF.resize(image, [resolution], interpolation=self.interpolation, antialias=True)
            if self.random_crop:
                width, height = image.size
                top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
                image = TF.crop(image, top, left, resolution, resolution)
            else:
                image = TF.center_crop(image, [resolution, resolution])
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            image = TF.hflip(image)
        return TF.pil_to_tensor(image).to(torch.float32).div_(127.5).sub_(1.0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(resolution={self.resolution}, random_crop={self.random_crop}, "
            f"random_flip={self.random_flip}, interpolation={self.interpolation.value}"
            + (f", crop_scale={self.crop_scale})" if self.crop_scale is not None else ")")
        )


class ImageDecoder:
    """Decode + transform one example, counting failures instead of raising (one instance per worker copy)."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform
        self.num_warnings = 0

    def __call__(self, value: Any, generator: torch.Generator | None) -> tuple[torch.Tensor | None, str]:
        """Returns ``(pixel_values [3, R, R] or None, error description or "")``."""
        try:
            image = decode_image(value)
        except Exception as error:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError, ...)
            description = f"{_describe_image_value(value)}: {type(error).__name__}: {error}"
            log = logger.warning if self.num_warnings < _MAX_SKIP_WARNINGS_PER_WORKER else logger.debug
            self.num_warnings += 1
            log("Skipping undecodable image %s", description)
            return None, description
        return self.transform(image, generator=generator), ""


__all__ = ["ImageDecoder", "ImageTransform", "convert_to_rgb", "decode_image"]
