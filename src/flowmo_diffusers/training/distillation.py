"""Distilling a FlowMo decoder into a K-pass student (`--stage distill`).

The teacher decodes with its own sampler (the paper's: 25 Euler steps on t = (i/N)^4, guidance 1.5 inside the
EDM-sigma interval, 31 decoder passes). The student, initialised from the teacher, decodes the same code from the
same noise with K unguided Euler steps on a fixed grid, and is trained on the distance between the two images,
backpropagating through its whole K-step chain (each call gradient-checkpointed). Per batch `x`:

    code = quantize(encode(x))           # frozen encoder: token ids never change
    eps ~ N(0, I)
    target = teacher.decode(code, latents=eps)            # no gradient
    pred = K Euler steps of the student from eps           # differentiable
    loss = mean ||pred - target||^2 + w_p * perceptual(target, pred)

This is the "regression on the teacher's ODE solution" family of few-step distillation (Luhman & Luhman, 2021;
rectified-flow distillation, Liu et al., 2023): the student learns the teacher's noise -> image map directly,
including the effect of guidance, so it needs no null-code pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models.autoencoder_flowmo import FlowMoModel
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.validation import check_int
from .losses import AutoencoderLossModule, posttrain_sample

PerceptualLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_student_config(
    model: FlowMoModel,
    num_steps: int,
    time_schedule: str = "linear",
    teacher: str | None = None,
    scheduler: FlowMoScheduler | None = None,
) -> FlowMoScheduler:
    """Make `model` a K-pass student: record in its config that it decodes in `num_steps` unguided passes,
    distilled from `teacher`, and give it its grid, `scheduler`'s (default: the model's sampling scheduler, the
    teacher's) on `time_schedule`, as its sampling scheduler. Returns that FlowMoScheduler: save it with the student
    (`FlowMoPipeline(autoencoder=model, scheduler=...)`), so that `pipe(indices=ids)` and `model.decode(ids)` take the
    K passes on the student's grid by default."""
    model.register_to_config(
        sampling_num_inference_steps=check_int("num_steps (--distill_steps)", num_steps, 1),
        sampling_guidance_scale=1.0,
        distilled_from=teacher,
    )
    base = model.sampling_scheduler() if scheduler is None else scheduler
    student_scheduler = FlowMoScheduler.from_config(base.config, time_schedule=time_schedule)
    model.set_sampling_scheduler(student_scheduler)
    return student_scheduler


def student_sample(
    student: FlowMoModel,
    code: torch.Tensor,
    noise: torch.Tensor,
    *,
    rotary_emb=None,
    gradient_checkpointing: bool = True,
) -> torch.Tensor:
    """The student's K-step unguided Euler sample from `noise`, differentiable, on its own grid (its config's
    `sampling_num_inference_steps` on its sampling scheduler's grid); the same arithmetic as `student.decode` (which
    clips the result to [-1, 1]). Returns `(B, 3, H, W)` float32, not clipped."""
    num_steps = student.config.sampling_num_inference_steps
    grid = student.sampling_scheduler().time_grid(num_steps)
    times = grid.to(device=noise.device, dtype=torch.float32).expand(noise.shape[0], num_steps + 1)
    return posttrain_sample(
        student,
        code,
        num_steps,
        noise=noise,
        times=times,
        rotary_emb=rotary_emb,
        gradient_checkpointing=gradient_checkpointing,
    )


def distillation_losses(
    student: FlowMoModel,
    teacher: FlowMoModel,
    images: torch.Tensor,
    *,
    teacher_num_inference_steps: int | None = None,
    teacher_guidance_scale: float | None = None,
    perceptual_loss: PerceptualLoss | None = None,
    perceptual_weight: float = 0.0,
    gradient_checkpointing: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """All loss terms of one distillation batch.

    Args:
        student (`FlowMoModel`): the K-pass student (see [`make_student_config`]); its encoder is frozen.
        teacher (`FlowMoModel`): the frozen teacher; decodes with its own sampler unless overridden.
        images (`torch.Tensor` of shape `(B, 3, H, W)`): in [-1, 1].
        teacher_num_inference_steps (`int`, *optional*), teacher_guidance_scale (`float`, *optional*): override the
            teacher's sampler (default: its config, the paper's 25 steps and guidance 1.5).
        perceptual_loss (`Callable`, *optional*): `f(target, prediction) -> (B,)`; required when
            `perceptual_weight != 0`.
        perceptual_weight (`float`, *optional*, defaults to 0): weight of the perceptual distance to the teacher's
            sample.
        gradient_checkpointing (`bool`, *optional*, defaults to `True`): checkpoint each student decoder call.
        generator (`torch.Generator`, *optional*): source of the noise (the global RNG when None).

    Returns:
        dict with `loss` (differentiable) and detached `distillation_loss` (MSE to the teacher's sample),
        `perceptual_loss` (weighted) and `teacher_psnr` (dB, the student's agreement with the teacher).
    """
    if perceptual_weight != 0 and perceptual_loss is None:
        raise ValueError("perceptual_weight is non-zero but no perceptual_loss was given")
    height, width = images.shape[-2:]
    with torch.no_grad():
        code = student.encode(images).code
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=torch.float32)
        target = teacher.decode(
            code,
            latents=noise,
            num_inference_steps=teacher_num_inference_steps,
            guidance_scale=teacher_guidance_scale,
        ).sample
    rotary_emb = student.decoder_rotary_embedding(height, width, images.device)
    prediction = student_sample(student, code, noise, rotary_emb=rotary_emb, gradient_checkpointing=gradient_checkpointing)
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    distillation = per_sample.mean()
    total = distillation
    if perceptual_weight != 0:
        perceptual = perceptual_weight * perceptual_loss(target, prediction).float().mean()
        total = total + perceptual
    else:
        perceptual = torch.zeros((), device=images.device)
    # PSNR on [-1, 1] images (peak-to-peak 2) against the teacher, as the student decodes (clipped).
    clipped_mse = (prediction.detach().clamp(-1, 1) - target).pow(2).flatten(1).mean(dim=1)
    teacher_psnr = (10 * torch.log10(4.0 / clipped_mse.clamp_min(1e-12))).mean()
    return {
        "loss": total,
        "distillation_loss": distillation.detach(),
        "perceptual_loss": perceptual.detach(),
        "teacher_psnr": teacher_psnr.detach(),
    }


class FlowMoDistillationModule(AutoencoderLossModule):
    """The student `FlowMoModel` plus its distillation loss, as one module whose `forward` runs it (see
    `losses.FlowMoTrainingModule` for why distributed wrappers need this). The teacher is passed to `forward`, like
    the perceptual network, so that it is neither synchronised, trained nor checkpointed with the student.

    Args:
        autoencoder (`FlowMoModel`): the student.
        teacher_num_inference_steps (`int`, *optional*):
            see [`distillation_losses`].
        teacher_guidance_scale (`float`, *optional*):
            see [`distillation_losses`].
        perceptual_weight (`float`, *optional*, defaults to `0.0`):
            see [`distillation_losses`].
        gradient_checkpointing (`bool`, *optional*, defaults to `True`):
            see [`distillation_losses`].
    """

    def __init__(
        self,
        autoencoder: FlowMoModel,
        *,
        teacher_num_inference_steps: int | None = None,
        teacher_guidance_scale: float | None = None,
        perceptual_weight: float = 0.0,
        gradient_checkpointing: bool = True,
    ):
        super().__init__(autoencoder, teacher_num_inference_steps=teacher_num_inference_steps,
                         teacher_guidance_scale=teacher_guidance_scale, perceptual_weight=perceptual_weight,
                         gradient_checkpointing=gradient_checkpointing)

    def forward(
        self,
        images: torch.Tensor,
        perceptual_loss: PerceptualLoss | None = None,
        teacher: FlowMoModel | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        if teacher is None:
            raise ValueError("distillation needs the teacher: forward(images, perceptual_loss, teacher=...)")
        return distillation_losses(
            self.autoencoder, teacher, images, perceptual_loss=perceptual_loss, generator=generator, **self.loss_options
        )


__all__ = [
    "FlowMoDistillationModule",
    "distillation_losses",
    "make_student_config",
    "student_sample",
]
