"""Perceptual losses of FlowMo training: LPIPS-VGG (stage 1A) and ResNet-50 logit MSE (stage 1B).

Both networks need ImageNet weights that are downloaded on first use. They are never replaced by random weights
silently: with ``pretrained=True`` (the default) the weights come from an explicit local file (``weights_path``, the
training script's ``--perceptual_weights_path``) or from the torch hub cache / download, and if neither works the
constructor raises :class:`~flowmo_diffusers.metrics.MissingPretrainedWeightsError` naming the file, where it comes
from and how to provide it. ``pretrained=False`` is the explicit option for tests and smoke runs: the backbone stays
randomly initialised (the loss is then not a perceptual loss, only a differentiable image distance).

Unlike :class:`~flowmo_diffusers.metrics.LPIPSDistance` (evaluation, no gradients), these modules let gradients flow
to their *inputs*; their own parameters are frozen (``requires_grad=False``, eval mode).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics.perceptual_similarity import load_torchvision_features_into_lpips_trunk
from ..metrics.pretrained_weights import (
    LPIPS_BACKBONE_WEIGHTS,
    RESNET50_WEIGHTS,
    MissingPretrainedWeightsError,
    PathLike,
    PretrainedWeights,
    load_pretrained_state_dict,
)

PERCEPTUAL_NETWORKS = ("lpips-vgg", "resnet50")

_HOW_TO_SKIP = (
    " To train without the perceptual term pass `--perceptual_weight 0`; for a smoke test with a randomly "
    "initialised network (not a perceptual loss) pass `--perceptual_random_init` (Python: `pretrained=False`)."
)

# The metrics' entries, named by this package's training flag in error messages.
LPIPS_VGG_BACKBONE_WEIGHTS = dataclasses.replace(
    LPIPS_BACKBONE_WEIGHTS["vgg"],
    description="LPIPS-VGG backbone (torchvision VGG16_Weights.IMAGENET1K_V1)",
    path_option="--perceptual_weights_path",
    aggregator_path_option="",
)
RESNET50_WEIGHTS = dataclasses.replace(RESNET50_WEIGHTS, path_option="--perceptual_weights_path")


def _load_weights(weights: PretrainedWeights, weights_path: PathLike | None):
    try:
        return load_pretrained_state_dict(weights, weights_path)
    except MissingPretrainedWeightsError as error:
        raise MissingPretrainedWeightsError(str(error) + _HOW_TO_SKIP) from error


def _check_pair(images: torch.Tensor, predictions: torch.Tensor) -> None:
    if images.shape != predictions.shape or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected two image batches of the same shape (B, 3, H, W), got {tuple(images.shape)} and "
            f"{tuple(predictions.shape)}"
        )


class LPIPSVGGLoss(nn.Module):
    """LPIPS with the VGG16 trunk (``lpips.LPIPS(net="vgg")``), differentiable in its inputs.

    The calibrated linear heads ship inside the ``lpips`` package and are always loaded; the VGG16 ImageNet trunk is
    loaded from ``weights_path`` or the torch hub cache when ``pretrained`` (``lpips`` itself is built with
    ``pnet_rand=True`` so that it never downloads anything on its own).

    Args:
        pretrained (`bool`, *optional*, defaults to `True`):
            load the ImageNet trunk (required for the paper's loss). ``False``: random trunk, explicit
            test option; then ``weights_path`` must be None.
        weights_path (`PathLike`, *optional*):
            local torchvision ``vgg16-397923af.pth``.

    Raises:
        MissingPretrainedWeightsError: ``pretrained`` and the trunk weights are neither at ``weights_path`` nor in
            the torch hub cache, nor downloadable.
    """

    def __init__(self, pretrained: bool = True, weights_path: PathLike | None = None):
        super().__init__()
        import lpips

        if not pretrained and weights_path is not None:
            raise ValueError("weights_path was given together with pretrained=False; pass one or the other")
        backbone = _load_weights(LPIPS_VGG_BACKBONE_WEIGHTS, weights_path) if pretrained else None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if backbone is not None:
            load_torchvision_features_into_lpips_trunk(self.lpips.net, backbone)
        self.pretrained = pretrained
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # always in eval mode (the linear heads have dropout)
        return super().train(False)

    def forward(self, images: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distance `(B,)` between two `[-1, 1]` batches (no clamping, as in the original)."""
        _check_pair(images, predictions)
        return self.lpips(images, predictions).flatten()


class ResNet50LogitLoss(nn.Module):
    """MSE between the ImageNet ResNet-50 logits of two images (FlowMo's stage-1B perceptual loss).

    Inputs in `[-1, 1]` are mapped to `[0, 1]`, resized to 224x224 (bilinear, antialiased), normalised with the
    ImageNet mean and std and classified; the loss is the mean squared difference of the 1000 logits.

    Args:
        pretrained (`bool`, *optional*, defaults to `True`):
            load torchvision's ``ResNet50_Weights.IMAGENET1K_V1``. ``False``: random network, explicit test
            option; then ``weights_path`` must be None.
        weights_path (`PathLike`, *optional*):
            local torchvision ``resnet50-0676ba61.pth``.

    Raises:
        MissingPretrainedWeightsError: ``pretrained`` and the weights cannot be found.
    """

    def __init__(self, pretrained: bool = True, weights_path: PathLike | None = None):
        super().__init__()
        from torchvision.models import resnet50

        if not pretrained and weights_path is not None:
            raise ValueError("weights_path was given together with pretrained=False; pass one or the other")
        state_dict = _load_weights(RESNET50_WEIGHTS, weights_path) if pretrained else None
        self.model = resnet50(weights=None)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.pretrained = pretrained
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # batch norm always uses its running statistics
        return super().train(False)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        images = images / 2 + 0.5
        images = F.interpolate(images, size=224, mode="bilinear", antialias=True, align_corners=False)
        return self.model((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """Per-image mean squared logit difference `(B,)`; its mean is the original's `mse_loss(..., "mean")`."""
        _check_pair(images, predictions)
        difference = self.logits(predictions).float() - self.logits(images).float()
        return difference.pow(2).mean(dim=1)


def build_perceptual_loss(
    network: str, pretrained: bool = True, weights_path: PathLike | None = None
) -> nn.Module:
    """``"lpips-vgg"`` -> [`LPIPSVGGLoss`], ``"resnet50"`` -> [`ResNet50LogitLoss`]; frozen, eval mode."""
    if network == "lpips-vgg":
        return LPIPSVGGLoss(pretrained=pretrained, weights_path=weights_path)
    if network == "resnet50":
        return ResNet50LogitLoss(pretrained=pretrained, weights_path=weights_path)
    raise ValueError(f"unknown perceptual network {network!r}; choose one of {PERCEPTUAL_NETWORKS}")


__all__ = [
    "LPIPS_VGG_BACKBONE_WEIGHTS",
    "LPIPSVGGLoss",
    "MissingPretrainedWeightsError",
    "PERCEPTUAL_NETWORKS",
    "RESNET50_WEIGHTS",
    "ResNet50LogitLoss",
    "build_perceptual_loss",
]
