"""The one conversion of images to 8-bit RGB, and the one input range check, shared by every path that reads
images: training and evaluation data (`training.data`), sampling folders, generation evaluation and
[`FlowMoPipeline`]. Depends on PIL and numpy only, so the pipeline can use it without the training extras.

Choices (documented in docs/pipelines.md, "Inputs, outputs, bounds and errors"):

* EXIF orientation is applied (as `datasets` does when it decodes), so a photograph is read upright everywhere.
* Transparency (alpha modes, palette or L/RGB images with a `transparency` entry) is composited **onto white**:
  the color under fully transparent pixels is arbitrary (often black), white is what viewers show.
* 16-bit (and 32-bit integer) grayscale is read on the 16-bit scale and rounded to 8 bits, `round(v / 257)`
  (60000 -> 233), the same for PIL images and for `uint16` arrays; `convert("RGB")` would clip at 255.
* CMYK, YCbCr, 1-bit and float (`F`, clipped to [0, 255]) images use PIL's own conversion to RGB.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageOps

# Integer modes produced by 16-bit PNG/TIFF files. PIL's convert("RGB") clips them at 255 (a 16-bit image
# becomes almost white), so they are rescaled from the 16-bit range instead.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

#: Values at most this far outside an input range are clamped into it (float rounding, resampling overshoot);
#: beyond it an image is refused. One 8-bit level of [0, 1].
RANGE_TOLERANCE = 1.0 / 255.0


def sixteen_bit_to_eight_bit(values: np.ndarray) -> np.ndarray:
    """16-bit intensities (any integer or float array on the 0..65535 scale) -> uint8, `round(v / 257)`, clipped."""
    return np.clip(np.round(np.asarray(values, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL image (L, P, RGBA, LA, PA, CMYK, I;16, I, F, 1, YCbCr, ...) -> upright 8-bit RGB (see the module
    docstring for how orientation, transparency and bit depth are handled)."""
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation, 1) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return PIL.Image.fromarray(sixteen_bit_to_eight_bit(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def check_unit_range(minimum: float, maximum: float, name: str = "images") -> None:
    """Raise the documented ValueError unless `[minimum, maximum]` lies in [0, 1] up to [`RANGE_TOLERANCE`].

    A range such as [-1, 1] is refused rather than reinterpreted: one pixel slightly below 0 must never flip how a
    whole image is read.
    """
    if minimum < -RANGE_TOLERANCE or maximum > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must have values in [0, 1] (float), or be uint8 in [0, 255] or uint16 in [0, 65535]; got range "
            f"[{minimum:.4g}, {maximum:.4g}]. Values within {RANGE_TOLERANCE:.4f} of the range are clamped; images in "
            "[-1, 1] are not accepted: pass (images + 1) / 2"
        )


__all__ = ["RANGE_TOLERANCE", "check_unit_range", "sixteen_bit_to_eight_bit", "to_rgb"]
