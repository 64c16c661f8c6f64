"""Numbering and sharding of evaluation images: each image keeps its position in the evaluated set on every process.

The tokenizer evaluation seeds each image's initial noise from that position, and the generation evaluation's
reference statistics split the images over processes with it; both read the batches of [`build_evaluation_loader`].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .builders import build_eval_dataloader
from .loaders import ImageBatchLoader

if TYPE_CHECKING:
    import datasets
    from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

#: Name of the column added to the dataset that carries each image's position in the evaluated set.
GLOBAL_IMAGE_INDEX_COLUMN = "global_image_index"


def add_global_image_index(
    dataset: datasets.Dataset | datasets.IterableDataset, max_samples: int | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the first `max_samples` images and add [`GLOBAL_IMAGE_INDEX_COLUMN`] (0, 1, 2, ... in order).

    The index is attached before the dataset is split over processes, so each image keeps it wherever it is
    evaluated; it seeds the image's initial noise.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            With an `"image"` column (as returned by [`~flowmo_diffusers.data.load_image_dataset`]).
        max_samples (`int`, *optional*):
            Number of leading images to keep (None: all).

    Returns:
        The same kind of dataset with columns `"image"` (+ `"label"`) and `global_image_index` (int64).
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        if dataset.features is not None and isinstance(dataset.features.get("image"), datasets.Image):
            # Functions mapped over a stream receive decoded examples unless decoding is off; the index does
            # not need the pixels, and every process reads every example (see build_evaluation_loader).
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        features = None
        if dataset.features is not None:  # keep the features known, so the columns need not be sniffed later
            features = dataset.features.copy()
            features[GLOBAL_IMAGE_INDEX_COLUMN] = datasets.Value("int64")
        return dataset.map(_global_image_index_of, with_indices=True, features=features)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    # add_column appends one Arrow column; map() would rewrite every image into the cache.
    return dataset.add_column(GLOBAL_IMAGE_INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))


# Module-level callables rather than lambdas: a DataLoader worker started with "spawn" must pickle them.
def _global_image_index_of(example: dict[str, Any], index: int) -> dict[str, int]:
    return {GLOBAL_IMAGE_INDEX_COLUMN: index}


@dataclass(frozen=True)
class _IsImageOfProcess:
    process_index: int
    num_processes: int

    def __call__(self, global_index: int) -> bool:
        return global_index % self.num_processes == self.process_index


def build_evaluation_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    resolution: int,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    interpolation: InterpolationMode | None = None,
) -> ImageBatchLoader:
    """Center-cropped batches of this process' share of `dataset`, carrying each image's global index.

    Map-style data is split by [`~flowmo_diffusers.data.build_eval_dataloader`] (contiguous chunks,
    no padding, no duplicates). A stream is different: `datasets` splits streams by shard and numbers mapped
    examples per shard, so an index added before the split would restart in every shard. Here every process
    therefore reads the whole stream, keeps the images whose global index modulo `num_processes` equals
    `process_index` (only those are decoded) and uses at most one worker (several workers would again split
    the stream by shard). Reading is cheap next to decoding, and `datasets` does the same whenever the number
    of shards is not a multiple of the number of processes.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            Output of [`add_global_image_index`].
        resolution (`int`):
            Center-crop size `R`.
        batch_size (`int`):
            Images per batch.
        process_index (`int`, *optional*, defaults to `0`):
            This process.
        num_processes (`int`, *optional*, defaults to `1`):
            The number of processes.
        num_workers (`int`, *optional*, defaults to `0`):
            DataLoader workers (capped at 1 for streams).
        interpolation (`torchvision.transforms.InterpolationMode`, *optional*):
            The resize before the crop; None keeps the data pipeline's default (bilinear, as FlowMo).

    Returns:
        [`~flowmo_diffusers.data.ImageBatchLoader`]: Batches `{"pixel_values": [b, 3, R, R] float32 in [-1, 1],
        "labels": [b] int64 global image indices}`; `b <= batch_size`.
    """
    import datasets

    # The loader carries one integer column as "labels"; here it is the global index, not the class label.
    common = dict(image_column="image", label_column=GLOBAL_IMAGE_INDEX_COLUMN)
    if interpolation is not None:
        common["interpolation"] = interpolation
    if isinstance(dataset, datasets.IterableDataset):
        if num_processes > 1:
            dataset = dataset.filter(
                _IsImageOfProcess(process_index, num_processes), input_columns=GLOBAL_IMAGE_INDEX_COLUMN
            )
        if num_workers > 1:
            logger.warning("streaming evaluation uses 1 DataLoader worker per process (asked for %d)", num_workers)
        return build_eval_dataloader(dataset, resolution, batch_size, num_workers=min(num_workers, 1), **common)
    return build_eval_dataloader(
        dataset,
        resolution,
        batch_size,
        process_index=process_index,
        num_processes=num_processes,
        num_workers=num_workers,
        **common,
    )


__all__ = ["GLOBAL_IMAGE_INDEX_COLUMN", "add_global_image_index", "build_evaluation_loader"]
