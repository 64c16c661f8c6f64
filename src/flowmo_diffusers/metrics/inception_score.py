"""Inception Score (Salimans et al., 2016) from the FID Inception's class probabilities.

Definition, as in the original TF code (openai/improved-gan `inception_score/model.py`),
ADM's evaluator and torch-fidelity: the N samples are cut into `splits` consecutive
parts `[i N // splits, (i + 1) N // splits)`; on each part

    IS_i = exp( mean_x KL( p(y|x) || p_i(y) ) ),     p_i(y) = mean_x p(y|x) over the part,

and the reported values are `mean_i IS_i` and `std_i IS_i` (population std, `np.std`).
`p(y|x)` is the softmax of the TF Inception's 1008 logits taken without the `fc`
bias (see [`.fid_inception`]).

The split boundaries make the score depend on the order of the samples: a folder whose
files are sorted by class gives splits that each cover a few classes only, and a lower
score. `shuffle_seed` permutes the samples first with `np.random.RandomState(seed)`,
exactly as torch-fidelity does by default (seed 2020); `None` keeps the given order
(improved-gan, ADM).

[`InceptionScore`] accumulates logits batch by batch with each sample's global index,
gathers them across processes and restores the global order, so a run over several
processes gives the number of a single-process run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..utils.validation import check_int
from ._optional_dependencies import require
from .distributed import gather_across_processes

#: torch-fidelity's default `isc_rng_seed`: its Inception Score shuffles the samples with this seed.
TORCH_FIDELITY_SHUFFLE_SEED = 2020

ArrayLike = np.ndarray | torch.Tensor


def _as_float64_matrix(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, num_classes], got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain non-finite values")
    return values


def inception_score(
    probabilities: ArrayLike, splits: int = 10, shuffle_seed: int | None = None
) -> tuple[float, float]:
    """Inception Score of class probabilities `p(y|x)`.

    Args:
        probabilities (`np.ndarray` or `torch.Tensor`):
            [N, C] rows of class probabilities (non-negative, each summing to 1), in sample order; any float dtype
            (computed in float64).
        splits (`int`, *optional*, defaults to `10`):
            Number of consecutive parts (10 in every published ImageNet figure); N >= splits.
        shuffle_seed (`int`, *optional*):
            Permute the rows with `np.random.RandomState(shuffle_seed).permutation(N)` before splitting
            (torch-fidelity: 2020); None keeps the order.

    Returns:
        `tuple[float, float]`: `(mean, std)` of the per-split scores, each in `[1, C]`.

    Raises:
        ValueError: Wrong shape, non-finite or negative values, rows not summing to 1, or
            fewer samples than splits.
    """
    special = require("scipy.special")
    probabilities = _as_float64_matrix(probabilities, "probabilities")
    num_samples = probabilities.shape[0]
    splits = check_int("splits", splits, 1)
    if num_samples < splits:
        raise ValueError(f"the Inception Score with {splits} splits needs at least {splits} samples, got {num_samples}")
    if (probabilities < 0).any():
        raise ValueError("probabilities must be non-negative")
    row_sums = probabilities.sum(axis=1)
    if not np.allclose(row_sums, 1.0, rtol=0, atol=1e-4):
        worst = float(np.abs(row_sums - 1).max())
        raise ValueError(
            f"each row of probabilities must sum to 1 (largest deviation {worst:.3g}); pass softmax outputs"
        )
    if shuffle_seed is not None:
        probabilities = probabilities[np.random.RandomState(shuffle_seed).permutation(num_samples)]

    scores = []
    for index in range(splits):
        part = probabilities[index * num_samples // splits : (index + 1) * num_samples // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # rel_entr(p, q) = p log(p / q) with 0 log 0 = 0: confident (one-hot) predictions
        # are a valid input, where the textbook ``p * (log p - log q)`` gives NaN.
        kl_divergences = special.rel_entr(part, marginal).sum(axis=1)
        scores.append(float(np.exp(kl_divergences.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def softmax_float64(logits: ArrayLike) -> np.ndarray:
    """[N, C] logits -> [N, C] float64 softmax (scipy, max-subtracted, so large logits do not overflow)."""
    special = require("scipy.special")
    return special.softmax(_as_float64_matrix(logits, "logits"), axis=1)


def inception_score_from_logits(
    logits: ArrayLike, splits: int = 10, shuffle_seed: int | None = None
) -> tuple[float, float]:
    """[`inception_score`] of `softmax(logits)`, the softmax taken in float64 (as torch-fidelity does).

    Args:
        logits (`np.ndarray` or `torch.Tensor`):
            [N, C] classifier logits in sample order (the FID Inception's `return_logits`).
        splits (`int`, *optional*, defaults to `10`):
            See [`inception_score`].
        shuffle_seed (`int`, *optional*):
            See [`inception_score`].

    Returns:
        `tuple[float, float]`: `(mean, std)` of the per-split scores.
    """
    return inception_score(softmax_float64(logits), splits=splits, shuffle_seed=shuffle_seed)


class InceptionScore:
    """Streaming Inception Score: keeps each sample's logits with its global index.

    Usage (one instance per process)::

        score = InceptionScore()
        for indices, images in loader:                       # indices: global sample positions
            features, logits = inception(images, return_logits=True)
            score.update(logits, indices)
        score.gather(accelerator)                            # once, on every process
        score.compute()                                      # {"inception_score", "inception_score_std"}

    Memory: N x C float32 logits (50,000 x 1008: 200 MB) after gathering, on the CPU.
    Unlike FID's sums, the score is not additive over processes, so the rows themselves are
    gathered ([`~.distributed.gather_across_processes`]).

    Args:
        splits (`int`, *optional*, defaults to `10`):
            Number of splits.
        shuffle_seed (`int`, *optional*, defaults to `2020`):
            See [`inception_score`]; torch-fidelity's default, so that class-sorted sample folders do not lower the
            score. None: the index order as is.
    """

    def __init__(self, splits: int = 10, shuffle_seed: int | None = TORCH_FIDELITY_SHUFFLE_SEED) -> None:
        self.splits = check_int("splits", splits, 1)
        self.shuffle_seed = shuffle_seed
        self.reset()

    def reset(self) -> None:
        """Forget every sample."""
        self._logits: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._next_local_index = 0
        self._gathered = False

    @property
    def num_samples(self) -> int:
        """Samples held (this process only unless [`gather`] ran)."""
        return sum(part.shape[0] for part in self._indices)

    def update(self, logits: torch.Tensor, sample_indices: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            logits (`torch.Tensor`):
                [B, C] classifier logits.
            sample_indices (`torch.Tensor`, *optional*):
                [B] int64 global positions of the samples; they define the order the splits are cut in. Without them
                the arrival order on this process is used, and across processes the rank order, which then depends on
                the process count.
        """
        if self._gathered:
            raise RuntimeError("update() after gather(): call reset() first")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ValueError(f"logits must be a [B, num_classes] tensor, got {getattr(logits, 'shape', logits)}")
        if self._logits and logits.shape[1] != self._logits[0].shape[1]:
            raise ValueError(f"logits have {logits.shape[1]} classes, earlier batches had {self._logits[0].shape[1]}")
        batch_size = logits.shape[0]
        if sample_indices is None:
            sample_indices = torch.arange(self._next_local_index, self._next_local_index + batch_size)
        sample_indices = torch.as_tensor(sample_indices).detach().to("cpu", torch.int64).reshape(-1)
        if sample_indices.shape[0] != batch_size:
            raise ValueError(f"got {sample_indices.shape[0]} sample_indices for {batch_size} logits")
        self._next_local_index += batch_size
        self._logits.append(logits.detach().to("cpu", torch.float32))
        self._indices.append(sample_indices)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._logits:
            return torch.zeros((0, 0), dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
        return torch.cat(self._logits), torch.cat(self._indices)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process' samples, to save and resume from (float32 logits kept bit for bit).

        Returns:
            `dict[str, torch.Tensor]`: `logits` [n, C] float32 (`[0, 0]` before the first batch), `indices` [n] int64
            global positions, `next_local_index` [] int64 (the arrival counter used when no indices are given).
        """
        if self._gathered:
            raise RuntimeError("state_dict() after gather(): it holds other processes' samples")
        logits, indices = self._stacked()
        return {
            "logits": logits.clone(),
            "indices": indices.clone(),
            "next_local_index": torch.tensor(self._next_local_index, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a [`state_dict`]: the samples it holds replace this one's."""
        logits, indices = state["logits"], state["indices"]
        if logits.ndim != 2 or indices.shape != (logits.shape[0],):
            raise ValueError(
                f"saved Inception Score state has logits {tuple(logits.shape)} and indices {tuple(indices.shape)}; "
                "expected [n, C] and [n]"
            )
        self.reset()
        if logits.shape[0]:
            self._logits.append(logits.to("cpu", torch.float32).clone())
            self._indices.append(indices.to("cpu", torch.int64).clone())
        self._next_local_index = int(state["next_local_index"])

    def gather(self, accelerator: Any | None = None) -> InceptionScore:
        """Collect every process' samples on every process (call once, on every process).

        Args:
            accelerator (`accelerate.Accelerator`, *optional*):
                Gathers the logits; without it a `torch.distributed` group is used if there is one.

        Returns:
            [`InceptionScore`]: `self`, holding every process' samples.

        Raises:
            ValueError: Processes hold logits with different numbers of classes.
        """
        if self._gathered:
            raise RuntimeError("gather() was already called")
        # Processes without samples contribute nothing (their empty logits have no class dimension).
        parts = [part for part in gather_across_processes(self._stacked(), accelerator) if part[0].shape[0]]
        widths = sorted({logits.shape[1] for logits, _ in parts})
        if len(widths) > 1:
            raise ValueError(f"processes hold logits with different numbers of classes: {widths}")
        self._logits = [logits for logits, _ in parts]
        self._indices = [indices for _, indices in parts]
        self._gathered = True
        return self

    def logits_in_order(self) -> torch.Tensor:
        """[N, C] float32 logits sorted by global index.

        Raises:
            ValueError: No samples, or a repeated index.
        """
        logits, indices = self._stacked()
        if logits.shape[0] == 0:
            raise ValueError("no samples accumulated")
        order = torch.argsort(indices, stable=True)
        indices = indices[order]
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            repeated = indices[1:][indices[1:] == indices[:-1]][:5].tolist()
            raise ValueError(f"sample indices are repeated (e.g. {repeated}): some samples were evaluated twice")
        return logits[order]

    def compute(self) -> dict[str, float]:
        """`{"inception_score": mean, "inception_score_std": std}` over all samples held."""
        mean, std = inception_score_from_logits(self.logits_in_order(), self.splits, self.shuffle_seed)
        return {"inception_score": mean, "inception_score_std": std}
