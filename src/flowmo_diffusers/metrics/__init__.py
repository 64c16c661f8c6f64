"""Image metrics: reconstruction (rFID, PSNR, SSIM, LPIPS) and generation (gFID, Inception Score); codebook
statistics of token ids (usage, entropy, perplexity: [`CodebookStatistics`]).

Computed the way FlowMo's evaluation code did (scikit-image PSNR/SSIM on uint8-quantised
images, `lpips.LPIPS` on [-1, 1] images, FID from pytorch-fid's TF-ported InceptionV3),
but streaming: memory does not grow with the number of images, and state is summed
across processes with one all-reduce (`accelerator.reduce`).

Generation metrics ([`GenerationMetrics`]) use the same Inception: gFID against
reference statistics read from an `.npz` (pytorch-fid's or ADM's format,
[`ReferenceStatistics`]) and the Inception Score from the network's 1008-way logits
(the one state that grows with the number of images: 4 KB of logits per image, gathered
across processes).

Pretrained networks are never replaced by random ones silently: they come from an
explicit local path or the torch hub cache / download, otherwise
[`MissingPretrainedWeightsError`] explains how to provide them. Random
initialisation (for tests) is a separate explicit option.

Heavy dependencies (scikit-image, scipy, lpips, pytorch-fid, evaluate) are imported on
first use; install them with `pip install 'flowmo-diffusers[eval]'`.
"""

from .codebook_statistics import CodebookStatistics, codebook_statistics
from .distributed import gather_across_processes, sum_across_processes
from .evaluate_integration import BUNDLED_METRICS, IMAGE_PAIR_METRICS, bundled_metric_path, load_metric
from .feature_statistics import StreamingFeatureStatistics
from .fid_inception import FID_INCEPTION_NUM_LOGITS, FIDInceptionFeatureExtractor, build_fid_inception_v3
from .frechet_distance import frechet_distance
from .generation_metrics import (
    ADM_IMAGENET256_REFERENCE_URL,
    GenerationMetrics,
    ReferenceStatistics,
    describe_fid_inception,
)
from .image_conversion import images_to_uint8_hwc, images_to_unit_range
from .inception_score import (
    TORCH_FIDELITY_SHUFFLE_SEED,
    InceptionScore,
    inception_score,
    inception_score_from_logits,
)
from .perceptual_similarity import LPIPSDistance
from .pretrained_weights import (
    FID_INCEPTION_WEIGHTS,
    LPIPS_BACKBONE_WEIGHTS,
    MissingPretrainedWeightsError,
    PretrainedWeights,
    load_pretrained_state_dict,
)
from .psnr import psnr_per_image, psnr_pooled_over_batch
from .reconstruction_metrics import ReconstructionMetrics
from .ssim import ssim_per_image

__all__ = [
    "ADM_IMAGENET256_REFERENCE_URL",
    "BUNDLED_METRICS",
    "CodebookStatistics",
    "FID_INCEPTION_NUM_LOGITS",
    "FID_INCEPTION_WEIGHTS",
    "FIDInceptionFeatureExtractor",
    "IMAGE_PAIR_METRICS",
    "GenerationMetrics",
    "InceptionScore",
    "LPIPS_BACKBONE_WEIGHTS",
    "LPIPSDistance",
    "MissingPretrainedWeightsError",
    "PretrainedWeights",
    "ReconstructionMetrics",
    "ReferenceStatistics",
    "StreamingFeatureStatistics",
    "TORCH_FIDELITY_SHUFFLE_SEED",
    "build_fid_inception_v3",
    "codebook_statistics",
    "bundled_metric_path",
    "describe_fid_inception",
    "frechet_distance",
    "gather_across_processes",
    "images_to_uint8_hwc",
    "images_to_unit_range",
    "inception_score",
    "inception_score_from_logits",
    "load_metric",
    "load_pretrained_state_dict",
    "psnr_per_image",
    "psnr_pooled_over_batch",
    "ssim_per_image",
    "sum_across_processes",
]
