#!/usr/bin/env python
"""Half precision: float16 and bfloat16 weights (`from_pretrained(..., torch_dtype=...)`) against float32 on the same
held-out photographs and noise.

    python benchmarks/benchmark_half_precision.py                       # train the small CPU FlowMo if needed, measure
    python benchmarks/benchmark_half_precision.py --pipeline DIR        # measure a saved pipeline
    python benchmarks/benchmark_half_precision.py --lo_shape_resolution 64   # also FlowMo-Lo-shaped, random weights

Method (recorded in benchmarks/RESULTS.md, section 7): the model is `benchmark_fast_decoding.py`'s small FlowMo
(trained through `examples/train_flowmo/train.py` on crops of 13 scikit-image photographs, cached in `--work_dir`),
evaluated on its held-out tiles (`chelsea`, `coffee`). For each dtype the pipeline is loaded with `torch_dtype`,
encodes the tiles (ids compared with float32's), reconstructs them and decodes float32's ids, both from the same
per-image noise with the paper sampler; outputs are compared with float32's (`metrics.agreement`: float PSNR, max
abs difference, non-finite values) and with the originals (PSNR / SSIM as FlowMo's evaluation computes them).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_fast_decoding as fast_decoding  # noqa: E402
from benchmark_utils import markdown_table, record  # noqa: E402

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler, get_preset_config  # noqa: E402
from flowmo_diffusers.metrics.agreement import id_agreement, output_agreement  # noqa: E402
from flowmo_diffusers.metrics.psnr import psnr_per_image  # noqa: E402
from flowmo_diffusers.metrics.ssim import ssim_per_image  # noqa: E402
from flowmo_diffusers.utils.validation import positive_int  # noqa: E402

REPO = fast_decoding.REPO
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fast_decoding.add_small_model_arguments(parser, "half_precision")
    parser.add_argument("--num_eval_images", type=positive_int, default=48)
    parser.add_argument("--lo_shape_resolution", type=int, default=0,
                        help="Also compare a randomly initialised FlowMo-Lo-shaped model at this size (0: skip).")
    parser.add_argument("--lo_shape_steps", type=int, default=2)
    return parser.parse_args(argv)


@torch.no_grad()
def compare_dtypes(load, images, noise, call) -> list:
    """One row per dtype: ids, reconstruction and decoding of float32's ids, against float32 and the originals."""
    outputs = {}
    for name, dtype in DTYPES.items():
        pipe = load(dtype)
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        ids = pipe.encode(images / 2 + 0.5)
        reconstruction = pipe(images=images / 2 + 0.5, latents=noise, output_type="pt", **call).images * 2 - 1
        seconds = time.perf_counter() - start
        reference_ids = outputs["fp32"]["ids"] if outputs else ids
        decoded = pipe(indices=reference_ids, latents=noise, output_type="pt", **call).images * 2 - 1
        outputs[name] = dict(ids=ids, reconstruction=reconstruction, decoded=decoded, seconds=seconds,
                             output_dtype=str(reconstruction.dtype), weights_dtype=str(pipe.autoencoder.dtype))
    reference = outputs["fp32"]
    rows = []
    for name, out in outputs.items():
        rows.append(dict(
            dtype=name, weights_dtype=out["weights_dtype"], output_dtype=out["output_dtype"],
            id_agreement=id_agreement(reference["ids"], out["ids"]),
            reconstruction_vs_fp32=output_agreement(reference["reconstruction"], out["reconstruction"]),
            decoding_vs_fp32=output_agreement(reference["decoded"], out["decoded"]),
            psnr=float(np.mean(psnr_per_image(images, out["reconstruction"]))),
            ssim=float(np.mean(ssim_per_image(images, out["reconstruction"]))),
            seconds_per_image=out["seconds"] / len(images),
        ))
    return rows


def lo_shaped(seed):
    """A FlowMo-Lo-shaped model in float32, random weights, every weight perturbed so that no gate is zero."""
    torch.manual_seed(seed)
    model = FlowMoModel(**get_preset_config("flowmo-lo")).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def print_rows(title, rows):
    headers = ["dtype", "ids = fp32", "recon PSNR vs fp32", "recon max |diff|", "decode PSNR vs fp32",
               "decode max |diff|", "non-finite", "PSNR", "SSIM", "s / image"]
    table = [[r["dtype"], f"{100 * r['id_agreement']:.2f} %", f"{r['reconstruction_vs_fp32']['psnr_db']:.2f} dB",
              f"{r['reconstruction_vs_fp32']['max_abs_diff']:.2e}", f"{r['decoding_vs_fp32']['psnr_db']:.2f} dB",
              f"{r['decoding_vs_fp32']['max_abs_diff']:.2e}",
              r["reconstruction_vs_fp32"]["nonfinite"] + r["decoding_vs_fp32"]["nonfinite"],
              f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['seconds_per_image']:.3f}"] for r in rows]
    print(f"\n{title}\n" + markdown_table(headers, table))


def main(argv=None):
    args = parse_args(argv)
    threads, env, folder = fast_decoding.start_small_model_run(args)
    eval_args = fast_decoding.parse_args(["--num_eval_images", str(args.num_eval_images)])
    images = fast_decoding.evaluation_images(eval_args)
    noise = fast_decoding.noise_for(len(images), images.shape[-1], args.seed)
    call = {} if args.num_inference_steps is None else dict(num_inference_steps=args.num_inference_steps)
    rows = compare_dtypes(lambda dtype: FlowMoPipeline.from_pretrained(folder, torch_dtype=dtype), images, noise, call)
    print_rows(f"small FlowMo ({folder}), {len(images)} held-out tiles of {', '.join(fast_decoding.HELD_OUT)}", rows)
    records = [dict(benchmark="half_precision", model=folder, environment=env, arguments=vars(args), rows=rows)]
    if args.lo_shape_resolution:
        size = args.lo_shape_resolution
        model = lo_shaped(args.seed)
        lo_images = torch.nn.functional.interpolate(images[:1], size=(size, size), mode="bilinear", antialias=True)
        lo_noise = fast_decoding.noise_for(1, size, args.seed)

        # Each dtype starts from the float32 weights (casting float16 -> bfloat16 would round twice).
        weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}

        def load(dtype):
            model.float().load_state_dict(weights)
            return FlowMoPipeline(autoencoder=model.to(dtype), scheduler=FlowMoScheduler())

        lo_rows = compare_dtypes(load, lo_images.clamp(-1, 1), lo_noise,
                                 dict(num_inference_steps=args.lo_shape_steps, height=size, width=size))
        print_rows(f"FlowMo-Lo-shaped, random weights, 1 image at {size}x{size}, {args.lo_shape_steps} steps", lo_rows)
        records.append(dict(benchmark="half_precision_flowmo_lo_shape", environment=env, arguments=vars(args),
                            resolution=size, rows=lo_rows))
    record(records, args.output)
    return records


if __name__ == "__main__":
    main()
