"""FlowMo's training losses: rectified-flow MSE, quantizer losses and the perceptual term of stage 1A (one-step
prediction, LPIPS-VGG) or stage 1B (k-step sample, ResNet-50 logits), and the stage-1B sampler.

Stage 1A ("mode matching"), per batch `x` in [-1, 1]:

    code = quantize(encode(x));  t ~ fat-lognormal;  eps ~ N(0, I);  z_t = (1 - t) x + t eps
    v = decode(z_t, t, code with 10% of the samples replaced by the null code)
    loss = mean ||v - (eps - x)||^2 + quantizer loss + w_p * LPIPS(x, z_t - t v)

Stage 1B ("mode seeking") keeps the flow and quantizer terms and takes the perceptual term (ResNet-50 logit MSE) on
a sample drawn with k Euler steps at random times, backpropagating through the whole chain
([`posttrain_sample`]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..models.autoencoder_flowmo import FlowMoModel
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.validation import check_int
from .recipe import guidance_dropout_mask

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_matching_loss(velocity: torch.Tensor, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-sample mean squared error between `velocity` and the target `noise - images`,
    computed in float32."""
    target = FlowMoScheduler.velocity_target(images.float(), noise.float())
    return (velocity.float() - target).pow(2).flatten(1).mean(dim=1).mean()


def sample_posttrain_times(
    batch_size: int, num_steps: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Per-sample random time grids `(batch_size, num_steps + 1)`, each running from exactly 1 down to exactly 0.

    As the original's post-training sampler: `num_steps + 1` uniform draws are cumulated, shifted to start at 0,
    normalised to end at 1 and reversed, so the `num_steps` step sizes are random (a sample's increments are the
    normalised uniforms 2 .. k+1).
    """
    num_steps = check_int("num_steps", num_steps, 1)
    times = torch.rand((batch_size, num_steps + 1), generator=generator, device=device).cumsum(dim=1)
    times = times - times[:, :1]
    return (times / times[:, -1:]).flip(dims=(1,))


def posttrain_sample(
    model: FlowMoModel,
    code: torch.Tensor,
    num_steps: int = 8,
    *,
    height: int | None = None,
    width: int | None = None,
    noise: torch.Tensor | None = None,
    times: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    gradient_checkpointing: bool = True,
) -> torch.Tensor:
    """Differentiable k-step Euler sample of the decoder given `code` (FlowMo's stage-1B sampler).

    From `noise` (drawn when None) at t = 1, `z <- z - (t_i - t_{i+1}) v(z, t_i, code)` over per-sample random times
    ([`sample_posttrain_times`], or `times` of shape `(B, num_steps + 1)` from 1 to 0). No guidance: every sample uses
    its code. Each decoder call is wrapped in `torch.utils.checkpoint` (non-reentrant) when `gradient_checkpointing`,
    so memory grows with one set of decoder inputs per step, not one set of activations; gradients reach the decoder
    and, through `code`, the encoder. `z` is kept in float32; run it under autocast for bf16 decoder calls.

    Returns:
        `(B, 3, H, W)` float32 sample, not clipped.
    """
    batch_size = code.shape[0]
    device = code.device
    if noise is None:
        height = height or model.config.sample_size
        width = width or model.config.sample_size
        noise = torch.randn((batch_size, model.config.in_channels, height, width), generator=generator, device=device)
    height, width = noise.shape[-2:]
    if times is None:
        times = sample_posttrain_times(batch_size, num_steps, generator=generator, device=device)
    if times.shape != (batch_size, num_steps + 1):
        raise ValueError(f"times must have shape {(batch_size, num_steps + 1)}, got {tuple(times.shape)}")
    if rotary_emb is None:
        rotary_emb = model.decoder_rotary_embedding(height, width, device)

    def velocity(z: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return model(z, t, c, rotary_emb=rotary_emb).sample

    sample = noise.float()
    for step in range(num_steps):
        t, dt = times[:, step], times[:, step] - times[:, step + 1]
        if gradient_checkpointing and torch.is_grad_enabled():
            v = torch.utils.checkpoint.checkpoint(velocity, sample, t, code, use_reentrant=False)
        else:
            v = velocity(sample, t, code)
        sample = sample - dt.reshape(-1, 1, 1, 1) * v.float()
    return sample


def flowmo_training_losses(
    model: FlowMoModel,
    images: torch.Tensor,
    scheduler: FlowMoScheduler,
    *,
    perceptual_loss: PerceptualLoss | None = None,
    perceptual_weight: float = 0.0,
    guidance_dropout: float = 0.1,
    posttrain_sample_steps: int | None = None,
    posttrain_gradient_checkpointing: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """All loss terms of one FlowMo training batch.

    Args:
        model (`FlowMoModel`):
            the autoencoder being trained.
        images (`torch.Tensor`):
            `(B, 3, H, W)` in [-1, 1].
        scheduler (`FlowMoScheduler`):
            provides the training-time distribution (`fat_lognormal` in the paper).
        perceptual_loss (`PerceptualLoss`, *optional*):
            `f(images, predictions) -> (B,)` distances (see `training.perceptual`); required when
            `perceptual_weight != 0`.
        perceptual_weight (`float`, *optional*, defaults to `0.0`):
            0.1 (stage 1A, LPIPS-VGG) or 0.01 (stage 1B, ResNet-50) in the paper.
        guidance_dropout (`float`, *optional*, defaults to `0.1`):
            share of samples whose code is replaced by the null code in the flow term.
        posttrain_sample_steps (`int`, *optional*):
            None for stage 1A (perceptual term on the one-step prediction `z_t - t v`); k for
            stage 1B (perceptual term on a k-step [`posttrain_sample`] from the full code).
        posttrain_gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            checkpoint each decoder call of the stage-1B sampler.
        generator (`torch.Generator`, *optional*):
            random source of times, noise and masks (the global RNG when None).

    Returns:
        dict with `loss` (the total, differentiable) and detached terms `flow_loss`, `quantizer_loss`,
        `entropy_loss`, `commitment_loss`, `perceptual_loss` (weighted; 0 when disabled), `perceptual_distance`
        (unweighted mean; only when computed).
    """
    if perceptual_weight != 0 and perceptual_loss is None:
        raise ValueError("perceptual_weight is non-zero but no perceptual_loss was given")
    batch_size = images.shape[0]
    device = images.device
    height, width = images.shape[-2:]

    encoded = model.encode(images, return_quantizer_losses=True)
    code = encoded.code
    rotary_emb = model.decoder_rotary_embedding(height, width, device)

    times = scheduler.sample_training_times(batch_size, generator=generator, device=device)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    noisy = scheduler.add_noise_at_times(images, noise, times)
    code_mask = guidance_dropout_mask(batch_size, guidance_dropout, generator=generator, device=device)
    velocity = model(noisy, times, code, code_mask=code_mask, rotary_emb=rotary_emb).sample

    flow = flow_matching_loss(velocity, images, noise)
    quantizer = encoded.quantizer
    total = flow + quantizer.loss
    terms: dict[str, torch.Tensor] = {}
    if perceptual_weight != 0:
        if posttrain_sample_steps is None:
            prediction = scheduler.predict_image(noisy, velocity, times)
        else:
            prediction = posttrain_sample(
                model,
                code,
                posttrain_sample_steps,
                height=height,
                width=width,
                generator=generator,
                rotary_emb=rotary_emb,
                gradient_checkpointing=posttrain_gradient_checkpointing,
            )
        distance = perceptual_loss(images, prediction).float().mean()
        perceptual = perceptual_weight * distance
        total = total + perceptual
        terms["perceptual_distance"] = distance.detach()
    else:
        perceptual = torch.zeros((), device=device)

    terms.update(
        loss=total,
        flow_loss=flow.detach(),
        quantizer_loss=quantizer.loss.detach(),
        entropy_loss=quantizer.entropy_loss.detach(),
        commitment_loss=quantizer.commitment.detach(),
        perceptual_loss=perceptual.detach(),
    )
    return terms


class AutoencoderLossModule(nn.Module):
    """A trained autoencoder and the options of the loss its `forward` computes, as one module to wrap (DDP, FSDP).

    The options are plain values (nothing to train or checkpoint), kept as the keyword arguments of the loss function.

    Args:
        autoencoder (`FlowMoModel`):
            the model to train, reachable as `.autoencoder`.
        loss_options (`Any`):
            keyword arguments passed to the loss function on every `forward`.
    """

    def __init__(self, autoencoder: FlowMoModel, **loss_options):
        super().__init__()
        self.autoencoder = autoencoder
        self.loss_options = loss_options


class FlowMoTrainingModule(AutoencoderLossModule):
    """`FlowMoModel` plus its loss, as one module whose `forward` runs encoder and decoder.

    Distributed wrappers (DDP, FSDP) only handle what happens inside `forward`; calling `model.encode` and
    `model(...)` on a wrapped model separately bypasses them. Wrap this module instead; the autoencoder stays
    reachable as `.autoencoder` (state-dict keys carry the `autoencoder.` prefix). The perceptual network is passed
    to `forward` rather than held, so that it is neither synchronised nor checkpointed with the trained weights.

    Args:
        autoencoder (`FlowMoModel`):
            the model to train.
        scheduler (`FlowMoScheduler`):
            training-time distribution.
        guidance_dropout (`float`, *optional*, defaults to `0.1`):
            see [`flowmo_training_losses`].
        perceptual_weight (`float`, *optional*, defaults to `0.0`):
            see [`flowmo_training_losses`].
        posttrain_sample_steps (`int`, *optional*):
            see [`flowmo_training_losses`].
        posttrain_gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            see [`flowmo_training_losses`].
    """

    def __init__(
        self,
        autoencoder: FlowMoModel,
        scheduler: FlowMoScheduler,
        *,
        guidance_dropout: float = 0.1,
        perceptual_weight: float = 0.0,
        posttrain_sample_steps: int | None = None,
        posttrain_gradient_checkpointing: bool = True,
    ):
        super().__init__(autoencoder, guidance_dropout=guidance_dropout, perceptual_weight=perceptual_weight,
                         posttrain_sample_steps=posttrain_sample_steps,
                         posttrain_gradient_checkpointing=posttrain_gradient_checkpointing)
        self.scheduler = scheduler

    def forward(
        self,
        images: torch.Tensor,
        perceptual_loss: PerceptualLoss | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        return flowmo_training_losses(
            self.autoencoder, images, self.scheduler, perceptual_loss=perceptual_loss, generator=generator,
            **self.loss_options,
        )


__all__ = [
    "AutoencoderLossModule",
    "FlowMoTrainingModule",
    "flow_matching_loss",
    "flowmo_training_losses",
    "posttrain_sample",
    "sample_posttrain_times",
]
