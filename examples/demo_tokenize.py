#!/usr/bin/env python
"""End-to-end demo of the API on CPU: convert an original-format checkpoint, tokenize photographs, decode the ids.

It uses the tiny parity checkpoint in tests/fixtures/original_tiny (random weights, 32x32 images), so it shows the
mechanics (shapes, ids, timings, files), not reconstruction quality.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as sample_images

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler
from flowmo_diffusers.conversion import convert_original_checkpoint, scheduler_config_from_original

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "original_tiny"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output_dir = Path(args.output_dir)

    dit_base = json.loads((FIXTURE / "dit_base.json").read_text())["dit_b_4"]
    model, source = convert_original_checkpoint(
        str(FIXTURE / "flowmo_tiny_original.pth"), original_config=FIXTURE / "config.yaml", dit_base=dit_base
    )
    scheduler = FlowMoScheduler(**scheduler_config_from_original(FIXTURE / "config.yaml"))
    pipe = FlowMoPipeline(autoencoder=model, scheduler=scheduler)
    pipe.save_pretrained(output_dir / "pipeline")
    print(f"converted the tiny original checkpoint ({source}) -> {output_dir / 'pipeline'}")

    size = model.config.sample_size
    photos = [sample_images.astronaut(), sample_images.coffee(), sample_images.chelsea(), sample_images.rocket()]
    images = [Image.fromarray(photo).resize((size, size), Image.BICUBIC) for photo in photos]

    start = time.perf_counter()
    ids = pipe.encode(images)
    print(f"encode: {len(images)} images -> ids {tuple(ids.shape)} {ids.dtype}, values in [0, {model.codebook_size})")
    print("first image's ids:", ids[0].tolist())
    decoded = pipe(indices=ids, generator=torch.Generator().manual_seed(args.seed)).images
    print(f"decode: 25 steps, guidance 1.5, {time.perf_counter() - start:.2f} s total")

    grid = np.concatenate(
        [np.concatenate([np.asarray(a), np.asarray(b)], axis=0) for a, b in zip(images, decoded)], axis=1
    )
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(output_dir / "grid.png")
    print(f"wrote {output_dir / 'grid.png'} (top: inputs, bottom: decoded from ids)")


if __name__ == "__main__":
    main()
