"""FlowMo image tokenizer (Sargent et al., 2025) for diffusers, Accelerate and datasets."""

from .models import (
    FlowMoMaskGiTTransformer,
    FlowMoModel,
    LookupFreeQuantizer,
    get_maskgit_preset_config,
    get_preset_config,
)
from .pipelines import FlowMoMaskGiTPipeline, FlowMoPipeline
from .schedulers import FlowMoScheduler, MaskGiTScheduler

__version__ = "0.1.0"

__all__ = [
    "FlowMoMaskGiTPipeline",
    "FlowMoMaskGiTTransformer",
    "FlowMoModel",
    "FlowMoPipeline",
    "FlowMoScheduler",
    "LookupFreeQuantizer",
    "MaskGiTScheduler",
    "get_maskgit_preset_config",
    "get_preset_config",
]
