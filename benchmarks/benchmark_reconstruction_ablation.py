"""Ablation of reconstruction speed: the straightforward sampling loop against each optimisation, at equal outputs.

Example:
    python benchmarks/benchmark_reconstruction_ablation.py --preset flowmo-tiny --batch_size 4 --threads 2
    python benchmarks/benchmark_reconstruction_ablation.py --preset flowmo-lo --device cuda --batch_size 8 --compile

Every variant reconstructs the same images from the same initial noise with the same float32 weights (encode,
`--steps` Euler steps on the paper's grid, guidance 1.5 inside the guidance interval, clip to [-1, 1]):

- `straightforward`: the original implementation's loop. Every step calls the decoder on the code; inside the
  guidance interval a second, separate call on the null code follows. The model is called without `rotary_emb`, so
  the RoPE tables are rebuilt (and the input validated) on every call. This is the reference output.
- `+ batched guidance`: inside the interval, code and null code share one forward of twice the batch.
- `+ RoPE once`: the RoPE tables are built once per reconstruction and passed to every call (the shipped
  `FlowMoPipeline` loop = both optimisations).
- `FlowMoPipeline`: the shipped pipeline itself (`images=`, `latents=`, `output_type="pt"`), for reference.
- `+ bf16 autocast`: the `+ RoPE once` loop under `torch.autocast(bfloat16)` (weights stay float32, as the original
  samples). Not expected to match float32 to 1e-4; its difference is reported.
- `+ torch.compile` (with `--compile`): the decoder wrapped in `torch.compile`; the first (warm-up) reconstruction's
  extra time is reported as compile time, the timed runs are steady state.
- `+ attention <backend>`: the `+ RoPE once` loop inside diffusers' `attention_backend(<backend>)` context (the
  package's attention goes through diffusers' dispatcher). A backend that cannot run here is reported as such.

Timing: every variant is warmed up once, then the variants are timed round-robin (`--repeats` rounds), so slow
phases of a loaded machine hit all variants alike. Each float32 variant's output is compared with the
straightforward one (max abs difference, pass at <= `--tolerance`, default 1e-4).
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_utils as common  # noqa: E402

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler, get_preset_config  # noqa: E402

try:
    from diffusers.models.attention_dispatch import attention_backend
except ImportError:  # diffusers < 0.35
    attention_backend = None

DEFAULT_BACKENDS = {"cpu": "_native_math,_native_flash", "cuda": "_native_math,_native_efficient,_native_flash,_native_cudnn,flash"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="flowmo-tiny", choices=["flowmo-tiny", "flowmo-lo", "flowmo-hi"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=1.5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_bf16", action="store_true", help="skip the bf16 autocast variant")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant(s)")
    parser.add_argument(
        "--attention_backends",
        default=None,
        help="comma-separated diffusers attention backends to try on top of 'RoPE once' ('native' is the default "
        f"and already measured); default {DEFAULT_BACKENDS}",
    )
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument(
        "--output", default=os.path.join(common.RESULTS_DIR, "benchmark_reconstruction_ablation.jsonl")
    )
    args = parser.parse_args(argv)
    if args.attention_backends is None:
        args.attention_backends = DEFAULT_BACKENDS[args.device]
    args.attention_backends = [b.strip() for b in args.attention_backends.split(",") if b.strip()]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    return args


@torch.no_grad()
def reconstruct(
    model: FlowMoModel,
    images: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float,
    batched_guidance: bool,
    rope_once: bool,
) -> torch.Tensor:
    """Encode and sample; `batched_guidance=rope_once=False` is the original implementation's loop."""
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(steps)
    batch_size = len(images)
    device = images.device
    code = model.encode(images).code
    latents = noise.clone()
    rotary_emb = model.decoder_rotary_embedding(*images.shape[-2:], device) if rope_once else None
    keep_and_drop = torch.cat([torch.ones(batch_size, device=device), torch.zeros(batch_size, device=device)])
    null_mask = torch.zeros(batch_size, device=device)
    sigmas = scheduler.sigmas.to(device)
    for index in range(steps):
        t, t_next = sigmas[index], sigmas[index + 1]
        times = t.expand(batch_size)
        if guidance_scale != 1.0 and scheduler.is_guidance_step(scheduler.sigmas[index]):
            if batched_guidance:
                velocity = model(
                    torch.cat([latents, latents]),
                    t.expand(2 * batch_size),
                    torch.cat([code, code]),
                    code_mask=keep_and_drop,
                    rotary_emb=rotary_emb,
                ).sample.float()
                velocity_code, velocity_null = velocity.chunk(2)
            else:
                velocity_code = model(latents, times, code, rotary_emb=rotary_emb).sample.float()
                velocity_null = model(latents, times, code, code_mask=null_mask, rotary_emb=rotary_emb).sample.float()
            velocity = velocity_null + guidance_scale * (velocity_code - velocity_null)
        else:
            velocity = model(latents, times, code, rotary_emb=rotary_emb).sample.float()
        latents = latents - (t - t_next) * velocity
    return latents.clamp(-1, 1)


class Variant:
    def __init__(self, name: str, fn: Callable[[], torch.Tensor], exact: bool = True, note: str = ""):
        self.name, self.fn, self.exact, self.note = name, fn, exact, note
        self.times: List[float] = []
        self.output: Optional[torch.Tensor] = None
        self.error: Optional[str] = None
        self.first_call_s: Optional[float] = None


def build_variants(model, pipeline, images, noise, args) -> List[Variant]:
    base = dict(steps=args.steps, guidance_scale=args.guidance_scale)

    def loop(batched, rope_once, context=nullcontext):
        def run():
            with context():
                return reconstruct(model, images, noise, batched_guidance=batched, rope_once=rope_once, **base)

        return run

    def run_pipeline():
        out = pipeline(images=images / 2 + 0.5, latents=noise, num_inference_steps=args.steps,
                       guidance_scale=args.guidance_scale, output_type="pt").images
        return out * 2 - 1

    variants = [
        Variant("straightforward (original loop)", loop(False, False), note="reference"),
        Variant("+ batched guidance", loop(True, False)),
        Variant("+ RoPE once (= pipeline loop)", loop(True, True)),
        Variant("FlowMoPipeline", run_pipeline),
    ]
    if not args.no_bf16:
        variants.append(
            Variant(
                "+ bf16 autocast",
                loop(True, True, lambda: common.autocast_context(args.device, "bf16")),
                exact=False,
                note="bf16: not expected to match fp32 to 1e-4",
            )
        )
    if args.compile:
        compiled = {}

        def compiled_loop(dtype):
            def run():
                if "decoder" not in compiled:
                    compiled["eager"] = model.decoder
                    compiled["decoder"] = torch.compile(model.decoder)
                eager = model.decoder
                model.decoder = compiled["decoder"]
                try:
                    with common.autocast_context(args.device, dtype):
                        return reconstruct(model, images, noise, batched_guidance=True, rope_once=True, **base)
                finally:
                    model.decoder = eager

            return run

        variants.append(Variant("+ torch.compile (decoder)", compiled_loop("fp32"), note="inductor, default mode"))
        if not args.no_bf16:
            variants.append(
                Variant("+ torch.compile + bf16 autocast", compiled_loop("bf16"), exact=False, note="bf16")
            )
    for backend in args.attention_backends:
        if attention_backend is None:
            variants.append(Variant(f"+ attention {backend}", None))
            variants[-1].error = "diffusers has no attention_backend (needs >= 0.35)"
            continue
        variants.append(
            Variant(f"+ attention {backend}", loop(True, True, lambda b=backend: attention_backend(b)))
        )
    return variants


def run_variants(variants: List[Variant], args) -> None:
    # Warm-up (and the output that is checked): one call each; a failing variant is reported, not fatal.
    for variant in variants:
        if variant.error:
            continue
        try:
            common.synchronize(args.device)
            start = time.perf_counter()
            for _ in range(max(args.warmup, 1)):
                variant.output = variant.fn()
                common.synchronize(args.device)
                if variant.first_call_s is None:
                    variant.first_call_s = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - an unsupported backend must not end the benchmark
            variant.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"{variant.name}: not run ({variant.error})", flush=True)
    for round_index in range(args.repeats):
        for variant in variants:
            if variant.error:
                continue
            common.synchronize(args.device)
            start = time.perf_counter()
            variant.fn()
            common.synchronize(args.device)
            variant.times.append(time.perf_counter() - start)
        print(f"round {round_index + 1}/{args.repeats} done (loadavg {common.load_average()})", flush=True)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    threads = common.set_threads(args.threads)
    env_before = common.environment(args.device, threads)
    torch.manual_seed(args.seed)
    model = FlowMoModel(**get_preset_config(args.preset))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model = model.to(args.device).eval()
    pipeline = FlowMoPipeline(autoencoder=model, scheduler=FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    resolution = args.resolution or model.config.sample_size
    generator = torch.Generator("cpu").manual_seed(args.seed)
    images = (torch.rand((args.batch_size, 3, resolution, resolution), generator=generator) * 2 - 1).to(args.device)
    noise = torch.randn(images.shape, generator=generator).to(args.device)
    print(common.format_environment(env_before), flush=True)

    variants = build_variants(model, pipeline, images, noise, args)
    run_variants(variants, args)
    env_after = common.environment(args.device, threads)

    reference = variants[0]
    if reference.error or reference.output is None:
        raise RuntimeError(f"the straightforward path failed: {reference.error}")
    reference_median = common.summarize(reference.times)["median_s"]
    rows, table = [], []
    for variant in variants:
        row: Dict[str, Any] = dict(
            benchmark="benchmark_reconstruction_ablation",
            variant=variant.name,
            preset=args.preset,
            device=args.device,
            batch_size=args.batch_size,
            resolution=resolution,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            weights_dtype="fp32",
            note=variant.note,
        )
        if variant.error:
            row.update(error=variant.error)
            table.append([variant.name, "not run", "-", "-", "-", "-", "-", variant.error])
            rows.append(row)
            continue
        summary = common.summarize(variant.times)
        difference = (variant.output.float() - reference.output.float()).abs().max().item()
        identical = difference <= args.tolerance
        compile_s = None
        if "compile" in variant.name and variant.first_call_s is not None:
            compile_s = variant.first_call_s - summary["median_s"]
        row.update(
            latency_s=summary["median_s"],
            latency_min_s=summary["min_s"],
            latency_max_s=summary["max_s"],
            latency_iqr_s=summary["iqr_s"],
            times_s=variant.times,
            runs=summary["runs"],
            images_per_s=args.batch_size / summary["median_s"],
            speedup_vs_straightforward=reference_median / summary["median_s"],
            max_abs_diff_vs_straightforward=difference,
            within_tolerance=identical,
            tolerance=args.tolerance,
            first_call_s=variant.first_call_s,
            compile_s=compile_s,
        )
        rows.append(row)
        verdict = ("yes" if identical else "NO") if variant.exact else ("yes" if identical else "no (bf16)")
        notes = [variant.note] if variant.note else []
        if compile_s is not None:
            notes.append(f"compile ~{compile_s:.1f} s (first call {variant.first_call_s:.1f} s)")
        table.append(
            [
                variant.name,
                f"{summary['median_s'] * 1e3:.1f}",
                f"{summary['min_s'] * 1e3:.1f}-{summary['max_s'] * 1e3:.1f}",
                f"{args.batch_size / summary['median_s']:.3f}",
                f"{reference_median / summary['median_s']:.2f}x",
                f"{difference:.2e}",
                verdict,
                "; ".join(notes) or "-",
            ]
        )
    for row in rows:
        row["environment"] = env_before
        row["loadavg_after"] = env_after["loadavg_1_5_15"]
    headers = ["variant", "median ms", "min-max ms", "images/s", "speedup", "max abs diff", f"<= {args.tolerance:g}", "notes"]
    print()
    print(
        f"{args.preset}, batch {args.batch_size}, {resolution}x{resolution}, {args.steps} steps, guidance "
        f"{args.guidance_scale}, device {args.device}, {args.repeats} timed rounds (round-robin), loadavg before "
        f"{env_before['loadavg_1_5_15']} after {env_after['loadavg_1_5_15']}"
    )
    print(common.markdown_table(headers, table))
    common.record(rows, args.output)
    return rows


if __name__ == "__main__":
    main()
