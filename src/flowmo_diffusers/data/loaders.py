"""Batches of images for training and evaluation: sharding, skipped-image accounting and exact resumption.

Everything goes through Hugging Face ``datasets``:

* :func:`load_image_dataset` loads a Hub/local dataset (``dataset_name``, optionally streaming), an image
  folder (``train_data_dir``, ``imagefolder`` builder, labels from sub-folder names) or, with neither, a
  small embedded dataset of real photographs shipped inside scikit-image (works offline). The result always
  has an ``"image"`` column and, when labels exist, a ``"label"`` column.
* :class:`ImageTransform` turns a PIL image into a float32 tensor ``[3, R, R]`` in ``[-1, 1]`` the way the
  original FlowMo did (resize the shorter side, then random or center crop).
* :func:`build_train_dataloader` / :func:`build_eval_dataloader` return an :class:`ImageBatchLoader`, an
  iterable of ``{"pixel_values": [B, 3, R, R] float32, "labels": [B] int64}`` batches that works for
  map-style (``datasets.Dataset``) and streaming (``datasets.IterableDataset``) data, shards across processes
  with :func:`datasets.distributed.split_dataset_by_node`, skips (and counts) undecodable images, and can
  resume from a number of consumed batches.

Images are decoded here rather than by ``datasets``: the image column is cast to
``datasets.Image(decode=False)`` so that the raw bytes/path reach our code, and decoding happens inside a
``try`` block. ``datasets`` decodes lazily on access, so without this a single corrupt file would raise in the
middle of training instead of being skipped.

Randomness never touches the global RNGs: the epoch permutation and every random crop/flip come from
``torch.Generator`` objects seeded from ``(seed, process_index, epoch, batch, slot)``. A batch is therefore a
pure function of its position, independent of ``num_workers`` for map-style data, which is what makes
``skip_batches`` resume exact.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
import torch.utils.data
from datasets.distributed import split_dataset_by_node
from torchvision.transforms import InterpolationMode

from ..utils.seeds import derive_seed, seeded_generator
from .datasets import AnyDataset, prepare_columns
from .transforms import ImageDecoder, ImageTransform

logger = logging.getLogger(__name__)

_SKIPPED_COUNT_KEY = "_num_skipped_images"
_SKIPPED_ERROR_KEY = "_last_skip_error"
_POSITION_KEY = "_stream_position"  # streaming only: global batch position, see _in_stream_order

# ----------------------------------------------------------------------------------------------------------------------
# Skipped-image accounting
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SkippedImageCounter:
    """Number of images that could not be decoded and were skipped by one :class:`ImageBatchLoader`.

    Counts are per process: they include the images skipped by all DataLoader workers of this process (workers
    report their counts inside the batches they produce, so nothing is lost with ``num_workers > 0``). To log a
    global number, reduce ``count`` across processes (e.g. ``accelerator.reduce(torch.tensor(count), "sum")``).
    A corrupt image is counted every time it is met, i.e. once per epoch in training.
    """

    count: int = 0
    last_error: str | None = None

    def add(self, count: int, last_error: str | None = None) -> None:
        self.count += int(count)
        if last_error is not None:
            self.last_error = last_error


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _collate(
    pixel_values: list[torch.Tensor], labels: list[Any] | None, num_skipped: int, last_error: str | None
) -> dict[str, Any]:
    """Stack examples into a batch dict; a batch without images only carries the skipped count."""
    batch: dict[str, Any] = {_SKIPPED_COUNT_KEY: num_skipped, _SKIPPED_ERROR_KEY: last_error}
    if pixel_values:
        batch["pixel_values"] = torch.stack(pixel_values)
        if labels is not None:
            # Missing labels (None) become -1, the convention of e.g. the ImageNet test split.
            batch["labels"] = torch.tensor([-1 if label is None else int(label) for label in labels], dtype=torch.int64)
    return batch


class _MapStyleBatchDataset(torch.utils.data.Dataset):
    """Torch dataset whose item ``k`` is the whole ``k``-th batch of a map-style ``datasets.Dataset`` shard.

    Batch ``k`` belongs to epoch ``k // num_batches_per_epoch``. Training batches take their rows from a seeded
    per-epoch permutation and are always full: an undecodable image is replaced by a row drawn with a generator
    seeded from the batch position (so the replacement is reproducible too). Evaluation batches take contiguous
    rows in order and simply leave bad images out (they can be smaller than ``batch_size``, or empty).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        transform: ImageTransform,
        batch_size: int,
        seed: int,
        process_index: int,
        training: bool,
        max_replacement_attempts: int = 100,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.decoder = ImageDecoder(transform)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.training = training
        self.max_replacement_attempts = max_replacement_attempts
        self.num_rows = len(dataset)
        self.num_batches_per_epoch = self.num_rows // batch_size if training else math.ceil(self.num_rows / batch_size)
        self._permutation_epoch: int | None = None
        self._permutation: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_batches_per_epoch

    def _rows_of_batch(self, epoch: int, batch_in_epoch: int) -> list[int]:
        start = batch_in_epoch * self.batch_size
        stop = min(start + self.batch_size, self.num_rows)
        if not self.training:
            return list(range(start, stop))
        if self._permutation_epoch != epoch:  # one permutation per epoch, cached for the epoch's batches
            self._permutation = torch.randperm(
                self.num_rows, generator=seeded_generator(self.seed, self.process_index, epoch)
            )
            self._permutation_epoch = epoch
        return self._permutation[start:stop].tolist()

    def __getitem__(self, batch_position: int) -> dict[str, Any]:
        epoch, batch_in_epoch = divmod(int(batch_position), self.num_batches_per_epoch)
        rows = self._rows_of_batch(epoch, batch_in_epoch)
        examples = self.dataset[rows]  # one Arrow take for the whole batch: dict of column lists
        image_values = examples[self.image_column]
        label_values = examples[self.label_column] if self.label_column is not None else None

        pixel_values: list[torch.Tensor] = []
        labels: list[Any] | None = [] if self.label_column is not None else None
        num_skipped, last_error = 0, None
        replacement_generator: torch.Generator | None = None
        for slot, image_value in enumerate(image_values):
            # Seeded per slot so a crop does not depend on which other images of the batch failed to decode.
            crop_generator = (
                seeded_generator(self.seed, self.process_index, epoch, batch_in_epoch, slot)
                if self.decoder.transform.is_random
                else None
            )
            label = label_values[slot] if label_values is not None else None
            tensor, error = self.decoder(image_value, crop_generator)
            if tensor is None:
                num_skipped, last_error = num_skipped + 1, error
                if not self.training:
                    continue
                if replacement_generator is None:
                    # Separate stream (extra 0 component) so replacements never shift the crop seeds.
                    replacement_generator = seeded_generator(
                        self.seed, self.process_index, epoch, batch_in_epoch, self.batch_size, 0
                    )
                tensor, label, extra_skipped, error = self._draw_replacement(replacement_generator, crop_generator)
                num_skipped += extra_skipped
                last_error = error or last_error
            pixel_values.append(tensor)
            if labels is not None:
                labels.append(label)
        return _collate(pixel_values, labels, num_skipped, last_error)

    def _draw_replacement(
        self, replacement_generator: torch.Generator, crop_generator: torch.Generator | None
    ) -> tuple[torch.Tensor, Any, int, str | None]:
        """Random decodable row of the shard: ``(pixel_values, label, extra skipped, last error)``."""
        last_error = None
        for attempt in range(self.max_replacement_attempts):
            row = int(torch.randint(0, self.num_rows, (1,), generator=replacement_generator))
            example = self.dataset[row]
            tensor, error = self.decoder(example[self.image_column], crop_generator)
            if tensor is not None:
                label = example[self.label_column] if self.label_column is not None else None
                return tensor, label, attempt, last_error
            last_error = error
        raise RuntimeError(
            f"No decodable image found in {self.max_replacement_attempts} random draws from a shard of "
            f"{self.num_rows} rows; the dataset seems to be mostly corrupt (last error: {last_error})."
        )


class _StreamingBatchIterable(torch.utils.data.IterableDataset):
    """Torch iterable that decodes a streaming ``datasets.IterableDataset`` and yields collated batches.

    Batching happens here (not in the DataLoader) so that undecodable images can be dropped while training
    batches stay full. In a DataLoader worker, ``datasets`` itself gives this worker its share of the shards.
    DataLoader collects worker results round-robin, so the ``b``-th batch of worker ``w`` is global batch
    ``t = b * num_workers + w``; batches carry ``t`` so that :func:`_in_stream_order` can restore the order after
    a resume. ``skip_batches`` makes each worker fast-forward (count examples without decoding) through its share
    of the first ``skip_batches`` global batches.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        image_column: str,
        label_column: str | None,
        transform: ImageTransform,
        batch_size: int,
        seed: int,
        process_index: int,
        training: bool,
        infinite: bool,
        shuffle_buffer: int | None = None,
        first_epoch: int = 0,
        skip_batches: int = 0,
    ):
        self.dataset = dataset
        self.shuffle_buffer = shuffle_buffer
        self.image_column = image_column
        self.label_column = label_column
        self.decoder = ImageDecoder(transform)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.training = training
        self.infinite = infinite
        self.first_epoch = first_epoch
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker_info = torch.utils.data.get_worker_info()
        num_workers, worker_id = (1, 0) if worker_info is None else (worker_info.num_workers, worker_info.id)
        # Number of global batches t < skip_batches with t % num_workers == worker_id.
        batches_to_skip = max(0, (self.skip_batches - worker_id + num_workers - 1) // num_workers)
        drop_last = self.training
        carried_skips, last_error = 0, None
        worker_batch_index = 0  # batches of this worker so far, fast-forwarded ones included, across epochs
        epoch = self.first_epoch
        while True:
            epoch_dataset = self.dataset
            if self.shuffle_buffer is not None:
                # A fresh shuffle per epoch (shard order + buffer) instead of IterableDataset.set_epoch(): the
                # epoch counter of set_epoch lives in shared memory common to all DataLoader workers, so a worker
                # starting its next epoch would change the epoch another worker is about to read. The seed depends
                # only on (seed, epoch), so all processes agree on the shard order split_dataset_by_node relies on.
                epoch_seed = derive_seed(self.seed, epoch)
                epoch_dataset = self.dataset.shuffle(seed=epoch_seed, buffer_size=self.shuffle_buffer)
            num_examples, batch_in_epoch, fast_forwarded = 0, 0, 0
            pixel_values: list[torch.Tensor] = []
            labels: list[Any] | None = [] if self.label_column is not None else None
            for example in epoch_dataset:
                num_examples += 1
                if batches_to_skip > 0:  # resume: count examples without paying for decoding
                    fast_forwarded += 1
                    if fast_forwarded == self.batch_size:
                        batches_to_skip, fast_forwarded = batches_to_skip - 1, 0
                        batch_in_epoch, worker_batch_index = batch_in_epoch + 1, worker_batch_index + 1
                    continue
                crop_generator = (
                    seeded_generator(
                        self.seed, self.process_index, worker_id, epoch, batch_in_epoch, len(pixel_values)
                    )
                    if self.decoder.transform.is_random
                    else None
                )
                tensor, error = self.decoder(example[self.image_column], crop_generator)
                if tensor is None:
                    carried_skips, last_error = carried_skips + 1, error
                    continue
                pixel_values.append(tensor)
                if labels is not None:
                    labels.append(example[self.label_column])
                if len(pixel_values) == self.batch_size:
                    batch = _collate(pixel_values, labels, carried_skips, last_error)
                    batch[_POSITION_KEY] = worker_batch_index * num_workers + worker_id
                    yield batch
                    pixel_values, labels = [], ([] if labels is not None else None)
                    carried_skips, last_error = 0, None
                    batch_in_epoch, worker_batch_index = batch_in_epoch + 1, worker_batch_index + 1
            if fast_forwarded and not drop_last:  # a fast-forwarded partial final batch
                batches_to_skip, batch_in_epoch, worker_batch_index = (
                    batches_to_skip - 1,
                    batch_in_epoch + 1,
                    worker_batch_index + 1,
                )
            if pixel_values and not drop_last:
                batch = _collate(pixel_values, labels, carried_skips, last_error)
                batch[_POSITION_KEY] = worker_batch_index * num_workers + worker_id
                yield batch
                carried_skips, last_error = 0, None
                batch_in_epoch, worker_batch_index = batch_in_epoch + 1, worker_batch_index + 1
            if num_examples == 0 or not self.infinite:
                break
            if batch_in_epoch == 0:
                raise ValueError(
                    f"Streaming worker {worker_id} of process {self.process_index} read {num_examples} examples in "
                    f"epoch {epoch}, not enough for one batch of {self.batch_size} (bad images so far: "
                    f"{carried_skips}). Use a smaller batch_size or fewer DataLoader workers/processes."
                )
            epoch += 1
        if carried_skips:  # report skips that happened after the last batch (no position: not a real batch)
            yield _collate([], None, carried_skips, last_error)


def _in_stream_order(batches: Iterator[dict[str, Any]], first_position: int, num_workers: int) -> Iterator[dict]:
    """Reorder streaming batches by their global position ``t = worker_batch_index * num_workers + worker_id``.

    DataLoader hands out worker results round-robin starting with worker 0, which is ascending ``t`` for a
    fresh run. A resumed run starts at ``t = skip_batches``, whose worker is generally not worker 0, so the
    first round arrives rotated; a heap of at most ``num_workers`` batches restores the original order. Batches
    from a worker that has no data never arrive, hence the size bound instead of waiting forever.
    """
    pending: list[tuple[int, int, dict[str, Any]]] = []
    next_position = first_position
    for arrival, batch in enumerate(batches):
        position = batch.pop(_POSITION_KEY, None)
        if position is None:  # carries only a skipped-image count: order does not matter
            yield batch
            continue
        heapq.heappush(pending, (position, arrival, batch))
        while pending and (pending[0][0] == next_position or len(pending) >= num_workers):
            position, _, batch = heapq.heappop(pending)
            next_position = position + 1
            yield batch
    while pending:
        yield heapq.heappop(pending)[2]


class _BatchPositionSampler(torch.utils.data.Sampler):
    """Yields batch positions ``start, start + 1, ...`` up to ``stop`` (``None``: forever)."""

    def __init__(self, start: int, stop: int | None):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop)) if self.stop is not None else itertools.count(self.start)

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an infinite sampler has no length")
        return max(0, self.stop - self.start)


# ----------------------------------------------------------------------------------------------------------------------
# Public loader
# ----------------------------------------------------------------------------------------------------------------------


class ImageBatchLoader:
    """Iterable over image batches ``{"pixel_values": [B, 3, R, R] float32 in [-1, 1], "labels": [B] int64}``.

    ``"labels"`` is present only when the dataset has a label column. Built by :func:`build_train_dataloader` or
    :func:`build_eval_dataloader`; wraps a ``torch.utils.data.DataLoader`` created anew for each iteration.

    Attributes:
        skipped_images: :class:`SkippedImageCounter` of undecodable images met by this process (all workers).
        batches_consumed: training batches yielded so far, including those skipped via ``skip_batches``; store
            it in checkpoints and pass it back as ``skip_batches`` (or use ``state_dict``/``load_state_dict``).
        num_batches_per_epoch: batches per epoch for map-style data (upper bound for evaluation when images
            are corrupt), ``None`` for streaming data.

    Iteration semantics: a training loader continues where the previous iteration stopped (infinite: forever;
    ``infinite=False``: to the end of the current epoch, so ``for epoch ...: for batch in loader`` reshuffles
    each epoch). An evaluation loader makes one full pass per iteration.
    """

    def __init__(
        self,
        batch_source: _MapStyleBatchDataset | _StreamingBatchIterable,
        *,
        training: bool,
        infinite: bool,
        skip_batches: int,
        num_workers: int,
        pin_memory: bool,
    ):
        self._batch_source = batch_source
        self.training = training
        self.infinite = infinite
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.skipped_images = SkippedImageCounter()
        self.batches_consumed = int(skip_batches)
        # Streaming with infinite=False: epoch of the next iteration and batches already consumed in it (a streaming
        # epoch's length is unknown, so these cannot be derived from batches_consumed as for map-style data).
        self._stream_epoch = 0
        self._batches_consumed_in_epoch = int(skip_batches)

    @property
    def is_streaming(self) -> bool:
        return isinstance(self._batch_source, _StreamingBatchIterable)

    @property
    def num_batches_per_epoch(self) -> int | None:
        return None if self.is_streaming else self._batch_source.num_batches_per_epoch

    @property
    def epoch(self) -> int:
        """Current training epoch.

        Map-style: derived from ``batches_consumed``. Streaming: the number of completed passes with
        ``infinite=False`` (always 0 with ``infinite=True``, where workers cross epoch boundaries independently).
        """
        if self.is_streaming:
            return self._stream_epoch
        return self.batches_consumed // max(1, self._batch_source.num_batches_per_epoch)

    def __len__(self) -> int:
        if self.is_streaming:
            raise TypeError("A loader over a streaming dataset has no length.")
        return self._batch_source.num_batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Resumption state (plain ints, JSON-serializable); map-style data only needs ``batches_consumed``."""
        if self.is_streaming:
            batches_consumed_in_epoch = self._batches_consumed_in_epoch
        else:
            batches_consumed_in_epoch = self.batches_consumed % max(1, self._batch_source.num_batches_per_epoch)
        return {
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "batches_consumed_in_epoch": batches_consumed_in_epoch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        self._stream_epoch = int(state.get("epoch", 0))
        self._batches_consumed_in_epoch = int(state.get("batches_consumed_in_epoch", self.batches_consumed))

    def _make_dataloader(self) -> torch.utils.data.DataLoader:
        source = self._batch_source
        common = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        if isinstance(source, _MapStyleBatchDataset):
            if not self.training:
                start, stop = 0, source.num_batches_per_epoch
            else:
                start, per_epoch = self.batches_consumed, source.num_batches_per_epoch
                stop = None if self.infinite else (start // per_epoch + 1) * per_epoch  # end of the current epoch
            return torch.utils.data.DataLoader(source, sampler=_BatchPositionSampler(start, stop), **common)
        if self.training and self.infinite:
            source.first_epoch, source.skip_batches = 0, self.batches_consumed
        elif self.training:
            source.first_epoch, source.skip_batches = self._stream_epoch, self._batches_consumed_in_epoch
        else:
            source.first_epoch, source.skip_batches = 0, 0
        return torch.utils.data.DataLoader(source, **common)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches: Iterator[dict[str, Any]] = iter(self._make_dataloader())
        if self.is_streaming:
            batches = _in_stream_order(batches, self._batch_source.skip_batches, max(1, self.num_workers))
        for batch in batches:
            self.skipped_images.add(batch.pop(_SKIPPED_COUNT_KEY), batch.pop(_SKIPPED_ERROR_KEY))
            if "pixel_values" not in batch:  # only carried a skipped-image count
                continue
            if self.training:
                self.batches_consumed += 1
                self._batches_consumed_in_epoch += 1
            yield batch
        if self.training and self.is_streaming and not self.infinite:  # a full pass: the next one is a new epoch
            self._stream_epoch += 1
            self._batches_consumed_in_epoch = 0

    def __repr__(self) -> str:
        kind = "streaming" if self.is_streaming else "map-style"
        return (
            f"{type(self).__name__}({kind}, training={self.training}, infinite={self.infinite}, "
            f"batch_size={self._batch_source.batch_size}, batches_consumed={self.batches_consumed}, "
            f"skipped_images={self.skipped_images.count})"
        )


def _check_common_arguments(resolution: int, batch_size: int, process_index: int, num_processes: int) -> None:
    if resolution <= 0 or batch_size <= 0:
        raise ValueError(f"resolution and batch_size must be positive, got {resolution} and {batch_size}.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")


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
) -> ImageBatchLoader:
    """Shuffled, randomly cropped training batches for one process.

    Do not pass the result to ``accelerator.prepare``: sharding across processes is already done here with
    :func:`datasets.distributed.split_dataset_by_node` (map-style: contiguous chunk per process; streaming: by
    shards when ``num_shards % num_processes == 0``, else one example out of ``num_processes``).

    Shuffling: map-style data uses a permutation of the process' chunk seeded by ``(seed, process_index,
    epoch)``; streaming data is reshuffled every epoch with ``IterableDataset.shuffle(seed=f(seed, epoch),
    buffer_size=shuffle_buffer)`` (shard order + buffer; equivalent to ``set_epoch``, see
    ``_StreamingBatchIterable``). Batches always hold exactly ``batch_size`` images (``drop_last``): undecodable images
    are counted in ``loader.skipped_images`` and replaced (map-style: seeded random row of the chunk; streaming:
    the next example of the stream).

    Resuming: pass ``skip_batches=loader.batches_consumed`` of the interrupted run (same dataset, seed,
    batch_size, processes). Map-style: exact and O(1), for any ``num_workers``, because batch ``k`` (images,
    crops, flips, replacements) depends only on ``k``. Streaming (``infinite=True``): the stream is replayed
    without decoding; exact when ``num_workers`` is unchanged, every worker has shards (``num_shards`` of
    the process' split >= ``num_workers``) and no corrupt image fell in the skipped part. With ``infinite=False``
    use ``state_dict``/``load_state_dict`` (a streaming epoch's length is unknown in advance).

    Args:
        dataset: ``datasets.Dataset`` or ``datasets.IterableDataset`` with an image column.
        resolution: output side ``R``.
        batch_size: images per batch and process.
        seed: seed of the shuffle and of the random crops/flips (same value on all processes).
        process_index / num_processes: e.g. ``accelerator.process_index`` / ``accelerator.num_processes``.
        num_workers: DataLoader worker processes (each decodes whole batches).
        shuffle_buffer: shuffle buffer size for streaming datasets.
        random_flip: horizontal flips with probability 1/2.
        infinite: iterate across epochs forever; otherwise one iteration = rest of the current epoch.
        skip_batches: batches consumed by a previous run (see above).
        image_column / label_column: auto-detected when ``None``.
        pin_memory: forwarded to the DataLoader.
        interpolation: resize filter (FlowMo: bilinear).

    Returns:
        :class:`ImageBatchLoader` yielding ``{"pixel_values": [B, 3, R, R] float32 in [-1, 1],
        "labels": [B] int64 (if labeled)}``.
    """
    _check_common_arguments(resolution, batch_size, process_index, num_processes)
    if seed < 0 or skip_batches < 0:
        raise ValueError(f"seed and skip_batches must be non-negative, got {seed} and {skip_batches}.")
    dataset, image_column, label_column = prepare_columns(dataset, image_column, label_column)
    dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    transform = ImageTransform(resolution, random_crop=True, random_flip=random_flip, interpolation=interpolation)
    batch_source: _MapStyleBatchDataset | _StreamingBatchIterable
    if isinstance(dataset, datasets.IterableDataset):
        batch_source = _StreamingBatchIterable(
            dataset,
            image_column,
            label_column,
            transform,
            batch_size,
            seed,
            process_index,
            training=True,
            infinite=infinite,
            shuffle_buffer=shuffle_buffer,
        )
    else:
        if len(dataset) < batch_size:
            raise ValueError(
                f"Process {process_index} holds {len(dataset)} examples, fewer than batch_size={batch_size} "
                f"(dataset split over {num_processes} processes); no full training batch can be formed."
            )
        batch_source = _MapStyleBatchDataset(
            dataset, image_column, label_column, transform, batch_size, seed, process_index, training=True
        )
    return ImageBatchLoader(
        batch_source,
        training=True,
        infinite=infinite,
        skip_batches=skip_batches,
        num_workers=num_workers,
        pin_memory=pin_memory,
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
) -> ImageBatchLoader:
    """Center-cropped evaluation batches in dataset order, one full pass per iteration.

    Sharding uses :func:`datasets.distributed.split_dataset_by_node`: map-style data gets contiguous chunks
    (sizes differ by at most one), streaming data gets whole shards or every ``num_processes``-th example. The
    shards are disjoint and their union is exactly the dataset: **no padding and no duplicates**, so processes
    may yield different numbers of images/batches (and the last batch of each process is smaller, as are batches
    that contained corrupt images, which are skipped and counted). Accumulate per-process results locally and
    gather them once at the end (e.g. ``accelerate.utils.gather_object``) rather than running a collective per
    batch, which would deadlock when batch counts differ. With ``num_workers > 1`` on streaming data the order
    is the (deterministic) round-robin interleaving of the workers' shards.

    Returns:
        :class:`ImageBatchLoader` yielding ``{"pixel_values": [b, 3, R, R] float32 in [-1, 1],
        "labels": [b] int64 (if labeled)}`` with ``1 <= b <= batch_size``.
    """
    _check_common_arguments(resolution, batch_size, process_index, num_processes)
    dataset, image_column, label_column = prepare_columns(dataset, image_column, label_column)
    dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    transform = ImageTransform(resolution, random_crop=False, random_flip=False, interpolation=interpolation)
    batch_source: _MapStyleBatchDataset | _StreamingBatchIterable
    if isinstance(dataset, datasets.IterableDataset):
        batch_source = _StreamingBatchIterable(
            dataset,
            image_column,
            label_column,
            transform,
            batch_size,
            seed=0,
            process_index=process_index,
            training=False,
            infinite=False,
        )
    else:
        batch_source = _MapStyleBatchDataset(
            dataset,
            image_column,
            label_column,
            transform,
            batch_size,
            seed=0,
            process_index=process_index,
            training=False,
        )
    return ImageBatchLoader(
        batch_source, training=False, infinite=False, skip_batches=0, num_workers=num_workers, pin_memory=pin_memory
    )


def take_images(loader: ImageBatchLoader, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` decodable images of an evaluation loader, in dataset order, as one batch.

    Evaluation batches leave undecodable images out, so the first batch of a dataset whose first files are corrupt
    holds fewer than ``batch_size`` images; this keeps reading later rows until ``count`` images are found (or the
    data end). Use it for a fixed validation batch.

    Returns:
        ``{"pixel_values": [n, 3, R, R], "labels": [n] (if labeled)}`` with ``n = min(count, decodable images)``.

    Raises:
        ValueError: ``count`` is not positive, or no image of the dataset can be decoded.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}.")
    parts: dict[str, list[torch.Tensor]] = {}
    found = 0
    for batch in loader:
        take = min(count - found, len(batch["pixel_values"]))
        for key, value in batch.items():
            parts.setdefault(key, []).append(value[:take])
        found += take
        if found == count:
            break
    if not found:
        raise ValueError(
            f"no decodable image in the dataset ({loader.skipped_images.count} skipped; last error: "
            f"{loader.skipped_images.last_error})"
        )
    return {key: torch.cat(values) for key, values in parts.items()}


def total_skipped_images(accelerator, *loaders: ImageBatchLoader) -> int:
    """Undecodable images skipped by ``loaders`` on all processes (a collective: call it on every process).

    ``accelerator`` is an ``accelerate.Accelerator``; its ``reduce`` sums the per-process counts.
    """
    local = torch.tensor(sum(loader.skipped_images.count for loader in loaders), device=accelerator.device)
    return int(accelerator.reduce(local, reduction="sum"))


__all__ = [
    "ImageBatchLoader",
    "SkippedImageCounter",
    "build_eval_dataloader",
    "build_train_dataloader",
    "take_images",
    "total_skipped_images",
]
