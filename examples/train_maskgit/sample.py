#!/usr/bin/env python
"""Sample class-conditional images from a FlowMo MaskGiT prior into a folder of PNGs (for gFID / IS).

    accelerate launch examples/train_maskgit/sample.py \
        --pretrained_model_name_or_path maskgit-flowmo-lo \
        --num_images_per_class 50 --batch_size 64 --mixed_precision bf16 \
        --output_dir samples/maskgit-flowmo-lo --npz_path samples/maskgit-flowmo-lo.npz

Deterministic (image j of class c comes from seed (--seed, c, j), whatever the number of processes) and
resumable (run the same command again: complete batches are skipped). The logic lives in
`flowmo_diffusers.evaluation.sampling`.
"""

from flowmo_diffusers.evaluation.sampling import main

if __name__ == "__main__":
    main()
