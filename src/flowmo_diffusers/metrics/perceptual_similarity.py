"""LPIPS perceptual distance (Zhang et al., 2018) through the `lpips` package, loadable offline.

FlowMo reports `lpips.LPIPS(net="alex")` (and `net="vgg"`) on [-1, 1] images. An
LPIPS network has two parts:

* the calibrated linear heads (`lin0` ... `lin4`), shipped inside the `lpips`
  package itself (`lpips/weights/v0.1/{alex,vgg}.pth`), so they never need a download;
* the ImageNet backbone (torchvision AlexNet / VGG16), which `lpips.LPIPS` would
  download through torchvision on first use.

[`LPIPSDistance`] builds `lpips.LPIPS(pnet_rand=True, pretrained=True)` so that
lpips itself never downloads anything, and then loads the backbone weights explicitly:
from `backbone_weights_path` or from the torch hub cache / URL that torchvision uses,
raising [`~flowmo_diffusers.metrics.pretrained_weights.MissingPretrainedWeightsError`]
if neither is available.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ._optional_dependencies import require
from .image_conversion import check_image_batch
from .pretrained_weights import (
    LPIPS_BACKBONE_WEIGHTS,
    MissingPretrainedWeightsError,
    PathLike,
    load_pretrained_state_dict,
)

LPIPS_NETS = tuple(LPIPS_BACKBONE_WEIGHTS)  # ("alex", "vgg")


def load_torchvision_features_into_lpips_trunk(
    trunk: nn.Module, torchvision_state_dict: dict[str, torch.Tensor]
) -> None:
    """Copy `features.<i>.*` of a torchvision AlexNet/VGG16 state dict into lpips' sliced trunk.

    lpips splits `torchvision_model.features` into `slice1` ... `slice5` but keeps each
    layer's original index as its child name, so `features.<i>.<param>` maps to
    `slice<k>.<i>.<param>`. Loading is strict: every trunk parameter must be found.
    """
    remapped: dict[str, torch.Tensor] = {}
    for trunk_key in trunk.state_dict():
        _slice_name, layer_index, parameter_name = trunk_key.split(".", 2)
        source_key = f"features.{layer_index}.{parameter_name}"
        if source_key not in torchvision_state_dict:
            raise KeyError(
                f"LPIPS backbone weights lack `{source_key}`; expected a torchvision AlexNet/VGG16 "
                f"state dict (keys `features.<i>.weight`, `features.<i>.bias`, ...)."
            )
        remapped[trunk_key] = torchvision_state_dict[source_key]
    trunk.load_state_dict(remapped, strict=True)


class LPIPSDistance(nn.Module):
    """Per-image LPIPS distance between two batches of [-1, 1] images.

    Args:
        net (`str`, *optional*, defaults to `"alex"`):
            `"alex"` (FlowMo's headline LPIPS) or `"vgg"`.
        pretrained (`bool`, *optional*, defaults to `True`):
            Load the ImageNet backbone (required for meaningful numbers). `False` is the explicit test option: the
            backbone stays randomly initialised and no file is read or downloaded for it. The linear heads are loaded
            from the lpips package in both cases (they are installed with it), so distances stay non-negative and are
            0 for identical images.
        backbone_weights_path (`str` or `os.PathLike`, *optional*):
            Local torchvision `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth` (a full torchvision model state dict).
            Without it the weights come from the torch hub cache, downloading them if possible.
        linear_weights_path (`str` or `os.PathLike`, *optional*):
            Replacement for lpips' packaged `v0.1/<net>.pth`.

    Raises:
        MissingPretrainedWeightsError: The backbone or linear weights cannot be found.
    """

    def __init__(
        self,
        net: str = "alex",
        pretrained: bool = True,
        backbone_weights_path: PathLike | None = None,
        linear_weights_path: PathLike | None = None,
    ) -> None:
        super().__init__()
        lpips = require("lpips")
        if net not in LPIPS_NETS:
            raise ValueError(f"net must be one of {LPIPS_NETS}, got {net!r}")
        if not pretrained and backbone_weights_path is not None:
            raise ValueError("backbone_weights_path was given together with pretrained=False; pass one or the other")
        if linear_weights_path is not None and not os.path.isfile(linear_weights_path):
            raise MissingPretrainedWeightsError(
                f"LPIPS linear-head weights not found at {os.fspath(linear_weights_path)!r} "
                f"(given as `linear_weights_path`). Leave it unset to use the copy shipped with "
                f"the lpips package (lpips/weights/v0.1/{net}.pth)."
            )
        self.net = net
        self.pretrained = pretrained
        # Resolve the backbone weights before building the network, so a missing file fails fast.
        backbone_state_dict = (
            load_pretrained_state_dict(LPIPS_BACKBONE_WEIGHTS[net], backbone_weights_path) if pretrained else None
        )
        with warnings.catch_warnings():
            # lpips calls torchvision's deprecated `pretrained=` argument; the warning is noise here.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            # pnet_rand=True: lpips must never download the backbone itself (it would fail
            # offline with an unhelpful error); we load it explicitly below.
            self.lpips_model = lpips.LPIPS(
                net=net,
                pretrained=True,
                pnet_rand=True,
                model_path=None if linear_weights_path is None else os.fspath(linear_weights_path),
                verbose=False,
            )
        if backbone_state_dict is not None:
            load_torchvision_features_into_lpips_trunk(self.lpips_model.net, backbone_state_dict)
        self.lpips_model.eval()
        self.lpips_model.requires_grad_(False)

    @torch.no_grad()
    def forward(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of every image pair.

        Args:
            originals (`torch.Tensor`):
                [B, 3, H, W] images in [-1, 1] (clamped to it, as FlowMo does).
            reconstructions (`torch.Tensor`):
                [B, 3, H, W] images in [-1, 1].

        Returns:
            `torch.Tensor`: [B] float32 distances on the network's device.
        """
        check_image_batch(originals, "originals")
        check_image_batch(reconstructions, "reconstructions")
        device = self.lpips_model.scaling_layer.shift.device
        originals = originals.detach().to(device=device, dtype=torch.float32).clamp(-1.0, 1.0)
        reconstructions = reconstructions.detach().to(device=device, dtype=torch.float32).clamp(-1.0, 1.0)
        return self.lpips_model(originals, reconstructions).flatten()
