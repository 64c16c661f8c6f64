"""Writing the evaluation reports: strict JSON, markdown pieces, library versions, the not-comparable banner.

The tokenizer evaluation ([`~flowmo_diffusers.evaluation.reconstruction`]) and the generation evaluation
([`~flowmo_diffusers.evaluation.generation`]) each write `results.json` and `results.md` with these helpers; what
their tables hold is theirs.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write

#: Distributions whose versions go into the reports (missing ones are reported as `None`).
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


def not_comparable_banner(networks: str, figures: str) -> str:
    """The warning that leads a report whose feature networks have random weights.

    Args:
        networks (`str`):
            What is random, e.g. `"INCEPTION"`.
        figures (`str`):
            Which figures come from it and which networks they are, e.g. `"gFID and IS below come from a network"`.

    Returns:
        `str`: The banner.
    """
    return (
        f"RANDOMLY INITIALISED {networks}: {figures} with random weights (--random_init_feature_networks). They are "
        "NOT comparable to published figures or to runs with pretrained weights; use them only as a smoke test."
    )


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (PSNR of exact reconstructions is inf): strict JSON has no
    Infinity. Dicts, lists and tuples are converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def format_number(value: float | None, digits: int) -> str:
    """A table cell: `value` with `digits` decimals, `"-"` for a missing value (`inf` stays `inf`)."""
    return "-" if value is None else f"{value:.{digits}f}"


def warning_lines(report: dict[str, Any], banner: str) -> list[str]:
    """The markdown lines that open a report: the not-comparable warning, then one note per other warning.

    Args:
        report (`dict`):
            With `"comparable_to_published_results"` and `"warnings"`.
        banner (`str`):
            The report's [`not_comparable_banner`], shown as the warning rather than as a note.

    Returns:
        `list[str]`: Lines, each block followed by an empty line.
    """
    lines = []
    if not report["comparable_to_published_results"]:
        lines += [f"> **WARNING — NOT COMPARABLE.** {banner}", ""]
    notes = [warning for warning in report["warnings"] if warning != banner]
    lines += [f"> Note: {warning}" for warning in notes] + ([""] if notes else [])
    return lines


def library_versions() -> dict[str, str | None]:
    """`{"python": version, distribution: version or None}` for [`REPORTED_DISTRIBUTIONS`]."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for distribution in REPORTED_DISTRIBUTIONS:
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[distribution] = None
    return versions


def write_json_and_markdown(report: dict[str, Any], markdown: str, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `report` as strict JSON to `results.json` and `markdown` to `results.md` in `output_dir` (created).

    Returns:
        `dict[str, Path]`: `{"json": path, "markdown": path}`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    texts = {"json": json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", "markdown": markdown}
    for kind, text in texts.items():
        with atomic_write(paths[kind]) as handle:  # an interrupted write leaves the previous report, not half of one
            handle.write(text.encode("utf-8"))
    return paths


__all__ = [
    "REPORTED_DISTRIBUTIONS",
    "format_number",
    "json_safe",
    "library_versions",
    "not_comparable_banner",
    "warning_lines",
    "write_json_and_markdown",
]
