"""The MMDiT stack shared by FlowMo's encoder and decoder."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from torch import nn

from ..utils.validation import check_int

try:
    from diffusers.models.attention_dispatch import dispatch_attention_fn
except ImportError:  # diffusers < 0.35
    dispatch_attention_fn = None

try:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
except ImportError:  # older diffusers keep it in embeddings
    from diffusers.models.embeddings import FluxPosEmbed


#: Weight dtypes under which the residual streams are kept in float32 ([`FlowMoTransformer.forward`]).
HALF_DTYPES = (torch.float16, torch.bfloat16)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B, (H/p) * (W/p), p * p * C)`, channel-last inside a patch as in the original."""
    batch_size, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch_size, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch_size, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of [`patchify`]: `(B, N, p * p * C)` -> `(B, C, H, W)`."""
    batch_size = patches.shape[0]
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = patches.reshape(batch_size, grid_h, grid_w, patch_size, patch_size, -1)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, -1, height, width)


class FlowMoStream(nn.Module):
    r"""
    One stream (code tokens or image patches) of a double-stream block.

    Parameters:
        dim (`int`): hidden size.
        num_heads (`int`): attention heads.
        mlp_ratio (`float`): MLP hidden size over `dim`.
        qkv_bias (`bool`): bias on the qkv projection.
        modulated (`bool`): adaLN modulation from the timestep embedding (decoder). Without it the modulation is the
            identity (encoder).
        attention_only (`bool`): the stream's output is discarded after this block (the last block's unused stream),
            so only its attention inputs are built: no output projection, no MLP.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, modulated: bool, attention_only: bool = False
    ):
        super().__init__()
        head_dim = dim // num_heads
        self.num_heads = num_heads
        # Kept at 6 * dim even when attention_only, so the weight (and its norm, which training re-fixes every step)
        # is the original's.
        self.modulation = nn.Linear(dim, 6 * dim) if modulated else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm_q = RMSNorm(head_dim, eps=1e-6)
        self.norm_k = RMSNorm(head_dim, eps=1e-6)
        self.attention_only = attention_only
        if not attention_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def modulation_params(self, temb: torch.Tensor | None):
        """shift1, scale1, gate1, shift2, scale2, gate2, each `(B, 1, dim)`; None without modulation."""
        if self.modulation is None:
            return None
        return self.modulation(F.silu(temb))[:, None, :].chunk(6, dim=-1)

    def attention_inputs(self, hidden_states: torch.Tensor, mod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape `(B, S, heads, head_dim)`, q and k RMS-normalized."""
        normed = self.norm1(hidden_states)
        if mod is not None:
            shift, scale = mod[0], mod[1]
            normed = (1 + scale) * normed + shift
        batch_size, seq_len, _ = hidden_states.shape
        # The residual stream may be float32 under half-precision weights (see `FlowMoTransformer.forward`); the
        # projection runs in the weights' dtype. A no-op in float32 and under autocast (float32 weights).
        normed = normed.to(self.qkv.weight.dtype)
        query, key, value = self.qkv(normed).view(batch_size, seq_len, 3, self.num_heads, -1).unbind(2)
        # RMSNorm runs in float32; the original casts back to v's dtype before attention.
        return self.norm_q(query).to(value.dtype), self.norm_k(key).to(value.dtype), value

    def residual_update(self, hidden_states: torch.Tensor, attention_output: torch.Tensor, mod) -> torch.Tensor:
        """`hidden_states + gate1 * proj(attention) + gate2 * ff(...)`, `(B, S, dim)`, in `hidden_states`' dtype.

        The sums and gates are computed in the residual stream's dtype (float32 under half-precision weights), the
        projections in the weights' dtype, so a stream that outgrows float16 is never stored in float16.
        """
        compute_dtype = self.proj.weight.dtype
        stream_dtype = hidden_states.dtype
        if mod is None:
            hidden_states = hidden_states + self.proj(attention_output).to(stream_dtype)
            return hidden_states + self.ff(self.norm2(hidden_states).to(compute_dtype)).to(stream_dtype)
        _, _, gate1, shift2, scale2, gate2 = mod
        hidden_states = hidden_states + gate1.to(stream_dtype) * self.proj(attention_output).to(stream_dtype)
        normed = ((1 + scale2) * self.norm2(hidden_states) + shift2).to(compute_dtype)
        return hidden_states + gate2.to(stream_dtype) * self.ff(normed).to(stream_dtype)


class FlowMoBlock(nn.Module):
    r"""
    Double-stream MMDiT block: separate weights for code tokens and image patches, joint attention over the
    sequence `[code, image]`.

    Parameters:
        dim (`int`), num_heads (`int`), mlp_ratio (`float`), qkv_bias (`bool`), modulated (`bool`): see
            [`FlowMoStream`].
        attention_scale (`float`): softmax scale (FlowMo uses muP's `8 / head_dim`).
        code_output (`bool`), image_output (`bool`): whether the code / image stream is read after this block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        modulated: bool,
        attention_scale: float,
        code_output: bool = True,
        image_output: bool = True,
    ):
        super().__init__()
        self.attention_scale = attention_scale
        self.code_stream = FlowMoStream(dim, num_heads, mlp_ratio, qkv_bias, modulated, attention_only=not code_output)
        self.image_stream = FlowMoStream(dim, num_heads, mlp_ratio, qkv_bias, modulated, attention_only=not image_output)

    def forward(
        self,
        code_states: torch.Tensor,
        image_states: torch.Tensor,
        temb: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """
        Args:
            code_states (`torch.Tensor` of shape `(B, T, dim)`), image_states (`torch.Tensor` of shape `(B, N, dim)`).
            temb (`torch.Tensor` of shape `(B, dim)` or None): timestep embedding.
            rotary_emb (`Tuple[torch.Tensor, torch.Tensor]`):
                cos and sin tables, each `(T + N, head_dim)`.

        Returns:
            The updated `(code_states, image_states)`; a stream built `attention_only` returns None.
        """
        code_mod = self.code_stream.modulation_params(temb)
        image_mod = self.image_stream.modulation_params(temb)
        code_q, code_k, code_v = self.code_stream.attention_inputs(code_states, code_mod)
        image_q, image_k, image_v = self.image_stream.attention_inputs(image_states, image_mod)

        query = apply_rotary_emb(torch.cat([code_q, image_q], dim=1), rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(torch.cat([code_k, image_k], dim=1), rotary_emb, sequence_dim=1)
        value = torch.cat([code_v, image_v], dim=1)
        attention_output = joint_attention(query, key, value, self.attention_scale).flatten(2)

        code_length = code_states.shape[1]
        code_out = image_out = None
        if not self.code_stream.attention_only:
            code_out = self.code_stream.residual_update(code_states, attention_output[:, :code_length], code_mod)
        if not self.image_stream.attention_only:
            image_out = self.image_stream.residual_update(image_states, attention_output[:, code_length:], image_mod)
        return code_out, image_out


def joint_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention on `(B, S, heads, head_dim)` tensors through diffusers' attention dispatcher."""
    if dispatch_attention_fn is not None:
        return dispatch_attention_fn(query, key, value, scale=scale)
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


class FlowMoTransformer(nn.Module):
    r"""
    FlowMo's encoder or decoder: an MMDiT over code tokens and image patches.

    The encoder (`timestep_conditioned=False, output="code"`) starts its code stream from one learned vector
    (the original feeds zeros through a linear layer, which leaves only its bias), has no modulation and returns
    the code. The decoder (`timestep_conditioned=True, output="image"`) embeds the given code, is modulated by the
    flow time and returns the velocity image patches.

    Parameters:
        hidden_size (`int`), num_heads (`int`), depth (`int`): transformer size.
        axes_dim (`Sequence[int]`): RoPE channels per position axis (code index / row, row, column); sums to
            `hidden_size // num_heads`.
        patch_dim (`int`): features of one patch, `patch_size**2 * channels`.
        code_dim (`int`): channels of a code token (decoder input) or of the predicted code (encoder output).
        output (`str`): `"code"` or `"image"`.
        timestep_conditioned (`bool`): modulate by the flow time.
        mlp_ratio (`float`), qkv_bias (`bool`), rope_theta (`int`), attention_scale (`float`),
        timestep_embedding_dim (`int`): see [`FlowMoModel`].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        depth: int,
        axes_dim: Sequence[int],
        patch_dim: int,
        code_dim: int,
        output: str,
        timestep_conditioned: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        rope_theta: int = 10_000,
        attention_scale: float | None = None,
        timestep_embedding_dim: int = 256,
    ):
        super().__init__()
        if output not in ("code", "image"):
            raise ValueError(f"output must be 'code' or 'image', got {output!r}")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads
        if sum(axes_dim) != head_dim or any(d % 2 for d in axes_dim) or len(axes_dim) != 3:
            raise ValueError(f"axes_dim {list(axes_dim)} must be 3 even numbers summing to head_dim {head_dim}")
        check_int("depth", depth, 1)
        self.output = output
        self.timestep_conditioned = timestep_conditioned
        self.timestep_embedding_dim = timestep_embedding_dim
        attention_scale = attention_scale if attention_scale is not None else head_dim**-0.5

        self.pos_embed = FluxPosEmbed(theta=rope_theta, axes_dim=list(axes_dim))
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        if output == "image":
            self.code_embed = nn.Linear(code_dim, hidden_size)
        else:
            self.code_query = nn.Parameter(torch.zeros(hidden_size))
        if timestep_conditioned:
            # The original scales t in [0, 1] by 1000 and orders the sinusoids [cos, sin].
            self.time_proj = Timesteps(timestep_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embed = TimestepEmbedding(timestep_embedding_dim, hidden_size)

        self.blocks = nn.ModuleList(
            [
                FlowMoBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    modulated=timestep_conditioned,
                    attention_scale=attention_scale,
                    code_output=not (index == depth - 1 and output == "image"),
                    image_output=not (index == depth - 1 and output == "code"),
                )
                for index in range(depth)
            ]
        )
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if timestep_conditioned:
            self.norm_out_modulation = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj_out = nn.Linear(hidden_size, code_dim if output == "code" else patch_dim)
        self.gradient_checkpointing = False

    def rotary_embedding(
        self, code_length: int, grid_height: int, grid_width: int, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        RoPE tables for the sequence `[code, image]`: code token i sits at (i, i, i), patch (r, c) at (0, r, c).

        Returns cos and sin, each `(code_length + grid_height * grid_width, head_dim)` in float32.
        """
        code_ids = torch.arange(code_length, device=device, dtype=torch.float32)[:, None].expand(-1, 3)
        rows = torch.arange(grid_height, device=device, dtype=torch.float32)
        cols = torch.arange(grid_width, device=device, dtype=torch.float32)
        grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
        image_ids = torch.stack([torch.zeros_like(grid_rows), grid_rows, grid_cols], dim=-1).reshape(-1, 3)
        return self.pos_embed(torch.cat([code_ids, image_ids], dim=0))

    def timestep_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(B,)` flow times in [0, 1] -> `(B, hidden_size)`."""
        features = self.time_proj(timestep.float() * 1000).to(dtype)
        return self.time_embed(features)

    def forward(
        self,
        patches: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        code: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            patches (`torch.Tensor` of shape `(B, N, patch_dim)`): patchified image (clean for the encoder, noisy for
                the decoder).
            rotary_emb (`Tuple[torch.Tensor, torch.Tensor]`):
                tables from [`rotary_embedding`].
            code (`torch.Tensor` of shape `(B, T, code_dim)`): decoder only, the conditioning code.
            timestep (`torch.Tensor` of shape `(B,)`): decoder only, flow time in [0, 1] (1 is pure noise).

        Returns:
            `(B, T, code_dim)` code for the encoder, `(B, N, patch_dim)` velocity patches for the decoder.
        """
        compute_dtype = self.patch_embed.weight.dtype
        image_states = self.patch_embed(patches.to(compute_dtype))
        if self.output == "image":
            code_states = self.code_embed(code.to(compute_dtype))
        else:
            code_length = rotary_emb[0].shape[0] - patches.shape[1]
            code_states = self.code_query.to(image_states.dtype).expand(patches.shape[0], code_length, -1)
        temb = self.timestep_embedding(timestep, image_states.dtype) if self.timestep_conditioned else None
        if compute_dtype in HALF_DTYPES:
            # Half-precision weights: the residual streams stay float32. Every read of a stream goes through a
            # LayerNorm, which is scale-invariant, so a trained model may let a few channels grow past float16's
            # 65504 ("massive activations") at no cost in float32, and float16 would turn them into inf, then NaN.
            # Only the sums are float32; the projections and attention still run in half precision.
            image_states, code_states = image_states.float(), code_states.float()

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                code_states, image_states = self._gradient_checkpointing_func(
                    block, code_states, image_states, temb, rotary_emb
                )
            else:
                code_states, image_states = block(code_states, image_states, temb, rotary_emb)

        hidden_states = code_states if self.output == "code" else image_states
        if self.timestep_conditioned:
            shift, scale = self.norm_out_modulation(F.silu(temb)).chunk(2, dim=1)
            hidden_states = (1 + scale[:, None, :]) * self.norm_out(hidden_states) + shift[:, None, :]
        # The original normalizes again after the modulation; its released weights were trained with this.
        return self.proj_out(self.norm_out(hidden_states).to(compute_dtype))
