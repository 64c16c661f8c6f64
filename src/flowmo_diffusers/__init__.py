"""FlowMo image tokenizer (Sargent et al., 2025) for diffusers, Accelerate and datasets."""

from .models import FlowMoModel, LookupFreeQuantizer, get_preset_config
from .pipelines import FlowMoPipeline
from .schedulers import FlowMoScheduler

__version__ = "0.1.0"

__all__ = ["FlowMoModel", "FlowMoPipeline", "FlowMoScheduler", "LookupFreeQuantizer", "get_preset_config"]
