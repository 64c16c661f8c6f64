"""The original FlowMo checkpoints (`.pth` + `config.yaml`) -> diffusers models and pipelines.

`original` maps the original trainer's weights and config onto [`FlowMoModel`] / [`FlowMoScheduler`] (what
`scripts/convert_flowmo_original_to_diffusers.py` runs); `single_file` is diffusers' `from_single_file` on top of it.
"""

# Refusals of files that would run code share one error class with the training checkpoints.
from ..utils.safe_loading import UnsafeCheckpointError
from .original import (
    CheckpointConversionError,
    config_from_original,
    convert_original_checkpoint,
    convert_original_state_dict,
    load_original_checkpoint,
    original_key,
    scheduler_config_from_original,
)
from .single_file import FromOriginalModelMixin, FromSingleFileMixin

__all__ = [
    "CheckpointConversionError",
    "FromOriginalModelMixin",
    "FromSingleFileMixin",
    "UnsafeCheckpointError",
    "config_from_original",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "load_original_checkpoint",
    "original_key",
    "scheduler_config_from_original",
]
