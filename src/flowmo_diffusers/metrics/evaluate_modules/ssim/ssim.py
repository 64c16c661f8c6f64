"""SSIM for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

from __future__ import annotations

import torch

# The module, not the class: `evaluate.load` takes the first metric class it finds in this script's namespace.
from flowmo_diffusers.metrics import image_pair_metric
from flowmo_diffusers.metrics.ssim import ssim_per_image


class Ssim(image_pair_metric.ImagePairMetric):
    DESCRIPTION = """\
Structural similarity between reconstructions and original images, averaged over images.
Images in [-1, 1] are clamped, mapped to [0, 1], quantised to uint8 by truncation and compared
with scikit-image's `structural_similarity(data_range=1.0, channel_axis=-1)` on uint8/255
(7x7 uniform window, K1=0.01, K2=0.03), exactly as in FlowMo's evaluation code.
"""
    INPUTS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each a channel-first [3, H, W] float array in [-1, 1], H, W >= 7.
    references: original images, same shapes.
Returns:
    ssim: mean SSIM over images.
Examples:
    >>> from flowmo_diffusers.metrics import load_metric
    >>> ssim = load_metric("ssim")
    >>> ssim.compute(predictions=reconstructions, references=originals)["ssim"]
"""
    CITATION = """\
@article{wang2004ssim,
  title={Image quality assessment: from error visibility to structural similarity},
  author={Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal={IEEE Transactions on Image Processing},
  volume={13},
  number={4},
  pages={600--612},
  year={2004}
}
"""
    REFERENCE_URLS = [
        "https://scikit-image.org/docs/stable/api/skimage.metrics.html#skimage.metrics.structural_similarity",
    ]

    def compute_pairs(
        self, references: list[torch.Tensor], predictions: list[torch.Tensor], batch_size: int = 64
    ) -> dict[str, float]:
        return {"ssim": self.mean_over_images(ssim_per_image, references, predictions, batch_size)}
