"""Evaluate generated images: gFID against reference statistics and Inception Score, distributed, with a report.

This is the logic behind `accelerate launch examples/train_maskgit/evaluate_generation.py`; the script only calls
[`main`]. Three modes:

* `--samples PATH`: a folder of images (`sample.py`'s output: sorted file names give the sample order), an
  ADM-style `.npz` (`arr_0`: `[N, H, W, 3]` uint8, read with `np.load` into memory) or a `.npy` of such images
  (memory-mapped). Images are evaluated at their own size (Inception resizes to 299x299), never cropped.
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

Modules: `config` (the options and the metric networks), `sources` (sample files or a pipeline as batches), `loop`
(one entry point per mode, [`evaluate_generation`] and [`main`]), `report` (`results.md`); the numbering and
sharding of real images is [`flowmo_diffusers.data.evaluation_stream`].
"""

from .config import (
    GENERATION_RESUME_INDEPENDENT_OPTIONS,
    MODES,
    PUBLISHED_NUM_IMAGES,
    RANDOM_FEATURE_NETWORK_SEED,
    GenerationEvaluationConfig,
    build_argument_parser,
    build_generation_metrics,
    parse_args,
)
from .loop import (
    MODE_ENTRY_POINTS,
    accumulate,
    compute_reference_statistics,
    evaluate_generation,
    evaluate_pipeline_samples,
    evaluate_reference_images,
    evaluate_sample_files,
    main,
    resume_metrics,
    state_saver,
)
from .report import NOT_COMPARABLE_BANNER, format_markdown_report, report_warnings, write_report
from .sources import (
    SAMPLE_IMAGE_SUFFIXES,
    NpzImageArray,
    SampleImages,
    list_sample_images,
    locate_npz_images,
    pipeline_sample_batches,
    sample_file_batches,
)

__all__ = [
    "GENERATION_RESUME_INDEPENDENT_OPTIONS",
    "MODES",
    "MODE_ENTRY_POINTS",
    "NOT_COMPARABLE_BANNER",
    "PUBLISHED_NUM_IMAGES",
    "RANDOM_FEATURE_NETWORK_SEED",
    "SAMPLE_IMAGE_SUFFIXES",
    "GenerationEvaluationConfig",
    "NpzImageArray",
    "SampleImages",
    "accumulate",
    "build_argument_parser",
    "build_generation_metrics",
    "compute_reference_statistics",
    "evaluate_generation",
    "evaluate_pipeline_samples",
    "evaluate_reference_images",
    "evaluate_sample_files",
    "format_markdown_report",
    "list_sample_images",
    "locate_npz_images",
    "main",
    "parse_args",
    "pipeline_sample_batches",
    "report_warnings",
    "resume_metrics",
    "sample_file_batches",
    "state_saver",
    "write_report",
]
