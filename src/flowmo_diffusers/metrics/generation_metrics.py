"""Generation metrics of a class-conditional image generator: gFID against reference statistics, Inception Score.

* **gFID**: Frechet distance between a Gaussian fitted to the FID-Inception pool features of the
  generated images (streamed, [`StreamingFeatureStatistics`]) and the reference Gaussian
  `(mu, sigma)` of real images, read from an `.npz` ([`ReferenceStatistics`]). The format is
  pytorch-fid's (`mu`, `sigma`) and also reads ADM's reference batches (guided-diffusion, e.g.
  `VIRTUAL_imagenet256_labeled.npz`, which hold `mu`/`sigma` next to the images `arr_0`; only
  the statistics are loaded).
* **Inception Score** from the 1008-way logits of the same forward pass ([`.inception_score`]).

ADM's numbers come from the TF graph of the same Inception weights, with TF's image resize; this
package uses pytorch-fid's port and resize, which agree to within small differences (pytorch-fid
documents them), so compare figures of the two evaluators with that in mind.

Networks are never randomly initialised silently: pretrained Inception weights come from a local file
or the torch hub cache, and `random_init=True` is an explicit test option whose statistics are marked
as such, so they cannot be compared with statistics of the real network by mistake.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .distributed import sum_across_processes
from .feature_statistics import StreamingFeatureStatistics
from .fid_inception import feature_extractor_on
from .frechet_distance import frechet_distance
from .image_conversion import check_image_batch, resolve_device
from .inception_score import TORCH_FIDELITY_SHUFFLE_SEED, InceptionScore
from .pretrained_weights import FID_INCEPTION_WEIGHTS, PathLike
from ..utils.files import atomic_write

#: ADM's (guided-diffusion) ImageNet 256x256 reference batch: `mu`/`sigma` of the 2048-d pool features of
#: the ImageNet training set, plus 10,000 images (`arr_0`) that this package does not need.
ADM_IMAGENET256_REFERENCE_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
    "VIRTUAL_imagenet256_labeled.npz"
)

REFERENCE_STATISTICS_HINT = (
    "Reference statistics are an .npz with `mu` [D] and `sigma` [D, D]. For ImageNet 256x256 use ADM's "
    f"reference batch ({ADM_IMAGENET256_REFERENCE_URL}); for other data compute them with "
    "`examples/train_maskgit/evaluate_generation.py --compute_reference_statistics OUT.npz ...` "
    "(or flowmo_diffusers.evaluation.generation.compute_reference_statistics)."
)


def describe_fid_inception(random_init: bool, feature_dims: int) -> str:
    """The `feature_network` label stored with statistics, so that incompatible ones are not compared."""
    if random_init:
        return f"RANDOM-INIT FID InceptionV3 (tests only), {feature_dims}-d"
    return f"FID InceptionV3 ({FID_INCEPTION_WEIGHTS.file_name}), {feature_dims}-d"


@dataclass
class ReferenceStatistics:
    """A Gaussian fitted to Inception features: what gFID compares generated images against.

    Args:
        mu (`np.ndarray`):
            [D] float64 mean.
        sigma (`np.ndarray`):
            [D, D] float64 covariance.
        num_samples (`int`, *optional*):
            Images the statistics were computed from (None when the file does not say, as in pytorch-fid's and
            ADM's files).
        feature_network (`str`, *optional*):
            Label of the network that produced the features ([`describe_fid_inception`]); None for files from other
            tools (taken to be the pretrained FID Inception).
        path (`str`, *optional*):
            File they were loaded from, if any.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int | None = None
    feature_network: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        source = f" in {self.path}" if self.path else ""
        if self.mu.ndim != 1 or self.mu.shape[0] < 1:
            raise ValueError(f"reference statistics{source}: `mu` must have shape [D], got {self.mu.shape}")
        dims = self.mu.shape[0]
        if self.sigma.shape != (dims, dims):
            raise ValueError(
                f"reference statistics{source}: `sigma` must have shape [{dims}, {dims}] to match `mu`, "
                f"got {self.sigma.shape}"
            )
        for name, values in (("mu", self.mu), ("sigma", self.sigma)):
            if not np.isfinite(values).all():
                raise ValueError(f"reference statistics{source}: `{name}` contains non-finite values (NaN or inf)")

    @property
    def feature_dims(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_feature_statistics(
        cls, statistics: StreamingFeatureStatistics, feature_network: str | None = None
    ) -> ReferenceStatistics:
        """Mean and unbiased covariance of accumulated features (at least 2 samples)."""
        return cls(
            mu=statistics.mean(),
            sigma=statistics.covariance(),
            num_samples=int(statistics.num_samples),
            feature_network=feature_network,
        )

    @classmethod
    def load(cls, path: PathLike, feature_dims: int | None = None) -> ReferenceStatistics:
        """Read `mu` and `sigma` (and `num_samples` / `feature_network` if present) from an `.npz`.

        Only these entries are read, so ADM's reference batches (several GB of images in `arr_0`) load
        in a moment.

        Args:
            path (`str` or `os.PathLike`):
                The `.npz` file.
            feature_dims (`int`, *optional*):
                Expected D (e.g. the evaluating network's); None accepts any.

        Returns:
            [`ReferenceStatistics`]: The statistics, with `path` set.

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not an `.npz`, no `mu`/`sigma`, wrong shapes, non-finite values, or D differs
                from `feature_dims`.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference statistics file {path!r} does not exist. {REFERENCE_STATISTICS_HINT}")
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"cannot read reference statistics {path!r}: {error}. {REFERENCE_STATISTICS_HINT}"
            ) from error
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{path!r} holds a single array, not an .npz archive. {REFERENCE_STATISTICS_HINT}")
        with archive:
            keys = set(archive.files)
            if not {"mu", "sigma"} <= keys:
                detail = ""
                if "arr_0" in keys:
                    detail = (
                        " It holds `arr_0` only, like a batch of samples: evaluate such a file with "
                        "`evaluate_generation.py --samples`, not as reference statistics."
                    )
                raise ValueError(
                    f"{path!r} has no `mu` and `sigma` entries (found: {sorted(keys)}).{detail} "
                    f"{REFERENCE_STATISTICS_HINT}"
                )
            num_samples = int(archive["num_samples"]) if "num_samples" in keys else None
            feature_network = str(archive["feature_network"]) if "feature_network" in keys else None
            statistics = cls(archive["mu"], archive["sigma"], num_samples, feature_network, path)
        if feature_dims is not None:
            statistics.check_feature_dims(feature_dims)
        return statistics

    def save(self, path: PathLike) -> str:
        """Write `mu`, `sigma` (float64), `num_samples` and `feature_network` to `path` atomically.

        The file is written next to `path` under a temporary name and renamed, so an interrupted run
        never leaves a truncated file behind. Readable by [`load`], pytorch-fid and ADM's evaluator.

        Returns:
            `str`: The path written.
        """
        path = os.fspath(path)
        entries: dict[str, Any] = {"mu": self.mu, "sigma": self.sigma}
        if self.num_samples is not None:
            entries["num_samples"] = np.int64(self.num_samples)
        if self.feature_network is not None:
            entries["feature_network"] = np.str_(self.feature_network)
        # A file object, not a name: np.savez would append ".npz" to a name without that suffix.
        with atomic_write(path, prefix=".reference-statistics-") as file:
            np.savez(file, **entries)
        return path

    def check_feature_dims(self, feature_dims: int) -> None:
        """Raise ValueError unless these statistics are of `feature_dims`-d features (the evaluating network's)."""
        if self.feature_dims != feature_dims:
            raise ValueError(
                f"reference statistics {self.path or ''} are of {self.feature_dims}-d features, but the evaluating "
                f"network gives {feature_dims}-d features; they must come from the same layer (FID: 2048)"
            )

    def check_compatible(self, feature_network: str) -> None:
        """Raise ValueError if these statistics were computed by a different kind of network.

        Statistics of a randomly initialised Inception are meaningless next to those of the pretrained
        one (and vice versa); files without a label (pytorch-fid, ADM) count as pretrained.
        """
        own = self.feature_network
        if own is None:
            own_is_random = False
        else:
            own_is_random = own.startswith("RANDOM")
        if own_is_random != feature_network.startswith("RANDOM"):
            raise ValueError(
                f"reference statistics {self.path or ''} come from `{own or 'a pretrained FID Inception'}` but the "
                f"evaluation uses `{feature_network}`: features of a random and of the pretrained network cannot be "
                "compared. Recompute the reference statistics with the same network."
            )

    def frechet_distance(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FID between these statistics and `(mu [D], sigma [D, D])`."""
        return frechet_distance(mu, sigma, self.mu, self.sigma)


class GenerationMetrics:
    """Streaming gFID (against reference statistics) and Inception Score of generated images.

    Usage (one instance per Accelerate process)::

        metrics = GenerationMetrics("VIRTUAL_imagenet256_labeled.npz", device=accelerator.device)
        for indices, images in batches:                 # [B, 3, H, W] uint8, or float in [0, 1]
            metrics.update(images, sample_indices=indices)
        metrics.gather(accelerator)                     # once, on every process
        metrics.compute()                               # {"num_images", "gfid", "inception_score", ...}

    Args:
        reference_statistics (`str` or `os.PathLike` or [`ReferenceStatistics`], *optional*):
            `.npz` path or statistics; None computes the Inception Score (and the samples' own statistics,
            `statistics`) without gFID. A path is read before the network is built, so a bad file fails fast.
        device (`str` or `torch.device`, *optional*):
            Device of the network and feature sums (default CUDA if available, else CPU).
        random_init (`bool`, *optional*, defaults to `False`):
            Explicit test-only switch: random Inception weights, nothing read or downloaded.
        inception_weights_path (`str` or `os.PathLike`, *optional*):
            Local `pt_inception-2015-12-05-6726825d.pth` (else the torch hub cache).
        inception_feature_dims (`int`, *optional*, defaults to `2048`):
            2048 for gFID as published; 64/192/768 only for quick tests, and only with
            `compute_inception_score=False` (the score needs the 2048-d pool features' classifier).
        compute_inception_score (`bool`, *optional*, defaults to `True`):
            Whether to keep logits for the Inception Score.
        inception_score_splits (`int`, *optional*, defaults to `10`):
            See [`InceptionScore`].
        inception_score_shuffle_seed (`int`, *optional*, defaults to `2020`):
            See [`InceptionScore`].
        feature_extractor (`torch.nn.Module`, *optional*):
            Replaces the FID Inception: a module with a `feature_dims` attribute mapping ([B, 3, H, W] images,
            `value_range`, `return_logits`) like [`FIDInceptionFeatureExtractor`].

    Raises:
        FileNotFoundError / ValueError: Unusable reference statistics (see [`ReferenceStatistics.load`]).
        MissingPretrainedWeightsError: The Inception weights are needed but unavailable.
    """

    def __init__(
        self,
        reference_statistics: PathLike | ReferenceStatistics | None = None,
        device: str | torch.device | None = None,
        random_init: bool = False,
        inception_weights_path: PathLike | None = None,
        inception_feature_dims: int = 2048,
        compute_inception_score: bool = True,
        inception_score_splits: int = 10,
        inception_score_shuffle_seed: int | None = TORCH_FIDELITY_SHUFFLE_SEED,
        feature_extractor: nn.Module | None = None,
    ) -> None:
        if compute_inception_score and feature_extractor is None and inception_feature_dims != 2048:
            raise ValueError(
                f"the Inception Score needs the 2048-d pool features' classifier, but inception_feature_dims="
                f"{inception_feature_dims}; use 2048 or pass compute_inception_score=False"
            )
        if reference_statistics is not None and not isinstance(reference_statistics, ReferenceStatistics):
            reference_statistics = ReferenceStatistics.load(reference_statistics)
        self.device = resolve_device(device)
        self.feature_extractor = feature_extractor_on(
            self.device, feature_extractor, inception_weights_path, random_init, inception_feature_dims
        )
        feature_dims = int(self.feature_extractor.feature_dims)
        if feature_extractor is None:
            self.feature_network = describe_fid_inception(random_init, inception_feature_dims)
        else:
            prefix = "RANDOM-INIT " if random_init else ""
            self.feature_network = f"{prefix}custom {type(feature_extractor).__name__}, {feature_dims}-d"
        if reference_statistics is not None:
            reference_statistics.check_feature_dims(feature_dims)
            reference_statistics.check_compatible(self.feature_network)
        self.reference_statistics = reference_statistics
        self.statistics = StreamingFeatureStatistics(feature_dims, device=self.device)
        self.inception_score = (
            InceptionScore(inception_score_splits, inception_score_shuffle_seed) if compute_inception_score else None
        )
        self.reset()

    def reset(self) -> None:
        """Clear the accumulated images (the network and reference statistics are kept)."""
        self.num_images = torch.zeros((), dtype=torch.int64)
        self.statistics.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        self._gathered = False

    @torch.no_grad()
    def update(
        self,
        images: torch.Tensor,
        value_range: tuple[float, float] = (0.0, 1.0),
        sample_indices: torch.Tensor | None = None,
    ) -> None:
        """Accumulate a batch of generated images.

        Args:
            images (`torch.Tensor`):
                [B, 3, H, W]: uint8 in [0, 255] (`value_range` is then ignored), or float in `value_range`. Any H, W
                (Inception resizes to 299x299).
            value_range (`tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`):
                `(0, 1)` (what the pipelines return with `output_type="pt"`) or `(-1, 1)`.
            sample_indices (`torch.Tensor`, *optional*):
                [B] int64 global positions of the images: the order of the Inception Score's splits (see
                [`InceptionScore`]). Pass them when several processes evaluate.
        """
        if self._gathered:
            raise RuntimeError("update() after gather(): the sums already include other processes; call reset() first")
        check_image_batch(images)
        if images.dtype == torch.uint8:
            images, value_range = images.float() / 255.0, (0.0, 1.0)
        elif not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        elif tuple(value_range) == (0.0, 1.0) and images.numel() and float(images.min()) < -1e-3:
            # [-1, 1] images read as [0, 1] would silently lose half of their range.
            raise ValueError("images have negative values but value_range is (0, 1); pass value_range=(-1, 1)")
        # Contiguous NCHW: a channels-last view (e.g. a permuted HWC array) would take other convolution kernels,
        # and the same images would give features that differ in the last bits depending on where they came from.
        images = images.to(self.device).contiguous()
        if self.inception_score is not None:
            features, logits = self.feature_extractor(images, value_range=value_range, return_logits=True)
            self.inception_score.update(logits, sample_indices)
        else:
            features = self.feature_extractor(images, value_range=value_range)
        self.statistics.update(features)
        self.num_images += images.shape[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process' accumulated images (CPU tensors, bit for bit), to save and resume from.

        Returns:
            `dict[str, torch.Tensor]`: `num_images` [] int64, `statistics.*` (float64 feature sums, see
            [`StreamingFeatureStatistics.state_dict`]) and, with the Inception Score, `inception_score.*`
            ([`InceptionScore.state_dict`]: the float32 logits and global indices of every image).
        """
        if self._gathered:
            raise RuntimeError("state_dict() after gather(): the sums include other processes")
        state = {"num_images": self.num_images.clone()}
        state.update({f"statistics.{key}": value for key, value in self.statistics.state_dict().items()})
        if self.inception_score is not None:
            state.update({f"inception_score.{key}": value for key, value in self.inception_score.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a [`state_dict`] of metrics with the same settings: the sums and logits are replaced exactly.

        Raises:
            ValueError: The state was saved with(out) the Inception Score where these metrics compute it (not), or
                with another feature dimension.
        """
        saved_score = any(key.startswith("inception_score.") for key in state)
        if saved_score != (self.inception_score is not None):
            raise ValueError(
                "the saved state was accumulated " + ("with" if saved_score else "without") + " the Inception Score, "
                "these metrics compute it " + ("not" if saved_score else "too")
            )
        self.reset()
        self.num_images = state["num_images"].clone().to(torch.int64)
        self.statistics.load_state_dict({key.split(".", 1)[1]: v for key, v in state.items() if key.startswith("statistics.")})
        if self.inception_score is not None:
            self.inception_score.load_state_dict(
                {key.split(".", 1)[1]: v for key, v in state.items() if key.startswith("inception_score.")}
            )

    def gather(self, accelerator: Any | None = None) -> GenerationMetrics:
        """Combine all processes' images, in place (call once, on every process).

        Args:
            accelerator (`accelerate.Accelerator`, *optional*):
                The run's accelerator; without it `torch.distributed` is used when initialised.

        Returns:
            [`GenerationMetrics`]: `self`.
        """
        if self._gathered:
            raise RuntimeError("gather() was already called; a second call would count other processes twice")
        self.num_images = sum_across_processes(self.num_images, accelerator)
        self.statistics.all_reduce_(accelerator)
        if self.inception_score is not None:
            self.inception_score.gather(accelerator)
        self._gathered = True
        return self

    def sample_statistics(self) -> ReferenceStatistics:
        """The generated images' own `(mu, sigma)`, e.g. to save and compare with another run later."""
        return ReferenceStatistics.from_feature_statistics(self.statistics, self.feature_network)

    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated (this process only unless [`gather`] ran).

        Returns:
            `dict[str, float]`: `{"num_images"}` plus `"gfid"` (with reference statistics; needs >= 2 images) and
            `"inception_score"`, `"inception_score_std"` (with the score; needs >= splits images).
        """
        num_images = int(self.num_images)
        if num_images == 0:
            raise ValueError("no images accumulated")
        results: dict[str, float] = {"num_images": num_images}
        if self.reference_statistics is not None:
            results["gfid"] = self.reference_statistics.frechet_distance(
                self.statistics.mean(), self.statistics.covariance()
            )
        if self.inception_score is not None:
            results.update(self.inception_score.compute())
        return results
