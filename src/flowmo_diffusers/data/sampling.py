"""Map-style training and evaluation data: decoded rows, one seeded permutation per epoch, and resumption by position.

The libraries do the ordering: a ``torch.utils.data.BatchSampler`` over Accelerate's ``SeedableRandomSampler`` (one
permutation per epoch, ``set_epoch``) and Accelerate's ``SkipBatchSampler`` to resume mid-epoch (what
``accelerator.skip_first_batches`` wraps a prepared loader's batch sampler in). Crops, flips and replacements are seeded
by ``(seed, process, epoch, row)``, so a batch is a pure function of its position, whatever ``num_workers``: resuming
needs nothing but the number of batches consumed.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
import torch.utils.data
from accelerate.data_loader import SeedableRandomSampler, SkipBatchSampler

from .decoding import CROP_STREAM, REPLACEMENT_STREAM, RowDecoding

# Random rows tried in place of an undecodable training image before the data are declared mostly corrupt.
_MAX_REPLACEMENT_ATTEMPTS = 100


class DecodedRows(torch.utils.data.Dataset):
    """Row ``i`` of a map-style shard, decoded and transformed, with crops seeded by ``(seed, process, epoch, i)``.

    Kept by hand: a ``datasets.Dataset`` cannot replace an undecodable row. For training, such a row is replaced by a
    random row drawn with a generator seeded from the failed row, so that training batches stay full and a batch still
    depends only on the rows the sampler chose (not on ``num_workers``). Evaluation leaves it out.
    """

    def __init__(self, dataset: datasets.Dataset, decoding: RowDecoding, replace_undecodable: bool):
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
                generator = self.decoding.generator(self.epoch, row, CROP_STREAM)
            decoded_row = self.decoding.decode(example, row, generator)
            if decoded_row["pixel_values"] is None and self.replace_undecodable:
                decoded_row = self._replacement(row, decoded_row)
            decoded.append(decoded_row)
        return decoded

    def _replacement(self, failed_row: int, failed: dict) -> dict:
        """A random decodable row of the shard in place of ``failed_row``, counting every undecodable draw."""
        generator = self.decoding.generator(self.epoch, failed_row, REPLACEMENT_STREAM)
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


def map_style_dataloader(
    rows: DecodedRows,
    batch_size: int,
    epoch: int,
    *,
    sampler: SeedableRandomSampler | None,
    skip: int,
    generator: torch.Generator,
    options: dict[str, Any],
) -> torch.utils.data.DataLoader:
    """The DataLoader of epoch ``epoch`` of ``rows``, starting after its first ``skip`` batches.

    Args:
        rows (`DecodedRows`):
            The shard's rows; their crops are seeded for ``epoch`` here.
        batch_size (`int`):
            Rows per batch.
        epoch (`int`):
            The epoch: it picks the permutation and the crops.
        sampler (`SeedableRandomSampler`, *optional*):
            The training permutation (full batches only); `None` for evaluation (dataset order, last batch partial).
        skip (`int`):
            Batches of the epoch already consumed (training only).
        generator (`torch.Generator`):
            The epoch's own DataLoader generator, so that worker seeds never come from the global RNG.
        options (`dict`):
            What every DataLoader of the loader shares (workers, pinning, collate).
    """
    rows.set_epoch(epoch)
    if sampler is None:
        return torch.utils.data.DataLoader(rows, batch_size=batch_size, generator=generator, **options)
    sampler.set_epoch(epoch)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=True)
    if skip:
        batch_sampler = SkipBatchSampler(batch_sampler, skip_batches=skip)
    return torch.utils.data.DataLoader(rows, batch_sampler=batch_sampler, generator=generator, **options)


__all__: list[str] = []  # internal to the package: ImageBatchLoader is the public face
