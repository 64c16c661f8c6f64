"""Resolving the pretrained networks the metrics need (LPIPS backbones, FID Inception).

Every network is loaded in one of two ways, and nothing ever falls back silently to
random weights:

* from a local ``.pth`` file the caller names (offline machines), loaded with
  ``torch.load(..., weights_only=True)``;
* from its canonical URL through ``torch.hub.load_state_dict_from_url``, which first
  looks in the torch hub cache (``$TORCH_HOME/hub/checkpoints``, by default
  ``~/.cache/torch/hub/checkpoints``). Copying the file there beforehand therefore
  also works offline.

If neither works, :class:`MissingPretrainedWeightsError` says which file is needed,
where it comes from and both ways of providing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Union
from urllib.parse import urlparse

import torch

PathLike = Union[str, "os.PathLike[str]"]


class MissingPretrainedWeightsError(FileNotFoundError):
    """Pretrained metric weights are neither at the given path nor obtainable from torch hub."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where one set of pretrained weights comes from.

    Attributes:
        description: Human-readable name used in error messages.
        url: Canonical download URL (its basename is the torch hub cache file name).
        path_option: Name of the keyword argument that accepts a local file instead.
        check_hash: Whether torch hub verifies the hash embedded in the file name; it
            mirrors what the upstream loader (torchvision / pytorch-fid) does.
        aggregator_path_option: The same option's name on ``ReconstructionMetrics``.
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

    def _aggregator_hint(self) -> str:
        return f" (ReconstructionMetrics: `{self.aggregator_path_option}`)" if self.aggregator_path_option else ""

    def how_to_provide(self) -> str:
        return (
            f"Provide the file `{self.file_name}` (download it on a machine with internet "
            f"access from {self.url}) either by passing `{self.path_option}=/path/to/"
            f"{self.file_name}`{self._aggregator_hint()} or by copying it to the torch hub cache at "
            f"`{self.hub_cache_path()}` (set TORCH_HOME to move that cache)."
        )


def load_pretrained_state_dict(
    weights: PretrainedWeights, local_path: Optional[PathLike] = None
) -> Dict[str, torch.Tensor]:
    """Load a state dict from ``local_path`` if given, otherwise via the torch hub cache / URL.

    Raises:
        MissingPretrainedWeightsError: ``local_path`` does not exist, or the download
            failed and the file is not in the torch hub cache.
    """
    if local_path is not None:
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise MissingPretrainedWeightsError(
                f"{weights.description} weights not found at {local_path!r} "
                f"(given as `{weights.path_option}`). {weights.how_to_provide()}"
            )
        return torch.load(local_path, map_location="cpu", weights_only=True)

    try:
        # Looked up on torch.hub at call time (not imported by name) so that the cache
        # directory and the loader are the ones in effect now.
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
