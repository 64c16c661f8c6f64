from .autoencoder_flowmo import FlowMoDecoderOutput, FlowMoEncoderOutput, FlowMoModel
from .maskgit_transformer import (
    MASKGIT_PRESETS,
    FlowMoMaskGiTTransformer,
    FlowMoMaskGiTTransformerOutput,
    get_maskgit_preset_config,
)
from .presets import PRESETS, get_preset_config
from .quantizer import LFQOutput, LookupFreeQuantizer
from .transformer_flowmo import FlowMoBlock, FlowMoTransformer, patchify, unpatchify
