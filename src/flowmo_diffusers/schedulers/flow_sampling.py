"""Driving FlowMo's velocity decoder with any diffusers flow-matching scheduler.

FlowMo's decoder predicts the rectified-flow velocity `v = noise - image` of `z_t = (1 - t) image + t noise`, which is
diffusers' flow-matching convention (`sigma` = t, `prediction_type="flow_prediction"`). So any diffusers scheduler
that integrates that ODE can decode FlowMo tokens; this module decides which ones can, sets FlowMo's time grid on
them where their API takes one, and gives, per model evaluation, the flow time the decoder is called at, so that
the pipeline applies FlowMo's guidance interval to every evaluation of a multi-evaluation step (Heun) or a
multistep solver (UniPC, DPM-Solver) alike.

What each scheduler does with FlowMo's grid:

| scheduler | model evaluations | grid |
| --- | --- | --- |
| [`FlowMoScheduler`] (default) | N | its own (the paper's `t = (i/N)^4`) |
| `FlowMatchEulerDiscreteScheduler` | N | FlowMo's, passed as `sigmas` (its `shift` still applies) |
| `UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")` | N | FlowMo's, as `sigmas` |
| `DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")` | N | its own linear flow grid: its `set_timesteps` takes no `sigmas` |
| `FlowMatchHeunDiscreteScheduler` | 2N - 1 | its own linear grid: its `set_timesteps` takes no `sigmas` |
"""

import inspect
from collections.abc import Sequence

from .scheduling_flowmo import FlowMoScheduler, flow_time_grid, in_guidance_interval


def check_flow_scheduler(scheduler) -> None:
    """Raise ValueError unless `scheduler` integrates a flow-matching ODE from a velocity (`noise - image`) output."""
    if isinstance(scheduler, FlowMoScheduler):
        return
    name = type(scheduler).__name__
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        raise ValueError(f"scheduler must be a diffusers scheduler with set_timesteps and step, got {name}")
    config = getattr(scheduler, "config", {})
    prediction_type = config.get("prediction_type")
    if prediction_type is None:
        # diffusers' FlowMatch* schedulers have no prediction_type: they are velocity integrators by construction.
        if name.startswith("FlowMatch"):
            if config.get("use_dynamic_shifting", False):
                raise ValueError(
                    f"{name} with use_dynamic_shifting=True needs a resolution-dependent `mu` that FlowMo does not "
                    "define; construct it with use_dynamic_shifting=False"
                )
            return
        raise ValueError(
            f"{name} cannot drive FlowMo's decoder: it is not a flow-matching scheduler and has no prediction_type. "
            "FlowMo's decoder predicts the rectified-flow velocity (noise - image); use FlowMoScheduler, "
            "FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, or UniPC / DPM-Solver built with "
            "prediction_type='flow_prediction', use_flow_sigmas=True"
        )
    if prediction_type != "flow_prediction":
        raise ValueError(
            f"{name} is configured with prediction_type={prediction_type!r}, but FlowMo's decoder predicts the "
            "rectified-flow velocity (noise - image): build it with prediction_type='flow_prediction'"
            + (", use_flow_sigmas=True" if "use_flow_sigmas" in config else "")
        )
    if "use_flow_sigmas" in config and not config["use_flow_sigmas"]:
        raise ValueError(
            f"{name} needs use_flow_sigmas=True to integrate FlowMo's flow (its default sigmas are a diffusion "
            "noise schedule, not flow times in [0, 1])"
        )


def set_flow_timesteps(
    scheduler, num_inference_steps: int, time_schedule: str = "power", time_power: float = 4.0
) -> None:
    """`scheduler.set_timesteps` on FlowMo's grid where the scheduler takes `sigmas`, on its own flow grid otherwise
    (see the module docstring). Then checks that the grid is a flow grid (times in [0, 1], ending at 0).

    The grid is kept on the host (no `device`): the decoder's times are copied to the device once, and the solver's
    step sizes are host scalars, so neither setting up nor stepping reads a device tensor back.
    """
    check_flow_scheduler(scheduler)
    if isinstance(scheduler, FlowMoScheduler):
        scheduler.set_timesteps(num_inference_steps)
    elif "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        # diffusers appends the terminal sigma (0) itself.
        sigmas = flow_time_grid(num_inference_steps, time_schedule, time_power)[:-1].numpy()
        scheduler.set_timesteps(sigmas=sigmas)
    else:
        scheduler.set_timesteps(num_inference_steps)
    sigmas = scheduler.sigmas
    if sigmas.max() > 1 + 1e-5 or sigmas.min() < 0 or sigmas[-1] != 0:
        raise ValueError(
            f"{type(scheduler).__name__} produced sigmas in [{float(sigmas.min()):.4g}, {float(sigmas.max()):.4g}] "
            f"ending at {float(sigmas[-1]):.4g}; FlowMo needs flow times in [0, 1] ending at 0"
        )


def evaluation_flow_times(scheduler) -> list[float]:
    """The flow time of the sample the model is evaluated at, for each of `scheduler.timesteps`, as Python floats.

    Read once before the loop, so that deciding guidance never waits on the device. For every supported scheduler
    the i-th model evaluation sees the sample at `sigmas[i]`: Euler, UniPC and DPM-Solver step through their sigmas
    one evaluation at a time, and Heun's doubled layout (`s0, s1, s1, s2, s2, ..., 0`) puts its corrector
    evaluation of step k at the predicted sample's time `s_{k+1}`.
    """
    return [float(t) for t in scheduler.sigmas[: len(scheduler.timesteps)].detach().cpu()]


def guidance_interval_mask(flow_times: Sequence[float], guidance_interval: tuple[float, float] | None) -> list[bool]:
    """For each model evaluation, whether its flow time lies inside the EDM-sigma guidance interval (it is guided
    there unless that step's guidance scale is 1)."""
    return [in_guidance_interval(t, guidance_interval) for t in flow_times]


def count_decoder_passes(guided: Sequence[bool]) -> int:
    """Decoder passes per image: 2 for a guided evaluation (code and null code), 1 otherwise (the paper's 31)."""
    return sum(2 if g else 1 for g in guided)


__all__ = [
    "check_flow_scheduler",
    "count_decoder_passes",
    "evaluation_flow_times",
    "guidance_interval_mask",
    "set_flow_timesteps",
]
