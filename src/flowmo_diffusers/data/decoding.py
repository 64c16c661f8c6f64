"""What the DataLoader workers produce and how it becomes a batch: row decoding, collation, skipped-image accounting.

Shared by the map-style (:mod:`~flowmo_diffusers.data.sampling`) and streaming (:mod:`~flowmo_diffusers.data.streams`)
sources of :class:`~flowmo_diffusers.data.ImageBatchLoader`. Every worker reports the images it could not decode inside
the batches it produces (two internal keys, taken out by :func:`pop_skipped` before a batch reaches the user), so
nothing is lost with ``num_workers > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..utils.seeds import seeded_generator
from .transforms import ImageDecoder, ImageTransform

if TYPE_CHECKING:  # annotations only: loaders imports this module
    from .loaders import ImageBatchLoader

# Internal batch keys: removed by ImageBatchLoader (pop_skipped) before a batch reaches the user.
_SKIPPED_COUNT_KEY = "_num_skipped_images"
_SKIPPED_ERROR_KEY = "_last_skip_error"

# Last component of a seed: which random stream it feeds, so that no two uses share one. (numpy's SeedSequence
# ignores trailing zeros, so every stream names its purpose explicitly rather than by the length of its key.) All three
# live here, side by side, so that the map-style and streaming modules cannot pick the same value.
CROP_STREAM, REPLACEMENT_STREAM, WINDOW_STREAM = 1, 2, 3

# ----------------------------------------------------------------------------------------------------------------------
# Skipped-image accounting
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SkippedImageCounter:
    """Number of images that could not be decoded and were skipped by one :class:`ImageBatchLoader`.

    Counts are per process and per run: they include the images skipped by all DataLoader workers of this process
    (workers report their counts inside the batches they produce, so nothing is lost with ``num_workers > 0``). To log
    a global number, reduce ``count`` across processes (:func:`total_skipped_images`). A corrupt image is counted every
    time it is met, i.e. once per epoch in training.
    """

    count: int = 0
    last_error: str | None = None

    def add(self, count: int, last_error: str | None = None) -> None:
        self.count += int(count)
        if last_error is not None:
            self.last_error = last_error


def total_skipped_images(accelerator, *loaders: ImageBatchLoader) -> int:
    """Undecodable images skipped by ``loaders`` on all processes (a collective: call it on every process).

    Args:
        accelerator (`accelerate.Accelerator`):
            Its ``reduce`` sums the per-process counts.
        loaders (`ImageBatchLoader`):
            The loaders whose counts to add.

    Returns:
        `int`: the total over loaders and processes.
    """
    local = torch.tensor(sum(loader.skipped_images.count for loader in loaders), device=accelerator.device)
    return int(accelerator.reduce(local, reduction="sum"))


def pop_skipped(batch: dict[str, Any]) -> tuple[int, str | None]:
    """Take the skipped-image count and last error that :func:`collate_rows` put into ``batch`` out of it."""
    return batch.pop(_SKIPPED_COUNT_KEY), batch.pop(_SKIPPED_ERROR_KEY)


# ----------------------------------------------------------------------------------------------------------------------
# Rows: what the DataLoader workers produce, one dict per source row
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RowDecoding:
    """How one source row becomes a row dict for :func:`collate_rows`: its columns, the transform, the crop seeds.

    The decoder is ``datasets.Image``'s, inside a ``try`` (:class:`ImageDecoder`): ``datasets`` itself decodes lazily
    and raises on a corrupt file, which would stop a run instead of skipping and counting the image.
    """

    image_column: str
    label_column: str | None
    transform: ImageTransform
    seed: int
    process_index: int

    def __post_init__(self):
        self.decoder = ImageDecoder(self.transform)

    def generator(self, *key: int) -> torch.Generator:
        """A generator seeded by ``(seed, process_index, *key)``."""
        return seeded_generator(self.seed, self.process_index, *key)

    def decode(self, example: dict[str, Any], index: int, generator: torch.Generator | None) -> dict[str, Any]:
        """``example`` decoded: ``pixel_values`` is ``None`` (and ``num_skipped`` 1) when its image is undecodable."""
        pixel_values, error = self.decoder(example[self.image_column], generator)
        label = example.get(self.label_column) if self.label_column is not None else None
        return {
            "pixel_values": pixel_values,
            "label": label,
            "index": int(index),
            "num_skipped": int(pixel_values is None),
            "error": error or None,
        }


def collate_rows(rows: list[dict], with_labels: bool, with_indices: bool) -> dict[str, Any]:
    """Stack the decodable rows into a batch; the undecodable ones only add to the skipped count."""
    kept = [row for row in rows if row["pixel_values"] is not None]
    errors = [row["error"] for row in rows if row["error"]]
    batch: dict[str, Any] = {
        _SKIPPED_COUNT_KEY: sum(row["num_skipped"] for row in rows),
        _SKIPPED_ERROR_KEY: errors[-1] if errors else None,
    }
    if kept:
        batch["pixel_values"] = torch.stack([row["pixel_values"] for row in kept])
        if with_labels:
            # Missing labels (None) become -1, the convention of e.g. the ImageNet test split.
            labels = [-1 if row["label"] is None else int(row["label"]) for row in kept]
            batch["labels"] = torch.tensor(labels, dtype=torch.int64)
        if with_indices:
            batch["indices"] = torch.tensor([row["index"] for row in kept], dtype=torch.int64)
    return batch


__all__ = ["SkippedImageCounter", "total_skipped_images"]
