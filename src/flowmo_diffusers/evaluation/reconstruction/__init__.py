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

Modules: `config` (the options), `loop` (the evaluation and [`main`]), `report` (`results.md`, the plot); the
numbering and sharding of the images is [`flowmo_diffusers.data.evaluation_stream`].
"""

from ...data import GLOBAL_IMAGE_INDEX_COLUMN, add_global_image_index, build_evaluation_loader
from ..options import load_evaluation_dataset
from .config import EvaluationConfig, build_argument_parser, parse_args, parse_lpips_nets
from .loop import (
    build_reconstruction_metrics,
    default_model_name,
    evaluate_pipeline,
    evaluate_tokenizers,
    initial_noise_for_images,
    main,
    shared_settings,
)
from .report import (
    NOT_COMPARABLE_BANNER,
    PAPER_RESULTS,
    PaperResult,
    format_markdown_report,
    plot_rate_distortion,
    report_warnings,
    write_report,
)

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
    "default_model_name",
    "evaluate_pipeline",
    "evaluate_tokenizers",
    "format_markdown_report",
    "initial_noise_for_images",
    "load_evaluation_dataset",
    "main",
    "parse_args",
    "parse_lpips_nets",
    "plot_rate_distortion",
    "report_warnings",
    "shared_settings",
    "write_report",
]

