"""Batches of images for training and evaluation: sharding, skipped-image accounting and exact resumption.

:func:`build_train_dataloader` / :func:`build_eval_dataloader` return an :class:`ImageBatchLoader`, an iterable of
``{"pixel_values": [B, 3, R, R] float32, "labels": [B] int64}`` batches over map-style (``datasets.Dataset``) or
streaming (``datasets.IterableDataset``) data. The libraries do the work:

* sharding across processes: :func:`datasets.distributed.split_dataset_by_node`;
* map-style order and resumption: a ``torch.utils.data.BatchSampler`` over Accelerate's ``SeedableRandomSampler``
  (one permutation per epoch, ``set_epoch``), and Accelerate's ``SkipBatchSampler`` to resume mid-epoch;
* streaming resumption: ``datasets.IterableDataset.state_dict()`` of every DataLoader worker, collected by torchdata's
  ``StatefulDataLoader`` (its ``state_dict``/``load_state_dict``), so a resumed stream continues exactly, with any
  number of workers; streams are shuffled by a batched ``datasets`` map over windows of rows, which that state resumes
  exactly (``IterableDataset.shuffle``'s buffer is lost on resume);
* decoding: ``datasets.Image`` (see :mod:`~flowmo_diffusers.data.transforms`), inside a ``try`` so that a corrupt file
  is skipped and counted instead of raising in the middle of a run.

Randomness never touches the global RNGs: every random crop/flip comes from a ``torch.Generator`` seeded from ``(seed,
process, epoch, row)`` (streams: ``(seed, process, epoch, worker, position)``), and every DataLoader has a generator of
its own. A map-style batch is therefore a pure function of its position, whatever ``num_workers``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
import torch.utils.data
from accelerate.data_loader import SeedableRandomSampler, SkipBatchSampler
from datasets.distributed import split_dataset_by_node
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import InterpolationMode

from ..utils.seeds import derive_seed, seeded_generator
from ..utils.validation import check_int
from .datasets import AnyDataset, prepare_columns
from .transforms import ImageDecoder, ImageTransform

logger = logging.getLogger(__name__)

# Internal batch keys: removed by ImageBatchLoader before a batch reaches the user.
_SKIPPED_COUNT_KEY = "_num_skipped_images"
_SKIPPED_ERROR_KEY = "_last_skip_error"

# Last component of a seed: which random stream it feeds, so that no two uses share one. (numpy's SeedSequence
# ignores trailing zeros, so every stream names its purpose explicitly rather than by the length of its key.)
_CROP_STREAM, _REPLACEMENT_STREAM, _WINDOW_STREAM = 1, 2, 3

# Random rows tried in place of an undecodable training image before the data are declared mostly corrupt.
_MAX_REPLACEMENT_ATTEMPTS = 100

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


# ----------------------------------------------------------------------------------------------------------------------
# Rows: what the DataLoader workers produce, one dict per source row
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class _RowDecoding:
    """How one source row becomes a row dict for :func:`_collate_rows`: its columns, the transform, the crop seeds.

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


def _collate_rows(rows: list[dict], with_labels: bool, with_indices: bool) -> dict[str, Any]:
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


class _DecodedRows(torch.utils.data.Dataset):
    """Row ``i`` of a map-style shard, decoded and transformed, with crops seeded by ``(seed, process, epoch, i)``.

    Kept by hand: a ``datasets.Dataset`` cannot replace an undecodable row. For training, such a row is replaced by a
    random row drawn with a generator seeded from the failed row, so that training batches stay full and a batch still
    depends only on the rows the sampler chose (not on ``num_workers``). Evaluation leaves it out.
    """

    def __init__(self, dataset: datasets.Dataset, decoding: _RowDecoding, replace_undecodable: bool):
        self.dataset = dataset
        self.decoding = decoding
        self.replace_undecodable = replace_undecodable
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Seed this epoch's crops; call before creating the epoch's DataLoader iterator (workers copy the dataset)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[dict]:
        """The rows of one batch, read with one Arrow take (the DataLoader calls this instead of ``__getitem__``)."""
        columns = self.dataset[list(rows)]
        decoded = []
        for position, row in enumerate(rows):
            example = {name: values[position] for name, values in columns.items()}
            generator = None
            if self.decoding.transform.is_random:
                generator = self.decoding.generator(self.epoch, row, _CROP_STREAM)
            decoded_row = self.decoding.decode(example, row, generator)
            if decoded_row["pixel_values"] is None and self.replace_undecodable:
                decoded_row = self._replacement(row, decoded_row)
            decoded.append(decoded_row)
        return decoded

    def _replacement(self, failed_row: int, failed: dict) -> dict:
        """A random decodable row of the shard in place of ``failed_row``, counting every undecodable draw."""
        generator = self.decoding.generator(self.epoch, failed_row, _REPLACEMENT_STREAM)
        error = failed["error"]
        for attempt in range(_MAX_REPLACEMENT_ATTEMPTS):
            row = int(torch.randint(0, len(self.dataset), (1,), generator=generator))
            replacement = self.decoding.decode(self.dataset[row], row, generator)
            if replacement["pixel_values"] is not None:
                return {**replacement, "num_skipped": 1 + attempt, "error": error}
            error = replacement["error"]
        raise RuntimeError(
            f"No decodable image found in {_MAX_REPLACEMENT_ATTEMPTS} random draws from a shard of "
            f"{len(self.dataset)} rows; the dataset seems to be mostly corrupt (last error: {error})."
        )


class _WindowPermutation:
    """Batched ``datasets`` map: a seeded permutation of each window of consecutive rows of a stream.

    Kept by hand because ``IterableDataset.shuffle`` cannot resume exactly: its buffer is not part of
    ``state_dict()`` and is lost on resume (``datasets`` documents this). A batched map is: ``datasets`` restores the
    stream at the start of the current window and skips the rows already yielded, and the permutation, seeded by
    ``(seed, epoch, worker, first row of the window)``, is drawn again identically. The seed leaves the process out:
    when ``split_dataset_by_node`` splits by example it does so after this map, so all processes must agree on it.
    """

    def __init__(self, seed: int, epoch: int):
        self.seed, self.epoch = seed, epoch

    def __call__(self, window: dict[str, list], indices: list[int]) -> dict[str, list]:
        if len(indices) < 2:
            return window
        worker_info = torch.utils.data.get_worker_info()
        worker_id = 0 if worker_info is None else worker_info.id
        generator = seeded_generator(self.seed, self.epoch, worker_id, indices[0], _WINDOW_STREAM)
        order = torch.randperm(len(indices), generator=generator).tolist()
        return {column: [values[i] for i in order] for column, values in window.items()}


class _DecodedStream(torch.utils.data.IterableDataset):
    """Groups of rows of a streaming ``datasets.IterableDataset`` holding ``batch_size`` decodable images each.

    Kept by hand: a DataLoader batches a fixed number of rows, so dropping undecodable images there would shrink
    training batches. Each group yielded here holds exactly ``batch_size`` decodable rows plus the undecodable ones met
    on the way (left out and counted by the collate function); the last group of the stream is partial (training
    keeps only its skipped count). In a DataLoader worker, ``datasets`` gives this worker its share of the shards.

    Its ``state_dict`` is the stream's own (``datasets.IterableDataset.state_dict``) plus the number of rows read, which
    seeds the crops; StatefulDataLoader takes it in every worker after each group, when no group is half-built.
    """

    def __init__(
        self, stream: datasets.IterableDataset, decoding: _RowDecoding, batch_size: int, epoch: int, drop_last: bool
    ):
        self.stream = stream
        self.decoding = decoding
        self.batch_size = batch_size
        self.epoch = epoch
        self.drop_last = drop_last
        self.rows_read = 0
        self._loaded_state: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        # Restored but no row read since: the stream has no state of its own yet (a worker that has not produced a
        # batch since the resume is saved with this one).
        if self._loaded_state is not None:
            return self._loaded_state
        return {"stream": self.stream.state_dict(), "rows_read": self.rows_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded_state = state
        self.stream.load_state_dict(state["stream"])
        self.rows_read = int(state["rows_read"])

    def __iter__(self) -> Iterator[list[dict]]:
        worker_info = torch.utils.data.get_worker_info()
        worker_id = 0 if worker_info is None else worker_info.id
        group: list[dict] = []
        num_decoded = 0
        for example in self.stream:
            position, self.rows_read = self.rows_read, self.rows_read + 1
            self._loaded_state = None
            generator = None
            if self.decoding.transform.is_random:
                generator = self.decoding.generator(self.epoch, worker_id, position, _CROP_STREAM)
            group.append(self.decoding.decode(example, position, generator))
            num_decoded += group[-1]["pixel_values"] is not None
            if num_decoded == self.batch_size:
                yield group
                group, num_decoded = [], 0
        if self.drop_last:  # the partial last group only reports its skipped images
            group = [row for row in group if row["pixel_values"] is None]
        if group:
            yield group


# ----------------------------------------------------------------------------------------------------------------------
# Public loader
# ----------------------------------------------------------------------------------------------------------------------


def _pop_skipped(batch: dict[str, Any]) -> tuple[int, str | None]:
    return batch.pop(_SKIPPED_COUNT_KEY), batch.pop(_SKIPPED_ERROR_KEY)


def _json_safe(state: Any) -> Any:
    """``state`` as JSON would give it back (tuples become lists); raises ``TypeError`` on anything else."""
    return json.loads(json.dumps(state))


class ImageBatchLoader:
    """Iterable over image batches ``{"pixel_values": [B, 3, R, R] float32 in [-1, 1], "labels": [B] int64}``.

    ``"labels"`` is present only when the dataset has a label column (and ``"indices"`` when the loader was built with
    ``return_indices=True``). Built by :func:`build_train_dataloader` or :func:`build_eval_dataloader`; wraps a
    ``torch.utils.data.DataLoader`` (torchdata's ``StatefulDataLoader`` for streams) created anew for each epoch.

    Attributes:
        skipped_images (`SkippedImageCounter`):
            Undecodable images met by this process (all workers) in this run.
        batches_consumed (`int`):
            Training batches yielded so far, including those skipped via ``skip_batches`` or restored with
            ``load_state_dict``.

    Iteration semantics: a training loader continues where the previous iteration stopped (infinite: forever;
    ``infinite=False``: to the end of the current epoch, so ``for epoch ...: for batch in loader`` reshuffles each
    epoch). An evaluation loader makes one full pass per iteration.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        decoding: _RowDecoding,
        batch_size: int,
        *,
        training: bool,
        infinite: bool,
        skip_batches: int,
        dataloader_options: dict[str, Any],
        shuffle_buffer: int | None = None,
        return_indices: bool = False,
    ):
        self.training, self.infinite, self.batch_size = training, infinite, batch_size
        self.skipped_images = SkippedImageCounter()
        self.batches_consumed = int(skip_batches)
        self._decoding = decoding
        # What every DataLoader of this loader shares (workers, pinning, collate); the generator is the epoch's.
        with_labels = decoding.label_column is not None
        collate = functools.partial(_collate_rows, with_labels=with_labels, with_indices=return_indices)
        self._dataloader_options = {"collate_fn": collate, **dataloader_options}
        self._stream: datasets.IterableDataset | None = None
        self._rows: _DecodedRows | None = None
        if isinstance(dataset, datasets.IterableDataset):
            self._stream = dataset
            self._shuffle_window = max(1, shuffle_buffer or 1)
        else:
            self._rows = _DecodedRows(dataset, decoding, replace_undecodable=training)
            data_seed = derive_seed(decoding.seed, decoding.process_index)
            self._sampler = SeedableRandomSampler(self._rows, data_seed=data_seed)
        # Streams: the epoch of the next iteration and the batches already consumed in it (a stream's epoch length is
        # unknown, so they cannot be derived from batches_consumed), the DataLoader state to resume the epoch from,
        # and the DataLoader of the epoch being read.
        self._stream_epoch = 0
        self._batches_consumed_in_epoch = int(skip_batches)
        self._pending_dataloader_state: dict | None = None
        self._stream_loader: StatefulDataLoader | None = None

    @property
    def num_workers(self) -> int:
        return self._dataloader_options["num_workers"]

    @property
    def is_streaming(self) -> bool:
        return self._stream is not None

    @property
    def num_batches_per_epoch(self) -> int | None:
        """Batches per epoch for map-style data (an upper bound for evaluation), ``None`` for streams."""
        if self._rows is None:
            return None
        num_rows = len(self._rows)
        return num_rows // self.batch_size if self.training else -(-num_rows // self.batch_size)

    @property
    def epoch(self) -> int:
        """Current training epoch.

        Map-style: derived from ``batches_consumed``. Streams: the number of completed passes.
        """
        if self.is_streaming:
            return self._stream_epoch
        return self.batches_consumed // max(1, self.num_batches_per_epoch)

    def __len__(self) -> int:
        if self.is_streaming:
            raise TypeError("A loader over a streaming dataset has no length.")
        return self.num_batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Resumption state, JSON-serializable (ints, strings, lists, dicts).

        Map-style data only needs ``batches_consumed``. A stream adds ``"dataloader"``, the StatefulDataLoader state
        of the epoch being read (every worker's position in its shards), or ``None`` between epochs. It is this
        process' state: with several processes, save every process' (e.g. gathered with
        ``accelerate.utils.gather_object``).
        """
        if not self.is_streaming:
            batches_in_epoch = self.batches_consumed % max(1, self.num_batches_per_epoch)
            return {
                "batches_consumed": self.batches_consumed,
                "epoch": self.epoch,
                "batches_consumed_in_epoch": batches_in_epoch,
            }
        dataloader_state = self._pending_dataloader_state
        if self._stream_loader is not None:
            dataloader_state = _json_safe(self._stream_loader.state_dict())
        return {
            "batches_consumed": self.batches_consumed,
            "epoch": self._stream_epoch,
            "batches_consumed_in_epoch": self._batches_consumed_in_epoch,
            "num_workers": self.num_workers,
            "dataloader": dataloader_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (of :meth:`state_dict`) at the next iteration.

        A stream state without ``"dataloader"`` (or before one existed) replays the current epoch's consumed batches.

        Raises:
            ValueError: a stream's state was saved with another ``num_workers`` (each worker reads its own shards).
        """
        saved_workers = state.get("num_workers", self.num_workers)
        if self.is_streaming and state.get("dataloader") is not None and saved_workers != self.num_workers:
            raise ValueError(
                f"the stream's state was saved with num_workers={saved_workers}, this loader has {self.num_workers}: "
                "each DataLoader worker reads its own shards, so a stream resumes only with the same number of workers"
            )
        self.batches_consumed = int(state["batches_consumed"])
        self._stream_epoch = int(state.get("epoch", 0))
        self._batches_consumed_in_epoch = int(state.get("batches_consumed_in_epoch", self.batches_consumed))
        self._pending_dataloader_state = state.get("dataloader")
        self._stream_loader = None

    def _new_dataloader(
        self, source: torch.utils.data.Dataset, epoch: int, **sampling: Any
    ) -> torch.utils.data.DataLoader:
        """The one DataLoader constructor: the loader's shared options, the epoch's own generator (so worker seeds never
        come from the global RNG) and ``sampling`` (a batch size or a batch sampler).

        Streams get torchdata's StatefulDataLoader, a drop-in DataLoader whose ``state_dict`` holds every worker's
        position in its shards; map-style data needs no state (a batch is a function of its position).
        """
        loader_class = StatefulDataLoader if self.is_streaming else torch.utils.data.DataLoader
        return loader_class(source, generator=self._decoding.generator(epoch), **sampling, **self._dataloader_options)

    def _map_style_dataloader(self, epoch: int, skip: int) -> torch.utils.data.DataLoader:
        self._rows.set_epoch(epoch)
        if not self.training:
            return self._new_dataloader(self._rows, epoch, batch_size=self.batch_size)
        self._sampler.set_epoch(epoch)
        batch_sampler = torch.utils.data.BatchSampler(self._sampler, self.batch_size, drop_last=True)
        if skip:
            batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip)
        return self._new_dataloader(self._rows, epoch, batch_sampler=batch_sampler)

    def _streaming_dataloader(self, epoch: int) -> StatefulDataLoader:
        stream = self._stream
        if self.training:
            # A fresh mapped stream every epoch, also for a window of 1: datasets keeps a loaded state for every later
            # iteration of the same object (datasets 3.x does not check the state's epoch).
            permutation = _WindowPermutation(self._decoding.seed, epoch)
            stream = stream.map(permutation, batched=True, batch_size=self._shuffle_window, with_indices=True)
        groups = _DecodedStream(stream, self._decoding, self.batch_size, epoch, drop_last=self.training)
        return self._new_dataloader(groups, epoch, batch_size=None)  # the groups are the batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.training:
            dataloader = self._streaming_dataloader(0) if self.is_streaming else self._map_style_dataloader(0, 0)
            yield from self._batches(dataloader)
            return
        if not self.is_streaming:
            while True:
                epoch, skip = divmod(self.batches_consumed, self.num_batches_per_epoch)
                for batch in self._batches(self._map_style_dataloader(epoch, skip)):
                    self.batches_consumed += 1
                    yield batch
                if not self.infinite:
                    return
        while True:
            yield from self._stream_epoch_batches()
            if not self.infinite:
                return

    def _batches(self, dataloader: torch.utils.data.DataLoader) -> Iterator[dict]:
        """The DataLoader's batches with their skipped-image counts taken out and counted."""
        for batch in dataloader:
            self.skipped_images.add(*_pop_skipped(batch))
            if "pixel_values" in batch:  # not a batch that only carried a count
                yield batch

    def _stream_epoch_batches(self) -> Iterator[dict]:
        """The rest of the current streaming epoch; then the epoch counters move to the next one."""
        epoch = self._stream_epoch
        dataloader = self._streaming_dataloader(epoch)
        resumed = self._pending_dataloader_state is not None
        if resumed:
            dataloader.load_state_dict(self._pending_dataloader_state)
            self._pending_dataloader_state = None
        # Kept by hand: without a DataLoader state (skip_batches, or a state saved without one) the only way to a
        # position in a stream is to read up to it. Those batches and their skipped images belong to the run that used
        # them, so they are neither yielded nor counted again.
        replay = 0 if resumed else self._batches_consumed_in_epoch
        if replay:
            logger.warning(
                "Reading the first %d batches of epoch %d of the stream of process %d again to resume after them "
                "(no saved DataLoader state: resume with load_state_dict to continue at once)",
                replay,
                epoch,
                self._decoding.process_index,
            )
        self._stream_loader = dataloader
        num_batches = 0
        for batch in dataloader:
            skipped = _pop_skipped(batch)
            has_images = "pixel_values" in batch
            num_batches += has_images
            if replay:
                replay -= has_images
                continue
            self.skipped_images.add(*skipped)
            if not has_images:
                continue
            self.batches_consumed += 1
            self._batches_consumed_in_epoch += 1
            yield batch
        self._stream_loader = None
        if num_batches == 0 and not resumed and self.infinite:
            raise ValueError(
                f"Epoch {epoch} of the stream of process {self._decoding.process_index} gave no full batch of "
                f"{self.batch_size} decodable images ({self.skipped_images.count} skipped so far). Use a smaller "
                "batch_size or fewer DataLoader workers/processes."
            )
        self._stream_epoch = epoch + 1
        self._batches_consumed_in_epoch = replay  # a replay longer than the epoch goes on in the next one

    def __repr__(self) -> str:
        kind = "streaming" if self.is_streaming else "map-style"
        return (
            f"{type(self).__name__}({kind}, training={self.training}, infinite={self.infinite}, "
            f"batch_size={self.batch_size}, batches_consumed={self.batches_consumed}, "
            f"skipped_images={self.skipped_images.count})"
        )


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
    transform = ImageTransform(resolution, random_crop=training, random_flip=random_flip, interpolation=interpolation)
    decoding = _RowDecoding(image_column, label_column, transform, seed, process_index)
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
) -> ImageBatchLoader:
    """Shuffled, randomly cropped training batches for one process.

    Do not pass the result to ``accelerator.prepare``: sharding across processes is already done here with
    :func:`datasets.distributed.split_dataset_by_node` (map-style: contiguous chunk per process; streaming: by shards
    when ``num_shards % num_processes == 0``, else one example out of ``num_processes``).

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

    Returns:
        [`ImageBatchLoader`]: yielding ``{"pixel_values": [B, 3, R, R] float32 in [-1, 1], "labels": [B] int64 (if
        labeled)}``.
    """
    seed, skip_batches = check_int("seed", seed, 0), check_int("skip_batches", skip_batches, 0)
    columns = {"image_column": image_column, "label_column": label_column}
    return _build_loader(
        dataset, resolution, batch_size, training=True, random_flip=random_flip, seed=seed, infinite=infinite,
        skip_batches=skip_batches, process_index=process_index, num_processes=num_processes, num_workers=num_workers,
        pin_memory=pin_memory, interpolation=interpolation, shuffle_buffer=shuffle_buffer, **columns,
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


def take_images(loader: ImageBatchLoader, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` decodable images of an evaluation loader, in dataset order, as one batch.

    Evaluation batches leave undecodable images out, so the first batch of a dataset whose first files are corrupt
    holds fewer than ``batch_size`` images; this keeps reading later rows until ``count`` images are found (or the
    data end). Use it for a fixed validation batch.

    Args:
        loader (`ImageBatchLoader`):
            An evaluation loader ([`build_eval_dataloader`]).
        count (`int`):
            Images wanted.

    Returns:
        `dict[str, torch.Tensor]`: ``{"pixel_values": [n, 3, R, R], "labels": [n] (if labeled)}`` with
        ``n = min(count, decodable images)``.

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


__all__ = [
    "ImageBatchLoader",
    "SkippedImageCounter",
    "build_eval_dataloader",
    "build_train_dataloader",
    "take_images",
    "total_skipped_images",
]
