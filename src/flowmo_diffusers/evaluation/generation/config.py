"""Options of the generation evaluation (`examples/train_maskgit/evaluate_generation.py`) and its metric networks.

[`GenerationEvaluationConfig`] is the script's command line: one flag per field, as before the three modes got entry
points of their own ([`~flowmo_diffusers.evaluation.generation.loop`]). It stays one dataclass because the script's
flags are one namespace (any flag parses with any mode, e.g. `--samples DIR --class_ids 0-2`) and every report records
the Inception-Score settings whatever the mode; [`GenerationEvaluationConfig.mode`] picks the entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers.hf_argparser import HfArg

from ...metrics import describe_fid_inception
from ..options import FeatureNetworkOptions, ImageDatasetOptions, ResumeOptions, check_positive
from ..resume import RESUME_INDEPENDENT_OPTIONS
from ..sampling import SamplingOptions

#: Random feature networks (tests only) are drawn from this seed, so that reference statistics and sample statistics
#: computed in separate runs, and all processes of one run, use the same random network.
RANDOM_FEATURE_NETWORK_SEED = 0
#: Number of images behind published ImageNet gFID / IS figures.
PUBLISHED_NUM_IMAGES = 50_000

MODES = ("samples", "pipeline", "reference_statistics")
#: Options that change no figure: a rerun may change them and still resume (where the samples' own statistics go is
#: decided at the end, from the complete state).
GENERATION_RESUME_INDEPENDENT_OPTIONS = RESUME_INDEPENDENT_OPTIONS | {"save_sample_statistics"}


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
    from ...metrics import GenerationMetrics

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


__all__ = [
    "GENERATION_RESUME_INDEPENDENT_OPTIONS",
    "MODES",
    "PUBLISHED_NUM_IMAGES",
    "RANDOM_FEATURE_NETWORK_SEED",
    "GenerationEvaluationConfig",
    "build_argument_parser",
    "build_generation_metrics",
    "parse_args",
]
