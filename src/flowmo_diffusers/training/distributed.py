"""Distributed helpers: the per-step reduce of the training loops, and FSDP2 helpers for training code that must work
on sharded ``DTensor`` parameters and on plain tensors alike."""

import torch

try:  # public from torch 2.5; torch 2.4 has it under _tensor
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch version
    from torch.distributed._tensor import DTensor, distribute_tensor


def mean_across_processes(accelerator, scalars: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean over processes of each scalar tensor of `scalars`, as Python floats, in one collective.

    The training loops' one host sync per optimizer step: the loss terms, the non-finite flag and the preemption flag
    are stacked into one tensor `(len(scalars),)`, reduced once and read once (`tolist`). `accelerator.reduce` of the
    dict itself would run one all-reduce per entry, so each flag added to the dict would add a collective per step.

    Args:
        accelerator (`accelerate.Accelerator`): reduces across its processes (a copy with one process).
        scalars (`dict[str, torch.Tensor]`): tensors of one element each, on `accelerator.device`.
    """
    names = list(scalars)
    stacked = torch.stack([scalars[name].detach().float().reshape(()) for name in names])
    return dict(zip(names, accelerator.reduce(stacked, reduction="mean").tolist()))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded `DTensor` (a collective: call it on every process), or `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a `DTensor` this process holds (in-place updates reach the `DTensor`), or `tensor` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like_shard(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole) laid out like `reference`: its shards when `reference` is a `DTensor`, else `tensor` itself."""
    if isinstance(reference, DTensor):
        return distribute_tensor(tensor.to(reference.device, reference.dtype), reference.device_mesh, reference.placements)
    return tensor


__all__ = ["DTensor", "full_tensor", "like_shard", "local_tensor", "mean_across_processes"]
