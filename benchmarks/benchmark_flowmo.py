"""Speed and memory of FlowMo: encoding, one decoder forward, full reconstruction and training steps.

Examples:
    python benchmarks/benchmark_flowmo.py --preset flowmo-tiny --device cpu --dtype fp32 --batch_size 4
    python benchmarks/benchmark_flowmo.py --preset flowmo-lo --device cuda --dtype bf16 --batch_size 8 \
        --what reconstruct,decoder_step --peak_tflops 989

Every measurement is printed as a table and appended, one JSON line each with the environment, to `--output`
(default `benchmarks/results/benchmark_flowmo.jsonl`; `--output ''` records nothing). See `common.py` for how time
and peak memory are measured.

What is measured (`--what`, comma separated):
- `encode`: `FlowMoModel.encode` (encoder, quantizer, token ids) on a batch, no grad.
- `decoder_step`: one decoder forward (velocity at t = 0.5, RoPE tables precomputed as the pipeline does), no grad;
  also achieved matmul TFLOP/s from an analytic count and, with `--peak_tflops`, the model FLOP utilisation (MFU).
- `decoder_floor`: how close one decoder forward comes to the speed of its own matmuls. Each distinct matmul of the
  forward (every linear layer's shape and the joint attention, `benchmark_utils.decoder_matmuls`) is run alone on
  random operands of its shape and precision; the floor is the sum of those times, each multiplied by how often the
  forward runs it: what the decoder would cost if it did nothing but its matmuls at the speed the library reaches
  for them in isolation. The decoder forward and the floor are timed in alternating rounds, so load hits both
  alike. `floor / decoder` is the fraction of the decoder's time spent at isolated-kernel speed in matmuls, and
  `decoder / floor` bounds the speedup any implementation doing the same arithmetic with the same kernels can reach
  on this machine.
- `reconstruct`: `FlowMoPipeline(images=..., latents=noise, output_type="pt")`: encode, `--steps` Euler steps with
  guidance 1.5 inside the guidance interval (code and null-code passes batched into one forward), clip.
- `train_step`: one optimizer step of the training recipe, through `flowmo_diffusers.training.losses`
  (`flowmo_training_losses`), Adam
  (betas 0.9, 0.95) and initial-norm fixing. Stage 1A (`--stages 1a`): encode with quantizer losses, 10% null-code
  dropout, decoder forward at fat-lognormal times, velocity MSE + quantizer loss + 0.1 x LPIPS-VGG on the one-step
  prediction; encoder and decoder trained. Stage 1B (`--stages 1b`): encoder frozen (as the original after 200k
  steps); the same flow and quantizer terms plus 0.01 x ResNet-50 logit MSE on a `--posttrain_k`-step Euler sample
  from noise at per-sample random times, backpropagated through the whole chain. `--posttrain_checkpointing call`
  checkpoints each decoder call of the chain (the original's scheme); `block` instead turns on
  `enable_gradient_checkpointing` (one checkpoint per transformer block, in every decoder forward of the step).
  Distillation (`--stages distill`): one step of `--stage distill` (`training.distillation.distillation_losses`):
  a frozen teacher (the model) decodes with its own sampler (25 steps, guidance 1.5, 31 passes, no grad), a
  `--distill_k`-pass student (a copy of it, encoder frozen) decodes the same code from the same noise, and the MSE
  plus 0.1 x LPIPS-VGG between the two is backpropagated through the student's chain; `--posttrain_checkpointing
  call` checkpoints each student call, `block` every transformer block instead (train.py's `--gradient_checkpointing`).
  `--optimizer sgd` swaps Adam for stateless SGD, to measure how a step's memory grows with the batch on a machine
  too small for Adam's state (which adds 8 bytes per trained parameter, whatever the batch).
  The perceptual networks run with random weights (`--perceptual random`: the pretrained weights are not bundled,
  and the compute is the same); `--perceptual mse` swaps in a plain MSE.

`--dtype bf16` runs under `torch.autocast(bfloat16)` with float32 weights, as the original trains and samples;
`fp32` runs in float32 throughout.
"""

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_utils as common  # noqa: E402

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler, get_preset_config  # noqa: E402
from flowmo_diffusers.training.distillation import distillation_losses, make_student_config  # noqa: E402
from flowmo_diffusers.training.losses import flowmo_training_losses  # noqa: E402
from flowmo_diffusers.training.recipe import InitialNormFixer  # noqa: E402
from flowmo_diffusers.utils.validation import positive_int  # noqa: E402

WHAT = ("encode", "decoder_step", "decoder_floor", "reconstruct", "train_step")
STAGES = ("1a", "1b", "distill")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flowmo-tiny", choices=["flowmo-tiny", "flowmo-lo", "flowmo-hi"])
    parser.add_argument("--pretrained", default=None, help="pipeline folder or Hub id instead of a random preset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the preset's)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps of a reconstruction")
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--what", default=",".join(WHAT), help=f"comma-separated subset of {','.join(WHAT)}")
    parser.add_argument(
        "--stages", default="1a,1b", help=f"comma-separated training stages for train_step, of {','.join(STAGES)}"
    )
    parser.add_argument("--posttrain_k", type=int, default=8, help="Euler steps of the stage-1B sample chain")
    parser.add_argument("--distill_k", type=positive_int, default=4,
                        help="decoder passes of the student (--stages distill)")
    parser.add_argument(
        "--posttrain_checkpointing",
        default="call",
        choices=["call", "block"],
        help="stage 1B and distill: checkpoint each decoder call of the chain (the original's scheme) or every "
        "transformer block of every decoder forward of the step (enable_gradient_checkpointing)",
    )
    parser.add_argument(
        "--perceptual",
        default="random",
        choices=["random", "mse", "none"],
        help="perceptual term: the recipe's networks with random weights (same compute), an MSE stand-in, or none "
        "(stage 1A only)",
    )
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="train_step optimizer: the recipe's Adam, or plain SGD (no state) to measure how activation memory grows "
        "with the batch where Adam's state does not fit; Adam adds 8 bytes per trained parameter whatever the batch",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)")
    parser.add_argument(
        "--output",
        default=os.path.join(common.RESULTS_DIR, "benchmark_flowmo.jsonl"),
        help="JSON-lines file the results are appended to; empty to skip",
    )
    args = parser.parse_args(argv)
    args.what = [item.strip() for item in args.what.split(",") if item.strip()]
    unknown = set(args.what) - set(WHAT)
    if unknown:
        parser.error(f"unknown --what entries {sorted(unknown)}; choose from {WHAT}")
    args.stages = [item.strip().lower() for item in args.stages.split(",") if item.strip()]
    if not args.stages or set(args.stages) - set(STAGES):
        parser.error(f"--stages takes a comma-separated subset of {','.join(STAGES)}, got {','.join(args.stages)!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


def build_model(args) -> FlowMoModel:
    if args.pretrained:
        return FlowMoPipeline.from_pretrained(args.pretrained).autoencoder.to(args.device).eval()
    torch.manual_seed(args.seed)
    model = FlowMoModel(**get_preset_config(args.preset))
    # Random weights; perturb them so the zero-initialised gates do not switch whole branches off.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.to(args.device).eval()


def _row(name: str, args, timing: Dict[str, Any], memory: Dict[str, Any], batch: int, **extra) -> Dict[str, Any]:
    median = timing["median_s"]
    return dict(
        benchmark="benchmark_flowmo",
        measurement=name,
        preset=args.preset if not args.pretrained else args.pretrained,
        device=args.device,
        dtype=args.dtype,
        batch_size=batch,
        resolution=args.resolution,
        latency_s=median,
        latency_min_s=timing["min_s"],
        latency_max_s=timing["max_s"],
        latency_iqr_s=timing["iqr_s"],
        runs=timing["runs"],
        times_s=timing["times_s"],
        images_per_s=batch / median,
        memory=memory,
        **extra,
    )


def measure(fn, args) -> tuple:
    """Warm-up runs of `fn`, then the timed runs, over which the peak memory is taken."""
    common.time_function(fn, args.device, warmup=args.warmup, repeats=0)
    with common.peak_memory(args.device) as memory:
        timing = common.time_function(
            fn, args.device, warmup=0, repeats=args.repeats, deadline=getattr(args, "deadline", None)
        )
    return timing, memory


# --------------------------------------------------------------------------------------------------------------
def bench_encode(model, images, args):
    def run():
        with torch.no_grad(), common.autocast_context(args.device, args.dtype):
            model.encode(images)

    timing, memory = measure(run, args)
    height, width = images.shape[-2:]
    flops = common.encoder_forward_flops(model.config, len(images), height, width)
    return _row("encode", args, timing, memory, len(images), tflops_per_s=flops / timing["median_s"] / 1e12)


def _decoder_call(model, images, args):
    """A closure running one no-grad decoder forward at t = 0.5, RoPE tables precomputed as the pipeline does."""
    height, width = images.shape[-2:]
    with torch.no_grad():
        code = model.encode(images).code
    rotary_emb = model.decoder_rotary_embedding(height, width, images.device)
    noisy = torch.randn_like(images)
    times = torch.full((len(images),), 0.5, device=images.device)

    def run():
        with torch.no_grad(), common.autocast_context(args.device, args.dtype):
            model(noisy, times, code, rotary_emb=rotary_emb)

    return run


def bench_decoder_step(model, images, args):
    height, width = images.shape[-2:]
    timing, memory = measure(_decoder_call(model, images, args), args)
    flops = common.decoder_forward_flops(model.config, len(images), height, width)
    achieved = flops / timing["median_s"] / 1e12
    mfu = achieved / args.peak_tflops if args.peak_tflops else None
    return _row(
        "decoder_step", args, timing, memory, len(images), flops=flops, tflops_per_s=achieved, mfu=mfu,
        peak_tflops=args.peak_tflops,
    )


def bench_decoder_floor(model, images, args):
    height, width = images.shape[-2:]
    decoder_call = _decoder_call(model, images, args)
    entries = common.decoder_matmuls(model.config, len(images), height, width)
    attention_scale = model.decoder.blocks[0].attention_scale
    runners = common.matmul_runners(entries, args.device, args.dtype, attention_scale, seed=args.seed)

    def floor_round():
        # One timed run of every matmul; returns each one's seconds.
        return [common.time_function(run, args.device, warmup=0, repeats=1)["median_s"] for run in runners]

    for _ in range(args.warmup):
        decoder_call()
        floor_round()
    decoder_times, floor_times, op_times, round_times = [], [], [], []
    with common.peak_memory(args.device) as memory:
        for _ in range(args.repeats):
            deadline = getattr(args, "deadline", None)  # as in common.time_function: at least one round
            if deadline is not None and round_times and time.perf_counter() + max(round_times) > deadline:
                break
            round_start = time.perf_counter()
            decoder_times += common.time_function(decoder_call, args.device, warmup=0, repeats=1)["times_s"]
            seconds = floor_round()
            op_times.append(seconds)
            floor_times.append(sum(s * entry["count"] for s, entry in zip(seconds, entries)))
            round_times.append(time.perf_counter() - round_start)
    timing = common.summarize(decoder_times)
    timing["times_s"] = decoder_times
    floor = common.summarize(floor_times)
    per_round = [f / d for f, d in zip(floor_times, decoder_times)]
    ops = []
    for index, entry in enumerate(entries):
        seconds = common.summarize([times[index] for times in op_times])["median_s"]
        flops = common.matmul_flops(dict(entry, count=1))
        ops.append(
            dict(
                name=entry["name"], op=entry["op"], shape=list(entry["shape"]), count=entry["count"],
                seconds_each=seconds, seconds_total=seconds * entry["count"], tflops_per_s=flops / seconds / 1e12,
            )
        )
    flops = sum(common.matmul_flops(entry) for entry in entries)
    return _row(
        "decoder_floor", args, timing, memory, len(images),
        flops=flops,
        tflops_per_s=flops / timing["median_s"] / 1e12,
        floor_s=floor["median_s"],
        floor_min_s=floor["min_s"],
        floor_max_s=floor["max_s"],
        floor_times_s=floor_times,
        floor_tflops_per_s=flops / floor["median_s"] / 1e12,
        floor_fraction=floor["median_s"] / timing["median_s"],
        floor_fraction_per_round=per_round,
        max_speedup_same_kernels=timing["median_s"] / floor["median_s"],
        matmuls=ops,
    )


def format_floor(row: Dict[str, Any]) -> str:
    """The per-matmul breakdown of a `decoder_floor` row."""
    table = [
        [
            op["name"], "x".join(str(n) for n in op["shape"]), op["count"], f"{op['seconds_each'] * 1e3:.2f}",
            f"{op['seconds_total'] * 1e3:.1f}", f"{op['tflops_per_s']:.3f}",
        ]
        for op in row["matmuls"]
    ]
    headers = ["matmul", "shape", "count", "ms each", "ms total", "TFLOP/s"]
    summary = (
        f"decoder {row['latency_s'] * 1e3:.1f} ms, floor {row['floor_s'] * 1e3:.1f} ms "
        f"({row['floor_min_s'] * 1e3:.1f}-{row['floor_max_s'] * 1e3:.1f}): floor / decoder "
        f"{100 * row['floor_fraction']:.0f}% (per round {100 * min(row['floor_fraction_per_round']):.0f}-"
        f"{100 * max(row['floor_fraction_per_round']):.0f}%), at most {row['max_speedup_same_kernels']:.2f}x faster "
        "with the same arithmetic and kernels"
    )
    return common.markdown_table(headers, table) + "\n" + summary


def bench_reconstruct(model, images, args):
    pipeline = FlowMoPipeline(autoencoder=model, scheduler=FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(args.seed + 1)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    pixels01 = images / 2 + 0.5
    passes = []

    def run():
        with common.autocast_context(args.device, args.dtype):
            out = pipeline(
                images=pixels01,
                latents=noise,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                output_type="pt",
            )
        passes.append(out.num_decoder_passes)
        return out.images

    timing, memory = measure(run, args)
    return _row(
        "reconstruct", args, timing, memory, len(images), steps=args.steps, guidance_scale=args.guidance_scale,
        num_decoder_passes=passes[-1],
    )


# --------------------------------------------------------------------------------------------------------------
def _mse_distance(images: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    return (predictions.float() - images.float()).pow(2).flatten(1).mean(dim=1)


def perceptual_network(stage: str, kind: str, device: str):
    """The stage's perceptual distance: LPIPS-VGG (1A) / ResNet-50 logits (1B) with random weights (`random`: the
    same compute as the pretrained networks, which are not bundled), or a plain MSE (`mse`) / nothing (`none`)."""
    if kind == "none":
        return None, "none"
    if kind == "random":
        try:
            from flowmo_diffusers.training.perceptual import build_perceptual_loss

            name = "resnet50" if stage == "1b" else "lpips-vgg"
            return build_perceptual_loss(name, pretrained=False).to(device), f"{name} (random weights)"
        except Exception as error:  # noqa: BLE001 - fall back to the stand-in, and say so
            print(f"perceptual network unavailable ({type(error).__name__}: {error}); using an MSE stand-in")
    return _mse_distance, "mse stand-in"


def measure_optimizer_steps(
    model, params, learning_rate: float, loss, args, block_checkpointing: bool, after_step=None
):
    """`(timing, memory, optimizer name)` of optimizer steps on `loss()` (a closure over the batch) for `model`'s
    `params`: Adam as in the recipe or SGD (`--optimizer`), under `--dtype` autocast, with per-block checkpointing of
    the decoder when `block_checkpointing`; `after_step` runs after each step (the norm fix). `model` is left in eval
    mode without gradients."""
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        optimizer_name = "Adam(betas=(0.9, 0.95))"
    else:
        optimizer = torch.optim.SGD(params, lr=learning_rate)
        optimizer_name = "SGD (no optimizer state)"
    if block_checkpointing:
        model.enable_gradient_checkpointing()
        model.encoder.gradient_checkpointing = False

    def step():
        optimizer.zero_grad(set_to_none=True)
        with common.autocast_context(args.device, args.dtype):
            value = loss()
        value.backward()
        optimizer.step()
        if after_step is not None:
            after_step()

    try:
        timing, memory = measure(step, args)
    finally:
        model.disable_gradient_checkpointing()
        optimizer.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.eval()
    return timing, memory, optimizer_name


def bench_train_step(model, images, args, stage: str):
    device = args.device
    height, width = images.shape[-2:]
    scheduler = FlowMoScheduler()
    generator = torch.Generator(device).manual_seed(args.seed + 2)
    perceptual_kind = args.perceptual
    if stage == "1b" and perceptual_kind == "none":
        perceptual_kind = "mse"  # stage 1B's sample chain only exists to feed a loss
    perceptual, perceptual_name = perceptual_network(stage, perceptual_kind, device)
    weight = 0.0 if perceptual is None else (0.1 if stage == "1a" else 0.01)
    per_call = args.posttrain_checkpointing == "call"

    model.train()
    model.requires_grad_(True)
    if stage == "1b":
        model.encoder.requires_grad_(False)  # the original freezes the encoder after 200k steps
    params = [p for p in model.parameters() if p.requires_grad]
    norm_fixer = InitialNormFixer()
    norm_fixer.record(model)

    def loss():
        return flowmo_training_losses(
            model,
            images,
            scheduler,
            perceptual_loss=perceptual,
            perceptual_weight=weight,
            posttrain_sample_steps=args.posttrain_k if stage == "1b" else None,
            posttrain_gradient_checkpointing=per_call,
            generator=generator,
        )["loss"]

    timing, memory, optimizer_name = measure_optimizer_steps(
        model, params, 1e-4 if stage == "1a" else 5e-5, loss, args,
        block_checkpointing=stage == "1b" and not per_call, after_step=lambda: norm_fixer.apply(model),
    )
    extra = dict(
        stage=stage,
        optimizer=optimizer_name + " + initial-norm fixing",
        losses="flowmo_diffusers.training.losses",
        perceptual=perceptual_name,
        trained_parameters=sum(p.numel() for p in params),
    )
    if stage == "1b":
        extra.update(posttrain_k=args.posttrain_k, posttrain_checkpointing=args.posttrain_checkpointing)
    return _row(f"train_step_{stage}", args, timing, memory, len(images), **extra)


def make_student(model: FlowMoModel, num_steps: int) -> FlowMoModel:
    """A `num_steps`-pass student of `model`, as `train.py --stage distill` starts one: a copy of it whose config
    decodes in `num_steps` unguided passes on the linear grid (its pipeline's defaults)."""
    student = copy.deepcopy(model)
    make_student_config(student, num_steps, teacher="benchmark teacher (the model measured)")
    return student.eval()


def bench_distill_step(student: FlowMoModel, teacher: FlowMoModel, images, args):
    """One optimizer step of `--stage distill`: see the module docstring."""
    device = args.device
    generator = torch.Generator(device).manual_seed(args.seed + 3)
    perceptual, perceptual_name = perceptual_network("distill", "mse" if args.perceptual == "none" else args.perceptual,
                                                     device)
    per_call = args.posttrain_checkpointing == "call"
    teacher.eval().requires_grad_(False)
    student.train()
    student.requires_grad_(True)
    student.encoder.requires_grad_(False)  # the token ids must not change: train.py freezes the encoder too
    params = [p for p in student.parameters() if p.requires_grad]

    def loss():
        return distillation_losses(
            student,
            teacher,
            images,
            perceptual_loss=perceptual,
            perceptual_weight=0.1,
            gradient_checkpointing=per_call,
            generator=generator,
        )["loss"]

    timing, memory, optimizer_name = measure_optimizer_steps(
        student, params, 5e-5, loss, args, block_checkpointing=not per_call
    )
    return _row(
        "train_step_distill", args, timing, memory, len(images),
        stage="distill",
        optimizer=optimizer_name,
        losses="flowmo_diffusers.training.distillation",
        perceptual=perceptual_name,
        trained_parameters=sum(p.numel() for p in params),
        distill_k=student.config.sampling_num_inference_steps,
        teacher_passes=teacher.config.sampling_num_inference_steps,
        posttrain_checkpointing=args.posttrain_checkpointing,
    )


# --------------------------------------------------------------------------------------------------------------
def format_rows(rows: List[Dict[str, Any]]) -> str:
    table = []
    for row in rows:
        extra = []
        if row.get("tflops_per_s") is not None:
            extra.append(f"{row['tflops_per_s']:.3f} TFLOP/s")
        if row.get("floor_fraction") is not None:
            extra.append(f"matmul floor {row['floor_s'] * 1e3:.1f} ms = {100 * row['floor_fraction']:.0f}%")
        if row.get("mfu") is not None:
            extra.append(f"MFU {100 * row['mfu']:.1f}%")
        if row.get("steps"):
            extra.append(f"{row['steps']} steps")
        if row.get("perceptual"):
            extra.append(f"perceptual {row['perceptual']}")
        if row.get("posttrain_k"):
            extra.append(f"k={row['posttrain_k']}, ckpt {row['posttrain_checkpointing']}")
        if row.get("distill_k"):
            extra.append(f"K={row['distill_k']} student, ckpt {row['posttrain_checkpointing']}")
        memory = row["memory"]
        table.append(
            [
                row["measurement"],
                row["preset"],
                row["dtype"],
                row["batch_size"],
                f"{row['latency_s'] * 1e3:.1f}",
                f"{row['latency_min_s'] * 1e3:.1f}-{row['latency_max_s'] * 1e3:.1f}",
                f"{row['images_per_s']:.3f}",
                common.gib(memory.get("peak_bytes")),
                common.gib(memory.get("peak_increase_bytes")),
                "; ".join(extra) or "-",
            ]
        )
    headers = ["what", "model", "dtype", "batch", "median ms", "min-max ms", "images/s", "peak mem", "peak increase", "notes"]
    return common.markdown_table(headers, table)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    env = common.environment(args.device, threads)
    model = build_model(args)
    args.resolution = args.resolution or model.config.sample_size
    generator = torch.Generator("cpu").manual_seed(args.seed)
    images = (torch.rand((args.batch_size, 3, args.resolution, args.resolution), generator=generator) * 2 - 1).to(
        args.device
    )
    print(common.format_environment(env))
    rows = []
    for what in args.what:
        start = len(rows)
        if what == "encode":
            rows.append(bench_encode(model, images, args))
        elif what == "decoder_step":
            rows.append(bench_decoder_step(model, images, args))
        elif what == "decoder_floor":
            rows.append(bench_decoder_floor(model, images, args))
        elif what == "reconstruct":
            rows.append(bench_reconstruct(model, images, args))
        elif what == "train_step":
            for stage in args.stages:
                if stage == "distill":
                    rows.append(bench_distill_step(make_student(model, args.distill_k), model, images, args))
                else:
                    rows.append(bench_train_step(model, images, args, stage))
        for last in rows[start:]:
            print(
                f"{last['measurement']}: median {last['latency_s'] * 1e3:.1f} ms "
                f"({last['latency_min_s'] * 1e3:.1f}-{last['latency_max_s'] * 1e3:.1f}), "
                f"{last['images_per_s']:.3f} images/s",
                flush=True,
            )
    for row in rows:
        row["environment"] = env
    print()
    print(format_rows(rows))
    for row in rows:
        if row["measurement"] == "decoder_floor":
            print()
            print(format_floor(row))
    memory_method = rows[0]["memory"].get("method") if rows else None
    print(f"peak memory: {memory_method}")
    common.record(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
