#!/usr/bin/env python
"""One command for the GPU rows of benchmarks/RESULTS.md section 5, in at most 8 minutes on one H100 / H200.

    python benchmarks/gpu_check.py --output gpu_check.json --write_results      # measure on a CUDA machine, fill section 5
    python benchmarks/gpu_check.py --from_json gpu_check.json                   # fill section 5 from a saved run
    python benchmarks/gpu_check.py --device cpu --preset flowmo-tiny --output /tmp/check.json   # the CPU smoke run

FlowMo-Lo (random weights unless `--pretrained DIR` names a pipeline folder), bf16 autocast over float32 weights as
the original trains and samples, batch `--batch_size` (8). Every row reuses the benchmark it belongs to
(`benchmark_flowmo.py`'s `bench_*` functions, `benchmark_utils`' timing with CUDA synchronisation and peak memory):

- reconstruction throughput: the paper sampler (25 steps, guidance 1.5: 31 decoder passes) and 1-, 2- and 4-pass
  students (a copy of the model with the config `--stage distill` gives a student: same compute as a distilled one);
- decoder MFU (one forward's analytic matmul FLOPs over its time, against the card's dense bf16 peak) and the
  decoder against its own matmuls run alone (batch B and 1);
- one optimizer step of stage 1A, stage 1B (k = 8, per-block and per-call checkpointing) and distillation (K = 4,
  per-block and per-call): step time and peak memory (`torch.cuda.max_memory_allocated`);
- one decoder forward under each diffusers attention backend (`--attention_backends`);
- fp32 against bf16 reconstruction of the same images and noise (max / mean abs difference, PSNR).

Each row has a time budget: after one warm-up run it takes up to `--repeats` timed runs while another fits in the
budget. A row that fails (out of memory, a backend that is not installed) is recorded with its error and the next
one starts. A global deadline (`--time_limit_s`, from the start of the process) keeps the whole under 8 minutes: a row
is not started with less than `MIN_ROW_S` left, and a watchdog that fires at the deadline records the row in flight
as stopped, writes everything and exits. The JSON (`--output`) is rewritten atomically after every row, so a
killed run keeps every finished row. `--write_results` (or `--from_json FILE`) replaces what lies between the
`<!-- gpu_check:begin -->` and `<!-- gpu_check:end -->` markers of `--results_path` (section 5 of RESULTS.md),
nothing else.
"""

import time

START = time.perf_counter()  # the global deadline counts from here, imports included

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_flowmo as flowmo_bench  # noqa: E402
import benchmark_utils as common  # noqa: E402
from gpu_check_report import (  # noqa: E402
    RESULTS_PATH, check_results_file, load_report, results_block, summarize_row, write_results,
)

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler  # noqa: E402
from flowmo_diffusers.training.distillation import make_student_config  # noqa: E402
from flowmo_diffusers.utils.files import atomic_write  # noqa: E402

PRESETS = ("flowmo-lo", "flowmo-hi", "flowmo-tiny")
DEFAULT_BACKENDS = {
    # The `*_hub` backends download kernels from the Hub: not tried. A backend whose package is absent fails its row.
    "cuda": "native,_native_math,_native_efficient,_native_flash,_native_cudnn,flash,_flash_3,sage,xformers",
    "cpu": "native,flash,_native_math,_native_flash",  # flash (not installed) before others: the CI run sees a
    # failed row followed by rows that still run
}
#: Dense bf16 peak TFLOP/s of cards by `torch.cuda.get_device_name()` substring (first match), for MFU.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0))
MIN_ROW_S = 10.0  # a row is not started with less time than this before the global deadline
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# Arguments: every check before anything heavy
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None, help="JSON file of the run (its folder must exist)")
    parser.add_argument("--write_results", action="store_true", help="fill section 5 of --results_path")
    parser.add_argument("--from_json", default=None, help="write --results_path from this saved JSON; measure nothing")
    parser.add_argument("--results_path", default=RESULTS_PATH, help="the RESULTS.md to fill (default: this folder's)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="flowmo-lo", choices=PRESETS)
    parser.add_argument("--pretrained", default=None, help="a local pipeline folder to measure instead of random weights")
    parser.add_argument("--batch_size", type=int, default=None, help="default 8 on cuda, 1 on cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 1 on cuda, 0 on cpu)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per row at most, fewer if its budget is spent (default 3 on cuda, 1 on cpu)")
    parser.add_argument("--time_limit_s", type=float, default=450.0, help="global deadline, from process start")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiplies every row's time budget")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all; see --list_rows)")
    parser.add_argument("--list_rows", action="store_true", help="print the row names and budgets, and exit")
    parser.add_argument("--attention_backends", default=None, help=f"diffusers backends; default {DEFAULT_BACKENDS}")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by card name)")
    parser.add_argument("--perceptual", default="random", choices=["random", "mse"],
                        help="training rows' perceptual networks: random weights (the recipe's compute) or an MSE")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.attention_backends is None:
        args.attention_backends = DEFAULT_BACKENDS[args.device]
    # The CPU run is a smoke test of the code path (under a minute), not a measurement.
    for name, on_cuda, on_cpu in (("batch_size", 8, 1), ("warmup", 1, 0), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if args.device == "cuda" else on_cpu)
    args.attention_backends = [name.strip() for name in args.attention_backends.split(",") if name.strip()]
    if args.list_rows:
        return args
    if args.from_json is not None:
        if args.output is not None or args.write_results:
            parser.error("--from_json writes --results_path from a saved run and measures nothing: leave out --output "
                         "and --write_results")
        try:
            args.report = load_report(args.from_json)
        except ValueError as error:
            parser.error(f"--from_json: {error}")
        check_results_path(args.results_path, args.report.get("environment", {}).get("device"), parser)
        return args
    if args.output is None:
        parser.error("--output FILE.json is required (the run's rows are saved there), unless --from_json is given")
    check_output_path(args.output, parser)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("time_limit_s", "budget_scale"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name} must be a positive number of seconds, got {getattr(args, name)}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        parser.error(f"--peak_tflops must be a positive number, got {args.peak_tflops}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False); run this on a "
                     "GPU machine, or pass --device cpu --preset flowmo-tiny for the CPU smoke run")
    if args.pretrained is not None and not os.path.isfile(os.path.join(args.pretrained, "model_index.json")):
        parser.error(f"--pretrained must be a local pipeline folder (with model_index.json), got {args.pretrained!r}")
    names = [spec.name for spec in row_specs(args)]
    if args.rows is not None:
        wanted = [name.strip() for name in args.rows.split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown or not wanted:
            parser.error(f"--rows: unknown row names {unknown or wanted}; choose from {','.join(names)}")
        args.rows = wanted
    if args.write_results:
        check_results_path(args.results_path, args.device, parser)
    return args


def check_results_path(path: str, device: Optional[str], parser: argparse.ArgumentParser) -> None:
    try:
        check_results_file(path, device)
    except ValueError as error:
        parser.error(f"--results_path: {error}")


def check_output_path(path: str, parser: argparse.ArgumentParser) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"--output must be a file path, got the folder {path!r}")
    if not os.path.isdir(folder):
        parser.error(f"--output: folder {folder!r} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        parser.error(f"--output: folder {folder!r} is not writable")


# ----------------------------------------------------------------------------------------------------------------------
# Rows
@dataclass
class RowSpec:
    name: str
    title: str
    kind: str  # how its figures are summarised (see summarize_row)
    budget_s: float  # on an H100 at FlowMo-Lo size; each row's expected time is a fraction of it
    run: Callable[["Check", argparse.Namespace], Dict[str, Any]]


def _figures(row: Dict[str, Any], *keys: str) -> Dict[str, float]:
    """The finite numbers among `keys` of a benchmark row (peak memory flattened)."""
    values = {key: row.get(key) for key in keys}
    memory = row.get("memory") or {}
    values.update(peak_memory_bytes=memory.get("peak_bytes"), peak_increase_bytes=memory.get("peak_increase_bytes"))
    return {key: value for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


TIMING = ("latency_s", "latency_min_s", "latency_max_s", "images_per_s", "runs")


def reconstruct_row(passes: Optional[int]):
    """The paper sampler (`passes=None`) or a `passes`-pass student, through `FlowMoPipeline(images=...)`."""

    def run(check, args):
        if passes is None:
            model, args.steps, args.guidance_scale = check.model, 25, 1.5
        else:
            model, args.steps, args.guidance_scale = check.student(passes), passes, 1.0
        row = flowmo_bench.bench_reconstruct(model, check.images, args)
        return dict(figures=_figures(row, *TIMING, "num_decoder_passes"), details=row)

    return run


def decoder_step_row(check, args):
    row = flowmo_bench.bench_decoder_step(check.model, check.images, args)
    return dict(figures=_figures(row, *TIMING, "flops", "tflops_per_s", "mfu", "peak_tflops"), details=row)


def decoder_floor_row(batch_size: Optional[int]):
    def run(check, args):
        images = check.images if batch_size is None else check.images[:batch_size]
        row = flowmo_bench.bench_decoder_floor(check.model, images, args)
        keys = ("floor_s", "floor_fraction", "max_speedup_same_kernels", "tflops_per_s", "floor_tflops_per_s", "flops")
        return dict(figures=dict(_figures(row, *TIMING, *keys), batch_size=len(images)), details=row)

    return run


def train_row(stage: str, checkpointing: str):
    def run(check, args):
        args.posttrain_checkpointing = checkpointing
        if stage == "distill":
            row = flowmo_bench.bench_distill_step(check.student(args.distill_k), check.model, check.images, args)
        else:
            check.drop_student()  # its 4 bytes per parameter are better spent on this step's activations
            row = flowmo_bench.bench_train_step(check.model, check.images, args, stage)
        return dict(figures=_figures(row, *TIMING, "trained_parameters"), details=row)

    return run


def attention_row(backend: str):
    def run(check, args):
        from diffusers.models.attention_dispatch import attention_backend

        with attention_backend(backend):
            row = flowmo_bench.bench_decoder_step(check.model, check.images, args)
        figures = _figures(row, *TIMING, "tflops_per_s")
        native = check.figures_of("attention_native")
        if backend != "native" and native.get("latency_s"):
            figures["speedup_vs_native"] = native["latency_s"] / figures["latency_s"]
        return dict(figures=figures, details=row)

    return run


@torch.no_grad()
def agreement_row(check, args):
    """fp32 and bf16-autocast reconstructions (paper sampler) of the same images from the same noise."""
    images, noise = check.images[:2], check.noise[:2]
    pipeline = FlowMoPipeline(autoencoder=check.model, scheduler=FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    outputs, seconds = {}, {}
    for dtype in ("fp32", "bf16"):
        def run(dtype=dtype):
            with common.autocast_context(args.device, dtype):
                outputs[dtype] = pipeline(images=images / 2 + 0.5, latents=noise, output_type="pt").images.float()

        seconds[dtype] = common.time_function(run, args.device, warmup=0, repeats=1)["median_s"]
    difference = (outputs["fp32"] - outputs["bf16"]).abs()
    mse = difference.pow(2).mean().item()
    figures = dict(
        max_abs_diff=difference.max().item(), mean_abs_diff=difference.mean().item(),
        psnr_db=min(10 * math.log10(1.0 / mse), 99.0) if mse > 0 else 99.0,  # images in [0, 1]
        fp32_latency_s=seconds["fp32"], bf16_latency_s=seconds["bf16"], batch_size=len(images),
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return dict(figures=figures, details=dict(figures, cuda_matmul_allow_tf32=tf32, images_range="[0, 1]"))


def row_specs(args) -> List[RowSpec]:
    """Every row, in the order they run: inference rows first (the training rows change the weights), then the
    training rows, the one likeliest to run out of memory (stage 1B with per-call checkpointing, ~107 GiB estimated at
    batch 8, section 4) last among them, and the attention backends at the end: a third-party kernel that faults can
    leave the CUDA context unusable, which would fail every row after it (an out-of-memory error does not)."""
    b = args.batch_size
    specs = [
        RowSpec("reconstruct_paper_bf16", f"reconstruction, paper sampler (25 steps, guidance 1.5), bf16, batch {b}",
                "throughput", 45, reconstruct_row(None)),
    ]
    for passes in (1, 2, 4):
        specs.append(RowSpec(f"reconstruct_{passes}pass_bf16", f"reconstruction, {passes}-pass student, bf16, batch {b}",
                             "throughput", 20, reconstruct_row(passes)))
    specs += [
        RowSpec("decoder_mfu_bf16", f"one decoder forward, MFU, bf16, batch {b}", "mfu", 15, decoder_step_row),
        RowSpec("decoder_floor_bf16", f"decoder against its matmul floor, bf16, batch {b}", "floor", 25,
                decoder_floor_row(None)),
        RowSpec("decoder_floor_bf16_batch1", "decoder against its matmul floor, bf16, batch 1", "floor", 15,
                decoder_floor_row(1)),
        RowSpec("fp32_vs_bf16_agreement", f"fp32 vs bf16 reconstruction (paper sampler), batch {min(b, 2)}", "agreement", 60,
                agreement_row),
        RowSpec("train_1a_bf16", f"stage 1A step (LPIPS-VGG), bf16, batch {b}", "train", 30, train_row("1a", "call")),
        RowSpec("train_1b_block_bf16", f"stage 1B step, k = 8, per-block checkpointing, bf16, batch {b}", "train", 45,
                train_row("1b", "block")),
        RowSpec("distill_block_bf16", f"distillation step, K = 4, per-block checkpointing, bf16, batch {b}", "train",
                45, train_row("distill", "block")),
        RowSpec("distill_call_bf16", f"distillation step, K = 4, per-call checkpointing, bf16, batch {b}", "train", 45,
                train_row("distill", "call")),
        RowSpec("train_1b_call_bf16", f"stage 1B step, k = 8, per-call checkpointing (the original's), bf16, batch {b}",
                "train", 45, train_row("1b", "call")),
    ]
    for backend in args.attention_backends:
        specs.append(RowSpec(f"attention_{backend}", f"one decoder forward, attention backend `{backend}`, bf16, "
                             f"batch {b}", "attention", 10, attention_row(backend)))
    return specs


# ----------------------------------------------------------------------------------------------------------------------
# The run
def peak_tflops(args) -> Optional[float]:
    if args.peak_tflops is not None or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class Check:
    """The model, inputs and report of one run; rows read the first and write the last."""

    def __init__(self, args, argv: List[str]):
        self.args = args
        self.lock = threading.Lock()
        self.deadline = START + args.time_limit_s
        threads = common.set_threads(args.threads)
        env = common.environment(args.device, threads)
        if args.device == "cuda":
            env["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        self.specs = [spec for spec in row_specs(args) if args.rows is None or spec.name in args.rows]
        self.report: Dict[str, Any] = dict(
            check="benchmarks/gpu_check.py", format_version=FORMAT_VERSION,
            command="python benchmarks/gpu_check.py " + " ".join(shlex.quote(a) for a in argv),
            arguments={key: value for key, value in vars(args).items() if key != "report"},
            environment=env, started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            preset=args.pretrained or args.preset, batch_size=args.batch_size, peak_tflops=peak_tflops(args),
            time_limit_s=args.time_limit_s, complete=False, stopped_by=None, elapsed_s=None,
            rows=[dict(name=spec.name, title=spec.title, kind=spec.kind, status="skipped", error="not reached",
                       budget_s=spec.budget_s * args.budget_scale) for spec in self.specs],
        )
        self.model = self.images = self.noise = None
        self._student = None
        self.finished = False

    # -- shared inputs
    def bench_args(self, deadline: float) -> argparse.Namespace:
        """The `benchmark_flowmo` arguments of one row (each row gets its own copy to set steps, checkpointing...)."""
        a = self.args
        return argparse.Namespace(
            preset=a.preset, pretrained=a.pretrained, device=a.device, dtype="bf16", batch_size=a.batch_size,
            resolution=self.images.shape[-1], steps=25, guidance_scale=1.5, warmup=a.warmup, repeats=a.repeats,
            seed=a.seed, peak_tflops=self.report["peak_tflops"], perceptual=a.perceptual, optimizer="adam",
            posttrain_k=8, posttrain_checkpointing="call", distill_k=4, deadline=deadline,
        )

    def build(self) -> None:
        a = self.args
        self.model = flowmo_bench.build_model(argparse.Namespace(pretrained=a.pretrained, seed=a.seed, preset=a.preset,
                                                                 device=a.device))
        side = self.model.config.sample_size
        generator = torch.Generator("cpu").manual_seed(a.seed)
        self.images = (torch.rand((a.batch_size, 3, side, side), generator=generator) * 2 - 1).to(a.device)
        self.noise = torch.randn(self.images.shape, generator=generator).to(a.device)
        self.report["parameters"] = sum(p.numel() for p in self.model.parameters())

    def student(self, passes: int):
        """A `passes`-pass student of the model (one copy, re-configured per K)."""
        if self._student is None:
            self._student = flowmo_bench.make_student(self.model, passes)
        make_student_config(self._student, passes, teacher="benchmark teacher (the model measured)")
        return self._student

    def drop_student(self) -> None:
        if self._student is not None:
            self._student = None
            self.release()

    def figures_of(self, name: str) -> Dict[str, float]:
        row = next((row for row in self.report["rows"] if row["name"] == name), {})
        return row.get("figures", {}) if row.get("status") == "ok" else {}

    # -- recording
    def save(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - START
        payload = json.dumps(self.report, indent=1, sort_keys=True, default=str) + "\n"
        with atomic_write(self.args.output) as handle:
            handle.write(payload.encode("utf-8"))

    def finish(self, stopped_by: Optional[str] = None) -> None:
        self.finished = True
        self.report.update(complete=stopped_by is None, stopped_by=stopped_by)
        self.save()
        print("\n" + results_block(self.report), flush=True)
        print(f"\nrows saved in {self.args.output}", flush=True)
        if self.args.write_results:
            write_results(self.report, self.args.results_path)

    def on_deadline(self) -> None:
        """The watchdog: the row in flight cannot be interrupted safely, so the process ends here."""
        with self.lock:
            if self.finished:  # the last row ended while the watchdog was starting
                return
            for row in self.report["rows"]:
                if row.get("running"):
                    row.update(status="failed", running=False, wall_s=time.perf_counter() - row.pop("started"),
                               error=f"stopped: the global deadline (--time_limit_s {self.args.time_limit_s:g}) came "
                                     "during this row")
                elif row["status"] == "skipped" and row["error"] == "not reached":
                    row["error"] = f"not started: global deadline (--time_limit_s {self.args.time_limit_s:g})"
            print(f"\nglobal deadline of {self.args.time_limit_s:g} s reached: writing what was measured", flush=True)
            self.finish(stopped_by="deadline")
            sys.stdout.flush()
            os._exit(0)

    # -- rows
    def run(self) -> Dict[str, Any]:
        watchdog = threading.Timer(max(self.deadline - time.perf_counter(), 0.0), self.on_deadline)
        watchdog.daemon = True
        watchdog.start()
        print(common.format_environment(self.report["environment"]), flush=True)
        with self.lock:
            self.save()
        try:
            self.build()
        except Exception as error:  # noqa: BLE001 - say so in the JSON, which every row then refers to
            watchdog.cancel()
            with self.lock:
                for row in self.report["rows"]:
                    row.update(status="failed", error=f"the model was not built: {type(error).__name__}: {error}")
                self.finish(stopped_by="build failed")
            raise
        print(f"model: {self.report['preset']} ({self.report['parameters'] / 1e6:.1f}M parameters), "
              f"batch {self.args.batch_size}, built at {time.perf_counter() - START:.1f} s", flush=True)
        try:
            for spec, row in zip(self.specs, self.report["rows"]):
                self.run_row(spec, row)
        except KeyboardInterrupt:
            watchdog.cancel()
            with self.lock:
                for row in self.report["rows"]:
                    if row.pop("running", False):
                        row.update(status="failed", error="interrupted (KeyboardInterrupt)")
                self.finish(stopped_by="interrupted")
            raise SystemExit(130)
        watchdog.cancel()
        with self.lock:
            self.finish()
        return self.report

    def run_row(self, spec: RowSpec, row: Dict[str, Any]) -> None:
        now = time.perf_counter()
        left = self.deadline - now
        if left < MIN_ROW_S:
            with self.lock:
                row.update(error=f"not started: {left:.0f} s left before the global deadline "
                                 f"(--time_limit_s {self.args.time_limit_s:g})")
                self.save()
            print(f"{spec.name}: skipped ({row['error']})", flush=True)
            return
        with self.lock:
            row.update(running=True, started=now, status="failed", error=None)
        try:
            # The row's runs stop once its budget is spent, and in any case before the deadline's last seconds.
            result = spec.run(self, self.bench_args(min(now + row["budget_s"], self.deadline - MIN_ROW_S / 2)))
            outcome = dict(status="ok", error=None, figures=result["figures"], details=result["details"])
        except Exception as error:  # noqa: BLE001 - one row's failure (OOM, missing backend) must not end the check
            message = str(error).strip().splitlines()
            outcome = dict(status="failed", error=f"{type(error).__name__}: {message[0][:300] if message else ''}")
        self.release()
        with self.lock:
            if not row.get("running"):  # the watchdog has recorded this row already
                return
            row.pop("running")
            row.update(outcome, wall_s=time.perf_counter() - row.pop("started"))
            self.save()
        print(f"{spec.name}: {row['status']} in {row['wall_s']:.1f} s - {summarize_row(row)}", flush=True)

    def release(self) -> None:
        """Return what a row left (an out-of-memory row's buffers in particular) before the next starts."""
        gc.collect()
        if self.args.device == "cuda":
            torch.cuda.empty_cache()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list_rows:
        for spec in row_specs(args):
            print(f"{spec.name:32s} {spec.budget_s:5.0f} s  {spec.title}")
        return {}
    if args.from_json is not None:
        print(results_block(args.report))
        write_results(args.report, args.results_path)
        return args.report
    return Check(args, argv).run()


if __name__ == "__main__":
    main()
