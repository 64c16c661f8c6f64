"""Preemption-safe training: a signal (SIGTERM, SIGINT, SIGUSR1) makes every process finish its optimizer step,
agree on it, checkpoint there and exit with [`PREEMPTED_EXIT_STATUS`].

The handler only sets a flag. The training loop puts [`PreemptionGuard.flag`] (a 0/1 float tensor) into the scalars
it already reduces across processes once per optimizer step (stacked into one tensor, one all-reduce:
`training.distributed.mean_across_processes`), so every process sees the same verdict at the same step without a
collective or a host-device sync of its own: one more element in the step's one reduce::

    with PreemptionGuard() as preemption:
        ...
        running["preempted"] = preemption.flag(accelerator.device)
        logs = mean_across_processes(accelerator, running)
        preempted = preemption.agreed(logs.pop("preempted"))
        ...  # the scheduled checkpoint of this step, if any
        if preempted:
            preemption.stop(accelerator, step, save=..., already_saved=step % checkpointing_steps == 0)

What the launchers do with signals (docs/cluster.md): `accelerate launch` of one process forwards SIGTERM/SIGINT to
its child and SIGKILLs it 5 s later (fixed in Accelerate); of several processes (torch elastic) it forwards
SIGTERM,SIGINT,SIGHUP,SIGQUIT (`PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGUSR1` adds USR1 for SLURM) and SIGKILLs
after `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (default 30). A second signal is only a repeated flag here.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable

import torch

#: Exit status of a preempted training process: `EX_TEMPFAIL` of sysexits.h, "try again" (requeue and resume).
PREEMPTED_EXIT_STATUS = 75
#: The signals that request a checkpoint and exit: SLURM's `--signal` (USR1) and final TERM, Ctrl-C (INT).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
#: Written by the main process next to the checkpoints on preemption: the launcher's own exit status is 1 or 128+N
#: whatever its children return, so job scripts read this file to tell a preemption from a failure.
PREEMPTED_MARKER = "preempted.json"
#: Test hook, "STEP:DIR": at its STEP-th optimizer step each process writes DIR/ready-<pid> and waits for DIR/release,
#: so that a test can signal a run at a known point without sleeping.
TEST_HOLD_ENV = "FLOWMO_DIFFUSERS_PREEMPTION_TEST_HOLD"


def preempted_message(step: int) -> str:
    """The log line of a preempted run: `preempted at step N: checkpoint-N saved`."""
    return f"preempted at step {step}: checkpoint-{step} saved"


class PreemptionGuard:
    """Context manager: install flag-setting handlers for `signals`, restore the previous handlers on exit.

    Args:
        signals (`tuple[signal.Signals, ...]`, *optional*, defaults to [`PREEMPTION_SIGNALS`]): the signals to catch.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        if not signals or not all(isinstance(s, signal.Signals) for s in signals):
            raise TypeError(f"signals must be a non-empty tuple of signal.Signals, got {signals!r}")
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._steps_seen = 0
        hold = os.environ.get(TEST_HOLD_ENV)
        self._hold = None
        if hold:
            step, _, folder = hold.partition(":")
            self._hold = (int(step), folder)

    def _handle(self, signum, frame):
        # Only a flag: the loop acts at the next step boundary. A second signal changes nothing.
        if self.received is None:
            self.received = signal.Signals(signum)
            os.write(2, f"received {self.received.name}: checkpoint at the end of this optimizer step\n".encode())

    def install(self) -> PreemptionGuard:
        """Install the handlers (main thread only), remembering the previous ones; returns `self`."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before [`install`]."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    @property
    def signalled(self) -> bool:
        """Whether a signal reached this process."""
        return self.received is not None

    def flag(self, device: torch.device | str) -> torch.Tensor:
        """This process's verdict as a float tensor `()` on `device` (1: a signal arrived), for the per-step reduce.

        `torch.full` is a kernel launch: no host-device copy, no sync."""
        self._steps_seen += 1
        if self._hold is not None and self._steps_seen == self._hold[0]:
            self._wait_for_release(*self._hold)
        return torch.full((), float(self.signalled), device=device)

    def _wait_for_release(self, step: int, folder: str) -> None:
        with open(os.path.join(folder, f"ready-{os.getpid()}"), "w"):
            pass
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(folder, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)

    @staticmethod
    def agreed(reduced_flag: float) -> bool:
        """The common verdict from the reduced flag (its mean over processes): some process was signalled."""
        return reduced_flag > 0

    def checkpoint_or_stop(
        self,
        accelerator,
        step: int,
        save: Callable[[int], object],
        checkpointing_steps: int,
        preempted: bool,
        output_dir: str,
        log: Callable[[str], None] = print,
    ) -> None:
        """The end of optimizer step `step` in a training script: `save(step)` when `--checkpointing_steps` says a
        checkpoint is due, then, if `preempted` (the [`agreed`] verdict), [`stop`] without saving the same step twice.
        Call on every process."""
        due = step % checkpointing_steps == 0
        if due:
            save(step)
        if preempted:
            self.stop(accelerator, step, save, due, output_dir, log)

    def stop(
        self,
        accelerator,
        step: int,
        save: Callable[[int], object],
        already_saved: bool,
        output_dir: str,
        log: Callable[[str], None] = print,
    ) -> None:
        """Checkpoint `step` (unless the schedule `already_saved` it), log, write the marker and exit every process
        with [`PREEMPTED_EXIT_STATUS`]. Call on every process (it synchronizes them)."""
        if not already_saved:
            save(step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {"step": step, "checkpoint": f"checkpoint-{step}", "exit_status": PREEMPTED_EXIT_STATUS,
                      "signal": self.received.name if self.received else None}
            with open(os.path.join(output_dir, PREEMPTED_MARKER), "w") as f:
                json.dump(marker, f)
        log(preempted_message(step))
        # Every process leaves together: one tearing down the process group while the main one still writes the
        # marker can leave the main process hanging in destroy_process_group (gloo, torch 2.5).
        accelerator.wait_for_everyone()
        accelerator.end_training()
        sys.stdout.flush()
        sys.stderr.flush()
        sys.exit(PREEMPTED_EXIT_STATUS)


def clear_preempted_marker(output_dir: str) -> None:
    """Remove the marker of an earlier preemption (main process, at the start of a run)."""
    try:
        os.remove(os.path.join(output_dir, PREEMPTED_MARKER))
    except FileNotFoundError:
        pass


__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "PREEMPTED_MARKER",
    "PREEMPTION_SIGNALS",
    "PreemptionGuard",
    "clear_preempted_marker",
    "preempted_message",
]
