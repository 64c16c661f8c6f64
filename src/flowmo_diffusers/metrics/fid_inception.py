"""The TF-ported InceptionV3 used for FID (pytorch-fid's network), as a feature extractor.

This is pytorch-fid's `InceptionV3` (`use_fid_inception=True`): torchvision's
Inception3 with the `FIDInceptionA/C/E_1/E_2` blocks that reproduce TensorFlow's
pooling quirks, and the weights `pt_inception-2015-12-05-6726825d.pth` ported from
the original TF FID graph. FlowMo computed rFID from its 2048-d final average-pool
features. The difference from pytorch-fid's own class is only how the weights are
obtained: from a local file, from the torch hub cache / URL with a clear error, or
explicitly left random for tests.

The same forward pass can also return the network's 1008-way logits for the Inception
Score (`return_logits=True`), computed the way the original TF Inception Score code
(openai/improved-gan), ADM's evaluator and torch-fidelity's `logits_unbiased` do:
`pool_features @ fc.weight.T`, without the bias of the `fc` layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._optional_dependencies import require
from .image_conversion import check_image_batch
from .pretrained_weights import FID_INCEPTION_WEIGHTS, PathLike, load_pretrained_state_dict

FID_INCEPTION_INPUT_SIZE = 299

# Feature dimension -> index of the last block needed (pytorch-fid's BLOCK_INDEX_BY_DIM).
FEATURE_DIMS_TO_LAST_BLOCK = {64: 0, 192: 1, 768: 2, 2048: 3}

#: Number of outputs of the TF Inception's classifier (1000 ImageNet classes + 8 unused/background).
FID_INCEPTION_NUM_LOGITS = 1008


def build_fid_inception_v3() -> nn.Module:
    """Randomly initialised FID InceptionV3 with the layout of the pretrained weights file.

    Mirrors `pytorch_fid.inception.fid_inception_v3` minus the download.
    """
    require("pytorch_fid")
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    # init_weights=False: torchvision's truncated-normal init is slow and is overwritten
    # by the checkpoint anyway (pytorch-fid does the same).
    inception = inception_v3(
        weights=None, aux_logits=False, num_classes=FID_INCEPTION_NUM_LOGITS, init_weights=False
    )
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


class FIDInceptionFeatureExtractor(nn.Module):
    """FID Inception features of a batch of images, as pytorch-fid computes them.

    Images are brought to [0, 1], resized to 299x299 with bilinear interpolation
    (`align_corners=False`), scaled to [-1, 1] and run through the network up to the
    block that yields `feature_dims` channels, then spatially averaged.

    Args:
        weights_path (`str` or `os.PathLike`, *optional*):
            Local `pt_inception-2015-12-05-6726825d.pth`. Without it the weights come from the torch hub cache,
            downloading them if possible.
        random_init (`bool`, *optional*, defaults to `False`):
            Explicit test option: keep random weights and read nothing.
        feature_dims (`int`, *optional*, defaults to `2048`):
            2048 (final average pool; what FID/rFID uses), or 64, 192, 768 (earlier blocks, as pytorch-fid's
            `--dims`; cheaper, for tests and tiny sets). Only 2048 keeps the classifier layer, so only 2048 can return
            logits.

    Raises:
        MissingPretrainedWeightsError: `random_init` is False and the weights cannot be found.
    """

    def __init__(
        self,
        weights_path: PathLike | None = None,
        random_init: bool = False,
        feature_dims: int = 2048,
    ) -> None:
        super().__init__()
        if feature_dims not in FEATURE_DIMS_TO_LAST_BLOCK:
            raise ValueError(f"feature_dims must be one of {sorted(FEATURE_DIMS_TO_LAST_BLOCK)}, got {feature_dims}")
        if random_init and weights_path is not None:
            raise ValueError("weights_path was given together with random_init=True; pass one or the other")
        self.feature_dims = feature_dims
        # Resolve the weights before building the network, so a missing file fails fast.
        state_dict = None if random_init else load_pretrained_state_dict(FID_INCEPTION_WEIGHTS, weights_path)
        inception = build_fid_inception_v3()
        if state_dict is None:
            # PyTorch's default conv init shrinks activations ~3x per layer, so 90+ layers
            # would give ~1e-8 features; He init keeps them O(1), which makes random-init
            # FID values in tests clearly distinguishable from zero.
            for module in inception.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            inception.load_state_dict(state_dict, strict=True)

        # Same block split as pytorch_fid.inception.InceptionV3.
        all_blocks = [
            [
                inception.Conv2d_1a_3x3,
                inception.Conv2d_2a_3x3,
                inception.Conv2d_2b_3x3,
                nn.MaxPool2d(kernel_size=3, stride=2),
            ],
            [inception.Conv2d_3b_1x1, inception.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
            [
                inception.Mixed_5b,
                inception.Mixed_5c,
                inception.Mixed_5d,
                inception.Mixed_6a,
                inception.Mixed_6b,
                inception.Mixed_6c,
                inception.Mixed_6d,
                inception.Mixed_6e,
            ],
            [inception.Mixed_7a, inception.Mixed_7b, inception.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))],
        ]
        last_block = FEATURE_DIMS_TO_LAST_BLOCK[feature_dims]
        self.blocks = nn.ModuleList(nn.Sequential(*layers) for layers in all_blocks[: last_block + 1])
        # The 1008-way classifier on the pool features, for the Inception Score; earlier-block
        # features have no classifier.
        self.fc = inception.fc if feature_dims == 2048 else None
        self.eval()
        self.requires_grad_(False)

    @property
    def has_logits(self) -> bool:
        """Whether [`forward`] can return logits (only with `feature_dims=2048`)."""
        return self.fc is not None

    @torch.no_grad()
    def forward(
        self,
        images: torch.Tensor,
        value_range: tuple[float, float] = (-1.0, 1.0),
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Inception features, and optionally the classifier logits of the same pass.

        Args:
            images (`torch.Tensor`):
                [B, 3, H, W] images, any H and W (resized to 299x299).
            value_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`):
                `(-1, 1)` (FlowMo's convention) or `(0, 1)`. [-1, 1] input is clamped and mapped with `(x + 1) / 2`
                first, as FlowMo did before calling pytorch-fid's network (which expects [0, 1]).
            return_logits (`bool`, *optional*, defaults to `False`):
                Also return the [B, 1008] logits `features @ fc.weight.T` (no bias: the Inception Score's definition,
                see the module docstring). Needs `feature_dims=2048`.

        Returns:
            `torch.Tensor` or `tuple[torch.Tensor, torch.Tensor]`: [B, feature_dims] float32 features on the
            network's device, or, with `return_logits`, the tuple `(features [B, 2048], logits [B, 1008])`.

        Raises:
            ValueError: `return_logits` with `feature_dims` other than 2048.
        """
        if return_logits and not self.has_logits:
            raise ValueError(
                f"logits (for the Inception Score) come from the 2048-d pool features; this extractor was built "
                f"with feature_dims={self.feature_dims}. Use feature_dims=2048."
            )
        check_image_batch(images)
        device = next(self.parameters()).device
        images = images.detach().to(device=device, dtype=torch.float32)
        if tuple(value_range) == (-1.0, 1.0):
            images = (images.clamp(-1.0, 1.0) + 1.0) / 2.0
        elif tuple(value_range) != (0.0, 1.0):
            raise ValueError(f"value_range must be (-1, 1) or (0, 1), got {value_range}")
        # Order of operations as in pytorch_fid.inception.InceptionV3.forward: resize, then rescale.
        x = F.interpolate(
            images, size=(FID_INCEPTION_INPUT_SIZE, FID_INCEPTION_INPUT_SIZE), mode="bilinear", align_corners=False
        )
        x = 2 * x - 1
        for block in self.blocks:
            x = block(x)
        if x.shape[2:] != (1, 1):
            # Earlier blocks give feature maps; pytorch-fid's fid_score averages them spatially.
            x = F.adaptive_avg_pool2d(x, output_size=(1, 1))
        features = x.flatten(1)
        if not return_logits:
            return features
        return features, features @ self.fc.weight.T


def feature_extractor_on(
    device: torch.device,
    feature_extractor: nn.Module | None = None,
    weights_path: PathLike | None = None,
    random_init: bool = False,
    feature_dims: int = 2048,
) -> nn.Module:
    """The metrics' feature network on `device`, in eval mode: `feature_extractor` or the FID Inception.

    Args:
        device (`torch.device`):
            Where the network runs.
        feature_extractor (`torch.nn.Module`, *optional*):
            A replacement for the FID Inception, with a `feature_dims` attribute (its output dimension D).
        weights_path (`str` or `os.PathLike`, *optional*):
            The FID Inception's weights file (see [`FIDInceptionFeatureExtractor`]); unused with `feature_extractor`.
        random_init (`bool`, *optional*, defaults to `False`):
            Keep the FID Inception random; unused with `feature_extractor`.
        feature_dims (`int`, *optional*, defaults to `2048`):
            The FID Inception's feature dimension; unused with `feature_extractor`.

    Returns:
        `torch.nn.Module`: The network.
    """
    if feature_extractor is None:
        feature_extractor = FIDInceptionFeatureExtractor(
            weights_path=weights_path, random_init=random_init, feature_dims=feature_dims
        )
    elif not hasattr(feature_extractor, "feature_dims"):
        raise ValueError("a custom feature_extractor needs a `feature_dims` attribute (its output dimension D)")
    return feature_extractor.to(device).eval()
