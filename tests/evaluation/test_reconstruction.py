"""End-to-end tests of the tokenizer evaluation (flowmo_diffusers.evaluation.reconstruction, examples/evaluate_flowmo/evaluate.py).

Tiny pipelines (flowmo-tiny, 32x32) reconstruct six small photographs written as an image folder. No pretrained
network can be downloaded here, so the feature networks are randomly initialised through the explicit option
(64-d Inception features keep the matrix square root of rFID cheap), and a few sampler steps suffice: these tests
check the plumbing (data, sharding, noise, gathering, report), not the numbers' meaning.
"""

import json
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("lpips")
pytest.importorskip("pytorch_fid")
pytest.importorskip("matplotlib")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from flowmo_diffusers import FlowMoPipeline  # noqa: E402
from flowmo_diffusers.evaluation.reconstruction import (  # noqa: E402
    GLOBAL_IMAGE_INDEX_COLUMN,
    NOT_COMPARABLE_BANNER,
    EvaluationConfig,
    add_global_image_index,
    build_evaluation_loader,
    evaluate_tokenizers,
    initial_noise_for_images,
    parse_args,
)
from flowmo_diffusers.metrics import MissingPretrainedWeightsError  # noqa: E402

from testing_utils import REPO as REPO_ROOT, tiny_flowmo_pipeline  # noqa: E402
from testing_utils import tiny_flowmo_model

EVALUATE_SCRIPT = REPO_ROOT / "examples" / "evaluate_flowmo" / "evaluate.py"
METRIC_KEYS = ("rfid", "psnr", "ssim", "lpips")
NUM_IMAGES = 6


def _save_tiny_pipeline(folder: Path, context_dim: int) -> Path:
    """flowmo-tiny with ``context_dim`` bits per token, weights perturbed as in conftest's tiny_model."""
    model = tiny_flowmo_model(context_dim=context_dim)
    tiny_flowmo_pipeline(model).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An image folder of six small photographs and two tiny pipelines of different rates, saved to disk."""
    root = tmp_path_factory.mktemp("evaluation")
    image_folder = root / "images"
    image_folder.mkdir()
    photos = [
        skimage_data.astronaut(),
        skimage_data.chelsea(),
        skimage_data.coffee(),
        skimage_data.rocket(),
        skimage_data.camera(),  # grayscale: exercises the conversion to RGB
        skimage_data.hubble_deep_field(),
    ]
    for index, photo in enumerate(photos):
        # Non-square and larger than 32, so resize + center crop both act.
        Image.fromarray(photo).resize((56, 44), Image.BILINEAR).save(image_folder / f"photo_{index}.png")
    return {
        "root": root,
        "images": image_folder,
        # 8 tokens x 12 bits on 32x32 = 0.09375 bpp; 8 x 24 bits = 0.1875 bpp.
        "tiny_a": _save_tiny_pipeline(root / "tiny-a", context_dim=12),
        "tiny_b": _save_tiny_pipeline(root / "tiny-b", context_dim=24),
    }


def _smoke_config(workspace, models, output_dir, **overrides) -> EvaluationConfig:
    settings = dict(
        pretrained_model_name_or_path=[str(workspace[name]) for name in models],
        data_dir=str(workspace["images"]),
        batch_size=4,  # 6 images -> a full and a partial batch
        num_inference_steps=3,  # t = 1, 0.20, 0.01: one step inside the guidance interval
        seed=0,
        random_init_feature_networks=True,
        inception_feature_dims=64,
        lpips_nets=["alex"],
        output_dir=str(output_dir),
    )
    settings.update(overrides)
    return EvaluationConfig(**settings)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def two_model_run(workspace, accelerator):
    output_dir = workspace["root"] / "two_models"
    report = evaluate_tokenizers(_smoke_config(workspace, ["tiny_a", "tiny_b"], output_dir), accelerator)
    return report, output_dir


# --------------------------------------------------------------------------- end to end
def test_report_has_every_metric_in_json_and_markdown(two_model_run):
    report, output_dir = two_model_run
    saved = json.loads((output_dir / "results.json").read_text())
    assert [model["name"] for model in saved["models"]] == ["tiny-a", "tiny-b"]
    for model in saved["models"]:
        for key in METRIC_KEYS:
            assert isinstance(model[key], float) and np.isfinite(model[key]), key
        assert model["num_images"] == NUM_IMAGES and model["num_skipped_images"] == 0
        assert model["settings"]["resolution"] == 32 and model["settings"]["num_processes"] == 1
        assert model["versions"]["torch"] and model["versions"]["flowmo-diffusers"]
        assert model["comparable_to_published_results"] is False
        # Codebook statistics of the ids of every evaluated image (docs/codebook-statistics.md).
        bits = model["model"]["bits_per_subtoken"]
        assert model["codebook_bits_per_id"] == bits
        assert model["codebook_num_ids"] == NUM_IMAGES * model["model"]["code_length"] * model["model"]["context_dim"] // bits
        assert 0 < model["codebook_usage"] <= 1 and model["codebook_usage_per_position_min"] >= 1 / 2**bits
        assert 0 <= model["codebook_entropy_bits"] <= min(bits, np.log2(model["codebook_num_ids"]))
        assert model["codebook_perplexity"] == pytest.approx(2 ** model["codebook_entropy_bits"])
        assert model["codebook_usage"] == model["codebook_num_used"] / 2**bits
    assert [model["bits_per_pixel"] for model in saved["models"]] == [0.09375, 0.1875]
    assert saved["comparable_to_published_results"] is False
    assert saved["warnings"][0] == NOT_COMPARABLE_BANNER
    assert {paper["name"] for paper in saved["paper_results"]} == {"FlowMo-Lo", "FlowMo-Hi"}
    assert saved["models"][0]["rfid"] == report["models"][0]["rfid"]

    markdown = (output_dir / "results.md").read_text()
    assert "WARNING" in markdown and "NOT COMPARABLE" in markdown
    assert (
        "| model | bits/pixel | rFID | PSNR (dB) | SSIM | LPIPS (alex) | codebook usage | entropy (bits) | perplexity "
        "| images |" in markdown
    )
    for model in saved["models"]:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {model['name']} |"))
        assert f"{model['psnr']:.2f}" in row and f"{model['rfid']:.3f}" in row and row.endswith(f"| {NUM_IMAGES} |")
    assert "| FlowMo-Lo (paper) | 0.070 | 0.95 | 22.07 | 0.649 | 0.113 |" in markdown
    print("\n" + markdown)  # the sample report (pytest -s)


def test_rate_distortion_plot_is_written_for_two_models(two_model_run):
    _, output_dir = two_model_run
    plot = output_dir / "rate_distortion.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as image:
        assert image.width > 2 * image.height * 0.9  # two panels side by side


def test_same_seed_gives_identical_numbers(workspace, accelerator, two_model_run):
    first_run = two_model_run[0]["models"][0]  # tiny-a, evaluated before tiny-b in the same run
    again = evaluate_tokenizers(_smoke_config(workspace, ["tiny_a"], workspace["root"] / "again"), accelerator)
    for key in METRIC_KEYS:
        assert again["models"][0][key] == first_run[key], key
    assert not (workspace["root"] / "again" / "rate_distortion.png").exists()  # one model: no plot


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_metrics_of_one(workspace, two_model_run):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): same images, same noise, same numbers."""
    output_dir = workspace["root"] / "two_processes"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(EVALUATE_SCRIPT),
        "--pretrained_model_name_or_path", str(workspace["tiny_a"]),
        "--data_dir", str(workspace["images"]),
        "--batch_size", "4", "--num_inference_steps", "3", "--seed", "0",
        "--random_init_feature_networks", "--inception_feature_dims", "64", "--lpips_nets", "alex",
        "--cpu", "--output_dir", str(output_dir),
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    two_processes = json.loads((output_dir / "results.json").read_text())["models"][0]
    one_process = two_model_run[0]["models"][0]
    assert two_processes["settings"]["num_processes"] == 2
    assert two_processes["num_images"] == one_process["num_images"] == NUM_IMAGES
    # Same images and noise, but differently composed batches: float32 matmuls and convolutions may differ in
    # the last bits (measured: ~1e-8 relative), and the float64 sums are added in another order.
    for key in ("psnr", "ssim", "lpips"):
        assert two_processes[key] == pytest.approx(one_process[key], rel=1e-5), key
    assert two_processes["rfid"] == pytest.approx(one_process["rfid"], rel=1e-5)
    for key in ("codebook_num_ids", "codebook_num_used", "codebook_usage_per_position_mean"):
        assert two_processes[key] == one_process[key], key
    assert two_processes["codebook_entropy_bits"] == pytest.approx(one_process["codebook_entropy_bits"], rel=1e-12)


# --------------------------------------------------------------------------- failures before heavy work
def test_missing_weights_fail_before_data_or_models_are_loaded(workspace, accelerator, monkeypatch, tmp_path):
    import flowmo_diffusers.data as data
    import flowmo_diffusers.evaluation.reconstruction.loop as evaluation

    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded data or a model before checking the metric weights")

    monkeypatch.setattr(data, "load_image_dataset", must_not_run)
    monkeypatch.setattr(evaluation, "load_evaluation_dataset", must_not_run)
    monkeypatch.setattr(FlowMoPipeline, "from_pretrained", must_not_run)

    missing_file = tmp_path / "alexnet-owt-7be5be79.pth"
    config = _smoke_config(
        workspace,
        ["tiny_a"],
        tmp_path / "out",
        random_init_feature_networks=False,
        lpips_alex_weights=str(missing_file),
    )
    with pytest.raises(MissingPretrainedWeightsError, match="alexnet-owt-7be5be79.pth") as raised:
        evaluate_tokenizers(config, accelerator)
    assert "--lpips_alex_weights" in str(raised.value) and "--random_init_feature_networks" in str(raised.value)

    # Nothing given, nothing cached, no network: the torch hub route fails with the same clear error.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    config = _smoke_config(workspace, ["tiny_a"], tmp_path / "out", random_init_feature_networks=False)
    with pytest.raises(MissingPretrainedWeightsError, match="alexnet-owt-7be5be79.pth"):
        evaluate_tokenizers(config, accelerator)
    assert not (tmp_path / "out").exists()


def test_command_line_flags_and_their_validation():
    config = parse_args(
        ["--pretrained_model_name_or_path", "lo", "hi", "--lpips_nets", "alex,vgg", "--psnr_mode", "flowmo_batch",
         "--dataset_name", "ILSVRC/imagenet-1k", "--streaming", "--max_samples", "10"]
    )  # fmt: skip
    assert config.pretrained_model_name_or_path == ["lo", "hi"] and config.lpips_nets == ["alex", "vgg"]
    # The sampler defaults to each decoder's own: the paper's for FlowMo, K passes for a distilled student.
    assert config.resolved_split() == "validation" and config.num_inference_steps is None
    assert config.guidance_scale is None and config.comparable_to_published_results
    with pytest.raises(ValueError, match="random_init_feature_networks"):
        parse_args(["--pretrained_model_name_or_path", "x", "--random_init_feature_networks",
                    "--inception_weights_path", "w.pth"])  # fmt: skip
    with pytest.raises(ValueError, match="one name per model"):
        parse_args(["--pretrained_model_name_or_path", "a", "b", "--model_names", "a"])
    with pytest.raises(ValueError, match="not both"):
        parse_args(["--pretrained_model_name_or_path", "a", "--dataset_name", "d", "--data_dir", "e"])


# --------------------------------------------------------------------------- building blocks
def test_initial_noise_depends_only_on_seed_and_global_index():
    batch = initial_noise_for_images(torch.tensor([5, 2]), seed=3, image_shape=(3, 4, 4))
    alone = initial_noise_for_images(torch.tensor([2]), seed=3, image_shape=(3, 4, 4))
    assert batch.shape == (2, 3, 4, 4) and torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(alone, initial_noise_for_images(torch.tensor([2]), seed=4, image_shape=(3, 4, 4)))


@pytest.mark.parametrize("streaming", [False, True])
def test_each_image_is_evaluated_once_with_its_global_index(streaming):
    from flowmo_diffusers.data import load_image_dataset

    dataset = add_global_image_index(load_image_dataset(streaming=streaming), max_samples=7)
    seen = []
    for process_index in range(2):
        loader = build_evaluation_loader(dataset, 16, 3, process_index=process_index, num_processes=2)
        seen += [index for batch in loader for index in batch["labels"].tolist()]
    assert sorted(seen) == list(range(7))

    single = build_evaluation_loader(dataset, 16, 3)
    indices = [index for batch in single for index in batch["labels"].tolist()]
    assert indices == list(range(7))
    if not streaming:
        assert dataset.features[GLOBAL_IMAGE_INDEX_COLUMN].dtype == "int64"
