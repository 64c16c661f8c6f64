"""Evaluate FlowMo tokenizers: rFID, PSNR, SSIM and LPIPS of reconstructions, distributed, with a report.

This is the logic behind `accelerate launch examples/evaluate_flowmo/evaluate.py`; the script only calls
[`main`]. One run evaluates one or several [`~flowmo_diffusers.FlowMoPipeline`]s on the same images:

1. The metric networks are built first ([`~flowmo_diffusers.metrics.ReconstructionMetrics`]), so missing
   pretrained weights fail with [`~flowmo_diffusers.metrics.MissingPretrainedWeightsError`] before any
   dataset or pipeline is loaded.
2. The dataset (ImageNet val streamed from the Hub, any `datasets` dataset, an image folder, or the embedded
   default photographs) gets a column with each image's **global index** (its position in the dataset, after
   `max_samples`), and is split over the processes without padding or duplicates.
3. Each image is reconstructed with the pipeline from initial noise drawn from a generator seeded by
   `(seed, global index)`: the noise of an image, hence every number in the report, does not depend on the
   number of processes, the batch size or the order in which images arrive.
4. Metric states (sums and feature statistics) are accumulated per process and summed over processes once at
   the end, so processes may see different numbers of images.
5. The main process writes `results.json`, `results.md` and, for several models, `rate_distortion.png`.

Reported numbers are comparable to the paper only with the pretrained feature networks (the default),
2048-d Inception features, the 50,000 ImageNet-1K validation images at 256x256 and the paper's sampler
(25 steps, guidance 1.5). `random_init_feature_networks` exists for tests and offline smoke runs; the report
then says, in every output, that rFID and LPIPS are not comparable to anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from transformers.hf_argparser import HfArg

from ..metrics.pretrained_weights import LPIPS_BACKBONE_WEIGHTS, PretrainedWeights
from ..metrics.reconstruction_metrics import PSNR_MODES
from ..models.autoencoder_flowmo import bits_per_pixel
from ..utils.output_lock import lock_output_dir
from ..utils.seeds import seeded_generator
from .options import (
    AcceleratorOptions,
    FeatureNetworkOptions,
    ImageDatasetOptions,
    ResumeOptions,
    check_non_negative,
    check_positive,
    create_accelerator,
    decoder_sampler_options,
    start_command,
)
from .resume import PartialEvaluationState, ResumeRefusedError, resume_fingerprint
from .reports import (
    format_number,
    library_versions,
    not_comparable_banner,
    warning_lines,
    write_json_and_markdown,
)

if TYPE_CHECKING:
    import datasets
    from torchvision.transforms import InterpolationMode

    from ..data import ImageBatchLoader

logger = logging.getLogger(__name__)

#: Name of the column added to the dataset that carries each image's position in the evaluated set.
GLOBAL_IMAGE_INDEX_COLUMN = "global_image_index"

NOT_COMPARABLE_BANNER = not_comparable_banner(
    "FEATURE NETWORKS", "rFID and LPIPS below come from Inception/LPIPS networks"
)


@dataclass(frozen=True)
class PaperResult:
    """One row of the FlowMo paper's reconstruction table (ImageNet-1K val, 50k images, 256x256)."""

    name: str
    bits_per_pixel: float
    rfid: float
    psnr: float
    ssim: float
    lpips: float


#: The paper's post-trained models (Sargent et al., 2025, Table 1), drawn as reference markers labelled "paper".
PAPER_RESULTS = (
    PaperResult("FlowMo-Lo", bits_per_pixel=0.070, rfid=0.95, psnr=22.07, ssim=0.649, lpips=0.113),
    PaperResult("FlowMo-Hi", bits_per_pixel=0.219, rfid=0.56, psnr=24.93, ssim=0.785, lpips=0.073),
)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class EvaluationConfig(
    ResumeOptions, FeatureNetworkOptions, AcceleratorOptions, decoder_sampler_options(), ImageDatasetOptions
):
    """Everything an evaluation run needs; each field is the command-line flag of the same name of `evaluate.py`.

    The help of every field says what it does (`evaluate.py --help`); the hub, dataset, accelerator, decoder-sampler
    and feature-network options are shared with the other entry points ([`~flowmo_diffusers.evaluation.options`]).
    Without `dataset_name` and `data_dir` the embedded scikit-image photographs are evaluated (offline smoke test).
    FlowMo's own evaluation used `mixed_precision="bf16"`.
    """

    command_description = (
        "rFID, PSNR, SSIM and LPIPS of FlowMo reconstructions (run with `accelerate launch`)."
    )

    pretrained_model_name_or_path: list[str] = HfArg(
        help="One or more FlowMoPipeline folders or Hub ids; several models are evaluated on the same images and "
        "drawn in a rate-distortion plot."
    )
    model_names: list[str] | None = HfArg(default=None, help="Labels for the report (one per model).")
    dataset_split: str | None = HfArg(
        default=None, help="Split to evaluate (default: validation; train for --data_dir)."
    )
    data_dir: str | None = HfArg(default=None, help="Folder of images (imagefolder builder).")
    resolution: int | None = HfArg(default=None, help="Center-crop size (default: model sample_size).")
    batch_size: int = HfArg(default=16, help="Images per process and batch.")
    seed: int = HfArg(default=0, help="Seed of the per-image initial noise (and of random feature networks).")
    lpips_nets: list[str] = HfArg(
        default_factory=lambda: ["alex"],
        help="LPIPS backbones, comma- or space-separated: alex (reported as lpips), vgg (lpips_vgg).",
    )
    lpips_alex_weights: str | None = HfArg(
        default=None, help=f"Local {LPIPS_BACKBONE_WEIGHTS['alex'].file_name} (default: the torch hub cache)."
    )
    lpips_vgg_weights: str | None = HfArg(
        default=None, help=f"Local {LPIPS_BACKBONE_WEIGHTS['vgg'].file_name} (default: the torch hub cache)."
    )
    psnr_mode: Literal[PSNR_MODES] = HfArg(
        default="per_image",
        help="per_image: mean of per-image PSNR. flowmo_batch: FlowMo's released code (PSNR pooled over each batch, "
        "averaged over batches; depends on --batch_size, the paper used 5).",
    )
    output_dir: str = HfArg(default="flowmo-evaluation", help="Where results.json/.md/.png go.")

    def __post_init__(self) -> None:
        if isinstance(self.pretrained_model_name_or_path, str):
            self.pretrained_model_name_or_path = [self.pretrained_model_name_or_path]
        self.pretrained_model_name_or_path = list(self.pretrained_model_name_or_path)
        self.lpips_nets = parse_lpips_nets(self.lpips_nets)
        super().__post_init__()

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings (cheap checks, before anything is loaded)."""
        if not self.pretrained_model_name_or_path:
            raise ValueError("give at least one --pretrained_model_name_or_path")
        if self.model_names is not None and len(self.model_names) != len(self.pretrained_model_name_or_path):
            raise ValueError(
                f"--model_names has {len(self.model_names)} entries for "
                f"{len(self.pretrained_model_name_or_path)} models; give one name per model"
            )
        check_positive(self, "batch_size", "resolution")
        check_non_negative(self, "seed")
        if self.data_dir is not None and self.dataset_name is not None:
            raise ValueError("give either --dataset_name or --data_dir, not both")
        super().validate()

    def weights_files(self) -> dict[str, PretrainedWeights]:
        lpips_weights = {f"lpips_{net}_weights": weights for net, weights in LPIPS_BACKBONE_WEIGHTS.items()}
        return super().weights_files() | lpips_weights

    def lpips_backbone_weights_paths(self) -> dict[str, str]:
        """`{net: local weights file}` for the evaluated LPIPS nets that were given a file."""
        paths = {net: getattr(self, f"lpips_{net}_weights") for net in LPIPS_BACKBONE_WEIGHTS}
        for net, path in paths.items():
            if path is not None and net not in self.lpips_nets:
                logger.warning("--lpips_%s_weights is ignored: %r is not in --lpips_nets %s", net, net, self.lpips_nets)
        return {net: path for net, path in paths.items() if path is not None and net in self.lpips_nets}

    def image_folder(self) -> str | None:
        return self.data_dir

    def data_description(self) -> dict[str, Any]:
        """Where the images come from, for the report."""
        if self.dataset_name is not None:
            source = {"dataset_name": self.dataset_name, "dataset_config_name": self.dataset_config_name}
        elif self.data_dir is not None:
            source = {"data_dir": os.path.abspath(self.data_dir)}
        else:
            source = {"embedded_default_photos": True}
        return dict(source, split=self.resolved_split(), streaming=self.streaming, max_samples=self.max_samples)

    def resolved_split(self) -> str:
        if self.dataset_split is not None:
            return self.dataset_split
        # An image folder without split sub-folders has only "train"; Hub datasets are evaluated on validation.
        return "train" if self.dataset_name is None else "validation"


def parse_lpips_nets(value: str | Sequence[str]) -> list[str]:
    """`"alex,vgg"` or `["alex", "vgg"]` or `["alex,vgg"]` -> `["alex", "vgg"]`."""
    items = [value] if isinstance(value, str) else list(value)
    return [net.strip() for item in items for net in item.replace(" ", ",").split(",") if net.strip()]


#: The command line, one flag per [`EvaluationConfig`] field, and its parser (into a validated config).
build_argument_parser = EvaluationConfig.argument_parser
parse_args = EvaluationConfig.from_command_line


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_evaluation_dataset(config: ImageDatasetOptions) -> datasets.Dataset | datasets.IterableDataset:
    """Load the images named by `config` and number them (see [`add_global_image_index`]).

    Args:
        config ([`~flowmo_diffusers.evaluation.options.ImageDatasetOptions`]):
            The dataset options of the tokenizer evaluation or of the reference statistics.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset`: The numbered images.
    """
    from ..data import load_image_dataset

    dataset = load_image_dataset(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        train_data_dir=config.image_folder(),
        split=config.resolved_split(),
        streaming=config.streaming,
        image_column=config.image_column,
        cache_dir=config.cache_dir,
        token=config.hub_token,
    )
    return add_global_image_index(dataset, config.max_samples)


def add_global_image_index(
    dataset: datasets.Dataset | datasets.IterableDataset, max_samples: int | None = None
) -> datasets.Dataset | datasets.IterableDataset:
    """Keep the first `max_samples` images and add [`GLOBAL_IMAGE_INDEX_COLUMN`] (0, 1, 2, ... in order).

    The index is attached before the dataset is split over processes, so each image keeps it wherever it is
    evaluated; it seeds the image's initial noise.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            With an `"image"` column (as returned by [`~flowmo_diffusers.data.load_image_dataset`]).
        max_samples (`int`, *optional*):
            Number of leading images to keep (None: all).

    Returns:
        The same kind of dataset with columns `"image"` (+ `"label"`) and `global_image_index` (int64).
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        if max_samples is not None:
            dataset = dataset.take(max_samples)
        if dataset.features is not None and isinstance(dataset.features.get("image"), datasets.Image):
            # Functions mapped over a stream receive decoded examples unless decoding is off; the index does
            # not need the pixels, and every process reads every example (see build_evaluation_loader).
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        features = None
        if dataset.features is not None:  # keep the features known, so the columns need not be sniffed later
            features = dataset.features.copy()
            features[GLOBAL_IMAGE_INDEX_COLUMN] = datasets.Value("int64")
        return dataset.map(_global_image_index_of, with_indices=True, features=features)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    # add_column appends one Arrow column; map() would rewrite every image into the cache.
    return dataset.add_column(GLOBAL_IMAGE_INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64))


# Module-level callables rather than lambdas: a DataLoader worker started with "spawn" must pickle them.
def _global_image_index_of(example: dict[str, Any], index: int) -> dict[str, int]:
    return {GLOBAL_IMAGE_INDEX_COLUMN: index}


@dataclass(frozen=True)
class _IsImageOfProcess:
    process_index: int
    num_processes: int

    def __call__(self, global_index: int) -> bool:
        return global_index % self.num_processes == self.process_index


def build_evaluation_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    resolution: int,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    interpolation: InterpolationMode | None = None,
) -> ImageBatchLoader:
    """Center-cropped batches of this process' share of `dataset`, carrying each image's global index.

    Map-style data is split by [`~flowmo_diffusers.data.build_eval_dataloader`] (contiguous chunks,
    no padding, no duplicates). A stream is different: `datasets` splits streams by shard and numbers mapped
    examples per shard, so an index added before the split would restart in every shard. Here every process
    therefore reads the whole stream, keeps the images whose global index modulo `num_processes` equals
    `process_index` (only those are decoded) and uses at most one worker (several workers would again split
    the stream by shard). Reading is cheap next to decoding, and `datasets` does the same whenever the number
    of shards is not a multiple of the number of processes.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            Output of [`add_global_image_index`].
        resolution (`int`):
            Center-crop size `R`.
        batch_size (`int`):
            Images per batch.
        process_index (`int`, *optional*, defaults to `0`):
            This process.
        num_processes (`int`, *optional*, defaults to `1`):
            The number of processes.
        num_workers (`int`, *optional*, defaults to `0`):
            DataLoader workers (capped at 1 for streams).
        interpolation (`torchvision.transforms.InterpolationMode`, *optional*):
            The resize before the crop; None keeps the data pipeline's default (bilinear, as FlowMo).

    Returns:
        [`~flowmo_diffusers.data.ImageBatchLoader`]: Batches `{"pixel_values": [b, 3, R, R] float32 in [-1, 1],
        "labels": [b] int64 global image indices}`; `b <= batch_size`.
    """
    import datasets

    from ..data import build_eval_dataloader

    # The loader carries one integer column as "labels"; here it is the global index, not the class label.
    common = dict(image_column="image", label_column=GLOBAL_IMAGE_INDEX_COLUMN)
    if interpolation is not None:
        common["interpolation"] = interpolation
    if isinstance(dataset, datasets.IterableDataset):
        if num_processes > 1:
            dataset = dataset.filter(
                _IsImageOfProcess(process_index, num_processes), input_columns=GLOBAL_IMAGE_INDEX_COLUMN
            )
        if num_workers > 1:
            logger.warning("streaming evaluation uses 1 DataLoader worker per process (asked for %d)", num_workers)
        return build_eval_dataloader(dataset, resolution, batch_size, num_workers=min(num_workers, 1), **common)
    return build_eval_dataloader(
        dataset,
        resolution,
        batch_size,
        process_index=process_index,
        num_processes=num_processes,
        num_workers=num_workers,
        **common,
    )


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


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def build_reconstruction_metrics(config: EvaluationConfig, device: torch.device):
    """The metric networks of `config` (random ones drawn from `config.seed`, identical on every process).

    Returns:
        [`~flowmo_diffusers.metrics.ReconstructionMetrics`]: The metrics, on `device`.

    Raises:
        MissingPretrainedWeightsError: A pretrained network's weights are missing (the message names the flag).
    """
    from ..metrics import ReconstructionMetrics

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
            ([`build_evaluation_loader`]).
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

    from ..metrics import CodebookStatistics, sum_across_processes

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
    from ..pipelines import FlowMoPipeline

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


def report_warnings(config: EvaluationConfig) -> list[str]:
    """Reasons the numbers of this run cannot be put next to the paper's, most serious first."""
    warnings = []
    if config.random_init_feature_networks:
        warnings.append(NOT_COMPARABLE_BANNER)
    if config.inception_feature_dims != 2048:
        warnings.append(
            f"rFID uses {config.inception_feature_dims}-d Inception features instead of 2048: not comparable to "
            "published rFID."
        )
    is_imagenet_val = (
        config.dataset_name is not None
        and "imagenet-1k" in config.dataset_name.lower()
        and config.resolved_split().startswith("validation")
    )
    if not is_imagenet_val or (config.max_samples is not None and config.max_samples < 50_000):
        warnings.append(
            "The paper's figures are over the 50,000 ImageNet-1K validation images; rFID in particular depends "
            "strongly on the number of images."
        )
    if (config.num_inference_steps not in (None, 25)) or (config.guidance_scale not in (None, 1.5)):
        warnings.append(
            f"Sampler differs from the paper's (25 steps, guidance 1.5): {config.num_inference_steps or 'own'} steps, "
            f"guidance {config.guidance_scale if config.guidance_scale is not None else 'own'}."
        )
    return warnings


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


#: Codebook statistics shown in results.md (all of them are in results.json).
CODEBOOK_COLUMNS = ("codebook_usage", "codebook_entropy_bits", "codebook_perplexity")


def format_markdown_report(report: dict[str, Any]) -> str:
    """`results.md`: warnings, a table with one row per model, the paper's rows for reference, settings."""
    models = report["models"]
    lpips_nets = report["settings"]["lpips_nets"]
    lpips_keys = ["lpips"] + [f"lpips_{net}" for net in lpips_nets[1:]]
    lpips_headers = [f"LPIPS ({net})" for net in lpips_nets]
    lines = ["# FlowMo reconstruction evaluation", "", *warning_lines(report, NOT_COMPARABLE_BANNER)]

    header = ["model", "bits/pixel", "rFID", "PSNR (dB)", "SSIM", *lpips_headers, "images"]
    header[-1:-1] = ["codebook usage", "entropy (bits)", "perplexity"]  # docs/codebook-statistics.md
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in models:
        cells = [
            result["name"],
            format_number(result["bits_per_pixel"], 4),
            format_number(result["rfid"], 3),
            format_number(result["psnr"], 2),
            format_number(result["ssim"], 4),
            *[format_number(result[key], 4) for key in lpips_keys],
            *[format_number(result.get(key, float("nan")), 4) for key in CODEBOOK_COLUMNS],
            str(result["num_images"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Reference, from the paper (ImageNet-1K val, 50,000 images, 256x256; LPIPS with AlexNet):",
        "",
        "| model | bits/pixel | rFID | PSNR (dB) | SSIM | LPIPS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for paper in report["paper_results"]:
        lines.append(
            f"| {paper['name']} (paper) | {paper['bits_per_pixel']:.3f} | {paper['rfid']:.2f} | "
            f"{paper['psnr']:.2f} | {paper['ssim']:.3f} | {paper['lpips']:.3f} |"
        )
    settings = report["settings"]
    data = ", ".join(f"{key}={value}" for key, value in settings["data"].items() if value not in (None, False))
    lines += [
        "",
        "Settings: "
        + "; ".join(
            [
                f"data: {data}",
                f"resolution {settings['resolution'] or 'model sample_size'}",
                (
                    f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}"
                    if settings["num_inference_steps"] is not None or settings["guidance_scale"] is not None
                    else "each decoder's own sampler (see results.json: steps and guidance per model)"
                ),
                f"seed {settings['seed']}",
                f"mixed precision {settings['mixed_precision']}",
                f"PSNR {settings['psnr_mode']} (batch size {settings['batch_size']})",
                f"Inception {settings['inception_feature_dims']}-d",
                f"{settings['num_processes']} process(es) on {settings['device']}",
            ]
        )
        + ".",
        "",
    ]
    skipped = sum(result["num_skipped_images"] for result in models)
    if skipped:
        lines += [f"Undecodable images skipped (all models): {skipped}.", ""]
    return "\n".join(lines)


def plot_rate_distortion(
    model_results: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    paper_results: Sequence[PaperResult] = PAPER_RESULTS,
    comparable: bool = True,
) -> Path:
    """Two panels, rFID and PSNR against bits per pixel: the evaluated models and the paper's points.

    Args:
        model_results (`Sequence[dict]`):
            Entries of `report["models"]` (`name`, `bits_per_pixel`, `rfid`, `psnr`).
        path (`str` or `os.PathLike`):
            Output PNG.
        paper_results (`Sequence[PaperResult]`, *optional*, defaults to [`PAPER_RESULTS`]):
            Reference points, drawn as hollow stars labelled "<name> (paper)".
        comparable (`bool`, *optional*, defaults to `True`):
            False adds a red "not comparable" title (random feature networks).

    Returns:
        `Path`: The written path.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on evaluation machines
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "The rate-distortion plot needs matplotlib: `pip install 'flowmo-diffusers[eval]'` "
            "(or `pip install matplotlib`)."
        ) from error

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("rfid", "rFID (lower is better)"), ("psnr", "PSNR in dB (higher is better)"))
    for axis, (key, label) in zip(axes, panels):
        points = [(r["bits_per_pixel"], r[key], r["name"]) for r in model_results if _is_finite(r.get(key))]
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], "o", color="tab:blue", label="this evaluation")
        for x, y, name in points:
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color="tab:blue")
        for paper in paper_results:
            value = getattr(paper, key)
            axis.plot(paper.bits_per_pixel, value, marker="*", markersize=12, linestyle="none",
                      markerfacecolor="none", markeredgecolor="tab:red")
            axis.annotate(f"{paper.name} (paper)", (paper.bits_per_pixel, value), textcoords="offset points",
                          xytext=(0, -14), ha="center", fontsize=8, color="tab:red")
        axis.plot([], [], marker="*", markersize=12, linestyle="none", markerfacecolor="none",
                  markeredgecolor="tab:red", label="paper (ImageNet val 50k)")
        values = [p[1] for p in points] + [getattr(paper, key) for paper in paper_results]
        if key == "rfid" and values and min(values) > 0 and max(values) / min(values) > 30:
            axis.set_yscale("log")  # random-init or early checkpoints sit orders of magnitude above the paper
        axis.margins(x=0.2, y=0.12)  # room for the point labels
        axis.set_xlabel("bits per pixel")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    title = "FlowMo rate-distortion"
    if not comparable:
        title += "\nRANDOM FEATURE NETWORKS: rFID NOT COMPARABLE TO THE PAPER"
    figure.suptitle(title, color="black" if comparable else "red")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def write_report(report: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `results.json` and `results.md` (and `rate_distortion.png` for two or more models).

    Returns:
        `dict[str, Path]`: `{"json": path, "markdown": path[, "plot": path]}`.
    """
    paths = write_json_and_markdown(report, format_markdown_report(report), output_dir)
    if len(report["models"]) >= 2:
        plot = Path(output_dir) / "rate_distortion.png"
        comparable = report["comparable_to_published_results"]
        paths["plot"] = plot_rate_distortion(report["models"], plot, comparable=comparable)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: parse, evaluate, print the markdown table on the main process."""
    from ..metrics import MissingPretrainedWeightsError

    config, accelerator = start_command(parse_args, argv)
    try:
        report = evaluate_tokenizers(config, accelerator)
    except (MissingPretrainedWeightsError, ResumeRefusedError) as error:
        raise SystemExit(f"error: {error}") from None  # the message says what to do; a traceback would bury it
    if accelerator.is_main_process:
        print(format_markdown_report(report))
    return report


__all__ = [
    "GLOBAL_IMAGE_INDEX_COLUMN",
    "NOT_COMPARABLE_BANNER",
    "PAPER_RESULTS",
    "EvaluationConfig",
    "PaperResult",
    "add_global_image_index",
    "build_argument_parser",
    "build_evaluation_loader",
    "build_reconstruction_metrics",
    "evaluate_pipeline",
    "evaluate_tokenizers",
    "format_markdown_report",
    "initial_noise_for_images",
    "load_evaluation_dataset",
    "main",
    "parse_args",
    "plot_rate_distortion",
    "write_report",
]
