"""rFID, PSNR, SSIM and LPIPS of a tokenizer's reconstructions, accumulated over a dataset.

Reproduces FlowMo's `evaluate.py` (`eval_imagenet`) with constant memory:

* PSNR and SSIM with scikit-image on uint8-quantised images, quantised once per batch (see [`.psnr`], [`.ssim`]);
* LPIPS with `lpips.LPIPS(net="alex")` (and optionally `"vgg"`) on [-1, 1] images;
* rFID: Frechet distance between the FID-Inception pool features of the originals and of
  the reconstructions, with unbiased covariances (`np.cov`).

Per-image values are summed (float64) with a count, and Inception features go into two
[`StreamingFeatureStatistics`]; nothing grows with the number of images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .distributed import sum_across_processes
from .feature_statistics import StreamingFeatureStatistics
from .fid_inception import feature_extractor_on
from .image_conversion import quantised_image_pairs, resolve_device
from .perceptual_similarity import LPIPS_NETS, LPIPSDistance
from .pretrained_weights import PathLike
from .psnr import quantised_psnr_per_image, quantised_psnr_pooled_over_batch
from .ssim import quantised_ssim_per_image

PSNR_MODES = ("per_image", "flowmo_batch")


class ReconstructionMetrics:
    """Streaming reconstruction metrics for a tokenizer evaluation.

    Usage (single process or one instance per Accelerate process)::

        metrics = ReconstructionMetrics(device=accelerator.device)
        for originals in loader:                      # [B, 3, H, W] in [-1, 1]
            metrics.update(originals, model.reconstruct(originals))
        metrics.gather(accelerator)                   # sums over processes (once)
        results = metrics.compute()                   # {"rfid", "psnr", "ssim", "lpips"}

    Args:
        lpips_nets (`Sequence[str]`, *optional*, defaults to `("alex",)`):
            LPIPS backbones to evaluate. The first is reported as `"lpips"`, the others as `"lpips_<net>"`; FlowMo
            reports `("alex", "vgg")` -> `"lpips"` (AlexNet) and `"lpips_vgg"`.
        device (`str` or `torch.device`, *optional*):
            Device for LPIPS, Inception and the feature statistics. Defaults to CUDA if available, else CPU.
        random_init (`bool`, *optional*, defaults to `False`):
            Explicit test-only switch: LPIPS backbones and Inception keep random weights and nothing is read or
            downloaded. Never use it for reported numbers.
        inception_weights_path (`str` or `os.PathLike`, *optional*):
            Local `pt_inception-2015-12-05-6726825d.pth`.
        lpips_backbone_weights_paths (`Mapping[str, str | os.PathLike]`, *optional*):
            `{"alex": ".../alexnet-owt-7be5be79.pth", "vgg": ".../vgg16-397923af.pth"}`, for offline machines.
        inception_feature_dims (`int`, *optional*, defaults to `2048`):
            2048 for rFID as reported; 64/192/768 only for tests.
        feature_extractor (`torch.nn.Module`, *optional*):
            Replaces the FID Inception network: a module mapping [B, 3, H, W] images in [-1, 1] to [B, D] features,
            with a `feature_dims` attribute giving D.
        psnr_mode (`str`, *optional*, defaults to `"per_image"`):
            `"per_image"`: mean of per-image PSNR. `"flowmo_batch"`: mean over `update` calls of the batch-pooled
            PSNR, which is what FlowMo's released code computed (it depends on the batch size per process).

    Raises:
        MissingPretrainedWeightsError: Pretrained weights are needed but unavailable.
    """

    def __init__(
        self,
        lpips_nets: Sequence[str] = ("alex",),
        device: str | torch.device | None = None,
        random_init: bool = False,
        inception_weights_path: PathLike | None = None,
        lpips_backbone_weights_paths: Mapping[str, PathLike] | None = None,
        inception_feature_dims: int = 2048,
        feature_extractor: nn.Module | None = None,
        psnr_mode: str = "per_image",
    ) -> None:
        if psnr_mode not in PSNR_MODES:
            raise ValueError(f"psnr_mode must be one of {PSNR_MODES}, got {psnr_mode!r}")
        lpips_nets = tuple(lpips_nets)
        unknown_nets = [net for net in lpips_nets if net not in LPIPS_NETS]
        if not lpips_nets or unknown_nets or len(set(lpips_nets)) != len(lpips_nets):
            raise ValueError(f"lpips_nets must be distinct entries of {LPIPS_NETS}, got {lpips_nets}")
        lpips_backbone_weights_paths = dict(lpips_backbone_weights_paths or {})
        if set(lpips_backbone_weights_paths) - set(lpips_nets):
            raise ValueError(
                f"lpips_backbone_weights_paths has nets not in lpips_nets: {sorted(lpips_backbone_weights_paths)}"
            )

        self.device = resolve_device(device)
        self.psnr_mode = psnr_mode
        self.lpips_nets = lpips_nets
        self.lpips_models = nn.ModuleDict(
            {
                net: LPIPSDistance(
                    net=net,
                    pretrained=not random_init,
                    backbone_weights_path=lpips_backbone_weights_paths.get(net),
                )
                for net in lpips_nets
            }
        ).to(self.device)
        self.feature_extractor = feature_extractor_on(
            self.device, feature_extractor, inception_weights_path, random_init, inception_feature_dims
        )
        feature_dims = int(self.feature_extractor.feature_dims)
        self.original_statistics = StreamingFeatureStatistics(feature_dims, device=self.device)
        self.reconstruction_statistics = StreamingFeatureStatistics(feature_dims, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Clear all accumulated values (the networks are kept)."""
        self.num_images = torch.zeros((), dtype=torch.int64)
        self.num_batches = torch.zeros((), dtype=torch.int64)
        self.psnr_sum = torch.zeros((), dtype=torch.float64)
        self.batch_psnr_sum = torch.zeros((), dtype=torch.float64)
        self.ssim_sum = torch.zeros((), dtype=torch.float64)
        self.lpips_sums = torch.zeros(len(self.lpips_nets), dtype=torch.float64)
        self.original_statistics.reset()
        self.reconstruction_statistics.reset()
        self._gathered = False

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Accumulate one batch.

        Args:
            originals (`torch.Tensor`):
                [B, 3, H, W] ground-truth images in [-1, 1].
            reconstructions (`torch.Tensor`):
                [B, 3, H, W] reconstructions in [-1, 1] (clamped to it, as in FlowMo).
        """
        if self._gathered:
            raise RuntimeError("update() after gather(): the sums already include other processes; call reset() first")
        # Checked and quantised once: PSNR, pooled PSNR and SSIM all measure the same uint8 images.
        originals_hwc, reconstructions_hwc = quantised_image_pairs(originals, reconstructions)
        originals = originals.detach()
        reconstructions = reconstructions.detach()

        self.num_images += originals.shape[0]
        self.num_batches += 1
        self.psnr_sum += float(quantised_psnr_per_image(originals_hwc, reconstructions_hwc).sum())
        if self.psnr_mode == "flowmo_batch":
            self.batch_psnr_sum += quantised_psnr_pooled_over_batch(originals_hwc, reconstructions_hwc)
        self.ssim_sum += float(quantised_ssim_per_image(originals_hwc, reconstructions_hwc).sum())
        for index, net in enumerate(self.lpips_nets):
            self.lpips_sums[index] += self.lpips_models[net](originals, reconstructions).double().sum().cpu()
        self.original_statistics.update(self.feature_extractor(originals.to(self.device)))
        self.reconstruction_statistics.update(self.feature_extractor(reconstructions.to(self.device)))

    #: The accumulated values besides the feature statistics, in [`state_dict`].
    _SUMS = ("num_images", "num_batches", "psnr_sum", "batch_psnr_sum", "ssim_sum", "lpips_sums")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This process' sums and feature statistics (CPU tensors, float64 / int64), to save and resume from.

        Returns:
            `dict[str, torch.Tensor]`: `num_images`, `num_batches`, `psnr_sum`, `batch_psnr_sum`, `ssim_sum`,
            `lpips_sums` ([len(lpips_nets)]) and `original.*` / `reconstruction.*` feature statistics.
        """
        if self._gathered:
            raise RuntimeError("state_dict() after gather(): the sums include other processes")
        state = {name: getattr(self, name).clone() for name in self._SUMS}
        for prefix, statistics in (("original", self.original_statistics), ("reconstruction", self.reconstruction_statistics)):
            state.update({f"{prefix}.{key}": value for key, value in statistics.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from a [`state_dict`]: the sums are replaced exactly."""
        self.reset()
        if state["lpips_sums"].shape != self.lpips_sums.shape:
            raise ValueError(f"saved state has {state['lpips_sums'].shape[0]} LPIPS nets, these metrics {len(self.lpips_nets)}")
        for name in self._SUMS:
            setattr(self, name, state[name].clone().to(getattr(self, name).dtype))
        for prefix, statistics in (("original", self.original_statistics), ("reconstruction", self.reconstruction_statistics)):
            statistics.load_state_dict({key.split(".", 1)[1]: value for key, value in state.items() if key.startswith(prefix + ".")})

    def gather(self, accelerator: Any | None = None) -> ReconstructionMetrics:
        """Sum the accumulated values over all processes, in place (call once, on every process).

        Args:
            accelerator (`accelerate.Accelerator`, *optional*):
                The run's accelerator; without it `torch.distributed` is used when initialised, otherwise nothing
                changes.

        Returns:
            [`ReconstructionMetrics`]: `self`.
        """
        if self._gathered:
            raise RuntimeError("gather() was already called; a second call would count other processes twice")
        for name in self._SUMS:
            setattr(self, name, sum_across_processes(getattr(self, name), accelerator))
        self.original_statistics.all_reduce_(accelerator)
        self.reconstruction_statistics.all_reduce_(accelerator)
        self._gathered = True
        return self

    def compute(self) -> dict[str, float]:
        """The metrics over everything accumulated (this process only unless [`gather`] ran).

        Returns:
            `dict[str, float]`: `{"rfid", "psnr", "ssim", "lpips"}` plus `"lpips_<net>"` for every further LPIPS net.
            PSNR is in dB and is `inf` if every reconstruction is exact.
        """
        num_images = int(self.num_images)
        if num_images == 0:
            raise ValueError("no images accumulated")
        if self.psnr_mode == "flowmo_batch":
            psnr = float(self.batch_psnr_sum) / int(self.num_batches)
        else:
            psnr = float(self.psnr_sum) / num_images
        results = {
            "rfid": self.original_statistics.frechet_distance(self.reconstruction_statistics),
            "psnr": psnr,
            "ssim": float(self.ssim_sum) / num_images,
        }
        for index, net in enumerate(self.lpips_nets):
            results["lpips" if index == 0 else f"lpips_{net}"] = float(self.lpips_sums[index]) / num_images
        return results
