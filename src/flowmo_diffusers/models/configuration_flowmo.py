"""FlowMoModel's config: the bounds of every `config.json` value, the size guard, and the legacy sampler keys.

The time grid and the guidance interval belong to [`FlowMoScheduler`]'s config (one owner, issue 19); configs saved
before that still carry them as `sampling_time_schedule`, `sampling_time_power` and `sampling_guidance_interval`.
[`legacy_sampling_scheduler`] turns those into the scheduler they described, with diffusers' deprecation warning.
"""

from diffusers.utils import deprecate

from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.validation import BoolRule, FloatRule, IntRule, IntSequenceRule

#: Bounds of every `config.json` value, checked at construction (and so at `from_pretrained`) before any weight is
#: allocated. They are far beyond FlowMo-Lo/Hi (sample_size 256, depth 8/16, hidden 768/1152, context_dim 18/56)
#: and refuse only values that would hang, exhaust memory or divide by zero.
CONFIG_RULES = {
    "sample_size": IntRule(1, 8192),
    "in_channels": IntRule(1, 64),
    "patch_size": IntRule(1, 256),
    "code_length": IntRule(1, 65536),
    "context_dim": IntRule(1, 4096),
    "bits_per_subtoken": IntRule(1, 24),  # ids in [0, 2**bits); the entropy loss enumerates the 2**bits codewords
    "encoder_hidden_size": IntRule(1, 65536),
    "encoder_num_heads": IntRule(1, 1024),
    "encoder_depth": IntRule(1, 1024),
    "encoder_axes_dim": IntSequenceRule(3, 0, 65536),
    "decoder_hidden_size": IntRule(1, 65536),
    "decoder_num_heads": IntRule(1, 1024),
    "decoder_depth": IntRule(1, 1024),
    "decoder_axes_dim": IntSequenceRule(3, 0, 65536),
    "mlp_ratio": FloatRule(0.0, 64.0, exclusive_minimum=True),
    "qkv_bias": BoolRule(),
    "rope_theta": FloatRule(0.0, 1e12, exclusive_minimum=True),
    "mup_attention_scale": BoolRule(),
    "timestep_embedding_dim": IntRule(2, 65536),
    "entropy_temperature": FloatRule(0.0, 1e6, exclusive_minimum=True),
    "entropy_loss_weight": FloatRule(0.0, 1e6),
    "commitment_loss_weight": FloatRule(0.0, 1e6),
    "sampling_num_inference_steps": IntRule(1, 1000),
    "sampling_guidance_scale": FloatRule(-100.0, 100.0),
}
#: A config describing a larger model is refused before allocation (FlowMo-Hi: about 0.9 billion parameters).
MAX_PARAMETERS = 50_000_000_000

#: Sampler keys of configs saved before the scheduler became their one owner, and the FlowMoScheduler key each
#: one moves to.
LEGACY_SAMPLING_KEYS = {
    "sampling_time_schedule": "time_schedule",
    "sampling_time_power": "time_power",
    "sampling_guidance_interval": "guidance_interval",
}
#: diffusers' `deprecate` names the diffusers release the shim may go with; it refuses one it has reached.
LEGACY_SAMPLING_REMOVAL = "1.0.0"


def estimated_parameters(values: dict) -> int:
    """Rough parameter count of a config (double-stream blocks: ~36 hidden^2 per block), to refuse absurd sizes."""
    total = 0
    for side in ("encoder", "decoder"):
        total += 36 * values[f"{side}_depth"] * values[f"{side}_hidden_size"] ** 2 * max(values["mlp_ratio"] / 4, 1)
    return int(total)


def check_model_size(class_name: str, values: dict) -> None:
    """Raise ValueError when `values` describe a model of more than [`MAX_PARAMETERS`] parameters."""
    if estimated_parameters(values) > MAX_PARAMETERS:
        raise ValueError(
            f"{class_name} config: encoder/decoder depth and hidden sizes describe a model of about "
            f"{estimated_parameters(values):.2e} parameters (more than {MAX_PARAMETERS:.0e}); check the config"
        )


def split_legacy_sampling_keys(config: dict) -> tuple[dict, dict]:
    """`config` without the legacy sampler keys, and those keys (as found) apart."""
    legacy = {key: value for key, value in config.items() if key in LEGACY_SAMPLING_KEYS}
    return {key: value for key, value in config.items() if key not in legacy}, legacy


def legacy_sampling_scheduler(legacy: dict) -> FlowMoScheduler | None:
    """The [`FlowMoScheduler`] that an old config's `sampling_time_schedule` / `sampling_time_power` /
    `sampling_guidance_interval` described (FlowMoScheduler's defaults for the keys it lacks), with a FutureWarning
    per key; None when there is none. Unknown keys in `legacy` are refused (a TypeError, as for any unknown argument).
    """
    legacy = dict(legacy)
    scheduler_values = {}
    for key, scheduler_key in LEGACY_SAMPLING_KEYS.items():
        if key in legacy:
            # One key per call: `deprecate` refuses whatever its `take_from` still holds after taking its own key.
            scheduler_values[scheduler_key] = deprecate(
                key, LEGACY_SAMPLING_REMOVAL,
                f"FlowMoModel no longer holds the decoder's time grid and guidance interval: they belong to the "
                f"FlowMoScheduler config (`{scheduler_key}`). This model decodes on the FlowMoScheduler it "
                "describes; save it in its FlowMoPipeline to keep it.",
                take_from={key: legacy.pop(key)},
            )
    if legacy:
        raise TypeError(f"FlowMoModel got unexpected keyword arguments {sorted(legacy)}")
    return FlowMoScheduler(**scheduler_values) if scheduler_values else None


def bits_per_pixel(config, resolution: int | None = None) -> float:
    """Bits of the token ids per image pixel: `code_length * context_dim / resolution**2`.

    The number of tokens does not depend on the image size, so the rate changes with `resolution` (FlowMo-Lo at its
    `sample_size` 256: 256 x 18 / 256**2 = 0.0703).

    Args:
        config (`FrozenDict` or any object with `code_length`, `context_dim` and `sample_size`):
            A [`FlowMoModel`] config.
        resolution (`int`, *optional*, defaults to `config.sample_size`):
            Image size the rate is counted at.

    Returns:
        `float`: Bits per pixel.
    """
    resolution = config.sample_size if resolution is None else resolution
    return config.code_length * config.context_dim / resolution**2
