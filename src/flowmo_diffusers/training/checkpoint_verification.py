"""Checking a checkpoint before anything of it is loaded: files that could run code, damaged files, RNG states.

Every torch pickle must load with `weights_only=True` (Accelerate's own allow-list of numpy types for the RNG
states); a `custom_checkpoint_*.pkl` or a file that cannot be read that way is refused, naming it. A damaged
safetensors or JSON file (empty, truncated, bad header) is found by reading it in full ([`DamagedCheckpointError`]).
Accelerate swallows any failure to restore the RNG states, so [`check_rng_restored`] compares them with the file.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..utils.safe_loading import UnsafeCheckpointError
from .checkpoint_folders import list_checkpoints
from .training_states import STATES_JSON_NAME, STATES_TENSORS_NAME

# Accelerate loads these with weights_only=False (accelerate/checkpointing.py: load_custom_state).
_UNSAFE_CUSTOM_STATE_RE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
# Formats that hold data only: nothing in them is executed when read.
_DATA_ONLY_SUFFIXES = (".safetensors", ".json")


class DamagedCheckpointError(UnsafeCheckpointError):
    """A file of a checkpoint is empty, truncated or malformed, so the checkpoint is not resumed from (a `ValueError`)."""


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


def check_rng_restored(path: str, states: Any) -> None:
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


__all__ = ["DamagedCheckpointError", "check_rng_restored", "verify_checkpoint_files"]
