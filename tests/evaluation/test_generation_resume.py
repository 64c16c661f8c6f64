"""Resumable generation evaluation (examples/train_maskgit/evaluate_generation.py): a real SIGKILL of a real run that
samples from a pipeline, then a rerun that continues where it stopped and ends with the figures of an uninterrupted
run; the same for two processes; resuming of the samples-folder and reference-statistics modes; refusals; --overwrite.

The generator is the tiny MaskGiT pipeline (maskgit-tiny prior on flowmo-tiny, 32x32 images, 10 classes) with few
sampler steps; the Inception is randomly initialised through the explicit option: the full 2048-d network where the
Inception Score needs it (10 images), 64-d features for gFID. Batches of two images and a state save after every
batch, so that the kill lands between saves.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("pytorch_fid")
pytest.importorskip("scipy")
skimage_data = pytest.importorskip("skimage.data")

from flowmo_diffusers.evaluation.generation import GenerationEvaluationConfig, evaluate_generation  # noqa: E402
from flowmo_diffusers.evaluation.resume import PARTIAL_STATE_DIR, PartialEvaluationState, ResumeRefusedError  # noqa: E402
from flowmo_diffusers.evaluation.sampling import SamplingConfig, sample_to_folder  # noqa: E402
from flowmo_diffusers.metrics import GenerationMetrics, ReferenceStatistics  # noqa: E402

from testing_utils import (  # noqa: E402
    EXAMPLES,
    accelerate_command,
    launch,
    kill_at_partial_state,
    generation_workspace,
)

EVALUATE_SCRIPT = EXAMPLES / "train_maskgit" / "evaluate_generation.py"
CLASS_IDS, IMAGES_PER_CLASS = [1, 4, 7, 9, 2], 2
NUM_IMAGES = len(CLASS_IDS) * IMAGES_PER_CLASS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny MaskGiT pipeline and a folder of six photographs (real images for reference statistics)."""
    return generation_workspace(tmp_path_factory.mktemp("generation_resume"))


# --------------------------------------------------------------------------- real kills of real launches
def _pipeline_arguments(workspace, output_dir, steps=4, overwrite=False):
    """Sample on the fly and report the Inception Score (2048-d) and the samples' own Frechet statistics."""
    arguments = ["--pretrained_model_name_or_path", str(workspace["pipeline"]), "--class_ids", *map(str, CLASS_IDS),
                 "--num_images_per_class", str(IMAGES_PER_CLASS), "--num_inference_steps", str(steps),
                 "--decoder_num_inference_steps", "2", "--batch_size", "2", "--random_init_feature_networks",
                 "--inception_score_splits", "2", "--save_sample_statistics", str(output_dir / "statistics.npz"),
                 "--resume_every_batches", "1", "--cpu", "--output_dir", str(output_dir)]  # fmt: skip
    return arguments + (["--overwrite"] if overwrite else [])


def _command(arguments, num_processes):
    """`(command, env)` of the script under `accelerate launch`."""
    return accelerate_command(EVALUATE_SCRIPT, arguments, num_processes, env=_environment())


def _environment():
    return dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")


def _run(arguments, num_processes=1):
    return launch(EVALUATE_SCRIPT, arguments, num_processes, env=_environment(), timeout=400)


def _refused(arguments):
    """The script without the launcher (one process): it must stop with an error before any heavy work."""
    completed = subprocess.run([sys.executable, str(EVALUATE_SCRIPT), *arguments], capture_output=True, text=True,
                               timeout=120, env=_environment())  # fmt: skip
    assert completed.returncode != 0, completed.stdout[-2000:]
    return completed.stderr


def _run_and_kill(arguments, output_dir, num_processes=1, images_before_kill=4):
    """Start the evaluation, SIGKILL its process group once every process' state holds `images_before_kill` images."""
    kill_at_partial_state(*_command(arguments, num_processes), output_dir, num_processes, images_before_kill,
                          timeout=300)


def _results(output_dir):
    report = json.loads((output_dir / "results.json").read_text())
    return report["metrics"], ReferenceStatistics.load(output_dir / "statistics.npz")


def _assert_same_statistics(resumed, uninterrupted, rtol):
    np.testing.assert_allclose(resumed.mu, uninterrupted.mu, rtol=rtol, atol=rtol * float(np.abs(uninterrupted.mu).max()))
    scale = float(np.abs(uninterrupted.sigma).max())
    np.testing.assert_allclose(resumed.sigma, uninterrupted.sigma, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    output_dir = workspace["root"] / "uninterrupted"
    _run(_pipeline_arguments(workspace, output_dir))
    return _results(output_dir)


def test_killed_pipeline_evaluation_resumes_to_the_figures_of_an_uninterrupted_run(workspace, uninterrupted):
    output_dir = workspace["root"] / "killed"
    arguments = _pipeline_arguments(workspace, output_dir)
    _run_and_kill(arguments, output_dir)
    record = json.loads((output_dir / PARTIAL_STATE_DIR / "process-0.json").read_text())
    assert 4 <= record["images_done"] < NUM_IMAGES and record["batches_done"] == record["images_done"] // 2
    assert record["num_images_total"] == NUM_IMAGES and record["num_processes"] == 1
    # One tensor file, the one the record names: older ones go once the record moved on.
    assert [path.name for path in (output_dir / PARTIAL_STATE_DIR).glob("*.safetensors")] == [record["tensors"]]

    # Other arguments are refused, naming the difference, before any heavy work; the state stays.
    stderr = _refused(_pipeline_arguments(workspace, output_dir, steps=3))
    assert "--num_inference_steps: 4 in the saved state, 3 now" in stderr and "--overwrite" in stderr
    assert (output_dir / PARTIAL_STATE_DIR / "process-0.json").is_file()

    log = _run(arguments)
    assert f"resuming at image {record['images_done']} of {NUM_IMAGES}" in log
    (metrics, statistics), (expected_metrics, expected_statistics) = _results(output_dir), uninterrupted
    # The same images in the same batches through the same network, summed in the same order: the Inception Score
    # (from the saved float32 logits) is exact, the Frechet statistics are the same float64 sums.
    assert metrics == expected_metrics
    _assert_same_statistics(statistics, expected_statistics, rtol=1e-12)
    assert not (output_dir / PARTIAL_STATE_DIR).exists()

    # Finished results are refused without --overwrite.
    stderr = _refused(arguments)
    assert "already holds finished results" in stderr and "--overwrite" in stderr


def test_two_processes_resume_and_refuse_another_process_count(workspace, uninterrupted):
    output_dir = workspace["root"] / "killed_two"
    arguments = _pipeline_arguments(workspace, output_dir)
    _run_and_kill(arguments, output_dir, num_processes=2, images_before_kill=2)
    records = [json.loads((output_dir / PARTIAL_STATE_DIR / f"process-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["num_processes"] == 2 and record["images_done"] >= 2 for record in records)

    stderr = _refused(arguments)
    assert "--num_processes: 2 in the saved state, 1 now" in stderr

    log = _run(arguments, num_processes=2)
    done = sum(record["images_done"] for record in records)
    assert f"resuming at image {done} of {NUM_IMAGES}" in log
    (metrics, statistics), (expected_metrics, expected_statistics) = _results(output_dir), uninterrupted
    report = json.loads((output_dir / "results.json").read_text())
    assert report["settings"]["num_processes"] == 2 and metrics["num_images"] == NUM_IMAGES
    # The same batches (global batch b goes to process b % 2), each process sums its share: float64 round-off only.
    assert metrics["inception_score"] == pytest.approx(expected_metrics["inception_score"], rel=1e-9)
    assert metrics["inception_score_std"] == pytest.approx(expected_metrics["inception_score_std"], rel=1e-6, abs=1e-12)
    _assert_same_statistics(statistics, expected_statistics, rtol=1e-9)


# --------------------------------------------------------------------------- the other modes, interrupted in process
class Interrupted(Exception):
    pass


def _interrupt_after_saves(monkeypatch, saves):
    """Make the run stop right after its `saves`-th state save, as a kill between two batches would."""
    original = PartialEvaluationState.save
    count = {"saves": 0}

    def save(self, position, tensors):
        original(self, position, tensors)
        count["saves"] += 1
        if count["saves"] == saves:
            raise Interrupted(position)

    monkeypatch.setattr(PartialEvaluationState, "save", save)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _config(output_dir, **settings):
    defaults = dict(random_init_feature_networks=True, inception_feature_dims=64, no_inception_score=True,
                    batch_size=2, resume_every_batches=1, cpu=True)  # fmt: skip
    return GenerationEvaluationConfig(output_dir=str(output_dir), **{**defaults, **settings})


@pytest.fixture(scope="module")
def reference(workspace, accelerator):
    """64-d reference statistics of the photographs, uninterrupted, in process."""
    path = workspace["root"] / "reference.npz"
    config = _config(workspace["root"] / "reference_report", compute_reference_statistics=str(path),
                     train_data_dir=str(workspace["photos"]), resolution=32)  # fmt: skip
    report = evaluate_generation(config, accelerator)
    return {"path": path, "statistics": ReferenceStatistics.load(path), "report": report}


def test_reference_statistics_resume(workspace, reference, accelerator, monkeypatch, caplog, tmp_path):
    out = tmp_path / "reference.npz"

    def config():
        return _config(tmp_path / "report", compute_reference_statistics=str(out),
                       train_data_dir=str(workspace["photos"]), resolution=32)  # fmt: skip

    with monkeypatch.context() as patch:
        _interrupt_after_saves(patch, saves=1)
        with pytest.raises(Interrupted):
            evaluate_generation(config(), accelerator)
    assert not out.exists() and (tmp_path / "report" / PARTIAL_STATE_DIR / "process-0.json").is_file()
    with caplog.at_level("INFO", logger="flowmo_diffusers.evaluation.generation"):
        report = evaluate_generation(config(), accelerator)
    assert "resuming at image 2 of 6" in caplog.text
    assert report["metrics"] == reference["report"]["metrics"]
    resumed = ReferenceStatistics.load(out)
    assert resumed.num_samples == 6
    _assert_same_statistics(resumed, reference["statistics"], rtol=1e-12)


@pytest.fixture(scope="module")
def samples(workspace, accelerator):
    """sample.py's folder of the ten images, in process."""
    folder = workspace["root"] / "samples"
    sample_to_folder(SamplingConfig(pretrained_model_name_or_path=str(workspace["pipeline"]), output_dir=str(folder),
                                    class_ids=CLASS_IDS, num_images_per_class=IMAGES_PER_CLASS, num_inference_steps=4,
                                    decoder_num_inference_steps=2, batch_size=5, cpu=True), accelerator)  # fmt: skip
    return folder


def test_samples_folder_resumes_refuses_and_overwrites(samples, reference, accelerator, monkeypatch, caplog, tmp_path):
    def config(**settings):
        return _config(tmp_path / "eval", samples=str(samples), reference_statistics=str(reference["path"]), **settings)

    expected = evaluate_generation(_config(tmp_path / "whole", samples=str(samples),
                                           reference_statistics=str(reference["path"])), accelerator)  # fmt: skip
    with monkeypatch.context() as patch:
        _interrupt_after_saves(patch, saves=2)
        with pytest.raises(Interrupted):
            evaluate_generation(config(), accelerator)

    # A folder that changed since is refused, naming the counts; another argument too, each before any batch.
    moved = samples.parent / "moved.png"
    first = sorted(samples.glob("*.png"))[-1]
    first.rename(moved)
    try:
        with pytest.raises(ResumeRefusedError, match=f"{NUM_IMAGES} images in the saved state, {NUM_IMAGES - 1} now"):
            evaluate_generation(config(), accelerator)
    finally:
        moved.rename(first)
    with pytest.raises(ResumeRefusedError, match="--batch_size: 2 in the saved state, 5 now"):
        evaluate_generation(config(batch_size=5), accelerator)

    # The same arguments resume (--overwrite included: a state that fits is never discarded) to the same figures.
    with caplog.at_level("INFO", logger="flowmo_diffusers.evaluation.generation"):
        resumed = evaluate_generation(config(overwrite=True), accelerator)
    assert f"resuming at image 4 of {NUM_IMAGES}" in caplog.text
    assert resumed["metrics"]["num_images"] == NUM_IMAGES
    assert resumed["metrics"]["gfid"] == pytest.approx(expected["metrics"]["gfid"], rel=1e-12)
    assert not (tmp_path / "eval" / PARTIAL_STATE_DIR).exists()

    # Finished results: refused, or replaced with --overwrite (from the start: nothing to resume).
    with pytest.raises(ResumeRefusedError, match="already holds finished results.*--overwrite"):
        evaluate_generation(config(), accelerator)
    caplog.clear()
    with caplog.at_level("INFO", logger="flowmo_diffusers.evaluation.generation"):
        again = evaluate_generation(config(overwrite=True), accelerator)
    assert "resuming" not in caplog.text and again["metrics"] == resumed["metrics"]

    # Partial state of other arguments is discarded with --overwrite and the run starts over.
    with monkeypatch.context() as patch:
        _interrupt_after_saves(patch, saves=1)
        with pytest.raises(Interrupted):
            evaluate_generation(config(overwrite=True, max_samples=6), accelerator)
    assert not (tmp_path / "eval" / "results.json").exists()  # the finished results went with --overwrite
    caplog.clear()
    with caplog.at_level("INFO", logger="flowmo_diffusers.evaluation.generation"):
        fresh = evaluate_generation(config(overwrite=True), accelerator)
    assert "resuming" not in caplog.text and fresh["metrics"] == resumed["metrics"]


# --------------------------------------------------------------------------- the pieces
def _random_generation_metrics(**settings):
    torch.manual_seed(0)  # the same random network each time
    return GenerationMetrics(device="cpu", random_init=True, **settings)


def test_generation_metric_state_round_trips_exactly():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics = _random_generation_metrics(inception_score_splits=1)
    metrics.update(images[:2], sample_indices=torch.tensor([4, 0]))
    restored = _random_generation_metrics(inception_score_splits=1)
    restored.load_state_dict(metrics.state_dict())
    for key, value in metrics.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    for accumulated in (metrics, restored):
        accumulated.update(images[2:], sample_indices=torch.tensor([2]))
    assert restored.compute() == metrics.compute()
    # Empty state (a save before any batch) and a state of other settings.
    empty = _random_generation_metrics(inception_score_splits=1)
    empty.load_state_dict(empty.state_dict())
    assert int(empty.num_images) == 0 and empty.inception_score.num_samples == 0
    without_score = _random_generation_metrics(inception_feature_dims=64, compute_inception_score=False)
    with pytest.raises(ValueError, match="with the Inception Score, these metrics compute it not"):
        without_score.load_state_dict(metrics.state_dict())


def test_check_reads_every_process_record_and_overwrite_keeps_a_fitting_state(tmp_path):
    # A run killed before process 0 first saved leaves only process 1's state: still refused under other arguments.
    PartialEvaluationState(tmp_path, {"seed": 0}, process_index=1, num_processes=2).save(
        {"batches_done": 1, "images_done": 2}, {"x": torch.zeros(1)}
    )
    with pytest.raises(ResumeRefusedError, match="--seed: 0 in the saved state, 1 now"):
        PartialEvaluationState(tmp_path, {"seed": 1}, process_index=0, num_processes=2).check()
    assert PartialEvaluationState(tmp_path, {"seed": 1}, num_processes=2).check(overwrite=True) is True
    assert PartialEvaluationState(tmp_path, {"seed": 0}, num_processes=2).check(overwrite=True) is False
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "results.md").write_text("#")
    state = PartialEvaluationState(tmp_path, {"seed": 0}, num_processes=2)
    assert state.check(overwrite=True) is True
    state.discard()
    assert not any(tmp_path.iterdir())
