"""Named FlowMoModel configurations: the paper's two released models and a tiny one for CPU tests."""

import copy
from typing import Any, Dict

# Paper sizes (original muP widths: decoder 6 -> 1152, encoder 4 -> 768; 12 heads; RoPE axes [8, 28, 28] * width / 4).
_PAPER_COMMON: Dict[str, Any] = dict(
    sample_size=256,
    in_channels=3,
    patch_size=4,
    code_length=256,
    encoder_hidden_size=768,
    encoder_num_heads=12,
    encoder_depth=8,
    encoder_axes_dim=[8, 28, 28],
    decoder_hidden_size=1152,
    decoder_num_heads=12,
    decoder_depth=16,
    decoder_axes_dim=[12, 42, 42],
    mlp_ratio=4.0,
    qkv_bias=True,
    rope_theta=10_000,
    mup_attention_scale=True,
    timestep_embedding_dim=256,
    entropy_temperature=0.1,
    entropy_loss_weight=0.0025,
    commitment_loss_weight=0.000625,
)

PRESETS: Dict[str, Dict[str, Any]] = {
    # 256 tokens x 18 bits = 0.070 bits per pixel; 2 ids of 9 bits per token.
    "flowmo-lo": dict(_PAPER_COMMON, context_dim=18, bits_per_subtoken=9),
    # 256 tokens x 56 bits = 0.219 bits per pixel; 4 ids of 14 bits per token.
    "flowmo-hi": dict(_PAPER_COMMON, context_dim=56, bits_per_subtoken=14),
    # 32x32 images, 8 tokens x 12 bits (3 ids of 4 bits), ~0.3M parameters: tests and the CPU quickstart.
    "flowmo-tiny": dict(
        _PAPER_COMMON,
        sample_size=32,
        code_length=8,
        context_dim=12,
        bits_per_subtoken=4,
        encoder_hidden_size=32,
        encoder_num_heads=2,
        encoder_depth=2,
        encoder_axes_dim=[4, 6, 6],
        decoder_hidden_size=64,
        decoder_num_heads=2,
        decoder_depth=2,
        decoder_axes_dim=[8, 12, 12],
    ),
}


def get_preset_config(name: str) -> Dict[str, Any]:
    """A copy of the named [`FlowMoModel`] config: one of `flowmo-lo`, `flowmo-hi`, `flowmo-tiny`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
