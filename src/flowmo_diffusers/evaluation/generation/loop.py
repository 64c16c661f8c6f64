"""The generation evaluation's loop: one entry point per mode (generated images from files or from a pipeline, real
images into reference statistics), the resumable accumulation they share, and the command-line entry point [`main`].
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ...data import build_evaluation_loader
from ...metrics import sum_across_processes
from ...utils.output_lock import lock_output_dir
from ..options import create_accelerator, load_evaluation_dataset, start_command
from ..reports import library_versions
from ..resume import PartialEvaluationState, ResumeRefusedError, resume_fingerprint
from ..sampling import SAMPLING_CONFIG_NAME
from .config import (
    GENERATION_RESUME_INDEPENDENT_OPTIONS,
    GenerationEvaluationConfig,
    build_generation_metrics,
    parse_args,
)
from .report import format_markdown_report, report_warnings, write_report
from .sources import pipeline_sample_batches, sample_file_batches

logger = logging.getLogger(__name__)


@torch.no_grad()
def accumulate(
    metrics,
    batches,
    accelerator=None,
    total: int | None = None,
    description: str = "evaluating",
    value_range: tuple[float, float] = (0.0, 1.0),
    batches_done: int = 0,
    save_state: Callable[[int], None] | None = None,
    save_every_batches: int | None = None,
):
    """Feed `(global indices [b], images [b, 3, H, W])` batches to `metrics`, then gather over processes.

    Call on every process. Resuming: `metrics` already holds this process' first `batches_done` batches (loaded from
    a saved state) and `batches` yields the rest.

    Args:
        metrics ([`~flowmo_diffusers.metrics.GenerationMetrics`]):
            The metrics to update.
        batches (`Iterable[tuple[torch.Tensor, torch.Tensor]]`):
            The batches; `images` are uint8, or floats in `value_range`.
        accelerator (`accelerate.Accelerator`, *optional*):
            Gathering and the progress bar (local main process only); None: a single process.
        total (`int`, *optional*):
            Images over all processes, for the progress bar.
        description (`str`, *optional*, defaults to `"evaluating"`):
            Progress-bar label.
        value_range (`tuple[float, float]`, *optional*, defaults to `(0.0, 1.0)`):
            Range of float images.
        batches_done (`int`, *optional*, defaults to `0`):
            Batches of this process already in `metrics` (numbering continues from them).
        save_state (`Callable[[int], None]`, *optional*):
            Called with the number of batches done (this process) after every `save_every_batches`-th batch.
        save_every_batches (`int`, *optional*):
            See `save_state`.

    Returns:
        The gathered `metrics`.
    """
    from tqdm.auto import tqdm

    show = accelerator is None or accelerator.is_local_main_process
    num_processes = accelerator.num_processes if accelerator is not None else 1
    local_total = None if total is None else math.ceil(total / num_processes)
    initial = int(metrics.num_images)
    with tqdm(total=local_total, initial=initial, desc=description, unit="img", disable=not show) as progress:
        for batch_number, (indices, images) in enumerate(batches, start=batches_done + 1):
            metrics.update(images, value_range=value_range, sample_indices=indices)
            progress.update(images.shape[0])
            if save_state is not None and batch_number % save_every_batches == 0:
                save_state(batch_number)
    metrics.gather(accelerator)
    return metrics


def resume_metrics(partial: PartialEvaluationState | None, metrics, accelerator, total: int | None) -> int:
    """Load this process' saved state (if any) into `metrics`; call on every process, after [`PartialEvaluationState.check`].

    Args:
        partial ([`~flowmo_diffusers.evaluation.resume.PartialEvaluationState`], *optional*):
            The run's partial state; None: no resuming.
        metrics ([`~flowmo_diffusers.metrics.GenerationMetrics`]):
            Replaced by the saved sums, feature statistics and logits.
        total (`int`, *optional*):
            Images of the whole run (all processes), when known: a saved state of another number (a samples folder
            that grew or shrank) is refused.

    Returns:
        `int`: This process' batches already in `metrics` (0 without a saved state).

    Raises:
        ResumeRefusedError: The saved state covers another number of images.
    """
    if partial is None:
        return 0
    for index in range(partial.num_processes):  # every process reads the same files: all refuse together
        record = partial.read_record(index)
        saved_total = None if record is None else record.get("num_images_total")
        if saved_total is not None and total is not None and saved_total != total:
            raise ResumeRefusedError(
                f"the partial evaluation in {partial.folder} was started on {saved_total} images, there are {total} "
                f"now (--samples / --max_samples: {saved_total} images in the saved state, {total} now); pass "
                "--overwrite to start over"
            )
    saved = partial.load()
    images_done = partial.images_done_by_all()
    # Every process has read the records before any of them saves again (the log's count is the saved one).
    accelerator.wait_for_everyone()
    if saved is None:
        return 0
    record, tensors = saved
    metrics.load_state_dict(tensors)
    if accelerator.is_main_process:
        logger.info("resuming at image %d of %s", images_done, "?" if total is None else total)
    return int(record["batches_done"])


def state_saver(partial: PartialEvaluationState | None, metrics, total: int | None) -> Callable[[int], None] | None:
    """`save(batches_done)`: this process' metric state and position into `partial` (None without `partial`)."""
    if partial is None:
        return None

    def save(batches_done: int) -> None:
        position = {"batches_done": batches_done, "images_done": int(metrics.num_images), "num_images_total": total}
        partial.save(position, metrics.state_dict())

    return save


def compute_reference_statistics(
    config: GenerationEvaluationConfig, accelerator=None, partial: PartialEvaluationState | None = None
):
    """`mu`/`sigma` of the real images of `config`, saved to `config.compute_reference_statistics`.

    Images are resized (shorter side, antialiased `config.interpolation`) and center-cropped to `config.resolution` by
    the evaluation data pipeline, split over processes and summed once at the end.

    Args:
        partial ([`~flowmo_diffusers.evaluation.resume.PartialEvaluationState`], *optional*):
            Resume from and save into it every `config.resume_every_batches` batches.

    Returns:
        `tuple[ReferenceStatistics, int]`: The statistics and the number of undecodable images skipped.
    """
    from torchvision.transforms import InterpolationMode

    if accelerator is None:
        accelerator = create_accelerator(config)
    with accelerator.main_process_first():  # one download of the weights / one Arrow preparation
        metrics = build_generation_metrics(config, accelerator.device)
        dataset = load_evaluation_dataset(config)
    loader = build_evaluation_loader(
        dataset,
        config.resolution,
        config.batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        num_workers=config.dataloader_num_workers,
        interpolation=InterpolationMode(config.interpolation),
    )
    total = len(dataset) if hasattr(dataset, "__len__") else config.max_samples
    if total is not None and config.max_samples is not None:
        total = min(total, config.max_samples)
    batches_done = resume_metrics(partial, metrics, accelerator, total)
    # "labels" carries the global image index; pixel_values are uint8 mapped to [-1, 1] (x / 127.5 - 1).
    batches = ((batch["labels"], batch["pixel_values"]) for batch in loader)
    # The done batches are read again but not evaluated: the loader cannot seek in a stream, and reading them keeps
    # the count of undecodable images and the composition of the later batches those of an uninterrupted run.
    accumulate(
        metrics,
        itertools.islice(batches, batches_done, None),
        accelerator,
        total=total,
        description="reference statistics",
        value_range=(-1, 1),
        batches_done=batches_done,
        save_state=state_saver(partial, metrics, total),
        save_every_batches=config.resume_every_batches,
    )
    skipped = torch.tensor(loader.skipped_images.count, dtype=torch.int64)
    num_skipped = int(sum_across_processes(skipped, accelerator))
    statistics = metrics.sample_statistics()
    if accelerator.is_main_process:
        statistics.save(config.compute_reference_statistics)
    accelerator.wait_for_everyone()
    statistics.path = os.fspath(config.compute_reference_statistics)
    return statistics, num_skipped


def evaluate_reference_images(
    config: GenerationEvaluationConfig, accelerator, partial: PartialEvaluationState
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Mode `--compute_reference_statistics`: [`compute_reference_statistics`] with what the report says of it.

    Returns:
        `tuple[dict, dict, dict]`: The report's `metrics` (`num_images`, `num_skipped_images`), `source` (the real
        images) and `reference_statistics` (the written file).
    """
    statistics, num_skipped = compute_reference_statistics(config, accelerator, partial)
    results = {"num_images": statistics.num_samples, "num_skipped_images": num_skipped}
    source = {
        "dataset_name": config.dataset_name,
        "dataset_config_name": config.dataset_config_name,
        "train_data_dir": os.path.abspath(config.train_data_dir) if config.train_data_dir else None,
        "split": config.dataset_split,
        "resolution": config.resolution,
        "interpolation": config.interpolation,
        "max_samples": config.max_samples,
    }
    return results, source, {"path": os.path.abspath(config.compute_reference_statistics), "written": True}


def evaluate_sample_files(
    config: GenerationEvaluationConfig, accelerator, partial: PartialEvaluationState
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Mode `--samples`: gFID / IS of a samples folder (`sample.py`'s, whose `sampling_config.json` the report quotes),
    an `.npz` or a `.npy`.

    Returns:
        `tuple[dict, dict, dict | None]`: The report's `metrics`, `source` and `reference_statistics`.
    """

    def open_batches(skip_batches: int) -> tuple[Any, int, dict[str, Any]]:
        loader, total = sample_file_batches(
            config.samples,
            config.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            config.dataloader_num_workers,
            config.max_samples,
            skip_batches=skip_batches,
        )
        source = {"samples": os.path.abspath(config.samples)}
        sampling_record = Path(config.samples) / SAMPLING_CONFIG_NAME
        if sampling_record.is_file():
            source["sampling"] = json.loads(sampling_record.read_text(encoding="utf-8"))
        return loader, total, source

    return _evaluate_generated_images(config, accelerator, partial, open_batches)


def evaluate_pipeline_samples(
    config: GenerationEvaluationConfig, accelerator, partial: PartialEvaluationState
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Mode `--pretrained_model_name_or_path`: gFID / IS of `sample.py`'s images, generated on the fly, never written.

    Returns:
        `tuple[dict, dict, dict | None]`: The report's `metrics`, `source` (the sampling settings) and
        `reference_statistics`.
    """

    def open_batches(skip_batches: int) -> tuple[Any, int, dict[str, Any]]:
        batches, total, sampling = pipeline_sample_batches(config, accelerator, skip_batches=skip_batches)
        return batches, total, {"sampling": sampling}

    return _evaluate_generated_images(config, accelerator, partial, open_batches)


def _evaluate_generated_images(config, accelerator, partial, open_batches):
    """What the two modes of generated images share: metrics first (fail fast), resume, accumulate, gather, save."""
    with accelerator.main_process_first():  # one weights download; also fails before samples are touched
        metrics = build_generation_metrics(config, accelerator.device)
    # Where this process stopped, from its saved record (its tensors are loaded once the total is known).
    saved_record = partial.read_record()
    batches, total, source = open_batches(0 if saved_record is None else int(saved_record["batches_done"]))
    batches_done = resume_metrics(partial, metrics, accelerator, total)
    accumulate(
        metrics,
        batches,
        accelerator,
        total=total,
        batches_done=batches_done,
        save_state=state_saver(partial, metrics, total),
        save_every_batches=config.resume_every_batches,
    )
    results = metrics.compute()
    if config.save_sample_statistics is not None:
        if accelerator.is_main_process:
            metrics.sample_statistics().save(config.save_sample_statistics)
        accelerator.wait_for_everyone()
    reference = None
    if metrics.reference_statistics is not None:
        reference = {
            "path": os.path.abspath(config.reference_statistics),
            "num_samples": metrics.reference_statistics.num_samples,
            "feature_network": metrics.reference_statistics.feature_network,
        }
    return results, source, reference


#: The entry point of each mode of [`GenerationEvaluationConfig.mode`]: `(config, accelerator, partial state)` ->
#: the report's `(metrics, source, reference_statistics)`.
MODE_ENTRY_POINTS = {
    "samples": evaluate_sample_files,
    "pipeline": evaluate_pipeline_samples,
    "reference_statistics": evaluate_reference_images,
}


def evaluate_generation(config: GenerationEvaluationConfig, accelerator=None) -> dict[str, Any]:
    """Run the entry point of `config`'s mode ([`MODE_ENTRY_POINTS`]) and write the report (main process); call on
    every process.

    Args:
        config ([`GenerationEvaluationConfig`]):
            The mode, what it reads and how.
        accelerator (`accelerate.Accelerator`, *optional*):
            Made from `config` if not given.

    Returns:
        `dict[str, Any]`: The report (`results.json`): `{"mode", "metrics", "source", "reference_statistics",
        "settings", "warnings", "comparable_to_published_results", "versions"}`; the same on every process.

    Raises:
        MissingPretrainedWeightsError, FileNotFoundError, ValueError: Before any data or model is loaded when the
            Inception weights or the reference statistics are unusable.
    """
    config.validate()
    if accelerator is None:
        accelerator = create_accelerator(config)
    fingerprint = resume_fingerprint(config, accelerator, GENERATION_RESUME_INDEPENDENT_OPTIONS)
    partial = PartialEvaluationState(
        config.output_dir, fingerprint, accelerator.process_index, accelerator.num_processes
    )
    discard = partial.check(overwrite=config.overwrite)  # small JSON files: refuses before anything heavy is built
    lock_output_dir(config.output_dir, accelerator, purpose="generation evaluation", log=logger.warning)
    if discard and accelerator.is_main_process:
        partial.discard()  # under the lock
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    results, source, reference = MODE_ENTRY_POINTS[config.mode](config, accelerator, partial)
    report = {
        "mode": config.mode,
        "metrics": results,
        "source": source,
        "reference_statistics": reference,
        "settings": {
            "feature_network": config.feature_network(),
            "inception_feature_dims": config.inception_feature_dims,
            "inception_score": config.computes_inception_score,
            "inception_score_splits": config.inception_score_splits,
            "inception_score_shuffle_seed": config.inception_score_shuffle_seed,
            "batch_size": config.batch_size,
            "num_processes": accelerator.num_processes,
            "device": str(accelerator.device),
            "seconds": time.perf_counter() - start,
        },
        "warnings": report_warnings(config, int(results["num_images"])),
        "comparable_to_published_results": config.comparable_to_published_results,
        "versions": library_versions(),
    }
    partial.finish(accelerator, lambda: write_report(report, config.output_dir))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: parse, evaluate, print the markdown on the main process."""
    from ...metrics import MissingPretrainedWeightsError

    config, accelerator = start_command(parse_args, argv)
    try:
        report = evaluate_generation(config, accelerator)
    except (MissingPretrainedWeightsError, FileNotFoundError, ResumeRefusedError) as error:
        raise SystemExit(f"error: {error}") from None  # the message says what to do
    if accelerator.is_main_process:
        print(format_markdown_report(report))
    return report


__all__ = [
    "MODE_ENTRY_POINTS",
    "accumulate",
    "compute_reference_statistics",
    "evaluate_generation",
    "evaluate_pipeline_samples",
    "evaluate_reference_images",
    "evaluate_sample_files",
    "main",
    "resume_metrics",
    "state_saver",
]
