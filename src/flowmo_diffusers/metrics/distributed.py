"""Combining metric states across processes: Accelerate's collectives, or a plain `torch.distributed` group.

Almost all metric states in this package are sums (of per-image values, of features, of feature outer products) and
counts, so combining processes is one all-reduce with `SUM` per tensor (`accelerator.reduce`). The one exception
is the Inception Score, which needs every sample's class probabilities: [`gather_across_processes`] collects them
(`accelerate.utils.gather_object`).

Without an accelerator, a process group that the caller initialised with `torch.distributed` is used; accelerate's
free functions read Accelerate's own state, which such a group does not set up, so that path calls torch directly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _num_processes(accelerator: Any | None) -> int:
    if accelerator is not None:
        return accelerator.num_processes
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_across_processes(tensor: torch.Tensor, accelerator: Any | None = None) -> torch.Tensor:
    """Sum `tensor` over all processes; every process receives the total.

    Args:
        tensor (`torch.Tensor`):
            Any tensor (float64 sums and int64 counts in this package). It is not modified.
        accelerator (`accelerate.Accelerator`, *optional*):
            The run's accelerator. Without it, `torch.distributed` is used when it is initialised, and a single
            process returns a copy.

    Returns:
        `torch.Tensor`: A new tensor of the same shape, dtype and device as `tensor`.
    """
    if _num_processes(accelerator) == 1:
        return tensor.clone()
    if accelerator is not None:
        # accelerate reduces a tensor where it lies, and NCCL reduces only tensors on the process' GPU.
        return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").to(tensor.device)
    # NCCL reduces only CUDA tensors; gloo reduces them where they are.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == dist.Backend.NCCL else None
    reduced = tensor.to(device, copy=True) if device is not None else tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def gather_across_processes(value: Any, accelerator: Any | None = None) -> list[Any]:
    """Every process' `value`, in process-rank order; every process receives the list.

    Unlike [`sum_across_processes`] this moves per-sample data; it is meant for the few quantities that are not sums
    (the Inception Score needs every sample's class probabilities). Processes may hold values of different sizes.

    Args:
        value (`Any`):
            A picklable object, e.g. a tuple of CPU tensors.
        accelerator (`accelerate.Accelerator`, *optional*):
            The run's accelerator. Without it, `torch.distributed` is used when it is initialised, and a single
            process receives `[value]`.

    Returns:
        `list`: One entry per process.
    """
    if _num_processes(accelerator) == 1:
        return [value]
    if accelerator is not None:
        from accelerate.utils import gather_object

        return gather_object([value])
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values

