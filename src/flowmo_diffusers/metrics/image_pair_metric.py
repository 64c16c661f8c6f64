"""What the bundled `evaluate` metric scripts share, so that each script states only what differs.

The scripts (`evaluate_modules/<name>/<name>.py`) subclass [`ImagePairMetric`] with their documentation as
class attributes and a [`~ImagePairMetric.compute_pairs`]. Inputs of every bundled metric are images as
channel-first `[3, H, W]` float arrays (numpy arrays, torch tensors or nested lists) in [-1, 1]: `predictions`
are the reconstructions, `references` the original images.

This module imports `evaluate`; only the scripts import it (`flowmo_diffusers.metrics` itself does not need
`evaluate` installed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import evaluate
import numpy as np
import torch

from ._optional_dependencies import require
from .image_conversion import resolve_device

#: Where scikit-image documents its metrics (PSNR, SSIM), followed by the function's name.
SKIMAGE_METRICS_URL = "https://scikit-image.org/docs/stable/api/skimage.metrics.html#skimage.metrics."


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
    """An `evaluate` metric of (reconstruction, original) image pairs, named after its class (`Psnr` -> `"psnr"`).

    Subclasses set the class attributes below and implement [`~ImagePairMetric.compute_pairs`]; `_info` and
    `_compute`, the two methods `evaluate` calls, are here, and so is the part of the documentation every bundled
    metric shares (the image inputs, `batch_size`, the example). The class docstring becomes the description followed
    by the inputs description, as `evaluate`'s own metrics have it.

    Attributes:
        DESCRIPTION (`str`):
            What the metric computes.
        OPTIONS (`str`):
            Lines of the `Args:` section for the metric's own keyword arguments of `compute`, indented by 4.
        RESULT (`str`):
            What the result is.
        PER_IMAGE (`Callable`, *optional*):
            For a mean of per-image values: `per_image(originals [B, 3, H, W], reconstructions) -> [B] values`; the
            default [`~ImagePairMetric.compute_pairs`] averages it. Metrics that need more override `compute_pairs`.
        CITATION (`str`):
            BibTeX of the metric.
        REFERENCE_URLS (`list[str]`):
            Where to read more.
    """

    DESCRIPTION = ""
    OPTIONS = ""
    RESULT = ""
    PER_IMAGE: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    CITATION = ""
    REFERENCE_URLS: list[str] = []
    INPUTS_DESCRIPTION = ""  # composed by __init_subclass__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__name__.lower()
        cls.INPUTS_DESCRIPTION = (
            "\nArgs:\n"
            "    predictions: reconstructed images, each a channel-first [3, H, W] float array in [-1, 1].\n"
            "    references: original images, same shapes.\n"
            f"{cls.OPTIONS}"
            "    batch_size: image pairs per batch (consecutive pairs of one size).\n"
            f"Returns:\n    {name}: {cls.RESULT}\n"
            "Examples:\n"
            "    >>> from flowmo_diffusers.metrics import load_metric\n"
            f"    >>> {name} = load_metric({name!r})\n"
            f"    >>> {name}.compute(predictions=reconstructions, references=originals)[{name!r}]\n"
        )
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
        value = self.compute_pairs(references, as_image_tensors(predictions, "predictions"), **options)
        return {type(self).__name__.lower(): value}

    def compute_pairs(
        self, references: list[torch.Tensor], predictions: list[torch.Tensor], batch_size: int = 64
    ) -> float:
        """The metric of the image pairs; by default the mean of `PER_IMAGE` over them.

        Subclasses that override it take the metric's own options (the keyword arguments of `compute` besides
        `predictions` and `references`) as further keyword arguments.

        Args:
            references (`list[torch.Tensor]`):
                The original images, [3, H, W] float32 in [-1, 1].
            predictions (`list[torch.Tensor]`):
                The reconstructions, the same shapes.
            batch_size (`int`, *optional*, defaults to `64`):
                Image pairs per call of `PER_IMAGE`.

        Returns:
            `float`: The metric.
        """
        return self.mean_over_images(self.PER_IMAGE, references, predictions, batch_size)

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
