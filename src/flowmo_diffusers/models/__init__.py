from .autoencoder_flowmo import FlowMoDecoderOutput, FlowMoEncoderOutput, FlowMoModel
from .maskgit_transformer import FlowMoMaskGiTTransformer, FlowMoMaskGiTTransformerOutput
from .presets import FLOWMO_PRESETS, MASKGIT_PRESETS, PRESETS, get_maskgit_preset_config, get_preset_config
from .quantizer import LFQOutput, LookupFreeQuantizer
from .transformer_flowmo import FlowMoBlock, FlowMoTransformer, patchify, unpatchify

__all__ = [
    "FLOWMO_PRESETS",
    "MASKGIT_PRESETS",
    "PRESETS",
    "FlowMoBlock",
    "FlowMoDecoderOutput",
    "FlowMoEncoderOutput",
    "FlowMoMaskGiTTransformer",
    "FlowMoMaskGiTTransformerOutput",
    "FlowMoModel",
    "FlowMoTransformer",
    "LFQOutput",
    "LookupFreeQuantizer",
    "get_maskgit_preset_config",
    "get_preset_config",
    "patchify",
    "unpatchify",
]
