"""One writer per output folder (`flowmo_diffusers.utils.output_lock`), tested with real processes: a second writer
is refused at once with the holder named, the lock of a killed run is taken over, and the training script refuses a
folder in use before it touches anything there."""

import os
import socket
import subprocess
import sys

import pytest

from flowmo_diffusers.utils.output_lock import HOLDER_NAME, OutputDirLock, OutputDirLockedError, lock_output_dir

from testing_utils import REPO, launch

HOLD = """
import sys
from flowmo_diffusers.utils.output_lock import lock_output_dir
lock_output_dir(sys.argv[1], purpose="holding", log=print)
print("locked", flush=True)
sys.stdin.readline()  # hold the lock until the test says
"""


def take(folder):
    """Another process that takes the lock and keeps it until its stdin closes; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    return holder


def try_take(folder):
    return subprocess.run([sys.executable, "-c", HOLD, str(folder)], input="", capture_output=True, text=True)


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = take(tmp_path)
    try:
        refused = try_take(tmp_path)
        assert refused.returncode != 0
        message = refused.stderr.splitlines()[-1]
        assert "OutputDirLockedError" in message and f"is in use by another run (pid {holder.pid} on {socket.gethostname()}" in message
        assert "started 20" in message and "command: -c " + str(tmp_path) in message
    finally:
        holder.kill()  # like kill -9: no clean-up runs
        holder.wait()
    assert (tmp_path / HOLDER_NAME).exists()  # the dead run's description is left behind
    taken = try_take(tmp_path)
    assert taken.returncode == 0, taken.stderr
    assert f"Took over the lock of {tmp_path} left by a run that no longer exists (pid {holder.pid}" in taken.stdout
    # A run that ends normally releases the lock and removes its description.
    assert not (tmp_path / HOLDER_NAME).exists()
    assert try_take(tmp_path).stdout.count("Took over") == 0


def test_in_process_lock_is_exclusive_and_reentrant_for_the_same_writer(tmp_path):
    lock = lock_output_dir(str(tmp_path / "out"))
    assert lock_output_dir(str(tmp_path / "out")) is lock  # the same process, the same writer
    with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()}"):
        OutputDirLock(str(tmp_path / "out")).acquire()  # a separate lock object is another writer
    lock.release()
    with OutputDirLock(str(tmp_path / "out")):
        pass


def test_training_refuses_an_output_dir_in_use_before_touching_it(tmp_path):
    holder = take(tmp_path)
    try:
        stale = tmp_path / "checkpoint-7.tmp"  # e.g. the holder's save in progress
        stale.mkdir()
        with pytest.raises(AssertionError, match=f"is in use by another run \\(pid {holder.pid}"):
            launch(REPO / "examples" / "train_flowmo" / "train.py",
                   ["--max_train_steps", "1", "--report_to", "none", "--output_dir", tmp_path])
        assert stale.exists()  # the live run's temporary checkpoint survives
    finally:
        holder.stdin.close()
        holder.wait()
