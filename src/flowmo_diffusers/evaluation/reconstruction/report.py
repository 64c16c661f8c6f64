"""The tokenizer evaluation's report: `results.md` (one row per model, the paper's rows), `rate_distortion.png`, and
the warnings that say why figures are not comparable to the paper's."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..reports import format_number, not_comparable_banner, warning_lines, write_json_and_markdown
from .config import EvaluationConfig

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



__all__ = [
    "CODEBOOK_COLUMNS",
    "NOT_COMPARABLE_BANNER",
    "PAPER_RESULTS",
    "PaperResult",
    "format_markdown_report",
    "plot_rate_distortion",
    "report_warnings",
    "write_report",
]
