"""Summing metric states across processes (Accelerate or plain ``torch.distributed``).

Almost all metric states in this package are sums (of per-image values, of features, of
feature outer products) and counts, so combining processes is one all-reduce with
``SUM`` per tensor. The one exception is the Inception Score, which needs every sample's
class probabilities: :func:`gather_rows_across_processes` collects those.
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


def gather_rows_across_processes(rows: torch.Tensor, accelerator: Optional[Any] = None) -> torch.Tensor:
    """Concatenate every process' rows, in process-rank order; every process receives the result.

    Unlike :func:`sum_across_processes` this moves per-sample data; it is meant for the few
    quantities that are not sums (the Inception Score needs every sample's class
    probabilities). Processes may hold different numbers of rows: the counts are exchanged
    first, the rows are padded to the largest count for the all-gather and the padding is
    dropped again.

    Args:
        rows: [N_p, ...] tensor on process p (N_p may be 0; trailing shape and dtype must
            agree across processes).
        accelerator: An ``accelerate.Accelerator``. If None, ``torch.distributed`` is used
            when it is initialised, and a single process returns a copy.

    Returns:
        [sum_p N_p, ...] tensor on the input's device.
    """
    if accelerator is not None:
        if accelerator.num_processes == 1:
            return rows.clone()
        device = _communication_device(accelerator)

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            return accelerator.gather(tensor)

    else:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return rows.clone()
        device = _communication_device(None)

        def all_gather(tensor: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, tensor.contiguous())
            return torch.cat(parts)

    device = device if device is not None else rows.device
    counts = all_gather(torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)).tolist()
    largest = max(counts)
    padded = torch.zeros((largest, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = all_gather(padded)
    parts = [gathered[rank * largest : rank * largest + count] for rank, count in enumerate(counts)]
    return torch.cat(parts).to(rows.device)
