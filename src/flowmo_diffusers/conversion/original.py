"""Conversion of the original FlowMo checkpoints (`flowmo_lo.pth`, `flowmo_hi.pth`, training runs) to FlowMoModel."""

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import yaml

from ..models.presets import get_preset_config
from ..utils.safe_loading import load_torch_file

# The original derives every size from `DIT_ZOO["dit_b_4"]` scaled by a muP width (hidden = width * base // 4).
ORIGINAL_DIT_BASE: dict[str, Any] = dict(
    hidden_size=768, mlp_ratio=4.0, num_heads=12, axes_dim=[8, 28, 28], theta=10_000, qkv_bias=True
)

# Original weights that FlowMoModel does not hold because the original computes them but never uses them (or, for
# the encoder, multiplies them by zeros / never calls them without a timestep).
_UNUSED_ORIGINAL_KEYS = [
    r"encoder\.txt_in\.weight",  # the encoder's code input is all zeros: only the bias matters
    r"encoder\.time_in\..*",  # the encoder runs without a timestep
    r"encoder\.double_blocks\.\d+\.(img|txt)_mod\..*",
    r"encoder\.final_layer_txt\.adaLN_modulation\..*",
    r"encoder\.final_layer_img\..*",  # the encoder's image head
    r"decoder\.final_layer_txt\..*",  # the decoder's code head
]

_STREAM_PARTS = {
    "modulation": "{s}_mod.lin",
    "qkv": "{s}_attn.qkv",
    "norm_q": "{s}_attn.norm.query_norm",
    "norm_k": "{s}_attn.norm.key_norm",
    "proj": "{s}_attn.proj",
    "ff.net.0.proj": "{s}_mlp.0",
    "ff.net.2": "{s}_mlp.2",
}
_TOP_LEVEL = {
    "encoder.patch_embed": "encoder.img_in",
    "encoder.proj_out": "encoder.final_layer_txt.linear",
    "decoder.patch_embed": "decoder.img_in",
    "decoder.code_embed": "decoder.txt_in",
    "decoder.time_embed.linear_1": "decoder.time_in.in_layer",
    "decoder.time_embed.linear_2": "decoder.time_in.out_layer",
    "decoder.norm_out_modulation": "decoder.final_layer_img.adaLN_modulation.1",
    "decoder.proj_out": "decoder.final_layer_img.linear",
}


class CheckpointConversionError(ValueError):
    """A checkpoint does not match the configuration it is converted with."""


def original_key(key: str) -> str:
    """The original state-dict key of a FlowMoModel parameter."""
    if key == "encoder.code_query":
        return "encoder.txt_in.bias"
    match = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(code|image)_stream\.(.+)\.(weight|bias)", key)
    if match:
        side, index, stream, part, kind = match.groups()
        if part not in _STREAM_PARTS:
            raise KeyError(key)
        if part in ("norm_q", "norm_k"):
            kind = "scale"
        prefix = _STREAM_PARTS[part].format(s="txt" if stream == "code" else "img")
        return f"{side}.double_blocks.{index}.{prefix}.{kind}"
    module, _, kind = key.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{kind}"
    raise KeyError(key)


def _is_known_unused(key: str, config: Mapping[str, Any]) -> bool:
    if any(re.fullmatch(pattern, key) for pattern in _UNUSED_ORIGINAL_KEYS):
        return True
    # The last block's stream whose output nobody reads: the encoder's image stream, the decoder's code stream.
    last_encoder, last_decoder = config["encoder_depth"] - 1, config["decoder_depth"] - 1
    return bool(
        re.fullmatch(rf"encoder\.double_blocks\.{last_encoder}\.img_(attn\.proj|mlp)\..*", key)
        or re.fullmatch(rf"decoder\.double_blocks\.{last_decoder}\.txt_(attn\.proj|mlp)\..*", key)
    )


def convert_original_state_dict(
    original: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, torch.Size], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """
    Rename an original FlowMo state dict to FlowMoModel's keys.

    Args:
        original (`Mapping[str, torch.Tensor]`):
            the original `FlowMo` module's state dict (EMA or not).
        expected_shapes (`Mapping[str, torch.Size]`):
            FlowMoModel's parameter shapes, `{key: shape}` (e.g. from a meta-device model).
        config (`Mapping[str, Any]`):
            the FlowMoModel config (for the depths).

    Raises:
        CheckpointConversionError: naming every missing, unexpected or mis-shaped key.
    """
    if original and all(key.startswith("module.") for key in original):  # saved from a DDP wrapper
        original = {key[len("module.") :]: value for key, value in original.items()}
    converted, missing, mis_shaped = {}, [], []
    for key, shape in expected_shapes.items():
        source = original_key(key)
        if source not in original:
            missing.append(f"{source} (for {key})")
            continue
        tensor = original[source]
        if tuple(tensor.shape) != tuple(shape):
            mis_shaped.append(f"{source}: checkpoint {tuple(tensor.shape)}, model expects {tuple(shape)}")
            continue
        converted[key] = tensor
    used = {original_key(key) for key in expected_shapes}
    unexpected = sorted(key for key in original if key not in used and not _is_known_unused(key, config))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mis_shaped:
        problems.append(f"mis-shaped keys ({len(mis_shaped)}): " + "; ".join(mis_shaped))
    if problems:
        raise CheckpointConversionError(
            "the checkpoint does not match the FlowMo configuration (check --preset / --original_config):\n  "
            + "\n  ".join(problems)
        )
    return converted


def load_original_checkpoint(path: str, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """
    Read an original `.pth` safely (`weights_only=True`) and pick its weights.

    Returns:
        The state dict and the name of the entry it came from (`model_ema_state_dict` when present and
        `prefer_ema`, else `model_state_dict`; `"state_dict"` for a bare state dict).

    Raises:
        UnsafeCheckpointError: the file holds pickled objects other than tensors and plain containers (whatever
            they are, they are never unpickled).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointConversionError(f"{path} holds a {type(checkpoint).__name__}, not a FlowMo checkpoint dict")
    for entry in (["model_ema_state_dict"] if prefer_ema else []) + ["model_state_dict"]:
        if isinstance(checkpoint.get(entry), dict):
            return checkpoint[entry], entry
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint, "state_dict"
    raise CheckpointConversionError(
        f"{path} has neither 'model_ema_state_dict' nor 'model_state_dict' (keys: {sorted(checkpoint)[:10]})"
    )


def config_from_original(original_config: Any, dit_base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """
    FlowMoModel config from the original trainer's `config.yaml` (a path or a loaded dict).

    Args:
        original_config (`Any`):
            path to the experiment folder's `config.yaml`, or its parsed contents.
        dit_base (`Mapping[str, Any]`, *optional*):
            the original's `DIT_ZOO["dit_b_4"]` entry, for forks that changed it; default the released one.
    """
    original_config = _load_yaml(original_config)
    base = dict(ORIGINAL_DIT_BASE, **(dit_base or {}))
    try:
        model, data = original_config["model"], original_config["data"]
        quantization = model.get("quantization_type", "lfq")
        if quantization != "lfq":
            raise CheckpointConversionError(
                f"only LFQ checkpoints are supported, this config has quantization_type={quantization!r}"
            )
        decoder_width = model["mup_width"]
        encoder_width = model.get("enc_mup_width") or decoder_width
        def sizes(width):
            return dict(
                hidden_size=width * (base["hidden_size"] // 4),
                num_heads=base["num_heads"],
                axes_dim=[(d // 4) * width for d in base["axes_dim"]],
            )

        encoder, decoder = sizes(encoder_width), sizes(decoder_width)
        return dict(
            sample_size=data["image_size"],
            in_channels=3,
            patch_size=model["patch_size"],
            code_length=model["code_length"],
            context_dim=model["context_dim"],
            bits_per_subtoken=model["codebook_size_for_entropy"],
            encoder_hidden_size=encoder["hidden_size"],
            encoder_num_heads=encoder["num_heads"],
            encoder_depth=model["enc_depth"],
            encoder_axes_dim=encoder["axes_dim"],
            decoder_hidden_size=decoder["hidden_size"],
            decoder_num_heads=decoder["num_heads"],
            decoder_depth=model["dec_depth"],
            decoder_axes_dim=decoder["axes_dim"],
            mlp_ratio=base["mlp_ratio"],
            qkv_bias=base["qkv_bias"],
            rope_theta=base["theta"],
            mup_attention_scale=bool(model.get("enable_mup", True)),
            timestep_embedding_dim=256,
            entropy_temperature=0.1,
            entropy_loss_weight=model.get("entropy_loss_weight", 0.0025),
            commitment_loss_weight=model.get("commit_loss_weight", 0.000625),
        )
    except KeyError as error:
        raise CheckpointConversionError(f"the original config lacks the entry {error}") from error


def _load_yaml(original_config: Any) -> dict[str, Any]:
    if isinstance(original_config, (str, os.PathLike)):
        with open(original_config, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    return original_config


def scheduler_config_from_original(original_config: Any) -> dict[str, Any]:
    """FlowMoScheduler config from the sampler section (`eval.sampling`) of the original `config.yaml`."""
    sampling = (_load_yaml(original_config).get("eval") or {}).get("sampling") or {}
    schedule = str(sampling.get("schedule", "pow_0.25"))
    if schedule == "linear":
        scheduler = dict(time_schedule="linear")
    elif schedule.startswith("pow_"):
        scheduler = dict(time_schedule="power", time_power=1 / float(schedule.split("_")[1]))
    else:
        raise CheckpointConversionError(f"unsupported sampling schedule {schedule!r} in the original config")
    interval = sampling.get("cfg_interval", "(.17,1.02)")
    if interval is None:
        scheduler["guidance_interval"] = None
    else:
        low, high = (float(part) for part in str(interval).strip("()[] ").split(","))
        scheduler["guidance_interval"] = (low, high)
    return scheduler


def convert_original_checkpoint(
    checkpoint_path: str,
    preset: str | None = None,
    original_config: Any = None,
    dit_base: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    prefer_ema: bool = True,
    dtype: torch.dtype = torch.float32,
    model_class: type | None = None,
):
    """
    Build a [`FlowMoModel`] from an original checkpoint.

    Give exactly one of `preset` (`flowmo-lo`, `flowmo-hi`), `original_config` (the trainer's `config.yaml`) or
    `config` (a FlowMoModel config dict). `model_class` is [`FlowMoModel`] or a subclass of it (the class whose
    `from_single_file` was called).

    Returns:
        `(model, source)`: the model in `dtype` and the checkpoint entry the weights came from.
    """
    if model_class is None:
        from ..models.autoencoder_flowmo import FlowMoModel as model_class

    if sum(option is not None for option in (preset, original_config, config)) != 1:
        raise ValueError("give exactly one of preset, original_config or config")
    if preset is not None:
        config = get_preset_config(preset)
    elif original_config is not None:
        config = config_from_original(original_config, dit_base)
    state_dict, source = load_original_checkpoint(checkpoint_path, prefer_ema=prefer_ema)
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in model_class(**config).state_dict().items()}
    converted = convert_original_state_dict(state_dict, shapes, config)
    model = model_class(**config)
    model.load_state_dict(converted, strict=True)
    # nn.Module.to rather than ModelMixin.to, which warns about fp32 modules on every dtype cast (diffusers 0.42).
    return torch.nn.Module.to(model, dtype).eval(), source
