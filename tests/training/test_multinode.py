"""Multi-node training on one host: two Accelerate "machines" (`--num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1`, one training process each) meet at one port, train, are preempted and resume; the result
is the weights of the same two processes launched as one machine, bit for bit.

The preemption is SIGTERM to machine 1's launcher alone (torch elastic forwards it to its worker, docs/cluster.md): the
signalled worker's flag reaches machine 0 through the per-step reduce, so both machines checkpoint the same step. Both
machines write to one `--output_dir`, as nodes do on a cluster's shared file system."""

import os
import signal
import subprocess

from flowmo_diffusers.training.preemption import PREEMPTED_MARKER

from test_preemption import RUN
from test_training import SCRIPT, checksums, launch
from testing_utils import REPO, HeldLaunch, accelerate_command, assert_preempted_at, free_port, wait_until_held


def launch_two_machines(arguments, timeout=300):
    """Both machines of one run, started together (each waits for the other at the rendezvous); returns the output."""
    port = free_port()
    processes = []
    for rank in (0, 1):
        command, env = accelerate_command(SCRIPT, arguments, num_processes=2, machine=(rank, 2, port))
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-6000:]
    return "".join(outputs)


def test_two_machines_train_are_preempted_and_resume_to_the_one_machine_weights(tmp_path):
    launch(RUN + ["--output_dir", str(tmp_path / "one_machine")], num_processes=2)
    reference = [checksums(tmp_path / "one_machine", rank) for rank in (0, 1)]

    output_dir = tmp_path / "two_machines"
    port = free_port()
    machines = [HeldLaunch(SCRIPT, RUN + ["--output_dir", output_dir], tmp_path / "hold", num_processes=2,
                           machine=(rank, 2, port)) for rank in (0, 1)]
    try:
        wait_until_held(machines, 2)
        os.kill(machines[1].pid, signal.SIGTERM)  # the launcher of machine 1, not its worker
        machines[1].wait_for("received SIGTERM")  # forwarded to the worker before it is released
        finished = [machine.finish() for machine in machines]
    finally:
        for machine in machines:
            if machine.process.poll() is None:
                machine.process.kill()
    for status, output in finished:
        assert status != 0, output[-6000:]  # the launchers report a failure; the marker tells a preemption
    # Machine 0 holds the main process: it writes the marker and its log line; the signal reached machine 1 only.
    assert_preempted_at(2, output_dir, finished[0][1], [None])

    log = launch_two_machines(RUN + ["--resume_from_checkpoint", "latest", "--output_dir", str(output_dir)])
    assert "Resuming from" in log and not (output_dir / PREEMPTED_MARKER).exists()
    assert [checksums(output_dir, rank) for rank in (0, 1)] == reference
