"""Options of the tokenizer evaluation (`examples/evaluate_flowmo/evaluate.py`): [`EvaluationConfig`] and its parser."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from transformers.hf_argparser import HfArg

from ...metrics.pretrained_weights import LPIPS_BACKBONE_WEIGHTS, PretrainedWeights
from ...metrics.reconstruction_metrics import PSNR_MODES
from ..options import (
    AcceleratorOptions,
    DecoderSamplerOptions,
    FeatureNetworkOptions,
    ImageDatasetOptions,
    ResumeOptions,
    check_non_negative,
    check_positive,
)

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvaluationConfig(
    ResumeOptions, FeatureNetworkOptions, AcceleratorOptions, DecoderSamplerOptions, ImageDatasetOptions
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



__all__ = ["EvaluationConfig", "build_argument_parser", "parse_args", "parse_lpips_nets"]
