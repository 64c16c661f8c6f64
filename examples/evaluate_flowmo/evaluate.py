#!/usr/bin/env python
"""Evaluate FlowMo tokenizers: rFID, PSNR, SSIM and LPIPS of their reconstructions, with a report.

    accelerate launch examples/evaluate_flowmo/evaluate.py \
        --pretrained_model_name_or_path flowmo-lo flowmo-hi \
        --dataset_name ILSVRC/imagenet-1k --dataset_split validation --streaming \
        --mixed_precision bf16 --output_dir eval/flowmo

See README.md next to this file. The logic lives in `flowmo_diffusers.evaluation.reconstruction`.
"""

from flowmo_diffusers.evaluation.reconstruction import main

if __name__ == "__main__":
    main()
