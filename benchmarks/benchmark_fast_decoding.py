#!/usr/bin/env python
"""Fast decoding: FlowMo's paper sampler against diffusers' solvers and distilled K-pass students, on held-out
photographs.

    python benchmarks/benchmark_fast_decoding.py                     # train a small FlowMo, distil, measure (CPU)
    python benchmarks/benchmark_fast_decoding.py --teacher DIR --students 1=DIR1 2=DIR2 4=DIR4   # measure only

Method (recorded in benchmarks/RESULTS.md, section 6):
1. Data: the scikit-image sample photographs, downscaled by `--downscale`. `chelsea` and `coffee` are held out
   (every evaluation crop comes from them); the other photographs give `--num_train_crops` random crops, written as an
   image folder. Evaluation crops are the non-overlapping `--resolution` tiles of the held-out photographs.
2. Teacher: `examples/train_flowmo/train.py` (stage 1A without the perceptual term: the LPIPS weights are not
   available offline) on the training crops; or `--teacher`.
3. Students: `train.py --stage distill --distill_steps K` from the teacher, for each K in `--distill_ks`; or
   `--students`.
4. Every decoder decodes the teacher's token ids of the evaluation crops from the same noise (seeded per image):
   the paper sampler (FlowMoScheduler, 25 steps, guidance 1.5), Euler on FlowMo's grid with fewer steps, diffusers'
   Heun, UniPC and DPM-Solver at several step counts (guidance 1.5 inside the interval, decided per evaluation),
   and the students (K passes, no guidance). Per decoder: decoder passes per image, wall time per image (decoders
   timed in interleaved rounds on the same machine; median over rounds), PSNR and SSIM against the originals
   (scikit-image, uint8 quantization as in FlowMo's evaluation), PSNR against the paper sampler's output for the
   same tokens and noise, and the high-frequency energy ratio: the energy of a Laplacian high-pass of the decoded
   images over that of the originals (a blurry decoder scores well below the paper sampler's ratio). The paper
   sampler's own agreement between two noise seeds is the reference for the agreement column.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_utils import environment, format_environment, markdown_table, record, set_threads, summarize  # noqa: E402

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler  # noqa: E402
from flowmo_diffusers.metrics.psnr import psnr_per_image  # noqa: E402
from flowmo_diffusers.metrics.ssim import ssim_per_image  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "examples", "train_flowmo", "train.py")
HELD_OUT = ("chelsea.png", "coffee.png")
TRAIN_PHOTOS = (
    "astronaut.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png",
    "retina.jpg", "camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png",
)
# A small FlowMo for CPU: 32x32 images, 16 tokens x 12 bits (0.19 bits per pixel), decoder 128 wide and 4 deep.
BENCH_CONFIG = dict(
    sample_size=32, in_channels=3, patch_size=4, code_length=16, context_dim=12, bits_per_subtoken=4,
    encoder_hidden_size=64, encoder_num_heads=2, encoder_depth=2, encoder_axes_dim=[8, 12, 12],
    decoder_hidden_size=128, decoder_num_heads=2, decoder_depth=4, decoder_axes_dim=[16, 24, 24],
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "fast_decoding"))
    parser.add_argument("--teacher", default=None, help="Teacher pipeline folder (default: train one).")
    parser.add_argument("--students", nargs="*", default=[], help="K=DIR pairs of distilled students to load.")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--downscale", type=int, default=2, help="Photographs are downscaled by this factor first.")
    parser.add_argument("--num_train_crops", type=int, default=4000)
    parser.add_argument("--num_eval_images", type=int, default=48)
    parser.add_argument("--teacher_steps", type=int, default=3000)
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-3)
    parser.add_argument("--distill_ks", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--distill_train_steps", type=int, default=1500)
    parser.add_argument("--distill_learning_rate", type=float, default=3e-4)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--solver_steps", type=int, nargs="*", default=[2, 3, 4, 6, 8, 12, 16, 25])
    parser.add_argument("--timing_rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "fast_decoding.jsonl"))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Data
def load_photo(name: str, downscale: int) -> Image.Image:
    import skimage.data

    image = Image.open(os.path.join(skimage.data.data_dir, name)).convert("RGB")
    return image.resize((image.width // downscale, image.height // downscale), Image.LANCZOS)


def write_training_crops(folder: str, args) -> int:
    """`--num_train_crops` random crops of the training photographs as PNG files (skipped when already there)."""
    os.makedirs(folder, exist_ok=True)
    existing = [name for name in os.listdir(folder) if name.endswith(".png")]
    if len(existing) >= args.num_train_crops:
        return len(existing)
    rng = np.random.default_rng(args.seed)
    photos = [np.asarray(load_photo(name, args.downscale)) for name in TRAIN_PHOTOS]
    size = args.resolution
    for index in range(args.num_train_crops):
        photo = photos[index % len(photos)]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        Image.fromarray(photo[top : top + size, left : left + size]).save(os.path.join(folder, f"crop_{index:05d}.png"))
    return args.num_train_crops


def evaluation_images(args) -> torch.Tensor:
    """Non-overlapping tiles of the held-out photographs, `(N, 3, R, R)` in [-1, 1], N = `--num_eval_images`."""
    size, tiles = args.resolution, []
    for name in HELD_OUT:
        photo = np.asarray(load_photo(name, args.downscale))
        for top in range(0, photo.shape[0] - size + 1, size):
            for left in range(0, photo.shape[1] - size + 1, size):
                tiles.append(photo[top : top + size, left : left + size])
    chosen = np.linspace(0, len(tiles) - 1, min(args.num_eval_images, len(tiles))).round().astype(int)
    batch = torch.from_numpy(np.stack([tiles[i] for i in chosen])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Training through the example script
def run_training(arguments, log_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN_SCRIPT] + [str(a) for a in arguments]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return time.perf_counter() - start


def train_teacher(args, crops_dir) -> str:
    output_dir = os.path.join(args.work_dir, "teacher")
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        return output_dir
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "bench_config.json"), "w") as f:
        json.dump(BENCH_CONFIG, f)
    seconds = run_training(
        ["--train_data_dir", crops_dir, "--model_config", os.path.join(args.work_dir, "bench_config.json"),
         "--resolution", args.resolution, "--max_train_steps", args.teacher_steps, "--train_batch_size",
         args.train_batch_size, "--learning_rate", args.teacher_learning_rate, "--perceptual_weight", "0",
         "--random_flip", "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1", "--validation_steps",
         "1000", "--num_validation_images", "4", "--report_to", "none", "--seed", args.seed, "--output_dir", output_dir],
        os.path.join(args.work_dir, "teacher.log"),
    )
    print(f"teacher trained in {seconds / 60:.1f} min")
    return output_dir


def add_small_model_arguments(parser, output_name: str) -> None:
    """The options of the scripts measured on this benchmark's small FlowMo (half precision, tiling): the model (a
    folder, or trained once into `--work_dir`), the sampler's steps, threads, seed and the `.jsonl` record."""
    parser.add_argument("--pipeline", default=None, help="Pipeline folder (default: the small CPU FlowMo, trained once).")
    parser.add_argument("--work_dir", default=os.path.join(REPO, "outputs", "small_tokenizer"))
    parser.add_argument("--teacher_steps", type=int, default=1500, help="Training steps when the model is trained here.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's own (25).")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", f"{output_name}.jsonl"))


def start_small_model_run(args) -> tuple[int, dict, str]:
    """Threads set, the environment printed and the small FlowMo's folder (`--pipeline`, or trained once into
    `--work_dir`) for a script parsed with [`add_small_model_arguments`]: `(threads, environment, folder)`."""
    threads = set_threads(args.threads)
    env = environment("cpu", threads)
    print(format_environment(env))
    return threads, env, args.pipeline or small_flowmo(args.work_dir, args.teacher_steps, args.seed)


def small_flowmo(work_dir: str, teacher_steps: int, seed: int = 0) -> str:
    """This benchmark's small FlowMo (the teacher recipe) trained once into `work_dir/teacher` and reused after: the
    model other CPU benchmarks (half precision, tiling) measure on the same held-out photographs."""
    args = parse_args(["--work_dir", work_dir, "--teacher_steps", str(teacher_steps), "--seed", str(seed)])
    crops_dir = os.path.join(work_dir, "train_crops")
    write_training_crops(crops_dir, args)
    return train_teacher(args, crops_dir)


def distil(args, crops_dir, teacher_dir, k) -> str:
    output_dir = os.path.join(args.work_dir, f"student-{k}")
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        return output_dir
    seconds = run_training(
        ["--stage", "distill", "--pretrained_model_name_or_path", teacher_dir, "--distill_steps", k,
         "--train_data_dir", crops_dir, "--resolution", args.resolution, "--max_train_steps", args.distill_train_steps,
         "--train_batch_size", args.train_batch_size, "--learning_rate", args.distill_learning_rate,
         "--perceptual_weight", "0", "--random_flip", "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1",
         "--validation_steps", "500", "--num_validation_images", "4", "--report_to", "none", "--seed", args.seed,
         "--output_dir", output_dir],
        os.path.join(args.work_dir, f"student-{k}.log"),
    )
    print(f"{k}-pass student distilled in {seconds / 60:.1f} min")
    return output_dir


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
def high_frequency_energy(images: torch.Tensor) -> float:
    """Energy of a 3x3 Laplacian high-pass of `images` in [-1, 1] (summed over the batch)."""
    kernel = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]).expand(3, 1, 3, 3)
    return float(F.conv2d(images.float(), kernel, groups=3).pow(2).sum())


def noise_for(count, resolution, seed):
    """Per-image noise, image i seeded by (seed, i): independent of batch composition."""
    return torch.stack([
        torch.randn((3, resolution, resolution), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        for i in range(count)
    ])


def decoder_rows(teacher, students, solver_steps):
    """(name, family, pipeline, call kwargs) for every decoder measured."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    def with_scheduler(pipeline, scheduler):
        return FlowMoPipeline(autoencoder=pipeline.autoencoder, scheduler=scheduler)

    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    rows = [("paper sampler (Euler 25, guidance 1.5)", "paper", teacher, {})]
    for steps in (1, 2, 4, 8, 12):
        rows.append((f"Euler {steps}", "euler", teacher, dict(num_inference_steps=steps)))
    for steps in solver_steps:
        rows.append((f"Heun {steps}", "heun", with_scheduler(teacher, FlowMatchHeunDiscreteScheduler()),
                     dict(num_inference_steps=steps)))
        rows.append((f"UniPC {steps}", "unipc", with_scheduler(teacher, UniPCMultistepScheduler(**flow)),
                     dict(num_inference_steps=steps)))
        rows.append((f"DPM-Solver++ {steps}", "dpm", with_scheduler(teacher, DPMSolverMultistepScheduler(**flow)),
                     dict(num_inference_steps=steps)))
    for k, student in sorted(students.items()):
        rows.append((f"distilled student, K={k}", "student", student, {}))
    return rows


@torch.no_grad()
def measure(args, teacher, students):
    images = evaluation_images(args)
    ids = teacher.encode(images / 2 + 0.5)
    noise, other_noise = noise_for(len(images), args.resolution, args.seed), noise_for(len(images), args.resolution, args.seed + 1)
    rows = decoder_rows(teacher, students, args.solver_steps)
    for _, _, pipeline, _ in rows:
        pipeline.set_progress_bar_config(disable=True)

    def run(pipeline, kwargs, latents):
        out = pipeline(indices=ids, latents=latents, output_type="pt", **kwargs)
        return out.images * 2 - 1, out.num_decoder_passes

    paper_images, paper_passes = run(teacher, {}, noise)
    paper_other, _ = run(teacher, {}, other_noise)
    original_energy = high_frequency_energy(images)
    results = []
    for name, family, pipeline, kwargs in rows:
        decoded, passes = run(pipeline, kwargs, noise)
        results.append(dict(
            decoder=name, family=family, passes=passes, kwargs=kwargs,
            psnr=float(np.mean(psnr_per_image(images, decoded))),
            ssim=float(np.mean(ssim_per_image(images, decoded))),
            psnr_vs_paper=float(np.mean(np.minimum(psnr_per_image(paper_images, decoded), 99.0))),
            hf_energy_ratio=high_frequency_energy(decoded) / original_energy,
            times_s=[],
        ))
    # Interleaved timing: every round decodes with every decoder once, in a rotated order (the quality pass above
    # is the warm-up).
    for round_index in range(args.timing_rounds):
        order = list(range(len(rows)))
        order = order[round_index % len(order):] + order[: round_index % len(order)]
        for index in order:
            _, _, pipeline, kwargs = rows[index]
            start = time.perf_counter()
            run(pipeline, kwargs, noise)
            results[index]["times_s"].append((time.perf_counter() - start) / len(images))
    paper_time = summarize(results[0]["times_s"])["median_s"]
    for result in results:
        result["seconds_per_image"] = summarize(result["times_s"])["median_s"]
        result["speedup_vs_paper"] = paper_time / result["seconds_per_image"]
    reference = dict(
        num_eval_images=len(images), paper_passes=paper_passes,
        paper_two_seed_psnr=float(np.mean(psnr_per_image(paper_images, paper_other))),
        paper_two_seed_ssim=float(np.mean(ssim_per_image(paper_images, paper_other))),
    )
    return results, reference


def thresholds(results, levels=(30.0, 35.0)):
    """Per training-free solver: the fewest decoder passes whose PSNR against the paper sampler reaches each level."""
    out = {}
    for family in ("euler", "heun", "unipc", "dpm"):
        rows = sorted((r for r in results if r["family"] == family), key=lambda r: r["passes"])
        out[family] = {
            f"{level:g}dB": next((r["passes"] for r in rows if r["psnr_vs_paper"] >= level), None) for level in levels
        }
    return out


def main(argv=None):
    args = parse_args(argv)
    threads = set_threads(args.threads)
    crops_dir = os.path.join(args.work_dir, "train_crops")
    if args.teacher is None or len(args.students) < len(args.distill_ks):
        print(f"training crops: {write_training_crops(crops_dir, args)} in {crops_dir}")
    teacher_dir = args.teacher or train_teacher(args, crops_dir)
    student_dirs = {int(k): path for k, path in (item.split("=", 1) for item in args.students)}
    for k in args.distill_ks:
        if k not in student_dirs:
            student_dirs[k] = distil(args, crops_dir, teacher_dir, k)
    teacher = FlowMoPipeline.from_pretrained(teacher_dir)
    students = {k: FlowMoPipeline.from_pretrained(path) for k, path in student_dirs.items()}
    assert isinstance(teacher.scheduler, FlowMoScheduler)

    env = environment("cpu", threads)
    print(format_environment(env))
    results, reference = measure(args, teacher, students)
    levels = thresholds(results)
    headers = ["decoder", "passes", "s / image", "speed-up", "PSNR", "SSIM", "PSNR vs paper", "HF energy"]
    table = [[r["decoder"], r["passes"], f"{r['seconds_per_image'] * 1e3:.2f} ms", f"{r['speedup_vs_paper']:.1f}x",
              f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['psnr_vs_paper']:.2f}", f"{r['hf_energy_ratio']:.3f}"]
             for r in results]
    print(markdown_table(headers, table))
    print(f"\nheld-out images: {reference['num_eval_images']} tiles of {', '.join(HELD_OUT)}; paper sampler's two-seed "
          f"agreement: PSNR {reference['paper_two_seed_psnr']:.2f} dB, SSIM {reference['paper_two_seed_ssim']:.3f}")
    print(f"fewest passes reaching PSNR vs paper of 30 / 35 dB: {json.dumps(levels)}")
    record([dict(benchmark="fast_decoding", environment=env, teacher=teacher_dir, students=student_dirs,
                 arguments=vars(args), reference=reference, thresholds=levels, results=results)], args.output)
    print(f"recorded in {args.output}")


if __name__ == "__main__":
    main()
