"""SSIM for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

import evaluate
import numpy as np

from flowmo_diffusers.metrics.evaluate_integration import as_image_tensors, image_pair_batches, image_pair_features
from flowmo_diffusers.metrics.ssim import ssim_per_image

_DESCRIPTION = """\
Structural similarity between reconstructions and original images, averaged over images.
Images in [-1, 1] are clamped, mapped to [0, 1], quantised to uint8 by truncation and compared
with scikit-image's `structural_similarity(data_range=1.0, channel_axis=-1)` on uint8/255
(7x7 uniform window, K1=0.01, K2=0.03), exactly as in FlowMo's evaluation code.
"""

_KWARGS_DESCRIPTION = """
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

_CITATION = """\
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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Ssim(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
            reference_urls=[
                "https://scikit-image.org/docs/stable/api/skimage.metrics.html#skimage.metrics.structural_similarity"
            ],
        )

    def _compute(self, predictions, references, batch_size=64):
        references = as_image_tensors(references, "references")
        predictions = as_image_tensors(predictions, "predictions")
        values = [
            ssim_per_image(originals, reconstructions)
            for originals, reconstructions in image_pair_batches(references, predictions, batch_size)
        ]
        return {"ssim": float(np.concatenate(values).mean())}
