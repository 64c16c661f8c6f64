"""The tokenizer evaluation's loop: reconstruct every image of every model from per-image noise, accumulate the
metrics, resume a killed run, and the command-line entry point [`main`]."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ...data import build_evaluation_loader
from ...models.configuration_flowmo import bits_per_pixel
from ...utils.output_lock import lock_output_dir
from ...utils.seeds import seeded_generator
from ..options import create_accelerator, load_evaluation_dataset, start_command
from ..reports import library_versions
from ..resume import PartialEvaluationState, ResumeRefusedError, resume_fingerprint
from .config import EvaluationConfig, parse_args
from .report import PAPER_RESULTS, format_markdown_report, report_warnings, write_report

logger = logging.getLogger(__name__)


def initial_noise_for_images(global_indices: torch.Tensor, seed: int, image_shape: Sequence[int]) -> torch.Tensor:
    """The sampler's initial noise for each image, a function of `(seed, global index)` only.

    Drawn on the CPU so that every device and process produces the same values.

    Args:
        global_indices (`torch.Tensor`):
            [B] int64 global image indices.
        seed (`int`):
            Run seed.
        image_shape (`Sequence[int]`):
            `(3, H, W)`.

    Returns:
        `torch.Tensor`: [B, 3, H, W] float32 CPU standard normal noise.
    """
    noises = [
        torch.randn(tuple(image_shape), generator=seeded_generator(seed, index))
        for index in global_indices.tolist()
    ]
    return torch.stack(noises) if noises else torch.empty((0, *image_shape))



def build_reconstruction_metrics(config: EvaluationConfig, device: torch.device):
    """The metric networks of `config` (random ones drawn from `config.seed`, identical on every process).

    Returns:
        [`~flowmo_diffusers.metrics.ReconstructionMetrics`]: The metrics, on `device`.

    Raises:
        MissingPretrainedWeightsError: A pretrained network's weights are missing (the message names the flag).
    """
    from ...metrics import ReconstructionMetrics

    return config.build_metric_networks(
        ReconstructionMetrics,
        config.seed,
        "examples/evaluate_flowmo/evaluate.py",
        lpips_nets=config.lpips_nets,
        device=device,
        lpips_backbone_weights_paths=config.lpips_backbone_weights_paths(),
        psnr_mode=config.psnr_mode,
    )


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    loader,
    metrics,
    *,
    seed: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    accelerator=None,
    progress_description: str | None = None,
    resume_state: dict[str, torch.Tensor] | None = None,
    start_batch: int = 0,
    save_state: Any = None,
    save_every_batches: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every image of `loader` with `pipeline` and return the metrics over all processes.

    Must be called on every process (the metric sums are all-reduced once at the end, which is also why
    processes may see different numbers of batches).

    Args:
        pipeline ([`~flowmo_diffusers.FlowMoPipeline`]):
            The pipeline, on the evaluation device.
        loader (`Iterable[dict]`):
            Batches `{"pixel_values": [b, 3, R, R] in [-1, 1], "labels": [b] global image indices}`
            ([`~flowmo_diffusers.data.build_evaluation_loader`]).
        metrics ([`~flowmo_diffusers.metrics.ReconstructionMetrics`]):
            The metrics; they are reset first.
        seed (`int`):
            Seed of the per-image noise ([`initial_noise_for_images`]).
        num_inference_steps (`int`, *optional*):
            Decoder steps (None: the decoder's own).
        guidance_scale (`float`, *optional*):
            Guidance (None: the decoder's own).
        accelerator (`accelerate.Accelerator`, *optional*):
            Gathering and autocast; None: single process, no autocast.
        progress_description (`str`, *optional*):
            Progress-bar label (shown on the local main process only).
        resume_state (`dict[str, torch.Tensor]`, *optional*):
            This process' saved metric state to continue from ([`~flowmo_diffusers.metrics.ReconstructionMetrics.state_dict`]).
        start_batch (`int`, *optional*, defaults to `0`):
            Batches of `loader` that `resume_state` already holds; they are read (for the skipped-image count and
            the position) but not reconstructed.
        save_state (`Callable[[int, int], None]`, *optional*):
            Called with `(batches done, images done)` every `save_every_batches` batches, to save the metric state.
        save_every_batches (`int`, *optional*):
            See `save_state`.

    Returns:
        `dict[str, Any]`: `{"metrics": {"rfid", "psnr", "ssim", "lpips", ..., "codebook_usage",
        "codebook_entropy_bits", "codebook_perplexity", ...}, "num_images": int,
        "num_skipped_images": int, "seconds": float}`.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from ...metrics import CodebookStatistics, sum_across_processes

    metrics.reset()
    if resume_state is not None:
        metrics.load_state_dict(resume_state)
    model = pipeline.autoencoder
    codebook = CodebookStatistics(model.config.bits_per_subtoken, num_positions=model.num_indices)
    device = pipeline._execution_device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    show_progress = accelerator is None or accelerator.is_local_main_process
    start = time.perf_counter()
    for batch_index, batch in enumerate(tqdm(loader, desc=progress_description, disable=not show_progress, unit="batch")):
        originals = batch["pixel_values"].to(device)  # [b, 3, R, R] in [-1, 1]
        if batch_index < start_batch:
            # The eval loader cannot seek; reading (not reconstructing) the done batches keeps the skipped-image
            # count and the batch composition of an uninterrupted run. Their ids are encoded again (one encoder
            # pass, deterministic) so the codebook statistics cover every image without being part of the state.
            with autocast(), torch.no_grad():
                codebook.update(model.encode(originals.to(model.dtype)).indices)
            continue
        noise = initial_noise_for_images(batch["labels"], seed, originals.shape[1:]).to(device)
        with autocast(), torch.no_grad():
            # The model's [-1, 1] tensor API, not the pipeline's: the loader's images are already RGB in [-1, 1], so
            # the pipeline's input conversion would only scale them to [0, 1] and back and read them on the host
            # (finiteness, range) every batch; its ids would be checked on the host again before decoding. The code
            # is what the pipeline decodes from the ids (ids <-> code is exact); the ids feed the codebook statistics.
            encoded = model.encode(originals.to(model.dtype))
            codebook.update(encoded.indices)
            reconstructions = model.decode(
                encoded.code,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=noise,
                scheduler=pipeline.scheduler,
            ).sample  # [-1, 1]
        metrics.update(originals, reconstructions.float())
        if save_state is not None and (batch_index + 1) % save_every_batches == 0:
            save_state(batch_index + 1, int(metrics.num_images))
    seconds = time.perf_counter() - start

    skipped = torch.tensor(getattr(getattr(loader, "skipped_images", None), "count", 0), dtype=torch.int64)
    num_skipped_images = int(sum_across_processes(skipped, accelerator))
    metrics.gather(accelerator)
    return {
        "metrics": {**metrics.compute(), **codebook.compute(accelerator)},
        "num_images": int(metrics.num_images),
        "num_skipped_images": num_skipped_images,
        "seconds": seconds,
    }


def default_model_name(pretrained_model_name_or_path: str) -> str:
    """Folder basename for local pipelines, the repo id for Hub models."""
    path = os.path.normpath(os.fspath(pretrained_model_name_or_path))
    return os.path.basename(path) if os.path.isdir(path) else str(pretrained_model_name_or_path)


def evaluate_tokenizers(config: EvaluationConfig, accelerator=None) -> dict[str, Any]:
    """Evaluate every model of `config` on the same images and write the report (main process).

    Call on every process. Order of work: metric networks (fail fast on missing weights), dataset, then per model:
    load, reconstruct, gather.

    Args:
        config ([`EvaluationConfig`]):
            The run's settings.
        accelerator (`accelerate.Accelerator`, *optional*):
            An existing accelerator; None creates one ([`~flowmo_diffusers.evaluation.options.create_accelerator`]).

    Returns:
        `dict[str, Any]`: The report (what `results.json` holds): `{"models": [...], "settings": {...},
        "versions": {...}, "comparable_to_published_results": bool, "warnings": [...], "paper_results": [...]}`;
        the same on every process.

    Raises:
        MissingPretrainedWeightsError: A feature network's pretrained weights are missing (and
            `random_init_feature_networks` is off); raised before any dataset or model is loaded.
    """
    from ...pipelines import FlowMoPipeline

    config.validate()
    if accelerator is None:
        accelerator = create_accelerator(config)
    partial = PartialEvaluationState(
        config.output_dir, resume_fingerprint(config, accelerator), accelerator.process_index, accelerator.num_processes
    )
    discard = partial.check(overwrite=config.overwrite)  # small JSON files: refuses before anything heavy is built
    warnings_for_report = report_warnings(config)
    for warning in warnings_for_report:
        logger.warning(warning)

    with accelerator.main_process_first():  # one download into the torch hub cache, not one per process
        metrics = build_reconstruction_metrics(config, accelerator.device)
    # After the fail-fast weight checks (which leave no folder behind), before any work whose results it holds.
    lock_output_dir(config.output_dir, accelerator, purpose="tokenizer evaluation", log=logger.warning)
    if discard and accelerator.is_main_process:
        partial.discard()
    accelerator.wait_for_everyone()
    saved = partial.load()
    record, saved_tensors = saved if saved is not None else ({}, {})
    with accelerator.main_process_first():  # one download / Arrow preparation for map-style datasets
        dataset = load_evaluation_dataset(config)

    names = config.model_names or _unique_names([default_model_name(p) for p in config.pretrained_model_name_or_path])
    settings = shared_settings(config, accelerator)
    model_results = list(record.get("completed_models", []))
    for model_index, (name, model_path) in enumerate(zip(names, config.pretrained_model_name_or_path)):
        if model_index < len(model_results):
            logger.info("%s: already evaluated (saved in %s)", name, partial.folder)
            continue
        resuming = record.get("model_index") == model_index and record.get("batches_done", 0) > 0
        if resuming and accelerator.is_main_process:
            total = len(dataset) if hasattr(dataset, "__len__") else config.max_samples or "?"
            logger.info("%s: resuming at image %d of %s", name, partial.images_done_by_all(), total)

        def save_state(batches_done: int, images_done: int, model_index: int = model_index) -> None:
            position = dict(
                completed_models=model_results, model_index=model_index, batches_done=batches_done,
                images_done=images_done,
            )  # fmt: skip
            partial.save(position, metrics.state_dict())

        with accelerator.main_process_first():
            pipeline = FlowMoPipeline.from_pretrained(
                model_path, revision=config.revision, cache_dir=config.cache_dir, token=config.hub_token
            )
        pipeline.to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        model_config = pipeline.autoencoder.config
        resolution = config.resolution or model_config.sample_size
        loader = build_evaluation_loader(
            dataset,
            resolution,
            config.batch_size,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            num_workers=config.dataloader_num_workers,
        )
        outcome = evaluate_pipeline(
            pipeline,
            loader,
            metrics,
            seed=config.seed,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            accelerator=accelerator,
            progress_description=name,
            resume_state=saved_tensors if resuming else None,
            start_batch=record["batches_done"] if resuming else 0,
            save_state=save_state,
            save_every_batches=config.resume_every_batches,
        )
        model_results.append(
            {
                "name": name,
                "pretrained_model_name_or_path": model_path,
                **outcome["metrics"],
                "bits_per_pixel": bits_per_pixel(model_config, resolution),
                "num_images": outcome["num_images"],
                "num_skipped_images": outcome["num_skipped_images"],
                "model": {
                    "code_length": model_config.code_length,
                    "context_dim": model_config.context_dim,
                    "bits_per_subtoken": model_config.bits_per_subtoken,
                    "sample_size": model_config.sample_size,
                    "num_parameters": sum(p.numel() for p in pipeline.autoencoder.parameters()),
                },
                "seconds": outcome["seconds"],
                "settings": dict(
                    settings,
                    resolution=resolution,
                    num_inference_steps=config.num_inference_steps or model_config.sampling_num_inference_steps,
                    guidance_scale=(
                        model_config.sampling_guidance_scale if config.guidance_scale is None else config.guidance_scale
                    ),
                    distilled_from=model_config.distilled_from,
                ),
                "comparable_to_published_results": config.comparable_to_published_results,
            }
        )
        if accelerator.is_main_process:
            logger.info("%s: %s", name, {k: model_results[-1][k] for k in outcome["metrics"]})
        del pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    report = {
        "models": model_results,
        "settings": settings,
        "versions": library_versions(),
        "comparable_to_published_results": config.comparable_to_published_results,
        "warnings": warnings_for_report,
        "paper_results": [dataclasses.asdict(result) for result in PAPER_RESULTS],
    }
    for result in model_results:
        result["versions"] = report["versions"]
    partial.finish(accelerator, lambda: write_report(report, config.output_dir))
    return report


def _unique_names(names: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    unique = []
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        unique.append(name if counts[name] == 1 else f"{name} ({counts[name]})")
    return unique


def shared_settings(config: EvaluationConfig, accelerator) -> dict[str, Any]:
    """The settings every model of the run shares, for the report."""
    return {
        "data": config.data_description(),
        "resolution": config.resolution,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "mixed_precision": accelerator.mixed_precision,
        "psnr_mode": config.psnr_mode,
        "lpips_nets": list(config.lpips_nets),
        "inception_feature_dims": config.inception_feature_dims,
        "random_init_feature_networks": config.random_init_feature_networks,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
    }



def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: parse, evaluate, print the markdown table on the main process."""
    from ...metrics import MissingPretrainedWeightsError

    config, accelerator = start_command(parse_args, argv)
    try:
        report = evaluate_tokenizers(config, accelerator)
    except (MissingPretrainedWeightsError, ResumeRefusedError) as error:
        raise SystemExit(f"error: {error}") from None  # the message says what to do; a traceback would bury it
    if accelerator.is_main_process:
        print(format_markdown_report(report))
    return report


__all__ = [
    "build_reconstruction_metrics",
    "default_model_name",
    "evaluate_pipeline",
    "evaluate_tokenizers",
    "initial_noise_for_images",
    "main",
    "shared_settings",
]
