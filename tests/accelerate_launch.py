"""Run an example script through `accelerate launch` on CPU, as a user would (shared by the training tests)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface for the processes' rendezvous. Port 0 ("any free port") is not
    used: with torch 2.5 (the floor) the workers are not told the port the launcher picks and wait forever."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(script, arguments, num_processes=1, env=None, timeout=300):
    """`accelerate launch SCRIPT ARGUMENTS` with `num_processes` CPU processes; returns stdout + stderr, raises on failure."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    env = dict(os.environ if env is None else env)
    # One thread per process: on a small shared CPU, OpenMP thread pools of 2+ threads can stall for seconds per step.
    env.setdefault("OMP_NUM_THREADS", "1")
    if num_processes > 1:
        # Several CPU processes: the multi-GPU launcher (torchrun) plus ACCELERATE_USE_CPU selects gloo DDP.
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command + [str(script)] + [str(a) for a in arguments], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result.stdout + result.stderr
