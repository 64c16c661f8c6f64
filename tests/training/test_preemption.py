"""Preemption (`flowmo_diffusers.training.preemption`): a signal makes every process finish its optimizer step,
checkpoint there and exit; resuming from that checkpoint ends with the uninterrupted run's weights, bit for bit."""

import os
import signal

import pytest
import torch

from flowmo_diffusers.training.preemption import PREEMPTED_MARKER, PreemptionGuard, preempted_message

from test_training import SCRIPT, TINY_RUN, checksums, launch
from testing_utils import HeldLaunch, assert_preempted_at, wait_until_held

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


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def end_training(self):
        pass


def test_checkpoint_or_stop_saves_a_due_step_once_and_stops_only_when_preempted(tmp_path):
    saved, guard = [], PreemptionGuard()
    guard.checkpoint_or_stop(_OneProcess(), 4, saved.append, 3, False, str(tmp_path), log=saved.append)
    guard.checkpoint_or_stop(_OneProcess(), 6, saved.append, 3, False, str(tmp_path), log=saved.append)
    assert saved == [6] and not (tmp_path / PREEMPTED_MARKER).exists()
    for step in (9, 10):  # due: saved by the schedule, not again by the stop; not due: saved by the stop
        with pytest.raises(SystemExit):
            guard.checkpoint_or_stop(_OneProcess(), step, saved.append, 3, True, str(tmp_path), log=saved.append)
        assert (tmp_path / PREEMPTED_MARKER).is_file()
    assert saved == [6, 9, preempted_message(9), 10, preempted_message(10)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-step run, one process."""
    output_dir = tmp_path_factory.mktemp("reference")
    launch(RUN + ["--output_dir", str(output_dir)])
    return checksums(output_dir)


def test_sigterm_to_the_process_group_checkpoints_and_the_resume_is_exact(reference, tmp_path):
    """What Ctrl-C and SLURM do: the launcher and the training process both receive the signal."""
    output_dir = tmp_path / "out"
    run = HeldLaunch(SCRIPT, RUN + ["--output_dir", output_dir], tmp_path / "hold")
    wait_until_held([run], 1)
    os.killpg(run.pid, signal.SIGTERM)
    status, output = run.finish()
    # Accelerate's launcher reports its own status (128 + SIGTERM), not the child's 75: job scripts read the marker.
    assert status != 0, output
    assert_preempted_at(2, output_dir, output, ["SIGTERM"])
    log = launch(RUN + ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)])
    assert "Resuming from" in log and not (output_dir / PREEMPTED_MARKER).exists()
    assert checksums(output_dir) == reference  # bit-identical to the uninterrupted run


def test_sigusr1_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """SLURM's `--signal=USR1@120` reaches the training processes; one signalled rank is enough (the flag is reduced)."""
    launch(RUN + ["--output_dir", str(tmp_path / "reference")], num_processes=2)
    output_dir = tmp_path / "out"
    run = HeldLaunch(SCRIPT, RUN + ["--output_dir", output_dir], tmp_path / "hold", num_processes=2)
    pids = wait_until_held([run], 2)
    os.kill(pids[0], signal.SIGUSR1)
    status, output = run.finish()
    assert status != 0, output
    # The marker names the main process's own signal: None when the signalled process was the other one.
    assert_preempted_at(2, output_dir, output, ["SIGUSR1", None])
    launch(RUN + ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)], num_processes=2)
    for rank in (0, 1):
        assert checksums(output_dir, rank) == checksums(tmp_path / "reference", rank)


def _accelerate_forwards_sigterm() -> bool:
    """Whether this Accelerate's one-process launcher forwards SIGTERM to its child (it then SIGKILLs it 5 s later);
    older ones (the floor, 1.3) die of it and leave the child training on, so the signal must go to the process group
    or to the training process."""
    from accelerate.commands import launch as accelerate_launch

    return hasattr(accelerate_launch, "_terminate_process_tree")


def _torchrun_forwards_chosen_signals() -> bool:
    """Whether torch elastic takes `PET_SIGNALS_TO_HANDLE` (torchrun's `--signals_to_handle`; not in torch 2.5)."""
    from torch.distributed.run import get_args_parser

    return any("--signals_to_handle" in action.option_strings for action in get_args_parser()._actions)


@pytest.mark.skipif(not _accelerate_forwards_sigterm(), reason="this Accelerate's one-process launcher does not "
                    "forward SIGTERM (docs/cluster.md: signal the process group or the training process)")
def test_sigterm_to_the_one_process_launcher_alone_is_forwarded_and_checkpoints(tmp_path):
    """The launcher forwards SIGTERM and kills its child 5 s later: a tiny checkpoint is saved within that window."""
    output_dir = tmp_path / "out"
    run = HeldLaunch(SCRIPT, RUN + ["--output_dir", output_dir], tmp_path / "hold")
    wait_until_held([run], 1)
    os.kill(run.pid, signal.SIGTERM)
    run.wait_for("received SIGTERM")  # the child's own handler: the launcher forwarded the signal
    status, output = run.finish()
    assert status != 0, output
    assert_preempted_at(2, output_dir, output, ["SIGTERM"])


@pytest.mark.skipif(not _torchrun_forwards_chosen_signals(), reason="this torch's elastic launcher has no "
                    "PET_SIGNALS_TO_HANDLE: SIGUSR1 must go to the training processes (docs/cluster.md)")
def test_sigusr1_to_the_multi_process_launcher_alone_is_forwarded_with_pet_signals_to_handle(tmp_path):
    """The documented launch for SLURM's `--signal=B:USR1@...` (batch shell and launcher only): torch elastic forwards
    USR1 to every worker when PET_SIGNALS_TO_HANDLE names it; both processes checkpoint the same step."""
    output_dir = tmp_path / "out"
    env = {**os.environ, "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGUSR1"}
    run = HeldLaunch(SCRIPT, RUN + ["--output_dir", output_dir], tmp_path / "hold", num_processes=2, env=env)
    wait_until_held([run], 2)
    os.kill(run.pid, signal.SIGUSR1)
    run.wait_for("received SIGUSR1", count=2)
    status, output = run.finish()
    assert status != 0, output
    assert_preempted_at(2, output_dir, output, ["SIGUSR1"])


def test_the_step_reduce_returns_floats_by_name_and_refuses_a_non_scalar():
    from accelerate import Accelerator

    from flowmo_diffusers.training.distributed import mean_across_processes

    accelerator = Accelerator(cpu=True)
    values = {"loss": torch.tensor(0.25), "nonfinite": torch.tensor(0.0), "preempted": torch.tensor(1.0)}
    assert mean_across_processes(accelerator, values) == {"loss": 0.25, "nonfinite": 0.0, "preempted": 1.0}
    with pytest.raises(RuntimeError):
        mean_across_processes(accelerator, {"loss": torch.ones(2)})
