"""The loaders' entry points: :func:`build_train_dataloader` and :func:`build_eval_dataloader`.

Both check their arguments, keep the image and label columns, shard the data across processes with
:func:`datasets.distributed.split_dataset_by_node` and return an :class:`~flowmo_diffusers.data.ImageBatchLoader`.
"""

from __future__ import annotations

from typing import Any

import datasets
from datasets.distributed import split_dataset_by_node
from torchvision.transforms import InterpolationMode

from ..utils.validation import check_int
from .datasets import AnyDataset, prepare_columns
from .decoding import RowDecoding
from .loaders import ImageBatchLoader
from .transforms import ImageTransform


def _build_loader(
    dataset: AnyDataset,
    resolution: int,
    batch_size: int,
    *,
    training: bool,
    random_flip: bool,
    process_index: int,
    num_processes: int,
    image_column: str | None,
    label_column: str | None,
    interpolation: InterpolationMode,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    crop_scale: tuple[float, float] | None = None,
    **loader_options: Any,
) -> ImageBatchLoader:
    """What both builders do: check, keep the image/label columns, shard across processes, build the loader."""
    resolution, batch_size = check_int("resolution", resolution, 1), check_int("batch_size", batch_size, 1)
    process_index = check_int("process_index", process_index, 0, check_int("num_processes", num_processes, 1) - 1)
    dataset, image_column, label_column = prepare_columns(dataset, image_column, label_column)
    dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    if training and not isinstance(dataset, datasets.IterableDataset) and len(dataset) < batch_size:
        raise ValueError(
            f"Process {process_index} holds {len(dataset)} examples, fewer than batch_size={batch_size} "
            f"(dataset split over {num_processes} processes); no full training batch can be formed."
        )
    transform = ImageTransform(
        resolution, random_crop=training, random_flip=random_flip, interpolation=interpolation, crop_scale=crop_scale
    )
    decoding = RowDecoding(image_column, label_column, transform, seed, process_index)
    dataloader_options = {"num_workers": num_workers, "pin_memory": pin_memory}
    return ImageBatchLoader(
        dataset, decoding, batch_size, training=training, dataloader_options=dataloader_options, **loader_options
    )


def build_train_dataloader(
    dataset: AnyDataset,
    resolution: int,
    batch_size: int,
    *,
    seed: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    random_flip: bool = False,
    infinite: bool = True,
    skip_batches: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    pin_memory: bool = False,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    random_crop_scale: tuple[float, float] | None = None,
) -> ImageBatchLoader:
    """Shuffled, randomly cropped training batches for one process.

    Do not pass the result to ``accelerator.prepare``: sharding across processes is already done here with
    :func:`datasets.distributed.split_dataset_by_node` (map-style: contiguous chunk per process; streaming: by shards
    when ``num_shards % num_processes == 0``, else one example out of ``num_processes``), and the loader keeps its
    own positions, for reasons :mod:`~flowmo_diffusers.data.loaders` gives (Accelerate would read each stream whole, on
    process 0 or on every process, and save one stream position for all processes).

    Batches always hold exactly ``batch_size`` images (``drop_last``): undecodable images are counted in
    ``loader.skipped_images`` and replaced (map-style: by a seeded random row of the chunk; streaming: by the next
    rows of the stream).

    Shuffling: map-style data is permuted each epoch by Accelerate's ``SeedableRandomSampler`` (seeded by ``(seed,
    process_index)``, ``set_epoch``). Streams are read in shard order, each DataLoader worker its own shards, and
    their rows are permuted within consecutive windows of ``shuffle_buffer`` rows, anew every epoch (a buffer whose
    content survives resumption, which ``IterableDataset.shuffle``'s does not).

    Resuming is exact, bit for bit, for any ``num_workers`` as long as the dataset, seed, batch size, processes and
    (streams) ``num_workers`` are those of the interrupted run:

    * map-style: pass ``skip_batches=loader.batches_consumed`` (or use ``load_state_dict``); O(1), since batch ``k``
      (images, crops, flips, replacements) depends only on ``k``;
    * streams: save ``loader.state_dict()`` and give it to ``load_state_dict`` of the new loader. It holds every
      worker's position in its shards (``datasets.IterableDataset.state_dict`` through torchdata's
      ``StatefulDataLoader``), so the stream continues where it stopped. ``skip_batches`` also works for streams, by
      reading (and decoding) the skipped batches again.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The images (and optionally labels).
        resolution (`int`):
            Output side ``R``.
        batch_size (`int`):
            Images per batch and process.
        seed (`int`):
            Seed of the shuffle and of the random crops/flips (same value on all processes).
        process_index (`int`, *optional*, defaults to `0`):
            This process, e.g. ``accelerator.process_index``.
        num_processes (`int`, *optional*, defaults to `1`):
            Processes sharing the data, e.g. ``accelerator.num_processes``.
        num_workers (`int`, *optional*, defaults to `0`):
            DataLoader worker processes decoding images.
        shuffle_buffer (`int`, *optional*, defaults to `1000`):
            Rows per shuffled window of a stream (1 or less: stream order).
        random_flip (`bool`, *optional*, defaults to `False`):
            Horizontal flips with probability 1/2.
        infinite (`bool`, *optional*, defaults to `True`):
            Iterate across epochs forever; otherwise one iteration is the rest of the current epoch.
        skip_batches (`int`, *optional*, defaults to `0`):
            Batches consumed by a previous run (see above).
        image_column (`str`, *optional*):
            Image column; auto-detected when `None`.
        label_column (`str`, *optional*):
            Integer label column; auto-detected when `None`.
        pin_memory (`bool`, *optional*, defaults to `False`):
            Forwarded to the DataLoader.
        interpolation (`InterpolationMode`, *optional*, defaults to `InterpolationMode.BILINEAR`):
            Resize filter (FlowMo: bilinear).
        random_crop_scale (`Tuple[float, float]`, *optional*):
            Crop a random square of side ``[low, high]`` times the shorter side and resize it to ``R`` (see
            :class:`~flowmo_diffusers.data.ImageTransform`'s ``crop_scale``) instead of FlowMo's resize-then-crop:
            many views of few photographs.

    Returns:
        [`ImageBatchLoader`]: yielding ``{"pixel_values": [B, 3, R, R] float32 in [-1, 1], "labels": [B] int64 (if
        labeled)}``.
    """
    seed, skip_batches = check_int("seed", seed, 0), check_int("skip_batches", skip_batches, 0)
    columns = {"image_column": image_column, "label_column": label_column}
    return _build_loader(
        dataset, resolution, batch_size, training=True, random_flip=random_flip, seed=seed, infinite=infinite,
        skip_batches=skip_batches, process_index=process_index, num_processes=num_processes, num_workers=num_workers,
        pin_memory=pin_memory, interpolation=interpolation, shuffle_buffer=shuffle_buffer,
        crop_scale=random_crop_scale, **columns,
    )


def build_eval_dataloader(
    dataset: AnyDataset,
    resolution: int,
    batch_size: int,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    pin_memory: bool = False,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    return_indices: bool = False,
) -> ImageBatchLoader:
    """Center-cropped evaluation batches in dataset order, one full pass per iteration.

    Sharding uses :func:`datasets.distributed.split_dataset_by_node`: map-style data gets contiguous chunks (sizes
    differ by at most one), streaming data gets whole shards or every ``num_processes``-th example. The shards are
    disjoint and their union is exactly the dataset: **no padding and no duplicates**, so processes may yield
    different numbers of images/batches. Undecodable images are left out and counted: a map-style batch holds the
    decodable images of ``batch_size`` consecutive rows, a streaming batch the next ``batch_size`` decodable images
    (the last one fewer). Accumulate per-process results locally and gather them once at the end (e.g.
    ``accelerate.utils.gather_object``) rather than running a collective per batch, which would deadlock when batch
    counts differ. With ``num_workers > 1`` on streaming data the order is the (deterministic) round-robin
    interleaving of the workers' shards.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The images (and optionally labels).
        resolution (`int`):
            Center-crop side ``R``.
        batch_size (`int`):
            Images per batch (at most).
        process_index (`int`, *optional*, defaults to `0`) and num_processes (`int`, *optional*, defaults to `1`):
            This process and the number of processes, each evaluating its own shard.
        num_workers (`int`, *optional*, defaults to `0`):
            DataLoader workers decoding images; on a stream each reads its own shards (see the order above).
        image_column (`str`, *optional*) and label_column (`str`, *optional*):
            The image and integer label columns, auto-detected when `None`.
        pin_memory (`bool`, *optional*, defaults to `False`):
            Whether the DataLoader pins its batches in memory.
        interpolation (`InterpolationMode`, *optional*, defaults to `InterpolationMode.BILINEAR`):
            Resize filter before the center crop (FlowMo: bilinear).
        return_indices (`bool`, *optional*, defaults to `False`):
            Add ``"indices"``, each image's row in this process' shard (map-style) or its position in this process'
            stream (streams, at most one worker), undecodable rows included.

    Returns:
        [`ImageBatchLoader`]: yielding ``{"pixel_values": [b, 3, R, R] float32 in [-1, 1], "labels": [b] int64 (if
        labeled)}`` with ``1 <= b <= batch_size``.
    """
    if return_indices and num_workers > 1 and isinstance(dataset, datasets.IterableDataset):
        raise ValueError("return_indices numbers a stream's rows in order, which needs num_workers <= 1.")
    columns = {"image_column": image_column, "label_column": label_column}
    return _build_loader(
        dataset, resolution, batch_size, training=False, random_flip=False, seed=0, infinite=False, skip_batches=0,
        process_index=process_index, num_processes=num_processes, num_workers=num_workers, pin_memory=pin_memory,
        interpolation=interpolation, return_indices=return_indices, **columns,
    )


__all__ = ["build_eval_dataloader", "build_train_dataloader"]
