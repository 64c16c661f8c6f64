"""Decoding with FlowMo's velocity decoder: the sampler loop behind [`FlowMoModel.decode`] and the pipelines.

Like diffusers' `ConsistencyDecoderVAE.decode`, the model owns a sampler, so code that holds only the model can
decode. Its settings have one owner each (issue 19):

- the time grid and the guidance interval: a [`FlowMoScheduler`] config. The scheduler passed to `decode` is used
  when it is a FlowMoScheduler; otherwise (none, or a diffusers solver, which takes FlowMo's grid as `sigmas`) the
  model's *sampling scheduler* is: the FlowMoScheduler of the pipeline the model was last put in (a
  [`FlowMoPipeline`] hands its scheduler over), of [`~training.distillation.make_student_config`], of a legacy
  config's `sampling_*` keys, or FlowMoScheduler's defaults (the paper's t = (i/N)^4 and EDM-sigma (0.17, 1.02));
- the pass count and the default guidance scale: the model config's `sampling_num_inference_steps` and
  `sampling_guidance_scale`, read by `decode` and by the pipelines alike.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..schedulers.flow_sampling import (
    count_decoder_passes,
    evaluation_flow_times,
    guidance_interval_mask,
    set_flow_timesteps,
)
from ..schedulers.scheduling_flowmo import FlowMoScheduler
from ..utils.validation import check_float, check_optional_int
from .modeling_utils import MAX_GUIDANCE_SCALE, check_decode_bounds
from .tiling import blend_tiles, split_into_tiles


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


class FlowMoDecodingMixin:
    """[`FlowMoModel`]'s decoding: its sampling scheduler, `decode` and the solver loop. Needs the model's
    `config`, `forward`, `indices_to_code`, `check_images`, `check_tiled_images`, `decoder_rotary_embedding` and
    tiling settings."""

    def set_sampling_scheduler(self, scheduler: FlowMoScheduler) -> None:
        """Decode on `scheduler`'s grid and guidance interval when `decode` gets no FlowMoScheduler (its config is
        kept, not the object, so the caller's scheduler keeps its own state)."""
        if not isinstance(scheduler, FlowMoScheduler):
            raise ValueError(f"scheduler must be a FlowMoScheduler, got {type(scheduler).__name__}")
        self._sampling_scheduler_config = scheduler.config

    def sampling_scheduler(self) -> FlowMoScheduler:
        """A fresh [`FlowMoScheduler`] on this model's sampling grid and guidance interval (see the module
        docstring for where they come from)."""
        return FlowMoScheduler.from_config(self._sampling_scheduler_config)

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

        The model owns a sampler (see `flowmo_diffusers.models.decoding_flowmo`), so code that holds only the model
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
                the solver: a [`FlowMoScheduler`], whose config gives the grid and guidance interval (default:
                [`sampling_scheduler`]), or a diffusers flow-matching scheduler (see
                `flowmo_diffusers.schedulers.flow_sampling`), which then runs on the grid of [`sampling_scheduler`]
                where it accepts one, with its guidance interval.
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
    def decode_unchecked(self, code: torch.Tensor, return_dict: bool = True, **sampler_kwargs) -> FlowMoDecodeOutput | tuple:
        """[`decode`] without its checks of the Python scalars (sizes, step count, guidance scale and their bounds),
        for a caller that checked them once where they entered, as [`FlowMoPipeline.check_inputs`] does. Tensor
        shapes are still checked (they read no device value), and so is a guidance scale that changes after the
        first step (a step-end callback's). Takes [`decode`]'s arguments less `max_image_size` and
        `max_inference_steps`, and returns what it returns."""
        if self.use_tiling:
            output = self._tiled_decode(code, **sampler_kwargs)
        else:
            output = self._decode(code, **sampler_kwargs)
        return output if return_dict else output.to_tuple()

    # The arguments are [`decode`]'s, typed and documented there; every one defaults to None as there.
    def _decode(self, code: torch.Tensor, *, num_inference_steps=None, guidance_scale=None, generator=None, latents=None,
                height=None, width=None, scheduler=None, step_callback=None, progress_bar=None,
                interrupt=None) -> FlowMoDecodeOutput:
        """[`decode_unchecked`] of whole images (no tiling): the solver loop."""
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
        # The grid and interval's one owner: the FlowMoScheduler that runs, else the model's sampling scheduler.
        sampler = scheduler.config if isinstance(scheduler, FlowMoScheduler) else self._sampling_scheduler_config
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

        set_flow_timesteps(scheduler, num_inference_steps, sampler["time_schedule"], sampler["time_power"])
        # Start at step 0 without the scheduler looking the first timestep up (a device read).
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        # Guidance decisions come from the grid, read once here, and host scalars, so the loop never waits on the device.
        inside_interval = guidance_interval_mask(evaluation_flow_times(scheduler), sampler["guidance_interval"])
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

    def _tiled_decode(
        self, code, height=None, width=None, latents=None, generator=None, step_callback=None, **decode_kwargs
    ) -> FlowMoDecodeOutput:
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
            self.check_tiled_images(latents)
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
