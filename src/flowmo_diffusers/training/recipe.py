"""FlowMo's training recipe, shared by the example scripts: initial-norm fixing, encoder freezing, guidance dropout
and the progress counters saved with every checkpoint.

Everything that must survive a resume has ``state_dict`` / ``load_state_dict`` holding tensors, numbers and strings
only, meant for the ``states`` of [`~flowmo_diffusers.training.checkpointing.save_checkpoint`] (JSON + safetensors;
never ``accelerator.register_for_checkpointing``, whose pickles Accelerate loads with ``weights_only=False``). Under
FSDP2 the norm fix takes the norm of the whole weight (a reduction across the shards) and scales the local shard.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.validation import check_float

from .distributed import full_tensor, local_tensor


def weights_to_fix(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, weight)` of every `nn.Linear` inside the double-stream blocks of the encoder and decoder.

    These are the original's `double_blocks` Linear layers (qkv, attention output projection, MLP and modulation, of
    both streams); `name` is the module name relative to `model` (a `FlowMoModel`, or any module holding one, e.g.
    a training wrapper: names then carry its prefix).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"(^|\.)(encoder|decoder)\.blocks\.", name):
            yield name, module.weight


class InitialNormFixer:
    """Keeps the Frobenius norm of every double-block Linear weight at its value at the start of training.

    FlowMo rescales these weights after every optimizer step, `w <- w / ||w|| * ||w_0||`. Call [`record`] once on the
    freshly built (or freshly loaded) model, [`apply`] after every optimizer step. The recorded norms are part of
    the state dict, so passing this object in the checkpoint `states` restores them on resume
    (where the model's current norms are, up to rounding, the same, but the original ones are the reference).
    """

    def __init__(self):
        self.norms: dict[str, torch.Tensor] = {}
        self._device_norms: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    def record(self, model: nn.Module) -> None:
        self.norms = {
            name: full_tensor(torch.linalg.vector_norm(weight.float())).detach().cpu()
            for name, weight in weights_to_fix(model)
        }
        self._device_norms = {}
        if not self.norms:
            raise ValueError("found no Linear layer inside encoder.blocks / decoder.blocks to fix the norm of")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        if not self.norms:
            raise RuntimeError("InitialNormFixer.apply called before record (or load_state_dict)")
        seen = 0
        for name, weight in weights_to_fix(model):
            if name not in self.norms:
                raise KeyError(f"no recorded norm for {name!r}; was record() called on a model with other names?")
            key = (name, weight.device)
            if key not in self._device_norms:  # one host-to-device copy per weight, not one per step
                self._device_norms[key] = self.norms[name].to(device=weight.device, dtype=torch.float32)
            # Sharded (FSDP2): the norm is reduced over all shards, each process scales its own shard.
            scale = self._device_norms[key] / full_tensor(torch.linalg.vector_norm(weight.float()))
            local_tensor(weight).mul_(scale.to(weight.dtype))
            seen += 1
        if seen != len(self.norms):
            raise KeyError(f"recorded {len(self.norms)} norms but the model has {seen} weights to fix")

    def state_dict(self) -> dict:
        return {"norms": dict(self.norms)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.norms = {name: torch.as_tensor(value).float().cpu() for name, value in state_dict["norms"].items()}
        self._device_norms = {}


# ----------------------------------------------------------------------------------------------------------------------
# Encoder freezing
# ----------------------------------------------------------------------------------------------------------------------


def optimizer_param_groups(model: nn.Module, include_encoder: bool = True) -> list[dict]:
    """Adam parameter groups as in the original: `{"name": "encoder"}` and `{"name": "decoder"}` (everything else).

    `model` is a `FlowMoModel` or a module holding one; encoder parameters are those whose name has an `encoder.`
    component. With `include_encoder=False` (the encoder is already frozen) only the decoder group is returned.
    """
    encoder, decoder = [], []
    for name, parameter in model.named_parameters():
        (encoder if re.search(r"(^|\.)encoder\.", name) else decoder).append(parameter)
    if not encoder:
        raise ValueError("found no encoder parameters")
    groups = [{"params": encoder, "name": "encoder"}] if include_encoder else []
    return groups + [{"params": decoder, "name": "decoder"}]


def encoder_module(model: nn.Module) -> nn.Module:
    """The `encoder` submodule of a `FlowMoModel` or of a module holding one as `autoencoder`."""
    return model.encoder if hasattr(model, "encoder") else model.autoencoder.encoder


def freeze_encoder(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, reset_optimizer_state: bool = True
) -> int:
    """Freeze the encoder: `requires_grad_(False)` and, if given, drop its parameters from `optimizer`.

    The original freezes the encoder after 200k steps by rebuilding Adam over the decoder parameters only, which also
    restarts the decoder's Adam moments and step counts (bias correction starts over). Here the encoder's parameter
    group and its state are removed from the existing optimizer (an `AcceleratedOptimizer` is unwrapped) and, with
    `reset_optimizer_state` (the default, as the original), the remaining state is cleared so that the next step is
    the first step of a fresh Adam; `False` keeps the decoder's moments. The encoder is not updated afterwards and
    its Adam state no longer takes memory.

    Returns the number of encoder parameters removed from the optimizer.
    """
    encoder = encoder_module(model)
    encoder.requires_grad_(False)
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)
    encoder_ids = {id(p) for p in encoder.parameters()}
    removed = 0
    for group in list(inner.param_groups):
        kept = [p for p in group["params"] if id(p) not in encoder_ids]
        for parameter in group["params"]:
            if id(parameter) in encoder_ids:
                inner.state.pop(parameter, None)
                removed += 1
        if not kept:
            inner.param_groups.remove(group)
        else:
            group["params"] = kept
    if reset_optimizer_state:
        inner.state.clear()  # torch's Adam(W) re-initializes a parameter's state when it finds none
    return removed


def guidance_dropout_mask(
    batch_size: int, probability: float = 0.1, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """`(batch_size,)` float mask, 1 keeps a sample's code and 0 replaces it by the null code (probability `p`).

    As the original: a sample keeps its code when `uniform > p`. Pass it as `code_mask` to `FlowMoModel`.
    """
    probability = check_float("probability", probability, 0.0, 1.0)
    return (torch.rand((batch_size,), generator=generator, device=device) > probability).float()


# ----------------------------------------------------------------------------------------------------------------------
# Progress and checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (pass it in the `states` of [`save_checkpoint`]).

    Attributes:
        global_step (`int`, *optional*, defaults to `0`):
            optimizer steps done.
        batches_consumed (`int`, *optional*, defaults to `0`):
            training batches drawn by each process (micro-batches, `global_step *
            gradient_accumulation_steps` for a run that never changed it); passed back as `skip_batches`.
        encoder_frozen (`bool`, *optional*, defaults to `False`):
            whether the encoder was frozen (and dropped from the optimizer) when saved.
    """

    global_step: int = 0
    batches_consumed: int = 0
    encoder_frozen: bool = False

    def state_dict(self) -> dict:
        return {
            "global_step": int(self.global_step),
            "batches_consumed": int(self.batches_consumed),
            "encoder_frozen": bool(self.encoder_frozen),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.global_step = int(state_dict["global_step"])
        self.batches_consumed = int(state_dict["batches_consumed"])
        self.encoder_frozen = bool(state_dict.get("encoder_frozen", False))


__all__ = [
    "InitialNormFixer",
    "TrainingProgress",
    "encoder_module",
    "freeze_encoder",
    "guidance_dropout_mask",
    "optimizer_param_groups",
    "weights_to_fix",
]
