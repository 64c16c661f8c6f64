"""Shared helpers of the benchmark scripts: environment capture, timing, peak memory, FLOP counts, recording.

Timing: `warmup` untimed runs, then `repeats` timed runs; we report the median and the spread (min, max and the
interquartile range). CUDA work is synchronized before the clock is read.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()` (tensor memory held by
  PyTorch's caching allocator, not the process total).
- CPU: the process resident set size (RSS) sampled by a background thread every 2 ms with psutil; we report the peak
  RSS during the measured region and its increase over the RSS just before it. `tracemalloc` does not see
  PyTorch's allocations, and `resource.getrusage(...).ru_maxrss` is a lifetime high-water mark, so it only moves when
  a region exceeds every earlier one; we record it alongside for reference.
"""

import json
import os
import platform
import resource
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCHMARKS_DIR, "results")


# --------------------------------------------------------------------------------------------------------------
# Environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags_of_interest() -> List[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    except OSError:
        pass
    return []


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str, threads: Optional[int] = None) -> Dict[str, Any]:
    """Machine and library versions, to store beside every figure."""
    import diffusers

    env = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags_of_interest(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "loadavg_1_5_15": load_average(),
    }
    return env


def set_threads(threads: Optional[int]) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def format_environment(env: Dict[str, Any]) -> str:
    gpu = f", GPU {env['gpu']} (CUDA {env['cuda']})" if env.get("gpu") else ", no GPU"
    return (
        f"machine: {env['cpu']} ({env['usable_cores']} usable cores, flags {','.join(env['cpu_flags']) or '-'}){gpu}; "
        f"python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}; "
        f"torch threads {env['torch_threads']}; loadavg {env['loadavg_1_5_15']}"
    )


# --------------------------------------------------------------------------------------------------------------
# Timing
def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def summarize(times: List[float]) -> Dict[str, float]:
    ordered = sorted(times)
    if len(ordered) >= 4:
        quartiles = statistics.quantiles(ordered, n=4)
        q1, q3 = quartiles[0], quartiles[2]
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_s": q3 - q1,
        "runs": len(ordered),
    }


def time_function(
    fn: Callable[[], Any], device: str, warmup: int = 1, repeats: int = 5, deadline: Optional[float] = None
) -> Dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; returns the summary plus every time.

    `deadline` (a `time.perf_counter()` value) cuts the timed runs short: another run is started only if one as long as
    the slowest so far would end before it. At least one timed run is made whenever `repeats` > 0, so a row always has
    a figure (benchmarks/gpu_check.py gives every row a time budget this way).
    """
    for _ in range(warmup):
        fn()
        synchronize(device)
    times = []
    for _ in range(repeats):
        if deadline is not None and times and time.perf_counter() + max(times) > deadline:
            break
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    if not times:
        return {"times_s": []}
    summary = summarize(times)
    summary["times_s"] = times
    return summary


# --------------------------------------------------------------------------------------------------------------
# Peak memory
class _RSSSampler:
    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@contextmanager
def peak_memory(device: str):
    """Yields a dict that holds, on exit, the peak memory of the enclosed region (see the module docstring)."""
    result: Dict[str, Any] = {}
    if str(device).startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield result
        synchronize(device)
        peak = torch.cuda.max_memory_allocated()
        result.update(
            method="torch.cuda.max_memory_allocated",
            peak_bytes=peak,
            peak_increase_bytes=peak - before,
        )
        return
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with _RSSSampler() as sampler:
        yield result
    result.update(
        method="psutil RSS sampled every 2 ms (peak, and increase over RSS at region start)",
        peak_bytes=sampler.peak,
        peak_increase_bytes=sampler.peak - sampler.start_rss,
        ru_maxrss_before_bytes=maxrss_before,
        ru_maxrss_after_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def gib(num_bytes: Optional[float]) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    if num_bytes is None:
        return "-"
    if abs(num_bytes) < 2**30:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**30:.2f} GiB"


# --------------------------------------------------------------------------------------------------------------
# Precision
def autocast_context(device: str, dtype: str):
    """`fp32`: nothing; `bf16`: torch.autocast to bfloat16 on the device (weights stay float32, as the original)."""
    if dtype == "fp32":
        return nullcontext()
    if dtype == "bf16":
        return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)
    raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")


# --------------------------------------------------------------------------------------------------------------
# FLOPs (multiply-adds count 2)
def transformer_matmuls(
    hidden_size: int,
    depth: int,
    mlp_ratio: float,
    code_length: int,
    num_patches: int,
    patch_dim: int,
    code_dim: int,
    batch_size: int,
    output: str,
    num_heads: int = 1,
) -> List[Dict[str, Any]]:
    """
    Every matmul of one FlowMoTransformer forward as this package computes it, grouped by shape: both streams' qkv,
    joint attention (QK^T and AV), output projection and MLP, except the last block's discarded stream (qkv only),
    plus the input and output projections. Elementwise work (norms, RoPE, modulation, activations) and the
    batch-sized modulation and timestep-embedding matmuls are left out.

    Each entry: `op` (`"linear"` with `shape` = (rows, in_features, out_features), or `"attention"` with `shape` =
    (batch, sequence, heads, head_dim)), `name`, and `count` (how many times one forward runs it).
    """
    d, mlp = hidden_size, int(hidden_size * mlp_ratio)
    full_blocks = {"code": depth - 1 if output == "image" else depth, "image": depth - 1 if output == "code" else depth}
    entries = []
    for stream, tokens in (("code", code_length), ("image", num_patches)):
        rows = batch_size * tokens
        entries.append(dict(op="linear", name=f"{stream} qkv", shape=(rows, d, 3 * d), count=depth))
        for name, shape in (("proj", (rows, d, d)), ("ff in", (rows, d, mlp)), ("ff out", (rows, mlp, d))):
            entries.append(dict(op="linear", name=f"{stream} {name}", shape=shape, count=full_blocks[stream]))
    seq = code_length + num_patches
    entries.append(dict(op="attention", name="joint attention", shape=(batch_size, seq, num_heads, d // num_heads),
                        count=depth))
    entries.append(dict(op="linear", name="patch embed", shape=(batch_size * num_patches, patch_dim, d), count=1))
    if output == "image":
        entries.append(dict(op="linear", name="code embed", shape=(batch_size * code_length, code_dim, d), count=1))
        entries.append(dict(op="linear", name="proj out", shape=(batch_size * num_patches, d, patch_dim), count=1))
    else:
        entries.append(dict(op="linear", name="proj out", shape=(batch_size * code_length, d, code_dim), count=1))
    return [entry for entry in entries if entry["count"] > 0]


def matmul_flops(entry: Dict[str, Any]) -> float:
    """FLOPs of all `count` runs of one [`transformer_matmuls`] entry (a multiply-add counts 2)."""
    if entry["op"] == "linear":
        rows, in_features, out_features = entry["shape"]
        return 2.0 * rows * in_features * out_features * entry["count"]
    batch, seq, heads, head_dim = entry["shape"]
    return 4.0 * batch * seq * seq * heads * head_dim * entry["count"]


def transformer_forward_flops(*args, **kwargs) -> float:
    """Matmul FLOPs of one FlowMoTransformer forward: the sum over [`transformer_matmuls`] (same arguments)."""
    return sum(matmul_flops(entry) for entry in transformer_matmuls(*args, **kwargs))


def matmul_runners(entries: List[Dict[str, Any]], device: str, dtype: str, attention_scale: float, seed: int = 0):
    """
    One closure per [`transformer_matmuls`] entry that runs that matmul once, alone, on random operands of its shape
    in the working precision (`bf16`: bfloat16 operands, the kernels autocast dispatches to; `fp32`: float32).
    Attention goes through the model's own `joint_attention` (diffusers' attention dispatch).
    """
    from flowmo_diffusers.models.transformer_flowmo import joint_attention

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    generator = torch.Generator("cpu").manual_seed(seed)

    def operand(*shape):
        return torch.randn(shape, generator=generator).to(device=device, dtype=torch_dtype)

    runners = []
    for entry in entries:
        if entry["op"] == "linear":
            rows, in_features, out_features = entry["shape"]
            inputs, weight, bias = operand(rows, in_features), operand(out_features, in_features), operand(out_features)
            runners.append(lambda x=inputs, w=weight, b=bias: torch.nn.functional.linear(x, w, b))
        else:
            query, key, value = (operand(*entry["shape"]) for _ in range(3))
            runners.append(lambda q=query, k=key, v=value: joint_attention(q, k, v, attention_scale))
    return runners


def stack_matmuls(config: Dict[str, Any], stack: str, batch_size: int, height: int, width: int) -> List[Dict[str, Any]]:
    """[`transformer_matmuls`] of a [`FlowMoModel`] config's `stack` (`"encoder"` or `"decoder"`) at `height` x `width`.

    The encoder reads the image and writes the code; the decoder reads the code plus its mask channel and writes the
    image.
    """
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    patch = config["patch_size"]
    return transformer_matmuls(
        config[f"{stack}_hidden_size"],
        config[f"{stack}_depth"],
        config["mlp_ratio"],
        config["code_length"],
        (height // patch) * (width // patch),
        config["in_channels"] * patch**2,
        config["context_dim"] + (stack == "decoder"),
        batch_size,
        "image" if stack == "decoder" else "code",
        config[f"{stack}_num_heads"],
    )


def decoder_matmuls(config: Dict[str, Any], batch_size: int, height: int, width: int) -> List[Dict[str, Any]]:
    return stack_matmuls(config, "decoder", batch_size, height, width)


def encoder_matmuls(config: Dict[str, Any], batch_size: int, height: int, width: int) -> List[Dict[str, Any]]:
    return stack_matmuls(config, "encoder", batch_size, height, width)


def decoder_forward_flops(config: Dict[str, Any], batch_size: int, height: int, width: int) -> float:
    return sum(matmul_flops(entry) for entry in decoder_matmuls(config, batch_size, height, width))


def encoder_forward_flops(config: Dict[str, Any], batch_size: int, height: int, width: int) -> float:
    return sum(matmul_flops(entry) for entry in encoder_matmuls(config, batch_size, height, width))


# --------------------------------------------------------------------------------------------------------------
# Recording
def record(records: List[Dict[str, Any]], output: Optional[str]) -> Optional[str]:
    """Append one JSON line per record to `output` (created with its folder) and say so; returns the path written."""
    if not output:
        return None
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(output, "a", encoding="utf-8") as handle:
        for item in records:
            handle.write(json.dumps(dict(item, recorded_at=stamp), sort_keys=True) + "\n")
    print(f"recorded {len(records)} rows in {output}")
    return output


def replace_marked_block(text: str, begin: str, end: str, block: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `block`; the markers and everything
    outside them stay. Raises `ValueError` unless each marker occurs exactly once, `begin` first."""
    counts = text.count(begin), text.count(end)
    if counts != (1, 1):
        raise ValueError(f"must hold the markers {begin} and {end} once each, found them {counts[0]} and {counts[1]} "
                         "times")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ValueError(f"the marker {end} comes before {begin}")
    return text[:start] + "\n" + block.strip("\n") + "\n" + text[stop:]


def markdown_table(headers: List[str], rows: List[List[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
