"""Training checkpoints (`flowmo_diffusers.training.checkpointing`): the package's states as JSON + safetensors, and a
resume that refuses every file it cannot load without the risk of running code, before loading anything."""

import errno
import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from flowmo_diffusers.training.checkpoint_folders import list_checkpoints, remove_stale_temporary_checkpoints
from flowmo_diffusers.training.checkpointing import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from flowmo_diffusers.training.training_states import (
    STATES_JSON_NAME,
    STATES_TENSORS_NAME,
    StreamPositions,
    load_training_states,
    save_training_states,
)
from flowmo_diffusers.training.ema import EMACheckpoint
from flowmo_diffusers.training.recipe import InitialNormFixer, TrainingProgress
from flowmo_diffusers.utils.output_lock import OutputDirLock

from testing_utils import REPO, load_script


class Payload:
    """Unpickling this creates `marker`: proof that a file was loaded with code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def training_setup(use_ema=True, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    progress = TrainingProgress(global_step=3, batches_consumed=6, encoder_frozen=True)
    fixer = InitialNormFixer()
    fixer.norms = {"0.weight": torch.tensor(1.5), "1.weight": torch.tensor(2.5)}
    states = {"progress": progress, "norm_fixer": fixer}
    if use_ema:
        ema = EMAModel(model.parameters(), decay=0.9)
        ema.step(model.parameters())
        states["ema"] = EMACheckpoint(ema)
    return accelerator, model, optimizer, states


@pytest.fixture
def checkpoint(tmp_path):
    accelerator, model, optimizer, states = training_setup()
    path = save_checkpoint(accelerator, str(tmp_path), 3, states=states)
    return accelerator, model, optimizer, states, path


def test_states_are_json_and_safetensors_and_resume_exactly(checkpoint):
    accelerator, model, optimizer, states, path = checkpoint
    names = sorted(os.listdir(path))
    assert STATES_JSON_NAME in names and STATES_TENSORS_NAME in names
    assert not [name for name in names if name.startswith("custom_checkpoint")]
    record = json.loads(open(os.path.join(path, STATES_JSON_NAME)).read())
    assert record["states"]["progress"] == {"global_step": 3, "batches_consumed": 6, "encoder_frozen": True}
    expected_draw = torch.rand(4)  # what the run draws after the save

    accelerator2, model2, optimizer2, states2 = training_setup(seed=1)
    load_checkpoint(accelerator2, path, states2)
    assert torch.equal(torch.rand(4), expected_draw)  # RNG restored
    assert states2["progress"].state_dict() == states["progress"].state_dict()
    assert {k: float(v) for k, v in states2["norm_fixer"].norms.items()} == {"0.weight": 1.5, "1.weight": 2.5}
    saved_ema, loaded_ema = states["ema"].ema, states2["ema"].ema
    assert loaded_ema.optimization_step == saved_ema.optimization_step and loaded_ema.decay == saved_ema.decay
    assert all(torch.equal(a, b) for a, b in zip(saved_ema.shadow_params, loaded_ema.shadow_params))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert optimizer2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_pickle_payload_anywhere_stops_the_resume_and_never_runs(checkpoint, tmp_path, name):
    accelerator, _, _, states, path = checkpoint
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, os.path.join(path, name))
    # The payload is live: the same file loaded as Accelerate loads custom states (weights_only=False) runs it.
    torch.save({"state": Payload(tmp_path / "probe-ran")}, tmp_path / "probe.pkl")
    torch.load(tmp_path / "probe.pkl", weights_only=False)
    assert (tmp_path / "probe-ran").exists()

    accelerator2, model2, _, states2 = training_setup(seed=1)
    states2["progress"].global_step = 0
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to resume .*{name}"):
        load_checkpoint(accelerator2, path, states2)
    assert not marker.exists()
    # Refused before anything was loaded.
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))
    assert states2["progress"].global_step == 0


def test_a_damaged_rng_state_is_an_error_not_a_silent_loss_of_exact_resume(checkpoint):
    accelerator, _, _, states, path = checkpoint
    rng_path = os.path.join(path, "random_states_0.pkl")
    rng = torch.load(rng_path, weights_only=False)
    rng["torch_manual_seed"] = torch.zeros(7, dtype=torch.uint8)  # loads fine, but torch.set_rng_state refuses it
    torch.save(rng, rng_path)
    with pytest.raises(UnsafeCheckpointError, match="random states of .*random_states_0.pkl could not be restored"):
        load_checkpoint(accelerator, path, training_setup(seed=1)[3])
    os.remove(rng_path)
    with pytest.raises(UnsafeCheckpointError, match="random_states_0.pkl is missing"):
        load_checkpoint(accelerator, path, training_setup(seed=1)[3])


def test_corrupt_states_file_names_it(checkpoint):
    accelerator, _, _, _, path = checkpoint
    with open(os.path.join(path, STATES_TENSORS_NAME), "wb") as file:
        file.write(b"\x00" * 20)
    # load_checkpoint finds it while checking every file (tests/training/test_checkpoint_faults.py: the damage kinds);
    # load_training_states on its own names it too.
    with pytest.raises(UnsafeCheckpointError, match=f"{STATES_TENSORS_NAME} is damaged"):
        load_checkpoint(accelerator, path, training_setup(seed=1)[3])
    with pytest.raises(UnsafeCheckpointError, match="cannot read the training states"):
        load_training_states(training_setup(seed=1)[3], path)


def test_ema_mismatch_names_the_flag(tmp_path):
    accelerator, _, _, states = training_setup(use_ema=False)
    path = save_checkpoint(accelerator, str(tmp_path), 3, states=states)
    with pytest.raises(ValueError, match="holds no 'ema' state \\(it was saved without --use_ema\\)"):
        load_checkpoint(accelerator, path, training_setup(use_ema=True)[3], flags={"ema": "--use_ema"})
    accelerator, _, _, states = training_setup(use_ema=True)
    path = save_checkpoint(accelerator, str(tmp_path / "with_ema"), 3, states=states)
    with pytest.raises(ValueError, match="saved with --use_ema: pass --use_ema to resume it"):
        load_checkpoint(accelerator, path, training_setup(use_ema=False)[3], flags={"ema": "--use_ema"})


def test_registered_objects_are_refused(tmp_path):
    accelerator, _, _, states = training_setup()
    accelerator.register_for_checkpointing(states["progress"])
    try:
        with pytest.raises(ValueError, match="weights_only=False"):
            save_checkpoint(accelerator, str(tmp_path), 1, states={})
    finally:
        accelerator._custom_objects.clear()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("basic_ios::clear: iostream error")])
def test_disk_full_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    accelerator, _, _, states = training_setup()
    previous = save_checkpoint(accelerator, str(tmp_path), 2, states=states)

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)  # accelerate's writer of optimizer.bin and random_states_*.pkl
    # torch's C++ writer loses the errno: a bare "iostream error" is a full disk when the disk is full (see
    # test_checkpoint_faults.py for the same error on a disk with space left).
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError, match="no space left .* writing checkpoint-4.*checkpoint-2 is intact") as info:
        save_checkpoint(accelerator, str(tmp_path), 4, states=states)
    assert info.value.errno == errno.ENOSPC
    assert [path for _, path in list_checkpoints(str(tmp_path))] == [previous]
    assert not os.path.exists(tmp_path / "checkpoint-4.tmp")
    monkeypatch.undo()
    load_checkpoint(accelerator, previous, training_setup(seed=1)[3])  # still a good checkpoint


def test_stale_temporary_checkpoints_are_only_removed_under_the_lock(tmp_path):
    (tmp_path / "checkpoint-3.tmp").mkdir()
    with pytest.raises(RuntimeError, match="needs the held lock"):
        remove_stale_temporary_checkpoints(str(tmp_path), None)
    assert (tmp_path / "checkpoint-3.tmp").exists()
    with OutputDirLock(str(tmp_path)) as lock:
        assert remove_stale_temporary_checkpoints(str(tmp_path), lock) == [str(tmp_path / "checkpoint-3.tmp")]


@pytest.mark.parametrize("script, required", [
    ("examples/train_flowmo/train.py", ["--max_train_steps", "1"]),
    ("examples/train_maskgit/train.py", ["--max_train_steps", "1", "--pretrained_model_name_or_path", "x",
                                         "--train_dataset", "y"]),
])
def test_checkpoints_total_limit_0_is_refused_at_argument_parsing(script, required, capsys):
    parse_args = load_script(REPO / script).parse_args
    with pytest.raises(SystemExit):
        parse_args(required + ["--checkpoints_total_limit", "0"])
    assert "--checkpoints_total_limit: must be at least 1, got 0" in capsys.readouterr().err
    assert parse_args(required + ["--checkpoints_total_limit", "2"]).checkpoints_total_limit == 2


def test_a_sharded_fsdp_checkpoint_is_refused_with_the_flag_to_use(checkpoint):
    accelerator, _, _, _, path = checkpoint
    os.makedirs(os.path.join(path, "pytorch_model_fsdp_0"))
    open(os.path.join(path, "pytorch_model_fsdp_0", ".metadata"), "wb").close()
    with pytest.raises(UnsafeCheckpointError, match="FULL_STATE_DICT"):
        load_checkpoint(accelerator, path, training_setup(seed=1)[3])


class _RecordingLoader:
    """Stands in for an `ImageBatchLoader`: a state of its own, and the state it was asked to continue from."""

    def __init__(self, state):
        self.state, self.loaded = state, None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def test_stream_positions_round_trip_through_the_training_states(tmp_path):
    accelerator = Accelerator(cpu=True)
    saved = StreamPositions(accelerator)
    saved.attach(_RecordingLoader({"batches_consumed": 3, "dataloader": {"worker": [1, 2]}}))
    save_training_states({"train_loader": saved}, str(tmp_path))

    restored = StreamPositions(accelerator)
    load_training_states({"train_loader": restored}, str(tmp_path))
    loader = _RecordingLoader(None)
    restored.attach(loader)  # the loader built after the checkpoint continues from this process' saved state
    assert loader.loaded == {"batches_consumed": 3, "dataloader": {"worker": [1, 2]}}

    with pytest.raises(ValueError, match="stream positions of 2 processes and this run has 1"):
        StreamPositions(accelerator).load_state_dict({"processes": [{}, {}]})
