"""Streaming mean and covariance of feature vectors, for FID over arbitrarily many images.

Instead of keeping all N feature vectors (O(N * D) memory, then `np.cov`), the
accumulator keeps the count, the sum of features and the sum of their outer products in
float64 (O(D^2) memory: 32 MiB for Inception's D = 2048). These sums add up across
batches and across processes, so distributed evaluation is a single all-reduce, and
mean / unbiased covariance follow in closed form:

    mean = S1 / n,    cov = (S2 - n * mean mean^T) / (n - 1)      (same as np.cov)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..utils.validation import check_int

from .distributed import sum_across_processes
from .frechet_distance import frechet_distance

StatisticsState = dict[str, torch.Tensor]


class StreamingFeatureStatistics:
    """Running count / sum / sum of outer products of D-dimensional features (float64).

    Args:
        feature_dims (`int`):
            D, the feature dimension (2048 for FID Inception pool features).
        device (`str` or `torch.device`, *optional*, defaults to the CPU):
            Where the sums live and the outer products are computed; a CUDA device makes the [D, D] update much
            faster. MPS has no float64, so it is replaced by the CPU.
    """

    def __init__(self, feature_dims: int, device: str | torch.device | None = None) -> None:
        feature_dims = check_int("feature_dims", feature_dims, 1)
        device = torch.device("cpu" if device is None else device)
        if device.type == "mps":
            device = torch.device("cpu")
        self.feature_dims = feature_dims
        self.device = device
        self.num_samples = torch.zeros((), dtype=torch.int64, device=device)
        self.feature_sum = torch.zeros(feature_dims, dtype=torch.float64, device=device)
        self.outer_product_sum = torch.zeros(feature_dims, feature_dims, dtype=torch.float64, device=device)

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature vectors.

        Args:
            features (`torch.Tensor` or `np.ndarray`):
                [N, D] features (any float dtype; accumulated in float64).
        """
        features = torch.as_tensor(features).detach().to(device=self.device, dtype=torch.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dims:
            raise ValueError(f"features must have shape [N, {self.feature_dims}], got {tuple(features.shape)}")
        self.num_samples += features.shape[0]
        self.feature_sum += features.sum(dim=0)
        self.outer_product_sum += features.T @ features

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.num_samples.zero_()
        self.feature_sum.zero_()
        self.outer_product_sum.zero_()

    # ------------------------------------------------------------------ state / merging
    def state(self) -> StatisticsState:
        """Copies of the sums: `{"num_samples": [], "feature_sum": [D], "outer_product_sum": [D, D]}`."""
        return {
            "num_samples": self.num_samples.clone(),
            "feature_sum": self.feature_sum.clone(),
            "outer_product_sum": self.outer_product_sum.clone(),
        }

    def state_dict(self) -> StatisticsState:
        """The sums on the CPU, for saving (safetensors) and [`load_state_dict`]: the keys of [`state`]."""
        return {name: tensor.cpu() for name, tensor in self.state().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the sums by saved ones ([`state_dict`]); float64 is kept bit for bit."""
        self.reset()
        self.merge(state)

    @classmethod
    def from_state(
        cls, state: Mapping[str, Any], device: str | torch.device | None = None
    ) -> StreamingFeatureStatistics:
        """Rebuild an accumulator from [`state`] (e.g. after saving it with `torch.save`)."""
        statistics = cls(int(torch.as_tensor(state["feature_sum"]).shape[0]), device=device)
        statistics.merge(state)
        return statistics

    def merge(self, other: StreamingFeatureStatistics | Mapping[str, Any]) -> StreamingFeatureStatistics:
        """Add another accumulator (or its [`state`]) into this one, in place; returns self.

        Merging the accumulators of disjoint sets of samples gives exactly the sums of
        their union, so merge order does not matter.
        """
        state = other.state() if isinstance(other, StreamingFeatureStatistics) else other
        feature_sum = torch.as_tensor(state["feature_sum"]).to(self.device, torch.float64)
        if feature_sum.shape != (self.feature_dims,):
            raise ValueError(
                f"cannot merge statistics of dimension {feature_sum.shape[0]} into dimension {self.feature_dims}"
            )
        self.num_samples += torch.as_tensor(state["num_samples"]).to(self.device, torch.int64)
        self.feature_sum += feature_sum
        self.outer_product_sum += torch.as_tensor(state["outer_product_sum"]).to(self.device, torch.float64)
        return self

    def all_reduce_(self, accelerator: Any | None = None) -> StreamingFeatureStatistics:
        """Replace the local sums by their sums over all processes (call on every process, once).

        Args:
            accelerator (`accelerate.Accelerator`, *optional*):
                The run's accelerator; without it `torch.distributed` is used when initialised (otherwise this is a
                no-op).

        Returns:
            [`StreamingFeatureStatistics`]: `self`.
        """
        self.num_samples = sum_across_processes(self.num_samples, accelerator)
        self.feature_sum = sum_across_processes(self.feature_sum, accelerator)
        self.outer_product_sum = sum_across_processes(self.outer_product_sum, accelerator)
        return self

    # ------------------------------------------------------------------ results
    def mean(self) -> np.ndarray:
        """[D] float64 mean of all features seen."""
        num_samples = int(self.num_samples)
        if num_samples < 1:
            raise ValueError("no features accumulated yet")
        return self.feature_sum.cpu().numpy() / num_samples

    def covariance(self) -> np.ndarray:
        """[D, D] float64 unbiased covariance (divides by N - 1, like `np.cov(x, rowvar=False)`)."""
        num_samples = int(self.num_samples)
        if num_samples < 2:
            raise ValueError(f"the covariance needs at least 2 samples, got {num_samples}")
        feature_sum = self.feature_sum.cpu().numpy()
        covariance = (self.outer_product_sum.cpu().numpy() - np.outer(feature_sum, feature_sum) / num_samples) / (
            num_samples - 1
        )
        # The sum of outer products is symmetric in exact arithmetic; symmetrise away rounding.
        return (covariance + covariance.T) / 2

    def frechet_distance(self, other: StreamingFeatureStatistics, eps: float = 1e-6) -> float:
        """Frechet distance between the Gaussians fitted to this and `other`'s features (FID)."""
        return frechet_distance(self.mean(), self.covariance(), other.mean(), other.covariance(), eps=eps)
