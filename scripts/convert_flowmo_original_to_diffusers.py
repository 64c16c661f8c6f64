#!/usr/bin/env python
"""Convert an original FlowMo checkpoint (flowmo_lo.pth, flowmo_hi.pth or a training run's .pth) to a FlowMoPipeline.

    python scripts/convert_flowmo_original_to_diffusers.py --checkpoint_path flowmo_lo.pth --preset flowmo-lo \
        --output_path flowmo-lo --dtype bf16

The .pth is read with torch.load(weights_only=True); the EMA weights are used when present; the pipeline folder holds
safetensors only.
"""

import argparse
import json

import torch

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler
from flowmo_diffusers.conversion import convert_original_checkpoint, scheduler_config_from_original

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="original .pth checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=["flowmo-lo", "flowmo-hi"], help="a released model's configuration")
    source.add_argument("--original_config", help="the config.yaml the original trainer wrote into its experiment folder")
    source.add_argument("--config", help="a FlowMoModel config.json")
    parser.add_argument(
        "--original_dit_base",
        help="JSON with the original's DIT_ZOO['dit_b_4'] entry, for forks that changed it (with --original_config)",
    )
    parser.add_argument("--output_path", required=True, help="folder to write the pipeline to")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype of the saved pipeline")
    parser.add_argument("--no_ema", action="store_true", help="use model_state_dict even when EMA weights exist")
    parser.add_argument("--push_to_hub", action="store_true", help="also upload the pipeline")
    parser.add_argument("--hub_model_id", help="repository id for --push_to_hub")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dit_base = None
    if args.original_dit_base:
        with open(args.original_dit_base, encoding="utf-8") as handle:
            dit_base = json.load(handle)
        dit_base = dit_base.get("dit_b_4", dit_base)
    config = None
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    model, source = convert_original_checkpoint(
        args.checkpoint_path,
        preset=args.preset,
        original_config=args.original_config,
        dit_base=dit_base,
        config=config,
        prefer_ema=not args.no_ema,
        dtype=DTYPES[args.dtype],
    )
    scheduler_config = scheduler_config_from_original(args.original_config) if args.original_config else {}
    pipeline = FlowMoPipeline(autoencoder=model, scheduler=FlowMoScheduler(**scheduler_config))
    pipeline.save_pretrained(args.output_path, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"converted {args.checkpoint_path} ({source}, {parameters / 1e6:.1f}M parameters, {args.dtype}) -> {args.output_path}")
    if args.push_to_hub:
        if not args.hub_model_id:
            raise SystemExit("--push_to_hub needs --hub_model_id")
        pipeline.push_to_hub(args.hub_model_id)


if __name__ == "__main__":
    main()
