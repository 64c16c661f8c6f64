"""Glue for the Hugging Face ``evaluate`` library: bundled metric modules and their inputs.

The package ships four ``evaluate`` metric scripts under ``evaluate_modules/<name>/<name>.py``
(``psnr``, ``ssim``, ``lpips``, ``rfid``). ``evaluate.load`` on a local directory copies the
script into its module cache and imports it there, without any network access; the
scripts import their implementation from ``flowmo_diffusers.metrics``.

Inputs of every bundled metric are images as channel-first ``[3, H, W]`` float arrays
(numpy arrays, torch tensors or nested lists) in [-1, 1]: ``predictions`` are the
reconstructions, ``references`` the original images.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from ._optional_dependencies import require

BUNDLED_METRICS = ("psnr", "ssim", "lpips", "rfid")
EVALUATE_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_modules")


def bundled_metric_path(name: str) -> str:
    """Absolute path of the bundled ``evaluate`` module directory for ``name``."""
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
    """Load a bundled metric with ``evaluate.load`` from its local directory (no network).

    Args:
        name: One of ``"psnr"``, ``"ssim"``, ``"lpips"``, ``"rfid"``.
        **evaluate_load_kwargs: Passed to ``evaluate.load`` (``experiment_id``,
            ``num_process``, ``process_id``, ``cache_dir``, ``keep_in_memory``, ...).

    Returns:
        An ``evaluate.EvaluationModule``; call ``add_batch(predictions=..., references=...)``
        and ``compute(...)`` on it.
    """
    evaluate = require("evaluate")
    return evaluate.load(bundled_metric_path(name), **evaluate_load_kwargs)


def image_pair_features():
    """``datasets.Features`` for ``predictions`` / ``references`` images of shape [3, H, W].

    Nested ``Sequence``s of float32 accept any H and W (``Array3D`` would fix them).
    """
    datasets = require("datasets")
    image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
    return datasets.Features({"predictions": image, "references": image})


def as_image_tensors(images: Sequence[Any], name: str) -> List[torch.Tensor]:
    """Convert what ``evaluate`` hands to ``_compute`` (nested lists) into [3, H, W] float32 tensors."""
    tensors = []
    for index, image in enumerate(images):
        tensor = torch.as_tensor(np.asarray(image, dtype=np.float32))
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ValueError(
                f"{name}[{index}] must be a channel-first [3, H, W] image in [-1, 1], got shape {tuple(tensor.shape)}"
            )
        tensors.append(tensor)
    return tensors


def image_pair_batches(
    references: Sequence[torch.Tensor], predictions: Sequence[torch.Tensor], batch_size: int
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ([B, 3, H, W], [B, 3, H, W]) batches of consecutive same-sized image pairs."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    start = 0
    while start < len(references):
        end = start + 1
        while end < len(references) and end - start < batch_size and references[end].shape == references[start].shape:
            end += 1
        reference_batch = torch.stack(list(references[start:end]))
        prediction_batch = torch.stack(list(predictions[start:end]))
        if reference_batch.shape != prediction_batch.shape:
            raise ValueError(
                f"images {start}..{end - 1}: references {tuple(reference_batch.shape)} "
                f"vs predictions {tuple(prediction_batch.shape)}"
            )
        yield reference_batch, prediction_batch
        start = end
