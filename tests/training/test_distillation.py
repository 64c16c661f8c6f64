"""Distillation to K passes: the package's losses (training/distillation.py) and `--stage distill` of
examples/train_flowmo/train.py through `accelerate launch` on CPU, with a tiny teacher."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.training.distillation import (
    FlowMoDistillationModule,
    distillation_losses,
    make_student_config,
    student_sample,
)

from testing_utils import EXAMPLES, tiny_flowmo_model, tiny_flowmo_pipeline  # noqa: E402
from testing_utils import launch as launch_script

SCRIPT = EXAMPLES / "train_flowmo" / "train.py"


def student_of(teacher_seed=0, steps=2, schedule="linear"):
    student = tiny_flowmo_model(teacher_seed).train()
    make_student_config(student, steps, schedule, teacher="tiny-teacher")
    return student


def images(batch=2, seed=0):
    return torch.rand((batch, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("steps, schedule", [(1, "linear"), (2, "linear"), (4, "power")])
@torch.no_grad()
def test_student_sample_is_what_the_student_decodes(steps, schedule):
    student = student_of(steps=steps, schedule=schedule).eval()
    code = student.encode(images()).code
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    trained_path = student_sample(student, code, noise)
    decoded = student.decode(code, latents=noise)
    assert decoded.num_decoder_passes == steps
    torch.testing.assert_close(trained_path.clamp(-1, 1), decoded.sample, rtol=0, atol=1e-6)


def test_distillation_trains_the_decoder_towards_the_teacher_and_leaves_the_encoder():
    teacher = tiny_flowmo_model(0).requires_grad_(False)
    student = student_of(0, steps=1)
    student.encoder.requires_grad_(False)
    encoder_before = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    batch = images(4)
    ids_before = student.encode(batch).indices
    module = FlowMoDistillationModule(student)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(30):
        terms = module(batch, teacher=teacher, generator=torch.Generator().manual_seed(step % 2))
        optimizer.zero_grad()
        terms["loss"].backward()
        if step == 0:
            assert all(p.grad is None for p in student.encoder.parameters())
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.decoder.parameters())
        optimizer.step()
        losses.append(float(terms["distillation_loss"]))
    # One pass learns the teacher's 31-pass map for these images and noises (measured: 0.38 -> 0.10 in 30 steps).
    assert losses[-1] < 0.4 * losses[0], losses
    assert all(torch.equal(student.encoder.state_dict()[k], v) for k, v in encoder_before.items())
    assert torch.equal(student.encode(batch).indices, ids_before)


def test_distillation_loss_terms_and_errors():
    teacher, student = tiny_flowmo_model(0), student_of(0, steps=2)
    perceptual = lambda a, b: (a - b).abs().flatten(1).mean(1)  # noqa: E731
    terms = distillation_losses(student, teacher, images(), perceptual_loss=perceptual, perceptual_weight=0.5,
                                generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"loss", "distillation_loss", "perceptual_loss", "teacher_psnr"}
    torch.testing.assert_close(terms["loss"].detach(), terms["distillation_loss"] + terms["perceptual_loss"])
    assert terms["perceptual_loss"] > 0
    with pytest.raises(ValueError, match="no perceptual_loss"):
        distillation_losses(student, teacher, images(), perceptual_weight=0.5)
    with pytest.raises(ValueError, match="needs the teacher"):
        FlowMoDistillationModule(student)(images())
    with pytest.raises(ValueError, match="--distill_steps"):
        make_student_config(student, 0)


# ----------------------------------------------------------------------------------------------------------------------
# examples/train_flowmo/train.py --stage distill
# ----------------------------------------------------------------------------------------------------------------------
DISTILL_RUN = [
    "--stage", "distill", "--distill_steps", "2", "--train_batch_size", "2", "--num_validation_images", "2",
    "--report_to", "none", "--seed", "0", "--debug_checksums", "--perceptual_weight", "0.1",
    "--perceptual_random_init", "--use_ema", "--ema_update_every", "2", "--checkpointing_steps", "2",
    "--validation_steps", "2", "--learning_rate", "1e-3",
]


def checksums(output_dir, rank=0):
    return json.loads((Path(output_dir) / "debug_checksums" / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tiny_flowmo_pipeline(tiny_flowmo_model(0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def distill_run(teacher_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("distill")
    log = launch_script(SCRIPT, DISTILL_RUN + ["--pretrained_model_name_or_path", teacher_dir,
                                               "--max_train_steps", "4", "--output_dir", output_dir])
    return output_dir, log


def test_distilled_pipeline_decodes_the_teachers_ids_in_k_passes(teacher_dir, distill_run):
    output_dir, log = distill_run
    assert "Distilling a 2-pass student (linear grid, no guidance)" in log
    assert "teacher sampler: 25 steps, guidance 1.5" in log
    teacher, student = FlowMoPipeline.from_pretrained(teacher_dir), FlowMoPipeline.from_pretrained(output_dir)
    student.set_progress_bar_config(disable=True)
    before = load_file(teacher_dir / "autoencoder" / "diffusion_pytorch_model.safetensors")
    after = load_file(output_dir / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))  # bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    pictures = images(2, seed=3) / 2 + 0.5
    ids = teacher.encode(pictures)
    assert torch.equal(student.encode(pictures), ids)
    out = student(indices=ids, output_type="pt")
    assert out.num_decoder_passes == 2 and out.images.shape == (2, 3, 32, 32)
    assert student.autoencoder.config.distilled_from == str(teacher_dir)
    assert student.scheduler.config.time_schedule == "linear"
    card = (output_dir / "README.md").read_text()
    assert f"A 2-pass student of `{teacher_dir}`" in card and "--stage distill" in card
    records = [json.loads(line) for line in (output_dir / "validation_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 4] and "psnr_ema" in records[1]
    assert {"checkpoint-2", "checkpoint-4"} == {p.name for p in output_dir.glob("checkpoint-*")}


def test_distillation_resumes_exactly(teacher_dir, distill_run, tmp_path):
    reference_dir, _ = distill_run
    common = DISTILL_RUN + ["--pretrained_model_name_or_path", teacher_dir, "--output_dir", tmp_path]
    launch_script(SCRIPT, common + ["--max_train_steps", "2"])
    log = launch_script(SCRIPT, common + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert f"Resuming from {tmp_path / 'checkpoint-2'}" in log
    assert checksums(tmp_path) == checksums(reference_dir)  # bit-identical live and EMA weights


def test_distillation_on_two_processes(teacher_dir, tmp_path):
    launch_script(SCRIPT, DISTILL_RUN + ["--pretrained_model_name_or_path", teacher_dir, "--max_train_steps", "2",
                                         "--output_dir", tmp_path], num_processes=2)
    assert checksums(tmp_path, 0) == checksums(tmp_path, 1)
    assert FlowMoPipeline.from_pretrained(tmp_path).autoencoder.config.sampling_num_inference_steps == 2


def test_distillation_from_and_to_the_hub(teacher_dir, tmp_path):
    from hub_stub import LocalHub

    with LocalHub() as hub:
        hub.add_repo("user/flowmo-teacher", teacher_dir)
        env = hub.client_env(tmp_path / "hf_home")
        launch_script(SCRIPT, DISTILL_RUN + ["--pretrained_model_name_or_path", "user/flowmo-teacher",
                                             "--max_train_steps", "1", "--output_dir", tmp_path / "out", "--push_to_hub",
                                             "--hub_model_id", "user/flowmo-student", "--hub_token", "hf_test"],
                      env=env)
        files = hub.repo_files("user/flowmo-student")
    assert {"model_index.json", "autoencoder/diffusion_pytorch_model.safetensors", "README.md"} <= set(files)
    assert "A 2-pass student of `user/flowmo-teacher`" in files["README.md"].decode()
    config = json.loads(files["autoencoder/config.json"])
    assert config["sampling_num_inference_steps"] == 2 and config["sampling_guidance_scale"] == 1.0
