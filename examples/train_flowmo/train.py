#!/usr/bin/env python
"""Train a FlowMo tokenizer with Accelerate: stage 1A (pre-training, "mode matching") and stage 1B
(post-training, "mode seeking"), from one CPU process to multi-node GPUs.

    accelerate launch examples/train_flowmo/train.py                       # offline CPU demo (see README)
    accelerate launch examples/train_flowmo/train.py --dataset_name ILSVRC/imagenet-1k --streaming ...
    accelerate launch examples/train_flowmo/train.py --stage posttrain --pretrained_model_name_or_path DIR ...
    accelerate launch examples/train_flowmo/train.py --stage distill --pretrained_model_name_or_path DIR --distill_steps 4

This script holds arguments, the loop and logging only; the recipe lives in `flowmo_diffusers.training`
(`losses`, `perceptual`, `utils`, `data`). See examples/train_flowmo/README.md.
"""

import argparse
import copy
import hashlib
import json
import logging
import os
import shlex
import sys
import time

import diffusers
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    set_seed,
)
from tqdm.auto import tqdm

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, FlowMoScheduler
from flowmo_diffusers.data import (
    DEMO_HELD_OUT_IMAGES,
    build_eval_dataloader,
    build_train_dataloader,
    load_demo_image_datasets,
    load_image_dataset,
    take_images,
    total_skipped_images,
)
from flowmo_diffusers.models.presets import FLOWMO_PRESETS, resolve_model_config
from flowmo_diffusers.schedulers.scheduling_flowmo import TRAINING_TIME_DISTRIBUTIONS
from flowmo_diffusers.training.arguments import add_training_run_arguments
from flowmo_diffusers.training.checkpoint_folders import remove_stale_temporary_checkpoints, resolve_resume_checkpoint
from flowmo_diffusers.training.checkpointing import load_checkpoint, save_checkpoint
from flowmo_diffusers.training.distillation import FlowMoDistillationModule, make_student_config
from flowmo_diffusers.training.distributed import full_tensor
from flowmo_diffusers.training.divergence import DivergenceGuard, check_finite_weights, inject_debug_nonfinite, synchronize_step
from flowmo_diffusers.training.ema import EMACheckpoint, create_ema, ema_update_due, update_ema
from flowmo_diffusers.training.losses import FlowMoTrainingModule
from flowmo_diffusers.training.perceptual import (
    PERCEPTUAL_NETWORKS,
    MissingPretrainedWeightsError,
    build_perceptual_loss,
)
from flowmo_diffusers.training.preemption import PreemptionGuard, clear_preempted_marker
from flowmo_diffusers.training.recipe import (
    InitialNormFixer,
    TrainingProgress,
    freeze_encoder,
    optimizer_param_groups,
)
from flowmo_diffusers.training.reporting import write_model_card
from flowmo_diffusers.training.training_states import StreamPositions
from flowmo_diffusers.training.validation import ReconstructionValidation
from flowmo_diffusers.utils.output_lock import LOCK_FILES_PATTERN, lock_output_dir
from flowmo_diffusers.utils.validation import positive_int

logger = get_logger(__name__)

# Stage defaults (the paper's recipe); flags left unset take these.
STAGE_DEFAULTS = {
    "pretrain": dict(learning_rate=1e-4, perceptual_weight=0.1, perceptual_network="lpips-vgg", encoder_freeze_steps=200_000),
    # The original post-trains from a pre-training checkpoint past 200k steps, so its encoder is frozen throughout.
    "posttrain": dict(learning_rate=5e-5, perceptual_weight=0.01, perceptual_network="resnet50", encoder_freeze_steps=0),
    # Not in the paper: a K-pass student of a trained FlowMo. The encoder (and so every token id) never changes; the
    # perceptual term compares the student's image with the teacher's, with stage 1A's network and weight.
    "distill": dict(learning_rate=5e-5, perceptual_weight=0.1, perceptual_network="lpips-vgg", encoder_freeze_steps=0),
}
# With no data flag the script trains on the embedded photographs: a CPU demo that must run offline, in about four
# minutes on two cores, and reconstruct photographs it never saw (chelsea and coffee, its validation batch). The
# recipe was searched on those cores (benchmarks/RESULTS.md, "First look"): the flowmo-demo preset (2 bits per
# pixel); the learning rate 10x the paper's (on the tiny preset 1e-3 reaches in 200 steps the PSNR that 1e-4 reaches
# in about 1000, examples/train_flowmo/README.md); training times drawn near pure noise (logit mean 3.5), where the
# decoder must rely on the code, which is what a short run needs to learn first; random zoomed crops and flips of
# some twenty photographs, so that what it learns carries over to photographs it has not seen.
DEMO_DEFAULTS = dict(
    model_config="flowmo-demo", max_train_steps=1100, learning_rate=1e-3, perceptual_weight=0.0, validation_steps=300,
    train_batch_size=16, logit_mean=3.5, random_crop_scale=(0.4, 1.0), random_flip=True,
)
# Values of the flags the demo sets when none is given elsewhere (training on a dataset).
GENERAL_DEFAULTS = dict(model_config="flowmo-lo", validation_steps=1000, train_batch_size=8, random_flip=False)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a FlowMo tokenizer (stage 1A pre-training / 1B post-training).")
    # Model and stage
    parser.add_argument("--stage", choices=("pretrain", "posttrain", "distill"), default="pretrain",
                        help="pretrain: stage 1A (flow + LPIPS on the one-step prediction). posttrain: stage 1B "
                        "(perceptual loss on a k-step sample), starting from --pretrained_model_name_or_path. distill: "
                        "a student decoder that reproduces in --distill_steps passes what the teacher "
                        "(--pretrained_model_name_or_path) decodes with its sampler; the encoder stays frozen.")
    parser.add_argument("--model_config", type=str, default=None,
                        help=f"Preset ({', '.join(sorted(FLOWMO_PRESETS))}) or path to a FlowMoModel config.json. Default: "
                        "flowmo-lo; flowmo-demo for the embedded demo data. Ignored with --pretrained_model_name_or_path.")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                        help="FlowMoPipeline folder or Hub id to start from (required for --stage posttrain).")
    parser.add_argument("--revision", type=str, default=None, help="Hub revision of --pretrained_model_name_or_path.")
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="datasets Hub id or local dataset path.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None, help="Folder of images (imagefolder).")
    parser.add_argument("--streaming", action="store_true", help="Stream --dataset_name instead of downloading it.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (auto-detected by default).")
    parser.add_argument("--train_split", type=str, default="train")
    parser.add_argument("--validation_split", type=str, default=None,
                        help="Split for the fixed validation batch. Default: the first images of --train_split "
                        "(center-cropped; not held out). The embedded demo data validates on its held-out photographs.")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--resolution", type=int, default=None, help="Training resolution (default: the model's).")
    parser.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                        help="Horizontal flips of training images (default: off; on for the embedded demo data).")
    parser.add_argument("--random_crop_scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="Train on random squares of LOW..HIGH times the shorter side, resized to the resolution, "
                        "instead of resizing whole images and cropping (default: the latter; 0.4 1.0 for the "
                        "embedded demo data).")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--shuffle_buffer_size", type=int, default=1000,
                        help="--streaming: rows are shuffled within windows of this many rows.")
    # Optimization
    parser.add_argument("--output_dir", type=str, default="outputs/train_flowmo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=positive_int, default=None,
                        help="Micro-batch per device (default 8; 16 for the embedded demo data).")
    parser.add_argument("--max_train_steps", type=positive_int, default=None,
                        help="Optimizer steps (required unless training on the embedded demo data).")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--learning_rate", type=float, default=None, help="Default: 1e-4 pretrain, 5e-5 posttrain.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.95)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--adam_epsilon", type=float, default=1e-8)
    parser.add_argument("--max_grad_norm", type=float, default=None, help="Gradient clipping (the recipe has none).")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="Default: the Accelerate config. The recipe uses bf16.")
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Checkpoint every transformer block (stage 1B: instead of every decoder call of the chain).")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the encoder and decoder.")
    # Recipe
    parser.add_argument("--guidance_dropout", type=float, default=0.1, help="Share of samples trained with the null code.")
    parser.add_argument("--training_time_distribution", choices=TRAINING_TIME_DISTRIBUTIONS, default=None,
                        help="Flow-time distribution (default: the scheduler's, fat_lognormal).")
    parser.add_argument("--logit_mean", type=float, default=None,
                        help="Mean of the normal whose sigmoid the (fat_)lognormal times are (default: the "
                        "scheduler's, 0 as in the paper; 3.5 for the embedded demo data: mostly times near noise).")
    parser.add_argument("--logit_std", type=float, default=None,
                        help="Its standard deviation (default: the scheduler's, 1).")
    parser.add_argument("--encoder_freeze_steps", type=int, default=None,
                        help="Freeze the encoder (and drop it from the optimizer) after this many steps. Default: "
                        "200000 pretrain, 0 posttrain.")
    parser.add_argument("--keep_optimizer_state_at_freeze", action="store_true",
                        help="Keep the decoder's Adam moments at the encoder freeze (the original starts a fresh Adam).")
    parser.add_argument("--disable_norm_fix", action="store_true",
                        help="Do not rescale the double-block Linear weights to their initial norms after each step.")
    parser.add_argument("--perceptual_weight", type=float, default=None,
                        help="Default: 0.1 pretrain, 0.01 posttrain, 0 for the embedded demo data.")
    parser.add_argument("--perceptual_network", choices=PERCEPTUAL_NETWORKS, default=None,
                        help="Default: lpips-vgg pretrain, resnet50 posttrain.")
    parser.add_argument("--perceptual_weights_path", type=str, default=None,
                        help="Local ImageNet weights of the perceptual network (torchvision vgg16-397923af.pth / "
                        "resnet50-0676ba61.pth); default: the torch hub cache, downloading if possible.")
    parser.add_argument("--perceptual_random_init", action="store_true",
                        help="Randomly initialised perceptual network (tests / smoke runs only: not a perceptual loss).")
    parser.add_argument("--posttrain_sample_steps", type=positive_int, default=8,
                        help="k: Euler steps of the stage-1B sample.")
    parser.add_argument("--distill_steps", type=positive_int, default=4,
                        help="K: decoder passes of the distilled student (--stage distill), 1, 2 or 4 typically.")
    parser.add_argument("--distill_time_schedule", choices=("linear", "power"), default="linear",
                        help="Grid of the student's K Euler steps (linear: t = i/K).")
    parser.add_argument("--teacher_num_inference_steps", type=positive_int, default=None,
                        help="Teacher sampler steps for --stage distill (default: the teacher's own, 25).")
    parser.add_argument("--teacher_guidance_scale", type=float, default=None,
                        help="Teacher guidance for --stage distill (default: the teacher's own, 1.5).")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and save it at the end.")
    parser.add_argument("--ema_decay", type=float, default=0.9999, help="Per-step decay; applied as decay**k every k steps.")
    parser.add_argument("--ema_update_every", type=positive_int, default=10)
    # Checkpoints, validation, logging
    add_training_run_arguments(parser, checkpointing_steps=5000, tracker_project_name="train_flowmo")
    parser.add_argument("--validation_steps", type=positive_int, default=None,
                        help="Reconstruct the fixed validation batch and log PSNR every N steps and at the start "
                        "(default 1000; 100 for the embedded demo data).")
    parser.add_argument("--num_validation_images", type=int, default=4)
    parser.add_argument("--validation_inference_steps", type=int, default=None,
                        help="Default: the decoder's own sampler (25 steps; K for --stage distill).")
    parser.add_argument("--validation_guidance_scale", type=float, default=None,
                        help="Default: the decoder's own (1.5; 1 for --stage distill).")
    parser.add_argument("--debug_checksums", action="store_true",
                        help="Each process writes a checksum of its final weights to OUTPUT_DIR/debug_checksums/.")
    args = parser.parse_args(argv)

    args.demo = args.dataset_name is None and args.train_data_dir is None
    applied = {}
    if args.demo:
        for key, value in DEMO_DEFAULTS.items():
            if key == "model_config" and args.pretrained_model_name_or_path is not None:
                continue
            if getattr(args, key) is None:
                applied[key] = value
                setattr(args, key, value)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.demo_defaults_applied = applied
    for key, value in GENERAL_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage == "posttrain" and args.pretrained_model_name_or_path is None:
        parser.error("--stage posttrain starts from a stage-1A model: pass --pretrained_model_name_or_path")
    if args.stage == "distill" and args.pretrained_model_name_or_path is None:
        parser.error("--stage distill distils a trained FlowMo: pass the teacher as --pretrained_model_name_or_path")
    if args.max_train_steps is None:
        parser.error("--max_train_steps is required when training on a dataset (1.3M FlowMo-Lo / 800k FlowMo-Hi)")
    if args.perceptual_random_init and args.perceptual_weights_path:
        parser.error("--perceptual_random_init and --perceptual_weights_path exclude each other")
    return args


def load_model(args):
    """The autoencoder and the scheduler to train, from a pipeline (folder or Hub id) or a fresh config, and for
    --stage distill the frozen teacher: a copy of the loaded pipeline's autoencoder, decoding with its own sampler."""
    if args.pretrained_model_name_or_path is not None:
        pipeline = FlowMoPipeline.from_pretrained(
            args.pretrained_model_name_or_path, cache_dir=args.cache_dir, revision=args.revision, token=args.hub_token
        )
        model, scheduler = pipeline.autoencoder, pipeline.scheduler
    else:
        config = resolve_model_config(args.model_config, FlowMoModel, family="FlowMo")
        model = FlowMoModel.from_config(config)
        scheduler = FlowMoScheduler()
    if args.training_time_distribution is not None:
        scheduler = FlowMoScheduler.from_config(scheduler.config, training_time_distribution=args.training_time_distribution)
    times = {key: getattr(args, key) for key in ("logit_mean", "logit_std") if getattr(args, key) is not None}
    if times:
        scheduler = FlowMoScheduler.from_config(scheduler.config, **times)
    teacher = None
    if args.stage == "distill":
        teacher = copy.deepcopy(model).float().eval().requires_grad_(False)
        # The student starts as the teacher and decodes, from now on, in K unguided passes on its own grid.
        scheduler = make_student_config(model, args.distill_steps, args.distill_time_schedule,
                                        teacher=args.pretrained_model_name_or_path, scheduler=scheduler)
    return model.float().train(), scheduler, teacher


def weights_checksum(parameters) -> str:
    """sha256 of the whole weights (sharded ones are gathered: call it on every process)."""
    digest = hashlib.sha256()
    for parameter in parameters:
        digest.update(full_tensor(parameter.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_debug_checksums(output_dir, process_index, global_step, model, ema=None):
    """OUTPUT_DIR/debug_checksums/rank<i>.json: this process's final live (and EMA) weights, for the tests that
    compare runs bit for bit across launches."""
    os.makedirs(os.path.join(output_dir, "debug_checksums"), exist_ok=True)
    checksums = {"step": global_step, "model": weights_checksum(model.parameters())}
    if ema is not None:
        checksums["ema"] = weights_checksum(ema.shadow_params)
    with open(os.path.join(output_dir, "debug_checksums", f"rank{process_index}.json"), "w") as f:
        json.dump(checksums, f)


def save_final_pipeline(args, accelerator, validation, scheduler, global_step, command, skipped_images):
    """The run's product (call on every process): the EMA weights when kept, checked finite, saved as a pipeline
    with its final validation, `reconstructions.png` and a model card; pushed to the Hub with --push_to_hub."""
    model, ema = validation.model, validation.ema
    if ema is not None and validation.takes_part:
        ema.copy_to(model.parameters())  # the run is over: the saved pipeline holds the EMA weights
    check_finite_weights(accelerator, {"model": model.parameters()}, global_step, args.output_dir,
                         f"refusing to save the {'EMA ' if ema is not None else ''}pipeline")
    final_model = validation.final_autoencoder()
    if not accelerator.is_main_process:
        return
    final_model.disable_gradient_checkpointing()
    pipeline = FlowMoPipeline(autoencoder=final_model, scheduler=FlowMoScheduler.from_config(scheduler.config))
    pipeline.save_pretrained(args.output_dir)
    final_metrics = validation.record(
        global_step, [validation.images, validation.reconstruct(final_model)], ["psnr"], final=True,
        extra={"skipped_images": skipped_images},
    )
    logger.info(f"Saved the {'EMA ' if ema is not None else ''}pipeline to {args.output_dir}")
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    if args.push_to_hub:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id
    write_model_card(
        args.output_dir, repo_id=repo_id, stage=args.stage, command=command, model_config=dict(model.config),
        training_args={k: v for k, v in vars(args).items() if k not in ("hub_token",)},
        base_model=args.pretrained_model_name_or_path, final_metrics=final_metrics, global_step=global_step,
        images=["reconstructions.png"], ema=ema is not None,
    )
    if args.push_to_hub:
        upload_folder(
            repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
            commit_message=f"FlowMo {args.stage}: step {global_step}",
            ignore_patterns=["checkpoint-*", "step_*", "epoch_*", f"{args.logging_dir}/*", "validation/*",
                             "debug_checksums/*", LOCK_FILES_PATTERN],
        )
        logger.info(f"Pushed to https://huggingface.co/{repo_id}")


def main(argv=None):
    args = parse_args(argv)
    command = "accelerate launch " + " ".join(shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:]))

    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    start_step = resume[0] if resume else 0
    freeze_at_start = start_step >= args.encoder_freeze_steps
    # DDP must know up front whether some parameters will stop receiving gradients (the encoder freeze mid-run).
    freeze_mid_run = not freeze_at_start and args.encoder_freeze_steps < args.max_train_steps
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=freeze_mid_run)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        diffusers.utils.logging.set_verbosity_warning()
    else:
        diffusers.utils.logging.set_verbosity_error()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError(
            "DeepSpeed is not supported by this script: use DDP (accelerate launch --multi_gpu) or FSDP2 "
            "(accelerate launch --use_fsdp --fsdp_version 2). FlowMo-Lo/Hi (866M parameters: ~17 GB of fp32 weights, "
            "gradients, Adam state and EMA) fit one 80 GB GPU with DDP."
        )
    # FSDP2: parameters are DTensor shards. The norm fix, EMA and checkpoints handle them (flowmo_diffusers.training.
    # utils); validation and the final save work on a gathered, unsharded copy.
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError("FSDP needs --fsdp_version 2 (FSDP1's flat parameters hide the per-weight norms of the recipe)")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    lock = lock_output_dir(args.output_dir, accelerator, purpose=f"FlowMo {args.stage} training", log=logger.warning)
    if accelerator.is_main_process:
        for path in remove_stale_temporary_checkpoints(args.output_dir, lock):
            logger.warning(f"Removed the incomplete checkpoint {path} left by an interrupted save")
        clear_preempted_marker(args.output_dir)
    if args.demo:
        logger.info(
            "No --dataset_name / --train_data_dir: training on the embedded scikit-image photographs (CPU demo). "
            f"Demo defaults applied: {args.demo_defaults_applied or 'none (all given explicitly)'}."
        )
    if args.perceptual_weight == 0:
        logger.warning(
            f"Training WITHOUT the perceptual term (--perceptual_weight 0). The paper's {args.stage} recipe uses "
            f"{STAGE_DEFAULTS[args.stage]['perceptual_weight']} x {STAGE_DEFAULTS[args.stage]['perceptual_network']}, "
            "which needs ImageNet weights (--perceptual_weights_path or the torch hub cache)."
        )
    elif args.perceptual_random_init:
        logger.warning("--perceptual_random_init: the perceptual network is RANDOMLY initialised; not the paper's loss.")

    # First, so that missing ImageNet weights stop the run at once. A random init (tests) is seeded on its own.
    perceptual = None
    if args.perceptual_weight != 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            try:
                perceptual = build_perceptual_loss(
                    args.perceptual_network, pretrained=not args.perceptual_random_init,
                    weights_path=args.perceptual_weights_path,
                ).to(accelerator.device)
            except MissingPretrainedWeightsError as error:
                raise SystemExit(f"error: {error}") from None

    # Same initial weights on every process, then process-specific randomness for noise, times and masks.
    set_seed(args.seed)
    model, scheduler, teacher = load_model(args)
    set_seed(args.seed, device_specific=True)
    progress = TrainingProgress(global_step=0, encoder_frozen=freeze_at_start)
    if freeze_at_start:
        freeze_encoder(model)
        logger.info(f"Encoder frozen from the start (step {start_step} >= --encoder_freeze_steps {args.encoder_freeze_steps})")
    norm_fixer = InitialNormFixer()
    if not args.disable_norm_fix:
        norm_fixer.record(model)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.torch_compile:
        model.encoder.compile()
        model.decoder.compile()

    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model, include_encoder=not freeze_at_start),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    # Per-block checkpointing already bounds a sampling chain's memory; checkpointing each call around it would only
    # add a third forward pass (benchmarks/RESULTS.md section 4 measures this configuration).
    forward_inputs = {}
    if args.stage == "distill":
        training_module = FlowMoDistillationModule(
            model,
            teacher_num_inference_steps=args.teacher_num_inference_steps,
            teacher_guidance_scale=args.teacher_guidance_scale,
            perceptual_weight=args.perceptual_weight,
            gradient_checkpointing=not args.gradient_checkpointing,
        )
        forward_inputs["teacher"] = teacher.to(accelerator.device)
    else:
        training_module = FlowMoTrainingModule(
            model,
            scheduler,
            guidance_dropout=args.guidance_dropout,
            perceptual_weight=args.perceptual_weight,
            posttrain_sample_steps=args.posttrain_sample_steps if args.stage == "posttrain" else None,
            posttrain_gradient_checkpointing=not args.gradient_checkpointing,
        )
    training_module, optimizer = accelerator.prepare(training_module, optimizer)
    model = accelerator.unwrap_model(training_module).autoencoder

    ema = None
    divergence_guard = DivergenceGuard(args.max_skipped_steps, output_dir=args.output_dir, log=logger.warning)
    states = {"progress": progress, "norm_fixer": norm_fixer}  # saved as JSON + safetensors with every checkpoint
    if args.use_ema:
        ema = create_ema(model.parameters(), decay=args.ema_decay, update_every=args.ema_update_every, foreach=True)
        ema.to(accelerator.device)
        states["ema"] = EMACheckpoint(ema)

    stream_positions = None
    if args.streaming:
        stream_positions = StreamPositions(accelerator)
        states["train_loader"] = stream_positions

    if resume:
        logger.info(f"Resuming from {resume[1]}")
        load_checkpoint(accelerator, resume[1], states, flags={"ema": "--use_ema", "train_loader": "--streaming"})
        if ema is not None:
            ema.to(accelerator.device)
        if progress.global_step != start_step:
            raise RuntimeError(f"{resume[1]} holds step {progress.global_step}, its name says {start_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir}: starting a new run")

    resolution = args.resolution or model.config.sample_size
    dataset_kwargs = dict(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
        streaming=args.streaming, image_column=args.image_column, cache_dir=args.cache_dir, token=args.hub_token,
    )
    if args.demo:
        # Disjoint: the photographs the demo is judged on are never trained on.
        train_dataset, held_out_dataset = load_demo_image_datasets()
        if args.streaming:
            # One shard per image, so that processes and DataLoader workers can split the stream by shard.
            train_dataset = train_dataset.to_iterable_dataset(num_shards=len(train_dataset))
    else:
        train_dataset = load_image_dataset(split=args.train_split, **dataset_kwargs)
    # Not given to accelerator.prepare (unlike MaskGiT's token loader): it is sharded by split_dataset_by_node and
    # resumes from `batches_consumed` (map-style) or every process' stream position (StreamPositions), because
    # Accelerate would read each stream whole and keep one stream position for all processes
    # (flowmo_diffusers.data.loaders says more).
    train_loader = build_train_dataloader(
        train_dataset, resolution, args.train_batch_size, seed=args.seed, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, num_workers=args.dataloader_num_workers,
        shuffle_buffer=args.shuffle_buffer_size, random_flip=args.random_flip, infinite=True,
        skip_batches=progress.batches_consumed, pin_memory=accelerator.device.type == "cuda",
        random_crop_scale=None if args.random_crop_scale is None else tuple(args.random_crop_scale),
    )
    if stream_positions is not None:
        stream_positions.attach(train_loader)
    # The loaders draw nothing from the global RNGs (their DataLoaders have generators of their own), so the training
    # stream (noise, times, masks) of a resumed run is exactly that of the uninterrupted run.
    batches = iter(train_loader)
    validation_images = None
    if accelerator.is_main_process or sharded:
        split = args.validation_split or args.train_split
        if args.demo:
            validation_dataset = held_out_dataset
            described = f"the held-out photographs {', '.join(DEMO_HELD_OUT_IMAGES)} (not trained on)"
        else:
            validation_dataset = (train_dataset if args.validation_split is None
                                  else load_image_dataset(split=split, **dataset_kwargs))
            described = f"split {split!r}" + ("" if args.validation_split else " (training images, not held out)")
        validation_loader = build_eval_dataloader(validation_dataset, resolution, args.num_validation_images)
        validation_images = take_images(validation_loader, args.num_validation_images)["pixel_values"].to(accelerator.device)
        logger.info(f"Validation batch: {len(validation_images)} images of {described}")

    if accelerator.is_main_process and accelerator.trackers == [] and args.report_to != "none":
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    validation = ReconstructionValidation(
        accelerator, training_module, model, scheduler, validation_images, args.output_dir, ema=ema, seed=args.seed,
        num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
        sharded=sharded,
    )

    def checkpoint(step):
        save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, log=logger.info, states=states)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  {accelerator.distributed_type} on {accelerator.num_processes} process(es)"
                + (" (FSDP2: sharded parameters)" if sharded else ""))
    logger.info(f"  Stage = {args.stage}, model = {args.pretrained_model_name_or_path or args.model_config}, "
                f"resolution = {resolution}, parameters = {sum(p.numel() for p in model.parameters()):,}")
    logger.info(f"  Micro-batch per device = {args.train_batch_size}, accumulation = {args.gradient_accumulation_steps}, "
                f"global batch = {total_batch}, steps = {args.max_train_steps}, lr = {args.learning_rate}")
    logger.info(f"  Perceptual = {args.perceptual_weight} x {args.perceptual_network}, encoder frozen after "
                f"{args.encoder_freeze_steps} steps, EMA = {args.use_ema}")
    if args.stage == "distill":
        teacher_config = forward_inputs["teacher"].config
        logger.info(f"  Distilling a {args.distill_steps}-pass student ({args.distill_time_schedule} grid, no guidance) of "
                    f"{args.pretrained_model_name_or_path}; teacher sampler: "
                    f"{args.teacher_num_inference_steps or teacher_config.sampling_num_inference_steps} steps, guidance "
                    f"{args.teacher_guidance_scale or teacher_config.sampling_guidance_scale}")

    global_step = progress.global_step
    if global_step == 0 and validation.takes_part:
        validation.run(0)
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    running = {}
    tic = time.time()
    # Installed for the rest of the process: a signal during the final save is only a flag (docs/cluster.md).
    preemption = PreemptionGuard().install()
    while global_step < args.max_train_steps:
        images = next(batches)["pixel_values"].to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(training_module):
            terms = training_module(images, perceptual, **forward_inputs)
            terms["loss"] = inject_debug_nonfinite(terms["loss"], train_loader.batches_consumed)
            accelerator.backward(terms["loss"])
        progress.batches_consumed = train_loader.batches_consumed
        for key, value in terms.items():
            running[key] = running.get(key, 0.0) + value.detach().float() / args.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue

        # The step's one host sync: the losses and the non-finite flag, reduced together, decide step or skip.
        logs, preempted = synchronize_step(
            accelerator, optimizer, running, training_module.parameters(), model.parameters(), guard=divergence_guard,
            preemption=preemption, step=global_step, output_dir=args.output_dir, max_grad_norm=args.max_grad_norm,
        )
        running = {}
        if logs is None:
            continue  # skipped: no update, no EMA, no norm fix; global_step stays
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        progress.global_step = global_step
        if not args.disable_norm_fix:
            norm_fixer.apply(model)
        if ema is not None and ema_update_due(global_step, args.ema_update_every):
            update_ema(ema, model.parameters())
        if not progress.encoder_frozen and global_step >= args.encoder_freeze_steps:
            removed = freeze_encoder(model, optimizer, reset_optimizer_state=not args.keep_optimizer_state_at_freeze)
            progress.encoder_frozen = True
            logger.info(f"Step {global_step}: encoder frozen, {removed} parameters dropped from the optimizer")

        logs["lr"] = optimizer.param_groups[-1]["lr"]
        logs["images_per_second"] = total_batch / max(time.time() - tic, 1e-9)
        tic = time.time()
        accelerator.log(logs, step=global_step)
        progress_bar.update(1)
        progress_bar.set_postfix({k: f"{logs[k]:.4f}" for k in ("loss", "flow_loss", "teacher_psnr") if k in logs})

        preemption.checkpoint_or_stop(accelerator, global_step, checkpoint, args.checkpointing_steps, preempted,
                                      args.output_dir, log=logger.info)
        if global_step % args.validation_steps == 0 and validation.takes_part:
            validation.run(global_step)
    progress_bar.close()

    skipped_images = total_skipped_images(accelerator, train_loader)  # all processes; written with the final metrics
    (logger.warning if skipped_images else logger.info)(f"{skipped_images} undecodable training images were skipped")
    accelerator.wait_for_everyone()
    if args.debug_checksums:
        write_debug_checksums(args.output_dir, accelerator.process_index, global_step, model, ema)
    save_final_pipeline(args, accelerator, validation, scheduler, global_step, command, skipped_images)
    # Every process leaves together: the others must not tear down the process group while the main one saves.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
