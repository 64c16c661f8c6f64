"""Training checkpoints: saved on every process together and published atomically; resumed without unpickling anything
that could run code.

A checkpoint is `accelerator.save_state` (weights as safetensors; optimizer, learning-rate scheduler and RNG states
as torch pickles) plus this package's own training states (progress counters, recorded norms, EMA shadows) as JSON +
safetensors (`training_states`: why not `accelerator.register_for_checkpointing`). This module holds the two entry
points, [`save_checkpoint`] and [`load_checkpoint`]; the parts live beside it: `checkpoint_folders` (names, the one
to resume from, atomic publishing, pruning), `checkpoint_verification` (every file checked before anything is
loaded, the RNG states compared after) and `utils.disk_space` (is a failed write a full disk?); import their names
from them.

A save that fails (a full disk above all, however the writer reports it: `ENOSPC`, `EIO`, or wrapped in torch's or
safetensors' own exception) fails on every process together, removes the incomplete folder and says how much space is
left and which earlier checkpoint is intact; nothing half-written is ever published.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from ..utils.disk_space import error_errno, free_bytes, is_out_of_space
from ..utils.safe_loading import UnsafeCheckpointError
from .checkpoint_folders import list_checkpoints, prune_checkpoints, publish_checkpoint, temporary_checkpoint_path
from .checkpoint_verification import check_rng_restored, verify_checkpoint_files
from .divergence import check_finite_weights, optimizer_state_tensors, state_tensors
from .training_states import load_training_states, save_training_states


def _describe_write_failure(error: BaseException, output_dir: str, step: int) -> tuple[int, str]:
    """`(errno, message)` of the OSError that a failed save of `checkpoint-<step>` raises (see [`save_checkpoint`])."""
    free = free_bytes(output_dir)
    previous = [path for _, path in list_checkpoints(output_dir)]
    intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    cause = f"{type(error).__name__}: {error}"
    if is_out_of_space(error, free):
        left = f"{free} bytes free" if free is not None else "free space unknown"
        return errno.ENOSPC, (
            f"no space left on {output_dir} ({left}) while writing checkpoint-{step}; the incomplete checkpoint was "
            f"removed and {intact}. Free some space (or lower --checkpoints_total_limit) and resume with "
            f"--resume_from_checkpoint latest ({cause})"
        )
    code = error_errno(error)
    return code, (
        f"could not write checkpoint-{step} in {output_dir}; the incomplete checkpoint was removed and {intact} ({cause})"
    )


def _write_on_every_process(accelerator, write: Callable[[], Any], output_dir: str, step: int) -> None:
    """Run `write` on every process; if it fails on any, remove the incomplete checkpoint and raise the same OSError
    on all of them (the first failing process' description), instead of leaving the others waiting for it.

    The outcome is exchanged in one `gather_object`, so `write` must reach it on every process: it holds no
    collective that a failure on one process could skip while the others enter it.
    """
    failure, mine = None, None
    try:
        write()
    except Exception as error:  # noqa: BLE001 - torch, safetensors and the OS report write failures differently
        failure, mine = error, _describe_write_failure(error, output_dir, step)
    described = [mine]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        described = gather_object(described)
    first = next((item for item in described if item is not None), None)
    if first is None:
        return
    if accelerator.is_main_process:
        shutil.rmtree(temporary_checkpoint_path(output_dir, step), ignore_errors=True)
    code, message = mine if mine is not None else (first[0], f"another process failed: {first[1]}")
    raise OSError(code, message) from failure


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None = None,
    log: Callable[[str], None] | None = None,
    states: Mapping[str, Any] | None = None,
) -> str:
    """`accelerator.save_state` plus `states` into `checkpoint-<step>.tmp`, then publish it atomically and prune.

    Call on every process (it synchronizes them). A crash mid-save leaves only a `.tmp` folder, which
    [`~.checkpoint_folders.resolve_resume_checkpoint`] never picks and
    [`~.checkpoint_folders.remove_stale_temporary_checkpoints`] deletes at the next start.

    Args:
        accelerator (`accelerate.Accelerator`): with *no* objects registered for checkpointing (they would be
            pickled; pass them as `states`).
        output_dir (`str`): the run's output folder.
        step (`int`): the optimizer step, the checkpoint's name.
        total_limit (`int`, *optional*): keep at most this many checkpoints.
        log (`Callable[[str], None]`, *optional*): logger for what was saved and removed.
        states (`Mapping[str, Any]`, *optional*): name -> object with `state_dict`, written as JSON + safetensors
            ([`save_training_states`]); give the same mapping to [`load_checkpoint`].

    Returns:
        The final path, `output_dir/checkpoint-<step>`.

    Raises:
        TrainingDivergedError: the model, optimizer state or an EMA in `states` holds a NaN or an infinity; nothing
            is written (a `FloatingPointError`, see [`~flowmo_diffusers.training.divergence.check_finite_weights`]).
        OSError: the save failed, on this process or another (the same error on all of them): `errno.ENOSPC` with
            `no space left on <output_dir> (<N> bytes free)` when the disk or quota is full, however the writer
            reported it; the message names the intact previous checkpoint. The incomplete folder is removed, nothing
            is published, and the previous checkpoints are untouched.
    """
    if accelerator._custom_objects:
        raise ValueError(
            "objects registered with accelerator.register_for_checkpointing are saved as pickles that Accelerate "
            "loads with weights_only=False; pass them to save_checkpoint/load_checkpoint as `states` instead"
        )
    # Before anything is written: `latest` must never hold diverged weights (one host sync per save).
    check_finite_weights(
        accelerator,
        {"model": [p for model in accelerator._models for p in model.parameters()],
         "optimizer": [t for optimizer in accelerator._optimizers for t in optimizer_state_tensors(optimizer)],
         **state_tensors(states)},
        step, output_dir, f"refusing to save checkpoint-{step}",
    )
    temporary = temporary_checkpoint_path(output_dir, step)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Three steps, each ending with every process agreeing on its outcome: Accelerate's files (no collective after its
    # first write in DDP; FSDP2 gathers before writing), then the package's states (their `state_dict` may gather),
    # then the publishing rename, done by the main process.
    _write_on_every_process(accelerator, lambda: accelerator.save_state(temporary), output_dir, step)
    _write_on_every_process(
        accelerator, lambda: save_training_states(states or {}, temporary, accelerator.is_main_process), output_dir, step
    )
    _write_on_every_process(
        accelerator, lambda: publish_checkpoint(output_dir, step) if accelerator.is_main_process else None,
        output_dir, step,
    )
    if accelerator.is_main_process:
        for removed in prune_checkpoints(output_dir, total_limit):
            if log is not None:
                log(f"Removed old checkpoint {removed}")
        if log is not None:
            log(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator, folder: str, states: Mapping[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> None:
    """Resume from a checkpoint written by [`save_checkpoint`], refusing any file that could run code when loaded.

    Order: every file of `folder` is checked ([`verify_checkpoint_files`]) before anything is loaded; then
    `accelerator.load_state` (weights, optimizer, schedulers, RNG states), then `states`
    ([`load_training_states`]); finally the RNG states are compared with the file.

    Args:
        accelerator (`accelerate.Accelerator`): with no objects registered for checkpointing.
        folder (`str`): the `checkpoint-<step>` folder.
        states (`Mapping[str, Any]`, *optional*): name -> object with `load_state_dict`, the mapping given to
            [`save_checkpoint`].
        flags (`Mapping[str, str]`, *optional*): name -> the flag that adds that state, for error messages.

    Raises:
        UnsafeCheckpointError: a file cannot be loaded safely, or the RNG states are damaged.
        DamagedCheckpointError: a file is empty, truncated or malformed (named, with the checkpoint and the earlier
            checkpoint to use instead), found before any weight is loaded
            ([`~.checkpoint_verification.DamagedCheckpointError`]).
        ValueError: the checkpoint holds other states than `states` (e.g. saved without `--use_ema`).
    """
    if accelerator._custom_objects:
        raise ValueError("pass training states to load_checkpoint as `states`, not accelerator.register_for_checkpointing")
    rng_states = verify_checkpoint_files(folder)
    rng_name = f"random_states_{accelerator.process_index}.pkl"
    if rng_name not in rng_states:
        raise UnsafeCheckpointError(
            f"{os.path.join(folder, rng_name)} is missing: the random states of process {accelerator.process_index} "
            "are needed for an exact resume (was the checkpoint written with as many processes?)"
        )
    # Fail on a states mismatch (e.g. --use_ema) before the (slow) weight loading.
    load_training_states({name: _Discard() for name in states or {}}, folder, flags)
    accelerator.load_state(folder)
    load_training_states(states or {}, folder, flags)
    check_rng_restored(os.path.join(folder, rng_name), rng_states[rng_name])


class _Discard:
    """Accepts any state dict: lets [`load_checkpoint`] validate the states file before loading the weights."""

    def load_state_dict(self, state_dict: Any) -> None:
        pass


__all__ = ["UnsafeCheckpointError", "load_checkpoint", "save_checkpoint"]
