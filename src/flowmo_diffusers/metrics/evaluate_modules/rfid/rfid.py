"""Reconstruction FID (rFID), as in FlowMo (bundled with flowmo_diffusers)."""

import evaluate
import torch

from flowmo_diffusers.metrics.evaluate_integration import as_image_tensors, image_pair_batches, image_pair_features
from flowmo_diffusers.metrics.feature_statistics import StreamingFeatureStatistics
from flowmo_diffusers.metrics.fid_inception import FIDInceptionFeatureExtractor

_DESCRIPTION = """\
Reconstruction FID: the Frechet distance between Gaussians fitted (mean, unbiased covariance)
to the 2048-d pool features of the TF-ported FID InceptionV3 (pytorch-fid's network and
weights pt_inception-2015-12-05-6726825d.pth) of the original images and of their
reconstructions. Images are resized to 299x299 bilinearly as pytorch-fid does. The Inception
weights come from `weights_path` or the torch hub cache (downloaded if possible).
Meaningful values need thousands of images (FlowMo uses the 50k ImageNet validation set);
for large evaluations prefer `flowmo_diffusers.metrics.ReconstructionMetrics`, which streams.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each a channel-first [3, H, W] float array in [-1, 1].
    references: original images, same shapes. At least 2 pairs.
    weights_path: local pt_inception-2015-12-05-6726825d.pth.
    random_init: False (default). True keeps random Inception weights: for tests only.
    feature_dims: 2048 (default, rFID as reported); 64, 192 or 768 only for tests.
    device: torch device for the network (default: CUDA if available, else CPU).
    batch_size: images per forward pass (default 16).
Returns:
    rfid: the Frechet Inception distance between originals and reconstructions.
Examples:
    >>> from flowmo_diffusers.metrics import load_metric
    >>> rfid = load_metric("rfid")
    >>> rfid.compute(predictions=reconstructions, references=originals)["rfid"]
"""

_CITATION = """\
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rfid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
            reference_urls=["https://github.com/mseitzer/pytorch-fid", "https://arxiv.org/abs/1706.08500"],
        )

    def _network(self, weights_path, random_init, feature_dims, device):
        # Built once per configuration.
        key = (None if weights_path is None else str(weights_path), random_init, feature_dims, str(device))
        cache = self.__dict__.setdefault("_inception_networks", {})
        if key not in cache:
            cache[key] = FIDInceptionFeatureExtractor(
                weights_path=weights_path, random_init=random_init, feature_dims=feature_dims
            ).to(device)
        return cache[key]

    def _compute(
        self,
        predictions,
        references,
        weights_path=None,
        random_init=False,
        feature_dims=2048,
        device=None,
        batch_size=16,
    ):
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        network = self._network(weights_path, random_init, feature_dims, device)
        references = as_image_tensors(references, "references")
        predictions = as_image_tensors(predictions, "predictions")
        reference_statistics = StreamingFeatureStatistics(feature_dims, device=device)
        prediction_statistics = StreamingFeatureStatistics(feature_dims, device=device)
        for originals, reconstructions in image_pair_batches(references, predictions, batch_size):
            reference_statistics.update(network(originals))
            prediction_statistics.update(network(reconstructions))
        return {"rfid": reference_statistics.frechet_distance(prediction_statistics)}
