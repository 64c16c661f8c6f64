"""Training checkpoints: folders published atomically, and resumed without unpickling anything that could run code.

A checkpoint is `accelerator.save_state` (weights as safetensors; optimizer, learning-rate scheduler and RNG states
as torch pickles) plus this package's own training states (progress counters, recorded norms, EMA shadows).

Why the package's states are not `accelerator.register_for_checkpointing` objects: Accelerate writes those as
`custom_checkpoint_<i>.pkl` and loads them with `torch.load(..., weights_only=False)`, i.e. a plain unpickle that
runs whatever code the file names. A checkpoint folder received from someone else could then execute code at
`--resume_from_checkpoint`. Here they go to `training_states.json` (numbers, strings, structure) and
`training_states.safetensors` (tensors), formats that hold data only.

[`load_checkpoint`] checks the whole folder before Accelerate touches it: every torch pickle must load with
`weights_only=True` (Accelerate's own allow-list of numpy types for the RNG states); a `custom_checkpoint_*.pkl` or
a file that cannot be read that way stops the resume with an error naming it, before anything is loaded; so does a
damaged safetensors or JSON file (empty, truncated, bad header: [`DamagedCheckpointError`]), each read in full. Accelerate
swallows any failure to restore the RNG states (exact resume is then silently lost), so the restored states are
compared with the file afterwards and a mismatch is an error too.

A save that fails (a full disk above all, however the writer reports it: `ENOSPC`, `EIO`, or wrapped in torch's or
safetensors' own exception) fails on every process together, removes the incomplete folder and says how much space is
left and which earlier checkpoint is intact; nothing half-written is ever published.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..utils.files import apply_default_mode
from ..utils.output_lock import OutputDirLock
from ..utils.safe_loading import UnsafeCheckpointError
from ..utils.validation import check_optional_int
from .divergence import check_finite_weights, optimizer_state_tensors, state_tensors

#: This package's training states inside a checkpoint folder.
STATES_JSON_NAME = "training_states.json"
STATES_TENSORS_NAME = "training_states.safetensors"
_STATES_FORMAT = "flowmo-diffusers-training-states"
_TENSOR_TAG = "__tensor__"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Accelerate loads these with weights_only=False (accelerate/checkpointing.py: load_custom_state).
_UNSAFE_CUSTOM_STATE_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Formats that hold data only: nothing in them is executed when read.
_DATA_ONLY_SUFFIXES = (".safetensors", ".json")
# A write error is a full disk when the errno says so, when the text of an exception that lost the errno says so
# (safetensors: "IoError(Os { code: 28, kind: StorageFull, ...})"), or when the disk has less than this left.
_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_SIGNS = ("No space left", "Disk quota exceeded", "StorageFull", "QuotaExceeded", "os error 28")
_NEARLY_FULL_BYTES = 2**20


class DamagedCheckpointError(UnsafeCheckpointError):
    """A file of a checkpoint is empty, truncated or malformed, so the checkpoint is not resumed from (a `ValueError`)."""


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints `(step, path)` in `output_dir`, oldest first.

    Only folders named exactly `checkpoint-<step>` count: a save in progress (or interrupted) lives in
    `checkpoint-<step>.tmp` and is never picked.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> tuple[int, str] | None:
    """`(step, path)` of the checkpoint to resume from, or None to start fresh.

    `"latest"` picks the newest complete `checkpoint-<step>` of `output_dir` (None if there is none, so the same
    command starts and resumes a run); any other value is a checkpoint folder whose name gives the step.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or not match:
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder named checkpoint-<step> "
            f"(nor one inside {output_dir!r}); use 'latest' to pick the newest one"
        )
    return int(match.group(1)), path


def remove_stale_temporary_checkpoints(output_dir: str, lock: OutputDirLock | None) -> list[str]:
    """Delete `checkpoint-*.tmp` / `checkpoint-*.old` folders left by an interrupted save; returns their paths.

    Args:
        output_dir (`str`): the run's output folder.
        lock ([`~flowmo_diffusers.utils.output_lock.OutputDirLock`]): the held lock of `output_dir`. It guarantees
            that no other live run writes there, so every temporary folder found is a leftover of a dead run, never
            a live run's save in progress.
    """
    if lock is None or not lock.is_locked or os.path.abspath(output_dir) != lock.output_dir:
        raise RuntimeError(
            f"remove_stale_temporary_checkpoints needs the held lock of {output_dir} (lock_output_dir): without it, "
            "it could delete the checkpoint another live run is writing"
        )
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if re.match(r"^checkpoint-\d+\.(tmp|old)$", name):
                path = os.path.join(output_dir, name)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def temporary_checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}.tmp")


def publish_checkpoint(output_dir: str, step: int) -> str:
    """Atomically turn `checkpoint-<step>.tmp` into `checkpoint-<step>` (`os.replace`); returns the final path.

    An existing `checkpoint-<step>` (a run resumed from before it) is first moved aside to `.old`, then deleted
    after the rename, so that some complete copy exists at every moment. Before the rename, the folder and every file
    in it get the modes of the umask: safetensors writes `model.safetensors` and `training_states.safetensors` 0600.
    """
    temporary = temporary_checkpoint_path(output_dir, step)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if not os.path.isdir(temporary):
        raise FileNotFoundError(f"no temporary checkpoint at {temporary}")
    apply_default_mode(temporary, recursive=True)
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(temporary, final)
    except BaseException:
        if old is not None:  # put the complete copy back: a `.old` folder is deleted as a leftover at the next start
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; returns the removed paths."""
    # Kept by hand: Accelerate's own rotation (ProjectConfiguration(total_limit=...)) counts only its
    # `checkpoints/checkpoint_<i>` folders, not diffusers' `checkpoint-<step>` names that are published atomically here.
    if total_limit is None:
        return []
    check_checkpoints_total_limit(total_limit)
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def check_checkpoints_total_limit(total_limit: int | None) -> None:
    """Raise ValueError unless `total_limit` is None (keep every checkpoint) or at least 1."""
    check_optional_int("--checkpoints_total_limit", total_limit, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Training states as JSON + safetensors
# ----------------------------------------------------------------------------------------------------------------------


def _encode_state(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of a state dict; tensors are replaced by `{"__tensor__": key}` and stored in `tensors`."""
    if isinstance(value, torch.Tensor):
        # A copy: safetensors refuses tensors that share memory, and state dicts may hand out views.
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR_TAG: key}
    if isinstance(value, Mapping):
        encoded = {}
        for name, item in value.items():
            if not isinstance(name, str) or name == _TENSOR_TAG:
                raise TypeError(f"training state {key!r}: keys must be strings other than {_TENSOR_TAG!r}, got {name!r}")
            encoded[name] = _encode_state(item, f"{key}.{name}", tensors)
        return encoded
    if isinstance(value, (list, tuple)):
        return [_encode_state(item, f"{key}.{index}", tensors) for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(
        f"training state {key!r} holds a {type(value).__name__}; only tensors, numbers, strings, None, lists and "
        "dicts can be checkpointed (as JSON + safetensors)"
    )


def _decode_state(value: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_TAG}:
            key = value[_TENSOR_TAG]
            if key not in tensors:
                raise UnsafeCheckpointError(f"{source} refers to tensor {key!r}, which {STATES_TENSORS_NAME} lacks")
            return tensors[key]
        return {name: _decode_state(item, tensors, source) for name, item in value.items()}
    if isinstance(value, list):
        return [_decode_state(item, tensors, source) for item in value]
    return value


def save_training_states(states: Mapping[str, Any], folder: str, is_main_process: bool = True) -> None:
    """Write `{name: obj.state_dict()}` of `states` to `folder/training_states.json` + `.safetensors`.

    Call on every process (`state_dict` may be a collective, e.g. [`EMACheckpoint`] gathering FSDP2 shards); only
    the main process writes.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded = {name: _encode_state(obj.state_dict(), name, tensors) for name, obj in states.items()}
    if not is_main_process:
        return
    save_file(tensors, os.path.join(folder, STATES_TENSORS_NAME))
    with open(os.path.join(folder, STATES_JSON_NAME), "w", encoding="utf-8") as file:
        json.dump({"format": _STATES_FORMAT, "version": 1, "states": encoded}, file)


def load_training_states(
    states: Mapping[str, Any], folder: str, flags: Mapping[str, str] | None = None
) -> None:
    """Restore every object of `states` from `folder` (see [`save_training_states`]); names must match exactly.

    Args:
        states (`Mapping[str, Any]`): name -> object with `load_state_dict`, as given to [`save_checkpoint`].
        folder (`str`): the checkpoint folder.
        flags (`Mapping[str, str]`, *optional*): name -> the command-line flag that adds that state (e.g.
            `{"ema": "--use_ema"}`), so that a mismatch names what to change.

    Raises:
        UnsafeCheckpointError: the files are missing or malformed.
        ValueError: the checkpoint holds other states than this run keeps.
    """
    json_path, tensors_path = os.path.join(folder, STATES_JSON_NAME), os.path.join(folder, STATES_TENSORS_NAME)
    for path in (json_path, tensors_path):
        if not os.path.isfile(path):
            raise UnsafeCheckpointError(
                f"{path} is missing: {folder} was not written by this version of flowmo-diffusers' training scripts "
                "(or its save was cut short); it cannot be resumed from"
            )
    try:
        with open(json_path, encoding="utf-8") as file:
            record = json.load(file)
        tensors = load_file(tensors_path)
    except Exception as error:  # noqa: BLE001 - json and safetensors raise several types for corrupt files
        raise UnsafeCheckpointError(f"cannot read the training states of {folder}: {type(error).__name__}: {error}") from error
    if not isinstance(record, dict) or record.get("format") != _STATES_FORMAT or not isinstance(record.get("states"), dict):
        raise UnsafeCheckpointError(f"{json_path} is not a flowmo-diffusers training-states file")
    saved = record["states"]
    flags = flags or {}
    missing, unexpected = [n for n in states if n not in saved], [n for n in saved if n not in states]
    if missing or unexpected:
        details = []
        for name in missing:
            flag = f" (it was saved without {flags[name]})" if name in flags else ""
            details.append(f"it holds no {name!r} state{flag}")
        for name in unexpected:
            flag = f" (it was saved with {flags[name]}: pass {flags[name]} to resume it)" if name in flags else ""
            details.append(f"it holds a {name!r} state that this run does not keep{flag}")
        raise ValueError(f"cannot resume from {folder}: " + "; ".join(details))
    for name, obj in states.items():
        obj.load_state_dict(_decode_state(saved[name], tensors, json_path))


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading whole checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def _error_chain(error: BaseException) -> list[BaseException]:
    """`error` and every exception behind it (`__cause__`, `__context__`), each once: wrappers such as safetensors'
    `SafetensorError` or a `RuntimeError` raised while handling an `OSError` keep the real fault there."""
    chain, pending = [], [error]
    while pending:
        link = pending.pop()
        if link is None or any(link is seen for seen in chain):
            continue
        chain.append(link)
        pending += [link.__context__, link.__cause__]
    return chain


def _free_bytes(folder: str) -> int | None:
    """Bytes an unprivileged process can still write on the file system of `folder` (None if unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _is_out_of_space(error: BaseException, free_bytes: int | None) -> bool:
    """Whether `error`, raised while writing with `free_bytes` left on the disk, means the disk (or quota) is full.

    Said so by an errno or a message anywhere in the chain of `error`; or any write error on a disk with less than
    1 MiB left: network file systems report a full disk as `EIO`, and torch's C++ writer as a bare
    `RuntimeError` ("basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file").
    """
    for link in _error_chain(error):
        if isinstance(link, OSError) and link.errno in _OUT_OF_SPACE_ERRNOS:
            return True
        if any(sign in str(link) for sign in _OUT_OF_SPACE_SIGNS):
            return True
    return free_bytes is not None and free_bytes < _NEARLY_FULL_BYTES


def _describe_write_failure(error: BaseException, output_dir: str, step: int) -> tuple[int, str]:
    """`(errno, message)` of the OSError that a failed save of `checkpoint-<step>` raises (see [`save_checkpoint`])."""
    free = _free_bytes(output_dir)
    previous = [path for _, path in list_checkpoints(output_dir)]
    intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    cause = f"{type(error).__name__}: {error}"
    if _is_out_of_space(error, free):
        left = f"{free} bytes free" if free is not None else "free space unknown"
        return errno.ENOSPC, (
            f"no space left on {output_dir} ({left}) while writing checkpoint-{step}; the incomplete checkpoint was "
            f"removed and {intact}. Free some space (or lower --checkpoints_total_limit) and resume with "
            f"--resume_from_checkpoint latest ({cause})"
        )
    code = next((link.errno for link in _error_chain(error) if isinstance(link, OSError) and link.errno), errno.EIO)
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
    [`resolve_resume_checkpoint`] never picks and [`remove_stale_temporary_checkpoints`] deletes at the next start.

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


def _load_torch_pickle_safely(path: str) -> Any:
    """`torch.load(path, weights_only=True)` with Accelerate's allow-list (numpy arrays of the RNG states)."""
    from accelerate.utils.other import load

    # mmap: the check only unpickles the small index of the file; tensor data is not read.
    return load(path, map_location="cpu", weights_only=True, mmap=True)


def _earlier_checkpoint_advice(folder: str) -> str:
    """What to resume from instead of the damaged `folder`: the newest other checkpoint beside it, if any."""
    parent = os.path.dirname(os.path.abspath(folder))
    others = [path for _, path in list_checkpoints(parent) if os.path.abspath(path) != os.path.abspath(folder)]
    if not others:
        return f"no other checkpoint exists in {parent}"
    return f"resume from an earlier one with --resume_from_checkpoint {others[-1]}, or delete {folder}"


def _damaged(folder: str, path: str, what: str, error: BaseException | None = None) -> DamagedCheckpointError:
    detail = f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})" if error else ""
    return DamagedCheckpointError(
        f"refusing to resume from {folder}: {path} is damaged: {what}{detail}. Nothing of the checkpoint was loaded; "
        f"{_earlier_checkpoint_advice(folder)}"
    )


def _verify_data_file(folder: str, path: str) -> None:
    """Read a safetensors or JSON file of a checkpoint in full; raise [`DamagedCheckpointError`] if it is damaged."""
    size = os.path.getsize(path)
    if size == 0:
        raise _damaged(folder, path, "it is empty (0 bytes; a save cut short, or a full disk)")
    try:
        if path.endswith(".safetensors"):
            # safe_open checks the header and that its offsets cover the file exactly (a truncated file fails here);
            # reading every tensor, one at a time, also surfaces unreadable blocks before Accelerate loads anything.
            with safe_open(path, framework="pt", device="cpu") as file:
                for key in file.keys():
                    file.get_tensor(key)
        else:
            with open(path, encoding="utf-8") as file:
                json.load(file)
    except Exception as error:  # noqa: BLE001 - safetensors, json and the OS raise several types for damaged files
        kind = "safetensors" if path.endswith(".safetensors") else "JSON"
        raise _damaged(folder, path, f"{size} bytes that do not read as a {kind} file (truncated or corrupt)", error) from None


def verify_checkpoint_files(folder: str) -> dict[str, Any]:
    """Check every file of `folder` before anything is loaded; returns the RNG states of the folder by file name.

    Safetensors and JSON files are read in full; torch pickles are loaded with `weights_only=True` (their index only:
    a truncated zip archive has lost its central directory and fails there).

    Raises:
        UnsafeCheckpointError: naming the first file that is a `custom_checkpoint_*.pkl`, or a pickle that
            `torch.load(weights_only=True)` refuses (it names a global outside the allow-list).
        DamagedCheckpointError: naming the first file (and the checkpoint) that is empty, truncated or malformed,
            and the earlier checkpoint to resume from instead. Both are `ValueError`s.
    """
    rng_states = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith(_DATA_ONLY_SUFFIXES):
                _verify_data_file(folder, path)
                continue
            if _UNSAFE_CUSTOM_STATE_RE.match(name):
                raise UnsafeCheckpointError(
                    f"refusing to resume from {folder}: {path} is a pickle that Accelerate loads with "
                    "weights_only=False, which can run arbitrary code. flowmo-diffusers checkpoints keep their "
                    f"training states in {STATES_JSON_NAME} / {STATES_TENSORS_NAME}; this folder was written by "
                    "another program (or an earlier version) and is not loaded"
                )
            if name.endswith((".metadata", ".distcp")):
                raise UnsafeCheckpointError(
                    f"refusing to resume from {folder}: {path} belongs to a sharded FSDP checkpoint "
                    "(SHARDED_STATE_DICT), whose .metadata torch unpickles without restriction. Save checkpoints with "
                    "--fsdp_state_dict_type FULL_STATE_DICT"
                )
            if os.path.getsize(path) == 0:
                raise _damaged(folder, path, "it is empty (0 bytes; a save cut short, or a full disk)")
            try:
                loaded = _load_torch_pickle_safely(path)
            except pickle.UnpicklingError as error:  # weights_only refused a global: the file would run code
                raise UnsafeCheckpointError(
                    f"refusing to resume from {folder}: {path} cannot be loaded with torch.load(weights_only=True) "
                    f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). It is a pickle "
                    "that would run code, or corrupt; it is not loaded"
                ) from None
            except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, OSError, ... for damaged archives
                raise _damaged(folder, path, f"{os.path.getsize(path)} bytes that torch cannot read (truncated or "
                               "corrupt)", error) from None
            if name.startswith("random_states_"):
                rng_states[name] = loaded
    return rng_states


def _check_rng_restored(path: str, states: Any) -> None:
    """Raise unless the global RNGs now hold what `states` (an Accelerate RNG file) says; exact resume needs it."""
    required = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(states, dict) or any(key not in states for key in required):
        raise UnsafeCheckpointError(f"{path} is not an RNG state file (expected the keys {required}): exact resume impossible")
    restored = (
        random.getstate() == states["random_state"]
        and all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states["numpy_random_seed"]))
        and isinstance(states["torch_manual_seed"], torch.Tensor)
        and torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
    )
    if restored and torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        restored = all(
            torch.equal(live, saved) for live, saved in zip(torch.cuda.get_rng_state_all(), states["torch_cuda_manual_seed"])
        )
    if not restored:
        raise UnsafeCheckpointError(
            f"the random states of {path} could not be restored (Accelerate ignores such failures): the resumed run "
            "would not draw what the interrupted run would have drawn. The file is damaged or was edited"
        )


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
            checkpoint to use instead), found before any weight is loaded.
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
    _check_rng_restored(os.path.join(folder, rng_name), rng_states[rng_name])


class StreamPositions:
    """The streaming training loader's state of every process, saved with each checkpoint (`--streaming`).

    A stream's position is each process' own (its shards, its DataLoader workers), while only the main process writes
    the training states: `state_dict` gathers them all (a collective, which `save_checkpoint` calls on every process)
    and `load_state_dict` keeps this process' share for the loader built after the checkpoint is loaded.

    Kept by hand rather than left to `accelerator.save_state` with a prepared stateful loader: Accelerate writes a
    loader's state to a single `dl_state_dict.bin` from every process (no process index in the name, Accelerate 1.3.0
    to 1.16), so all positions but one would be lost, and as a torch pickle rather than JSON.

    Args:
        accelerator (`accelerate.Accelerator`):
            The run's accelerator (its process index and count).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.loader = None
        self.restored = None

    def attach(self, loader) -> None:
        """Use `loader` from now on; it continues from the restored state, if a checkpoint was loaded."""
        self.loader = loader
        if self.restored is not None:
            loader.load_state_dict(self.restored)

    def state_dict(self) -> dict:
        from accelerate.utils import gather_object

        return {"processes": gather_object([self.loader.state_dict()])}

    def load_state_dict(self, state: dict) -> None:
        processes = state["processes"]
        if len(processes) != self.accelerator.num_processes:
            raise ValueError(
                f"the checkpoint holds the stream positions of {len(processes)} processes and this run has "
                f"{self.accelerator.num_processes}: a stream resumes exactly only with the processes it was saved with"
            )
        self.restored = processes[self.accelerator.process_index]


class _Discard:
    """Accepts any state dict: lets [`load_checkpoint`] validate the states file before loading the weights."""

    def load_state_dict(self, state_dict: Any) -> None:
        pass


__all__ = [
    "DamagedCheckpointError",
    "STATES_JSON_NAME",
    "STATES_TENSORS_NAME",
    "StreamPositions",
    "UnsafeCheckpointError",
    "check_checkpoints_total_limit",
    "list_checkpoints",
    "load_checkpoint",
    "load_training_states",
    "prune_checkpoints",
    "publish_checkpoint",
    "remove_stale_temporary_checkpoints",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "save_training_states",
    "temporary_checkpoint_path",
    "verify_checkpoint_files",
]
