#!/usr/bin/env python
"""The first look: how well the offline main job's model reconstructs photographs it never saw.

    accelerate launch examples/train_flowmo/train.py          # the main job (README Quickstart command 1)
    python benchmarks/benchmark_first_look.py                  # measure outputs/train_flowmo
    python benchmarks/benchmark_first_look.py --model DIR --train_log LOG --output benchmarks/results/first_look.jsonl

Method (recorded in benchmarks/RESULTS.md, "First look"): the held-out photographs of the main job
(`flowmo_diffusers.data.DEMO_HELD_OUT_IMAGES`, never trained on) are center-cropped and resized to the model's
resolution exactly as its validation batch is (`build_eval_dataloader`), encoded once, and decoded by each decoder of
`--decoders` from the same noise (seed 0): `STEPSxGUIDANCE`, where `25x1.5` is the paper sampler (the power grid,
guidance inside the EDM interval) and `1x1` the one-pass decoder (at t = 1 it returns the decoder's mean image given
the code). Per decoder: PSNR and SSIM of each image (scikit-image with FlowMo's uint8 conversion) and their means.
With `--train_log` (the main job's output) the run's steps and seconds are read from its last progress-bar line and
stored beside the figures. `--figure PATH` writes, for the first decoder, the originals over the reconstructions.
"""

import argparse
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_utils import environment, format_environment, markdown_table, record, set_threads  # noqa: E402

from flowmo_diffusers import FlowMoPipeline  # noqa: E402
from flowmo_diffusers.data import DEMO_HELD_OUT_IMAGES, build_eval_dataloader, load_demo_image_datasets, take_images  # noqa: E402
from flowmo_diffusers.metrics.psnr import psnr_per_image  # noqa: E402
from flowmo_diffusers.metrics.ssim import ssim_per_image  # noqa: E402
from flowmo_diffusers.training.reporting import validation_grid  # noqa: E402


def parse_decoder(text: str) -> tuple[int, float]:
    """`"25x1.5"` -> (25, 1.5): sampler steps and guidance scale."""
    match = re.fullmatch(r"(\d+)x(\d+(?:\.\d*)?)", text)
    if not match or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"a decoder is STEPSxGUIDANCE such as 25x1.5 or 1x1, got {text!r}")
    return int(match.group(1)), float(match.group(2))


def training_time(log_path: str) -> dict:
    """Steps and seconds of the last tqdm line (`Steps: 100%|...| 1200/1200 [03:58<00:00, ...`) of a training log."""
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    found = re.findall(r"Steps:[^|]*\|[^|]*\|\s*(\d+)/(\d+) \[(?:(\d+):)?(\d+):(\d+)<", text)
    if not found:
        raise ValueError(f"{log_path}: no 'Steps: ... N/M [MM:SS<' progress line found")
    done, total, hours, minutes, seconds = found[-1]
    return {"steps": int(done), "max_train_steps": int(total),
            "train_loop_s": int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/train_flowmo", help="FlowMoPipeline folder (the main job's).")
    parser.add_argument("--decoders", nargs="+", type=parse_decoder, default=[(25, 1.5), (4, 1.0), (1, 1.0)],
                        help="STEPSxGUIDANCE decoders (default: 25x1.5 4x1 1x1).")
    parser.add_argument("--train_log", default=None, help="The main job's log: its steps and seconds are recorded.")
    parser.add_argument("--figure", default=None, help="Write originals over the first decoder's reconstructions.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="Append the rows to this JSON-lines file.")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)

    pipeline = FlowMoPipeline.from_pretrained(args.model)
    model = pipeline.autoencoder.eval()
    resolution = model.config.sample_size
    _, held_out = load_demo_image_datasets()
    images = take_images(build_eval_dataloader(held_out, resolution, len(held_out)), len(held_out))["pixel_values"]
    with torch.no_grad():
        code = model.encode(images).code
    run = training_time(args.train_log) if args.train_log else {}
    rows, table = [], []
    for steps, guidance in args.decoders:
        with torch.no_grad():
            decoded = model.decode(code, num_inference_steps=steps, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(0), scheduler=pipeline.scheduler).sample
        psnr, ssim = psnr_per_image(images, decoded), ssim_per_image(images, decoded)
        row = {"measurement": "first_look", "model": os.path.abspath(args.model), "resolution": resolution,
               "bits_per_pixel": model.bits_per_pixel, "decoder": f"{steps}x{guidance:g}",
               "images": list(DEMO_HELD_OUT_IMAGES), "psnr": [float(v) for v in psnr], "ssim": [float(v) for v in ssim],
               "psnr_mean": float(np.mean(psnr)), "ssim_mean": float(np.mean(ssim)), **run}
        rows.append(row)
        table.append([row["decoder"], f"{row['psnr_mean']:.2f}", f"{row['ssim_mean']:.3f}",
                      ", ".join(f"{name} {p:.2f} / {s:.3f}" for name, p, s in zip(DEMO_HELD_OUT_IMAGES, psnr, ssim))])
        if args.figure and len(rows) == 1:
            validation_grid([images, decoded]).save(args.figure)
    env = environment("cpu", threads)
    print(format_environment(env))
    if run:
        print(f"training: {run['steps']} steps in {run['train_loop_s']} s (training loop)")
    print(markdown_table(["decoder (steps x guidance)", "PSNR dB", "SSIM", "per image (PSNR / SSIM)"], table))
    record([dict(row, environment=env) for row in rows], args.output)
    return rows


if __name__ == "__main__":
    main()
