"""Reconstruction FID (rFID), as in FlowMo (bundled with flowmo_diffusers)."""

from __future__ import annotations

import torch

# The module, not the class: `evaluate.load` takes the first metric class it finds in this script's namespace.
from flowmo_diffusers.metrics import image_pair_metric
from flowmo_diffusers.metrics.feature_statistics import StreamingFeatureStatistics
from flowmo_diffusers.metrics.fid_inception import FIDInceptionFeatureExtractor


class Rfid(image_pair_metric.ImagePairMetric):
    DESCRIPTION = """\
Reconstruction FID: the Frechet distance between Gaussians fitted (mean, unbiased covariance)
to the 2048-d pool features of the TF-ported FID InceptionV3 (pytorch-fid's network and
weights pt_inception-2015-12-05-6726825d.pth) of the original images and of their
reconstructions. Images are resized to 299x299 bilinearly as pytorch-fid does. The Inception
weights come from `weights_path` or the torch hub cache (downloaded if possible).
Meaningful values need thousands of images (FlowMo uses the 50k ImageNet validation set);
for large evaluations prefer `flowmo_diffusers.metrics.ReconstructionMetrics`, which streams.
"""
    OPTIONS = """\
    weights_path: local pt_inception-2015-12-05-6726825d.pth.
    random_init: False (default). True keeps random Inception weights: for tests only.
    feature_dims: 2048 (default, rFID as reported); 64, 192 or 768 only for tests.
    device: torch device for the network (default: CUDA if available, else CPU).
"""
    RESULT = "the Frechet Inception distance between originals and reconstructions (at least 2 pairs)."
    CITATION = """\
@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}
"""
    REFERENCE_URLS = ["https://github.com/mseitzer/pytorch-fid", "https://arxiv.org/abs/1706.08500"]

    def compute_pairs(
        self,
        references: list[torch.Tensor],
        predictions: list[torch.Tensor],
        weights_path: str | None = None,
        random_init: bool = False,
        feature_dims: int = 2048,
        device: str | torch.device | None = None,
        batch_size: int = 16,
    ) -> float:
        network, device = self.network(
            FIDInceptionFeatureExtractor,
            device,
            weights_path=weights_path,
            random_init=random_init,
            feature_dims=feature_dims,
        )
        originals_statistics = StreamingFeatureStatistics(feature_dims, device=device)
        reconstructions_statistics = StreamingFeatureStatistics(feature_dims, device=device)
        for originals, reconstructions in image_pair_metric.image_pair_batches(references, predictions, batch_size):
            originals_statistics.update(network(originals))
            reconstructions_statistics.update(network(reconstructions))
        return originals_statistics.frechet_distance(reconstructions_statistics)
