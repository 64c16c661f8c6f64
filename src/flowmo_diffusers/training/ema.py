"""EMA of the weights as the original FlowMo keeps it, expressed with diffusers' `EMAModel`.

The EMA averages shard by shard under FSDP2 (the update is elementwise) and [`EMACheckpoint`] saves whole tensors, so
checkpoints are the same files whatever the sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from diffusers.training_utils import EMAModel

from ..utils.validation import check_float, check_int

from .distributed import full_tensor, like_shard


def create_ema(parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, update_every: int = 10, **kwargs) -> EMAModel:
    """diffusers `EMAModel` that applies the fixed decay `decay ** update_every` at every `step`.

    Call `step` only every `update_every`-th optimizer step ([`ema_update_due`], through [`update_ema`]): that is
    the original's `SimpleEMA` (a copy of the model at creation, then `ema <- d^10 ema + (1 - d^10) model` after
    optimizer steps 1, 11, 21, ...), with no warm-up. `EMAModel` expresses it exactly: its `get_decay` returns
    `max(min(warmup, decay), min_decay)`, so `min_decay = decay` pins the value, and `update_after_step=-1` skips
    the branch that returns 0 (a plain copy) on the first call.
    """
    effective = check_float("decay", decay, 0.0, 1.0) ** check_int("update_every", update_every, 1)
    return EMAModel(
        parameters,
        decay=effective,
        min_decay=effective,
        update_after_step=-1,
        use_ema_warmup=False,
        **kwargs,
    )


class EMACheckpoint:
    """What the checkpoint `states` should hold for an `EMAModel`: the same state dict, with whole shadow tensors
    even when they are FSDP2 shards.

    [`save_checkpoint`] calls `state_dict` on every process and writes the main process's result. For `DTensor` shadows
    that file would hold only the main process's shards, so the shadows are gathered first (every process takes part
    in the collective); loading gives each process its shards again (`distribute_tensor` with the layout of the live
    shadow). Without sharding it is `EMAModel`'s own state dict, so checkpoints do not depend on the sharding.
    """

    def __init__(self, ema: EMAModel):
        self.ema = ema

    def state_dict(self) -> dict:
        state = self.ema.state_dict()
        state["shadow_params"] = [full_tensor(shadow).detach().clone() for shadow in state["shadow_params"]]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        live = list(self.ema.shadow_params)
        saved = state_dict.get("shadow_params")
        if saved is not None and len(saved) != len(live):
            raise ValueError(f"the EMA checkpoint holds {len(saved)} tensors, the model has {len(live)} parameters")
        if saved is not None:
            state_dict = dict(state_dict)
            state_dict["shadow_params"] = [like_shard(tensor, shadow) for tensor, shadow in zip(saved, live)]
        self.ema.load_state_dict(state_dict)


def ema_update_due(global_step: int, update_every: int = 10) -> bool:
    """Whether the EMA updates after optimizer step `global_step` (1-based): steps 1, 1 + k, 1 + 2k, ...

    The original updates when its 0-based step counter, read before incrementing, is a multiple of `update_every`.
    """
    return (global_step - 1) % update_every == 0


@contextlib.contextmanager
def _all_require_grad(parameters: list[torch.nn.Parameter]):
    frozen = [p for p in parameters if not p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def update_ema(ema: EMAModel, parameters: Iterable[torch.nn.Parameter]) -> None:
    """`ema.step(parameters)`, averaging frozen parameters too.

    `EMAModel.step` *copies* parameters with `requires_grad=False` instead of averaging them; the original keeps
    averaging the frozen encoder (its EMA converges to it), so they are marked trainable for the duration of the
    call (no graph exists there: the flag only steers `EMAModel`).
    """
    parameters = list(parameters)
    with torch.no_grad(), _all_require_grad(parameters):
        ema.step(parameters)


__all__ = ["EMACheckpoint", "create_ema", "ema_update_due", "update_ema"]
