"""Evaluate generated images: gFID against reference statistics and Inception Score, distributed, with a report.

This is the logic behind `accelerate launch examples/train_maskgit/evaluate_generation.py`; the script only calls
[`main`]. Three modes:

* `--samples PATH`: a folder of images (`sample.py`'s output: sorted file names give the sample order) or an
  ADM-style `.npz` (`arr_0`: `[N, H, W, 3]` uint8, memory-mapped when stored uncompressed as `np.savez`
  writes it). Images are evaluated at their own size (Inception resizes to 299x299), never cropped.
* `--pretrained_model_name_or_path`: generate on the fly with exactly the images `sample.py` would write (same
  plan, seeds and uint8 quantisation, same order), without writing them.
* `--compute_reference_statistics OUT.npz`: `mu`/`sigma` of real images (a `datasets` dataset or an image
  folder, resized and center-cropped to `--resolution`), saved with the number of images.

The metric networks are built first, so missing Inception weights or unusable reference statistics fail before any
data or model is loaded. Images are split over processes, every image carries its global index, and the metric
states are combined once at the end, so the numbers do not depend on the number of processes. The main process
writes `results.json` and `results.md`.

ImageNet 256x256: the usual reference is ADM's `VIRTUAL_imagenet256_labeled.npz` (statistics of the ImageNet
training set, computed with the TF graph of the same Inception weights); figures computed against it with this
evaluator (pytorch-fid's port and resize) are close to, not bit-identical with, ADM's TF evaluator.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers.hf_argparser import HfArg

from ..metrics import describe_fid_inception, sum_across_processes
from ..utils.output_lock import lock_output_dir
from .options import (
    FeatureNetworkOptions,
    ImageDatasetOptions,
    ResumeOptions,
    check_positive,
    create_accelerator,
    load_evaluation_dataset,
    start_command,
)
from ..data import build_evaluation_loader
from .resume import RESUME_INDEPENDENT_OPTIONS, PartialEvaluationState, ResumeRefusedError, resume_fingerprint
from .reports import format_number, library_versions, not_comparable_banner, warning_lines, write_json_and_markdown
from .sampling import (
    SAMPLING_CONFIG_NAME,
    SamplingOptions,
    batches_of_process,
    generate_batches,
    load_maskgit_pipeline,
    plan_samples,
    resolve_class_ids,
)

logger = logging.getLogger(__name__)

#: Image file suffixes read from a samples folder.
SAMPLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Random feature networks (tests only) are drawn from this seed, so that reference statistics and sample statistics
#: computed in separate runs, and all processes of one run, use the same random network.
RANDOM_FEATURE_NETWORK_SEED = 0
#: Number of images behind published ImageNet gFID / IS figures.
PUBLISHED_NUM_IMAGES = 50_000

NOT_COMPARABLE_BANNER = not_comparable_banner("INCEPTION", "gFID and IS below come from a network")

MODES = ("samples", "pipeline", "reference_statistics")
#: Options that change no figure: a rerun may change them and still resume (where the samples' own statistics go is
#: decided at the end, from the complete state).
GENERATION_RESUME_INDEPENDENT_OPTIONS = RESUME_INDEPENDENT_OPTIONS | {"save_sample_statistics"}


# ----------------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GenerationEvaluationConfig(ResumeOptions, FeatureNetworkOptions, ImageDatasetOptions, SamplingOptions):
    """Settings of `evaluate_generation.py`; each field is the command-line flag of the same name (`--help`).

    Exactly one of `samples` (mode "samples"), `pretrained_model_name_or_path` (mode "pipeline": sample on the fly
    with `sample.py`'s class and sampler options, [`~flowmo_diffusers.evaluation.sampling.SamplingOptions`]) and
    `compute_reference_statistics` (mode "reference_statistics": real images from `dataset_name` / `train_data_dir`,
    center-cropped to `resolution`) says what is evaluated. `inception_score_shuffle_seed` is held as None when
    negative (contiguous splits in sample order). Every mode resumes where a killed run stopped
    (`resume_every_batches`, `overwrite`: docs/evaluation.md).
    """

    command_description = (
        "gFID and Inception Score of generated images, or reference statistics of real ones "
        "(run with `accelerate launch`)."
    )

    samples: str | None = HfArg(default=None, help="Folder of generated images (sample.py) or ADM-style .npz.")
    pretrained_model_name_or_path: str | None = HfArg(
        default=None, help="FlowMoMaskGiTPipeline folder or Hub id to sample from on the fly (sample.py's images)."
    )
    compute_reference_statistics: str | None = HfArg(
        default=None,
        metadata={"metavar": "OUT.npz"},
        help="Compute mu/sigma of real images (--dataset_name or --train_data_dir) and save them here.",
    )
    dataset_split: str = HfArg(default="train", help="Split of the real images (ADM's ImageNet reference: train).")
    train_data_dir: str | None = HfArg(default=None, help="Folder of real images (imagefolder builder).")
    resolution: int | None = HfArg(default=None, help="Resize + center-crop size of real images (the samples' size).")
    interpolation: Literal["bicubic", "bilinear"] = HfArg(
        default="bicubic", help="Resize filter (antialiased); bicubic is closest to ADM's reference batches."
    )
    reference_statistics: str | None = HfArg(default=None, help=".npz with mu/sigma for gFID.")
    save_sample_statistics: str | None = HfArg(
        default=None, help="Also save the samples' own mu/sigma to this .npz."
    )
    no_inception_score: bool = HfArg(default=False, help="Skip the Inception Score.")
    inception_score_splits: int = HfArg(default=10, help="Splits of the Inception Score.")
    inception_score_shuffle_seed: int | None = HfArg(
        default=2020,
        help="Shuffle samples with this seed before splitting (torch-fidelity's default); negative: contiguous "
        "splits in sample order (improved-gan / ADM).",
    )
    output_dir: str = HfArg(default="generation-evaluation", help="Where results.json/.md go.")

    def __post_init__(self) -> None:
        if self.inception_score_shuffle_seed is not None and self.inception_score_shuffle_seed < 0:
            self.inception_score_shuffle_seed = None
        super().__post_init__()

    @property
    def mode(self) -> str:
        if self.compute_reference_statistics is not None:
            return "reference_statistics"
        return "samples" if self.samples is not None else "pipeline"

    @property
    def computes_inception_score(self) -> bool:
        return self.mode != "reference_statistics" and not self.no_inception_score

    def image_folder(self) -> str | None:
        return self.train_data_dir

    def resolved_split(self) -> str:
        return self.dataset_split

    def validate(self) -> None:
        """Raise ValueError for inconsistent settings (cheap checks, before anything is loaded)."""
        given = [
            flag
            for flag, value in (
                ("--samples", self.samples),
                ("--pretrained_model_name_or_path", self.pretrained_model_name_or_path),
                ("--compute_reference_statistics", self.compute_reference_statistics),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of --samples (evaluate a folder or .npz), --pretrained_model_name_or_path (sample "
                f"and evaluate) or --compute_reference_statistics OUT.npz; got {given or 'none'}"
            )
        if self.computes_inception_score and self.inception_feature_dims != 2048:
            raise ValueError(
                "the Inception Score needs --inception_feature_dims 2048 (the classifier sits on the pool features); "
                "add --no_inception_score to use smaller features"
            )
        check_positive(self, "inception_score_splits")
        if self.mode == "reference_statistics":
            if (self.dataset_name is None) == (self.train_data_dir is None):
                raise ValueError(
                    "--compute_reference_statistics needs exactly one of --dataset_name or --train_data_dir"
                )
            if self.resolution is None or self.resolution < 1:
                raise ValueError("--compute_reference_statistics needs --resolution (the generator's image size)")
            if self.reference_statistics is not None:
                raise ValueError("--reference_statistics is an input of gFID, not of --compute_reference_statistics")
        super().validate()

    def feature_network(self) -> str:
        return describe_fid_inception(self.random_init_feature_networks, self.inception_feature_dims)


#: The command line, one flag per [`GenerationEvaluationConfig`] field, and its parser (into a validated config).
build_argument_parser = GenerationEvaluationConfig.argument_parser
parse_args = GenerationEvaluationConfig.from_command_line


# ----------------------------------------------------------------------------------------------------------------------
# Metric networks
# ----------------------------------------------------------------------------------------------------------------------


def build_generation_metrics(config: GenerationEvaluationConfig, device: torch.device):
    """The [`~flowmo_diffusers.metrics.GenerationMetrics`] of `config` (reference statistics read first).

    Random networks are drawn from [`RANDOM_FEATURE_NETWORK_SEED`] (every process and every run the same network, so
    reference statistics of one run fit the samples of another).

    Returns:
        [`~flowmo_diffusers.metrics.GenerationMetrics`]: The metrics, on `device`.

    Raises:
        MissingPretrainedWeightsError: No Inception weights (the message names the command-line flag).
        FileNotFoundError / ValueError: Unusable reference statistics.
    """
    from ..metrics import GenerationMetrics

    return config.build_metric_networks(
        GenerationMetrics,
        RANDOM_FEATURE_NETWORK_SEED,
        "examples/train_maskgit/evaluate_generation.py",
        reference_statistics=config.reference_statistics,
        device=device,
        compute_inception_score=config.computes_inception_score,
        inception_score_splits=config.inception_score_splits,
        inception_score_shuffle_seed=config.inception_score_shuffle_seed,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Reading samples
# ----------------------------------------------------------------------------------------------------------------------


def list_sample_images(folder: os.PathLike | str) -> list[Path]:
    """Image files directly inside `folder` (hidden/temporary files excluded), sorted by name.

    Raises:
        FileNotFoundError: Not a folder. ValueError: No images in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {str(folder)!r} does not exist")
    paths = sorted(
        path
        for path in folder.iterdir()
        if path.suffix.lower() in SAMPLE_IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )
    if not paths:
        raise ValueError(f"no images ({', '.join(SAMPLE_IMAGE_SUFFIXES)}) in {str(folder)!r}")
    return paths


@dataclass(frozen=True)
class NpzImageArray:
    """Where `arr_0` ([N, H, W, 3] uint8) of an `.npz` lies: memory-mappable if stored, else loaded whole."""

    path: str
    shape: tuple[int, ...]
    offset: int | None  # byte offset of the raw array in the file; None for a compressed member

    def open(self) -> np.ndarray:
        if self.offset is not None:
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=self.shape)
        with np.load(self.path, allow_pickle=False) as archive:
            return archive["arr_0"]


def locate_npz_images(path: os.PathLike | str) -> NpzImageArray:
    """Find `arr_0` in an ADM-style `.npz` without reading it.

    `np.savez` stores members uncompressed, so the array's bytes lie contiguously in the file and can be
    memory-mapped (random access for any number of processes and workers, nothing loaded up front). A
    `np.savez_compressed` archive is loaded into memory instead.

    Raises:
        FileNotFoundError / ValueError: Missing file, no `arr_0`, or not `[N, H, W, 3]` uint8.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path!r} is not an .npz archive: {error}") from error
    with archive:
        names = archive.namelist()
        if "arr_0.npy" not in names:
            hint = ""
            if "mu.npy" in names:
                hint = " (these look like reference statistics; pass them as --reference_statistics)"
            raise ValueError(f"{path!r} has no `arr_0` images (entries: {names}){hint}")
        info = archive.getinfo("arr_0.npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"`arr_0` of {path!r} uses .npy format version {version}, expected 1.0 or 2.0")
            shape, fortran_order, dtype = read_header[version](member)
            header_length = member.tell()
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[3] != 3:
        raise ValueError(
            f"`arr_0` of {path!r} must be [N, H, W, 3] uint8 in C order (ADM's sample format), got {shape} {dtype}"
        )
    offset = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as file:
            # Local file header: 30 fixed bytes, then the name and an extra field whose lengths it states.
            file.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(file.read(4), dtype="<u2")
        offset = info.header_offset + 30 + int(name_length) + int(extra_length) + header_length
    return NpzImageArray(path, tuple(int(size) for size in shape), offset)


class SampleImages(torch.utils.data.Dataset):
    """One process' share of a samples folder or `.npz`: items `(global index, [3, H, W] uint8 tensor)`.

    Args:
        source (`list[Path]` or [`NpzImageArray`]):
            Sorted image paths ([`list_sample_images`]) or an `.npz`'s images.
        process_index (`int`, *optional*, defaults to `0`):
            This process, `p`: it takes the global indices `i` with `i % P == p`.
        num_processes (`int`, *optional*, defaults to `1`):
            `P`.
        max_samples (`int`, *optional*):
            Only the first `max_samples` images of the whole set.
    """

    def __init__(self, source, process_index: int = 0, num_processes: int = 1, max_samples: int | None = None):
        self.source = source
        total = source.shape[0] if isinstance(source, NpzImageArray) else len(source)
        self.num_total = min(total, max_samples) if max_samples is not None else total
        self.indices = list(range(process_index, self.num_total, num_processes))
        self._array: np.ndarray | None = None  # opened lazily, in each DataLoader worker

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        from ..utils.images import to_rgb as convert_to_rgb

        index = self.indices[position]
        if isinstance(self.source, NpzImageArray):
            if self._array is None:
                self._array = self.source.open()
            pixels = np.array(self._array[index])
        else:
            import PIL.Image

            with PIL.Image.open(self.source[index]) as image:
                pixels = np.array(convert_to_rgb(image), dtype=np.uint8)  # a writable copy, as torch wants
        return index, torch.from_numpy(pixels).permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        # Workers started with "spawn" receive the dataset pickled: send the location, not a memory map.
        return dict(self.__dict__, _array=None)

    def name_of(self, index: int) -> str:
        if isinstance(self.source, NpzImageArray):
            return f"{self.source.path}[{index}]"
        return str(self.source[index])


class _CollateSamples:
    def __init__(self, dataset: SampleImages):
        self.dataset = dataset

    def __call__(self, items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.tensor([index for index, _ in items], dtype=torch.int64)
        shapes = {tuple(image.shape) for _, image in items}
        if len(shapes) > 1:
            first_index, first = items[0]
            other_index, other = next((i, image) for i, image in items if image.shape != first.shape)
            raise ValueError(
                f"samples must all have the same size: {self.dataset.name_of(first_index)} is "
                f"{tuple(first.shape[1:])}, {self.dataset.name_of(other_index)} is {tuple(other.shape[1:])}"
            )
        return indices, torch.stack([image for _, image in items])


def sample_file_batches(
    samples: os.PathLike | str,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    max_samples: int | None = None,
    skip_batches: int = 0,
) -> tuple[torch.utils.data.DataLoader, int]:
    """Batches `(global indices [b], images [b, 3, H, W] uint8)` of this process' share of a folder or `.npz`.

    Args:
        skip_batches (`int`, *optional*, defaults to `0`):
            This process' first batches to leave out (resuming): they are not read at all, and the batches that follow
            are composed as in a run that starts at the beginning.

    Returns:
        The loader and the total number of images (all processes).
    """
    if os.path.isdir(samples):
        source = list_sample_images(samples)
    else:
        source = locate_npz_images(samples)
    dataset = SampleImages(source, process_index, num_processes, max_samples)
    remaining = torch.utils.data.Subset(dataset, range(min(skip_batches * batch_size, len(dataset)), len(dataset)))
    loader = torch.utils.data.DataLoader(
        remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_CollateSamples(dataset)
    )
    return loader, dataset.num_total


def pipeline_sample_batches(
    config: GenerationEvaluationConfig, accelerator, skip_batches: int = 0
) -> tuple[Iterator, int, dict[str, Any]]:
    """Generate `sample.py`'s images of `config` (this process' share) as metric batches.

    Args:
        skip_batches (`int`, *optional*, defaults to `0`):
            This process' first batches to leave out (resuming). Every image has its own generator, seeded by `(seed,
            class, index in class)`, so the remaining images are those of an uninterrupted run: there is no generator
            state to restore.

    Returns:
        `tuple[Iterator, int, dict]`: Batches of `(global indices [b], images [b, 3, H, W] uint8)`, the total number
        of images, and the sampling settings.
    """
    pipeline = load_maskgit_pipeline(config, accelerator)
    class_ids = resolve_class_ids(config.class_ids, pipeline.transformer.config.num_classes)
    plan = plan_samples(class_ids, config.num_images_per_class)
    if config.max_samples is not None:
        plan = plan[: config.max_samples]
    my_batches = batches_of_process(plan, config.batch_size, accelerator.process_index, accelerator.num_processes)
    my_batches = itertools.islice(my_batches, skip_batches, None)
    generated = generate_batches(pipeline, my_batches, config, autocast=accelerator.autocast)

    def to_tensors():
        for specs, images in generated:
            pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # [b, H, W, 3]
            yield torch.tensor([spec.global_index for spec in specs]), torch.from_numpy(pixels).permute(0, 3, 1, 2)

    settings = {
        "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
        "revision": config.revision,
        "num_classes": len(class_ids),
        "num_images_per_class": config.num_images_per_class,
        "seed": config.seed,
        **config.pipeline_arguments(),
        "mixed_precision": accelerator.mixed_precision,
    }
    return to_tensors(), len(plan), settings


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


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


def report_warnings(config: GenerationEvaluationConfig, num_images: int) -> list[str]:
    """Reasons the figures cannot be put next to published ones, most serious first."""
    warnings = []
    if config.random_init_feature_networks:
        warnings.append(NOT_COMPARABLE_BANNER)
    if config.inception_feature_dims != 2048:
        warnings.append(f"FID uses {config.inception_feature_dims}-d Inception features instead of 2048.")
    if config.mode != "reference_statistics":
        if config.reference_statistics is None:
            warnings.append("No --reference_statistics: gFID was not computed.")
        if num_images < PUBLISHED_NUM_IMAGES:
            warnings.append(
                f"{num_images} images instead of the usual {PUBLISHED_NUM_IMAGES:,}: gFID is biased upwards for "
                "fewer images and the Inception Score depends on the number per split."
            )
        if config.computes_inception_score and config.inception_score_splits != 10:
            warnings.append(f"Inception Score over {config.inception_score_splits} splits instead of 10.")
    return warnings


def evaluate_generation(config: GenerationEvaluationConfig, accelerator=None) -> dict[str, Any]:
    """Run the mode of `config` and write the report (main process); call on every process.

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
    source: dict[str, Any]
    if config.mode == "reference_statistics":
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
        reference = {"path": os.path.abspath(config.compute_reference_statistics), "written": True}
    else:
        with accelerator.main_process_first():  # one weights download; also fails before samples are touched
            metrics = build_generation_metrics(config, accelerator.device)
        # Where this process stopped, from its saved record (its tensors are loaded once the total is known).
        saved_record = partial.read_record()
        skip_batches = 0 if saved_record is None else int(saved_record["batches_done"])
        if config.mode == "samples":
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
            batches: Any = loader
        else:
            batches, total, sampling = pipeline_sample_batches(config, accelerator, skip_batches=skip_batches)
            source = {"sampling": sampling}
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


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def format_markdown_report(report: dict[str, Any]) -> str:
    """`results.md`: warnings, then one table row with the figures."""
    metrics = report["metrics"]
    title = "# Generation evaluation" if report["mode"] != "reference_statistics" else "# Reference statistics"
    lines = [title, "", *warning_lines(report, NOT_COMPARABLE_BANNER)]
    if report["mode"] == "reference_statistics":
        source = ", ".join(f"{key}={value}" for key, value in report["source"].items() if value is not None)
        lines += [
            f"Wrote `{report['reference_statistics']['path']}`: mu/sigma of {metrics['num_images']} images "
            f"({source}; {report['settings']['feature_network']}; {metrics['num_skipped_images']} undecodable "
            "images skipped).",
            "",
        ]
        return "\n".join(lines)
    source = report["source"].get("samples") or report["source"]["sampling"]["pretrained_model_name_or_path"]
    inception_score = metrics.get("inception_score")
    is_cell = "-" if inception_score is None else f"{inception_score:.2f} ± {metrics['inception_score_std']:.2f}"
    lines += [
        "| source | images | gFID | IS |",
        "| --- | --- | --- | --- |",
        f"| {source} | {metrics['num_images']} | {format_number(metrics.get('gfid'), 3)} | {is_cell} |",
        "",
    ]
    reference = report["reference_statistics"]
    settings = report["settings"]
    details = [f"{settings['feature_network']}"]
    if reference is not None:
        details.append(f"reference {reference['path']} ({reference['num_samples'] or 'unknown number of'} images)")
    if settings["inception_score"]:
        shuffle = settings["inception_score_shuffle_seed"]
        order = f"shuffled with seed {shuffle}" if shuffle is not None else "in sample order"
        details.append(f"IS over {settings['inception_score_splits']} splits, {order}")
    details.append(f"{settings['num_processes']} process(es) on {settings['device']}")
    lines += ["Settings: " + "; ".join(details) + ".", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], output_dir: os.PathLike | str) -> dict[str, Path]:
    """Write `results.json` and `results.md`.

    Returns:
        `dict[str, Path]`: `{"json": path, "markdown": path}`.
    """
    return write_json_and_markdown(report, format_markdown_report(report), output_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point: parse, evaluate, print the markdown on the main process."""
    from ..metrics import MissingPretrainedWeightsError

    config, accelerator = start_command(parse_args, argv)
    try:
        report = evaluate_generation(config, accelerator)
    except (MissingPretrainedWeightsError, FileNotFoundError, ResumeRefusedError) as error:
        raise SystemExit(f"error: {error}") from None  # the message says what to do
    if accelerator.is_main_process:
        print(format_markdown_report(report))
    return report


__all__ = [
    "GENERATION_RESUME_INDEPENDENT_OPTIONS",
    "GenerationEvaluationConfig",
    "NOT_COMPARABLE_BANNER",
    "NpzImageArray",
    "RANDOM_FEATURE_NETWORK_SEED",
    "SampleImages",
    "build_argument_parser",
    "build_generation_metrics",
    "compute_reference_statistics",
    "evaluate_generation",
    "format_markdown_report",
    "list_sample_images",
    "locate_npz_images",
    "main",
    "parse_args",
    "pipeline_sample_batches",
    "resume_metrics",
    "sample_file_batches",
    "state_saver",
    "write_report",
]
