"""FlowMoModel: the FlowMo diffusion autoencoder (encoder, lookup-free quantizer, velocity decoder)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..conversion.single_file import FromOriginalModelMixin
from ..schedulers.flow_sampling import (
    count_decoder_passes,
    evaluation_flow_times,
    guidance_interval_mask,
    set_flow_timesteps,
)
from ..schedulers.scheduling_flowmo import TIME_SCHEDULES, FlowMoScheduler
from ..utils.files import FollowUmaskSaveMixin
from ..utils.validation import (
    BoolRule,
    FloatPairRule,
    FloatRule,
    IntRule,
    IntSequenceRule,
    OptionalRule,
    check_float,
    check_floating_dtype,
    check_int,
    check_optional_int,
    check_tensor,
    is_real,
    validate_config,
)
from .modeling_utils import MAX_GUIDANCE_SCALE, StrictLoadingMixin, check_decode_bounds
from .quantizer import LFQOutput, LookupFreeQuantizer
from .tiling import BLEND_MODES, TileGrid, blend_tiles, split_into_tiles
from .transformer_flowmo import FlowMoTransformer, patchify, unpatchify


@dataclass
class FlowMoEncoderOutput(BaseOutput):
    """
    Output of [`FlowMoModel.encode`].

    Args:
        code (`torch.Tensor` of shape `(batch_size, code_length, context_dim)`): quantized code in {-1, +1}.
        indices (`torch.LongTensor` of shape `(batch_size, num_indices)`): token ids in the original's order,
            `num_indices = code_length * context_dim // bits_per_subtoken`.
        unquantized_code (`torch.Tensor` of shape `(batch_size, code_length, context_dim)`): encoder output.
        quantizer (`LFQOutput`): the quantizer's full output, with its training losses when requested.
        tile_grid ([`~models.tiling.TileGrid`], *optional*): with tiling on ([`FlowMoModel.enable_tiling`]), the
            grid of tiles the image was cut into (`tile_grid.grid` is (rows, cols), `tile_grid.image_size` the image
            size); `code`, `indices` and `unquantized_code` then carry a tile axis after the batch axis,
            `(batch_size, num_tiles, ...)`, tiles row-major. None without tiling.
    """

    code: torch.Tensor
    indices: torch.LongTensor
    unquantized_code: torch.Tensor
    quantizer: LFQOutput
    tile_grid: TileGrid | None = None


@dataclass
class FlowMoDecoderOutput(BaseOutput):
    """
    Output of [`FlowMoModel.forward`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, 3, height, width)`): predicted velocity `noise - image`.
    """

    sample: torch.Tensor


@dataclass
class FlowMoDecodeOutput(BaseOutput):
    """
    Output of [`FlowMoModel.decode`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, 3, height, width)`): decoded images in [-1, 1], float32.
        num_decoder_passes (`int`): decoder evaluations per image that produced them (a guided evaluation counts
            two: code and null code). The paper's sampler takes 31.
    """

    sample: torch.Tensor
    num_decoder_passes: int


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
    "sampling_time_power": FloatRule(0.0, 100.0, exclusive_minimum=True),
    "sampling_guidance_interval": OptionalRule(FloatPairRule()),
}
#: A config describing a larger model is refused before allocation (FlowMo-Hi: about 0.9 billion parameters).
MAX_PARAMETERS = 50_000_000_000


def _estimated_parameters(values: dict) -> int:
    """Rough parameter count of a config (double-stream blocks: ~36 hidden^2 per block), to refuse absurd sizes."""
    total = 0
    for side in ("encoder", "decoder"):
        total += 36 * values[f"{side}_depth"] * values[f"{side}_hidden_size"] ** 2 * max(values["mlp_ratio"] / 4, 1)
    return int(total)


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


class FlowMoModel(StrictLoadingMixin, FollowUmaskSaveMixin, ModelMixin, ConfigMixin, FromOriginalModelMixin):
    r"""
    FlowMo (Sargent et al., 2025, "Flow to the Mode"): a transformer-only diffusion autoencoder. The encoder turns an
    image into `code_length` tokens of `context_dim` channels, the lookup-free quantizer binarizes them (token ids of
    `bits_per_subtoken` bits), and the decoder predicts the rectified-flow velocity of a noisy image given the code.

    Sizes are explicit (the original derives them from muP width multipliers); see `flowmo_diffusers.models.presets`.
    `FlowMoModel.from_single_file("flowmo_lo.pth", preset="flowmo-lo")` loads an original checkpoint (a path or a
    Hub file link) without a conversion step.

    Parameters:
        sample_size (`int`): training resolution (images may be any multiple of `patch_size`).
        in_channels (`int`): image channels.
        patch_size (`int`): side of a square patch.
        code_length (`int`): number of code tokens.
        context_dim (`int`): bits (channels) per code token.
        bits_per_subtoken (`int`): bits of one token id; each token splits into `context_dim // bits_per_subtoken`
            ids in `[0, 2**bits_per_subtoken)` (the original's `codebook_size_for_entropy`).
        encoder_hidden_size, encoder_num_heads, encoder_depth (`int`), encoder_axes_dim (`Sequence[int]`): encoder
            transformer size and RoPE channels per axis (code index / row, row, column).
        decoder_hidden_size, decoder_num_heads, decoder_depth (`int`), decoder_axes_dim (`Sequence[int]`): decoder
            likewise.
        mlp_ratio (`float`): MLP hidden size over hidden size.
        qkv_bias (`bool`): bias on the qkv projections.
        rope_theta (`int`): RoPE base.
        mup_attention_scale (`bool`): attention softmax scale `8 / head_dim` (muP, as trained) instead of
            `1 / sqrt(head_dim)`.
        timestep_embedding_dim (`int`): sinusoidal features of the flow time.
        entropy_temperature, entropy_loss_weight, commitment_loss_weight (`float`): quantizer training losses.
        sampling_num_inference_steps (`int`, *optional*, defaults to 25), sampling_guidance_scale (`float`,
            *optional*, defaults to 1.5), sampling_time_schedule (`str`, *optional*, defaults to `"power"`),
            sampling_time_power (`float`, *optional*, defaults to 4.0), sampling_guidance_interval
            (`Tuple[float, float]`, *optional*, defaults to `(0.17, 1.02)`): the decoder's own sampler, used by
            [`decode`] and by the pipeline when an argument is not given: the paper's (25 steps on t = (i/N)^4,
            guidance 1.5 within the EDM-sigma interval) for a trained FlowMo; K steps without guidance for a
            K-pass student (`--stage distill`). The grid and interval also apply to a diffusers scheduler swapped
            into the pipeline.
        distilled_from (`str`, *optional*): the teacher a distilled student decoder was trained to reproduce.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlowMoBlock"]
    # `compile_repeated_blocks()` compiles each of these once and reuses the graph for every instance.
    _repeated_blocks = ["FlowMoBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        in_channels: int = 3,
        patch_size: int = 4,
        code_length: int = 256,
        context_dim: int = 18,
        bits_per_subtoken: int = 9,
        encoder_hidden_size: int = 768,
        encoder_num_heads: int = 12,
        encoder_depth: int = 8,
        encoder_axes_dim: Sequence[int] = (8, 28, 28),
        decoder_hidden_size: int = 1152,
        decoder_num_heads: int = 12,
        decoder_depth: int = 16,
        decoder_axes_dim: Sequence[int] = (12, 42, 42),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rope_theta: int = 10_000,
        mup_attention_scale: bool = True,
        timestep_embedding_dim: int = 256,
        entropy_temperature: float = 0.1,
        entropy_loss_weight: float = 0.0025,
        commitment_loss_weight: float = 0.000625,
        sampling_num_inference_steps: int = 25,
        sampling_guidance_scale: float = 1.5,
        sampling_time_schedule: str = "power",
        sampling_time_power: float = 4.0,
        sampling_guidance_interval: tuple[float, float] | None = (0.17, 1.02),
        distilled_from: str | None = None,
    ):
        super().__init__()
        values = dict(locals())
        validate_config(type(self).__name__, values, CONFIG_RULES)
        if _estimated_parameters(values) > MAX_PARAMETERS:
            raise ValueError(
                f"{type(self).__name__} config: encoder/decoder depth and hidden sizes describe a model of about "
                f"{_estimated_parameters(values):.2e} parameters (more than {MAX_PARAMETERS:.0e}); check the config"
            )
        if sampling_time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"sampling_time_schedule must be one of {TIME_SCHEDULES}, got {sampling_time_schedule!r}")
        if context_dim % bits_per_subtoken != 0:
            raise ValueError(f"context_dim {context_dim} is not a multiple of bits_per_subtoken {bits_per_subtoken}")
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        # JSON has no tuples: register sequences the way a saved config comes back (axes as lists; the guidance
        # interval as a tuple of floats, like FlowMoScheduler's), so save_pretrained / from_pretrained round-trip to
        # an equal config whatever was passed.
        self.register_to_config(
            encoder_axes_dim=list(encoder_axes_dim),
            decoder_axes_dim=list(decoder_axes_dim),
            sampling_guidance_interval=None
            if sampling_guidance_interval is None
            else tuple(float(bound) for bound in sampling_guidance_interval),
        )
        patch_dim = in_channels * patch_size**2

        def attention_scale(hidden_size, num_heads):
            return 8.0 / (hidden_size // num_heads) if mup_attention_scale else None

        shared = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, rope_theta=rope_theta, patch_dim=patch_dim,
                      timestep_embedding_dim=timestep_embedding_dim)
        self.encoder = FlowMoTransformer(
            hidden_size=encoder_hidden_size,
            num_heads=encoder_num_heads,
            depth=encoder_depth,
            axes_dim=encoder_axes_dim,
            code_dim=context_dim,
            output="code",
            timestep_conditioned=False,
            attention_scale=attention_scale(encoder_hidden_size, encoder_num_heads),
            **shared,
        )
        # The decoder's code carries one extra "mask" channel: ones for a real code, zeros for the null code.
        self.decoder = FlowMoTransformer(
            hidden_size=decoder_hidden_size,
            num_heads=decoder_num_heads,
            depth=decoder_depth,
            axes_dim=decoder_axes_dim,
            code_dim=context_dim + 1,
            output="image",
            timestep_conditioned=True,
            attention_scale=attention_scale(decoder_hidden_size, decoder_num_heads),
            **shared,
        )
        self.quantizer = LookupFreeQuantizer(
            bits_per_subtoken,
            entropy_temperature=entropy_temperature,
            entropy_loss_weight=entropy_loss_weight,
            commitment_loss_weight=commitment_loss_weight,
        )
        self.use_tiling = False
        self.tile_sample_min_size = sample_size
        self.tile_overlap_factor = 0.25
        self.tile_batch_size = 8
        self.tile_blend_mode = "linear"

    # ----------------------------------------------------------------------------------------------------------
    # Tiling (diffusers' `AutoencoderKL.enable_tiling` names); layout and blending live in `models/tiling.py`.
    def enable_tiling(
        self,
        tile_sample_min_size: int | None = None,
        tile_overlap_factor: float | None = None,
        tile_batch_size: int | None = None,
        blend_mode: str | None = None,
    ) -> None:
        """
        Encode and decode images of any size at least one tile large as a grid of overlapping tiles.

        Args:
            tile_sample_min_size (`int`, *optional*, defaults to `sample_size`): tile side, a multiple of
                `patch_size` (the model was trained at `sample_size`).
            tile_overlap_factor (`float`, *optional*, defaults to 0.25): overlap of neighbouring tiles as a fraction
                of the tile, in [0, 0.5].
            tile_batch_size (`int`, *optional*, defaults to 8): tiles encoded or decoded at once; bounds memory by
                the tile, not the image.
            blend_mode (`str`, *optional*, defaults to `"linear"`): ramp across overlaps, `"linear"` or `"cosine"`.
        """
        size = self.tile_sample_min_size if tile_sample_min_size is None else tile_sample_min_size
        factor = self.tile_overlap_factor if tile_overlap_factor is None else tile_overlap_factor
        batch = self.tile_batch_size if tile_batch_size is None else tile_batch_size
        mode = self.tile_blend_mode if blend_mode is None else blend_mode
        patch = self.config.patch_size
        if check_int("tile_sample_min_size", size, patch) % patch:
            raise ValueError(f"tile_sample_min_size must be a positive multiple of patch_size {patch}, got {size!r}")
        factor = check_float("tile_overlap_factor", factor, 0.0, 0.5)
        batch = check_int("tile_batch_size", batch, 1)
        if mode not in BLEND_MODES:
            raise ValueError(f"blend_mode must be one of {BLEND_MODES}, got {mode!r}")
        self.use_tiling = True
        self.tile_sample_min_size, self.tile_overlap_factor, self.tile_batch_size = int(size), factor, batch
        self.tile_blend_mode = mode

    def disable_tiling(self) -> None:
        """Encode and decode whole images again (the settings of [`enable_tiling`] are kept)."""
        self.use_tiling = False

    def tile_grid(self, height: int, width: int) -> TileGrid:
        """The [`~models.tiling.TileGrid`] an image of `height` x `width` is cut into with the current settings."""
        size = self.tile_sample_min_size
        return TileGrid(height, width, size, int(round(size * self.tile_overlap_factor)))

    def _check_tiled_images(self, images: torch.Tensor) -> TileGrid:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != self.config.in_channels:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape (batch, {self.config.in_channels}, height, width), got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        return self.tile_grid(*images.shape[-2:])

    def _tiled_encode(self, images: torch.Tensor, return_quantizer_losses: bool) -> FlowMoEncoderOutput:
        if return_quantizer_losses:
            raise ValueError("return_quantizer_losses is for training on whole images; call disable_tiling() first")
        grid = self._check_tiled_images(images)
        tiles = split_into_tiles(images, grid)
        outputs = [self._encode(chunk) for chunk in tiles.split(self.tile_batch_size)]
        batch_size = images.shape[0]

        def joined(name):
            return torch.cat([getattr(output, name) for output in outputs]).unflatten(0, (batch_size, grid.num_tiles))

        code, indices, unquantized = joined("code"), joined("indices"), joined("unquantized_code")
        zero = code.new_zeros(())
        quantized = LFQOutput(quantized=code, indices=indices, loss=zero, entropy_loss=zero, per_sample_entropy=zero,
                              codebook_entropy=zero, commitment=zero)
        return FlowMoEncoderOutput(code=code, indices=indices, unquantized_code=unquantized, quantizer=quantized,
                                   tile_grid=grid)

    def _tiled_decode(self, code, height, width, latents, generator, step_callback, decode_kwargs) -> FlowMoDecodeOutput:
        if step_callback is not None:
            raise ValueError("step callbacks see one chunk of tiles at a time: call disable_tiling() to use them")
        sized = isinstance(latents, torch.Tensor) and latents.ndim == 4
        height = latents.shape[-2] if sized else (height or self.config.sample_size)
        width = latents.shape[-1] if sized else (width or self.config.sample_size)
        grid = self.tile_grid(height, width)
        if code.dtype.is_floating_point:
            expected = (grid.num_tiles, self.config.code_length, self.config.context_dim)
            if code.ndim != 4 or tuple(code.shape[1:]) != expected:
                raise ValueError(
                    f"with tiling, code must have shape (batch, {', '.join(map(str, expected))}) for a {height}x{width} "
                    f"image ({grid.grid[0]}x{grid.grid[1]} tiles), got {tuple(code.shape)}; pass the height and width "
                    "the image was encoded at"
                )
        elif code.ndim != 3 or tuple(code.shape[1:]) != (grid.num_tiles, self.num_indices):
            raise ValueError(
                f"with tiling, indices must have shape (batch, {grid.num_tiles}, {self.num_indices}) for a "
                f"{height}x{width} image ({grid.grid[0]}x{grid.grid[1]} tiles), got {tuple(code.shape)}; pass the "
                "height and width the image was encoded at"
            )
        code = self.indices_to_code(code, dtype=self.dtype) if not code.dtype.is_floating_point else code.to(self.dtype)
        batch_size, device = code.shape[0], code.device
        if latents is None:
            # One noise image, cut like the image: overlapping tiles start from the same noise where they overlap.
            shape = (batch_size, self.config.in_channels, height, width)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            self._check_tiled_images(latents)
            if latents.shape[0] != batch_size:
                raise ValueError(f"latents hold {latents.shape[0]} samples for a batch of {batch_size} codes")
        noise_tiles = split_into_tiles(latents.to(device=device, dtype=torch.float32), grid)
        code_tiles = code.flatten(0, 1)
        decoded, passes = [], 0
        for start in range(0, code_tiles.shape[0], self.tile_batch_size):
            stop = start + self.tile_batch_size
            output = self._decode(code_tiles[start:stop], latents=noise_tiles[start:stop], **decode_kwargs)
            decoded.append(output.sample)
            passes = output.num_decoder_passes
        images = blend_tiles(torch.cat(decoded), grid, self.tile_blend_mode).clamp(-1, 1)
        return FlowMoDecodeOutput(sample=images, num_decoder_passes=passes)

    # ----------------------------------------------------------------------------------------------------------
    # Sizes
    @property
    def subtokens_per_token(self) -> int:
        return self.config.context_dim // self.config.bits_per_subtoken

    @property
    def num_indices(self) -> int:
        """Token ids per image."""
        return self.config.code_length * self.subtokens_per_token

    @property
    def codebook_size(self) -> int:
        """Number of distinct values of one token id."""
        return 2**self.config.bits_per_subtoken

    @property
    def bits_per_pixel(self) -> float:
        """Bits of the code per pixel at `sample_size` ([`bits_per_pixel`])."""
        return bits_per_pixel(self.config)

    # ----------------------------------------------------------------------------------------------------------
    # Input checks: a clear error here beats a shape error deep inside attention. They read shapes and dtypes only,
    # never tensor values, so that encode and forward never wait on the device; values (NaN, range) are checked at
    # the pipeline boundary.
    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        """Raise ValueError unless `images` is a float tensor `(B, in_channels, H, W)`, H and W multiples of the
        patch size."""
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, channels, height, width), got {tuple(images.shape)}")
        if images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"{name} must have {self.config.in_channels} channels, got {images.shape[1]} (shape "
                f"{tuple(images.shape)})"
            )
        height, width = images.shape[-2:]
        patch = self.config.patch_size
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(f"{name} height and width must be positive multiples of patch_size {patch}, got {height}x{width}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")

    def check_indices(self, indices: torch.Tensor) -> None:
        """Raise ValueError unless `indices` is an integer tensor `(B, num_indices)` of valid ids."""
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor (int64), got dtype {indices.dtype}")
        if indices.ndim != 2 or indices.shape[1] != self.num_indices:
            raise ValueError(
                f"indices must have shape (batch, {self.num_indices}) for this model "
                f"({self.config.code_length} tokens x {self.subtokens_per_token} ids), got {tuple(indices.shape)}"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"token ids must lie in [0, {self.codebook_size}), got range [{int(indices.min())}, {int(indices.max())}]"
            )

    # ----------------------------------------------------------------------------------------------------------
    def encode(
        self, images: torch.Tensor, return_dict: bool = True, return_quantizer_losses: bool = False
    ) -> FlowMoEncoderOutput | tuple:
        """
        Encode and quantize images.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): images in [-1, 1], H and W multiples of `patch_size`.
                Values are not checked here (that would wait on the device); [`FlowMoPipeline`] checks them.
            return_quantizer_losses (`bool`): also compute the entropy and commitment losses (training).

        Returns:
            [`FlowMoEncoderOutput`] with `code` `(B, code_length, context_dim)` and `indices` `(B, num_indices)`; with
            tiling on ([`enable_tiling`]), images of any size at least one tile large, and `code` `(B, num_tiles,
            code_length, context_dim)`, `indices` `(B, num_tiles, num_indices)` and `tile_grid` set.
        """
        if self.use_tiling:
            output = self._tiled_encode(images, return_quantizer_losses)
        else:
            output = self._encode(images, return_quantizer_losses)
        return output if return_dict else output.to_tuple()

    def _encode(self, images: torch.Tensor, return_quantizer_losses: bool = False) -> FlowMoEncoderOutput:
        self.check_images(images)
        check_floating_dtype("images", images, self.dtype)
        height, width = images.shape[-2:]
        patch = self.config.patch_size
        rotary_emb = self.encoder.rotary_embedding(self.config.code_length, height // patch, width // patch, images.device)
        unquantized = self.encoder(patchify(images, patch), rotary_emb)
        quantized = self.quantizer(unquantized, return_losses=return_quantizer_losses)
        return FlowMoEncoderOutput(
            code=quantized.quantized, indices=quantized.indices, unquantized_code=unquantized, quantizer=quantized
        )

    def indices_to_code(self, indices: torch.LongTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Token ids `(B, num_indices)` -> quantized code `(B, code_length, context_dim)` (exact inverse of encode);
        tiled ids `(B, num_tiles, num_indices)` -> `(B, num_tiles, code_length, context_dim)`."""
        if isinstance(indices, torch.Tensor) and indices.ndim == 3:
            return self.indices_to_code(indices.flatten(0, 1), dtype=dtype).unflatten(0, indices.shape[:2])
        self.check_indices(indices)
        return self.quantizer.indices_to_code(indices.long(), self.config.code_length, dtype=dtype)

    def decoder_rotary_embedding(self, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the decoder for images of `height` x `width`; compute once and pass to `forward`."""
        patch = self.config.patch_size
        return self.decoder.rotary_embedding(self.config.code_length, height // patch, width // patch, device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        code: torch.Tensor,
        code_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> FlowMoDecoderOutput | tuple:
        """
        Predict the velocity `noise - image` of a noisy image.

        Args:
            sample (`torch.Tensor` of shape `(B, 3, H, W)`): `z_t = (1 - t) * image + t * noise`.
            timestep (`torch.Tensor` of shape `(B,)` or a float): flow time t in [0, 1]; 1 is pure noise.
            code (`torch.Tensor` of shape `(B, code_length, context_dim)`): quantized code.
            code_mask (`torch.Tensor` of shape `(B,)`, *optional*): 1 keeps a sample's code, 0 replaces it by the null
                code (all zeros, mask channel included) used for guidance. Default: all ones.
            rotary_emb (`Tuple[torch.Tensor, torch.Tensor]`, *optional*):
                precomputed [`decoder_rotary_embedding`] tables; computed here when None.

        Returns:
            [`FlowMoDecoderOutput`] whose `sample` is the velocity, same shape as `sample`.
        """
        self.check_images(sample, "sample")
        if not isinstance(timestep, torch.Tensor) and not (is_real(timestep) and 0.0 <= float(timestep) <= 1.0):
            # A Python scalar costs nothing to check; tensor values are the pipeline's to check (no device read).
            raise ValueError(f"timestep must be a flow time in [0, 1] (1 is pure noise) or a tensor, got {timestep!r}")
        batch_size = sample.shape[0]
        check_tensor("code", code, (batch_size, self.config.code_length, self.config.context_dim))
        if code_mask is not None:
            check_tensor("code_mask", code_mask, (batch_size,))
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        if timestep.shape != (batch_size,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch_size},), got {tuple(timestep.shape)}")
        height, width = sample.shape[-2:]
        if rotary_emb is None:
            rotary_emb = self.decoder_rotary_embedding(height, width, sample.device)
        else:
            self._check_rotary_emb(rotary_emb, height, width)

        condition = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
        if code_mask is not None:
            condition = condition * code_mask.to(condition.dtype).reshape(batch_size, 1, 1)
        velocity = self.decoder(patchify(sample, self.config.patch_size), rotary_emb, code=condition, timestep=timestep)
        velocity = unpatchify(velocity, self.config.patch_size, height, width)
        return FlowMoDecoderOutput(sample=velocity) if return_dict else (velocity,)

    def _check_rotary_emb(self, rotary_emb, height: int, width: int) -> None:
        patch = self.config.patch_size
        expected = (self.config.code_length + (height // patch) * (width // patch), sum(self.config.decoder_axes_dim))
        if (
            not isinstance(rotary_emb, (tuple, list))
            or len(rotary_emb) != 2
            or not all(isinstance(table, torch.Tensor) and tuple(table.shape) == expected for table in rotary_emb)
        ):
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in rotary_emb] if isinstance(
                rotary_emb, (tuple, list)
            ) else type(rotary_emb).__name__
            raise ValueError(
                f"rotary_emb must be the (cos, sin) pair from decoder_rotary_embedding({height}, {width}), each of "
                f"shape {expected}; got {got}"
            )

    # ----------------------------------------------------------------------------------------------------------
    # Sampling
    def sampling_scheduler(self) -> FlowMoScheduler:
        """A [`FlowMoScheduler`] on this decoder's own grid and guidance interval (the `sampling_*` config)."""
        return FlowMoScheduler(
            time_schedule=self.config.sampling_time_schedule,
            time_power=self.config.sampling_time_power,
            guidance_interval=self.config.sampling_guidance_interval,
        )

    @torch.no_grad()
    def decode(
        self,
        code: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | Callable[[int], float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler=None,
        step_callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
        progress_bar: Callable | None = None,
        return_dict: bool = True,
        max_image_size: int | None = None,
        max_inference_steps: int | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> FlowMoDecodeOutput | tuple:
        """
        Decode codes or token ids into images by integrating the decoder's velocity from noise (t = 1) to t = 0.

        Like diffusers' `ConsistencyDecoderVAE.decode`, the model owns its sampler, so code that holds only the model
        can decode. The scalar arguments are checked here, once; [`FlowMoPipeline`], which checks them in its
        `check_inputs`, decodes through [`decode_unchecked`], the same sampler without that check.

        Args:
            code (`torch.Tensor`): quantized code `(B, code_length, context_dim)` (floating point) or token ids
                `(B, num_indices)` (integer), as from [`encode`].
            num_inference_steps (`int`, *optional*, defaults to `config.sampling_num_inference_steps`): solver steps.
            guidance_scale (`float` or `Callable[[int], float]`, *optional*, defaults to
                `config.sampling_guidance_scale`): classifier-free guidance on the code, `v_null + s (v_code -
                v_null)`, applied to each model evaluation whose flow time lies in the guidance interval; 1 disables
                it. A callable is read before every step as `guidance_scale(step_index)`, so the scale can change
                part-way (a pipeline's step-end callback setting `pipe._guidance_scale`); a step whose scale is 1
                takes one decoder pass instead of two.
            generator (`torch.Generator` or a list of one per sample, *optional*): source of the initial noise.
            latents (`torch.Tensor` of shape `(B, 3, H, W)`, *optional*): initial noise; drawn when None.
            height (`int`, *optional*), width (`int`, *optional*): output size (default `sample_size`); ignored when
                `latents` is given.
            scheduler (`SchedulerMixin`, *optional*):
                the solver: [`FlowMoScheduler`] (default: [`sampling_scheduler`]) or a diffusers
                flow-matching scheduler (see `flowmo_diffusers.schedulers.flow_sampling`), which then runs on this
                decoder's grid where it accepts one, with this decoder's guidance interval.
            step_callback (`Callable`, *optional*): `f(step_index, timestep, latents)` after every solver step; a
                tensor it returns replaces the latents.
            progress_bar (`Callable`, *optional*): wraps the iterable of timesteps (e.g. a pipeline's `progress_bar`).
            interrupt (`Callable[[], bool]`, *optional*): read before every step; once it returns True, sampling stops
                and the current latents are the result (diffusers' `pipe._interrupt`). `num_decoder_passes` then
                counts the passes that ran.
            max_image_size (`int`, *optional*, defaults to 4 x `sample_size`), max_inference_steps (`int`,
                *optional*, defaults to 1000): bounds of the output size and of `num_inference_steps`, checked before
                anything is allocated.

                With tiling on ([`enable_tiling`]), `code` holds one code per tile, `(B, num_tiles, code_length,
                context_dim)` or ids `(B, num_tiles, num_indices)` as from a tiled [`encode`], `height` and `width`
                are the image size it was encoded at (the grid follows from them), `latents` is one noise image
                `(B, 3, H, W)`; tiles are decoded `tile_batch_size` at a time and blended.

        Returns:
            [`FlowMoDecodeOutput`] with `sample` `(B, 3, H, W)` in [-1, 1] and `num_decoder_passes`.
        """
        if self.use_tiling:
            # The decoder sees one tile at a time: the tile's size is what the bounds guard (memory of attention).
            sizes = (self.tile_sample_min_size, self.tile_sample_min_size)
            check_optional_int("height", height, 1), check_optional_int("width", width, 1)
        elif isinstance(latents, torch.Tensor) and latents.ndim == 4:  # the latents give the size when passed
            sizes = tuple(latents.shape[-2:])
        else:
            sizes = (height, width)
        if callable(guidance_scale):
            first_scale = guidance_scale(0)
        else:
            first_scale = self.config.sampling_guidance_scale if guidance_scale is None else guidance_scale
        check_decode_bounds(
            self.config.sample_size, *sizes,
            self.config.sampling_num_inference_steps if num_inference_steps is None else num_inference_steps,
            first_scale, max_image_size, max_inference_steps,
        )
        return self.decode_unchecked(
            code, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
            latents=latents, height=height, width=width, scheduler=scheduler, step_callback=step_callback,
            progress_bar=progress_bar, return_dict=return_dict, interrupt=interrupt,
        )

    @torch.no_grad()
    def decode_unchecked(
        self,
        code: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | Callable[[int], float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler=None,
        step_callback: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
        progress_bar: Callable | None = None,
        return_dict: bool = True,
        interrupt: Callable[[], bool] | None = None,
    ) -> FlowMoDecodeOutput | tuple:
        """[`decode`] without its checks of the Python scalars (sizes, step count, guidance scale and their bounds),
        for a caller that checked them once where they entered, as [`FlowMoPipeline.check_inputs`] does. Tensor
        shapes are still checked (they read no device value), and so is a guidance scale that changes after the
        first step (a step-end callback's). Same arguments and output as [`decode`], less the bounds."""
        decode_kwargs = dict(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, scheduler=scheduler,
            progress_bar=progress_bar, interrupt=interrupt,
        )
        if self.use_tiling:
            output = self._tiled_decode(code, height, width, latents, generator, step_callback, decode_kwargs)
        else:
            output = self._decode(code, generator=generator, latents=latents, height=height, width=width,
                                  step_callback=step_callback, **decode_kwargs)
        return output if return_dict else output.to_tuple()

    def _decode(
        self,
        code: torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float | Callable[[int], float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler=None,
        step_callback: Callable | None = None,
        progress_bar: Callable | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> FlowMoDecodeOutput:
        """[`decode_unchecked`] of whole images (no tiling)."""
        if code.dtype.is_floating_point:
            expected = (self.config.code_length, self.config.context_dim)
            if code.ndim != 3 or tuple(code.shape[1:]) != expected:
                raise ValueError(f"code must have shape (batch, {expected[0]}, {expected[1]}), got {tuple(code.shape)}")
            code = code.to(self.dtype)
        else:
            code = self.indices_to_code(code, dtype=self.dtype)
        config = self.config
        num_inference_steps = config.sampling_num_inference_steps if num_inference_steps is None else num_inference_steps
        if callable(guidance_scale):
            guidance_at = guidance_scale
        else:
            fixed_scale = config.sampling_guidance_scale if guidance_scale is None else guidance_scale
            guidance_at = lambda step_index: fixed_scale  # noqa: E731
        scheduler = self.sampling_scheduler() if scheduler is None else scheduler
        batch_size, device = code.shape[0], code.device

        if latents is None:
            height = height or config.sample_size
            width = width or config.sample_size
            shape = (batch_size, config.in_channels, height, width)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            self.check_images(latents, "latents")
            if latents.shape[0] != batch_size:
                raise ValueError(f"latents hold {latents.shape[0]} samples for a batch of {batch_size} codes")
            latents = latents.to(device=device, dtype=torch.float32)
        height, width = latents.shape[-2:]
        patch = config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"height and width must be multiples of patch_size {patch}, got {height}x{width}")

        set_flow_timesteps(scheduler, num_inference_steps, config.sampling_time_schedule, config.sampling_time_power)
        # Start at step 0 without the scheduler looking the first timestep up (a device read).
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        interval = (
            scheduler.config.guidance_interval if isinstance(scheduler, FlowMoScheduler) else config.sampling_guidance_interval
        )
        # Guidance decisions come from the grid, read once here, and host scalars, so the loop never waits on the device.
        inside_interval = guidance_interval_mask(evaluation_flow_times(scheduler), interval)
        flow_times = scheduler.sigmas.to(device=device, dtype=torch.float32)
        # RoPE tables depend only on the image size: build them once, not once per step.
        rotary_emb = self.decoder_rotary_embedding(height, width, device)
        keep_and_drop = torch.cat([torch.ones(batch_size, device=device), torch.zeros(batch_size, device=device)])
        double_code = None
        guided_steps = []

        timesteps = scheduler.timesteps
        for index, timestep in enumerate(progress_bar(timesteps) if progress_bar is not None else timesteps):
            if interrupt is not None and interrupt():
                break
            # Read per step: a step-end callback may have changed it. The first step's is the argument, checked where
            # it entered ([`decode`], a pipeline's `check_inputs`); a later one enters here.
            guidance_scale = guidance_at(index)
            if index:
                guidance_scale = check_float("guidance_scale", guidance_scale, -MAX_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE)
            guided = inside_interval[index] and guidance_scale != 1.0
            guided_steps.append(guided)
            model_input = latents.to(self.dtype)
            flow_time = flow_times[index]
            if guided:
                double_code = torch.cat([code, code]) if double_code is None else double_code
                # Code and null-code passes share one batched forward.
                velocity = self(
                    torch.cat([model_input, model_input]),
                    flow_time.expand(2 * batch_size),
                    double_code,
                    code_mask=keep_and_drop,
                    rotary_emb=rotary_emb,
                ).sample.float()
                velocity_code, velocity_null = velocity.chunk(2)
                velocity = velocity_null + guidance_scale * (velocity_code - velocity_null)
            else:
                velocity = self(model_input, flow_time.expand(batch_size), code, rotary_emb=rotary_emb).sample.float()
            # The state stays float32 whatever the decoder's dtype, as in the original.
            latents = scheduler.step(velocity, timestep, latents.float()).prev_sample.float()
            if step_callback is not None:
                replaced = step_callback(index, timestep, latents)
                if replaced is not None:
                    latents = replaced
        images = latents.clamp(-1, 1)
        return FlowMoDecodeOutput(sample=images, num_decoder_passes=count_decoder_passes(guided_steps))
