"""Preemption of the other trainers: stage 1B (`--stage posttrain`), distillation (`--stage distill`) and the MaskGiT
prior (examples/train_maskgit/train.py) run the loop of `flowmo_diffusers.training.preemption` as pre-training does
(tests/training/test_preemption.py). For each, a real `accelerate launch` of a tiny run is signalled between two
scheduled checkpoints (at step 2, checkpoints every 3 steps): it saves checkpoint-2, logs it, writes preempted.json and
exits; `--resume_from_checkpoint latest` then ends with the uninterrupted run's weights, bit for bit.

Each signal goes to the training process alone (what SLURM's `--signal` without `B:` does: every process of the job
step gets it), so Accelerate's one-process launcher never has to forward it; one signal per trainer covers all three
of `PREEMPTION_SIGNALS`."""

import os
import signal

import pytest
from safetensors.torch import load_file

from flowmo_diffusers.data import load_default_image_dataset
from flowmo_diffusers.training.pretokenize import TokenizationInfo, assemble_token_dataset, pretokenize

from test_training import SCRIPT as FLOWMO_SCRIPT
from test_training import TINY_RUN, checksums
from testing_utils import (
    EXAMPLES,
    HeldLaunch,
    assert_preempted_at,
    launch,
    tiny_flowmo_model,
    tiny_flowmo_pipeline,
    wait_until_held,
)

MASKGIT_SCRIPT = EXAMPLES / "train_maskgit" / "train.py"
#: 4 steps, scheduled checkpoints at 3: the signal at step 2 falls between two of them.
SCHEDULE = ["--max_train_steps", "4", "--checkpointing_steps", "3", "--validation_steps", "100"]


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny FlowMo pipeline (teacher, stage-1A result and tokenizer) and the embedded photographs tokenized by it."""
    root = tmp_path_factory.mktemp("components")
    model = tiny_flowmo_model(0)
    tiny_flowmo_pipeline(model).save_pretrained(root / "flowmo")
    # In this process (no launch): the tokens only have to exist, pre-tokenization is tested in test_maskgit_training.
    pretokenize(model, load_default_image_dataset(), str(root / "tokens"), batch_size=9, chunk_size=9,
                show_progress=False)
    assemble_token_dataset(str(root / "tokens"), TokenizationInfo(
        tokenizer=str(root / "flowmo"), num_indices=24, codebook_size=16, resolution=32, flip=False, num_classes=9,
        streaming=False, num_processes=1))
    return root


def stage_run(stage, root):
    """(script, arguments) of the tiny run of `stage`; EMA on where the trainer has it, so its resume is checked too."""
    flowmo = TINY_RUN + SCHEDULE + ["--perceptual_weight", "0", "--pretrained_model_name_or_path", root / "flowmo"]
    if stage == "posttrain":
        return FLOWMO_SCRIPT, flowmo + ["--stage", "posttrain", "--posttrain_sample_steps", "2", "--use_ema",
                                        "--ema_update_every", "1"]
    if stage == "distill":
        return FLOWMO_SCRIPT, flowmo + ["--stage", "distill", "--distill_steps", "2", "--teacher_num_inference_steps",
                                        "2"]
    # 9 sequences in batches of 3: step 2 is the middle of an epoch.
    return MASKGIT_SCRIPT, SCHEDULE + [
        "--model_config", "maskgit-tiny", "--pretrained_model_name_or_path", root / "flowmo", "--train_dataset",
        root / "tokens", "--train_batch_size", "3", "--learning_rate", "1e-3", "--use_ema", "--dataloader_num_workers",
        "0", "--validation_class_ids", "0", "1", "--validation_inference_steps", "2",
        "--validation_decoder_inference_steps", "1", "--report_to", "none", "--seed", "0",
    ]


def final_weights(stage, output_dir):
    """What must be bit-identical after the resume: the live and EMA weights."""
    if stage != "maskgit":
        return checksums(output_dir)  # --debug_checksums: live and EMA weights of the last step
    return {name: load_file(output_dir / name) for name in  # checkpoint-3: live weights; the pipeline: EMA weights
            ("checkpoint-3/model.safetensors", "transformer/diffusion_pytorch_model.safetensors")}


def same_weights(first, second):
    if not isinstance(next(iter(first.values())), dict):
        return first == second
    return first.keys() == second.keys() and all(
        first[name].keys() == second[name].keys() and all(first[name][k].equal(second[name][k]) for k in first[name])
        for name in first)


@pytest.mark.parametrize("stage, signal_number", [
    ("posttrain", signal.SIGTERM), ("distill", signal.SIGINT), ("maskgit", signal.SIGUSR1),
], ids=["posttrain-SIGTERM", "distill-SIGINT", "maskgit-SIGUSR1"])
def test_a_signal_checkpoints_between_checkpoints_and_the_resume_is_exact(components, tmp_path, stage, signal_number):
    script, arguments = stage_run(stage, components)
    launch(script, arguments + ["--output_dir", tmp_path / "reference"])
    output_dir = tmp_path / "out"
    run = HeldLaunch(script, arguments + ["--output_dir", output_dir], tmp_path / "hold")
    (pid,) = wait_until_held([run], 1)
    os.kill(pid, signal_number)
    run.wait_for(f"received {signal_number.name}")  # the handler ran before the held step goes on
    status, output = run.finish()
    # The training process exits with 75; Accelerate's one-process launcher turns any failure of its child into 1.
    assert status == 1, output[-6000:]
    assert_preempted_at(2, output_dir, output, [signal_number.name])
    assert not (output_dir / "checkpoint-3").exists()
    log = launch(script, arguments + ["--resume_from_checkpoint", "latest", "--output_dir", output_dir])
    assert f"Resuming from {output_dir / 'checkpoint-2'}" in log and not (output_dir / "preempted.json").exists()
    assert same_weights(final_weights(stage, output_dir), final_weights(stage, tmp_path / "reference"))
