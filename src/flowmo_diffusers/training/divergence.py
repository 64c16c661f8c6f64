"""The divergence guard: a step whose loss or gradients are non-finite is skipped, and no checkpoint or saved pipeline
ever holds a non-finite weight (docs/divergence.md).

The training loops already read one reduced dict per optimizer step (for logging); the guard rides on it: the
scripts add [`nonfinite_flag`] of the step's loss and gradient norm to that dict, reduce it once, and ask
[`DivergenceGuard.admit`] whether to step. Checking the weights themselves ([`check_finite_weights`]) costs one
host sync, so it runs only at save time and on the (rare) skip path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from ..utils.validation import check_int
from .checkpoint_folders import list_checkpoints
from .distributed import DTensor, full_tensor, local_tensor, mean_across_processes
from .ema import EMACheckpoint

#: Default of `--max_skipped_steps`: one bad batch (or a loss spike or two) is survivable; several in a row mean the
#: weights or the learning rate are broken, and skipping on would only burn compute.
DEFAULT_MAX_SKIPPED_STEPS = 3


class TrainingDivergedError(FloatingPointError):
    """Training diverged: too many non-finite steps in a row, or non-finite weights that must not be saved."""


def last_finite_checkpoint(output_dir: str | None) -> str:
    """A phrase naming the newest complete checkpoint of `output_dir` (every saved one is finite), for errors."""
    if output_dir is not None and os.path.isdir(output_dir) and (checkpoints := list_checkpoints(output_dir)):
        return f"the last finite checkpoint is {checkpoints[-1][1]} (resume from it with a lower --learning_rate)"
    return "there is no finite checkpoint to resume from"


def gradient_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The total 2-norm of the gradients of `parameters` (a 0-dim float32 tensor on their device), without a host sync.

    Non-finite if and only if some gradient holds a NaN or an infinity. Used when `--max_grad_norm` is unset (else
    `accelerator.clip_grad_norm_` returns the same norm); FSDP2 shards are reduced to the norm of the whole.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # torch._foreach_norm: one kernel per dtype/device group (torch.nn.utils.get_total_norm exists from torch 2.6 only).
    norms = torch._foreach_norm([local_tensor(grad) for grad in grads])
    squared = torch.stack([norm.float() for norm in norms]).square().sum()
    if any(isinstance(grad, DTensor) for grad in grads):  # each process holds shards: sum their squares
        torch.distributed.all_reduce(squared)
    return squared.sqrt()


def nonfinite_flag(loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> torch.Tensor:
    """`1.0` if `loss` (or `grad_norm`, when given) is NaN or infinite, else `0.0`: a 0-dim float tensor, no sync.

    Put it in the dict the loop reduces (mean over processes) and read it with the losses: a positive mean means
    some process saw a non-finite value, and every process then skips the step together. Leave `grad_norm` out under
    fp16, whose GradScaler already skips steps with infinite (scaled) gradients as part of normal training.
    """
    finite = torch.isfinite(loss.detach().float()).all()
    if grad_norm is not None:
        finite = finite & torch.isfinite(full_tensor(grad_norm).detach().float().to(finite.device))
    return (~finite).float()


def skip_optimizer_step(accelerator, optimizer) -> None:
    """Drop the step's gradients without updating: the optimizer, its state and (fp16) the grad scale stay as they are.

    Under fp16, gradients that were unscaled for clipping leave the GradScaler expecting a `step`; `update()` closes
    that bookkeeping (a private state check, as GradScaler offers no public one) so the next step's unscale works.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        state = scaler._per_optimizer_states.get(id(inner), {})
        if state.get("found_inf_per_device"):
            scaler.update()
    optimizer.zero_grad(set_to_none=True)


#: Test hook: comma-separated 1-based micro-batch numbers whose loss is made NaN (exercises the skip path end to end).
DEBUG_NONFINITE_BATCHES_ENV = "FLOWMO_DEBUG_NONFINITE_BATCHES"


def inject_debug_nonfinite(loss: torch.Tensor, batch_number: int) -> torch.Tensor:
    """`loss` times NaN if `batch_number` is listed in `$FLOWMO_DEBUG_NONFINITE_BATCHES`, else `loss` itself."""
    listed = os.environ.get(DEBUG_NONFINITE_BATCHES_ENV, "")
    if listed and str(batch_number) in listed.split(","):
        return loss * float("nan")
    return loss


class DivergenceGuard:
    """Counts non-finite optimizer steps in a row and stops the run past `max_skipped_steps`.

    Args:
        max_skipped_steps (`int`, *optional*, defaults to `3`):
            non-finite steps in a row that are skipped; the next one raises [`TrainingDivergedError`].
        output_dir (`str`, *optional*):
            the run's folder, to name its last finite checkpoint in the error.
        log (`Callable[[str], None]`, *optional*):
            where `step N skipped: ...` lines go.
    """

    def __init__(self, max_skipped_steps: int = DEFAULT_MAX_SKIPPED_STEPS, output_dir: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.max_skipped_steps = check_int("max_skipped_steps", max_skipped_steps, 0)
        self.output_dir = output_dir
        self.log = log or (lambda message: None)
        self.skipped_in_a_row = 0
        self.total_skipped = 0

    def admit(self, step: int, nonfinite: float | bool) -> bool:
        """Whether optimizer step `step` (1-based, the one being attempted) may update the weights.

        `nonfinite` is the reduced [`nonfinite_flag`] (any positive value means non-finite). A finite step resets
        the count and returns `True`; a non-finite one is logged and returns `False`, or raises past the limit.
        """
        if not (nonfinite > 0 or (isinstance(nonfinite, float) and math.isnan(nonfinite))):
            self.skipped_in_a_row = 0
            return True
        self.skipped_in_a_row += 1
        self.total_skipped += 1
        if self.skipped_in_a_row > self.max_skipped_steps:
            raise TrainingDivergedError(
                f"step {step}: non-finite loss/gradients {self.skipped_in_a_row} steps in a row, more than "
                f"--max_skipped_steps {self.max_skipped_steps}; {last_finite_checkpoint(self.output_dir)}"
            )
        self.log(f"step {step} skipped: non-finite loss/gradients ({self.skipped_in_a_row} in a row)")
        return False

    def state_dict(self) -> dict:
        return {"skipped_in_a_row": self.skipped_in_a_row, "total_skipped": self.total_skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_in_a_row = int(state_dict["skipped_in_a_row"])
        self.total_skipped = int(state_dict["total_skipped"])


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    """The floating-point tensors of an optimizer's state (Adam's moments; an `AcceleratedOptimizer` is unwrapped)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [value for state in inner.state.values() for value in state.values()
            if isinstance(value, torch.Tensor) and value.is_floating_point()]


def state_tensors(states: Mapping[str, Any] | None) -> dict[str, list[torch.Tensor]]:
    """The weights held by checkpoint `states` that must be finite: the shadow weights of an EMA."""
    found = {}
    for name, state in (states or {}).items():
        ema = state.ema if isinstance(state, EMACheckpoint) else state
        if isinstance(ema, EMAModel):
            found[name] = list(ema.shadow_params)
    return found


def synchronize_step(
    accelerator,
    optimizer,
    running: dict[str, torch.Tensor],
    parameters: Iterable[torch.Tensor],
    weights: Iterable[torch.Tensor],
    *,
    guard: DivergenceGuard,
    preemption,
    step: int,
    output_dir: str | None,
    max_grad_norm: float | None = None,
) -> tuple[dict[str, float] | None, bool]:
    """An optimizer step's one host sync, as every training script takes it: gradient norm (clipped with
    `max_grad_norm`), the non-finite and preemption flags and the step's losses reduced together, then step or skip.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        optimizer (`torch.optim.Optimizer`): the prepared optimizer; a skipped step drops its gradients.
        running (`dict[str, torch.Tensor]`): the step's accumulated values (at least `"loss"`), 0-dim tensors.
        parameters (`Iterable[torch.Tensor]`): the trained module's parameters, for the gradient norm.
        weights (`Iterable[torch.Tensor]`): the model's weights, checked for non-finite values when a step is skipped.
        guard ([`DivergenceGuard`]): decides whether the step may update.
        preemption ([`~flowmo_diffusers.training.preemption.PreemptionGuard`]): its flag travels in the same reduce.
        step (`int`): optimizer steps taken so far (the step attempted is `step + 1`).
        output_dir (`str`, *optional*): the run's folder, named in a divergence error.
        max_grad_norm (`float`, *optional*): clip the gradients to this norm; None: no clipping.

    Returns:
        `tuple[dict[str, float] | None, bool]`: the reduced values of `running` (without the flags), or None when the
        step was skipped (no update: the caller goes on to the next batch); and whether some process was signalled.
    """
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    elif accelerator.scaler is None:
        grad_norm = gradient_norm(parameters)
    # fp16: the GradScaler skips steps with infinite gradients itself (normal training); only the loss counts.
    running["nonfinite"] = nonfinite_flag(running["loss"], grad_norm if accelerator.scaler is None else None)
    running["preempted"] = preemption.flag(accelerator.device)  # a signal on any process stops all of them
    logs = mean_across_processes(accelerator, running)  # one collective, one sync
    preempted = preemption.agreed(logs.pop("preempted"))
    if guard.admit(step + 1, logs.pop("nonfinite")):
        return logs, preempted
    skip_optimizer_step(accelerator, optimizer)
    # Finite gradients cannot make the loss NaN on healthy weights: was it the previous update (lr too high)?
    check_finite_weights(accelerator, {"model": weights}, step, output_dir, "its update made the weights non-finite")
    return None, preempted


@torch.no_grad()
def count_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """How many of `tensors` hold a NaN or an infinity: a 0-dim int64 tensor, computed on their device, no sync."""
    flags = [(~torch.isfinite(local_tensor(t))).any() for t in tensors if t.numel()]
    if not flags:
        return torch.zeros((), dtype=torch.int64)
    device = flags[0].device
    return torch.stack([flag.to(device) for flag in flags]).sum()


def check_finite_weights(accelerator, groups: Mapping[str, Iterable[torch.Tensor]], step: int,
                         output_dir: str | None, what: str) -> None:
    """Raise [`TrainingDivergedError`] if a tensor of any group holds a non-finite value, on every process alike.

    One host sync: the per-group counts are summed over processes (FSDP2 shards differ) and read once.

    Args:
        accelerator (`accelerate.Accelerator`): reduces the counts over processes.
        groups (`Mapping[str, Iterable[torch.Tensor]]`): name (model, optimizer, ema) -> tensors.
        step (`int`): the optimizer step whose weights these are, for the message.
        output_dir (`str`, *optional*): names its last finite checkpoint in the message.
        what (`str`): what is refused or found, e.g. `"refusing to save checkpoint-12"`.
    """
    names = list(groups)
    counts = torch.stack([count_nonfinite(groups[name]).to(accelerator.device) for name in names])
    counts = accelerator.reduce(counts, reduction="sum").tolist()
    bad = [f"{count} {name} tensor(s)" for name, count in zip(names, counts) if count]
    if bad:
        raise TrainingDivergedError(
            f"step {step}: {what} (non-finite values in {', '.join(bad)}); {last_finite_checkpoint(output_dir)}"
        )


__all__ = [
    "DEFAULT_MAX_SKIPPED_STEPS",
    "DivergenceGuard",
    "TrainingDivergedError",
    "check_finite_weights",
    "count_nonfinite",
    "gradient_norm",
    "inject_debug_nonfinite",
    "last_finite_checkpoint",
    "nonfinite_flag",
    "optimizer_state_tensors",
    "skip_optimizer_step",
    "state_tensors",
    "synchronize_step",
]
