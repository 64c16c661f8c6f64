"""Summing metric states across processes (Accelerate or plain ``torch.distributed``).

All metric states in this package are sums (of per-image values, of features, of
feature outer products) and counts, so combining processes is one all-reduce with
``SUM`` per tensor: no per-image data is ever gathered.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def _communication_device(accelerator: Optional[Any]) -> Optional[torch.device]:
    if accelerator is not None:
        return torch.device(accelerator.device)
    if dist.get_backend() == dist.Backend.NCCL:
        # NCCL only reduces CUDA tensors.
        return torch.device("cuda", torch.cuda.current_device())
    return None


def sum_across_processes(tensor: torch.Tensor, accelerator: Optional[Any] = None) -> torch.Tensor:
    """Sum ``tensor`` over all processes; every process receives the total.

    Args:
        tensor: Any tensor (float64 sums and int64 counts in this package). It is not
            modified; the result is a new tensor on the same device as the input.
        accelerator: An ``accelerate.Accelerator``. If None, ``torch.distributed`` is used
            when it is initialised, and a single process returns a copy.

    Returns:
        Tensor of the same shape, dtype and device as ``tensor``.
    """
    if accelerator is not None:
        if accelerator.num_processes == 1:
            return tensor.clone()
        reduced = accelerator.reduce(tensor.to(_communication_device(accelerator)), reduction="sum")
        return reduced.to(tensor.device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.clone()
    device = _communication_device(None)
    reduced = tensor.to(device, copy=True) if device is not None else tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)
