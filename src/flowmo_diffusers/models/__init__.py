from .autoencoder_flowmo import FlowMoDecoderOutput, FlowMoEncoderOutput, FlowMoModel
from .presets import PRESETS, get_preset_config
from .quantizer import LFQOutput, LookupFreeQuantizer
from .transformer_flowmo import FlowMoBlock, FlowMoTransformer, patchify, unpatchify
