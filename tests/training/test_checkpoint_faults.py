"""Faults named (`flowmo_diffusers.training.checkpointing`): a full disk anywhere in a save, however the writer reports
it, and a damaged checkpoint file found before anything is loaded."""

import errno
import os
import shutil

import accelerate.utils.other
import pytest
import torch
from accelerate import Accelerator

from flowmo_diffusers.training.checkpoint_folders import list_checkpoints
from flowmo_diffusers.training.checkpoint_verification import DamagedCheckpointError
from flowmo_diffusers.training.checkpointing import load_checkpoint, save_checkpoint
from flowmo_diffusers.training.recipe import TrainingProgress


def build_training_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return accelerator, model, {"progress": TrainingProgress(global_step=2)}


def wrapped_enospc():
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as cause:
        try:
            raise RuntimeError("Error while serializing") from cause
        except RuntimeError as error:
            return error


@pytest.mark.parametrize("failure, free", [
    (OSError(errno.ENOSPC, "No space left on device"), None),
    (OSError(errno.EIO, "Input/output error"), 0),
    (wrapped_enospc(), None),
], ids=["enospc", "eio-full-disk", "wrapped-enospc"])  # fmt: skip
@pytest.mark.parametrize("writer", ["model", "optimizer"])
def test_a_full_disk_is_named_and_nothing_half_written_is_published(tmp_path, monkeypatch, failure, free, writer):
    accelerator, _, states = build_training_state()
    previous = save_checkpoint(accelerator, str(tmp_path), 2, states=states)

    def full(*args, **kwargs):
        raise failure

    if writer == "model":
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full)  # model.safetensors
    else:
        monkeypatch.setattr(torch, "save", full)  # optimizer.bin
    if free is not None:
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, free))
    with pytest.raises(OSError) as info:
        save_checkpoint(accelerator, str(tmp_path), 4, states=states)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert f"no space left on {tmp_path} (" in message and " bytes free)" in message
    if free is not None:
        assert "(0 bytes free)" in message
    assert f"the previous checkpoint {previous} is intact" in message
    assert [path for _, path in list_checkpoints(str(tmp_path))] == [previous]
    assert not os.path.exists(tmp_path / "checkpoint-4.tmp") and not os.path.exists(tmp_path / "checkpoint-4")
    monkeypatch.undo()
    load_checkpoint(build_training_state(seed=1)[0], previous, build_training_state(seed=1)[2])


def test_an_io_error_with_space_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    accelerator, _, states = build_training_state()

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**9, 10**11))
    with pytest.raises(OSError, match="could not write checkpoint-4 .*no earlier checkpoint exists") as info:
        save_checkpoint(accelerator, str(tmp_path), 4, states=states)
    assert info.value.errno == errno.EIO and "no space" not in str(info.value)


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", "truncate"), ("model.safetensors", "empty"), ("model.safetensors", "header"),
    ("optimizer.bin", "truncate"), ("optimizer.bin", "empty"), ("training_states.json", "truncate"),
])  # fmt: skip
def test_a_damaged_file_is_named_with_its_checkpoint_before_anything_is_loaded(tmp_path, name, damage):
    accelerator, _, states = build_training_state()
    earlier = save_checkpoint(accelerator, str(tmp_path), 2, states=states)
    damaged = save_checkpoint(accelerator, str(tmp_path), 4, states=states)
    path = os.path.join(damaged, name)
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write({"truncate": data[: len(data) // 2], "empty": b"", "header": b"\xff" * 8 + data[8:]}[damage])
    accelerator2, model2, states2 = build_training_state(seed=1)
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(ValueError) as info:
        load_checkpoint(accelerator2, damaged, states2)
    assert isinstance(info.value, DamagedCheckpointError)
    assert f"refusing to resume from {damaged}: {path} is damaged" in str(info.value)
    assert f"--resume_from_checkpoint {earlier}" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))  # nothing loaded
    assert states2["progress"].global_step == 2 and load_checkpoint(accelerator2, earlier, states2) is None
