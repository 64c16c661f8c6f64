"""What the bundled ``evaluate`` metric scripts share, so that each script states only what differs.

The scripts (``evaluate_modules/<name>/<name>.py``) subclass :class:`ImagePairMetric` with their documentation as
class attributes and a :meth:`~ImagePairMetric.compute_pairs`. Inputs of every bundled metric are images as
channel-first ``[3, H, W]`` float arrays (numpy arrays, torch tensors or nested lists) in [-1, 1]: ``predictions``
are the reconstructions, ``references`` the original images.

This module imports ``evaluate``; only the scripts import it (``flowmo_diffusers.metrics`` itself does not need
``evaluate`` installed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import evaluate
import numpy as np
import torch

from ._optional_dependencies import require
from .image_conversion import resolve_device


def image_pair_features():
    """`datasets.Features` for `predictions` / `references` images of shape [3, H, W].

    Nested `Sequence`s of float32 accept any H and W (`Array3D` would fix them).
    """
    datasets = require("datasets")
    image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
    return datasets.Features({"predictions": image, "references": image})


def as_image_tensors(images: Sequence[Any], name: str) -> list[torch.Tensor]:
    """Convert what `evaluate` hands to `_compute` (nested lists) into [3, H, W] float32 tensors."""
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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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


class ImagePairMetric(evaluate.Metric):
    """An `evaluate` metric of (reconstruction, original) image pairs.

    Subclasses set the class attributes below and implement [`~ImagePairMetric.compute_pairs`]; `_info` and
    `_compute`, the two methods `evaluate` calls, are here. The class docstring becomes `DESCRIPTION` followed by
    `INPUTS_DESCRIPTION`, as `evaluate`'s own metrics have it.

    Attributes:
        DESCRIPTION (`str`):
            What the metric computes.
        INPUTS_DESCRIPTION (`str`):
            Its arguments and results.
        CITATION (`str`):
            BibTeX of the metric.
        REFERENCE_URLS (`list[str]`):
            Where to read more.
    """

    DESCRIPTION = ""
    INPUTS_DESCRIPTION = ""
    CITATION = ""
    REFERENCE_URLS: list[str] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = cls.DESCRIPTION + cls.INPUTS_DESCRIPTION

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=self.DESCRIPTION,
            citation=self.CITATION,
            inputs_description=self.INPUTS_DESCRIPTION,
            features=image_pair_features(),
            reference_urls=list(self.REFERENCE_URLS),
        )

    def _compute(self, predictions: Sequence[Any], references: Sequence[Any], **options: Any) -> dict[str, float]:
        references = as_image_tensors(references, "references")
        return self.compute_pairs(references, as_image_tensors(predictions, "predictions"), **options)

    def compute_pairs(
        self, references: list[torch.Tensor], predictions: list[torch.Tensor], **options: Any
    ) -> dict[str, float]:
        """The metric of the image pairs.

        Args:
            references (`list[torch.Tensor]`):
                The original images, [3, H, W] float32 in [-1, 1].
            predictions (`list[torch.Tensor]`):
                The reconstructions, the same shapes.
            **options:
                The keyword arguments given to `compute` besides `predictions` and `references`.

        Returns:
            `dict[str, float]`: `{metric name: value}`.
        """
        raise NotImplementedError

    @staticmethod
    def mean_over_images(
        per_image: Callable[[torch.Tensor, torch.Tensor], Any],
        references: list[torch.Tensor],
        predictions: list[torch.Tensor],
        batch_size: int,
    ) -> float:
        """The mean over all pairs of `per_image(originals [B, 3, H, W], reconstructions) -> [B] values`, in float64."""
        values = [
            torch.as_tensor(per_image(originals, reconstructions)).detach().double().cpu()
            for originals, reconstructions in image_pair_batches(references, predictions, batch_size)
        ]
        return float(torch.cat(values).mean())

    def network(self, build: Callable[..., torch.nn.Module], device: str | torch.device | None, **options: Any):
        """`build(**options)` on `device` (default: CUDA if available), built once per configuration.

        Constructing VGG16 or the Inception costs seconds, and `compute` may be called many times.

        Returns:
            `tuple[torch.nn.Module, torch.device]`: The network and its device.
        """
        device = resolve_device(device)
        key = (build.__qualname__, str(device), *((name, str(value)) for name, value in sorted(options.items())))
        # Created on first use: evaluate's __init__ builds the module and is not overridden here.
        cache = self.__dict__.setdefault("_networks", {})
        if key not in cache:
            cache[key] = build(**options).to(device)
        return cache[key], device
