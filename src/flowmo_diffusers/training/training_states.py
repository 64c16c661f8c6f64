"""This package's training states inside a checkpoint: JSON (numbers, strings, structure) plus safetensors (tensors).

Why not `accelerator.register_for_checkpointing`: Accelerate writes those objects as `custom_checkpoint_<i>.pkl` and
loads them with `torch.load(..., weights_only=False)`, a plain unpickle that runs whatever code the file names. JSON
and safetensors hold data only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.safe_loading import UnsafeCheckpointError

#: This package's training states inside a checkpoint folder.
STATES_JSON_NAME = "training_states.json"
STATES_TENSORS_NAME = "training_states.safetensors"
_STATES_FORMAT = "flowmo-diffusers-training-states"
_TENSOR_TAG = "__tensor__"


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


__all__ = ["STATES_JSON_NAME", "STATES_TENSORS_NAME", "StreamPositions", "load_training_states", "save_training_states"]
