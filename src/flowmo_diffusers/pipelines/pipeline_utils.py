"""What both pipelines check and do the same way: the batch arguments, diffusers' step-end callbacks, generators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from ..schedulers.scheduling_flowmo import FlowMoScheduler

#: What `callback_on_step_end` may be: diffusers' `f(pipeline, step_index, timestep, callback_kwargs) -> dict`, or one
#: of its callback objects.
StepEndCallback = (
    Callable[[DiffusionPipeline, int, torch.Tensor, dict[str, Any]], dict[str, Any]]
    | PipelineCallback
    | MultiPipelineCallbacks
)


class SharesSamplingSchedulerMixin:
    """Hands the pipeline's [`FlowMoScheduler`] (the component named `_sampling_scheduler_component`) to its
    `autoencoder` as the model's sampling scheduler, whenever either is set (at construction and on
    `pipe.scheduler = ...`): the scheduler's config then stays the one owner of the time grid and guidance interval,
    read by `pipe(...)`, by `pipe.autoencoder.decode(...)` without a scheduler, and by a diffusers solver swapped in
    after it (see `flowmo_diffusers.models.decoding_flowmo`)."""

    _sampling_scheduler_component = "scheduler"

    def __setattr__(self, name: str, value: Any):
        super().__setattr__(name, value)
        if name in ("autoencoder", self._sampling_scheduler_component):
            autoencoder = self.__dict__.get("autoencoder")
            scheduler = self.__dict__.get(self._sampling_scheduler_component)
            if isinstance(scheduler, FlowMoScheduler) and hasattr(autoencoder, "set_sampling_scheduler"):
                autoencoder.set_sampling_scheduler(scheduler)


def check_callback(pipeline, callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str] | None:
    """Check a step-end callback and return the tensor names it asks for.

    Raises ValueError for a callback that is not callable or asks for tensors the pipeline does not offer. diffusers'
    `PipelineCallback` objects name their own `tensor_inputs`, which replace `callback_on_step_end_tensor_inputs`.
    """
    if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
        callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    names = callback_on_step_end_tensor_inputs
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names, got {names!r}")
    unknown = [name for name in names if name not in pipeline._callback_tensor_inputs]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs has to be in {pipeline._callback_tensor_inputs}, but found {unknown}"
        )
    return names


def step_end_callback(pipeline, callback_on_step_end, tensor_inputs):
    """Adapt diffusers' `callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict` to a sampling
    loop's `f(step_index, timestep, latents) -> new latents or None`."""

    def step_callback(step_index, timestep, latents):
        tensors = {"latents": latents}
        outputs = callback_on_step_end(pipeline, step_index, timestep, {name: tensors[name] for name in tensor_inputs})
        if not isinstance(outputs, dict):
            raise TypeError(
                "callback_on_step_end must return a dict (e.g. the callback_kwargs it was given, with the tensors to "
                f"replace), got {type(outputs).__name__}"
            )
        replaced = outputs.get("latents")
        if replaced is not None and (not isinstance(replaced, torch.Tensor) or replaced.shape != latents.shape):
            got = tuple(replaced.shape) if isinstance(replaced, torch.Tensor) else type(replaced).__name__
            raise ValueError(
                f"callback_on_step_end returned latents of shape {got}; they must keep the shape {tuple(latents.shape)}"
            )
        return replaced

    return step_callback


def prepare_step_callback(pipeline, callback_on_step_end, tensor_inputs) -> Callable | None:
    """[`step_end_callback`] for a given callback, `None` without one."""
    if callback_on_step_end is None:
        return None
    return step_end_callback(pipeline, callback_on_step_end, tensor_inputs)


def check_generators(generator: torch.Generator | list[torch.Generator] | None, batch_size: int, what: str) -> None:
    """Raise ValueError for a list of generators whose length is not the number of output images.

    Args:
        generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
            One generator for the batch, or one per output image.
        batch_size (`int`):
            The number of output images.
        what (`str`):
            How the batch size came about, for the message (e.g. "inputs x num_images_per_prompt").
    """
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"got {len(generator)} generators for {batch_size} images ({what}): "
            "pass one generator, or one per output image"
        )


class SamplingStateMixin:
    """diffusers' sampling state of a pipeline's loop (`guidance_scale`, `num_timesteps`, `interrupt`): set by
    `__call__` as `_guidance_scale`, `_num_timesteps`, `_interrupt`, and read (or changed) by `callback_on_step_end`."""

    @property
    def guidance_scale(self) -> float:
        """The guidance scale of the current (or last) call; a callback that sets `pipe._guidance_scale` changes it
        from the next step of the loop on (e.g. 1.0 switches guidance off)."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """Steps of the loop in the current (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Whether the loop stops: a callback that sets `pipe._interrupt = True` ends it after that step."""
        return self._interrupt


__all__ = [
    "SamplingStateMixin",
    "StepEndCallback",
    "check_callback",
    "check_generators",
    "prepare_step_callback",
    "step_end_callback",
]
