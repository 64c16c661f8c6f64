#!/usr/bin/env python
"""Tiling: held-out photographs larger than a tile, reconstructed tile by tile without overlap and with blended
overlaps: PSNR / SSIM against the originals and a seam score.

    python benchmarks/benchmark_tiling.py                    # train the small CPU FlowMo if needed, measure
    python benchmarks/benchmark_tiling.py --pipeline DIR     # measure a saved pipeline

Method (recorded in benchmarks/RESULTS.md, section 8): the model is `benchmark_fast_decoding.py`'s small FlowMo
(32x32 tiles, trained through `examples/train_flowmo/train.py` on crops of 13 scikit-image photographs, cached in
`--work_dir`). The held-out photographs `chelsea` and `coffee`, downscaled 2x, are cropped to whole tiles (224x128
and 288x192) so that the no-overlap grid is exact. Each layout reconstructs every photograph with
`pipe.enable_tiling(...)` from the same full-image noise (the paper sampler): "no overlap" decodes each tile alone
(`tile_overlap_factor=0`), the others blend overlapping tiles. Seam score: `metrics.seams.seam_ratio` at the layout's
own tile borders, over the same ratio of the original at those borders (1: no seam). The figure puts a crop of the
original beside the same crop of the no-overlap and the blended reconstruction.
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_fast_decoding as fast_decoding  # noqa: E402
from benchmark_utils import markdown_table, record  # noqa: E402

from flowmo_diffusers import FlowMoPipeline  # noqa: E402
from flowmo_diffusers.metrics.psnr import psnr_per_image  # noqa: E402
from flowmo_diffusers.metrics.seams import seam_ratio  # noqa: E402
from flowmo_diffusers.metrics.ssim import ssim_per_image  # noqa: E402
from flowmo_diffusers.utils.validation import positive_int  # noqa: E402

REPO = fast_decoding.REPO
#: (name, tile_overlap_factor, blend_mode): the layouts compared.
LAYOUTS = (("no overlap (each tile alone)", 0.0, "linear"), ("overlap 0.25, linear blend", 0.25, "linear"),
           ("overlap 0.25, cosine blend", 0.25, "cosine"), ("overlap 0.5, linear blend", 0.5, "linear"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fast_decoding.add_small_model_arguments(parser, "tiling")
    parser.add_argument("--downscale", type=positive_int, default=2)
    parser.add_argument("--figure", default=os.path.join(REPO, "docs", "images", "tiling.png"),
                        help="Where to write the crops figure ('' to skip).")
    return parser.parse_args(argv)


def held_out_photographs(downscale: int, tile: int) -> dict:
    """The held-out photographs as `(1, 3, H, W)` in [-1, 1], cropped to whole tiles."""
    photos = {}
    for name in fast_decoding.HELD_OUT:
        photo = np.asarray(fast_decoding.load_photo(name, downscale))
        height, width = (photo.shape[0] // tile) * tile, (photo.shape[1] // tile) * tile
        if not height or not width:
            raise ValueError(f"{name} downscaled {downscale}x is smaller than one {tile}x{tile} tile")
        photos[name] = torch.from_numpy(photo[:height, :width].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    return photos


@torch.no_grad()
def measure(pipe, photos, args):
    call = {} if args.num_inference_steps is None else dict(num_inference_steps=args.num_inference_steps)
    rows, outputs = [], {}
    for name, overlap, mode in LAYOUTS:
        pipe.enable_tiling(tile_overlap_factor=overlap, blend_mode=mode)
        per_photo = []
        for photo_name, photo in photos.items():
            noise = fast_decoding.noise_for(1, max(photo.shape[-2:]), args.seed)[..., : photo.shape[-2], : photo.shape[-1]]
            decoded = pipe(images=photo / 2 + 0.5, latents=noise, output_type="pt", **call).images * 2 - 1
            outputs[(name, photo_name)] = decoded
            grid = pipe.autoencoder.tile_grid(*photo.shape[-2:])
            borders = grid.borders()
            per_photo.append(dict(
                photo=photo_name, size=list(photo.shape[-2:]), tiles=grid.num_tiles,
                psnr=float(psnr_per_image(photo, decoded)[0]), ssim=float(ssim_per_image(photo, decoded)[0]),
                seam_ratio=seam_ratio(decoded, *borders), original_seam_ratio=seam_ratio(photo, *borders),
            ))
        for item in per_photo:
            item["seam_score"] = item["seam_ratio"] / item["original_seam_ratio"]
        rows.append(dict(layout=name, overlap_factor=overlap, blend_mode=mode, photos=per_photo,
                         psnr=float(np.mean([p["psnr"] for p in per_photo])),
                         ssim=float(np.mean([p["ssim"] for p in per_photo])),
                         seam_score=float(np.mean([p["seam_score"] for p in per_photo])),
                         tiles=sum(p["tiles"] for p in per_photo)))
    pipe.disable_tiling()
    return rows, outputs


def write_figure(path, photos, outputs, tile):
    """Original / no overlap / blended crops (around a tile corner of the first photograph), 4x nearest upscaled."""
    photo_name = next(iter(photos))
    photo = photos[photo_name]
    size, top, left = 2 * tile, tile // 2 + tile, tile // 2 + 2 * tile
    top, left = min(top, photo.shape[-2] - size), min(left, photo.shape[-1] - size)
    panels = [("original", photo), ("no overlap", outputs[(LAYOUTS[0][0], photo_name)]),
              ("overlap 0.25, blended", outputs[(LAYOUTS[1][0], photo_name)])]
    scale, label_height, gap = 4, 18, 6
    canvas = Image.new("RGB", (len(panels) * (size * scale + gap) - gap, size * scale + label_height), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the bitmap font only
        font = ImageFont.load_default()
    for index, (label, image) in enumerate(panels):
        crop = ((image[0, :, top : top + size, left : left + size].clamp(-1, 1) + 1) * 127.5).round().byte()
        panel = Image.fromarray(crop.permute(1, 2, 0).numpy()).resize((size * scale, size * scale), Image.NEAREST)
        x = index * (size * scale + gap)
        canvas.paste(panel, (x, label_height))
        draw.text((x + 2, 1), label, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return dict(photo=photo_name, top=top, left=left, size=size)


def main(argv=None):
    args = parse_args(argv)
    threads, env, folder = fast_decoding.start_small_model_run(args)
    pipe = FlowMoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    tile = pipe.autoencoder.config.sample_size
    photos = held_out_photographs(args.downscale, tile)
    rows, outputs = measure(pipe, photos, args)
    headers = ["layout", "tiles", "PSNR (dB)", "SSIM", "seam score"] + [f"seam score {name}" for name in photos]
    table = [[r["layout"], r["tiles"], f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['seam_score']:.2f}"]
             + [f"{p['seam_score']:.2f}" for p in r["photos"]] for r in rows]
    sizes = ", ".join(f"{name} {p.shape[-2]}x{p.shape[-1]}" for name, p in photos.items())
    print(f"\nheld-out photographs ({sizes}), {tile}x{tile} tiles, model {folder}\n" + markdown_table(headers, table))
    figure = write_figure(args.figure, photos, outputs, tile) if args.figure else None
    if figure:
        print(f"figure: {args.figure} ({figure})")
    record([dict(benchmark="tiling", model=folder, environment=env, arguments=vars(args), rows=rows, figure=figure)],
           args.output)
    return rows


if __name__ == "__main__":
    main()
