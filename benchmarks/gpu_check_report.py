"""The report of `benchmarks/gpu_check.py`: reading a saved run, the table it writes into RESULTS.md section 5 between
the markers, and that file's checks. Kept apart from the run itself so that `--from_json` and the run write the same
text from the same rows."""

import json
import os
from typing import Any, Dict, Optional

import benchmark_utils as common
from flowmo_diffusers.utils.files import atomic_write

RESULTS_PATH = os.path.join(common.BENCHMARKS_DIR, "RESULTS.md")
BEGIN_MARKER, END_MARKER = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
STATUSES = ("ok", "failed", "skipped")


def check_results_file(path: str, device: Optional[str]) -> None:
    """Raises `ValueError` unless `path` can be read and holds one begin and one end marker, in order. CPU figures
    never go into this folder's RESULTS.md (section 5 holds GPU figures; a CPU smoke run writes to a copy)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read {path!r} ({error.strerror or error})") from None
    try:
        common.replace_marked_block(text, BEGIN_MARKER, END_MARKER, "")
    except ValueError as error:
        raise ValueError(f"{path!r} {error}") from None
    if device == "cpu" and os.path.abspath(path) == os.path.abspath(RESULTS_PATH):
        raise ValueError(f"refusing to put CPU figures in {RESULTS_PATH} (section 5 holds GPU figures); pass "
                         "--results_path COPY.md to write a CPU run elsewhere")


def load_report(path: str) -> Dict[str, Any]:
    """A saved run: `{"rows": [...], ...}` as `gpu_check.py` writes it, or a bare JSON list of rows. Raises
    `ValueError` for a file that is missing, not JSON, or not a non-empty list of rows with a name and a status."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read {path!r} ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path!r} is not JSON ({error})") from None
    report = {"rows": data} if isinstance(data, list) else data
    rows = report.get("rows") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path!r} must hold a non-empty JSON list of rows or {{\"rows\": [...]}}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or row.get("status") not in STATUSES:
            raise ValueError(f"row {index} of {path!r} must be an object with a string 'name' and a 'status' of "
                             f"{STATUSES}, got {str(row)[:120]}")
    return report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def summarize_row(row: Dict[str, Any]) -> str:
    """One line of figures for the results table (from the row's `figures` only, so a saved JSON gives the same)."""
    if row.get("status") != "ok":
        return (row.get("error") or row.get("status", "")).replace("|", "\\|").replace("\n", " ")
    f, kind = row.get("figures", {}), row.get("kind")
    parts = []
    if kind == "agreement":
        return (f"max abs diff {f['max_abs_diff']:.2e}, mean {f['mean_abs_diff']:.2e}, PSNR {f['psnr_db']:.1f} dB "
                f"(images in [0, 1]); fp32 {_ms(f['fp32_latency_s'])}, bf16 {_ms(f['bf16_latency_s'])} per call")
    if "images_per_s" in f:
        parts.append(f"**{f['images_per_s']:.3g} images/s**" if kind in ("throughput", "train") else
                     f"{f['images_per_s']:.3g} images/s")
    if "latency_s" in f:
        spread = f" ({_ms(f['latency_min_s'])}-{_ms(f['latency_max_s'])})" if "latency_min_s" in f else ""
        label = "step" if kind == "train" else "median"
        runs = int(f.get("runs", 0))
        parts.append(f"{label} {_ms(f['latency_s'])}{spread}, {runs} run{'s' if runs != 1 else ''}")
    if "num_decoder_passes" in f:
        passes = int(f["num_decoder_passes"])
        parts.append(f"{passes} decoder pass{'es' if passes != 1 else ''} / image")
    if "tflops_per_s" in f:
        parts.append(f"{f['tflops_per_s']:.3g} TFLOP/s")
    if "mfu" in f:
        parts.append(f"**MFU {100 * f['mfu']:.3g} %** of {f['peak_tflops']:g} TFLOP/s")
    elif kind == "mfu":
        parts.append("MFU: no peak known for this device (--peak_tflops)")
    if "floor_fraction" in f:
        parts.append(f"floor {_ms(f['floor_s'])} = **{100 * f['floor_fraction']:.0f} %** of the decoder, at most "
                     f"{f['max_speedup_same_kernels']:.2f}x with the same kernels")
    if "speedup_vs_native" in f:
        parts.append(f"{f['speedup_vs_native']:.2f}x native")
    if "peak_memory_bytes" in f and kind in ("train", "throughput"):
        parts.append(f"peak {'**' if kind == 'train' else ''}{common.gib(f['peak_memory_bytes'])}"
                     f"{'**' if kind == 'train' else ''}")
    perceptual = (row.get("details") or {}).get("perceptual")
    if kind == "train" and perceptual:
        parts.append(f"perceptual {perceptual}")
    return "; ".join(parts) or "-"


def results_block(report: Dict[str, Any]) -> str:
    """The text between the markers: where and how it was measured, then one table line per row."""
    env = report.get("environment", {})
    rows = report["rows"]
    ok = sum(row.get("status") == "ok" for row in rows)
    where = f"{env.get('gpu')} (CUDA {env.get('cuda')})" if env.get("gpu") and env.get("device") == "cuda" else (
        f"{env.get('device', 'unknown device')} ({env.get('cpu', '?')})")
    lines = [
        f"Measured by `{report.get('command', 'benchmarks/gpu_check.py')}` on {where}, "
        f"{report.get('started_at', '?')}: {report.get('preset', '?')}, batch {report.get('batch_size', '?')}, bf16 "
        f"autocast over float32 weights; torch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}. "
        f"{ok} of {len(rows)} rows ok"
        + (f", {report['elapsed_s']:.0f} s in all" if isinstance(report.get("elapsed_s"), (int, float)) else "")
        + (f"; stopped by: {report['stopped_by']}" if report.get("stopped_by") else "") + ".",
        "",
        common.markdown_table(
            ["row", "what", "status", "result", "wall s (budget)"],
            [[f"`{row['name']}`", row.get("title", ""), row["status"], summarize_row(row),
              f"{row['wall_s']:.1f} ({row.get('budget_s', 0):.0f})" if isinstance(row.get("wall_s"), (int, float))
              else f"- ({row.get('budget_s', 0):.0f})"] for row in rows],
        ),
    ]
    return "\n".join(lines)


def write_results(report: Dict[str, Any], path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    text = common.replace_marked_block(text, BEGIN_MARKER, END_MARKER, results_block(report))
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))
    print(f"section between {BEGIN_MARKER} and {END_MARKER} of {path} rewritten", flush=True)
