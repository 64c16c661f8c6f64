"""Resumable evaluation: each process' partial metric state on disk, and the refusals of mismatched reruns.

Every `resume_every_batches` batches each process writes, into `<output_dir>/partial_evaluation/`:

* `process-<rank>-<save>.safetensors`: its metric sums and feature statistics (float64 / int64, bit for bit);
* `process-<rank>.json`: the commit point, written last (atomically): the fingerprint of the arguments that
  determine the figures, the number of processes, the results of the models already finished, the position (model,
  batches and images done) and the name of the tensor file it belongs to. The tensor file it named before is removed
  only after it is replaced, so a kill at any moment leaves a consistent pair.

The initial noise of an image depends on `(seed, global image index)` only, so the position alone determines the noise
of the rest of the run. A rerun with the same arguments continues from the saved position; one with other arguments,
another process count or into a folder with finished results is refused (naming the difference) unless `overwrite`,
which discards them (a partial state that fits is resumed, with or without `overwrite`).
The folder is removed once the final results are written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from ..utils.files import atomic_write

logger = logging.getLogger(__name__)

PARTIAL_STATE_DIR = "partial_evaluation"
RESULTS_NAME = "results.json"
RESULTS_MARKDOWN_NAME = "results.md"


#: Options that never change a figure: a rerun may change them and still resume.
RESUME_INDEPENDENT_OPTIONS = frozenset(
    {"output_dir", "overwrite", "resume_every_batches", "dataloader_num_workers", "cache_dir", "hub_token"}
)


def resume_fingerprint(
    config: Any, accelerator: Any, independent_options: frozenset[str] = RESUME_INDEPENDENT_OPTIONS
) -> dict[str, Any]:
    """The arguments that determine the figures: every field of the dataclass `config` but `independent_options`,
    plus the mixed precision Accelerate resolved; a saved partial state is continued only with equal ones."""
    options = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name not in independent_options
    }
    return dict(options, mixed_precision=accelerator.mixed_precision)


class ResumeRefusedError(ValueError):
    """The output folder holds finished results or partial state of other arguments (and no `--overwrite`)."""


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`--name: saved in the saved state, current now` for every argument that differs (sorted by name)."""
    return [
        f"--{name}: {saved.get(name)!r} in the saved state, {current.get(name)!r} now"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]


class PartialEvaluationState:
    """One process' view of the partial state of an evaluation in `output_dir`.

    Args:
        output_dir (`str` or `os.PathLike`):
            The evaluation's `--output_dir`.
        fingerprint (`dict[str, Any]`):
            JSON-able arguments that determine the figures (compared on resume).
        process_index (`int`, *optional*, defaults to `0`):
            This process.
        num_processes (`int`, *optional*, defaults to `1`):
            The number of processes (each keeps its own state; a rerun must use as many).
    """

    def __init__(
        self, output_dir: str | os.PathLike, fingerprint: dict[str, Any], process_index: int = 0, num_processes: int = 1
    ) -> None:
        self.output_dir = Path(output_dir)
        self.folder = self.output_dir / PARTIAL_STATE_DIR
        # Through JSON once, so that tuples and lists (and other JSON-equal values) compare equal with a saved state.
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.process_index = process_index
        self.num_processes = num_processes
        self._num_saves = 0

    def record_path(self, process_index: int | None = None) -> Path:
        return self.folder / f"process-{self.process_index if process_index is None else process_index}.json"

    def read_record(self, process_index: int | None = None) -> dict[str, Any] | None:
        """The JSON record of a process (default: this one), or None."""
        path = self.record_path(process_index)
        if not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def check(self, overwrite: bool = False) -> bool:
        """Refuse (cheaply, before any heavy work) finished results or partial state that does not fit.

        Every process reads the same files (every process' record), so all of them refuse or go on together.

        Args:
            overwrite (`bool`, *optional*, defaults to `False`):
                Instead of refusing, say that the folder's contents must be discarded ([`discard`]). A partial state
                that fits is never discarded: a run with `--overwrite` that is killed resumes when run again.

        Returns:
            `bool`: True when `overwrite` and the folder holds finished results or partial state that does not fit.

        Raises:
            ResumeRefusedError: Finished results, other arguments or another process count, without `overwrite`.
        """
        try:
            self._refuse_what_does_not_fit()
        except ResumeRefusedError:
            if overwrite:
                return True
            raise
        return False

    def _refuse_what_does_not_fit(self) -> None:
        results = self.output_dir / RESULTS_NAME
        if results.is_file():
            raise ResumeRefusedError(
                f"{self.output_dir} already holds finished results ({results}); pass --overwrite to replace them or "
                "choose another --output_dir"
            )
        # Every process' record, not only process 0's: a run killed before process 0 first saved can leave another
        # process' state alone, which that process would otherwise load under other arguments.
        for path in sorted(self.folder.glob("process-*.json")):
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["num_processes"] != self.num_processes:
                raise ResumeRefusedError(
                    f"the partial evaluation in {self.folder} was run by {saved['num_processes']} processes, this run "
                    f"has {self.num_processes} (--num_processes: {saved['num_processes']} in the saved state, "
                    f"{self.num_processes} now); launch as many processes to resume, or pass --overwrite to start over"
                )
            listed = differences(saved["fingerprint"], self.fingerprint)
            if listed:
                raise ResumeRefusedError(
                    f"the partial evaluation in {self.folder} was started with other arguments ({'; '.join(listed)}); "
                    "rerun with the saved arguments to resume, or pass --overwrite to start over"
                )

    def clear(self) -> None:
        """Remove the partial state of every process (call on the main process, under the output lock)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def finish(self, accelerator, write_results: Callable[[], dict[str, Path]]) -> None:
        """End a finished evaluation (call on every process): the main process writes the results (`write_results()`
        returns the paths it wrote, which are logged); the partial state goes only once every process is past that,
        so a kill in between leaves finished results, which a rerun reports."""
        if accelerator.is_main_process:
            paths = write_results()
            logger.info("report written: %s", ", ".join(str(path) for path in paths.values()))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self.clear()

    def discard(self) -> None:
        """Remove finished results (`results.json`, `results.md`) and every process' partial state (`--overwrite`;
        call on the main process, under the output lock)."""
        for name in (RESULTS_NAME, RESULTS_MARKDOWN_NAME):
            (self.output_dir / name).unlink(missing_ok=True)
        self.clear()

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """This process' record and metric tensors, or None when it saved nothing yet."""
        from safetensors.torch import load_file

        record = self.read_record()
        if record is None:
            return None
        tensors = load_file(self.folder / record["tensors"]) if record.get("tensors") else {}
        self._num_saves = int(record["save"])
        return record, tensors

    def save(self, position: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Write this process' state atomically: the tensors first, then the record that names them.

        Args:
            position (`dict[str, Any]`):
                JSON-able: `completed_models`, `model_index`, `batches_done`, `images_done`, ...
            tensors (`dict[str, torch.Tensor]`):
                The metric state (e.g. [`~flowmo_diffusers.metrics.ReconstructionMetrics.state_dict`]).
        """
        from safetensors.torch import save

        previous = self.read_record()
        self._num_saves += 1
        name = f"process-{self.process_index}-{self._num_saves:06d}.safetensors"
        # safetensors' save_file writes in place; bytes through atomic_write never leave a truncated file behind.
        payload = save({key: value.detach().cpu().contiguous() for key, value in tensors.items()})
        with atomic_write(self.folder / name) as handle:
            handle.write(payload)
        record = dict(
            position,
            fingerprint=self.fingerprint,
            num_processes=self.num_processes,
            process_index=self.process_index,
            save=self._num_saves,
            tensors=name,
        )
        with atomic_write(self.record_path()) as handle:
            handle.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
        if previous is not None and previous.get("tensors") and previous["tensors"] != name:
            (self.folder / previous["tensors"]).unlink(missing_ok=True)

    def images_done_by_all(self) -> int:
        """Images done over every process' record (for the log line `resuming at image N of M`)."""
        records = [self.read_record(index) for index in range(self.num_processes)]
        return sum(int(record.get("images_done", 0)) for record in records if record is not None)


__all__ = [
    "PARTIAL_STATE_DIR",
    "RESUME_INDEPENDENT_OPTIONS",
    "PartialEvaluationState",
    "ResumeRefusedError",
    "differences",
    "resume_fingerprint",
]
