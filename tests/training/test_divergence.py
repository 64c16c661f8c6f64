"""The divergence guard (`flowmo_diffusers.training.divergence`): non-finite steps are skipped up to
`--max_skipped_steps` in a row, and no checkpoint or saved pipeline ever holds a non-finite weight."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers.training.checkpoint_folders import list_checkpoints
from flowmo_diffusers.training.checkpointing import save_checkpoint
from flowmo_diffusers.training.divergence import (
    DivergenceGuard,
    TrainingDivergedError,
    check_finite_weights,
    count_nonfinite,
    gradient_norm,
    nonfinite_flag,
)

from test_checkpointing import training_setup
from test_training import TINY_RUN, checksums, launch


def test_guard_skips_up_to_the_limit_in_a_row_and_resets_on_a_finite_step(tmp_path):
    lines = []
    guard = DivergenceGuard(max_skipped_steps=2, output_dir=str(tmp_path), log=lines.append)
    assert guard.admit(1, 0.0)
    assert not guard.admit(2, 1.0) and not guard.admit(2, 0.5)  # a mean over processes: any positive value
    assert lines == ["step 2 skipped: non-finite loss/gradients (1 in a row)",
                     "step 2 skipped: non-finite loss/gradients (2 in a row)"]
    assert guard.admit(2, 0.0) and guard.skipped_in_a_row == 0 and guard.total_skipped == 2
    assert not guard.admit(3, math.nan)  # a NaN flag (a NaN loss reduced with the flag) counts as non-finite
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-3.tmp").mkdir()  # incomplete: never named
    guard.admit(3, 1.0)
    with pytest.raises(TrainingDivergedError, match=r"step 3: non-finite loss/gradients 3 steps in a row, more than "
                       r"--max_skipped_steps 2; the last finite checkpoint is .*checkpoint-2 \(resume"):
        guard.admit(3, 1.0)
    restored = DivergenceGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_guard_without_checkpoints_says_so_and_checks_its_limit():
    with pytest.raises(TrainingDivergedError, match="step 1: .*more than --max_skipped_steps 0; there is no finite"):
        DivergenceGuard(0).admit(1, 1.0)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_skipped_steps must be an integer >= 0"):
            DivergenceGuard(bad)


def test_flags_and_norms_see_every_nan_and_inf():
    assert nonfinite_flag(torch.tensor(1.0)).item() == 0.0
    assert nonfinite_flag(torch.tensor(float("nan"))).item() == 1.0
    assert nonfinite_flag(torch.tensor(1.0), torch.tensor(float("inf"))).item() == 1.0
    weights = torch.nn.Linear(3, 2)
    weights(torch.randn(4, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in weights.parameters()]).norm()
    torch.testing.assert_close(gradient_norm(weights.parameters()), expected)
    weights.bias.grad[0] = float("inf")
    assert not torch.isfinite(gradient_norm(weights.parameters()))
    assert count_nonfinite([torch.zeros(2), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])]) == 2


def test_save_checkpoint_refuses_non_finite_weights_optimizer_state_and_ema(tmp_path):
    accelerator, model, optimizer, states = training_setup()
    save_checkpoint(accelerator, str(tmp_path), 3, states=states)
    for corrupt, name in ((lambda: model[0].weight, "1 model"),
                          (lambda: next(iter(optimizer.optimizer.state.values()))["exp_avg"], "1 optimizer"),
                          (lambda: states["ema"].ema.shadow_params[0], "1 ema")):
        tensor = corrupt()
        kept = tensor.detach().clone()
        with torch.no_grad():
            tensor.view(-1)[0] = float("nan")
        with pytest.raises(TrainingDivergedError, match=rf"step 4: refusing to save checkpoint-4 \(non-finite values "
                           rf"in {name} tensor\(s\)\); the last finite checkpoint is .*checkpoint-3"):
            save_checkpoint(accelerator, str(tmp_path), 4, states=states)
        with torch.no_grad():
            tensor.copy_(kept)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [3]
    assert not list(tmp_path.glob("checkpoint-4*"))  # nothing was written, not even the temporary folder
    check_finite_weights(accelerator, {"model": model.parameters()}, 4, str(tmp_path), "unused")  # healthy again


def assert_all_finite(folder):
    for path in folder.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_injected_non_finite_steps_are_skipped_and_training_goes_on(tmp_path):
    """Micro-batches 2 and 3 give a NaN loss: both steps are skipped (no update), the run ends at step 4 regardless."""
    log = launch(TINY_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--validation_steps", "100",
                             "--perceptual_weight", "0", "--output_dir", str(tmp_path)],
                 env={**os.environ, "FLOWMO_DEBUG_NONFINITE_BATCHES": "2,3"})
    assert "step 2 skipped: non-finite loss/gradients (1 in a row)" in log
    assert "step 2 skipped: non-finite loss/gradients (2 in a row)" in log
    assert checksums(tmp_path)["step"] == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "model_index.json").is_file()
    assert_all_finite(tmp_path)


def test_too_many_non_finite_steps_stop_the_run_naming_the_last_checkpoint(tmp_path):
    with pytest.raises(AssertionError, match=r"step 2: non-finite loss/gradients 2 steps in a row, more than "
                       r"--max_skipped_steps 1; the last finite checkpoint is .*checkpoint-1"):
        launch(TINY_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "1", "--validation_steps", "100",
                           "--perceptual_weight", "0", "--max_skipped_steps", "1", "--output_dir", str(tmp_path)],
               env={**os.environ, "FLOWMO_DEBUG_NONFINITE_BATCHES": "2,3,4"})
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (tmp_path / "model_index.json").exists()
    assert_all_finite(tmp_path)


def test_infinite_learning_rate_saves_no_checkpoint(tmp_path):
    """The issue's reproduction: `--learning_rate inf --checkpointing_steps 1` used to save 100% NaN weights."""
    with pytest.raises(AssertionError, match=r"TrainingDivergedError: step 1: refusing to save checkpoint-1 "
                       r"\(non-finite values in \d+ model tensor\(s\).*there is no finite checkpoint to resume from"):
        launch(TINY_RUN + ["--max_train_steps", "4", "--learning_rate", "inf", "--checkpointing_steps", "1",
                           "--validation_steps", "100", "--perceptual_weight", "0", "--output_dir", str(tmp_path)])
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "model_index.json").exists()


def test_max_skipped_steps_parser_takes_zero_and_refuses_negatives():
    import argparse

    from flowmo_diffusers.training.arguments import add_divergence_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_divergence_arguments(parser)
    assert parser.parse_args([]).max_skipped_steps == 3
    assert parser.parse_args(["--max_skipped_steps", "0"]).max_skipped_steps == 0
    with pytest.raises(argparse.ArgumentError, match="must be at least 0, got -1"):
        parser.parse_args(["--max_skipped_steps", "-1"])
