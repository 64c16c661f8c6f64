"""Streaming (``datasets.IterableDataset``) training and evaluation data: shuffled windows, groups of decodable rows,
and every DataLoader worker's position in its shards.

Sharding across processes is :func:`datasets.distributed.split_dataset_by_node`'s (whole shards, or every
``num_processes``-th example); inside a process, ``datasets`` gives each DataLoader worker its own shards. Resuming uses
``datasets.IterableDataset.state_dict()`` of every worker, collected by torchdata's ``StatefulDataLoader`` (its
``state_dict``/``load_state_dict``), so a resumed stream continues exactly, with any number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import torch
import torch.utils.data
from torchdata.stateful_dataloader import StatefulDataLoader

from ..utils.seeds import seeded_generator
from .decoding import CROP_STREAM, WINDOW_STREAM, RowDecoding


class WindowPermutation:
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
        generator = seeded_generator(self.seed, self.epoch, worker_id, indices[0], WINDOW_STREAM)
        order = torch.randperm(len(indices), generator=generator).tolist()
        return {column: [values[i] for i in order] for column, values in window.items()}


class DecodedStream(torch.utils.data.IterableDataset):
    """Groups of rows of a streaming ``datasets.IterableDataset`` holding ``batch_size`` decodable images each.

    Kept by hand: a DataLoader batches a fixed number of rows, so dropping undecodable images there would shrink
    training batches. Each group yielded here holds exactly ``batch_size`` decodable rows plus the undecodable ones met
    on the way (left out and counted by the collate function); the last group of the stream is partial (training
    keeps only its skipped count). In a DataLoader worker, ``datasets`` gives this worker its share of the shards.

    Its ``state_dict`` is the stream's own (``datasets.IterableDataset.state_dict``) plus the number of rows read, which
    seeds the crops; StatefulDataLoader takes it in every worker after each group, when no group is half-built.
    """

    def __init__(
        self, stream: datasets.IterableDataset, decoding: RowDecoding, batch_size: int, epoch: int, drop_last: bool
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
                generator = self.decoding.generator(self.epoch, worker_id, position, CROP_STREAM)
            group.append(self.decoding.decode(example, position, generator))
            num_decoded += group[-1]["pixel_values"] is not None
            if num_decoded == self.batch_size:
                yield group
                group, num_decoded = [], 0
        if self.drop_last:  # the partial last group only reports its skipped images
            group = [row for row in group if row["pixel_values"] is None]
        if group:
            yield group


def streaming_dataloader(
    stream: datasets.IterableDataset,
    decoding: RowDecoding,
    batch_size: int,
    epoch: int,
    *,
    training: bool,
    shuffle_window: int,
    options: dict[str, Any],
) -> StatefulDataLoader:
    """The StatefulDataLoader of epoch ``epoch`` of ``stream``: its batches are :class:`DecodedStream`'s groups.

    Args:
        stream (`datasets.IterableDataset`):
            This process' share of the stream.
        decoding (`RowDecoding`):
            Columns, transform and crop seeds.
        batch_size (`int`):
            Decodable images per batch.
        epoch (`int`):
            The epoch: it seeds the window permutations, the crops and the DataLoader generator.
        training (`bool`):
            Shuffle windows of ``shuffle_window`` rows and drop the partial last batch; otherwise stream order.
        shuffle_window (`int`):
            Rows per shuffled window (training).
        options (`dict`):
            What every DataLoader of the loader shares (workers, pinning, collate).
    """
    if training:
        # A fresh mapped stream every epoch, also for a window of 1: datasets keeps a loaded state for every later
        # iteration of the same object (datasets 3.x does not check the state's epoch).
        permutation = WindowPermutation(decoding.seed, epoch)
        stream = stream.map(permutation, batched=True, batch_size=shuffle_window, with_indices=True)
    groups = DecodedStream(stream, decoding, batch_size, epoch, drop_last=training)
    # torchdata's StatefulDataLoader, a drop-in DataLoader whose state_dict holds every worker's position in its
    # shards; batch_size=None: the groups are the batches. The epoch's own generator keeps worker seeds off the
    # global RNG.
    return StatefulDataLoader(groups, batch_size=None, generator=decoding.generator(epoch), **options)


__all__: list[str] = []  # internal to the package: ImageBatchLoader is the public face
