"""Batches of images for training and evaluation: the loader, its epochs, and exact resumption.

:func:`build_train_dataloader` / :func:`build_eval_dataloader` (:mod:`~flowmo_diffusers.data.builders`) return an
:class:`ImageBatchLoader`, an iterable of ``{"pixel_values": [B, 3, R, R] float32, "labels": [B] int64}`` batches over
map-style (``datasets.Dataset``) or streaming (``datasets.IterableDataset``) data. The libraries do the work:

* sharding across processes: :func:`datasets.distributed.split_dataset_by_node` (in the builders);
* map-style order and resumption (:mod:`~flowmo_diffusers.data.sampling`): a ``torch.utils.data.BatchSampler`` over
  Accelerate's ``SeedableRandomSampler`` (one permutation per epoch, ``set_epoch``), and Accelerate's
  ``SkipBatchSampler`` to resume mid-epoch;
* streaming resumption (:mod:`~flowmo_diffusers.data.streams`): ``datasets.IterableDataset.state_dict()`` of every
  DataLoader worker, collected by torchdata's ``StatefulDataLoader``, so a resumed stream continues exactly, with any
  number of workers; streams are shuffled by a batched ``datasets`` map over windows of rows, which that state resumes
  exactly (``IterableDataset.shuffle``'s buffer is lost on resume);
* decoding (:mod:`~flowmo_diffusers.data.decoding`): ``datasets.Image`` (see :mod:`~flowmo_diffusers.data.transforms`),
  inside a ``try`` so that a corrupt file is skipped and counted instead of raising in the middle of a run.

Randomness never touches the global RNGs: every random crop/flip comes from a ``torch.Generator`` seeded from ``(seed,
process, epoch, row)`` (streams: ``(seed, process, epoch, worker, position)``), and every DataLoader has a generator of
its own. A map-style batch is therefore a pure function of its position, whatever ``num_workers``.

Why the epochs and positions are kept here rather than by ``accelerator.prepare`` (a prepared loader with
``DataLoaderConfiguration(use_stateful_dataloader=True)``, ``accelerator.skip_first_batches`` and ``save_state`` /
``load_state``), checked against Accelerate 1.3.0 (the floor) and 1.16:

* streams: ``prepare`` shards an ``IterableDataset`` by having process 0 read every batch and dispatch slices
  (``dispatch_batches``, the default for iterable datasets) or by having every process read the whole stream and keep
  its slice (``IterableDatasetShard``): each process would read and decode all images instead of its own shards. And
  ``save_state`` writes a loader's state to one ``dl_state_dict.bin`` from every process, with no process index in the
  name, while each process of a stream has a position of its own (its shards, its workers): all but one would be lost.
  So the positions of all processes travel in the training states (``training.training_states.StreamPositions``).
* map-style: a batch is a pure function of its position, so the number of batches consumed is the whole state and
  resuming is Accelerate's own ``SkipBatchSampler`` (what ``skip_first_batches`` uses). Preparing the loader would
  change more than the loader: every epoch end of a prepared loader forces an optimizer step under gradient
  accumulation (``GradientAccumulationPlugin.sync_with_dataloader``, on by default), so steps would no longer hold
  ``gradient_accumulation_steps`` micro-batches each; processes would share the batches of one global permutation
  (``BatchSamplerShard``) where ``split_dataset_by_node`` gives each its own chunk, as the builders' ``process_index``
  / ``num_processes`` API defines for evaluation and pre-tokenization too; and the loader state that ``save_state``
  would carry is, at the floor, off by ``num_processes - 1`` batches under DDP (``DataLoaderShard`` inherits
  ``adjust_state_dict_for_prefetch``'s correction meant for ``DataLoaderDispatcher``; later releases override it),
  which would repeat that many batches on resume.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import Any

import datasets
import torch
import torch.utils.data
from accelerate.data_loader import SeedableRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..utils.seeds import derive_seed
from .decoding import RowDecoding, SkippedImageCounter, collate_rows, pop_skipped
from .sampling import DecodedRows, map_style_dataloader
from .streams import streaming_dataloader

logger = logging.getLogger(__name__)


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
        decoding: RowDecoding,
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
        collate = functools.partial(collate_rows, with_labels=with_labels, with_indices=return_indices)
        self._dataloader_options = {"collate_fn": collate, **dataloader_options}
        self._stream: datasets.IterableDataset | None = None
        self._rows: DecodedRows | None = None
        if isinstance(dataset, datasets.IterableDataset):
            self._stream = dataset
            self._shuffle_window = max(1, shuffle_buffer or 1)
        else:
            self._rows = DecodedRows(dataset, decoding, replace_undecodable=training)
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

    def _map_style_dataloader(self, epoch: int, skip: int) -> torch.utils.data.DataLoader:
        sampler = self._sampler if self.training else None
        generator = self._decoding.generator(epoch)
        return map_style_dataloader(
            self._rows, self.batch_size, epoch, sampler=sampler, skip=skip, generator=generator,
            options=self._dataloader_options,
        )

    def _streaming_dataloader(self, epoch: int) -> StatefulDataLoader:
        return streaming_dataloader(
            self._stream, self._decoding, self.batch_size, epoch, training=self.training,
            shuffle_window=self._shuffle_window, options=self._dataloader_options,
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if not self.training:
            dataloader = self._streaming_dataloader(0) if self.is_streaming else self._map_style_dataloader(0, 0)
            yield from self._batches(dataloader)
            return
        if not self.is_streaming:
            # What `set_epoch` + `accelerator.skip_first_batches` do for a prepared loader, from the position alone
            # (why the loader is not prepared: the module docstring).
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
            self.skipped_images.add(*pop_skipped(batch))
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
            skipped = pop_skipped(batch)
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


__all__ = ["ImageBatchLoader", "take_images"]
