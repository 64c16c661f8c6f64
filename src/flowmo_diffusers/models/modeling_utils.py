"""What FlowMo's models share beyond diffusers' `ModelMixin`: loading that refuses weights that do not match."""

from __future__ import annotations

from typing import Any


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


__all__ = ["StrictLoadingMixin"]
