"""Named model configurations, behind one lookup: [`FlowMoModel`] (the paper's two released models, a small one for
the offline CPU demo and a tiny one for CPU tests) and [`FlowMoMaskGiTTransformer`] (a prior on FlowMo-Lo tokens and a
tiny one)."""

from __future__ import annotations

import copy
import os
from typing import Any

# Shared by every FlowMo preset: the original's block design, RoPE base, timestep embedding and quantizer losses.
_FLOWMO_COMMON: dict[str, Any] = dict(
    in_channels=3,
    patch_size=4,
    mlp_ratio=4.0,
    qkv_bias=True,
    rope_theta=10_000,
    mup_attention_scale=True,
    timestep_embedding_dim=256,
    entropy_temperature=0.1,
    entropy_loss_weight=0.0025,
    commitment_loss_weight=0.000625,
)


def _flowmo(sample_size, code_length, context_dim, bits_per_subtoken, encoder, decoder) -> dict[str, Any]:
    """A FlowMo config from its sizes; `encoder` and `decoder` are `(hidden_size, num_heads, depth, axes_dim)`."""
    stacks = {}
    for stack, (hidden_size, num_heads, depth, axes_dim) in (("encoder", encoder), ("decoder", decoder)):
        stacks.update({f"{stack}_hidden_size": hidden_size, f"{stack}_num_heads": num_heads,
                       f"{stack}_depth": depth, f"{stack}_axes_dim": list(axes_dim)})
    return dict(_FLOWMO_COMMON, sample_size=sample_size, code_length=code_length, context_dim=context_dim,
                bits_per_subtoken=bits_per_subtoken, **stacks)


# Paper sizes (original muP widths: decoder 6 -> 1152, encoder 4 -> 768; 12 heads; RoPE axes [8, 28, 28] * width / 4).
_PAPER_ENCODER, _PAPER_DECODER = (768, 12, 8, (8, 28, 28)), (1152, 12, 16, (12, 42, 42))

FLOWMO_PRESETS: dict[str, dict[str, Any]] = {
    # 256 tokens x 18 bits = 0.070 bits per pixel; 2 ids of 9 bits per token.
    "flowmo-lo": _flowmo(256, 256, 18, 9, _PAPER_ENCODER, _PAPER_DECODER),
    # 256 tokens x 56 bits = 0.219 bits per pixel; 4 ids of 14 bits per token.
    "flowmo-hi": _flowmo(256, 256, 56, 14, _PAPER_ENCODER, _PAPER_DECODER),
    # 32x32 images, 8 tokens x 12 bits (3 ids of 4 bits), ~0.3M parameters: tests and the CPU quickstart.
    "flowmo-tiny": _flowmo(32, 8, 12, 4, encoder=(32, 2, 2, (4, 6, 6)), decoder=(64, 2, 2, (8, 12, 12))),
    # 32x32 images, 64 tokens x 32 bits (4 ids of 8 bits) = 2 bits per pixel, ~1.9M parameters: the offline main job
    # (the CPU first look). Its bits, 22x the tiny preset's, are what lets four minutes of training on two cores
    # reconstruct photographs it never saw (benchmarks/RESULTS.md, "First look").
    "flowmo-demo": _flowmo(32, 64, 32, 8, encoder=(64, 2, 2, (8, 12, 12)), decoder=(128, 4, 3, (8, 12, 12))),
}


# Named configurations. "maskgit-flowmo-lo" is *our* choice of size for a prior on FlowMo-Lo tokens (512 ids of 9 bits
# per 256x256 image): the FlowMo paper reports a MaskGiT on its tokens but did not release its configuration. The
# size (hidden 1024, 24 layers, 16 heads, MLP 4096, dropout 0.1; 305M parameters) is BERT-large-like, between
# MaskGiT's (768 / 24 / 16) and larger TiTok generators. "maskgit-tiny" pairs with the "flowmo-tiny" autoencoder
# (24 ids of 4 bits) for CPU tests.
MASKGIT_PRESETS: dict[str, dict[str, Any]] = {
    # (ids per image, values per id, classes) of the token format and the backbone's (hidden, layers, heads, MLP).
    "maskgit-flowmo-lo": dict(num_indices=512, codebook_size=512, num_classes=1000,
                              hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, dropout=0.1),
    "maskgit-tiny": dict(num_indices=24, codebook_size=16, num_classes=10,
                         hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, dropout=0.0),
}

#: Every preset by family; names are unique across families, so a name alone finds its config.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {"FlowMo": FLOWMO_PRESETS, "MaskGiT": MASKGIT_PRESETS}


def get_preset_config(name: str, family: str | None = None) -> dict[str, Any]:
    """A copy of the named config.

    Args:
        name (`str`):
            A preset: `flowmo-lo`, `flowmo-hi`, `flowmo-demo`, `flowmo-tiny` ([`FlowMoModel`]) or `maskgit-flowmo-lo`, `maskgit-tiny`
            ([`FlowMoMaskGiTTransformer`]).
        family (`str`, *optional*):
            `"FlowMo"` or `"MaskGiT"`: only look among that family's presets.

    Returns:
        `Dict[str, Any]`: the config, to pass as `**kwargs` to the model class (a copy: changing it changes nothing).
    """
    if family is not None and family not in PRESETS:
        raise ValueError(f"unknown preset family {family!r}; choose one of {sorted(PRESETS)}")
    tables = [PRESETS[family]] if family is not None else list(PRESETS.values())
    for table in tables:
        if name in table:
            return copy.deepcopy(table[name])
    names = sorted(key for table in tables for key in table)
    raise ValueError(f"unknown {family + ' ' if family == 'MaskGiT' else ''}preset {name!r}; choose one of {names}")


def get_maskgit_preset_config(name: str) -> dict[str, Any]:
    """A copy of the named [`FlowMoMaskGiTTransformer`] config: `maskgit-flowmo-lo` or `maskgit-tiny`."""
    return get_preset_config(name, family="MaskGiT")


def resolve_model_config(name_or_path: str, model_class: type, family: str, option: str = "--model_config") -> dict[str, Any]:
    """The config a training script starts from: a preset name of `family`, or a `config.json` (file or folder).

    Args:
        name_or_path (`str`):
            A preset of `family` or a path that `model_class.load_config` reads.
        model_class (`type`):
            The diffusers model class whose `load_config` reads a path.
        family (`str`):
            `"FlowMo"` or `"MaskGiT"`.
        option (`str`, *optional*, defaults to `"--model_config"`):
            The command-line option named in the error.

    Returns:
        `Dict[str, Any]`: a mutable copy of the config.
    """
    if name_or_path in PRESETS[family]:
        return get_preset_config(name_or_path, family=family)
    if os.path.isfile(name_or_path) or os.path.isdir(name_or_path):
        return dict(model_class.load_config(name_or_path))
    raise ValueError(f"{option} {name_or_path!r} is neither a preset ({sorted(PRESETS[family])}) nor a config path")


__all__ = [
    "FLOWMO_PRESETS",
    "MASKGIT_PRESETS",
    "PRESETS",
    "get_maskgit_preset_config",
    "get_preset_config",
    "resolve_model_config",
]
