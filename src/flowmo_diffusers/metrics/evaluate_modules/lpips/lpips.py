"""LPIPS for image reconstructions, as in FlowMo (bundled with flowmo_diffusers)."""

import evaluate
import torch

from flowmo_diffusers.metrics.evaluate_integration import as_image_tensors, image_pair_batches, image_pair_features
from flowmo_diffusers.metrics.perceptual_similarity import LPIPSDistance

_DESCRIPTION = """\
Learned Perceptual Image Patch Similarity (v0.1) between reconstructions and original images,
averaged over images, computed by `lpips.LPIPS(net=...)` on [-1, 1] images as in FlowMo.
The ImageNet backbone weights come from `backbone_weights_path` or the torch hub cache
(downloaded if possible); a clear error says how to provide them offline.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: reconstructed images, each a channel-first [3, H, W] float array in [-1, 1].
    references: original images, same shapes.
    net: "alex" (default, FlowMo's LPIPS) or "vgg".
    pretrained: True (default). False keeps a random backbone: for tests only.
    backbone_weights_path: local torchvision alexnet-owt-7be5be79.pth / vgg16-397923af.pth.
    device: torch device for the network (default: CUDA if available, else CPU).
    batch_size: images per forward pass (default 16).
Returns:
    lpips: mean LPIPS distance over images (lower is more similar).
Examples:
    >>> from flowmo_diffusers.metrics import load_metric
    >>> lpips = load_metric("lpips")
    >>> lpips.compute(predictions=reconstructions, references=originals, net="alex")["lpips"]
"""

_CITATION = """\
@inproceedings{zhang2018perceptual,
  title={The Unreasonable Effectiveness of Deep Features as a Perceptual Metric},
  author={Zhang, Richard and Isola, Phillip and Efros, Alexei A and Shechtman, Eli and Wang, Oliver},
  booktitle={CVPR},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Lpips(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=image_pair_features(),
            reference_urls=["https://github.com/richzhang/PerceptualSimilarity"],
        )

    def _network(self, net, pretrained, backbone_weights_path, device):
        # Built once per configuration: constructing VGG16 costs seconds.
        key = (net, pretrained, None if backbone_weights_path is None else str(backbone_weights_path), str(device))
        cache = self.__dict__.setdefault("_lpips_networks", {})
        if key not in cache:
            cache[key] = LPIPSDistance(net=net, pretrained=pretrained, backbone_weights_path=backbone_weights_path).to(
                device
            )
        return cache[key]

    def _compute(
        self,
        predictions,
        references,
        net="alex",
        pretrained=True,
        backbone_weights_path=None,
        device=None,
        batch_size=16,
    ):
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        network = self._network(net, pretrained, backbone_weights_path, device)
        references = as_image_tensors(references, "references")
        predictions = as_image_tensors(predictions, "predictions")
        distance_sum = 0.0
        for originals, reconstructions in image_pair_batches(references, predictions, batch_size):
            distance_sum += float(network(originals, reconstructions).double().sum())
        return {"lpips": distance_sum / len(references)}
