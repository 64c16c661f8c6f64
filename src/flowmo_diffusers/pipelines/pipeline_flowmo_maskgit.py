"""FlowMoMaskGiTPipeline: class ids -> FlowMo token ids (MaskGiT prior) -> images (FlowMo decoder)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..models.autoencoder_flowmo import FlowMoModel
from ..models.maskgit_transformer import FlowMoMaskGiTTransformer
from ..models.modeling_utils import MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..schedulers.scheduling_maskgit import MaskGiTScheduler
from ..utils.files import FollowUmaskSaveMixin
from ..utils.hub import HubPipelineMixin
from ..utils.validation import as_integer_tensor, check_float, check_int, check_optional_float, check_optional_int
from . import pipeline_utils
from .pipeline_flowmo import FlowMoPipeline
from .pipeline_utils import SamplingStateMixin, SharesSamplingSchedulerMixin, StepEndCallback


@dataclass
class FlowMoMaskGiTPipelineOutput(BaseOutput):
    """
    Output of [`FlowMoMaskGiTPipeline`].

    Args:
        images (`Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]`):
            PIL images, numpy `(B, H, W, 3)` or torch `(B, 3, H, W)` in [0, 1]; with `output_type="latent"` the
            token ids themselves (diffusers' convention for "latent"), `(B, num_indices)` int64.
        indices (`torch.LongTensor` of shape `(B, num_indices)`): the sampled FlowMo token ids.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    indices: torch.LongTensor


class FlowMoMaskGiTPipeline(
    SharesSamplingSchedulerMixin, HubPipelineMixin, FollowUmaskSaveMixin, SamplingStateMixin, DiffusionPipeline
):
    r"""
    Class-conditional generation with a MaskGiT prior over FlowMo tokens.

    1. Start from all-masked ids; for each of `num_inference_steps` steps the transformer predicts logits for every
       position, conditional and unconditional (null class) in one batched pass, combined as
       `null + w_i (cond - null)` with the scheduler's guidance schedule w_i; the [`MaskGiTScheduler`] draws ids for
       the masked positions and re-masks the least confident ones.
    2. Decode the ids to images with [`FlowMoPipeline`]'s rectified-flow sampler (its own guidance on the code), run
       on this pipeline's `autoencoder` and `decoder_scheduler` — the decoding loop is not duplicated here.

    Args:
        transformer ([`FlowMoMaskGiTTransformer`]): the prior; its `num_indices` / `codebook_size` must match the
            autoencoder's.
        scheduler ([`MaskGiTScheduler`]): unmasking sampler; `mask_token_id` must be the transformer's.
        autoencoder ([`FlowMoModel`]): the tokenizer whose decoder renders the ids.
        decoder_scheduler ([`FlowMoScheduler`]): the decoder's sampler.
    """

    model_cpu_offload_seq = "transformer->autoencoder"
    _sampling_scheduler_component = "decoder_scheduler"
    # As in diffusers' aMUSEd pipeline, the "latents" of a masked-token prior are its token ids.
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: FlowMoMaskGiTTransformer,
        scheduler: MaskGiTScheduler,
        autoencoder: FlowMoModel,
        decoder_scheduler: FlowMoScheduler,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, autoencoder=autoencoder, decoder_scheduler=decoder_scheduler
        )

    # ----------------------------------------------------------------------------------------------------------
    # diffusers' sampling state (SamplingStateMixin) is that of the unmasking loop, set by `generate_indices`: the
    # prior's guidance scale g (the scheduler's guidance schedule still applies to it) and its steps; the decoder's
    # own sampler that follows is not part of it.

    # ----------------------------------------------------------------------------------------------------------
    def check_components(self) -> None:
        """Raise ValueError unless the transformer, scheduler and autoencoder agree on the token format."""
        config = self.transformer.config
        if (config.num_indices, config.codebook_size) != (self.autoencoder.num_indices, self.autoencoder.codebook_size):
            raise ValueError(
                f"transformer models {config.num_indices} ids of {config.codebook_size} values, but the autoencoder "
                f"produces {self.autoencoder.num_indices} ids of {self.autoencoder.codebook_size} values"
            )
        if self.scheduler.config.mask_token_id != self.transformer.mask_token_id:
            raise ValueError(
                f"scheduler.mask_token_id ({self.scheduler.config.mask_token_id}) must equal the transformer's mask id "
                f"({self.transformer.mask_token_id})"
            )

    def prepare_class_labels(self, class_labels: int | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """An int, a list, an array or a tensor of class ids -> int64 `(B,)` on the execution device, validated."""
        num_classes = self.transformer.config.num_classes
        if isinstance(class_labels, (bool, np.bool_)) or class_labels is None:
            raise ValueError(f"class_labels must be class ids in [0, {num_classes}), got {class_labels!r}")
        labels = as_integer_tensor("class_labels", class_labels)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: give at least one class id")
        labels = labels.reshape(1) if labels.ndim == 0 else labels
        if labels.ndim != 1:
            raise ValueError(f"class_labels must be an int or a 1-D sequence of ints, got shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"class_labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.to(device=self._execution_device, dtype=torch.long)

    @torch.no_grad()
    def generate_indices(
        self,
        class_labels: torch.LongTensor,
        num_inference_steps: int,
        guidance_scale: float,
        generator=None,
        step_callback: Callable[[int, torch.Tensor, torch.LongTensor], torch.LongTensor | None] | None = None,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """MaskGiT sampling: validated labels `(B,)` -> token ids `(B, num_indices)`.

        `step_callback(step_index, timestep, ids)` runs after every unmasking step; ids it returns replace the current
        ones. The guidance scale is read from `self._guidance_scale` before every step (set here to
        `guidance_scale`), and `self._interrupt` stops the loop after a step.

        Returns:
            `(ids, complete_ids)`, both `(B, num_indices)`: the ids as the loop left them (`mask_token_id` where still
            masked, which happens only when interrupted) and the same with every masked position filled by the last
            step's prediction (the scheduler's `pred_original_sample`), which can be decoded.
        """
        transformer = self.transformer
        device = self._execution_device
        batch_size = class_labels.shape[0]
        mask_id = transformer.mask_token_id
        ids = torch.full((batch_size, transformer.config.num_indices), mask_id, dtype=torch.long, device=device)
        prediction = ids
        null_labels = torch.full_like(class_labels, transformer.null_class_id)
        both_labels = torch.cat([class_labels, null_labels])
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._guidance_scale = guidance_scale
        self._num_timesteps = len(self.scheduler.timesteps)
        self._interrupt = False
        for step_index in self.progress_bar(self.scheduler.timesteps):
            if self.interrupt:
                break
            weight = self.scheduler.guidance_scale_at(step_index, check_float("guidance_scale", self._guidance_scale))
            if weight != 1.0:
                # Conditional and null-class passes share one batched forward.
                logits = transformer(torch.cat([ids, ids]), both_labels).logits.float()
                conditional, unconditional = logits.chunk(2)
                logits = unconditional + weight * (conditional - unconditional)
            else:
                logits = transformer(ids, class_labels).logits.float()
            output = self.scheduler.step(logits, step_index, ids, generator=generator)
            ids, prediction = output.prev_sample, output.pred_original_sample
            if step_callback is not None:
                replaced = step_callback(step_index, self.scheduler.timesteps[step_index], ids)
                if replaced is not None:
                    ids = replaced
        return ids, torch.where(ids == mask_id, prediction, ids)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | np.ndarray | torch.Tensor,
        num_inference_steps: int = 16,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        decoder_num_inference_steps: int | None = None,
        decoder_guidance_scale: float | None = None,
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> FlowMoMaskGiTPipelineOutput | tuple:
        """
        Generate images of the given classes.

        Args:
            class_labels (`Union[int, List[int], np.ndarray, torch.Tensor]`):
                one class id, or a list / array / tensor of them (one image each), in `[0, num_classes)`.
            num_inference_steps (`int`): MaskGiT unmasking steps.
            guidance_scale (`float`): classifier-free guidance g on the logits, `null + w_i (cond - null)`, with w_i
                from the scheduler's `guidance_schedule` (constant: w_i = g); 1 disables it. Our default, not tuned.
            num_images_per_prompt (`int`, *optional*, defaults to 1): images per class label, each from its own
                token draws and decoder noise; the output holds all of label 0's, then label 1's, ... (diffusers'
                order).
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): for the token draws and then the
                decoder's noise: one for the whole batch, or one per output image
                (`len(class_labels) * num_images_per_prompt`).
            output_type (`str`): `"pil"`, `"np"`, `"pt"` (images in [0, 1], as [`FlowMoPipeline`]) or `"latent"`:
                the sampled token ids `(B, num_indices)` int64, not decoded (the prior's "latents", as in diffusers'
                aMUSEd pipeline); after an interrupt they still hold `mask_token_id` where unmasking had not reached.
            decoder_num_inference_steps (`int`, *optional*), decoder_guidance_scale (`float`, *optional*): the FlowMo
                decoder's sampler; by default the decoder's own (the paper's 25 steps with guidance 1.5, or K
                unguided passes for a distilled student).
            return_dict (`bool`): return a [`FlowMoMaskGiTPipelineOutput`] rather than a tuple `(images, indices)`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called after
                every unmasking step as `callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`, where
                `callback_kwargs["latents"]` is the current token ids `(B * num_images_per_prompt, num_indices)` (mask
                id where still masked); a `"latents"` tensor in the dict it returns replaces them. The decoder's
                steps that follow are not part of it. diffusers' conventions hold: setting `pipe._guidance_scale`
                changes g from the next unmasking step on, and `pipe._interrupt = True` stops unmasking after this
                step; decoded outputs then fill the positions still masked with that step's prediction.
            callback_on_step_end_tensor_inputs (`List[str]`, *optional*, defaults to `["latents"]`): the tensors
                passed to the callback, from `_callback_tensor_inputs`.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
        guidance_scale = check_float("guidance_scale", guidance_scale)
        # The decoder's arguments with their bounds too, so that a bad one is refused before the unmasking, not
        # after it. FlowMoPipeline, which decodes (its loop is not duplicated here), checks them again: a few scalar
        # comparisons, the price of reusing its whole call.
        check_optional_int("decoder_num_inference_steps", decoder_num_inference_steps, 1, MAX_INFERENCE_STEPS)
        check_optional_float("decoder_guidance_scale", decoder_guidance_scale, -MAX_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE)
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        callback_on_step_end_tensor_inputs = pipeline_utils.check_callback(
            self, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        self.check_components()
        labels = self.prepare_class_labels(class_labels).repeat_interleave(num_images_per_prompt)
        pipeline_utils.check_generators(generator, labels.shape[0], "class labels x num_images_per_prompt")
        step_callback = pipeline_utils.prepare_step_callback(
            self, callback_on_step_end, callback_on_step_end_tensor_inputs
        )

        indices, complete_indices = self.generate_indices(
            labels, num_inference_steps, guidance_scale, generator, step_callback
        )

        if output_type == "latent":
            images = indices
        else:
            indices = complete_indices
            # Decoding is FlowMoPipeline's, on our components (a light wrapper: no weights are copied).
            decoder = FlowMoPipeline(autoencoder=self.autoencoder, scheduler=self.decoder_scheduler)
            decoder.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
            images = decoder(
                indices=indices,
                num_inference_steps=decoder_num_inference_steps,
                guidance_scale=decoder_guidance_scale,
                generator=generator,
                output_type=output_type,
            ).images
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, indices)
        return FlowMoMaskGiTPipelineOutput(images=images, indices=indices)
