"""Codebook statistics of token ids over a dataset: usage, entropy and perplexity.

A tokenizer whose ids take one of `2**b` values (`b = bits_per_id`) is judged by how much of that codebook it uses:
an encoder that has collapsed onto a few codewords reconstructs badly and leaves a prior little to model. TiTok's and
LlamaGen's evaluators print the same three figures:

- `codebook_usage`: the fraction of the `2**b` values that occur at least once, pooled over all positions;
  `codebook_usage_per_position_mean` / `_min`: the same fraction for each of the N positions on its own, averaged /
  the smallest (a position stuck on one value shows up in the minimum);
- `codebook_entropy_bits`: the entropy `-sum_v p_v log2 p_v` of the pooled id histogram, in bits (at most `b`, and
  at most `log2` of the number of ids counted);
- `codebook_perplexity`: `2**codebook_entropy_bits`, the number of equally likely codewords with that entropy.

For FlowMo the ids are the quantizer's sub-token ids (see `models/quantizer.py`): a code token of `context_dim` bits
is split into `context_dim // bits_per_subtoken` ids of `bits_per_subtoken` bits each (FlowMo-Lo: 18 bits -> 2 ids of
9 bits; FlowMo-Hi: 56 bits -> 4 ids of 14 bits), so `b = bits_per_subtoken` and the statistics are over those ids,
not over whole 56-bit tokens (whose `2**56` values no dataset could cover; their usage would be ~0 by construction).

Counting is dense (a histogram of `2**b` int64 counts and a `[N, 2**b]` seen-table) for `b <= DENSE_MAX_BITS` (16), and
sparse above it (the distinct ids and their counts, `torch.unique`, merged batch after batch), so any `b` up to 62
fits in memory proportional to the number of distinct ids. Across processes, dense counts are summed
(`sum_across_processes`); sparse ones are gathered and merged (`gather_across_processes`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..utils.validation import check_int, check_optional_int
from .distributed import gather_across_processes, sum_across_processes

#: Largest `bits_per_id` counted with dense tables: 2**16 int64 pooled counts and an `[N, 2**16]` bool seen-table
#: (64 MiB for FlowMo-Hi's N = 1024, four times that as int32 for the cross-process sum). Above it, counting is sparse.
DENSE_MAX_BITS = 16
#: Largest `bits_per_id` accepted: ids are int64 (`torch.long`), and `2**62` keeps every id and count exact.
MAX_BITS = 62
STATISTIC_NAMES = (
    "codebook_usage",
    "codebook_usage_per_position_mean",
    "codebook_usage_per_position_min",
    "codebook_entropy_bits",
    "codebook_perplexity",
)


def _check_bits(bits_per_id: Any) -> int:
    return check_int("bits_per_id", bits_per_id, 1, MAX_BITS)


class CodebookStatistics:
    """Streaming codebook statistics of token ids `[B, N]`, each id in `[0, 2**bits_per_id)`.

    Memory does not grow with the number of images: `update` adds a batch to the counts, `compute` (on every process)
    combines the processes' counts and returns the statistics (see the module docstring for their definitions).

    Args:
        bits_per_id (`int`):
            Bits of one id, so ids take `2**bits_per_id` values (FlowMo: `bits_per_subtoken`, 9 for FlowMo-Lo).
        num_positions (`int`, *optional*):
            N, the ids per image; taken from the first batch when None.
        dense (`bool`, *optional*):
            Count in dense tables (default for `bits_per_id <= DENSE_MAX_BITS`) or sparsely. Both give the same result.
        device (`torch.device`, *optional*):
            Where the counts live (default: CPU; ids are moved there).
    """

    def __init__(
        self,
        bits_per_id: int,
        num_positions: int | None = None,
        dense: bool | None = None,
        device: torch.device | str | None = None,
    ):
        self.bits_per_id = _check_bits(bits_per_id)
        num_positions = check_optional_int("num_positions", num_positions, 1)
        self.dense = bits_per_id <= DENSE_MAX_BITS if dense is None else bool(dense)
        if self.dense and bits_per_id > DENSE_MAX_BITS:
            raise ValueError(f"dense counting holds 2**bits_per_id counts: bits_per_id must be <= {DENSE_MAX_BITS}")
        self.device = torch.device("cpu" if device is None else device)
        self.num_positions = num_positions
        self.num_ids = 0
        # Dense: pooled counts [2**b] and per-position seen flags [N, 2**b]. Sparse: distinct ids with counts, and
        # distinct (position, id) pairs.
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        self._values = torch.empty(0, dtype=torch.long, device=self.device)
        self._value_counts = torch.empty(0, dtype=torch.long, device=self.device)
        self._pairs = torch.empty(0, 2, dtype=torch.long, device=self.device)

    @property
    def codebook_size(self) -> int:
        return 2**self.bits_per_id

    def _check_indices(self, indices: Any) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor of token ids [B, N], got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor of token ids, got dtype {indices.dtype}")
        if indices.ndim != 2:
            raise ValueError(f"indices must have shape [B, N], got {tuple(indices.shape)}")
        if self.num_positions is not None and indices.shape[1] != self.num_positions:
            raise ValueError(f"indices must have {self.num_positions} ids per image, got shape {tuple(indices.shape)}")
        indices = indices.to(device=self.device, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, 2**{self.bits_per_id}), got range [{int(indices.min())}, {int(indices.max())}]"
            )
        return indices

    def update(self, indices: torch.Tensor) -> None:
        """Add a batch of token ids `[B, N]` (integer tensor) to the counts."""
        indices = self._check_indices(indices)
        if self.num_positions is None:
            self.num_positions = indices.shape[1]
        if indices.numel() == 0:
            return
        self.num_ids += indices.numel()
        positions = torch.arange(indices.shape[1], device=self.device).expand_as(indices)
        if self.dense:
            if self._counts is None:
                self._counts = torch.zeros(self.codebook_size, dtype=torch.long, device=self.device)
                self._seen = torch.zeros(self.num_positions, self.codebook_size, dtype=torch.bool, device=self.device)
            self._counts += torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
            self._seen[positions.reshape(-1), indices.reshape(-1)] = True
            return
        self._merge_sparse(indices.reshape(-1), torch.ones(indices.numel(), dtype=torch.long, device=self.device))
        pairs = torch.stack([positions.reshape(-1), indices.reshape(-1)], dim=1)
        self._pairs = torch.unique(torch.cat([self._pairs, pairs]), dim=0)

    def _merge_sparse(self, values: torch.Tensor, counts: torch.Tensor) -> None:
        values = torch.cat([self._values, values])
        counts = torch.cat([self._value_counts, counts])
        self._values, inverse = torch.unique(values, return_inverse=True)
        self._value_counts = torch.zeros_like(self._values).index_add_(0, inverse, counts)

    def _combined_across_processes(self, accelerator: Any | None):
        """(pooled counts of the distinct ids, distinct ids per position [N]) summed / merged over processes."""
        num_ids = int(sum_across_processes(torch.tensor([self.num_ids], dtype=torch.long), accelerator))
        if self.dense:
            # Every process must take part in the reduction, also one that saw no ids yet.
            counts = self._counts if self._counts is not None else torch.zeros(self.codebook_size, dtype=torch.long)
            seen = self._seen
            counts = sum_across_processes(counts.to(self.device), accelerator)
            num_positions = self._agreed_num_positions(accelerator)
            if seen is None:
                seen = torch.zeros(num_positions, self.codebook_size, dtype=torch.bool, device=self.device)
            seen = sum_across_processes(seen.to(torch.int32), accelerator) > 0
            return num_ids, counts[counts > 0], seen.sum(dim=1), num_positions
        gathered = gather_across_processes(
            (self._values.cpu(), self._value_counts.cpu(), self._pairs.cpu(), self.num_positions), accelerator
        )
        values = torch.cat([entry[0] for entry in gathered])
        counts = torch.cat([entry[1] for entry in gathered])
        _, inverse = torch.unique(values, return_inverse=True)
        pooled = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=torch.long).index_add_(
            0, inverse, counts
        )
        pairs = torch.unique(torch.cat([entry[2] for entry in gathered]), dim=0)
        num_positions = max((entry[3] or 0) for entry in gathered)
        per_position = torch.bincount(pairs[:, 0], minlength=num_positions) if pairs.numel() else (
            torch.zeros(num_positions, dtype=torch.long)
        )
        return num_ids, pooled, per_position, num_positions

    def _agreed_num_positions(self, accelerator: Any | None) -> int:
        # A process that saw no batch does not know N: take the largest any process knows.
        return max(gather_across_processes(self.num_positions or 0, accelerator))

    def compute(self, accelerator: Any | None = None) -> dict[str, float | int]:
        """The statistics over every id added on every process (call it on all processes).

        Args:
            accelerator (`accelerate.Accelerator`, *optional*):
                The run's accelerator; without one, an initialised `torch.distributed` group is used, else this
                process alone.

        Returns:
            `dict`: `codebook_usage`, `codebook_usage_per_position_mean`, `codebook_usage_per_position_min`,
            `codebook_entropy_bits`, `codebook_perplexity` (floats), and `codebook_bits_per_id`,
            `codebook_num_ids` (the ids counted), `codebook_num_used` (distinct ids seen) as ints.

        Raises:
            ValueError: if no id was added on any process.
        """
        num_ids, pooled_counts, used_per_position, _ = self._combined_across_processes(accelerator)
        if num_ids == 0:
            raise ValueError("no token ids were added: call update(indices) before compute()")
        probabilities = pooled_counts.double() / num_ids
        entropy = float(-(probabilities * torch.log2(probabilities)).sum())
        entropy = max(entropy, 0.0)  # -0.0 for a single codeword
        size = float(self.codebook_size)
        per_position_usage = used_per_position.double() / size
        return {
            "codebook_usage": pooled_counts.numel() / size,
            "codebook_usage_per_position_mean": float(per_position_usage.mean()),
            "codebook_usage_per_position_min": float(per_position_usage.min()),
            "codebook_entropy_bits": entropy,
            "codebook_perplexity": math.pow(2.0, entropy),
            "codebook_bits_per_id": self.bits_per_id,
            "codebook_num_ids": num_ids,
            "codebook_num_used": int(pooled_counts.numel()),
        }


def codebook_statistics(
    indices: torch.Tensor, bits_per_id: int, accelerator: Any | None = None, dense: bool | None = None
) -> dict[str, float | int]:
    """[`CodebookStatistics`] of one tensor of token ids `[B, N]` (each in `[0, 2**bits_per_id)`), in one call.

    Example:
        >>> codebook_statistics(pipe.encode(images), bits_per_id=pipe.autoencoder.config.bits_per_subtoken)
    """
    statistics = CodebookStatistics(bits_per_id, dense=dense)
    statistics.update(indices)
    return statistics.compute(accelerator)


__all__ = ["DENSE_MAX_BITS", "STATISTIC_NAMES", "CodebookStatistics", "codebook_statistics"]
