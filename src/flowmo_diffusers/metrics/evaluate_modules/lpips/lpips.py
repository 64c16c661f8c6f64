"""LPIPS for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

from __future__ import annotations

import torch

# The module, not the class: `evaluate.load` takes the first metric class it finds in this script's namespace.
from flowmo_diffusers.metrics import image_pair_metric
from flowmo_diffusers.metrics.perceptual_similarity import LPIPSDistance


class Lpips(image_pair_metric.ImagePairMetric):
    DESCRIPTION = """\
Learned Perceptual Image Patch Similarity (v0.1) between reconstructions and original images,
averaged over images, computed by `lpips.LPIPS(net=...)` on [-1, 1] images as in FlowMo.
The ImageNet backbone weights come from `backbone_weights_path` or the torch hub cache
(downloaded if possible); a clear error says how to provide them offline.
"""
    OPTIONS = """\
    net: "alex" (default, FlowMo's LPIPS) or "vgg".
    pretrained: True (default). False keeps a random backbone: for tests only.
    backbone_weights_path: local torchvision alexnet-owt-7be5be79.pth / vgg16-397923af.pth.
    device: torch device for the network (default: CUDA if available, else CPU).
"""
    RESULT = "mean LPIPS distance over images (lower is more similar)."
    CITATION = """\
@inproceedings{zhang2018perceptual,
  title={The Unreasonable Effectiveness of Deep Features as a Perceptual Metric},
  author={Zhang, Richard and Isola, Phillip and Efros, Alexei A and Shechtman, Eli and Wang, Oliver},
  booktitle={CVPR},
  year={2018}
}
"""
    REFERENCE_URLS = ["https://github.com/richzhang/PerceptualSimilarity"]

    def compute_pairs(
        self,
        references: list[torch.Tensor],
        predictions: list[torch.Tensor],
        net: str = "alex",
        pretrained: bool = True,
        backbone_weights_path: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> float:
        network, _ = self.network(
            LPIPSDistance, device, net=net, pretrained=pretrained, backbone_weights_path=backbone_weights_path
        )
        return self.mean_over_images(network, references, predictions, batch_size)
