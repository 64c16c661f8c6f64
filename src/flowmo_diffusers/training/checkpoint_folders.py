"""Checkpoint folders of a run: `checkpoint-<step>` names, finding the one to resume from, atomic publishing, pruning.

A save is written to `checkpoint-<step>.tmp` and renamed into place only when complete, so a folder named exactly
`checkpoint-<step>` is always whole; leftovers of an interrupted save are removed at the next start, under the
output folder's lock.
"""

from __future__ import annotations

import os
import re
import shutil

from ..utils.files import apply_default_mode
from ..utils.output_lock import OutputDirLock
from ..utils.validation import check_optional_int

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints `(step, path)` in `output_dir`, oldest first.

    Only folders named exactly `checkpoint-<step>` count: a save in progress (or interrupted) lives in
    `checkpoint-<step>.tmp` and is never picked.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> tuple[int, str] | None:
    """`(step, path)` of the checkpoint to resume from, or None to start fresh.

    `"latest"` picks the newest complete `checkpoint-<step>` of `output_dir` (None if there is none, so the same
    command starts and resumes a run); any other value is a checkpoint folder whose name gives the step.
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if not os.path.isdir(path) or not match:
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder named checkpoint-<step> "
            f"(nor one inside {output_dir!r}); use 'latest' to pick the newest one"
        )
    return int(match.group(1)), path


def remove_stale_temporary_checkpoints(output_dir: str, lock: OutputDirLock | None) -> list[str]:
    """Delete `checkpoint-*.tmp` / `checkpoint-*.old` folders left by an interrupted save; returns their paths.

    Args:
        output_dir (`str`): the run's output folder.
        lock ([`~flowmo_diffusers.utils.output_lock.OutputDirLock`]): the held lock of `output_dir`. It guarantees
            that no other live run writes there, so every temporary folder found is a leftover of a dead run, never
            a live run's save in progress.
    """
    if lock is None or not lock.is_locked or os.path.abspath(output_dir) != lock.output_dir:
        raise RuntimeError(
            f"remove_stale_temporary_checkpoints needs the held lock of {output_dir} (lock_output_dir): without it, "
            "it could delete the checkpoint another live run is writing"
        )
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if re.match(r"^checkpoint-\d+\.(tmp|old)$", name):
                path = os.path.join(output_dir, name)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def temporary_checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"checkpoint-{step}.tmp")


def publish_checkpoint(output_dir: str, step: int) -> str:
    """Atomically turn `checkpoint-<step>.tmp` into `checkpoint-<step>` (`os.replace`); returns the final path.

    An existing `checkpoint-<step>` (a run resumed from before it) is first moved aside to `.old`, then deleted
    after the rename, so that some complete copy exists at every moment. Before the rename, the folder and every file
    in it get the modes of the umask: safetensors writes `model.safetensors` and `training_states.safetensors` 0600.
    """
    temporary = temporary_checkpoint_path(output_dir, step)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if not os.path.isdir(temporary):
        raise FileNotFoundError(f"no temporary checkpoint at {temporary}")
    apply_default_mode(temporary, recursive=True)
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(temporary, final)
    except BaseException:
        if old is not None:  # put the complete copy back: a `.old` folder is deleted as a leftover at the next start
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Delete the oldest complete checkpoints so that at most `total_limit` remain; returns the removed paths."""
    # Kept by hand: Accelerate's own rotation (ProjectConfiguration(total_limit=...)) counts only its
    # `checkpoints/checkpoint_<i>` folders, not diffusers' `checkpoint-<step>` names that are published atomically here.
    if total_limit is None:
        return []
    check_checkpoints_total_limit(total_limit)
    checkpoints = list_checkpoints(output_dir)
    removed = []
    for _, path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def check_checkpoints_total_limit(total_limit: int | None) -> None:
    """Raise ValueError unless `total_limit` is None (keep every checkpoint) or at least 1."""
    check_optional_int("--checkpoints_total_limit", total_limit, 1)


__all__ = [
    "check_checkpoints_total_limit",
    "list_checkpoints",
    "prune_checkpoints",
    "publish_checkpoint",
    "remove_stale_temporary_checkpoints",
    "resolve_resume_checkpoint",
    "temporary_checkpoint_path",
]
