#!/usr/bin/env python
"""Several reconstructions of each image and their per-pixel variance (FlowMo's "multimodal reconstruction", the
paper's Figure 8), written as one PNG: for each photograph, the input, `--num_samples` reconstructions (each from its
own seeded noise) and the variance map (brighter = the samples disagree more).

    accelerate launch examples/train_flowmo/train.py          # the offline main job: flowmo-demo, ~4-5 minutes
    python examples/multimodal_reconstruction.py --pretrained_model_name_or_path outputs/train_flowmo

The photographs are the main job's held-out ones (`DEMO_HELD_OUT_IMAGES`, never trained on), then the others of the
embedded set when `--num_images` asks for more.

Any FlowMoPipeline folder or Hub id works (e.g. a converted `flowmo-lo` with `--resolution 256`).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.data import ImageTransform, load_demo_image_datasets
from flowmo_diffusers.pipelines import per_pixel_variance


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default="outputs/train_flowmo")
    parser.add_argument("--num_images", type=int, default=2,
                        help="photographs: the held-out ones first, then the training ones")
    parser.add_argument("--num_samples", type=int, default=4, help="reconstructions per photograph")
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the figure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="outputs/multimodal_reconstruction.png")
    args = parser.parse_args()

    pipe = FlowMoPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    size = args.resolution or pipe.autoencoder.config.sample_size
    transform = ImageTransform(size, random_crop=False)
    training, held_out = load_demo_image_datasets()
    photos = (list(held_out["image"]) + list(training["image"]))[: args.num_images]
    images = torch.stack([transform(photo) for photo in photos]) / 2 + 0.5  # [0, 1]

    # One generator per reconstruction: sample k of photograph i is seeded by seed + i * num_samples + k.
    generators = [torch.Generator().manual_seed(args.seed + k) for k in range(args.num_images * args.num_samples)]
    samples = pipe(images=images, num_images_per_prompt=args.num_samples, generator=generators, output_type="np").images
    variance = per_pixel_variance(samples, args.num_samples)  # (num_images, H, W)

    rows = []
    for i in range(args.num_images):
        heat = variance[i] / max(float(variance.max()), 1e-12)  # one scale for the whole figure
        tiles = [images[i].permute(1, 2, 0).numpy()]
        tiles += list(samples[i * args.num_samples : (i + 1) * args.num_samples])
        tiles += [np.repeat(heat[..., None], 3, axis=-1)]
        rows.append(np.concatenate(tiles, axis=1))
    grid = (np.concatenate(rows, axis=0).clip(0, 1) * 255).round().astype(np.uint8)
    figure = Image.fromarray(grid)
    figure = figure.resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.NEAREST)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output)
    print(f"wrote {args.output}: per row the input, {args.num_samples} reconstructions, their per-pixel variance "
          f"(max {float(variance.max()):.4f}, mean {float(variance.mean()):.4f})")


if __name__ == "__main__":
    main()
