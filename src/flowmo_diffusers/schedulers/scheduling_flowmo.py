"""FlowMoScheduler: rectified-flow Euler sampling on FlowMo's time grids, its guidance interval and training times."""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..utils.validation import FloatPairRule, FloatRule, OptionalRule, check_float, check_int, validate_config

TRAINING_TIME_DISTRIBUTIONS = ("fat_lognormal", "lognormal", "uniform")
#: Rules of the `config.json` values that need more than a membership test.
CONFIG_RULES = {
    "time_power": FloatRule(0.0, 100.0, exclusive_minimum=True),
    "guidance_interval": OptionalRule(FloatPairRule()),
}
TIME_SCHEDULES = ("power", "linear")
# Beyond |10| the sigmoid of the training times is 0 or 1 to float32 precision: every time would be the same.
MAX_LOGIT_MEAN = 10.0


def flow_time_grid(num_inference_steps: int, time_schedule: str = "power", time_power: float = 4.0) -> torch.Tensor:
    """The N + 1 flow times from 1 down to 0, float32, computed exactly as the original does.

    `"power"`: t_i = (i / N) ** time_power for i = N..0 (the paper samples with `time_power = 4`); `"linear"`: i / N.
    """
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, 1)
    if time_schedule not in TIME_SCHEDULES:
        raise ValueError(f"time_schedule must be one of {TIME_SCHEDULES}, got {time_schedule!r}")
    steps = torch.arange(0, num_inference_steps + 1).flip(0)
    if time_schedule == "power":
        power = float(time_power)
        return steps**power / num_inference_steps**power
    return steps / num_inference_steps


def edm_sigma_to_flow_time(sigma: float) -> float:
    """EDM noise level sigma (z = x + sigma n) to flow time t = sigma / (1 + sigma)."""
    sigma = check_float("sigma", sigma, 0.0)
    return sigma / (1 + sigma)


def in_guidance_interval(flow_time: float, guidance_interval: tuple[float, float] | None) -> bool:
    """Whether guidance applies at flow time t: t inside the EDM-sigma `guidance_interval` converted to flow time
    (bounds included, compared in float64 like the original); None means everywhere."""
    if guidance_interval is None:
        return True
    low, high = guidance_interval
    return edm_sigma_to_flow_time(low) <= float(flow_time) <= edm_sigma_to_flow_time(high)


class FlowMoScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Euler sampler of FlowMo's rectified flow `z_t = (1 - t) x + t noise`, from t = 1 (noise) to t = 0 (image).

    Sampling runs diffusers' [`FlowMatchEulerDiscreteScheduler`] (whose `sigmas` are FlowMo's flow times t, and whose
    Euler step `z + (t_next - t) v` is the original's `z - dt v`) on FlowMo's time grids. It is held rather than
    subclassed so that this scheduler's config carries only FlowMo's options:

    - `"power"`: t_i = (i / N) ** time_power for i = N..0. The paper samples with the original's `"pow_0.25"`
      schedule, i.e. `time_power = 4`.
    - `"linear"`: t_i = i / N.

    Its config is the one owner of the decoder's time grid and guidance interval: [`FlowMoModel.decode`] reads them
    here, from the FlowMoScheduler it runs or from the model's sampling scheduler (see
    `flowmo_diffusers.models.decoding_flowmo`). It also knows the guidance interval (guidance is applied only where t lies in an interval given in EDM sigma,
    converted by t = sigma / (1 + sigma)) and the training-time noising and time sampling.

    Parameters:
        time_schedule (`str`): `"power"` or `"linear"`.
        time_power (`float`): exponent of the `"power"` grid.
        guidance_interval (`Tuple[float, float]` or None): EDM-sigma interval where guidance applies; None means
            every step.
        training_time_distribution (`str`): `"fat_lognormal"` (sigmoid of a normal, replaced by a uniform time with
            probability `uniform_time_probability`), `"lognormal"` or `"uniform"`.
        uniform_time_probability (`float`): the uniform share of `"fat_lognormal"`.
        logit_mean (`float`, *optional*, defaults to 0.0), logit_std (`float`, *optional*, defaults to 1.0): mean and
            standard deviation of the normal whose sigmoid `"lognormal"` and `"fat_lognormal"` draw (diffusers'
            `--logit_mean` / `--logit_std` of SD3 training). The paper's is the standard normal; a positive mean puts
            more of the training on times near 1 (pure noise), where the decoder can only rely on the code: the
            offline CPU demo trains with `logit_mean=3.5`, which learns a recognisable reconstruction far sooner.
        num_train_timesteps (`int`): diffusers' `timesteps` are `1000 * t`; the model takes t itself.

    Of the API of the flow-matching scheduler it holds, `sigmas`, `timesteps`, `step_index`, `begin_index`,
    `set_begin_index`, `set_timesteps(sigmas=...)`, `scale_noise` and `step` are forwarded. Its `shift`,
    `use_dynamic_shifting` / `set_shift` and `time_shift` are not: FlowMo's grid is fixed by `time_schedule` and
    `time_power` (a shifted grid is not the one the decoder was trained and evaluated with); a
    `FlowMatchEulerDiscreteScheduler` built `from_config` of this one can be shifted if wanted.

    Any diffusers flow-matching scheduler in `_compatibles` can replace it in a pipeline:
    `pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)`; the multistep solvers need
    their flow mode spelled out, `UniPCMultistepScheduler.from_config(pipe.scheduler.config,
    prediction_type="flow_prediction", use_flow_sigmas=True)` (a scheduler that cannot integrate a velocity is refused
    with a ValueError when the pipeline runs).
    """

    # Schedulers that can replace this one in a FlowMoPipeline (see `flowmo_diffusers.schedulers.flow_sampling`).
    _compatibles = [
        "FlowMatchEulerDiscreteScheduler",
        "FlowMatchHeunDiscreteScheduler",
        "UniPCMultistepScheduler",
        "DPMSolverMultistepScheduler",
    ]

    @register_to_config
    def __init__(
        self,
        time_schedule: str = "power",
        time_power: float = 4.0,
        guidance_interval: tuple[float, float] | None = (0.17, 1.02),
        training_time_distribution: str = "fat_lognormal",
        uniform_time_probability: float = 0.1,
        num_train_timesteps: int = 1000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if time_schedule not in TIME_SCHEDULES:
            raise ValueError(f"time_schedule must be 'power' or 'linear', got {time_schedule!r}")
        if training_time_distribution not in TRAINING_TIME_DISTRIBUTIONS:
            raise ValueError(
                f"training_time_distribution must be one of {TRAINING_TIME_DISTRIBUTIONS}, got "
                f"{training_time_distribution!r}"
            )
        validate_config(
            type(self).__name__, {"time_power": time_power, "guidance_interval": guidance_interval}, CONFIG_RULES
        )
        check_float("logit_mean", logit_mean, -MAX_LOGIT_MEAN, MAX_LOGIT_MEAN)
        check_float("logit_std", logit_std, 0.0, exclusive_minimum=True)
        if guidance_interval is not None:
            # JSON has no tuples: a saved config comes back with a list. Store a tuple whatever was passed, so that
            # save_pretrained / from_pretrained (and from_config) give back an equal config.
            self.register_to_config(guidance_interval=tuple(float(bound) for bound in guidance_interval))
        self.euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)

    order = 1

    @property
    def sigmas(self) -> torch.Tensor:
        """Flow times of the current grid, N + 1 values from 1 to 0."""
        return self.euler.sigmas

    @property
    def timesteps(self) -> torch.Tensor:
        """`1000 * t` for the N sampling steps (diffusers' convention)."""
        return self.euler.timesteps

    @property
    def num_inference_steps(self) -> int | None:
        return self.euler.num_inference_steps

    @property
    def step_index(self) -> int | None:
        return self.euler.step_index

    @property
    def begin_index(self) -> int | None:
        """The first step's index, when set with [`set_begin_index`]."""
        return self.euler.begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at `begin_index` without looking the first timestep up in the grid (which reads a device
        tensor on the host)."""
        self.euler.set_begin_index(begin_index)

    def scale_noise(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Noise clean images to the flow time of `timestep` on the current grid, `(1 - t) x + t noise` (diffusers'
        [`FlowMatchEulerDiscreteScheduler.scale_noise`], which this forwards to): the start of an image-to-image
        decode that begins part-way down the grid (with [`set_begin_index`]).

        Args:
            sample (`torch.Tensor`): clean images `x`.
            timestep (`float` or `torch.Tensor`): one of `timesteps` (`1000 * t`), or one per sample; call
                [`set_timesteps`] first.
            noise (`torch.Tensor`, *optional*): the noise to mix in.

        For per-sample continuous training times use [`add_noise_at_times`], which needs no grid.
        """
        return self.euler.scale_noise(sample, timestep, noise)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One Euler step `z + (t_next - t) v`, in float32 whatever the velocity's dtype."""
        # The parent casts its result to model_output's dtype; the original keeps z in float32 under autocast.
        return self.euler.step(model_output.float(), timestep, sample.float(), generator=generator, return_dict=return_dict)

    # ----------------------------------------------------------------------------------------------------------
    # Sampling
    def time_grid(self, num_inference_steps: int) -> torch.Tensor:
        """The N + 1 flow times from 1 down to 0 of this scheduler's grid ([`flow_time_grid`])."""
        return flow_time_grid(num_inference_steps, self.config.time_schedule, self.config.time_power)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        **kwargs,
    ):
        """Sets `sigmas` (flow times, N + 1 values ending at 0) and `timesteps` (`1000 * t`, N values)."""
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or sigmas")
            # The parent appends the terminal 0 itself.
            sigmas = self.time_grid(num_inference_steps)[:-1].numpy()
            num_inference_steps = None
        self.euler.set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas, **kwargs)

    @property
    def guidance_interval_flow_time(self) -> tuple[float, float] | None:
        """The guidance interval in flow time t = sigma / (1 + sigma)."""
        if self.config.guidance_interval is None:
            return None
        low, high = self.config.guidance_interval
        return self.edm_sigma_to_flow_time(low), self.edm_sigma_to_flow_time(high)

    def is_guidance_step(self, flow_time: float | torch.Tensor) -> bool:
        """Whether guidance applies at flow time t (bounds included, compared in float64 like the original)."""
        return in_guidance_interval(float(flow_time), self.config.guidance_interval)

    # ----------------------------------------------------------------------------------------------------------
    # Training
    def sample_training_times(
        self, batch_size: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Flow times `(batch_size,)` in (0, 1) drawn from `training_time_distribution`."""
        distribution = self.config.training_time_distribution
        if distribution == "uniform":
            return torch.rand((batch_size,), generator=generator, device=device)
        normal = randn_tensor((batch_size,), generator=generator, device=device)
        if (self.config.logit_mean, self.config.logit_std) != (0.0, 1.0):  # the paper's draw stays bit for bit
            normal = self.config.logit_mean + self.config.logit_std * normal
        times = torch.sigmoid(normal)
        if distribution == "fat_lognormal":
            use_logit_normal = torch.rand((batch_size,), generator=generator, device=device) <= (
                1 - self.config.uniform_time_probability
            )
            uniform = torch.rand((batch_size,), generator=generator, device=device)
            times = torch.where(use_logit_normal, times, uniform)
        return times

    @staticmethod
    def add_noise_at_times(images: torch.Tensor, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """
        `z_t = (1 - t) x + t noise` for per-sample continuous times `(B,)`.

        Written here rather than reusing `scale_noise`, which looks t up in the inference grid.
        """
        times = times.reshape(-1, *([1] * (images.ndim - 1))).to(images.dtype)
        return (1 - times) * images + times * noise

    @staticmethod
    def velocity_target(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity `noise - x` that the decoder learns."""
        return noise - images

    @staticmethod
    def predict_image(noisy: torch.Tensor, velocity: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """One-step image estimate `x = z_t - t v`."""
        return noisy - velocity * times.reshape(-1, *([1] * (noisy.ndim - 1))).to(noisy.dtype)

    edm_sigma_to_flow_time = staticmethod(edm_sigma_to_flow_time)
