"""Preemption (`flowmo_diffusers.training.preemption`): a signal makes every process finish its optimizer step,
checkpoint there and exit; resuming from that checkpoint ends with the uninterrupted run's weights, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flowmo_diffusers.training.preemption import (
    PREEMPTED_EXIT_STATUS,
    PREEMPTED_MARKER,
    TEST_HOLD_ENV,
    PreemptionGuard,
    preempted_message,
)

from test_training import SCRIPT, TINY_RUN, checksums, launch
from testing_utils import REPO, free_port

RUN = TINY_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "3", "--validation_steps", "100",
                  "--perceptual_weight", "0"]


def test_guard_sets_a_flag_and_restores_the_previous_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionGuard() as guard:
        assert guard.flag("cpu").item() == 0.0 and not guard.signalled
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing: the first one is kept
        assert guard.received == signal.SIGUSR1 and guard.flag("cpu").item() == 1.0
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert PreemptionGuard.agreed(0.5) and not PreemptionGuard.agreed(0.0)  # the mean over processes
    assert preempted_message(7) == "preempted at step 7: checkpoint-7 saved"
    with pytest.raises(TypeError, match="signals must be a non-empty tuple"):
        PreemptionGuard(signals=(15,))


def start_held(arguments, hold_dir, num_processes=1):
    """`accelerate launch` in a new process group; every training process waits at its 2nd step for `release`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", TEST_HOLD_ENV: f"2:{hold_dir}"}
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "true"
    hold_dir.mkdir()
    process = subprocess.Popen(command + [str(SCRIPT)] + [str(a) for a in arguments], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(hold_dir.glob("ready-*"))) < num_processes:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the run never reached its 2nd step"
        time.sleep(0.05)
    return process, [int(p.name.split("-")[1]) for p in hold_dir.glob("ready-*")]


def finish(process, hold_dir):
    (hold_dir / "release").touch()
    output, _ = process.communicate(timeout=240)
    return process.returncode, output


def assert_preempted_at_step_2(output_dir, output):
    assert preempted_message(2) in output
    assert (output_dir / "checkpoint-2").is_dir() and not (output_dir / "model_index.json").exists()
    marker = json.loads((output_dir / PREEMPTED_MARKER).read_text())
    assert marker["step"] == 2 and marker["exit_status"] == PREEMPTED_EXIT_STATUS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-step run, one process."""
    output_dir = tmp_path_factory.mktemp("reference")
    launch(RUN + ["--output_dir", str(output_dir)])
    return checksums(output_dir)


def test_sigterm_to_the_process_group_checkpoints_and_the_resume_is_exact(reference, tmp_path):
    """What Ctrl-C and SLURM do: the launcher and the training process both receive the signal."""
    output_dir = tmp_path / "out"
    process, _ = start_held(RUN + ["--output_dir", str(output_dir)], tmp_path / "hold")
    os.killpg(process.pid, signal.SIGTERM)
    status, output = finish(process, tmp_path / "hold")
    # Accelerate's launcher reports its own status (128 + SIGTERM), not the child's 75: job scripts read the marker.
    assert status != 0, output
    assert_preempted_at_step_2(output_dir, output)
    log = launch(RUN + ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)])
    assert "Resuming from" in log and not (output_dir / PREEMPTED_MARKER).exists()
    assert checksums(output_dir) == reference  # bit-identical to the uninterrupted run


def test_sigusr1_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """SLURM's `--signal=USR1@120` reaches the training processes; one signalled rank is enough (the flag is reduced)."""
    launch(RUN + ["--output_dir", str(tmp_path / "reference")], num_processes=2)
    output_dir = tmp_path / "out"
    process, pids = start_held(RUN + ["--output_dir", str(output_dir)], tmp_path / "hold", num_processes=2)
    os.kill(pids[0], signal.SIGUSR1)
    status, output = finish(process, tmp_path / "hold")
    assert status != 0, output
    assert_preempted_at_step_2(output_dir, output)
    launch(RUN + ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)], num_processes=2)
    for rank in (0, 1):
        assert checksums(output_dir, rank) == checksums(tmp_path / "reference", rank)
