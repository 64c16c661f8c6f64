#!/usr/bin/env python
"""Encode an image dataset with a FlowMo tokenizer into a `datasets` dataset of token ids and labels.

    accelerate launch examples/train_maskgit/pretokenize.py --pretrained_model_name_or_path DIR_OR_HUB_ID \
        --dataset_name ILSVRC/imagenet-1k --train_split train --flip --output_dir imagenet-flowmo-lo-tokens

Sharded across the launched processes; rerunning the same command resumes (finished chunks are kept). The result
is `OUTPUT_DIR/dataset` (`datasets.load_from_disk`) with `tokenization.json` and `codebook_statistics.json`, optionally pushed to the Hub as a
dataset. The work is in `flowmo_diffusers.training.pretokenize`; see examples/train_maskgit/README.md.
"""

import argparse
import logging
import os

from accelerate import Accelerator
from accelerate.logging import get_logger

from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.data import load_image_dataset
from flowmo_diffusers.training.pretokenize import (
    CHUNKS_FOLDER,
    CODEBOOK_STATISTICS_NAME,
    TOKENIZATION_INFO_NAME,
    TokenizationInfo,
    assemble_token_dataset,
    check_manifest,
    chunk_statistics,
    dataset_num_classes,
    pretokenize,
    write_token_codebook_statistics,
)
from flowmo_diffusers.utils.output_lock import lock_output_dir

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Pre-tokenize an image dataset with a FlowMo tokenizer.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="FlowMoPipeline folder or Hub id.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--dataset_name", type=str, default=None, help="datasets Hub id or local dataset path.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None,
                        help="Image folder (class sub-folders give labels). Neither flag: the embedded photographs.")
    parser.add_argument("--train_split", type=str, default="train")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("--image_column", type=str, default=None)
    parser.add_argument("--label_column", type=str, default=None)
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=None, help="Center-crop side (default: the tokenizer's).")
    parser.add_argument("--flip", action="store_true", help="Also store the ids of the mirrored crop (augmentation).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per encoder call and process.")
    parser.add_argument("--chunk_size", type=int, default=10_000, help="Source rows per chunk file (resume unit).")
    parser.add_argument("--max_samples", type=int, default=None, help="Only the first N rows (per process if streaming).")
    parser.add_argument("--dataloader_num_workers", type=int, default=4)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                        help="Autocast for the encoder. 'no' (fp32) keeps the ids identical to a plain encode().")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the dataset (repo type 'dataset').")
    parser.add_argument("--hub_dataset_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)
    parser.add_argument("--private", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    lock_output_dir(args.output_dir, accelerator, purpose="pre-tokenization", log=logger.warning)
    autoencoder = FlowMoPipeline.from_pretrained(
        args.pretrained_model_name_or_path, cache_dir=args.cache_dir, revision=args.revision, token=args.hub_token
    ).autoencoder.to(accelerator.device).eval()
    dataset = load_image_dataset(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        split=args.train_split, streaming=args.streaming, image_column=args.image_column,
        label_column=args.label_column, cache_dir=args.cache_dir, token=args.hub_token,
    )
    resolution = args.resolution or autoencoder.config.sample_size
    settings = dict(
        tokenizer=args.pretrained_model_name_or_path, revision=args.revision, source=[args.dataset_name,
        args.dataset_config_name, args.train_data_dir, args.train_split], resolution=resolution, flip=args.flip,
        chunk_size=args.chunk_size, mixed_precision=args.mixed_precision, streaming=args.streaming,
        max_samples=args.max_samples,
    )
    if args.streaming:
        settings["num_processes"] = accelerator.num_processes  # stream positions depend on the split
    if accelerator.is_main_process:
        check_manifest(args.output_dir, settings)
    accelerator.wait_for_everyone()

    summary = pretokenize(
        autoencoder, dataset, args.output_dir, resolution=resolution, batch_size=args.batch_size,
        chunk_size=args.chunk_size, flip=args.flip, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, num_workers=0 if args.streaming else args.dataloader_num_workers,
        autocast=accelerator.autocast, max_samples=args.max_samples,
        show_progress=True,
    )
    logger.info(f"process {accelerator.process_index}: {summary}", main_process_only=False)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        num_classes, class_names = dataset_num_classes(dataset)
        info = TokenizationInfo(
            tokenizer=args.pretrained_model_name_or_path, num_indices=autoencoder.num_indices,
            codebook_size=autoencoder.codebook_size, resolution=resolution, flip=args.flip, num_classes=num_classes,
            streaming=args.streaming, num_processes=accelerator.num_processes, class_names=class_names,
        )
        tokens = assemble_token_dataset(args.output_dir, info)
        totals = chunk_statistics(args.output_dir)
        logger.info(
            f"{len(tokens)} images tokenized ({totals['num_skipped']} undecodable images skipped) -> "
            f"{os.path.join(args.output_dir, 'dataset')}; chunks kept in {os.path.join(args.output_dir, CHUNKS_FOLDER)}"
        )
    # Every process leaves together before the main one counts and pushes: collectives this late in the run left
    # gloo (torch 2.5) hanging in destroy_process_group, so the main process counts the assembled ids alone, after
    # the process group is gone (reading them is cheap beside tokenizing them).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        statistics = write_token_codebook_statistics(args.output_dir)
        if statistics is not None:
            logger.info(
                f"codebook usage {statistics['codebook_usage']:.4f}, entropy {statistics['codebook_entropy_bits']:.3f} "
                f"of {statistics['codebook_bits_per_id']} bits, perplexity {statistics['codebook_perplexity']:.1f} "
                f"-> {os.path.join(args.output_dir, 'dataset', CODEBOOK_STATISTICS_NAME)}"
            )
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_file

            repo_id = create_repo(
                args.hub_dataset_id or os.path.basename(os.path.normpath(args.output_dir)), repo_type="dataset",
                exist_ok=True, private=args.private, token=args.hub_token,
            ).repo_id
            tokens.push_to_hub(repo_id, token=args.hub_token, private=args.private)
            for name in (TOKENIZATION_INFO_NAME, CODEBOOK_STATISTICS_NAME):
                if os.path.exists(os.path.join(args.output_dir, "dataset", name)):
                    upload_file(
                        path_or_fileobj=os.path.join(args.output_dir, "dataset", name),
                        path_in_repo=name, repo_id=repo_id, repo_type="dataset", token=args.hub_token,
                    )
            logger.info(f"Pushed to https://huggingface.co/datasets/{repo_id}")


if __name__ == "__main__":
    main()
