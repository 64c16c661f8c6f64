"""The generation evaluation's report: `results.md` (one row of figures, or what the reference statistics hold) and the
warnings that say why figures are not comparable to published ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..reports import format_number, not_comparable_banner, warning_lines, write_json_and_markdown
from .config import PUBLISHED_NUM_IMAGES, GenerationEvaluationConfig

NOT_COMPARABLE_BANNER = not_comparable_banner("INCEPTION", "gFID and IS below come from a network")


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



__all__ = ["NOT_COMPARABLE_BANNER", "format_markdown_report", "report_warnings", "write_report"]
