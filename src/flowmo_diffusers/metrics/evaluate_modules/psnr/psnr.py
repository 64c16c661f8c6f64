"""PSNR for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

import evaluate
import numpy as np

from flowmo_diffusers.metrics.evaluate_integration import as_image_tensors, image_pair_batches, image_pair_features
from flowmo_diffusers.metrics.psnr import psnr_per_image

_DESCRIPTION = """\
Peak signal-to-noise ratio (dB) between reconstructions and original images, averaged over
images. Images in [-1, 1] are clamped, mapped to [0, 1], quantised to uint8 by truncation
and compared with scikit-image's `peak_signal_noise_ratio` (data range 1 on uint8/255),
exactly as in FlowMo's evaluation code.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each a channel-first [3, H, W] float array in [-1, 1].
    references: original images, same shapes.
Returns:
    psnr: mean PSNR over images in dB (inf if every pair is identical).
Examples:
    >>> from flowmo_diffusers.metrics import load_metric
    >>> psnr = load_metric("psnr")
    >>> psnr.compute(predictions=reconstructions, references=originals)["psnr"]
"""

_CITATION = """\
@article{sargent2025flowmo,
  title={Flow to the Mode: Mode-Seeking Diffusion Autoencoders for State-of-the-Art Image Tokenization},
  author={Sargent, Kyle and Hsu, Kyle and Johnson, Justin and Fei-Fei, Li and Wu, Jiajun},
  journal={arXiv preprint arXiv:2503.11056},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Psnr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
            reference_urls=[
                "https://scikit-image.org/docs/stable/api/skimage.metrics.html#skimage.metrics.peak_signal_noise_ratio"
            ],
        )

    def _compute(self, predictions, references, batch_size=64):
        references = as_image_tensors(references, "references")
        predictions = as_image_tensors(predictions, "predictions")
        values = [
            psnr_per_image(originals, reconstructions)
            for originals, reconstructions in image_pair_batches(references, predictions, batch_size)
        ]
        return {"psnr": float(np.concatenate(values).mean())}
