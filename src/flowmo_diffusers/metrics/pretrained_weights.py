"""The pretrained networks the metrics need (FID Inception, LPIPS backbones): where each comes from, and loading it.

Every network is loaded in one of two ways, and nothing ever falls back silently to random weights:

* from a local `.pth` file the caller names (offline machines), loaded with `torch.load(..., weights_only=True)`;
* from its canonical URL through `torch.hub.load_state_dict_from_url`, which first looks in the torch hub cache
  (`$TORCH_HOME/hub/checkpoints`, by default `~/.cache/torch/hub/checkpoints`). Copying the file there beforehand
  therefore also works offline.

If neither works, [`MissingPretrainedWeightsError`] says which file is needed, where it comes from and both ways
of providing it. The entries of this module ([`FID_INCEPTION_WEIGHTS`], [`LPIPS_BACKBONE_WEIGHTS`]) are the
one place that names the files and their URLs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from ..utils.safe_loading import load_torch_file

PathLike = str | os.PathLike


class MissingPretrainedWeightsError(FileNotFoundError):
    """Pretrained metric weights are neither at the given path nor obtainable from torch hub."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where one set of pretrained weights comes from.

    Args:
        description (`str`):
            Human-readable name used in error messages.
        url (`str`):
            Canonical download URL (its basename is the torch hub cache file name).
        path_option (`str`):
            Name of the keyword argument that accepts a local file instead.
        check_hash (`bool`, *optional*, defaults to `False`):
            Whether torch hub verifies the hash embedded in the file name; it mirrors what the upstream loader
            (torchvision / pytorch-fid) does.
        aggregator_path_option (`str`, *optional*, defaults to `""`):
            The same option's name on [`~flowmo_diffusers.metrics.ReconstructionMetrics`].
    """

    description: str
    url: str
    path_option: str
    check_hash: bool = False
    aggregator_path_option: str = ""

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    def hub_cache_path(self) -> str:
        """Path at which torch hub looks for (and caches) this file."""
        return os.path.join(torch.hub.get_dir(), "checkpoints", self.file_name)

    def how_to_provide(self) -> str:
        aggregator = f" (ReconstructionMetrics: `{self.aggregator_path_option}`)" if self.aggregator_path_option else ""
        return (
            f"Provide the file `{self.file_name}` (download it on a machine with internet access from {self.url}) "
            f"either by passing `{self.path_option}=/path/to/{self.file_name}`{aggregator} or by copying it to the "
            f"torch hub cache at `{self.hub_cache_path()}` (set TORCH_HOME to move that cache)."
        )


#: pytorch-fid's TF-ported InceptionV3 (`pt_inception-2015-12-05-6726825d.pth`), the network of FID, rFID and IS.
FID_INCEPTION_WEIGHTS = PretrainedWeights(
    description="FID Inception (pytorch-fid TF-ported InceptionV3)",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    path_option="weights_path",
    check_hash=False,  # pytorch-fid downloads this file without hash checking; do the same
    aggregator_path_option="inception_weights_path=...",
)

#: The torchvision ImageNet backbones that lpips' `pnet_rand=False` would download (torchvision's
#: AlexNet_Weights.IMAGENET1K_V1 and VGG16_Weights.IMAGENET1K_V1), by LPIPS net.
LPIPS_BACKBONE_WEIGHTS: dict[str, PretrainedWeights] = {
    net: PretrainedWeights(
        description=f"LPIPS {architecture} backbone (torchvision {architecture}_Weights.IMAGENET1K_V1)",
        url=f"https://download.pytorch.org/models/{file_name}",
        path_option="backbone_weights_path",
        check_hash=True,
        aggregator_path_option=f'lpips_backbone_weights_paths={{"{net}": ...}}',
    )
    for net, architecture, file_name in (
        ("alex", "AlexNet", "alexnet-owt-7be5be79.pth"),
        ("vgg", "VGG16", "vgg16-397923af.pth"),
    )
}


#: torchvision's ResNet50_Weights.IMAGENET1K_V1: the classifier of the original FlowMo's stage-1B `PerceptualLoss`.
RESNET50_WEIGHTS = PretrainedWeights(
    description="ResNet-50 ImageNet classifier (torchvision ResNet50_Weights.IMAGENET1K_V1)",
    url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
    path_option="weights_path",
    check_hash=True,
)

def load_pretrained_state_dict(
    weights: PretrainedWeights, local_path: PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Load a state dict from `local_path` if given, otherwise via the torch hub cache / URL.

    Args:
        weights ([`PretrainedWeights`]):
            The entry to load.
        local_path (`str` or `os.PathLike`, *optional*):
            A local copy of the file.

    Returns:
        `dict[str, torch.Tensor]`: The state dict, on the CPU.

    Raises:
        MissingPretrainedWeightsError: `local_path` does not exist, or the download failed and the file is not in the
            torch hub cache.
    """
    if local_path is not None:
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise MissingPretrainedWeightsError(
                f"{weights.description} weights not found at {local_path!r} "
                f"(given as `{weights.path_option}`). {weights.how_to_provide()}"
            )
        return load_torch_file(local_path)

    try:
        # Looked up on torch.hub at call time (not imported by name) so that the cache directory and the loader are
        # the ones in effect now.
        return torch.hub.load_state_dict_from_url(
            weights.url,
            map_location="cpu",
            progress=False,
            check_hash=weights.check_hash,
            weights_only=True,
        )
    except Exception as error:  # network errors come in many types (URLError, HTTPError, OSError, ...)
        raise MissingPretrainedWeightsError(
            f"Could not obtain the {weights.description} weights: they are not in the torch hub "
            f"cache and downloading {weights.url} failed ({type(error).__name__}: {error}). "
            f"{weights.how_to_provide()}"
        ) from error
