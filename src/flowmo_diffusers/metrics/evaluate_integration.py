"""Loading the bundled Hugging Face `evaluate` metric modules.

The package ships five `evaluate` metric scripts under `evaluate_modules/<name>/<name>.py` (`psnr`, `ssim`,
`lpips`, `rfid` on image pairs; `codebook` on token ids). `evaluate.load` on a local directory copies the script into its module cache and imports it
there, without any network access; the image-pair scripts subclass
[`~flowmo_diffusers.metrics.image_pair_metric.ImagePairMetric`]; all import their implementation from
`flowmo_diffusers.metrics`.
"""

from __future__ import annotations

import os
from typing import Any

from ._optional_dependencies import require

#: The metrics of (reconstruction, original) image pairs.
IMAGE_PAIR_METRICS = ("psnr", "ssim", "lpips", "rfid")
BUNDLED_METRICS = IMAGE_PAIR_METRICS + ("codebook",)
EVALUATE_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_modules")


def bundled_metric_path(name: str) -> str:
    """Absolute path of the bundled `evaluate` module directory for `name`."""
    if name not in BUNDLED_METRICS:
        raise ValueError(f"unknown bundled metric {name!r}; available: {BUNDLED_METRICS}")
    path = os.path.join(EVALUATE_MODULES_DIR, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise FileNotFoundError(
            f"bundled evaluate module {name!r} is missing at {path}; the package was installed "
            f"without its package data (flowmo_diffusers/metrics/evaluate_modules/*/*.py)"
        )
    return path


def load_metric(name: str, **evaluate_load_kwargs: Any):
    """Load a bundled metric with `evaluate.load` from its local directory (no network).

    Args:
        name (`str`):
            One of `"psnr"`, `"ssim"`, `"lpips"`, `"rfid"`, `"codebook"`.
        evaluate_load_kwargs (`dict[str, Any]`, *optional*):
            Passed to `evaluate.load` (`experiment_id`, `num_process`, `process_id`, `cache_dir`, `keep_in_memory`,
            ...).

    Returns:
        `evaluate.EvaluationModule`: Call `add_batch(predictions=..., references=...)` and `compute(...)` on it.
    """
    evaluate = require("evaluate")
    return evaluate.load(bundled_metric_path(name), **evaluate_load_kwargs)
