"""Resumable evaluation (flowmo_diffusers.evaluation.resume): a real SIGKILL of a real evaluate.py, then a rerun that
continues where it stopped and ends with the figures of an uninterrupted run; refusals of mismatched reruns.

Tiny pipeline (flowmo-tiny, 32x32), six small photographs, random feature networks with 64-d Inception features,
batches of one image and a state save after every batch, so that the kill lands between saves.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("lpips")
pytest.importorskip("pytorch_fid")
skimage_data = pytest.importorskip("skimage.data")

from flowmo_diffusers.evaluation.reconstruction import EvaluationConfig  # noqa: E402
from flowmo_diffusers.evaluation.resume import PARTIAL_STATE_DIR, PartialEvaluationState, ResumeRefusedError  # noqa: E402
from flowmo_diffusers.metrics import ReconstructionMetrics, StreamingFeatureStatistics  # noqa: E402

from testing_utils import (  # noqa: E402
    EXAMPLES,
    accelerate_command,
    launch,
    kill_at_partial_state,
    save_photographs,
    tiny_flowmo_model,
    tiny_flowmo_pipeline,
)

EVALUATE_SCRIPT = EXAMPLES / "evaluate_flowmo" / "evaluate.py"
NUM_IMAGES = 6


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    images = save_photographs(root / "images")
    tiny_flowmo_pipeline(tiny_flowmo_model(context_dim=12)).save_pretrained(root / "tiny")
    return {"root": root, "images": images, "pipeline": root / "tiny"}


def _arguments(workspace, output_dir, steps=3):
    return ["--pretrained_model_name_or_path", str(workspace["pipeline"]), "--data_dir", str(workspace["images"]),
            "--batch_size", "1", "--num_inference_steps", str(steps), "--seed", "0", "--random_init_feature_networks",
            "--inception_feature_dims", "64", "--lpips_nets", "alex", "--cpu", "--resume_every_batches", "1",
            "--output_dir", str(output_dir)]  # fmt: skip


def _command(arguments, num_processes):
    """`(command, env)` of the script under `accelerate launch`."""
    return accelerate_command(EVALUATE_SCRIPT, arguments, num_processes, env=_environment())


def _environment():
    return dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


def _run(arguments, num_processes=1):
    return launch(EVALUATE_SCRIPT, arguments, num_processes, env=_environment(), timeout=300)


def _run_and_kill(arguments, output_dir, num_processes=1, images_before_kill=2):
    """Start the evaluation, SIGKILL its whole process group once a partial state holds `images_before_kill` images."""
    kill_at_partial_state(*_command(arguments, num_processes), output_dir, num_processes, images_before_kill,
                          timeout=240)


def _metrics(output_dir):
    return json.loads((output_dir / "results.json").read_text())["models"][0]


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    output_dir = workspace["root"] / "uninterrupted"
    _run(_arguments(workspace, output_dir))
    return _metrics(output_dir)


def test_killed_evaluation_resumes_to_the_figures_of_an_uninterrupted_run(workspace, uninterrupted):
    output_dir = workspace["root"] / "killed"
    arguments = _arguments(workspace, output_dir)
    _run_and_kill(arguments, output_dir)
    record = json.loads((output_dir / PARTIAL_STATE_DIR / "process-0.json").read_text())
    assert 2 <= record["images_done"] < NUM_IMAGES and record["num_processes"] == 1
    # Exactly one tensor file: the one the record names (the older ones are removed after the record moved on).
    assert [path.name for path in (output_dir / PARTIAL_STATE_DIR).glob("*.safetensors")] == [record["tensors"]]

    # Other arguments are refused, naming the difference, before any heavy work; the state stays.
    refused = subprocess.run([sys.executable, str(EVALUATE_SCRIPT), *_arguments(workspace, output_dir, steps=2)],
                             capture_output=True, text=True, timeout=120, env=_environment())  # fmt: skip
    assert refused.returncode != 0
    assert "--num_inference_steps: 3 in the saved state, 2 now" in refused.stderr
    assert (output_dir / PARTIAL_STATE_DIR / "process-0.json").is_file()

    log = _run(arguments)
    assert f"resuming at image {record['images_done']} of {NUM_IMAGES}" in log
    resumed = _metrics(output_dir)
    assert resumed["num_images"] == NUM_IMAGES
    # Same batches, same noise, same order of float64 additions: the sums are exact.
    for key in ("psnr", "ssim", "lpips", "codebook_usage", "codebook_entropy_bits", "codebook_perplexity"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["rfid"] == pytest.approx(uninterrupted["rfid"], rel=1e-9, abs=1e-12)
    assert not (output_dir / PARTIAL_STATE_DIR).exists()

    # Finished results are not replaced without --overwrite; with it they are.
    refused = subprocess.run([sys.executable, str(EVALUATE_SCRIPT), *arguments], capture_output=True, text=True,
                             timeout=120, env=_environment())  # fmt: skip
    assert refused.returncode != 0 and "already holds finished results" in refused.stderr
    assert "--overwrite" in refused.stderr


def test_two_processes_resume_and_refuse_another_process_count(workspace, uninterrupted):
    output_dir = workspace["root"] / "killed_two"
    arguments = _arguments(workspace, output_dir)
    _run_and_kill(arguments, output_dir, num_processes=2, images_before_kill=1)
    records = [json.loads((output_dir / PARTIAL_STATE_DIR / f"process-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["num_processes"] == 2 for record in records)

    one = subprocess.run([sys.executable, str(EVALUATE_SCRIPT), *arguments], capture_output=True, text=True,
                         timeout=120, env=_environment())  # fmt: skip
    assert one.returncode != 0 and "--num_processes: 2 in the saved state, 1 now" in one.stderr

    log = _run(arguments, num_processes=2)
    assert "resuming at image" in log
    resumed = _metrics(output_dir)
    assert resumed["num_images"] == NUM_IMAGES and resumed["settings"]["num_processes"] == 2
    # Each process sums its own share in another order than one process does: float64 round-off only.
    for key in ("psnr", "ssim", "lpips", "rfid"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5), key


def test_overwrite_discards_partial_state_of_other_arguments(workspace, tmp_path):
    fingerprint = {"seed": 0}
    state = PartialEvaluationState(tmp_path, fingerprint)
    state.save({"completed_models": [], "model_index": 0, "batches_done": 1, "images_done": 4},
               {"x": torch.ones(2, dtype=torch.float64)})  # fmt: skip
    with pytest.raises(ResumeRefusedError, match="--seed: 0 in the saved state, 1 now"):
        PartialEvaluationState(tmp_path, {"seed": 1}).check()
    PartialEvaluationState(tmp_path, {"seed": 1}).check(overwrite=True)
    record, tensors = PartialEvaluationState(tmp_path, fingerprint).load()
    assert record["images_done"] == 4 and torch.equal(tensors["x"], torch.ones(2, dtype=torch.float64))

    config = EvaluationConfig(pretrained_model_name_or_path=[str(workspace["pipeline"])], output_dir=str(tmp_path),
                              resume_every_batches=0)  # fmt: skip
    with pytest.raises(ValueError, match="--resume_every_batches must be positive"):
        config.validate()


def test_metric_states_round_trip_exactly():
    statistics = StreamingFeatureStatistics(4)
    statistics.update(torch.randn(5, 4))
    restored = StreamingFeatureStatistics(4)
    restored.load_state_dict(statistics.state_dict())
    for key, value in statistics.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key

    metrics = ReconstructionMetrics(device="cpu", random_init=True, inception_feature_dims=64)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    metrics.update(images, images.flip(0))
    other = ReconstructionMetrics(device="cpu", random_init=True, inception_feature_dims=64)
    other.load_state_dict(metrics.state_dict())
    assert all(torch.equal(other.state_dict()[k], v) for k, v in metrics.state_dict().items())
    assert other.compute() == metrics.compute()
