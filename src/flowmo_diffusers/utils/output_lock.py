"""One writer per output folder: an exclusive lock that training, pre-tokenization, sampling and evaluation take on
their `--output_dir` before writing anything there.

Without it two runs into one folder both succeed: one's checkpoints and pipeline silently replace the other's, their
logs interleave, and a starting run deletes the other's checkpoint being written. The lock is `filelock.FileLock`
(an OS `flock` on `<output_dir>/.flowmo-diffusers.lock`): the kernel releases it when its process dies, however it
dies (`kill -9` included), so a lock left by a killed run is never stale; the next run simply takes it. Who holds
it (pid, host, start time, command) is written beside it, in `.flowmo-diffusers.lock.json`, for the refusal message
and for noticing the takeover of a dead run's lock.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
from typing import Any

import filelock

LOCK_NAME = ".flowmo-diffusers.lock"
HOLDER_NAME = ".flowmo-diffusers.lock.json"
#: Glob that matches the lock's files, for upload / copy filters (e.g. `upload_folder(ignore_patterns=...)`).
LOCK_FILES_PATTERN = ".flowmo-diffusers.lock*"


class OutputDirLockedError(RuntimeError):
    """Another live process holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that left no description"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
        f"command: {holder.get('command')}"
    )


class OutputDirLock:
    r"""
    Exclusive lock on an output folder, refused at once (no waiting) when another live process holds it.

    Use as a context manager or call [`acquire`] / [`release`]; the lock also ends with the process.

    Args:
        output_dir (`str`): the folder (created if needed).
        purpose (`str`, *optional*): what the holder does ("training", "sampling", ...), shown to a refused run.

    Example:

    ```py
    lock = OutputDirLock(args.output_dir, purpose="training").acquire()
    ```
    """

    def __init__(self, output_dir: str, purpose: str | None = None):
        self.output_dir = os.path.abspath(output_dir)
        self.purpose = purpose
        self.lock_path = os.path.join(self.output_dir, LOCK_NAME)
        self.holder_path = os.path.join(self.output_dir, HOLDER_NAME)
        # thread_local=False: one lock for the whole process (the DataLoader, trackers and so on run in threads).
        self._lock = filelock.FileLock(self.lock_path, timeout=0, thread_local=False)
        #: The description of a dead run whose lock was taken over by [`acquire`], if any.
        self.previous_holder: dict[str, Any] | None = None

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked

    def read_holder(self) -> dict[str, Any] | None:
        """The description the current (or last) holder wrote, or None."""
        try:
            with open(self.holder_path, encoding="utf-8") as file:
                holder = json.load(file)
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> OutputDirLock:
        """Take the lock or raise [`OutputDirLockedError`] naming the holder; returns `self`.

        A description left by a run that no longer exists (a dead pid on this host) is reported in
        `previous_holder` and replaced: the OS released that run's lock when it died.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise OutputDirLockedError(
                f"{self.output_dir} is in use by another run ({_describe(self.read_holder())}). Two writers in one "
                "folder would overwrite each other's checkpoints and outputs: wait for it to finish, stop it, or "
                "choose another --output_dir"
            ) from None
        previous = self.read_holder()
        if previous and not (previous.get("host") == socket.gethostname() and previous.get("pid") == os.getpid()):
            same_host = previous.get("host") == socket.gethostname()
            if not same_host or not _pid_alive(int(previous.get("pid", -1))):
                self.previous_holder = previous
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "purpose": self.purpose,
        }
        temporary = f"{self.holder_path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(holder, file)
        os.replace(temporary, self.holder_path)
        return self

    def release(self) -> None:
        """Give the lock back (the holder description is removed first, so it never names a finished run)."""
        if not self._lock.is_locked:
            return
        holder = self.read_holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                os.remove(self.holder_path)
            except OSError:
                pass
        self._lock.release()

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


# Locks taken by lock_output_dir in this process, by folder: flock refuses a second lock of one file even to the
# process that holds the first.
_HELD_BY_THIS_PROCESS: dict[str, OutputDirLock] = {}


def lock_output_dir(output_dir: str, accelerator=None, purpose: str | None = None, log=None) -> OutputDirLock | None:
    """Take the [`OutputDirLock`] of `output_dir` on the main process (others return None); call it first.

    The lock is released when the process ends; a second call for the same folder in the same process returns the
    lock already held. With Accelerate, only the main process locks: the other processes of the same run write under its lock. A
    refusal raises on the main process, which ends the launch.

    Args:
        output_dir (`str`): the folder.
        accelerator (`accelerate.Accelerator`, *optional*): the run's accelerator; None for a single process.
        purpose (`str`, *optional*): shown to a refused run.
        log (`Callable[[str], None]`, *optional*): reports the takeover of a dead run's lock.
    """
    if accelerator is not None and not accelerator.is_main_process:
        return None
    held = _HELD_BY_THIS_PROCESS.get(os.path.abspath(output_dir))
    if held is not None and held.is_locked:
        return held  # this process is already the folder's writer (e.g. two evaluations in one Python session)
    lock = OutputDirLock(output_dir, purpose=purpose).acquire()
    _HELD_BY_THIS_PROCESS[lock.output_dir] = lock
    # Released at any normal end of the process, failures included; a killed process's lock is released by the OS
    # and its description then names a dead pid.
    atexit.register(lock.release)
    if lock.previous_holder is not None and log is not None:
        log(f"Took over the lock of {output_dir} left by a run that no longer exists ({_describe(lock.previous_holder)})")
    return lock


__all__ = ["HOLDER_NAME", "LOCK_FILES_PATTERN", "LOCK_NAME", "OutputDirLock", "OutputDirLockedError", "lock_output_dir"]
