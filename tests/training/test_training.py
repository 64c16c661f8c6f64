"""Training: the package helpers (losses, stage-1B sampler, perceptual networks, norm fix, EMA, encoder freeze,
checkpoint folders) and examples/train_flowmo/train.py run through `accelerate launch` on CPU.

The script runs use the tiny preset at 32x32 with a few steps. Pretrained perceptual weights are not available
offline: runs that include the perceptual term pass `--perceptual_random_init` explicitly.
"""

import json
import os
import urllib.error
from pathlib import Path

import accelerate
import numpy as np
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler
from flowmo_diffusers.models.presets import FLOWMO_PRESETS
from flowmo_diffusers.training import perceptual as perceptual_module
from flowmo_diffusers.training.checkpoint_folders import (
    list_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temporary_checkpoints,
    resolve_resume_checkpoint,
    temporary_checkpoint_path,
)
from flowmo_diffusers.training.ema import create_ema, ema_update_due, update_ema
from flowmo_diffusers.training.losses import (
    FlowMoTrainingModule,
    flow_matching_loss,
    flowmo_training_losses,
    posttrain_sample,
    sample_posttrain_times,
)
from flowmo_diffusers.training.perceptual import (
    LPIPSVGGLoss,
    MissingPretrainedWeightsError,
    ResNet50LogitLoss,
    build_perceptual_loss,
)
from flowmo_diffusers.training.recipe import (
    InitialNormFixer,
    TrainingProgress,
    freeze_encoder,
    guidance_dropout_mask,
    optimizer_param_groups,
    weights_to_fix,
)
from flowmo_diffusers.training.reporting import validation_grid, write_model_card
from flowmo_diffusers.utils.output_lock import OutputDirLock

from testing_utils import REPO, load_script, tiny_flowmo_model
from testing_utils import launch as launch_script

SCRIPT = REPO / "examples" / "train_flowmo" / "train.py"


def tiny_model(seed=0):
    return tiny_flowmo_model(seed, perturb=False)


def images(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, 32, 32), generator=generator) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------------
# Losses and the stage-1B sampler
# ----------------------------------------------------------------------------------------------------------------------


def test_flow_matching_loss_is_mse_to_noise_minus_image():
    x, noise, v = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.allclose(flow_matching_loss(v, x, noise), ((noise - x - v) ** 2).mean())
    assert flow_matching_loss(noise - x, x, noise) == 0


def test_posttrain_times_run_from_one_to_zero_per_sample():
    times = sample_posttrain_times(64, 8, generator=torch.Generator().manual_seed(0))
    assert times.shape == (64, 9)
    assert torch.all(times[:, 0] == 1) and torch.all(times[:, -1] == 0)
    steps = times[:, :-1] - times[:, 1:]
    assert torch.all(steps > 0)
    assert torch.allclose(steps.sum(1), torch.ones(64))
    assert steps.std(0).min() > 0.01  # random per sample, not a shared grid
    with pytest.raises(ValueError):
        sample_posttrain_times(2, 0)


def test_posttrain_sample_backpropagates_through_the_chain_to_the_encoder():
    model = tiny_model()
    x = images()
    code = model.encode(x).code
    noise = torch.randn_like(x)
    times = sample_posttrain_times(2, 3, generator=torch.Generator().manual_seed(1))

    sample = posttrain_sample(model, code, 3, noise=noise, times=times, gradient_checkpointing=True)
    assert sample.shape == x.shape and sample.dtype == torch.float32
    (sample - x).pow(2).mean().backward()
    encoder_grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert encoder_grads and sum(float(g.abs().sum()) for g in encoder_grads) > 0
    checkpointed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Same value and gradients without checkpointing; the k decoder calls all count.
    model.zero_grad()
    plain = posttrain_sample(model, code.detach().requires_grad_(False), 3, noise=noise, times=times,
                             gradient_checkpointing=False)
    assert torch.allclose(plain, sample.detach(), atol=1e-6)
    model.zero_grad()
    code = model.encode(x).code
    posttrain_sample(model, code, 3, noise=noise, times=times, gradient_checkpointing=False).sub(x).pow(2).mean().backward()
    for name, grad in checkpointed.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name

    # One Euler step from pure noise at t = 1 is z - v(z, 1).
    with torch.no_grad():
        one = posttrain_sample(model, code, 1, noise=noise, times=torch.tensor([[1.0, 0.0]] * 2))
        v = model(noise, torch.ones(2), code).sample
    assert torch.allclose(one, noise - v, atol=1e-6)


def test_stage_1a_and_1b_loss_terms():
    model = tiny_model()
    x = images(4)
    seen = []

    def distance(a, b):
        seen.append(b)
        return (a - b).pow(2).flatten(1).mean(1)

    terms = flowmo_training_losses(model, x, FlowMoScheduler(), perceptual_loss=distance, perceptual_weight=0.1,
                                   generator=torch.Generator().manual_seed(0))
    expected = terms["flow_loss"] + terms["quantizer_loss"] + 0.1 * terms["perceptual_distance"]
    assert torch.allclose(terms["loss"].detach(), expected)
    assert torch.allclose(terms["perceptual_loss"], 0.1 * terms["perceptual_distance"])
    assert set(terms) >= {"loss", "flow_loss", "quantizer_loss", "entropy_loss", "commitment_loss", "perceptual_loss"}
    terms["loss"].backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)

    # Stage 1B: the perceptual term sees a k-step sample; without a weight the network is not needed.
    stage_b = FlowMoTrainingModule(model, FlowMoScheduler(), perceptual_weight=0.01, posttrain_sample_steps=2)
    out = stage_b(x, distance, generator=torch.Generator().manual_seed(0))
    assert seen[-1].shape == x.shape and seen[-1].requires_grad
    assert torch.isfinite(out["loss"])
    plain = flowmo_training_losses(model, x, FlowMoScheduler())
    assert plain["perceptual_loss"] == 0 and "perceptual_distance" not in plain
    with pytest.raises(ValueError, match="perceptual_loss"):
        flowmo_training_losses(model, x, FlowMoScheduler(), perceptual_weight=0.1)


def test_guidance_dropout_mask():
    mask = guidance_dropout_mask(20000, 0.1, generator=torch.Generator().manual_seed(0))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(1 - mask.mean()) - 0.1) < 0.01
    assert guidance_dropout_mask(5, 0.0).eq(1).all() and guidance_dropout_mask(5, 1.0).eq(0).all()
    with pytest.raises(ValueError):
        guidance_dropout_mask(5, 1.5)


# ----------------------------------------------------------------------------------------------------------------------
# Norm fix, EMA, encoder freeze
# ----------------------------------------------------------------------------------------------------------------------


def test_norm_fix_restores_initial_norms_and_survives_state_dict():
    model = tiny_model()
    fixer = InitialNormFixer()
    fixer.record(model)
    names = [name for name, _ in weights_to_fix(model)]
    assert names and all(".blocks." in n for n in names)
    assert any(n.endswith("modulation") for n in names) and any(n.endswith("qkv") for n in names)
    untouched_before = model.encoder.patch_embed.weight.clone()
    with torch.no_grad():
        for i, (_, weight) in enumerate(weights_to_fix(model)):
            weight.mul_(1.5 + i % 3).add_(0.01)
        model.encoder.patch_embed.weight.mul_(2)

    restored = InitialNormFixer()
    restored.load_state_dict(fixer.state_dict())
    restored.apply(model)
    for name, weight in weights_to_fix(model):
        assert torch.allclose(torch.linalg.vector_norm(weight), fixer.norms[name], rtol=1e-5), name
    assert torch.equal(model.encoder.patch_embed.weight, 2 * untouched_before)  # only block Linear weights
    with pytest.raises(RuntimeError):
        InitialNormFixer().apply(model)


def test_ema_applies_decay_to_the_tenth_every_tenth_step_without_warmup():
    model = tiny_model()
    decay, every = 0.9, 10
    ema = create_ema(model.parameters(), decay=decay, update_every=every)
    reference = [p.detach().clone() for p in model.parameters()]  # SimpleEMA: a copy of the model at creation
    model.encoder.requires_grad_(False)  # frozen parameters are averaged too, as in the original
    for step in range(1, 26):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        if ema_update_due(step, every):
            update_ema(ema, model.parameters())
            assert ema.cur_decay_value == pytest.approx(decay**every)
            reference = [decay**every * r + (1 - decay**every) * p.detach() for r, p in zip(reference, model.parameters())]
    assert ema.optimization_step == 3  # after steps 1, 11, 21
    for shadow, expected in zip(ema.shadow_params, reference):
        assert torch.allclose(shadow, expected, atol=1e-6)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert [s for s in range(1, 32) if ema_update_due(s, every)] == [1, 11, 21, 31]


def test_freeze_encoder_drops_it_from_the_optimizer_and_resumes_past_the_freeze():
    model = tiny_model()
    optimizer = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2, weight_decay=0.0)
    assert [g["name"] for g in optimizer.param_groups] == ["encoder", "decoder"]

    def step():
        optimizer.zero_grad()
        flowmo_training_losses(model, images(), FlowMoScheduler())["loss"].backward()
        optimizer.step()

    step()
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    assert any(id(p) in encoder_ids for p in optimizer.state)
    # The original rebuilds Adam over the decoder at the freeze: its next step is the first step of a fresh Adam.
    copy = tiny_model()
    copy.load_state_dict(model.state_dict())
    rebuilt_like_original = torch.optim.AdamW([p for p in copy.decoder.parameters()], lr=1e-2, weight_decay=0.0)
    removed = freeze_encoder(model, optimizer)
    assert removed == len(list(model.encoder.parameters()))
    assert [g["name"] for g in optimizer.param_groups] == ["decoder"]
    assert len(optimizer.state) == 0
    assert not any(p.requires_grad for p in model.encoder.parameters())
    encoder_before = [p.clone() for p in model.encoder.parameters()]
    decoder_before = [p.clone() for p in model.decoder.parameters()]
    torch.manual_seed(5)
    step()
    assert all(torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))
    copy.encoder.requires_grad_(False)
    torch.manual_seed(5)
    rebuilt_like_original.zero_grad()
    flowmo_training_losses(copy, images(), FlowMoScheduler())["loss"].backward()
    rebuilt_like_original.step()
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.parameters(), copy.decoder.parameters()))

    # reset_optimizer_state=False keeps the decoder's moments.
    kept = tiny_model()
    kept_optimizer = torch.optim.AdamW(optimizer_param_groups(kept), lr=1e-2)
    kept_optimizer.zero_grad()
    flowmo_training_losses(kept, images(), FlowMoScheduler())["loss"].backward()
    kept_optimizer.step()
    freeze_encoder(kept, kept_optimizer, reset_optimizer_state=False)
    assert len(kept_optimizer.state) == len(list(kept.decoder.parameters()))

    # Resuming past the freeze: an optimizer built without the encoder loads the saved state.
    fresh = tiny_model()
    freeze_encoder(fresh)
    rebuilt = torch.optim.AdamW(optimizer_param_groups(fresh, include_encoder=False), lr=1e-2)
    rebuilt.load_state_dict(optimizer.state_dict())
    assert len(rebuilt.state) == len(optimizer.state)


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual networks
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["lpips-vgg", "resnet50"])
def test_perceptual_networks_with_explicit_random_init(network):
    loss = build_perceptual_loss(network, pretrained=False)
    assert not loss.training and not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training
    a, b = images(2, seed=1), images(2, seed=2).requires_grad_(True)
    distance = loss(a, b)
    assert distance.shape == (2,) and torch.all(distance > 0)
    distance.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert torch.allclose(loss(a, a), torch.zeros(2), atol=1e-6)
    with pytest.raises(ValueError):
        build_perceptual_loss(network, pretrained=False, weights_path="x.pth")


def test_missing_pretrained_weights_fail_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for cls, file_name in ((LPIPSVGGLoss, "vgg16-397923af.pth"), (ResNet50LogitLoss, "resnet50-0676ba61.pth")):
        with pytest.raises(MissingPretrainedWeightsError) as error:
            cls()
        message = str(error.value)
        for needle in (file_name, "--perceptual_weights_path", str(tmp_path / "torch_home"), "--perceptual_weight 0"):
            assert needle in message
        with pytest.raises(MissingPretrainedWeightsError, match="not found at"):
            cls(weights_path=tmp_path / "missing.pth")


def test_resnet50_loads_weights_from_a_path(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(3)
    reference = resnet50(weights=None)
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(reference.state_dict(), path)
    loss = ResNet50LogitLoss(pretrained=True, weights_path=path)
    assert torch.equal(loss.model.fc.weight, reference.fc.weight)
    assert perceptual_module.RESNET50_WEIGHTS.file_name == path.name


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint folders, progress, model card
# ----------------------------------------------------------------------------------------------------------------------


def test_checkpoint_folders_are_published_atomically_and_pruned(tmp_path):
    out = str(tmp_path)
    assert resolve_resume_checkpoint("latest", out) is None
    for step in (2, 4, 10):
        os.makedirs(temporary_checkpoint_path(out, step))
        (tmp_path / f"checkpoint-{step}.tmp" / "state").write_text(str(step))
        publish_checkpoint(out, step)
    os.makedirs(temporary_checkpoint_path(out, 12))  # an interrupted save
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 10]
    assert resolve_resume_checkpoint("latest", out)[0] == 10
    assert resolve_resume_checkpoint("checkpoint-4", out) == (4, os.path.join(out, "checkpoint-4"))
    with pytest.raises(ValueError):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-12.tmp"), out)
    # Re-saving an existing step replaces it.
    os.makedirs(temporary_checkpoint_path(out, 10))
    (tmp_path / "checkpoint-10.tmp" / "state").write_text("new")
    publish_checkpoint(out, 10)
    assert (tmp_path / "checkpoint-10" / "state").read_text() == "new"
    with OutputDirLock(out) as lock:
        assert remove_stale_temporary_checkpoints(out, lock) == [str(tmp_path / "checkpoint-12.tmp")]
    assert prune_checkpoints(out, 2) == [str(tmp_path / "checkpoint-2")]
    assert [s for s, _ in list_checkpoints(out)] == [4, 10]

    progress = TrainingProgress(7, 14, True)
    restored = TrainingProgress()
    restored.load_state_dict(progress.state_dict())
    assert restored == progress


def test_model_card(tmp_path):
    path = write_model_card(
        str(tmp_path), repo_id="user/flowmo-test", stage="pretrain", command="accelerate launch train.py --x 1",
        model_config={"code_length": 8}, training_args={"learning_rate": 1e-4}, final_metrics={"psnr": 12.3456},
        global_step=5, images=["reconstructions.png"], ema=True,
    )
    text = Path(path).read_text()
    for needle in ("library_name: diffusers", "user/flowmo-test", "accelerate launch train.py --x 1", "12.346",
                   "reconstructions.png", '"code_length": 8', "EMA"):
        assert needle in text


# ----------------------------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------------------------


def load_train_script():
    return load_script(SCRIPT)


def test_script_defaults():
    script = load_train_script()
    demo = script.parse_args([])
    # The offline main job: the flowmo-demo preset on held-out-validated zoomed crops, times near noise.
    assert demo.demo and demo.model_config == "flowmo-demo" and demo.perceptual_weight == 0.0
    assert demo.model_config in FLOWMO_PRESETS
    assert demo.max_train_steps == script.DEMO_DEFAULTS["max_train_steps"] and demo.learning_rate == 1e-3
    assert (demo.train_batch_size, demo.logit_mean, demo.random_crop_scale, demo.random_flip) == (16, 3.5, (0.4, 1.0), True)
    assert demo.encoder_freeze_steps == 200_000 and demo.perceptual_network == "lpips-vgg"
    real = script.parse_args(["--dataset_name", "x", "--max_train_steps", "10"])
    assert real.model_config == "flowmo-lo" and real.perceptual_weight == 0.1 and real.validation_steps == 1000
    assert (real.train_batch_size, real.logit_mean, real.random_crop_scale, real.random_flip) == (8, None, None, False)
    post = script.parse_args(["--stage", "posttrain", "--pretrained_model_name_or_path", "p", "--dataset_name", "x",
                              "--max_train_steps", "10"])
    assert (post.learning_rate, post.perceptual_weight, post.perceptual_network, post.encoder_freeze_steps) == (
        5e-5, 0.01, "resnet50", 0)
    explicit = script.parse_args(["--perceptual_weight", "0.1", "--max_train_steps", "3", "--learning_rate", "1e-4"])
    assert (explicit.perceptual_weight, explicit.max_train_steps, explicit.learning_rate) == (0.1, 3, 1e-4)
    assert explicit.demo_defaults_applied == {
        key: value for key, value in script.DEMO_DEFAULTS.items()
        if key not in ("perceptual_weight", "max_train_steps", "learning_rate")
    }
    tiny = script.parse_args(["--model_config", "flowmo-tiny", "--no-random_flip", "--train_batch_size", "2"])
    assert (tiny.model_config, tiny.random_flip, tiny.train_batch_size) == ("flowmo-tiny", False, 2)
    assert "model_config" not in tiny.demo_defaults_applied
    for bad in (["--dataset_name", "x"], ["--stage", "posttrain"], ["--perceptual_random_init", "--perceptual_weights_path", "a"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_script_stops_at_start_up_without_perceptual_weights(tmp_path):
    with pytest.raises(AssertionError) as failure:
        launch(["--dataset_name", "not/used", "--max_train_steps", "1", "--perceptual_weights_path",
                str(tmp_path / "vgg16-397923af.pth"), "--output_dir", str(tmp_path / "out")])
    message = str(failure.value)
    assert "error: LPIPS-VGG backbone" in message and "not found at" in message and "--perceptual_weight 0" in message
    assert "Traceback" not in message.split("error: LPIPS-VGG")[0][-2000:]  # a message, not a stack trace
    assert not (tmp_path / "out" / "model_index.json").exists()


TINY_RUN = [
    "--model_config", "flowmo-tiny", "--train_batch_size", "2", "--num_validation_images", "2", "--validation_inference_steps", "2",
    "--report_to", "none", "--seed", "0", "--debug_checksums",
]
# The uninterrupted reference run: accumulation, EMA, random-init LPIPS, encoder freeze after step 2, checkpoints.
PRETRAIN_RUN = TINY_RUN + [
    "--gradient_accumulation_steps", "2", "--use_ema", "--ema_update_every", "2", "--encoder_freeze_steps", "2",
    "--perceptual_weight", "0.1", "--perceptual_random_init", "--checkpointing_steps", "2", "--validation_steps", "2",
]


def launch(arguments, num_processes=1, env=None, timeout=300):
    return launch_script(SCRIPT, arguments, num_processes=num_processes, env=env, timeout=timeout)


def checksums(output_dir, rank=0):
    return json.loads((Path(output_dir) / "debug_checksums" / f"rank{rank}.json").read_text())


def validation_records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "validation_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """Stage 1A, 4 steps, uninterrupted: the reference for the resume test and the start of stage 1B."""
    output_dir = tmp_path_factory.mktemp("pretrain")
    log = launch(PRETRAIN_RUN + ["--max_train_steps", "4", "--checkpoints_total_limit", "1",
                                 "--output_dir", str(output_dir)])
    return output_dir, log


def test_pretrain_run_writes_pipeline_checkpoints_and_validation(pretrained_run):
    output_dir, log = pretrained_run
    assert "RANDOMLY initialised" in log and "Step 2: encoder frozen" in log
    assert [p.name for p in output_dir.glob("checkpoint-*")] == ["checkpoint-4"]  # limit 1
    checkpoint = output_dir / "checkpoint-4"
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "training_states.json",
                 "training_states.safetensors"):
        assert (checkpoint / name).is_file(), name
    # No pickle that Accelerate would load with weights_only=False.
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    states = json.loads((checkpoint / "training_states.json").read_text())["states"]
    assert sorted(states) == ["ema", "norm_fixer", "progress"] and states["progress"]["global_step"] == 4
    assert (output_dir / "reconstructions.png").is_file() and (output_dir / "validation" / "step-00000002.png").is_file()
    records = validation_records(output_dir)
    assert [r["step"] for r in records] == [0, 2, 4, 4] and records[-1]["final"]
    assert "psnr_ema" in records[1]
    pipeline = FlowMoPipeline.from_pretrained(output_dir)
    # The saved pipeline holds the EMA weights.
    assert checksums(output_dir)["ema"] == load_train_script().weights_checksum(pipeline.autoencoder.parameters())


def test_resume_reproduces_the_uninterrupted_run(pretrained_run, tmp_path):
    reference_dir, _ = pretrained_run
    launch(PRETRAIN_RUN + ["--max_train_steps", "2", "--output_dir", str(tmp_path)])
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    # A save that crashed half-way must be neither resumed from nor kept.
    (tmp_path / "checkpoint-3.tmp").mkdir()
    (tmp_path / "checkpoint-3.tmp" / "model.safetensors").write_bytes(b"garbage")
    log = launch(PRETRAIN_RUN + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                                 "--output_dir", str(tmp_path)])
    # checkpoint-2 was saved after the freeze: the resumed run builds its optimizer without the encoder.
    assert f"Resuming from {tmp_path / 'checkpoint-2'}" in log and "Encoder frozen from the start (step 2" in log
    assert not (tmp_path / "checkpoint-3.tmp").exists()
    assert [r["step"] for r in validation_records(tmp_path)] == [0, 2, 2, 4, 4]  # first run, then the resumed one
    resumed, reference = checksums(tmp_path), checksums(reference_dir)
    assert resumed["step"] == 4
    assert resumed == reference  # bit-identical live and EMA weights


def test_diverged_training_stops_before_checkpointing_the_bad_step(tmp_path):
    """lr 1e30: step 1 is finite and saved; every later step is non-finite: 3 are skipped, the 4th stops the run."""
    with pytest.raises(AssertionError, match=r"TrainingDivergedError: step 2: non-finite loss/gradients 4 steps in a "
                       r"row, more than --max_skipped_steps 3; the last finite checkpoint is .*checkpoint-1"):
        launch(TINY_RUN + ["--max_train_steps", "4", "--learning_rate", "1e30", "--perceptual_weight", "0",
                           "--checkpointing_steps", "1", "--validation_steps", "100", "--output_dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint-1" / "model.safetensors").values())
    assert not (tmp_path / "model_index.json").exists()


def test_posttrain_from_the_pretrained_pipeline(pretrained_run, tmp_path):
    pretrain_dir, _ = pretrained_run
    log = launch(TINY_RUN + ["--stage", "posttrain", "--pretrained_model_name_or_path", str(pretrain_dir),
                             "--max_train_steps", "2", "--perceptual_weight", "0.01", "--perceptual_random_init",
                             "--posttrain_sample_steps", "2", "--gradient_checkpointing", "--mixed_precision", "bf16",
                             "--output_dir", str(tmp_path)])
    assert "Perceptual = 0.01 x resnet50, encoder frozen after 0 steps" in log and "Mixed precision type: bf16" in log
    before = load_file(pretrain_dir / "autoencoder" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    # Stage 1B keeps the encoder frozen (the original post-trains past its 200k-step freeze) and trains the decoder.
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert (tmp_path / "reconstructions.png").is_file()


# Two processes: accumulation, EMA, the encoder freeze at step 2, a checkpoint at step 2 and validations.
TWO_PROCESS_RUN = TINY_RUN + ["--max_train_steps", "4", "--gradient_accumulation_steps", "2", "--use_ema",
                              "--ema_update_every", "2", "--encoder_freeze_steps", "2", "--checkpointing_steps", "2",
                              "--validation_steps", "2"]
FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp")
    log = launch(TWO_PROCESS_RUN + ["--output_dir", str(output_dir)], num_processes=2)
    return output_dir, log


def test_two_processes_keep_identical_weights(two_process_run):
    output_dir, log = two_process_run
    assert "DistributedType.MULTI_CPU" in log and "Num processes: 2" in log and "Step 2: encoder frozen" in log
    rank0, rank1 = checksums(output_dir, 0), checksums(output_dir, 1)
    assert rank0["step"] == 4 and rank0 == rank1
    assert (output_dir / "checkpoint-2" / "random_states_1.pkl").is_file()
    FlowMoPipeline.from_pretrained(output_dir)


@pytest.mark.skipif(
    Version(accelerate.__version__) < Version("1.7.0") or Version(torch.__version__.split("+")[0]) < Version("2.6.0"),
    reason="Accelerate's FSDP2 with full state dicts needs accelerate >= 1.7 and torch >= 2.6 (above setup.py's floors)",
)
def test_fsdp2_equals_ddp_and_resumes_exactly(two_process_run, tmp_path):
    """FSDP2 through Accelerate (switched on for CPU processes by tests/fsdp_on_cpu.py): sharded norm fix, EMA,
    encoder freeze, validation and checkpoints give bit-identical weights to the DDP run, and resume exactly."""
    ddp_dir, _ = two_process_run

    def launch_fsdp(output_dir, *extra):
        return launch_script(FSDP_ON_CPU, [SCRIPT] + TWO_PROCESS_RUN + ["--output_dir", str(output_dir), *extra],
                             num_processes=2)

    log = launch_fsdp(tmp_path / "full")
    assert "FSDP2: sharded parameters" in log and "Step 2: encoder frozen" in log
    assert checksums(tmp_path / "full", 0) == checksums(tmp_path / "full", 1) == checksums(ddp_dir, 0)
    # Checkpoints hold whole tensors (not shards): the same shapes as DDP's.
    fsdp_weights = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    ddp_weights = load_file(ddp_dir / "checkpoint-2" / "model.safetensors")
    assert {k: v.shape for k, v in fsdp_weights.items()} == {k: v.shape for k, v in ddp_weights.items()}
    assert validation_records(tmp_path / "full") == validation_records(ddp_dir)

    (tmp_path / "resumed").mkdir()
    os.rename(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    log = launch_fsdp(tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    assert "Resuming from" in log
    assert checksums(tmp_path / "resumed", 0) == checksums(ddp_dir, 0)
    FlowMoPipeline.from_pretrained(tmp_path / "resumed")


# A stream, 2 processes of 2 DataLoader workers each: 9 one-image shards, 4 or 5 per process and so epochs of 4 or 5
# batches of 1; the checkpoint at step 2 is mid-epoch, the run ends in epoch 1.
STREAMING_RUN = TINY_RUN + ["--train_batch_size", "1", "--streaming", "--dataloader_num_workers", "2",
                            "--shuffle_buffer_size", "3", "--random_flip", "--perceptual_weight", "0",
                            "--checkpointing_steps", "2", "--validation_steps", "100"]


def test_streaming_run_resumes_exactly_from_the_saved_stream_positions(tmp_path):
    launch(STREAMING_RUN + ["--max_train_steps", "6", "--output_dir", str(tmp_path / "full")], num_processes=2)
    launch(STREAMING_RUN + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "resumed")], num_processes=2)
    states = json.loads((tmp_path / "resumed" / "checkpoint-2" / "training_states.json").read_text())["states"]
    assert sorted(states) == ["norm_fixer", "progress", "train_loader"]
    positions = states["train_loader"]["processes"]  # every process' own, each with its workers' positions
    assert [position["batches_consumed"] for position in positions] == [2, 2]
    assert all(position["num_workers"] == 2 and position["dataloader"] for position in positions)
    log = launch(STREAMING_RUN + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest",
                                  "--output_dir", str(tmp_path / "resumed")], num_processes=2)
    assert "Resuming from" in log and "again to resume" not in log  # continued at the positions, nothing read again
    assert checksums(tmp_path / "resumed", 0) == checksums(tmp_path / "resumed", 1) == checksums(tmp_path / "full", 0)


def test_push_to_hub_uploads_pipeline_and_model_card(pretrained_run, tmp_path):
    from hub_stub import LocalHub

    pretrain_dir, _ = pretrained_run
    with LocalHub() as hub:
        hub.add_repo("user/flowmo-pretrain", pretrain_dir)
        env = hub.client_env(tmp_path / "hf_home")
        # Stage 1B from a Hub id, pushed back to the (stand-in) Hub.
        launch(TINY_RUN + ["--stage", "posttrain", "--pretrained_model_name_or_path", "user/flowmo-pretrain",
                           "--max_train_steps", "1", "--perceptual_weight", "0", "--output_dir", str(tmp_path / "out"),
                           "--push_to_hub", "--hub_model_id", "user/flowmo-posttrain", "--hub_token", "hf_test"],
               env=env)
        files = hub.repo_files("user/flowmo-posttrain")
    assert {"model_index.json", "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "reconstructions.png"} <= set(files)
    assert not any(f.startswith(("checkpoint-", "logs/", "debug_checksums/", "validation/")) for f in files)
    card = files["README.md"].decode()
    assert "--stage posttrain" in card and "user/flowmo-pretrain" in card and "psnr" in card


# Learning test: the bare demo command (tiny preset, embedded photographs, lr 1e-3, batch 8), shortened to
# LEARNING_STEPS steps, must raise the PSNR of its 4 validation images by LEARNING_MARGIN_DB. Measured on a 2-core CPU:
# 6.81 -> 11.58 dB (+4.8) with seed 0, +4.4 and +4.5 dB with seeds 1 and 2; about 25 s.
LEARNING_STEPS = 150
LEARNING_MARGIN_DB = 3.0


def test_demo_run_learns_to_reconstruct(tmp_path):
    launch(["--max_train_steps", str(LEARNING_STEPS), "--validation_steps", str(LEARNING_STEPS), "--report_to", "none",
            "--output_dir", str(tmp_path)])
    records = validation_records(tmp_path)
    before, after = records[0], records[-1]
    assert before["step"] == 0 and after["final"] and after["step"] == LEARNING_STEPS
    assert after["psnr"] - before["psnr"] > LEARNING_MARGIN_DB, records


def test_report_to_wandb_logs_figures_offline(tmp_path):
    """--report_to wandb (offline mode: no account, no network): the run, its scalars and the validation grids."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    launch(TINY_RUN + ["--max_train_steps", "2", "--validation_steps", "1", "--report_to", "wandb",
                       "--output_dir", str(tmp_path / "out")], env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    grids = list((runs[0] / "files" / "media" / "images" / "validation").glob("reconstructions_*.png"))
    assert len(grids) >= 3  # steps 0, 1, 2
    assert "validation" in (runs[0] / "files" / "output.log").read_text()


def test_torch_compile_trains_like_eager(tmp_path):
    """--torch_compile (inductor on CPU, about a minute of compilation): 3 steps update the weights as the eager run
    does, up to kernel rounding."""
    common = TINY_RUN + ["--max_train_steps", "3", "--validation_steps", "100"]
    launch(common + ["--output_dir", str(tmp_path / "eager")])
    launch(common + ["--torch_compile", "--output_dir", str(tmp_path / "compiled")], timeout=600)
    eager = load_file(tmp_path / "eager" / "autoencoder" / "diffusion_pytorch_model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert eager.keys() == compiled.keys()  # no "_orig_mod." prefixes in the saved pipeline
    initial = tiny_model(seed=0).state_dict()  # the script's initial weights (set_seed(0), then the config)
    # Adam turns rounding noise in near-zero gradients into whole steps, so compare the updates as a whole.
    update = torch.cat([(eager[k] - initial[k]).flatten() for k in eager])
    difference = torch.cat([(compiled[k] - eager[k]).flatten() for k in eager])
    relative = (difference.norm() / update.norm()).item()
    print(f"|update| = {update.norm():.3e}, |compiled - eager| / |update| = {relative:.2e}")
    assert update.norm() > 0.01 and relative < 1e-3, relative  # measured 6.5e-5


def test_validation_grid_draws_either_range_alike():
    rows = [torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)]
    inside = np.asarray(validation_grid(rows))
    unit = np.asarray(validation_grid([row / 2 + 0.5 for row in rows], value_range=(0.0, 1.0)))
    assert inside.shape == (2 * 4 + 3 * 2, 2 * 4 + 3 * 2, 3)
    assert np.abs(inside.astype(int) - unit.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="value_range"):
        validation_grid(rows, value_range=(0, 255))
