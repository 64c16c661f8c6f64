"""FlowMoModel: the FlowMo diffusion autoencoder (encoder, lookup-free quantizer, velocity decoder)."""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .quantizer import LFQOutput, LookupFreeQuantizer
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
    """

    code: torch.Tensor
    indices: torch.LongTensor
    unquantized_code: torch.Tensor
    quantizer: LFQOutput


@dataclass
class FlowMoDecoderOutput(BaseOutput):
    """
    Output of [`FlowMoModel.forward`].

    Args:
        sample (`torch.Tensor` of shape `(batch_size, 3, height, width)`): predicted velocity `noise - image`.
    """

    sample: torch.Tensor


class FlowMoModel(ModelMixin, ConfigMixin):
    r"""
    FlowMo (Sargent et al., 2025, "Flow to the Mode"): a transformer-only diffusion autoencoder. The encoder turns an
    image into `code_length` tokens of `context_dim` channels, the lookup-free quantizer binarizes them (token ids of
    `bits_per_subtoken` bits), and the decoder predicts the rectified-flow velocity of a noisy image given the code.

    Sizes are explicit (the original derives them from muP width multipliers); see `flowmo_diffusers.presets`.

    Parameters:
        sample_size (`int`): training resolution (images may be any multiple of `patch_size`).
        in_channels (`int`): image channels.
        patch_size (`int`): side of a square patch.
        code_length (`int`): number of code tokens.
        context_dim (`int`): bits (channels) per code token.
        bits_per_subtoken (`int`): bits of one token id; each token splits into `context_dim // bits_per_subtoken`
            ids in `[0, 2**bits_per_subtoken)` (the original's `codebook_size_for_entropy`).
        encoder_hidden_size, encoder_num_heads, encoder_depth, encoder_axes_dim: encoder transformer size and
            RoPE channels per axis (code index / row, row, column).
        decoder_hidden_size, decoder_num_heads, decoder_depth, decoder_axes_dim: decoder likewise.
        mlp_ratio (`float`): MLP hidden size over hidden size.
        qkv_bias (`bool`): bias on the qkv projections.
        rope_theta (`int`): RoPE base.
        mup_attention_scale (`bool`): attention softmax scale `8 / head_dim` (muP, as trained) instead of
            `1 / sqrt(head_dim)`.
        timestep_embedding_dim (`int`): sinusoidal features of the flow time.
        entropy_temperature, entropy_loss_weight, commitment_loss_weight (`float`): quantizer training losses.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["FlowMoBlock"]

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
    ):
        super().__init__()
        if context_dim % bits_per_subtoken != 0:
            raise ValueError(f"context_dim {context_dim} is not a multiple of bits_per_subtoken {bits_per_subtoken}")
        if sample_size % patch_size != 0:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        patch_dim = in_channels * patch_size**2

        def attention_scale(hidden_size, num_heads):
            return 8.0 / (hidden_size // num_heads) if mup_attention_scale else None

        shared = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            rope_theta=rope_theta,
            timestep_embedding_dim=timestep_embedding_dim,
            patch_dim=patch_dim,
        )
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
        """Bits of the code per pixel at `sample_size`."""
        return self.config.code_length * self.config.context_dim / self.config.sample_size**2

    # ----------------------------------------------------------------------------------------------------------
    # Input checks: a clear error here beats a shape error deep inside attention.
    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        """Raise ValueError unless `images` is a finite float tensor `(B, in_channels, H, W)` in [-1, 1]."""
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
        if not torch.isfinite(images).all():
            raise ValueError(f"{name} contains NaN or infinite values")

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
    ) -> Union[FlowMoEncoderOutput, Tuple]:
        """
        Encode and quantize images.

        Args:
            images (`torch.Tensor` of shape `(B, 3, H, W)`): images in [-1, 1], H and W multiples of `patch_size`.
            return_quantizer_losses (`bool`): also compute the entropy and commitment losses (training).

        Returns:
            [`FlowMoEncoderOutput`] with `code` `(B, code_length, context_dim)` and `indices` `(B, num_indices)`.
        """
        self.check_images(images)
        if images.min() < -1.001 or images.max() > 1.001:
            raise ValueError(
                f"images must lie in [-1, 1], got range [{float(images.min()):.3f}, {float(images.max()):.3f}]; "
                "the pipeline takes [0, 1] images and converts them"
            )
        height, width = images.shape[-2:]
        patch = self.config.patch_size
        rotary_emb = self.encoder.rotary_embedding(self.config.code_length, height // patch, width // patch, images.device)
        unquantized = self.encoder(patchify(images, patch), rotary_emb)
        quantized = self.quantizer(unquantized, return_losses=return_quantizer_losses)
        output = FlowMoEncoderOutput(
            code=quantized.quantized, indices=quantized.indices, unquantized_code=unquantized, quantizer=quantized
        )
        return output if return_dict else output.to_tuple()

    def indices_to_code(self, indices: torch.LongTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Token ids `(B, num_indices)` -> quantized code `(B, code_length, context_dim)` (exact inverse of encode)."""
        self.check_indices(indices)
        return self.quantizer.indices_to_code(indices.long(), self.config.code_length, dtype=dtype)

    def decoder_rotary_embedding(self, height: int, width: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of the decoder for images of `height` x `width`; compute once and pass to `forward`."""
        patch = self.config.patch_size
        return self.decoder.rotary_embedding(self.config.code_length, height // patch, width // patch, device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        code: torch.Tensor,
        code_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        return_dict: bool = True,
    ) -> Union[FlowMoDecoderOutput, Tuple]:
        """
        Predict the velocity `noise - image` of a noisy image.

        Args:
            sample (`torch.Tensor` of shape `(B, 3, H, W)`): `z_t = (1 - t) * image + t * noise`.
            timestep (`torch.Tensor` of shape `(B,)` or a float): flow time t in [0, 1]; 1 is pure noise.
            code (`torch.Tensor` of shape `(B, code_length, context_dim)`): quantized code.
            code_mask (`torch.Tensor` of shape `(B,)`, optional): 1 keeps a sample's code, 0 replaces it by the null
                code (all zeros, mask channel included) used for guidance. Default: all ones.
            rotary_emb: precomputed [`decoder_rotary_embedding`] tables; computed here when None.

        Returns:
            [`FlowMoDecoderOutput`] whose `sample` is the velocity, same shape as `sample`.
        """
        batch_size = sample.shape[0]
        expected_code = (batch_size, self.config.code_length, self.config.context_dim)
        if tuple(code.shape) != expected_code:
            raise ValueError(f"code must have shape {expected_code}, got {tuple(code.shape)}")
        timestep = torch.as_tensor(timestep, device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch_size)
        if timestep.shape != (batch_size,):
            raise ValueError(f"timestep must be a scalar or have shape ({batch_size},), got {tuple(timestep.shape)}")
        height, width = sample.shape[-2:]
        if rotary_emb is None:
            self.check_images(sample, "sample")
            rotary_emb = self.decoder_rotary_embedding(height, width, sample.device)

        condition = torch.cat([code, torch.ones_like(code[..., :1])], dim=-1)
        if code_mask is not None:
            condition = condition * code_mask.to(condition.dtype).reshape(batch_size, 1, 1)
        velocity = self.decoder(patchify(sample, self.config.patch_size), rotary_emb, code=condition, timestep=timestep)
        velocity = unpatchify(velocity, self.config.patch_size, height, width)
        return FlowMoDecoderOutput(sample=velocity) if return_dict else (velocity,)
