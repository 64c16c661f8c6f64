"""FlowMoModel: the FlowMo diffusion autoencoder (encoder, lookup-free quantizer, velocity decoder)."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..conversion.single_file import FromOriginalModelMixin
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.files import FollowUmaskSaveMixin
from ..utils.validation import check_float, check_floating_dtype, check_int, check_tensor, is_real, validate_config
from .configuration_flowmo import (
    CONFIG_RULES,
    LEGACY_SAMPLING_KEYS,
    bits_per_pixel,
    check_model_size,
    legacy_sampling_scheduler,
    split_legacy_sampling_keys,
)
from .decoding_flowmo import FlowMoDecodeOutput, FlowMoDecodingMixin
from .modeling_utils import StrictLoadingMixin
from .quantizer import LFQOutput, LookupFreeQuantizer
from .tiling import BLEND_MODES, TileGrid, split_into_tiles
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


class FlowMoModel(
    FlowMoDecodingMixin, StrictLoadingMixin, FollowUmaskSaveMixin, ModelMixin, ConfigMixin, FromOriginalModelMixin
):
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
            *optional*, defaults to 1.5): the decoder's pass count and guidance default, used by [`decode`] and by
            the pipelines when the argument is not given: the paper's 25 steps and guidance 1.5 for a trained
            FlowMo; K steps without guidance for a K-pass student (`--stage distill`). The time grid and guidance
            interval are a [`FlowMoScheduler`]'s (see [`sampling_scheduler`] and
            `flowmo_diffusers.models.decoding_flowmo`); configs that still hold them as `sampling_time_schedule`,
            `sampling_time_power` and `sampling_guidance_interval` load with a FutureWarning and decode on the
            FlowMoScheduler they describe.
        distilled_from (`str`, *optional*): the teacher a distilled student decoder was trained to reproduce.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlowMoBlock"]
    # `compile_repeated_blocks()` compiles each of these once and reuses the graph for every instance.
    _repeated_blocks = ["FlowMoBlock"]
    # Saved configs' sampler keys, moved to a FlowMoScheduler (diffusers hands these from a config to `__init__`).
    _deprecated_kwargs = list(LEGACY_SAMPLING_KEYS)

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
        distilled_from: str | None = None,
        **kwargs,
    ):
        super().__init__()
        # The legacy sampler keys first: an unknown argument is refused before anything else is checked.
        legacy_scheduler = legacy_sampling_scheduler(kwargs)
        values = dict(locals())
        validate_config(type(self).__name__, values, CONFIG_RULES)
        check_model_size(type(self).__name__, values)
        if context_dim % bits_per_subtoken != 0:
            raise ValueError(f"context_dim {context_dim} is not a multiple of bits_per_subtoken {bits_per_subtoken}")
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        # JSON has no tuples: register the axes the way a saved config comes back (lists), so save_pretrained /
        # from_pretrained round-trip to an equal config whatever was passed.
        self.register_to_config(encoder_axes_dim=list(encoder_axes_dim), decoder_axes_dim=list(decoder_axes_dim))
        self.set_sampling_scheduler(FlowMoScheduler() if legacy_scheduler is None else legacy_scheduler)
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

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # A saved config's legacy sampler keys go to `__init__` (through `_deprecated_kwargs`) rather than being
        # reported as ignored and kept as hidden config entries that nothing reads.
        config_dict, legacy = split_legacy_sampling_keys(dict(config_dict))
        init_dict, unused_kwargs, hidden_dict = super().extract_init_dict(config_dict, **kwargs)
        return init_dict, {**unused_kwargs, **legacy}, hidden_dict

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

    def check_tiled_images(self, images: torch.Tensor) -> TileGrid:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != self.config.in_channels:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor of shape (batch, {self.config.in_channels}, height, width), got {got}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        return self.tile_grid(*images.shape[-2:])

    def _tiled_encode(self, images: torch.Tensor, return_quantizer_losses: bool) -> FlowMoEncoderOutput:
        if return_quantizer_losses:
            raise ValueError("return_quantizer_losses is for training on whole images; call disable_tiling() first")
        grid = self.check_tiled_images(images)
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


# Decoding's output and the config's rate live in their own modules; this one, FlowMoModel's, names them too.
__all__ = [
    "FlowMoDecodeOutput",
    "FlowMoDecoderOutput",
    "FlowMoEncoderOutput",
    "FlowMoModel",
    "bits_per_pixel",
]
