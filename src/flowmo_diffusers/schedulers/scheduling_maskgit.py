"""MaskGiTScheduler: MaskGiT's iterative unmasking (Chang et al., 2022) and its training-time masking.

Why not diffusers' `AmusedScheduler` (diffusers 0.42.1, `schedulers/scheduling_amused.py`), which is the same idea in
diffusers style? It cannot express the math we need exactly:

- masking schedules: it has `cosine` and `linear` only, not `arccos` (TiTok's default);
- temperature: its choice temperature runs `linspace(T, 0.01)` over the steps, not MaskGiT's `T * (1 - (i + 1) / S)`;
- training masking: its `add_noise` masks each position independently with the ratio of a *sampling step*
  (`timesteps` from `set_timesteps`), not an exact count `round(N * gamma(u))`, `u ~ U(0, 1)`, and it does not
  return the mask (the loss needs it);
- guidance schedules live nowhere in it; its per-step update also ties the step to `timesteps == timestep` lookups;
- its random draws take one generator for the batch (we accept one per sample, as diffusers pipelines do).

So this scheduler is written in the same style (`set_timesteps`, `step(...) -> prev_sample, pred_original_sample`,
`add_noise`), with the MaskGiT / TiTok formulas, defined here:

Sampling with S steps over N positions, starting from all-masked ids; at step i = 0..S-1 (r_i = (i + 1) / S):

1. Every masked position draws an id from `softmax(logits / sampling_temperature)` (Gumbel-max; argmax when the
   temperature is 0); known positions keep theirs.
2. Last step: everything is unmasked. Otherwise `n_i = max(1, min(m_i - 1, floor(N * gamma(r_i))))` positions stay
   masked (`m_i`: positions masked before the step; never more than `m_i`): those with the lowest confidence
   `log p(drawn id) + t_i * Gumbel`, with the choice temperature `t_i = temperature * (1 - r_i)` ("linear"
   annealing, MaskGiT's; or `temperature` throughout, "constant"). Known positions are never re-masked.

Masking schedules gamma(r) (fraction of N masked once a fraction r of the steps is done):
`cosine`: cos(pi r / 2) (MaskGiT); `arccos`: arccos(r) / (pi / 2) (TiTok); `linear`: 1 - r.

Guidance (applied by the pipeline): `logits = logits_null + w_i * (logits_class - logits_null)`, so w = 1 is the
plain conditional model. With `guidance_scale` g:
`constant`: w_i = g; `linear`: w_i = 1 + (g - 1) * i / (S - 1) (1 at the first step, g at the last; g if S = 1);
`power-cosine` (MDT, as in TiTok): w_i = 1 + (g - 1) * (1 - cos(pi * (i / S) ** guidance_power)) / 2.
(TiTok writes guidance as `cond + s (cond - null)`, i.e. w = 1 + s.)

Training: `add_noise` draws u ~ U(0, 1) per sample, masks exactly `clamp(round(N * gamma(u)), 1, N)` positions chosen
uniformly at random (TiTok's `get_masked_tokens`), and returns the masked ids and the mask.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..utils.validation import check_float, check_int

MASKING_SCHEDULES = ("cosine", "arccos", "linear")
TEMPERATURE_SCHEDULES = ("linear", "constant")
GUIDANCE_SCHEDULES = ("constant", "linear", "power-cosine")

GeneratorType = torch.Generator | list[torch.Generator] | None


@dataclass
class MaskGiTSchedulerOutput(BaseOutput):
    """
    Output of [`MaskGiTScheduler.step`].

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, num_indices)`): ids after the step, `mask_token_id`
            where still masked; the next model input.
        pred_original_sample (`torch.LongTensor` of shape `(batch_size, num_indices)`): every masked position filled
            with its drawn id (a preview of the final sample).
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor


def uniform_noise(shape: tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    """U[0, 1) float32 noise of `shape` on `device`, drawn on the generator's device (a list: one generator per row)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([uniform_noise((1, *shape[1:]), g, device) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def _gumbel(shape: tuple[int, ...], generator: GeneratorType, device: torch.device) -> torch.Tensor:
    noise = uniform_noise(shape, generator, device)
    return -torch.log((-torch.log(noise.clamp_min(1e-20))).clamp_min(1e-20))


class MaskGiTScheduler(SchedulerMixin, ConfigMixin):
    r"""
    MaskGiT's parallel iterative decoding of token ids, and its training-time masking (see the module docstring for
    the exact formulas).

    Parameters:
        mask_token_id (`int`): id of a masked position (the transformer's `codebook_size`).
        masking_schedule (`str`): `"cosine"` (MaskGiT's), `"arccos"` (TiTok's) or `"linear"`; used for sampling
            and for training-time masking.
        temperature (`float`): choice temperature, the scale of the Gumbel noise on the confidence (MaskGiT: 4.5).
        temperature_schedule (`str`): `"linear"` (`temperature * (1 - (i + 1) / S)`, reaching 0 at the last step)
            or `"constant"`.
        sampling_temperature (`float`): temperature of the categorical draw of ids (1: sample the model's
            distribution, as MaskGiT; 0: argmax).
        guidance_schedule (`str`): `"constant"`, `"linear"` or `"power-cosine"`.
        guidance_power (`float`): exponent of `"power-cosine"` (TiTok's default 3).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        mask_token_id: int,
        masking_schedule: str = "cosine",
        temperature: float = 4.5,
        temperature_schedule: str = "linear",
        sampling_temperature: float = 1.0,
        guidance_schedule: str = "constant",
        guidance_power: float = 3.0,
    ):
        check_int("mask_token_id", mask_token_id, 1)
        for name, value, choices in (
            ("masking_schedule", masking_schedule, MASKING_SCHEDULES),
            ("temperature_schedule", temperature_schedule, TEMPERATURE_SCHEDULES),
            ("guidance_schedule", guidance_schedule, GUIDANCE_SCHEDULES),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        check_float("temperature", temperature, 0.0)
        check_float("sampling_temperature", sampling_temperature, 0.0)
        check_float("guidance_power", guidance_power, 0.0, exclusive_minimum=True)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.mask_ratios: torch.Tensor | None = None
        self.temperatures: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Schedules
    def mask_ratio(self, t: float | torch.Tensor) -> float | torch.Tensor:
        """gamma(t): the fraction of positions masked at progress `t` in [0, 1] (1 at t = 0, 0 at t = 1).

        For training, `mask_ratio(u)` with `u ~ U(0, 1)` is MaskGiT's masking-ratio distribution.
        """
        schedule = self.config.masking_schedule
        if isinstance(t, torch.Tensor):
            if t.numel() and (t.min() < 0 or t.max() > 1):
                raise ValueError("t must lie in [0, 1]")
            t = t.double() if not t.is_floating_point() else t
            if schedule == "cosine":
                return torch.cos(t * (math.pi / 2))
            if schedule == "arccos":
                return torch.arccos(t) / (math.pi / 2)
            return 1 - t
        t = check_float("t", t, 0.0, 1.0)
        if schedule == "cosine":
            return math.cos(t * math.pi / 2)
        if schedule == "arccos":
            return math.acos(t) / (math.pi / 2)
        return 1.0 - t

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Prepare `S = num_inference_steps` steps: `timesteps` are the step indices 0..S-1, `mask_ratios[i]` is
        gamma((i + 1) / S) and `temperatures[i]` the choice temperature of step i."""
        steps = check_int("num_inference_steps", num_inference_steps, 1)
        self.num_inference_steps = steps
        self.timesteps = torch.arange(steps, device=device)
        self.mask_ratios = torch.tensor(
            [self.mask_ratio((i + 1) / steps) for i in range(steps)], dtype=torch.float64, device=device
        )
        temperature = self.config.temperature
        if self.config.temperature_schedule == "linear":
            values = [temperature * (1 - (i + 1) / steps) for i in range(steps)]
        else:
            values = [temperature] * steps
        self.temperatures = torch.tensor(values, dtype=torch.float32, device=device)

    def _check_step_index(self, step_index: int | torch.Tensor) -> int:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before stepping")
        if isinstance(step_index, torch.Tensor):
            step_index = int(step_index.item())
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"step_index must lie in [0, {self.num_inference_steps}), got {step_index}")
        return step_index

    def num_masked_after_step(self, step_index: int | torch.Tensor, num_indices: int) -> int:
        """The schedule's count of masked positions after step `step_index`: `floor(N * gamma((i + 1) / S))`, 0 after
        the last step. `step` keeps exactly this many masked, except that it always unmasks at least one position
        per step and keeps at least one masked before the last step."""
        step_index = self._check_step_index(step_index)
        if step_index == self.num_inference_steps - 1:
            return 0
        return int(math.floor(num_indices * float(self.mask_ratios[step_index])))

    def guidance_scale_at(self, step_index: int | torch.Tensor, guidance_scale: float) -> float:
        """The guidance weight w_i of step `step_index` for a pipeline's `guidance_scale` g (see module docstring)."""
        step_index = self._check_step_index(step_index)
        steps = self.num_inference_steps
        schedule = self.config.guidance_schedule
        if schedule == "constant":
            return float(guidance_scale)
        if schedule == "linear":
            fraction = step_index / (steps - 1) if steps > 1 else 1.0
        else:  # power-cosine
            fraction = (1 - math.cos(math.pi * (step_index / steps) ** self.config.guidance_power)) / 2
        return 1.0 + (guidance_scale - 1.0) * fraction

    # ----------------------------------------------------------------------------------------------------------
    def _check_ids(self, sample: torch.Tensor, name: str = "sample") -> None:
        if not isinstance(sample, torch.Tensor) or sample.is_floating_point() or sample.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of token ids")
        if sample.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, num_indices), got {tuple(sample.shape)}")
        if sample.numel() and (sample.min() < 0 or sample.max() > self.config.mask_token_id):
            raise ValueError(f"{name} must lie in [0, {self.config.mask_token_id}] (the last is the mask id)")

    def _draw_ids(self, logits: torch.Tensor, generator: GeneratorType) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids drawn from softmax(logits / sampling_temperature) and their log-probabilities under it."""
        temperature = self.config.sampling_temperature
        if temperature == 0:
            log_probs = logits.log_softmax(dim=-1)
            ids = log_probs.argmax(dim=-1)
        else:
            log_probs = (logits / temperature).log_softmax(dim=-1)
            ids = (log_probs + _gumbel(tuple(logits.shape), generator, logits.device)).argmax(dim=-1)
        return ids, log_probs.gather(-1, ids[..., None])[..., 0]

    def step(
        self,
        model_output: torch.Tensor,
        step_index: int | torch.Tensor,
        sample: torch.LongTensor,
        generator: GeneratorType = None,
        return_dict: bool = True,
    ) -> MaskGiTSchedulerOutput | tuple[torch.LongTensor, torch.LongTensor]:
        """
        One unmasking step.

        Args:
            model_output (`torch.Tensor` of shape `(B, N, codebook_size)`): logits (after guidance).
            step_index (`int`): the step, an element of `timesteps` (0..S-1).
            sample (`torch.LongTensor` of shape `(B, N)`): current ids, `mask_token_id` where masked.
            generator (`GeneratorType`, *optional*):
                a `torch.Generator` (or one per sample) for the id draws and the confidence noise.
            return_dict (`bool`): return a [`MaskGiTSchedulerOutput`] rather than a tuple.

        Returns:
            `prev_sample` (ids after the step) and `pred_original_sample` (all masked positions filled).
        """
        step_index = self._check_step_index(step_index)
        self._check_ids(sample)
        if model_output.ndim != 3 or model_output.shape[:2] != sample.shape:
            raise ValueError(
                f"model_output must have shape (batch, num_indices, codebook_size) = ({sample.shape[0]}, "
                f"{sample.shape[1]}, V), got {tuple(model_output.shape)}"
            )
        if model_output.shape[-1] > self.config.mask_token_id:
            raise ValueError(
                f"model_output predicts {model_output.shape[-1]} ids, more than mask_token_id "
                f"{self.config.mask_token_id} allows"
            )
        mask_id = self.config.mask_token_id
        batch_size, seq_len = sample.shape
        unknown = sample == mask_id

        drawn, log_probs = self._draw_ids(model_output.float(), generator)
        pred_original_sample = torch.where(unknown, drawn, sample)

        if step_index == self.num_inference_steps - 1:
            prev_sample = pred_original_sample
        else:
            num_unknown = unknown.sum(dim=-1)
            target = self.num_masked_after_step(step_index, seq_len)
            # MaskGiT: keep at least one masked (until the last step), unmask at least one; never re-mask known ids.
            keep_masked = (num_unknown - 1).clamp(max=target).clamp(min=1).minimum(num_unknown)
            confidence = log_probs + self.temperatures[step_index].to(sample.device) * _gumbel(
                (batch_size, seq_len), generator, sample.device
            )
            confidence = torch.where(unknown, confidence, torch.full_like(confidence, math.inf))
            # Rank by confidence (exact counts even with ties) and re-mask the `keep_masked` least confident.
            order = confidence.argsort(dim=-1, stable=True)
            ranks = torch.empty_like(order).scatter_(
                1, order, torch.arange(seq_len, device=sample.device).expand(batch_size, -1).contiguous()
            )
            remask = ranks < keep_masked[:, None]
            prev_sample = torch.where(remask, torch.full_like(sample, mask_id), pred_original_sample)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return MaskGiTSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # ----------------------------------------------------------------------------------------------------------
    def add_noise(
        self,
        sample: torch.LongTensor,
        generator: GeneratorType = None,
        mask_ratio: float | torch.Tensor | None = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """
        Training-time masking.

        Args:
            sample (`torch.LongTensor` of shape `(B, N)`): clean ids.
            generator (`GeneratorType`, *optional*):
                a `torch.Generator` (or one per sample).
            mask_ratio (`float` or `torch.Tensor` of shape `(B,)`, *optional*): fraction to mask per sample; drawn
                as `gamma(u)`, `u ~ U(0, 1)`, when None.

        Returns:
            `(masked_ids, mask)`: `masked_ids` has `mask_token_id` where `mask` (bool `(B, N)`) is True; each sample
            has exactly `clamp(round(N * ratio), 1, N)` masked positions, chosen uniformly at random.
        """
        self._check_ids(sample)
        if (sample == self.config.mask_token_id).any():
            raise ValueError("sample must be clean ids, without mask ids")
        batch_size, seq_len = sample.shape
        device = sample.device
        if mask_ratio is None:
            ratio = self.mask_ratio(uniform_noise((batch_size,), generator, device))
        else:
            ratio = torch.as_tensor(mask_ratio, dtype=torch.float32, device=device).expand(batch_size)
            if ratio.min() < 0 or ratio.max() > 1:
                raise ValueError("mask_ratio must lie in [0, 1]")
        num_masked = (ratio.float() * seq_len).round().clamp(1, seq_len).long()
        # The rank of each position in a random order: the first `num_masked` ranks form a uniform random subset.
        ranks = uniform_noise((batch_size, seq_len), generator, device).argsort(dim=-1).argsort(dim=-1)
        mask = ranks < num_masked[:, None]
        masked = torch.where(mask, torch.full_like(sample, self.config.mask_token_id), sample)
        return masked, mask
