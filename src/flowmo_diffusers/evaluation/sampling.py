"""Sample class-conditional images from a FlowMo MaskGiT prior into a folder (for gFID / IS), distributed and resumable.

This is the logic behind `accelerate launch examples/train_maskgit/sample.py`; the script only calls [`main`].

**Which images.** For the selected classes `C = sorted(class_ids)` (default: every class of the prior) and
`n = num_images_per_class`, sample `j` of class `c` is drawn from a generator seeded by `(seed, c, j)`
([`~flowmo_diffusers.utils.seeds.seeded_generator`]; the MaskGiT token draws and then the decoder's noise continue
the same per-image generator).
An image is therefore a function of the run's seed, its class and its index within the class: it does not depend
on the number of processes, on the batch size (up to floating-point differences between batched kernels), on the
other classes selected or on `n`, so `--num_images_per_class` can be raised later and the existing files stay
valid.

**Order and file names.** Samples are numbered class-interleaved, global index `g = j * |C| + position of c`:
a batch holds many classes, an interrupted run has a class-balanced prefix, and every 5,000 consecutive images of
the 50,000 of ImageNet hold 5 of each class (what ADM's evaluator's Inception-Score splits expect of an `.npz`).
Files are named `{j:05d}_class{c:04d}.png`, so sorting the names gives the same order.

**Sharding and resuming.** The global index range is cut into batches of `batch_size`; process `p` of `P`
generates batches `p, p + P, ...`. A batch whose files all exist is skipped; a batch with a missing file is
generated again whole (same composition, hence the same bytes as the first time) and only its missing files are
written. Every file is written to a temporary name and renamed, so an interrupted run leaves no truncated image.
`sampling_config.json` records the settings that determine the images; resuming into a folder made with other
settings is an error rather than a silent mix.

**Output.** PNGs (lossless: what is evaluated is exactly what the pipeline produced, quantised to uint8 by
diffusers' `numpy_to_pil`), optionally an ADM-style `.npz` (`arr_0`: `[N, H, W, 3]` uint8 in global
order, `arr_1`: `[N]` int64 class labels), written in a streaming fashion so 50,000 images at 256x256 (9.8 GB)
never sit in memory ([`~flowmo_diffusers.evaluation.sample_files`]).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers.hf_argparser import HfArg

from ..metrics import sum_across_processes
from ..utils.output_lock import lock_output_dir
from ..utils.seeds import seeded_generator
from ..utils.validation import check_int
from .options import (
    AcceleratorOptions,
    HubOptions,
    MaskGiTDecoderSamplerOptions,
    check_non_negative,
    check_positive,
    create_accelerator,
    start_command,
)
from .sample_files import remove_stale_temporary_files, save_image_atomically, write_samples_npz

logger = logging.getLogger(__name__)

#: Settings that determine the pixels of every sample: resuming into a folder whose sampling_config.json differs
#: in one of them is refused.
IMAGE_DETERMINING_SETTINGS = (
    "pretrained_model_name_or_path",
    "revision",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "decoder_num_inference_steps",
    "decoder_guidance_scale",
    "mixed_precision",
)
SAMPLING_CONFIG_NAME = "sampling_config.json"


# ----------------------------------------------------------------------------------------------------------------------
# Plan: which image is which
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """One image to generate.

    Args:
        global_index (`int`):
            Position in the run's order (class-interleaved, see the module docstring).
        class_id (`int`):
            Class label.
        index_in_class (`int`):
            `j`, the image's number within its class.
    """

    global_index: int
    class_id: int
    index_in_class: int

    def file_name(self) -> str:
        """`{j:05d}_class{c:04d}.png`: sorted names follow the global order."""
        return f"{self.index_in_class:05d}_class{self.class_id:04d}.png"


def parse_class_ids(values: Sequence[str | int] | None) -> list[int] | None:
    """`["0-9", "15", "20,21"]` -> `[0, ..., 9, 15, 20, 21]` (sorted, unique); None or empty -> None (all).

    Raises:
        ValueError: Not an integer or a `start-end` range with `start <= end`.
    """
    if not values:
        return None
    class_ids = set()
    for item in (part for value in values for part in str(value).replace(",", " ").split()):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"class ids must be non-negative integers or ranges like 0-99, got {item!r}")
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < start:
            raise ValueError(f"empty class range {item!r}")
        class_ids.update(range(start, end + 1))
    return sorted(class_ids)


def plan_samples(class_ids: Sequence[int], num_images_per_class: int) -> list[SampleSpec]:
    """Every image of the run in global order: `g = j * len(class_ids) + k` for class `sorted(class_ids)[k]`.

    Args:
        class_ids (`Sequence[int]`):
            Classes to sample (sorted and de-duplicated here).
        num_images_per_class (`int`):
            `n`.

    Returns:
        `list[SampleSpec]`: `len(class_ids) * n` specs, by increasing global index.
    """
    class_ids = sorted(set(int(class_id) for class_id in class_ids))
    if not class_ids:
        raise ValueError("no class ids to sample")
    num_images_per_class = check_int("num_images_per_class", num_images_per_class, 1)
    return [
        SampleSpec(index_in_class * len(class_ids) + position, class_id, index_in_class)
        for index_in_class in range(num_images_per_class)
        for position, class_id in enumerate(class_ids)
    ]


def batches_of_process(
    plan: Sequence[SampleSpec], batch_size: int, process_index: int = 0, num_processes: int = 1
) -> Iterator[list[SampleSpec]]:
    """This process' batches: global batches `[b B, (b + 1) B)` of the plan for `b = p, p + P, ...`.

    A batch's composition depends only on `batch_size`, not on the number of processes.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    process_index = check_int("process_index", process_index, 0, check_int("num_processes", num_processes, 1) - 1)
    num_batches = -(-len(plan) // batch_size)
    for batch_index in range(process_index, num_batches, num_processes):
        yield list(plan[batch_index * batch_size : (batch_index + 1) * batch_size])


@torch.no_grad()
def generate_batches(
    pipeline,
    batches: Iterator[list[SampleSpec]],
    sampler: SamplingOptions,
    *,
    autocast: Callable[[], Any] = nullcontext,
    skip_batch: Callable[[list[SampleSpec]], bool] | None = None,
) -> Iterator[tuple[list[SampleSpec], list[PIL.Image.Image]]]:
    """Generate the given batches, each image from its own generator seeded by `(seed, class, index in class)`.

    Args:
        pipeline ([`~flowmo_diffusers.FlowMoMaskGiTPipeline`]):
            The pipeline, on its device.
        batches (`Iterator[list[SampleSpec]]`):
            The batches to generate (e.g. [`batches_of_process`]).
        sampler ([`SamplingOptions`]):
            The run's `seed` and sampler settings ([`SamplingOptions.pipeline_arguments`]).
        autocast (`Callable`, *optional*, defaults to `contextlib.nullcontext`):
            Context manager factory (`accelerator.autocast` for mixed precision).
        skip_batch (`Callable[[list[SampleSpec]], bool]`, *optional*):
            Batches for which it returns True are not generated (resuming).

    Returns:
        `Iterator[tuple[list[SampleSpec], list[PIL.Image.Image]]]`: `(specs, images)`, the batch and its `len(specs)`
        RGB PIL images (uint8, as diffusers quantises).
    """
    for specs in batches:
        if skip_batch is not None and skip_batch(specs):
            continue
        # CPU generators: the draws are the same on every device (diffusers moves them to the model's device).
        generators = [seeded_generator(sampler.seed, spec.class_id, spec.index_in_class) for spec in specs]
        with autocast():
            class_ids = [spec.class_id for spec in specs]
            images = pipeline(class_ids, generator=generators, output_type="pil", **sampler.pipeline_arguments()).images
        yield specs, images


# ----------------------------------------------------------------------------------------------------------------------
# Configuration and command line
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SamplingOptions(AcceleratorOptions, MaskGiTDecoderSamplerOptions, HubOptions):
    """The class and sampler options of `sample.py`, shared by `evaluate_generation.py` (which samples on the fly).

    The config that uses them declares `pretrained_model_name_or_path`: required by [`SamplingConfig`], one of the
    inputs of [`~flowmo_diffusers.evaluation.generation.GenerationEvaluationConfig`]. `class_ids` are given as
    integers and ranges (`0-99`) and held as the sorted class ids, None for all classes of the prior. The FlowMo
    decoder's options are `decoder_num_inference_steps` and `decoder_guidance_scale`
    ([`~flowmo_diffusers.evaluation.options.MaskGiTDecoderSamplerOptions`]).
    """

    class_ids: list[str] | None = HfArg(
        default=None,
        help="Classes to sample: integers and ranges, e.g. `0-99 207 360` (default: all classes of the prior).",
    )
    num_images_per_class: int = HfArg(default=50, help="Images per class (50 x 1000 classes = 50k images).")
    seed: int = HfArg(default=0, help="Seed of the per-image generators (seed, class, index).")
    num_inference_steps: int = HfArg(default=16, help="MaskGiT unmasking steps.")
    guidance_scale: float = HfArg(default=3.0, help="MaskGiT classifier-free guidance.")
    batch_size: int = HfArg(default=32, help="Images per process and forward pass.")

    def __post_init__(self) -> None:
        self.class_ids = parse_class_ids(self.class_ids)  # strings and ranges from the command line -> sorted ints
        super().__post_init__()

    def validate(self) -> None:
        check_positive(self, "num_images_per_class", "batch_size", "num_inference_steps")
        check_non_negative(self, "seed")
        super().validate()

    def pipeline_arguments(self) -> dict[str, Any]:
        """The sampler settings as keyword arguments of [`~flowmo_diffusers.FlowMoMaskGiTPipeline`]."""
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "decoder_num_inference_steps": self.decoder_num_inference_steps,
            "decoder_guidance_scale": self.decoder_guidance_scale,
        }


@dataclass(kw_only=True)
class SamplingConfig(SamplingOptions):
    """Settings of `sample.py`; each field is the command-line flag of the same name (`sample.py --help`)."""

    command_description = (
        "Sample class-conditional images from a FlowMo MaskGiT prior into a folder of PNGs "
        "(run with `accelerate launch`; resumable)."
    )

    pretrained_model_name_or_path: str = HfArg(help="FlowMoMaskGiTPipeline folder or Hub id.")
    output_dir: str = HfArg(help="Folder of the PNGs (created; existing files are kept).")
    npz_path: str | None = HfArg(
        default=None, help="Also pack every sample into this ADM-style .npz (arr_0 images, arr_1 labels)."
    )


#: The command line, one flag per [`SamplingConfig`] field, and its parser (into a validated config).
build_argument_parser = SamplingConfig.argument_parser
parse_args = SamplingConfig.from_command_line


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def load_maskgit_pipeline(config: SamplingOptions, accelerator):
    """The pipeline of `config.pretrained_model_name_or_path` on the accelerator's device, progress bars off."""
    from ..pipelines import FlowMoMaskGiTPipeline

    with accelerator.main_process_first():  # one download into the Hub cache, not one per process
        pipeline = FlowMoMaskGiTPipeline.from_pretrained(
            config.pretrained_model_name_or_path,
            revision=config.revision,
            cache_dir=config.cache_dir,
            token=config.hub_token,
        )
    pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def resolve_class_ids(class_ids: Sequence[int] | None, num_classes: int) -> list[int]:
    """The requested classes (default all), checked against the prior's `num_classes`."""
    if class_ids is None:
        return list(range(num_classes))
    class_ids = sorted(set(int(class_id) for class_id in class_ids))
    if not class_ids or class_ids[0] < 0 or class_ids[-1] >= num_classes:
        raise ValueError(
            f"--class_ids must lie in [0, {num_classes}) for this prior, got {class_ids[:3]}...{class_ids[-3:]}"
        )
    return class_ids


def _model_identity(pretrained_model_name_or_path: str) -> str:
    path = os.fspath(pretrained_model_name_or_path)
    return os.path.abspath(path) if os.path.isdir(path) else path


def sampling_record(config: SamplingConfig, accelerator) -> dict[str, Any]:
    """What `sampling_config.json` holds: the settings that determine the images ([`IMAGE_DETERMINING_SETTINGS`])."""
    return {
        "pretrained_model_name_or_path": _model_identity(config.pretrained_model_name_or_path),
        "revision": config.revision,
        "seed": config.seed,
        **config.pipeline_arguments(),
        "mixed_precision": accelerator.mixed_precision,
    }


def check_or_write_sampling_config(output_dir: Path, record: dict[str, Any], accelerator) -> None:
    """Refuse to resume into a folder sampled with other settings; record them for a new folder.

    Call on every process: each reads the existing record before the main process writes it.

    Raises:
        ValueError: `sampling_config.json` exists and differs in an image-determining setting.
    """
    path = output_dir / SAMPLING_CONFIG_NAME
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        differences = {
            key: (existing.get(key), record[key])
            for key in IMAGE_DETERMINING_SETTINGS
            if existing.get(key) != record[key]
        }
        if differences:
            listed = "; ".join(f"{key}: {old!r} in the folder, {new!r} now" for key, (old, new) in differences.items())
            raise ValueError(
                f"{output_dir} already holds samples made with other settings ({listed}). Mixing them would evaluate "
                "a blend of two models or samplers: use another --output_dir."
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not path.is_file():
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()


def sample_to_folder(config: SamplingConfig, accelerator=None) -> dict[str, Any]:
    """Generate every missing image of `config` into `config.output_dir` (call on every process).

    Args:
        config ([`SamplingConfig`]):
            The prior, the classes, the sampler and the folder.
        accelerator (`accelerate.Accelerator`, *optional*):
            The processes to share the work among (default: [`~flowmo_diffusers.evaluation.options.create_accelerator`]
            of `config`).

    Returns:
        `dict[str, Any]`: `{"num_images", "num_generated", "num_existing", "output_dir", "npz_path", "seconds"}`
        (totals over all processes).

    Raises:
        ValueError: Bad settings, classes outside the prior, or a folder sampled with other settings.
        RuntimeError: Files are still missing at the end (e.g. deleted concurrently).
    """
    from tqdm.auto import tqdm

    config.validate()
    if accelerator is None:
        accelerator = create_accelerator(config)
    output_dir = Path(config.output_dir)
    # First: with the folder locked, every temporary file found is a dead run's, never a live sampler's.
    lock_output_dir(str(output_dir), accelerator, purpose="sampling", log=logger.warning)
    if accelerator.is_main_process:
        removed = remove_stale_temporary_files(output_dir)
        if removed:
            logger.info("removed %d temporary files of an interrupted run", removed)
    accelerator.wait_for_everyone()

    pipeline = load_maskgit_pipeline(config, accelerator)
    class_ids = resolve_class_ids(config.class_ids, pipeline.transformer.config.num_classes)
    check_or_write_sampling_config(output_dir, sampling_record(config, accelerator), accelerator)
    plan = plan_samples(class_ids, config.num_images_per_class)

    def all_exist(specs: list[SampleSpec]) -> bool:
        return all((output_dir / spec.file_name()).is_file() for spec in specs)

    my_batches = batches_of_process(plan, config.batch_size, accelerator.process_index, accelerator.num_processes)
    # Complete batches are skipped up front (a stat per file), so the progress bar counts real work.
    to_generate = [specs for specs in my_batches if not all_exist(specs)]
    generated = 0
    start = time.perf_counter()
    progress = tqdm(
        total=len(to_generate), desc="sampling", unit="batch", disable=not accelerator.is_local_main_process
    )
    for specs, images in generate_batches(pipeline, iter(to_generate), config, autocast=accelerator.autocast):
        for spec, image in zip(specs, images):
            path = output_dir / spec.file_name()
            if not path.is_file():  # the batch was regenerated for another missing file: keep the existing ones
                save_image_atomically(image, path)
                generated += 1
        progress.update(1)
    progress.close()
    seconds = time.perf_counter() - start
    generated = int(sum_across_processes(torch.tensor(generated, dtype=torch.int64), accelerator))
    accelerator.wait_for_everyone()

    missing = [spec for spec in plan if not (output_dir / spec.file_name()).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} samples are missing after sampling, e.g. {missing[0].file_name()}")
    planned = {spec.file_name() for spec in plan}
    others = [path.name for path in output_dir.glob("*.png") if path.name not in planned]
    if others and accelerator.is_main_process:
        # E.g. an earlier run with more classes or images per class: a folder evaluation would include them.
        logger.warning(
            "%s also holds %d images outside this run's classes / images per class (e.g. %s); evaluating the folder "
            "evaluates them too (the .npz holds only this run's images)", output_dir, len(others), others[0]
        )
    npz_path = None
    if config.npz_path is not None:
        if accelerator.is_main_process:
            npz_path = str(
                write_samples_npz(
                    [output_dir / spec.file_name() for spec in plan], config.npz_path, [spec.class_id for spec in plan]
                )
            )
            logger.info("wrote %s", npz_path)
        accelerator.wait_for_everyone()
        npz_path = os.fspath(config.npz_path)
    summary = {
        "num_images": len(plan),
        "num_generated": generated,
        "num_existing": len(plan) - generated,
        "output_dir": str(output_dir),
        "npz_path": npz_path,
        "seconds": seconds,
    }
    if accelerator.is_main_process:
        logger.info("samples: %s", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point of `examples/train_maskgit/sample.py`."""
    config, accelerator = start_command(parse_args, argv)
    summary = sample_to_folder(config, accelerator)
    if accelerator.is_main_process:
        print(json.dumps(summary, indent=2))
    return summary


__all__ = [
    "IMAGE_DETERMINING_SETTINGS",
    "SampleSpec",
    "SamplingConfig",
    "SamplingOptions",
    "batches_of_process",
    "build_argument_parser",
    "generate_batches",
    "load_maskgit_pipeline",
    "main",
    "parse_args",
    "parse_class_ids",
    "plan_samples",
    "remove_stale_temporary_files",
    "resolve_class_ids",
    "sample_to_folder",
    "save_image_atomically",
    "write_samples_npz",
]
