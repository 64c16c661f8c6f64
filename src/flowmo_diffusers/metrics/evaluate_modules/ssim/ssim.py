"""SSIM for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

from __future__ import annotations

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
    RESULT = "mean SSIM over images (images of at least 7x7 pixels)."
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
    REFERENCE_URLS = [image_pair_metric.SKIMAGE_METRICS_URL + "structural_similarity"]
    PER_IMAGE = staticmethod(ssim_per_image)
