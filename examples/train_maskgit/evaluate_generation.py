#!/usr/bin/env python
"""gFID and Inception Score of generated images, or reference statistics of real images.

    # reference statistics of real images (or use ADM's VIRTUAL_imagenet256_labeled.npz for ImageNet 256)
    accelerate launch examples/train_maskgit/evaluate_generation.py \
        --compute_reference_statistics stats/imagenet256_train.npz \
        --dataset_name ILSVRC/imagenet-1k --dataset_split train --streaming --resolution 256

    # a folder (or .npz) written by sample.py
    accelerate launch examples/train_maskgit/evaluate_generation.py \
        --samples samples/maskgit-flowmo-lo --reference_statistics VIRTUAL_imagenet256_labeled.npz \
        --output_dir eval/maskgit-flowmo-lo

The logic lives in `flowmo_diffusers.evaluation.generation`.
"""

from flowmo_diffusers.evaluation.generation import main

if __name__ == "__main__":
    main()
