"""Evaluate FlowMo tokenizers: rFID, PSNR, SSIM and LPIPS of reconstructions, distributed, with a report.

This is the logic behind ``accelerate launch examples/evaluate_flowmo/evaluate.py``; the script only calls
:func:`main`. One run evaluates one or several :class:`~flowmo_diffusers.FlowMoPipeline` s on the same images:

1. The metric networks are built first (:class:`~flowmo_diffusers.metrics.ReconstructionMetrics`), so missing
   pretrained weights fail with :class:`~flowmo_diffusers.metrics.MissingPretrainedWeightsError` before any
   dataset or pipeline is loaded.
2. The dataset (ImageNet val streamed from the Hub, any ``datasets`` dataset, an image folder, or the embedded
   default photographs) gets a column with each image's **global index** (its position in the dataset, after
   ``max_samples``), and is split over the processes without padding or duplicates.
3. Each image is reconstructed with the pipeline from initial noise drawn from a generator seeded by
   ``(seed, global index)``: the noise of an image, hence every number in the report, does not depend on the
   number of processes, the batch size or the order in which images arrive.
4. Metric states (sums and feature statistics) are accumulated per process and summed over processes once at
   the end, so processes may see different numbers of images.
5. The main process writes ``results.json``, ``results.md`` and, for several models, ``rate_distortion.png``.

Reported numbers are comparable to the paper only with the pretrained feature networks (the default),
2048-d Inception features, the 50,000 ImageNet-1K validation images at 256x256 and the paper's sampler
(25 steps, guidance 1.5). ``random_init_feature_networks`` exists for tests and offline smoke runs; the report
then says, in every output, that rFID and LPIPS are not comparable to anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..utils.output_lock import lock_output_dir
from ..utils.seeds import seeded_generator

logger = logging.getLogger(__name__)

#: Name of the column added to the dataset that carries each image's position in the evaluated set.
GLOBAL_IMAGE_INDEX_COLUMN = "global_image_index"

#: Distributions whose versions go into the report (missing ones are reported as ``None``).
REPORTED_DISTRIBUTIONS = (
    "flowmo-diffusers",
    "torch",
    "torchvision",
    "diffusers",
    "accelerate",
    "datasets",
    "lpips",
    "pytorch-fid",
    "scikit-image",
    "scipy",
    "numpy",
)

NOT_COMPARABLE_BANNER = (
    "RANDOMLY INITIALISED FEATURE NETWORKS: rFID and LPIPS below come from Inception/LPIPS networks with random "
    "weights (--random_init_feature_networks). They are NOT comparable to published figures or to runs with "
    "pretrained weights; use them only as a smoke test."
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


@dataclass
class EvaluationConfig:
    """Everything an evaluation run needs; field names equal the command-line flags of ``evaluate.py``.

    Attributes:
        pretrained_model_name_or_path: One or more pipeline folders or Hub ids, evaluated on the same images.
        model_names: Labels for the report and plot (default: folder basename or Hub id).
        revision / cache_dir / hub_token: Hub download options for the pipelines (``hub_token`` is also used for
            gated datasets such as ImageNet).
        dataset_name / dataset_config_name / dataset_split / streaming / image_column: a ``datasets`` dataset.
        data_dir: An image folder (``imagefolder`` builder), used when ``dataset_name`` is None. With neither,
            the embedded scikit-image photographs are used (offline smoke test).
        resolution: Center-crop size; None uses each model's ``sample_size``.
        max_samples: Evaluate the first ``max_samples`` images only (None: all).
        batch_size: Images per process and batch.
        dataloader_num_workers: Decoding workers per process (at most 1 for streaming data, see
            :func:`build_evaluation_loader`).
        seed: Seed of the per-image initial noise (and of the random feature networks if requested).
        num_inference_steps / guidance_scale: Sampler settings; None (the default) decodes with each decoder's own
            sampler: the paper's (25 steps, guidance 1.5) for a trained FlowMo, K unguided passes for a distilled
            student.
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` autocast for the pipeline (None: Accelerate's
            config). The metric networks always run in float32. FlowMo's own evaluation used bf16.
        lpips_nets: LPIPS backbones; the first is reported as ``lpips``, others as ``lpips_<net>``.
        inception_weights_path / lpips_alex_weights / lpips_vgg_weights: Local weight files for offline machines
            (otherwise the torch hub cache / download is used).
        random_init_feature_networks: Random Inception and LPIPS backbones (tests, offline smoke runs only).
        inception_feature_dims: 2048 for rFID as reported; 64/192/768 only for quick tests.
        psnr_mode: ``"per_image"`` or ``"flowmo_batch"`` (FlowMo's batch-pooled PSNR, depends on the batch size).
        output_dir: Where the report is written.
        cpu: Force CPU even if an accelerator is available.
    """

    pretrained_model_name_or_path: List[str]
    model_names: Optional[List[str]] = None
    revision: Optional[str] = None
    cache_dir: Optional[str] = None
    hub_token: Optional[str] = None
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_split: Optional[str] = None
    streaming: bool = False
    image_column: Optional[str] = None
    data_dir: Optional[str] = None
    resolution: Optional[int] = None
    max_samples: Optional[int] = None
    batch_size: int = 16
    dataloader_num_workers: int = 0
    seed: int = 0
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    mixed_precision: Optional[str] = None
    lpips_nets: List[str] = field(default_factory=lambda: ["alex"])
    inception_weights_path: Optional[str] = None
    lpips_alex_weights: Optional[str] = None
    lpips_vgg_weights: Optional[str] = None
    random_init_feature_networks: bool = False
    inception_feature_dims: int = 2048
    psnr_mode: str = "per_image"
    output_dir: str = "flowmo-evaluation"
    cpu: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.pretrained_model_name_or_path, str):
            self.pretrained_model_name_or_path = [self.pretrained_model_name_or_path]
        self.pretrained_model_name_or_path = list(self.pretrained_model_name_or_path)
        if isinstance(self.lpips_nets, str):
            self.lpips_nets = parse_lpips_nets(self.lpips_nets)
        self.lpips_nets = list(self.lpips_nets)

    def validate(self) -> None:
        """Raise ``ValueError`` for inconsistent settings (cheap checks, before anything is loaded)."""
        from ..metrics.reconstruction_metrics import PSNR_MODES

        if not self.pretrained_model_name_or_path:
            raise ValueError("give at least one --pretrained_model_name_or_path")
        if self.model_names is not None and len(self.model_names) != len(self.pretrained_model_name_or_path):
            raise ValueError(
                f"--model_names has {len(self.model_names)} entries for "
                f"{len(self.pretrained_model_name_or_path)} models; give one name per model"
            )
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be positive, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be positive, got {self.max_samples}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"--num_inference_steps must be positive, got {self.num_inference_steps}")
        if self.psnr_mode not in PSNR_MODES:
            raise ValueError(f"--psnr_mode must be one of {PSNR_MODES}, got {self.psnr_mode!r}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.data_dir is not None and self.dataset_name is not None:
            raise ValueError("give either --dataset_name or --data_dir, not both")
        if self.random_init_feature_networks:
            given = [
                name
                for name in ("inception_weights_path", "lpips_alex_weights", "lpips_vgg_weights")
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(
                    f"--random_init_feature_networks was given together with weight files ({', '.join(given)}); "
                    "pass one or the other"
                )

    @property
    def comparable_to_published_results(self) -> bool:
        """Whether the feature networks are the ones every published rFID / LPIPS uses."""
        return not self.random_init_feature_networks and self.inception_feature_dims == 2048

    def lpips_backbone_weights_paths(self) -> Dict[str, str]:
        """``{net: local weights file}`` for the evaluated LPIPS nets that were given a file."""
        paths = {"alex": self.lpips_alex_weights, "vgg": self.lpips_vgg_weights}
        for net, path in paths.items():
            if path is not None and net not in self.lpips_nets:
                logger.warning("--lpips_%s_weights is ignored: %r is not in --lpips_nets %s", net, net, self.lpips_nets)
        return {net: path for net, path in paths.items() if path is not None and net in self.lpips_nets}

    def data_description(self) -> Dict[str, Any]:
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


def parse_lpips_nets(value: str | Sequence[str]) -> List[str]:
    """``"alex,vgg"`` or ``["alex", "vgg"]`` or ``["alex,vgg"]`` -> ``["alex", "vgg"]``."""
    items = [value] if isinstance(value, str) else list(value)
    return [net.strip() for item in items for net in item.replace(" ", ",").split(",") if net.strip()]


def build_argument_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/evaluate_flowmo/evaluate.py`` (one flag per :class:`EvaluationConfig` field)."""
    parser = argparse.ArgumentParser(
        description="rFID, PSNR, SSIM and LPIPS of FlowMo reconstructions (run with `accelerate launch`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--pretrained_model_name_or_path",
        nargs="+",
        required=True,
        help="One or more FlowMoPipeline folders or Hub ids; several models are evaluated on the same images "
        "and drawn in a rate-distortion plot.",
    )
    models.add_argument("--model_names", nargs="+", default=None, help="Labels for the report (one per model).")
    models.add_argument("--revision", default=None, help="Hub revision of the pipelines.")
    models.add_argument("--cache_dir", default=None, help="Hub / datasets cache folder.")
    models.add_argument(
        "--hub_token", default=None, help="Hub token (gated datasets such as ImageNet, private models)."
    )

    data = parser.add_argument_group("data (default: the embedded scikit-image photographs)")
    data.add_argument("--dataset_name", default=None, help="datasets dataset, e.g. ILSVRC/imagenet-1k.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument(
        "--dataset_split", default=None, help="Split to evaluate (default: validation; train for --data_dir)."
    )
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    data.add_argument("--image_column", default=None, help="Image column (auto-detected by default).")
    data.add_argument("--data_dir", default=None, help="Folder of images (imagefolder builder).")
    data.add_argument("--resolution", type=int, default=None, help="Center-crop size (default: model sample_size).")
    data.add_argument("--max_samples", type=int, default=None, help="Evaluate only the first N images.")
    data.add_argument("--batch_size", type=int, default=16, help="Images per process and batch.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Decoding workers per process.")

    sampler = parser.add_argument_group("sampler")
    sampler.add_argument("--seed", type=int, default=0, help="Seed of the per-image initial noise.")
    sampler.add_argument("--num_inference_steps", type=int, default=None,
                         help="Decoder steps (default: each decoder's own: 25 for FlowMo, K for a distilled student).")
    sampler.add_argument("--guidance_scale", type=float, default=None,
                         help="Guidance (default: each decoder's own: 1.5 for FlowMo, 1 for a distilled student).")
    sampler.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Autocast for the pipeline (default: Accelerate config). FlowMo's evaluation used bf16.",
    )
    sampler.add_argument("--cpu", action="store_true", help="Run on CPU even if an accelerator is available.")

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument(
        "--lpips_nets", default="alex", help="Comma-separated LPIPS backbones: alex (reported as lpips), vgg."
    )
    metrics.add_argument("--inception_weights_path", default=None, help="Local pt_inception-2015-12-05-6726825d.pth.")
    metrics.add_argument("--lpips_alex_weights", default=None, help="Local alexnet-owt-7be5be79.pth.")
    metrics.add_argument("--lpips_vgg_weights", default=None, help="Local vgg16-397923af.pth.")
    metrics.add_argument(
        "--random_init_feature_networks",
        action="store_true",
        help="Random Inception/LPIPS weights: for tests and offline smoke runs only; figures are NOT comparable.",
    )
    metrics.add_argument(
        "--inception_feature_dims",
        type=int,
        choices=[64, 192, 768, 2048],
        default=2048,
        help="Inception features for rFID; only 2048 gives the reported rFID (smaller: quick tests).",
    )
    metrics.add_argument(
        "--psnr_mode",
        choices=["per_image", "flowmo_batch"],
        default="per_image",
        help="per_image: mean of per-image PSNR. flowmo_batch: FlowMo's released code (PSNR pooled over each "
        "batch, averaged over batches; depends on --batch_size, the paper used 5).",
    )
    parser.add_argument("--output_dir", default="flowmo-evaluation", help="Where results.json/.md/.png go.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluationConfig:
    """Parse the command line into an :class:`EvaluationConfig` (validated)."""
    namespace = build_argument_parser().parse_args(argv)
    config = EvaluationConfig(**vars(namespace))
    config.validate()
    return config


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_evaluation_dataset(config: EvaluationConfig):
    """Load the images named by ``config`` and number them (see :func:`add_global_image_index`)."""
    from ..data import load_image_dataset

    dataset = load_image_dataset(
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        train_data_dir=config.data_dir,
        split=config.resolved_split(),
        streaming=config.streaming,
        image_column=config.image_column,
        cache_dir=config.cache_dir,
        token=config.hub_token,
    )
    return add_global_image_index(dataset, config.max_samples)


def add_global_image_index(dataset, max_samples: Optional[int] = None):
    """Keep the first ``max_samples`` images and add :data:`GLOBAL_IMAGE_INDEX_COLUMN` (0, 1, 2, ... in order).

    The index is attached before the dataset is split over processes, so each image keeps it wherever it is
    evaluated; it seeds the image's initial noise.

    Args:
        dataset: ``datasets.Dataset`` or ``datasets.IterableDataset`` with an ``"image"`` column (as returned by
            :func:`~flowmo_diffusers.data.load_image_dataset`).
        max_samples: Number of leading images to keep (None: all).

    Returns:
        The same kind of dataset with columns ``"image"`` (+ ``"label"``) and ``global_image_index`` (int64).
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
def _global_image_index_of(example: Dict[str, Any], index: int) -> Dict[str, int]:
    return {GLOBAL_IMAGE_INDEX_COLUMN: index}


@dataclass(frozen=True)
class _IsImageOfProcess:
    process_index: int
    num_processes: int

    def __call__(self, global_index: int) -> bool:
        return global_index % self.num_processes == self.process_index


def build_evaluation_loader(
    dataset,
    resolution: int,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    interpolation=None,
):
    """Center-cropped batches of this process' share of ``dataset``, carrying each image's global index.

    Map-style data is split by :func:`~flowmo_diffusers.data.build_eval_dataloader` (contiguous chunks,
    no padding, no duplicates). A stream is different: ``datasets`` splits streams by shard and numbers mapped
    examples per shard, so an index added before the split would restart in every shard. Here every process
    therefore reads the whole stream, keeps the images whose global index modulo ``num_processes`` equals
    ``process_index`` (only those are decoded) and uses at most one worker (several workers would again split
    the stream by shard). Reading is cheap next to decoding, and ``datasets`` does the same whenever the number
    of shards is not a multiple of the number of processes.

    Args:
        dataset: Output of :func:`add_global_image_index`.
        resolution: Center-crop size ``R``.
        batch_size: Images per batch.
        process_index / num_processes: This process and the number of processes.
        num_workers: DataLoader workers (capped at 1 for streams).
        interpolation: ``torchvision.transforms.InterpolationMode`` of the resize before the crop; None keeps
            the data pipeline's default (bilinear, as FlowMo).

    Returns:
        :class:`~flowmo_diffusers.data.ImageBatchLoader` of ``{"pixel_values": [b, 3, R, R] float32 in
        [-1, 1], "labels": [b] int64 global image indices}``; ``b <= batch_size``.
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
    """The sampler's initial noise for each image, a function of ``(seed, global index)`` only.

    Drawn on the CPU so that every device and process produces the same values.

    Args:
        global_indices: [B] int64 global image indices.
        seed: Run seed.
        image_shape: ``(3, H, W)``.

    Returns:
        [B, 3, H, W] float32 CPU tensor of standard normal noise.
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
    """The metric networks; raises ``MissingPretrainedWeightsError`` (naming the file) if weights are missing.

    With random initialisation the networks are drawn from a generator seeded by ``config.seed``: every process
    must hold the *same* random networks, otherwise the summed feature statistics would mix different feature
    spaces (and two runs with the same seed would differ).
    """
    from ..metrics import MissingPretrainedWeightsError, ReconstructionMetrics

    def build():
        return ReconstructionMetrics(
            lpips_nets=config.lpips_nets,
            device=device,
            random_init=config.random_init_feature_networks,
            inception_weights_path=config.inception_weights_path,
            lpips_backbone_weights_paths=config.lpips_backbone_weights_paths(),
            inception_feature_dims=config.inception_feature_dims,
            psnr_mode=config.psnr_mode,
        )

    if config.random_init_feature_networks:
        with torch.random.fork_rng(devices=[]):  # initialised on the CPU; leave the caller's RNG alone
            torch.manual_seed(config.seed)
            return build()
    try:
        return build()
    except MissingPretrainedWeightsError as error:
        # The metrics package names its Python options; an evaluate.py user needs the command-line flag.
        flags = [flag for file_name, flag in _weights_file_flags().items() if file_name in str(error)]
        hint = f"pass {' / '.join(flags)} /path/to/file" if flags else "pass the weight file options"
        raise MissingPretrainedWeightsError(
            f"{error}\nWith examples/evaluate_flowmo/evaluate.py: {hint}, or put the file in the torch hub cache. "
            "For a smoke test without any pretrained network, pass --random_init_feature_networks (the figures "
            "are then not comparable to anything)."
        ) from error


def _weights_file_flags() -> Dict[str, str]:
    """Weight file name -> the evaluate.py flag that provides it."""
    from ..metrics import FID_INCEPTION_WEIGHTS, LPIPS_BACKBONE_WEIGHTS

    return {
        FID_INCEPTION_WEIGHTS.file_name: "--inception_weights_path",
        LPIPS_BACKBONE_WEIGHTS["alex"].file_name: "--lpips_alex_weights",
        LPIPS_BACKBONE_WEIGHTS["vgg"].file_name: "--lpips_vgg_weights",
    }


@torch.no_grad()
def evaluate_pipeline(
    pipeline,
    loader,
    metrics,
    *,
    seed: int,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    accelerator=None,
    progress_description: Optional[str] = None,
) -> Dict[str, Any]:
    """Reconstruct every image of ``loader`` with ``pipeline`` and return the metrics over all processes.

    Must be called on every process (the metric sums are all-reduced once at the end, which is also why
    processes may see different numbers of batches).

    Args:
        pipeline: A :class:`~flowmo_diffusers.FlowMoPipeline` on the evaluation device.
        loader: Iterable of ``{"pixel_values": [b, 3, R, R] in [-1, 1], "labels": [b] global image indices}``
            (:func:`build_evaluation_loader`).
        metrics: A :class:`~flowmo_diffusers.metrics.ReconstructionMetrics`; it is reset first.
        seed: Seed of the per-image noise (:func:`initial_noise_for_images`).
        num_inference_steps / guidance_scale: Sampler settings (None: the decoder's own).
        accelerator: ``accelerate.Accelerator`` (gathering and autocast); None: single process, no autocast.
        progress_description: Progress-bar label (shown on the local main process only).

    Returns:
        ``{"metrics": {"rfid", "psnr", "ssim", "lpips", ...}, "num_images": int, "num_skipped_images": int,
        "seconds": float}``.
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from ..metrics import sum_across_processes

    metrics.reset()
    device = pipeline._execution_device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    show_progress = accelerator is None or accelerator.is_local_main_process
    start = time.perf_counter()
    for batch in tqdm(loader, desc=progress_description, disable=not show_progress, unit="batch"):
        originals = batch["pixel_values"].to(device)  # [b, 3, R, R] in [-1, 1]
        noise = initial_noise_for_images(batch["labels"], seed, originals.shape[1:]).to(device)
        with autocast():
            reconstructions = pipeline(
                images=(originals + 1) / 2,  # the pipeline takes [0, 1] images and returns [0, 1] with "pt"
                latents=noise,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                output_type="pt",
            ).images
        metrics.update(originals, reconstructions.float() * 2 - 1)
    seconds = time.perf_counter() - start

    skipped = torch.tensor(getattr(getattr(loader, "skipped_images", None), "count", 0), dtype=torch.int64)
    num_skipped_images = int(sum_across_processes(skipped, accelerator))
    metrics.gather(accelerator)
    return {
        "metrics": metrics.compute(),
        "num_images": int(metrics.num_images),
        "num_skipped_images": num_skipped_images,
        "seconds": seconds,
    }


def default_model_name(pretrained_model_name_or_path: str) -> str:
    """Folder basename for local pipelines, the repo id for Hub models."""
    path = os.path.normpath(os.fspath(pretrained_model_name_or_path))
    return os.path.basename(path) if os.path.isdir(path) else str(pretrained_model_name_or_path)


def bits_per_pixel(model_config, resolution: int) -> float:
    """Bits of the token ids per image pixel: ``code_length * context_dim / resolution**2``.

    The number of tokens does not depend on the image size, so this equals the model's ``bits_per_pixel`` at its
    ``sample_size`` (FlowMo-Lo: 256 x 18 / 256**2 = 0.0703) and changes with ``resolution``.
    """
    return model_config.code_length * model_config.context_dim / float(resolution) ** 2


def library_versions() -> Dict[str, Optional[str]]:
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for distribution in REPORTED_DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


def _has_accelerator_device() -> bool:
    api = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... alike
    if api is not None and hasattr(api, "is_available"):
        return bool(api.is_available())
    return torch.cuda.is_available()


def create_accelerator(config: EvaluationConfig):
    """An ``accelerate.Accelerator`` that is distributed whenever the launcher started several processes.

    ``accelerate launch --multi_gpu`` and ``torchrun`` set ``WORLD_SIZE``; on a machine without an accelerator
    device, Accelerate only builds a (gloo) process group when asked for the CPU, and otherwise silently runs
    every process as an independent single process (each would evaluate the whole dataset). So the CPU is
    selected automatically in that case, and a mismatch between ``WORLD_SIZE`` and the resulting number of
    processes is an error rather than a silently duplicated evaluation.
    """
    from accelerate import Accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = config.cpu or (world_size > 1 and not _has_accelerator_device())
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=use_cpu)
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"The launcher started {world_size} processes (WORLD_SIZE) but Accelerate formed a group of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); every process would evaluate the whole "
            "dataset. Launch with `accelerate launch --multi_gpu --num_processes N ...` (add --cpu to the script "
            "on machines without GPUs) or `torchrun --nproc_per_node N ...`."
        )
    return accelerator


def start_command(parse_args, argv: Optional[Sequence[str]] = None):
    """The common start of the evaluation-style scripts (evaluate, sample, evaluate_generation).

    Logging, the parsed config (a ValueError from `parse_args` becomes a one-line error exit), the Accelerator of
    [`create_accelerator`], and non-main processes quieted to errors so that every message appears once.

    Returns:
        `(config, accelerator)`.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config = parse_args(argv)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    accelerator = create_accelerator(config)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    return config, accelerator


def evaluate_tokenizers(config: EvaluationConfig, accelerator=None) -> Dict[str, Any]:
    """Evaluate every model of ``config`` on the same images and write the report (main process).

    Call on every process. Order of work: metric networks (fail fast on missing weights), dataset, then per model:
    load, reconstruct, gather.

    Args:
        config: The run's settings.
        accelerator: An existing ``accelerate.Accelerator``; None creates one (:func:`create_accelerator`).

    Returns:
        The report (what ``results.json`` holds): ``{"models": [...], "settings": {...}, "versions": {...},
        "comparable_to_published_results": bool, "warnings": [...], "paper_results": [...]}``; the same on every
        process.

    Raises:
        MissingPretrainedWeightsError: A feature network's pretrained weights are missing (and
            ``random_init_feature_networks`` is off); raised before any dataset or model is loaded.
    """
    from ..pipelines import FlowMoPipeline

    config.validate()
    if accelerator is None:
        accelerator = create_accelerator(config)
    warnings_for_report = report_warnings(config)
    for warning in warnings_for_report:
        logger.warning(warning)

    with accelerator.main_process_first():  # one download into the torch hub cache, not one per process
        metrics = build_reconstruction_metrics(config, accelerator.device)
    # After the fail-fast weight checks (which leave no folder behind), before any work whose results it holds.
    lock_output_dir(config.output_dir, accelerator, purpose="tokenizer evaluation", log=logger.warning)
    with accelerator.main_process_first():  # one download / Arrow preparation for map-style datasets
        dataset = load_evaluation_dataset(config)

    names = config.model_names or _unique_names([default_model_name(p) for p in config.pretrained_model_name_or_path])
    settings = shared_settings(config, accelerator)
    model_results = []
    for name, model_path in zip(names, config.pretrained_model_name_or_path):
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
                        config.guidance_scale if config.guidance_scale is not None else model_config.sampling_guidance_scale
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
    if accelerator.is_main_process:
        paths = write_report(report, config.output_dir)
        logger.info("report written: %s", ", ".join(str(path) for path in paths.values()))
    accelerator.wait_for_everyone()
    return report


def _unique_names(names: List[str]) -> List[str]:
    counts: Dict[str, int] = {}
    unique = []
    for name in names:
        counts[name] = counts.get(name, 0) + 1
        unique.append(name if counts[name] == 1 else f"{name} ({counts[name]})")
    return unique


def shared_settings(config: EvaluationConfig, accelerator) -> Dict[str, Any]:
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


def report_warnings(config: EvaluationConfig) -> List[str]:
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


def json_safe(value: Any) -> Any:
    """Non-finite floats (PSNR of exact reconstructions is inf) become None: strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def _format_number(value: Optional[float], digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def format_markdown_report(report: Dict[str, Any]) -> str:
    """``results.md``: warnings, a table with one row per model, the paper's rows for reference, settings."""
    models = report["models"]
    lpips_nets = report["settings"]["lpips_nets"]
    lpips_keys = ["lpips"] + [f"lpips_{net}" for net in lpips_nets[1:]]
    lpips_headers = [f"LPIPS ({net})" for net in lpips_nets]
    lines = ["# FlowMo reconstruction evaluation", ""]
    if not report["comparable_to_published_results"]:
        lines += [f"> **WARNING — NOT COMPARABLE.** {NOT_COMPARABLE_BANNER}", ""]
    for warning in report["warnings"]:
        if warning != NOT_COMPARABLE_BANNER:
            lines.append(f"> Note: {warning}")
    if report["warnings"]:
        lines.append("")

    header = ["model", "bits/pixel", "rFID", "PSNR (dB)", "SSIM", *lpips_headers, "images"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in models:
        cells = [
            result["name"],
            _format_number(result["bits_per_pixel"], 4),
            _format_number(result["rfid"], 3),
            _format_number(result["psnr"], 2),
            _format_number(result["ssim"], 4),
            *[_format_number(result[key], 4) for key in lpips_keys],
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
    model_results: Sequence[Dict[str, Any]],
    path: str | os.PathLike,
    paper_results: Sequence[PaperResult] = PAPER_RESULTS,
    comparable: bool = True,
) -> Path:
    """Two panels, rFID and PSNR against bits per pixel: the evaluated models and the paper's points.

    Args:
        model_results: Entries of ``report["models"]`` (``name``, ``bits_per_pixel``, ``rfid``, ``psnr``).
        path: Output PNG.
        paper_results: Reference points, drawn as hollow stars labelled "<name> (paper)".
        comparable: False adds a red "not comparable" title (random feature networks).

    Returns:
        The written path.
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


def write_report(report: Dict[str, Any], output_dir: str | os.PathLike) -> Dict[str, Path]:
    """Write ``results.json`` and ``results.md`` (and ``rate_distortion.png`` for two or more models).

    Returns:
        ``{"json": path, "markdown": path[, "plot": path]}``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    paths["json"].write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(format_markdown_report(report), encoding="utf-8")
    if len(report["models"]) >= 2:
        paths["plot"] = plot_rate_distortion(
            report["models"], output_dir / "rate_distortion.png", comparable=report["comparable_to_published_results"]
        )
    return paths


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Command-line entry point: parse, evaluate, print the markdown table on the main process."""
    from ..metrics import MissingPretrainedWeightsError

    config, accelerator = start_command(parse_args, argv)
    try:
        report = evaluate_tokenizers(config, accelerator)
    except MissingPretrainedWeightsError as error:
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
    "bits_per_pixel",
    "build_argument_parser",
    "build_evaluation_loader",
    "build_reconstruction_metrics",
    "create_accelerator",
    "evaluate_pipeline",
    "evaluate_tokenizers",
    "format_markdown_report",
    "initial_noise_for_images",
    "load_evaluation_dataset",
    "main",
    "parse_args",
    "plot_rate_distortion",
    "start_command",
    "write_report",
]
