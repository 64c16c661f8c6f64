"""What FlowMo's models share beyond diffusers' `ModelMixin`: loading that refuses weights that do not match, and
the bounds of a decode (sizes, step counts, guidance) checked before anything is allocated."""

from __future__ import annotations

from typing import Any

from ..utils.validation import check_float, check_int

#: Default bound of an image's height and width, and of a decoded one: this many times the model's `sample_size`
#: (1024 for a 256 model). Attention grows with the square of the pixel count: an 8192x8192 image would allocate
#: tens of GB before failing. Pass `max_image_size=` to go beyond.
MAX_IMAGE_SIZE_FACTOR = 4
#: Default bound of `num_inference_steps` (the paper samples with 25); pass `max_inference_steps=` to go beyond.
MAX_INFERENCE_STEPS = 1000
#: Bound of `|guidance_scale|` (the paper uses 1.5): far larger values only amplify numerical noise.
MAX_GUIDANCE_SCALE = 100.0


def resolve_max_image_size(sample_size: int, max_image_size: int | None = None) -> int:
    """`max_image_size`, checked, or the default [`MAX_IMAGE_SIZE_FACTOR`] x `sample_size`."""
    if max_image_size is None:
        return MAX_IMAGE_SIZE_FACTOR * sample_size
    return check_int("max_image_size", max_image_size, minimum=1)


def check_decode_bounds(
    sample_size: int,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    max_image_size: int | None = None,
    max_inference_steps: int | None = None,
) -> None:
    """Raise ValueError / TypeError unless the sizes, step count and guidance of a decode are within bounds.

    Python scalars only (never tensor values), so it costs nothing on the hot path; call it before any tensor of the
    decode exists. `None` arguments are not checked.
    """
    size_limit = resolve_max_image_size(sample_size, max_image_size)
    for name, value in (("height", height), ("width", width)):
        if value is not None and check_int(name, value, minimum=1) > size_limit:
            raise ValueError(
                f"{name}={value} exceeds max_image_size={size_limit} ({MAX_IMAGE_SIZE_FACTOR} x the model's "
                f"sample_size {sample_size} by default); pass max_image_size= to allow it"
            )
    step_limit = MAX_INFERENCE_STEPS if max_inference_steps is None else check_int(
        "max_inference_steps", max_inference_steps, minimum=1
    )
    if num_inference_steps is not None and check_int("num_inference_steps", num_inference_steps, minimum=1) > step_limit:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} exceeds max_inference_steps={step_limit}; pass "
            "max_inference_steps= to allow more"
        )
    if guidance_scale is not None and abs(check_float("guidance_scale", guidance_scale)) > MAX_GUIDANCE_SCALE:
        raise ValueError(
            f"guidance_scale must lie in [-{MAX_GUIDANCE_SCALE:g}, {MAX_GUIDANCE_SCALE:g}] (the paper uses 1.5), "
            f"got {guidance_scale!r}"
        )


class StrictLoadingMixin:
    """`from_pretrained` that raises when the weights file and the model disagree on keys.

    diffusers' `ModelMixin.from_pretrained` only logs missing keys ("newly initialized") and unexpected ones ("not
    used"), so a folder with other weights (a renamed layer, a component of the wrong class in `model_index.json`,
    a truncated conversion) loads as a partly random model that fails, or silently misbehaves, much later. Put this
    mixin before `ModelMixin` in the bases.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> Any:
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = []
        for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", f"not in {cls.__name__}"),
                          ("mismatched_keys", "of another shape")):
            names = [k if isinstance(k, str) else str(k[0]) for k in info.get(key) or []]
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                problems.append(f"{len(names)} {what} ({shown})")
        if problems:
            subfolder = kwargs.get("subfolder")
            where = f"{pretrained_model_name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise ValueError(
                f"the weights of {where} do not match {cls.__name__}: " + "; ".join(problems) + ". They belong to "
                "another model or configuration; refusing to load a partly random model"
            )
        return (model, info) if output_loading_info else model


__all__ = [
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGE_SIZE_FACTOR",
    "MAX_INFERENCE_STEPS",
    "StrictLoadingMixin",
    "check_decode_bounds",
    "resolve_max_image_size",
]
