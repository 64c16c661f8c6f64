"""PSNR for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

from __future__ import annotations

# The module, not the class: `evaluate.load` takes the first metric class it finds in this script's namespace.
from flowmo_diffusers.metrics import image_pair_metric
from flowmo_diffusers.metrics.psnr import psnr_per_image


class Psnr(image_pair_metric.ImagePairMetric):
    DESCRIPTION = """\
Peak signal-to-noise ratio (dB) between reconstructions and original images, averaged over
images. Images in [-1, 1] are clamped, mapped to [0, 1], quantised to uint8 by truncation
and compared with scikit-image's `peak_signal_noise_ratio` (data range 1 on uint8/255),
exactly as in FlowMo's evaluation code.
"""
    RESULT = "mean PSNR over images in dB (inf if every pair is identical)."
    CITATION = """\
@article{sargent2025flowmo,
  title={Flow to the Mode: Mode-Seeking Diffusion Autoencoders for State-of-the-Art Image Tokenization},
  author={Sargent, Kyle and Hsu, Kyle and Johnson, Justin and Fei-Fei, Li and Wu, Jiajun},
  journal={arXiv preprint arXiv:2503.11056},
  year={2025}
}
"""
    REFERENCE_URLS = [image_pair_metric.SKIMAGE_METRICS_URL + "peak_signal_noise_ratio"]
    PER_IMAGE = staticmethod(psnr_per_image)
