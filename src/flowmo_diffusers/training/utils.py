"""Helpers of FlowMo's training recipe that the example scripts share: initial-norm fixing, encoder freezing, EMA,
guidance dropout and training progress (checkpoint folders: `flowmo_diffusers.training.checkpointing`).

Everything that must survive a resume is an object with ``state_dict`` / ``load_state_dict`` holding tensors, numbers
and strings only, meant for the ``states`` of [`~flowmo_diffusers.training.checkpointing.save_checkpoint`] (JSON +
safetensors; never ``accelerator.register_for_checkpointing``, whose pickles Accelerate loads with
``weights_only=False``).

Under FSDP2 the parameters are sharded ``DTensor`` s. The helpers here work on them too: the norm fix takes the norm of
the whole weight (a reduction across the shards) and scales the local shard; the EMA averages shard by shard (the
update is elementwise) and [`EMACheckpoint`] saves whole tensors, so checkpoints are the same files whatever the
sharding.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from diffusers.training_utils import EMAModel
from torch import nn

# Checkpoint folders have their own module; these names stay importable from here for existing callers.
from .checkpointing import (  # noqa: F401
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temporary_checkpoints,
    resolve_resume_checkpoint,
    save_checkpoint,
    temporary_checkpoint_path,
)

try:  # public from torch 2.5; torch 2.4 has it under _tensor
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch version
    from torch.distributed._tensor import DTensor, distribute_tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded `DTensor` (a collective: call it on every process), or `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a `DTensor` this process holds (in-place updates reach the `DTensor`), or `tensor` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# ----------------------------------------------------------------------------------------------------------------------
# Initial-norm fixing
# ----------------------------------------------------------------------------------------------------------------------


def weights_to_fix(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
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
        self.norms: Dict[str, torch.Tensor] = {}
        self._device_norms: Dict[tuple, torch.Tensor] = {}

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


def optimizer_param_groups(model: nn.Module, include_encoder: bool = True) -> List[dict]:
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
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, reset_optimizer_state: bool = True
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


# ----------------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------------


def create_ema(parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, update_every: int = 10, **kwargs) -> EMAModel:
    """diffusers `EMAModel` that applies the fixed decay `decay ** update_every` at every `step`.

    Call `step` only every `update_every`-th optimizer step ([`ema_update_due`], through [`update_ema`]): that is
    the original's `SimpleEMA` (a copy of the model at creation, then `ema <- d^10 ema + (1 - d^10) model` after
    optimizer steps 1, 11, 21, ...), with no warm-up. `EMAModel` expresses it exactly: its `get_decay` returns
    `max(min(warmup, decay), min_decay)`, so `min_decay = decay` pins the value, and `update_after_step=-1` skips
    the branch that returns 0 (a plain copy) on the first call.
    """
    if not 0.0 <= decay <= 1.0 or update_every < 1:
        raise ValueError(f"need 0 <= decay <= 1 and update_every >= 1, got {decay} and {update_every}")
    effective = float(decay**update_every)
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
            state_dict["shadow_params"] = [
                distribute_tensor(tensor.to(shadow.device, shadow.dtype), shadow.device_mesh, shadow.placements)
                if isinstance(shadow, DTensor) else tensor
                for tensor, shadow in zip(saved, live)
            ]
        self.ema.load_state_dict(state_dict)


def ema_update_due(global_step: int, update_every: int = 10) -> bool:
    """Whether the EMA updates after optimizer step `global_step` (1-based): steps 1, 1 + k, 1 + 2k, ...

    The original updates when its 0-based step counter, read before incrementing, is a multiple of `update_every`.
    """
    return (global_step - 1) % update_every == 0


@contextlib.contextmanager
def _all_require_grad(parameters: List[torch.nn.Parameter]):
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


# ----------------------------------------------------------------------------------------------------------------------
# Guidance dropout
# ----------------------------------------------------------------------------------------------------------------------


def guidance_dropout_mask(
    batch_size: int, probability: float = 0.1, generator: Optional[torch.Generator] = None, device=None
) -> torch.Tensor:
    """`(batch_size,)` float mask, 1 keeps a sample's code and 0 replaces it by the null code (probability `p`).

    As the original: a sample keeps its code when `uniform > p`. Pass it as `code_mask` to `FlowMoModel`.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"guidance dropout probability must lie in [0, 1], got {probability}")
    return (torch.rand((batch_size,), generator=generator, device=device) > probability).float()


# ----------------------------------------------------------------------------------------------------------------------
# Progress and checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingProgress:
    """Counters saved with every checkpoint (pass it in the `states` of [`save_checkpoint`]).

    Attributes:
        global_step: optimizer steps done.
        batches_consumed: training batches drawn by each process (micro-batches, `global_step *
            gradient_accumulation_steps` for a run that never changed it); passed back as `skip_batches`.
        encoder_frozen: whether the encoder was frozen (and dropped from the optimizer) when saved.
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


def check_finite_loss(loss: float, step: int) -> None:
    """Raise `FloatingPointError` if `loss` is NaN or infinite.

    Call it with the loss reduced across processes (so every process stops together) *before* checkpointing `step`:
    `--resume_from_checkpoint latest` must never pick diverged weights.
    """
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: the loss is {loss}")


# ----------------------------------------------------------------------------------------------------------------------
# Validation figure and model card
# ----------------------------------------------------------------------------------------------------------------------


def validation_grid(rows: List[torch.Tensor], padding: int = 2):
    """PIL image with one row per batch of `(B, 3, H, W)` images in [-1, 1] (originals, reconstructions, ...)."""
    import PIL.Image
    from torchvision.utils import make_grid

    if not rows:
        raise ValueError("no rows to draw")
    images = torch.cat([row.detach().float().cpu().clamp(-1, 1) for row in rows]) / 2 + 0.5
    grid = make_grid(images, nrow=rows[0].shape[0], padding=padding, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return PIL.Image.fromarray(array)


def write_model_card(
    output_dir: str,
    *,
    repo_id: str,
    stage: str,
    command: str,
    model_config: dict,
    training_args: dict,
    base_model: Optional[str] = None,
    final_metrics: Optional[dict] = None,
    global_step: Optional[int] = None,
    images: Iterable[str] = (),
    ema: bool = False,
    summary: Optional[str] = None,
    usage: Optional[str] = None,
    metrics_caption: str = "PSNR (dB) on the fixed validation batch of the training script (top row: inputs).",
    tags: Iterable[str] = ("flowmo", "image-tokenizer"),
    pipeline_tag: str = "image-to-image",
) -> str:
    """Write `output_dir/README.md`: a Hub model card for a trained pipeline; returns its path.

    Records the stage, the exact command, the model config, the training arguments, the final validation metrics
    and the validation figures (paths relative to `output_dir`). `summary` and `usage` (Python code) replace the
    FlowMo tokenizer's defaults for other pipelines (the MaskGiT prior).
    """
    import json

    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="diffusers",
        license="mit",
        tags=[*tags, "diffusers", "diffusers-training"],
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        pipeline_tag=pipeline_tag,
    )
    stage_name = {"pretrain": "stage 1A pre-training (mode matching)", "posttrain": "stage 1B post-training (mode seeking)"}
    if summary is None and stage == "distill":
        passes = model_config.get("sampling_num_inference_steps")
        summary = (
            f"A {passes}-pass student of `{base_model}`: a [FlowMo](https://arxiv.org/abs/2503.11056) decoder distilled "
            f"with `flowmo-diffusers` ({global_step} optimizer steps) to reproduce in {passes} decoder passes, without a "
            "guidance pass, what the teacher decodes with its own sampler (the paper's: 25 steps, guidance 1.5, 31 "
            "passes) from the same token ids and noise. Its encoder is the teacher's, unchanged: it reads and writes "
            "the teacher's token ids, and `pipe(indices=ids)` decodes in "
            f"{passes} passes by default."
        )
    if summary is None:
        summary = (
            f"A [FlowMo](https://arxiv.org/abs/2503.11056) image tokenizer trained with `flowmo-diffusers` "
            f"({stage_name.get(stage, stage)}), {global_step} optimizer steps"
            + (f", starting from `{base_model}`" if base_model else "")
            + "."
        )
    if usage is None:
        usage = "\n".join([
            "from flowmo_diffusers import FlowMoPipeline",
            "",
            f'pipe = FlowMoPipeline.from_pretrained("{repo_id}")',
            "ids = pipe.encode(images)                 # token ids",
            "recon = pipe(indices=ids).images          # decoded images",
        ])
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo_id}",
        "",
        f"{summary} The weights are the {'EMA' if ema else 'final (non-EMA)'} weights.",
        "",
        "```python",
        usage,
        "```",
        "",
        "## Validation",
        "",
    ]
    if final_metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in final_metrics.items()]
        lines += ["", metrics_caption]
    for image in images:
        lines += ["", f"![reconstructions]({image})"]
    lines += [
        "",
        "## Training command",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Model config",
        "",
        "```json",
        json.dumps(model_config, indent=2, sort_keys=True, default=str),
        "```",
        "",
        "## Training arguments",
        "",
        "```json",
        json.dumps(training_args, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    card = ModelCard("\n".join(lines))
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


__all__ = [
    "EMACheckpoint",
    "InitialNormFixer",
    "TrainingProgress",
    "create_ema",
    "ema_update_due",
    "encoder_module",
    "freeze_encoder",
    "full_tensor",
    "local_tensor",
    "guidance_dropout_mask",
    "list_checkpoints",
    "load_checkpoint",
    "optimizer_param_groups",
    "prune_checkpoints",
    "publish_checkpoint",
    "remove_stale_temporary_checkpoints",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "temporary_checkpoint_path",
    "update_ema",
    "validation_grid",
    "weights_to_fix",
    "write_model_card",
]
