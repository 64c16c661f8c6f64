#!/usr/bin/env python
"""Train a class-conditional MaskGiT prior on pre-tokenized FlowMo ids with Accelerate.

    accelerate launch examples/train_maskgit/pretokenize.py --pretrained_model_name_or_path TOKENIZER ... --output_dir TOKENS
    accelerate launch examples/train_maskgit/train.py --pretrained_model_name_or_path TOKENIZER --train_dataset TOKENS \
        --max_train_steps 500000 --output_dir maskgit-flowmo-lo

The recipe (TiTok's MaskGiT generator, bytedance/1d-tokenizer `configs/training/generator/maskgit.yaml`): masked-token
cross-entropy with label smoothing 0.1, 10% class dropout, AdamW (2e-4, betas 0.9/0.96, weight decay 0.03), 10k warm-up
steps then cosine decay to 1e-5, gradient clipping at 1, EMA. The loss is `flowmo_diffusers.training.maskgit`; this
script holds arguments, the loop and logging. See examples/train_maskgit/README.md.
"""

import argparse
import json
import logging
import os
import shlex
import sys
import time

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import get_scheduler

from flowmo_diffusers import FlowMoMaskGiTPipeline, FlowMoMaskGiTTransformer, FlowMoPipeline, MaskGiTScheduler
from flowmo_diffusers.models.presets import MASKGIT_PRESETS, resolve_model_config
from flowmo_diffusers.training.arguments import add_training_run_arguments
from flowmo_diffusers.training.checkpoint_folders import remove_stale_temporary_checkpoints, resolve_resume_checkpoint
from flowmo_diffusers.training.checkpointing import load_checkpoint, save_checkpoint
from flowmo_diffusers.training.maskgit import maskgit_training_step
from flowmo_diffusers.training.pretokenize import check_token_dataset, load_token_dataset
from flowmo_diffusers.training.divergence import DivergenceGuard, check_finite_weights, inject_debug_nonfinite, synchronize_step
from flowmo_diffusers.training.preemption import PreemptionGuard, clear_preempted_marker
from flowmo_diffusers.training.recipe import TrainingProgress
from flowmo_diffusers.utils.validation import positive_int
from flowmo_diffusers.training.reporting import validation_grid, write_model_card
from flowmo_diffusers.utils.output_lock import LOCK_FILES_PATTERN, lock_output_dir
from flowmo_diffusers.utils.seeds import seeded_generator

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a class-conditional MaskGiT prior on FlowMo token ids.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="The FlowMoPipeline (folder or Hub id) that tokenized the data; it decodes the samples.")
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--train_dataset", type=str, required=True,
                        help="pretokenize.py output folder, a datasets save_to_disk folder, or a Hub dataset id.")
    parser.add_argument("--train_split", type=str, default="train", help="Split of a Hub dataset.")
    parser.add_argument("--model_config", type=str, default="maskgit-flowmo-lo",
                        help=f"Preset ({', '.join(sorted(MASKGIT_PRESETS))}) or a FlowMoMaskGiTTransformer config.json. "
                        "num_indices and codebook_size always follow the tokenizer.")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="Default: from the token dataset (tokenization.json), else the config's.")
    parser.add_argument("--masking_schedule", choices=("cosine", "arccos", "linear"), default="arccos",
                        help="Masking schedule for training and sampling (TiTok: arccos).")
    parser.add_argument("--output_dir", type=str, default="outputs/train_maskgit")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train_batch_size", type=positive_int, default=64,
                        help="Micro-batch per device (TiTok: 64 x 32 GPUs).")
    parser.add_argument("--max_train_steps", type=positive_int, required=True)
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--dataloader_num_workers", type=int, default=2)
    parser.add_argument("--no_flip", action="store_true", help="Ignore `indices_flipped` even when the data has it.")
    # Optimization
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--scale_lr", action="store_true",
                        help="Multiply the learning rate by global batch / 2048 (TiTok's batch).")
    parser.add_argument("--lr_scheduler", type=str, default="cosine_with_min_lr",
                        help="A transformers scheduler name (cosine_with_min_lr, cosine, linear, constant_with_warmup).")
    parser.add_argument("--lr_warmup_steps", type=int, default=10_000)
    parser.add_argument("--lr_min", type=float, default=1e-5, help="Final learning rate of cosine_with_min_lr.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.96)
    parser.add_argument("--adam_weight_decay", type=float, default=0.03)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--class_dropout", type=float, default=0.1, help="Share of labels replaced by the null class.")
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    # Checkpoints, validation, logging
    add_training_run_arguments(parser, checkpointing_steps=10_000, tracker_project_name="train_maskgit")
    parser.add_argument("--validation_steps", type=positive_int, default=5000)
    parser.add_argument("--validation_class_ids", type=int, nargs="+", default=None,
                        help="Classes drawn in the validation grid (default: 8 spread over the classes).")
    parser.add_argument("--validation_inference_steps", type=int, default=16)
    parser.add_argument("--validation_guidance_scale", type=float, default=3.0)
    parser.add_argument("--validation_decoder_inference_steps", type=int, default=25)
    args = parser.parse_args(argv)
    return args


def load_components(args, num_classes_from_data):
    """(tokenizer pipeline, transformer, scheduler): the transformer config follows the tokenizer's token format."""
    tokenizer = FlowMoPipeline.from_pretrained(
        args.pretrained_model_name_or_path, cache_dir=args.cache_dir, revision=args.revision, token=args.hub_token
    )
    config = resolve_model_config(args.model_config, FlowMoMaskGiTTransformer, family="MaskGiT")
    config.update(num_indices=tokenizer.autoencoder.num_indices, codebook_size=tokenizer.autoencoder.codebook_size)
    num_classes = args.num_classes or num_classes_from_data
    if num_classes:
        config["num_classes"] = num_classes
    transformer = FlowMoMaskGiTTransformer.from_config(config)
    scheduler = MaskGiTScheduler(mask_token_id=transformer.mask_token_id, masking_schedule=args.masking_schedule)
    return tokenizer, transformer, scheduler


class TokenBatches(torch.utils.data.Dataset):
    """Rows of a token dataset -> `{"indices", ["indices_flipped"], "label"}` int64 tensors (torch formatting)."""

    def __init__(self, dataset, use_flip: bool):
        self.columns = ["indices", "label"] + (["indices_flipped"] if use_flip else [])
        self.dataset = dataset.with_format("torch", columns=self.columns)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        row = self.dataset[index]
        return {key: value.long() for key, value in row.items()}


def main(argv=None):
    args = parse_args(argv)
    command = "accelerate launch " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # The epoch's permutation is a function of (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    diffusers.utils.logging.set_verbosity_warning() if accelerator.is_local_main_process else diffusers.utils.logging.set_verbosity_error()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    lock = lock_output_dir(args.output_dir, accelerator, purpose="MaskGiT training", log=logger.warning)
    if accelerator.is_main_process:
        for path in remove_stale_temporary_checkpoints(args.output_dir, lock):
            logger.warning(f"Removed the incomplete checkpoint {path} left by an interrupted save")
        clear_preempted_marker(args.output_dir)

    dataset, info = load_token_dataset(args.train_dataset, split=args.train_split, cache_dir=args.cache_dir, token=args.hub_token)
    set_seed(args.seed)  # same initial weights on every process
    tokenizer, transformer, scheduler = load_components(args, info.num_classes if info else None)
    if info is not None and info.tokenizer != args.pretrained_model_name_or_path:
        logger.warning(f"The data were tokenized by {info.tokenizer!r}, the samples will be decoded by "
                       f"{args.pretrained_model_name_or_path!r}: make sure they are the same tokenizer.")
    check_token_dataset(dataset, transformer.config.num_indices, transformer.config.codebook_size, transformer.config.num_classes)
    use_flip = "indices_flipped" in dataset.column_names and not args.no_flip
    autoencoder = tokenizer.autoencoder.to(accelerator.device).eval().requires_grad_(False)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    learning_rate = args.learning_rate * (global_batch / 2048 if args.scale_lr else 1.0)
    # No weight decay on biases, norms and embeddings' null/mask rows is TiTok's choice too; here: on 1-D tensors.
    decay = [p for p in transformer.parameters() if p.ndim >= 2]
    no_decay = [p for p in transformer.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.adam_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
    )
    # Accelerate steps a prepared scheduler once per process per optimizer step (diffusers examples scale the same way).
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=min(args.lr_warmup_steps, args.max_train_steps) * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        scheduler_specific_kwargs={"min_lr": args.lr_min} if args.lr_scheduler == "cosine_with_min_lr" else None,
    )
    loader = torch.utils.data.DataLoader(
        TokenBatches(dataset, use_flip), batch_size=args.train_batch_size, shuffle=True, drop_last=True,
        num_workers=args.dataloader_num_workers, pin_memory=accelerator.device.type == "cuda",
    )
    transformer, optimizer, loader, lr_scheduler = accelerator.prepare(transformer, optimizer, loader, lr_scheduler)
    if len(loader) == 0:
        raise ValueError(
            f"{len(dataset)} sequences give no full batch of {args.train_batch_size} per process on "
            f"{accelerator.num_processes} processes; lower --train_batch_size"
        )
    model = accelerator.unwrap_model(transformer)

    progress = TrainingProgress()
    divergence_guard = DivergenceGuard(args.max_skipped_steps, output_dir=args.output_dir, log=logger.warning)
    states = {"progress": progress}  # saved as JSON + safetensors with every checkpoint
    ema = None
    if args.use_ema:
        ema = EMAModel(model.parameters(), decay=args.ema_decay, foreach=True)
        ema.to(accelerator.device)
        states["ema"] = ema
    if resume:
        logger.info(f"Resuming from {resume[1]}")
        load_checkpoint(accelerator, resume[1], states, flags={"ema": "--use_ema"})
        if ema is not None:
            ema.to(accelerator.device)
        if progress.global_step != resume[0]:
            raise RuntimeError(f"{resume[1]} holds step {progress.global_step}, its name says {resume[0]}")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run")

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name,
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    num_classes = model.config.num_classes
    validation_classes = args.validation_class_ids or sorted({int(i * num_classes / 8) for i in range(8)})

    def run_validation(step, final=False):
        """Sample the validation classes with the live (and EMA) weights into a grid (main process only)."""
        rows = []
        weights = [("live", None)] + ([("ema", ema)] if ema is not None and not final else [])
        was_training = model.training
        model.eval()
        for name, averaged in weights:
            if averaged is not None:
                averaged.store(model.parameters())
                averaged.copy_to(model.parameters())
            pipeline = FlowMoMaskGiTPipeline(transformer=model, scheduler=scheduler, autoencoder=autoencoder,
                                             decoder_scheduler=tokenizer.scheduler)
            pipeline.set_progress_bar_config(disable=True)
            with accelerator.autocast():
                images = pipeline(
                    validation_classes, num_inference_steps=args.validation_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    decoder_num_inference_steps=args.validation_decoder_inference_steps,
                    generator=torch.Generator(accelerator.device).manual_seed(args.seed), output_type="pt",
                ).images
            rows.append(images.float())
            if averaged is not None:
                averaged.restore(model.parameters())
        model.train(was_training)
        grid = validation_grid(rows, value_range=(0.0, 1.0))  # the pipeline's output, drawn as it is
        name = "samples.png" if final else os.path.join("validation", f"step-{step:08d}.png")
        os.makedirs(os.path.dirname(os.path.join(args.output_dir, name)), exist_ok=True)
        grid.save(os.path.join(args.output_dir, name))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation/samples": wandb.Image(grid, caption=f"classes {validation_classes}")}, step=step)
        return name

    def checkpoint(step):
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, log=logger.info, states=states)

    logger.info("***** Running MaskGiT training *****")
    logger.info(f"  {len(dataset)} sequences of {model.config.num_indices} ids < {model.config.codebook_size}, "
                f"{num_classes} classes, flip augmentation: {use_flip}")
    logger.info(f"  Parameters = {sum(p.numel() for p in model.parameters()):,}, micro-batch = {args.train_batch_size}, "
                f"global batch = {global_batch}, steps = {args.max_train_steps}, lr = {learning_rate}")

    global_step = progress.global_step
    batches_per_epoch = len(loader)
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    def batches():
        """Micro-batches from where the run stands (`progress.batches_consumed`), epoch after epoch."""
        epoch, offset = divmod(progress.batches_consumed, batches_per_epoch)
        while True:
            loader.set_epoch(epoch)
            yield from (accelerator.skip_first_batches(loader, offset) if offset else loader)
            epoch, offset = epoch + 1, 0

    running, logs = {"loss": 0.0, "accuracy": 0.0}, {}
    tic = time.time()
    # Installed for the rest of the process: a signal during the final save is only a flag (docs/cluster.md).
    preemption = PreemptionGuard().install()
    for batch in batches():
        if global_step >= args.max_train_steps:
            break
        # Masks, flips and class dropout from a generator keyed by the batch position: resume redraws them exactly.
        generator = seeded_generator(args.seed, accelerator.process_index, progress.batches_consumed)
        ids = batch["indices"]
        if use_flip:
            flip = torch.rand(ids.shape[0], generator=generator) < 0.5
            ids = torch.where(flip.to(ids.device)[:, None], batch["indices_flipped"], ids)
        with accelerator.accumulate(transformer):
            # The prepared transformer autocasts its own forward; the loss is computed in float32.
            output = maskgit_training_step(
                transformer, scheduler, ids, batch["label"], class_dropout_prob=args.class_dropout,
                label_smoothing=args.label_smoothing, generator=generator,
            )
            loss = inject_debug_nonfinite(output.loss, progress.batches_consumed + 1)
            accelerator.backward(loss)
        progress.batches_consumed += 1
        running["loss"] += loss.detach().float() / args.gradient_accumulation_steps
        running["accuracy"] += output.accuracy.detach().float() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue

        # The step's one host sync: the losses and the non-finite flag, reduced together, decide step or skip.
        # --max_grad_norm 0 turns clipping off.
        logs, preempted = synchronize_step(
            accelerator, optimizer, running, transformer.parameters(), model.parameters(), guard=divergence_guard,
            preemption=preemption, step=global_step, output_dir=args.output_dir, max_grad_norm=args.max_grad_norm or None,
        )
        running = {"loss": 0.0, "accuracy": 0.0}
        if logs is None:
            continue  # skipped: no update, no EMA, no scheduler step (the diffusers convention); global_step, lr stay
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        progress.global_step = global_step
        if ema is not None:
            ema.step(model.parameters())
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        logs["sequences_per_second"] = global_batch / max(time.time() - tic, 1e-9)
        tic = time.time()
        accelerator.log(logs, step=global_step)
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['accuracy']:.3f}")
        preemption.checkpoint_or_stop(accelerator, global_step, checkpoint, args.checkpointing_steps, preempted,
                                      args.output_dir, log=logger.info)
        if global_step % args.validation_steps == 0 and accelerator.is_main_process:
            run_validation(global_step)
    progress_bar.close()

    accelerator.wait_for_everyone()
    saved_weights = {"ema": ema.shadow_params} if ema is not None else {"model": model.parameters()}
    check_finite_weights(accelerator, saved_weights, global_step, args.output_dir,
                         f"refusing to save the {'EMA ' if ema is not None else ''}pipeline")
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(model.parameters())  # the saved pipeline holds the EMA weights
        model.disable_gradient_checkpointing()
        pipeline = FlowMoMaskGiTPipeline(transformer=model, scheduler=scheduler, autoencoder=autoencoder,
                                         decoder_scheduler=tokenizer.scheduler)
        pipeline.save_pretrained(args.output_dir)
        grid = run_validation(global_step, final=True)
        with open(os.path.join(args.output_dir, "training_summary.json"), "w") as f:
            json.dump({"global_step": global_step, "final_loss": logs.get("loss") if global_step else None,
                       "final_accuracy": logs.get("accuracy") if global_step else None,
                       "validation_classes": validation_classes, "ema": ema is not None}, f, indent=2)
        logger.info(f"Saved the {'EMA ' if ema is not None else ''}pipeline to {args.output_dir} (samples: {grid})")
        if args.push_to_hub:
            from huggingface_hub import create_repo, upload_folder

            repo_id = create_repo(
                args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)), exist_ok=True, token=args.hub_token
            ).repo_id
            write_model_card(
                args.output_dir, repo_id=repo_id, stage="maskgit", command=command, model_config=dict(model.config),
                training_args={k: v for k, v in vars(args).items() if k != "hub_token"},
                base_model=args.pretrained_model_name_or_path, global_step=global_step, images=[grid],
                ema=ema is not None,
                final_metrics={"masked-token loss": logs["loss"], "masked-token accuracy": logs["accuracy"]} if global_step else None,
                summary=(f"A class-conditional MaskGiT prior over the tokens of the FlowMo tokenizer "
                         f"`{args.pretrained_model_name_or_path}`, trained with `flowmo-diffusers` for {global_step} steps."),
                usage="\n".join([
                    "from flowmo_diffusers import FlowMoMaskGiTPipeline",
                    "",
                    f'pipe = FlowMoMaskGiTPipeline.from_pretrained("{repo_id}")',
                    f"images = pipe(class_labels=[{', '.join(map(str, validation_classes[:4]))}]).images",
                ]),
                metrics_caption=f"Training figures of the last step; samples of classes {validation_classes}.",
                tags=("flowmo", "maskgit", "class-conditional-image-generation"), pipeline_tag="unconditional-image-generation",
            )
            upload_folder(
                repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                commit_message=f"MaskGiT prior: step {global_step}",
                ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*", "validation/*", LOCK_FILES_PATTERN],
            )
            logger.info(f"Pushed to https://huggingface.co/{repo_id}")
    # Every process leaves together: the others must not tear down the process group while the main one saves.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
