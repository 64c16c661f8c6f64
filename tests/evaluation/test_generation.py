"""Generation metrics (gFID, Inception Score), reference statistics, sample.py and evaluate_generation.py.

No pretrained network can be downloaded here, so the Inception is randomly initialised through the explicit option:
the full 2048-d network (with its 1008-way classifier) only where the Inception Score needs it, on at most ten 32x32
images (~6 GFLOP per image after the resize to 299x299), and 64-d first-block features for FID (the matrix square
root of a 2048x2048 product alone takes ~20 s here). The generator is the tiny MaskGiT pipeline of test_maskgit.py
(maskgit-tiny prior on flowmo-tiny, 32x32 images, 10 classes), with few sampler steps: these tests check formulas
and plumbing (order, sharding, seeds, resuming, gathering, files), not the numbers' meaning.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("pytorch_fid")
pytest.importorskip("scipy")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from flowmo_diffusers.evaluation.generation import (  # noqa: E402
    GenerationEvaluationConfig,
    evaluate_generation,
    locate_npz_images,
    parse_args,
)
from flowmo_diffusers.evaluation.sampling import (  # noqa: E402
    SamplingConfig,
    batches_of_process,
    parse_class_ids,
    plan_samples,
    sample_to_folder,
)
from flowmo_diffusers.metrics import (  # noqa: E402
    FIDInceptionFeatureExtractor,
    GenerationMetrics,
    InceptionScore,
    MissingPretrainedWeightsError,
    ReferenceStatistics,
    StreamingFeatureStatistics,
    describe_fid_inception,
    inception_score,
    inception_score_from_logits,
)

from testing_utils import (  # noqa: E402
    EXAMPLES,
    generation_workspace,
)

SAMPLE_SCRIPT, EVALUATE_SCRIPT = EXAMPLES / "train_maskgit" / "sample.py", EXAMPLES / "train_maskgit" / "evaluate_generation.py"
CLASS_IDS, IMAGES_PER_CLASS = [1, 4, 7, 9, 2], 2  # 10 images; deliberately unsorted
SAMPLER_FLAGS = ["--num_inference_steps", "4", "--decoder_num_inference_steps", "2"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny MaskGiT pipeline (testing_utils.tiny_maskgit_pipeline) and an image folder of six photographs."""
    return generation_workspace(tmp_path_factory.mktemp("generation"))


def _sampling_config(workspace, output_dir, **overrides):
    settings = dict(
        pretrained_model_name_or_path=str(workspace["pipeline"]),
        output_dir=str(output_dir),
        class_ids=CLASS_IDS,
        num_images_per_class=IMAGES_PER_CLASS,
        num_inference_steps=4,
        decoder_num_inference_steps=2,
        batch_size=3,  # 10 images: 3 + 3 + 3 + 1
        cpu=True,
    )
    settings.update(overrides)
    return SamplingConfig(**settings)


@pytest.fixture(scope="module")
def samples(workspace, accelerator):
    """sample.py's output (10 images and the .npz) from one in-process run."""
    output_dir = workspace["root"] / "samples"
    npz_path = workspace["root"] / "samples.npz"
    summary = sample_to_folder(_sampling_config(workspace, output_dir, npz_path=str(npz_path)), accelerator)
    return {"dir": output_dir, "npz": npz_path, "summary": summary}


def _evaluation_config(output_dir, **settings):
    settings.setdefault("random_init_feature_networks", True)
    return GenerationEvaluationConfig(output_dir=str(output_dir), cpu=True, batch_size=4, **settings)


@pytest.fixture(scope="module")
def reference_64(workspace, accelerator):
    """64-d reference statistics of the photographs (random Inception), computed in process."""
    path = workspace["root"] / "reference_64.npz"
    config = _evaluation_config(
        workspace["root"] / "reference_report",
        compute_reference_statistics=str(path),
        train_data_dir=str(workspace["photos"]),
        resolution=32,
        inception_feature_dims=64,
    )
    report = evaluate_generation(config, accelerator)
    return {"path": path, "report": report}


@pytest.fixture(scope="module")
def inception_score_of_samples(workspace, samples, accelerator):
    """Inception Score of the samples folder with the full random Inception (the only 2048-d run in process)."""
    config = _evaluation_config(workspace["root"] / "is_report", samples=str(samples["dir"]), inception_score_splits=2)
    return evaluate_generation(config, accelerator)


# --------------------------------------------------------------------------- Inception Score: the formula
def _numpy_inception_score(probabilities, splits):
    """The textbook formula (openai/improved-gan), for strictly positive probabilities."""
    scores = []
    n = len(probabilities)
    for i in range(splits):
        part = probabilities[i * n // splits : (i + 1) * n // splits]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_the_numpy_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(103, 17))  # 103 = uneven splits
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for splits in (1, 3, 10):
        expected = _numpy_inception_score(probabilities, splits)
        assert inception_score(probabilities, splits) == pytest.approx(expected, rel=1e-12)
        assert inception_score_from_logits(torch.tensor(logits), splits) == pytest.approx(expected, rel=1e-10)
    # Shuffling is torch-fidelity's: a RandomState(seed) permutation before splitting.
    permuted = probabilities[np.random.RandomState(2020).permutation(103)]
    assert inception_score(probabilities, 10, shuffle_seed=2020) == pytest.approx(
        _numpy_inception_score(permuted, 10), rel=1e-12
    )
    # Huge logits do not overflow the float64 softmax.
    assert np.isfinite(inception_score_from_logits(logits * 1e3, 10)).all()


def test_inception_score_limits():
    uniform = np.full((40, 1008), 1 / 1008)
    assert inception_score(uniform, 10) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Confident predictions of distinct classes spread evenly over each split: IS = classes per split.
    classes_per_split = 8
    one_hot = np.eye(classes_per_split)[np.tile(np.arange(classes_per_split), 10)]  # 80 samples, 10 splits
    assert inception_score(one_hot, 10) == pytest.approx((classes_per_split, 0.0), abs=1e-9)
    # One class everywhere: IS 1; two splits with 4 and 8 classes: mean 6, std 2.
    assert inception_score(np.eye(5)[np.zeros(20, dtype=int)], 4) == pytest.approx((1.0, 0.0))
    mixed = np.concatenate([np.eye(8)[np.arange(8) % 4], np.eye(8)[np.arange(8)]])
    assert inception_score(mixed, 2) == pytest.approx((6.0, 2.0))


def test_inception_score_rejects_bad_input():
    good = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(good, 10)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(good * 2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5]] * 2), 2)
    with pytest.raises(ValueError, match="non-finite"):
        inception_score_from_logits(np.array([[0.0, np.nan]] * 2), 2)
    with pytest.raises(ValueError, match=r"shape \[N, num_classes\]"):
        inception_score(np.ones(4) / 4, 2)
    with pytest.raises(ValueError, match="positive integer"):
        inception_score(good, 0)


def test_streaming_inception_score_restores_the_global_order():
    logits = torch.randn(12, 6, generator=torch.Generator().manual_seed(0)) * 3
    expected = inception_score_from_logits(logits, 3)  # unshuffled: the order matters
    score = InceptionScore(splits=3, shuffle_seed=None)
    # As two processes holding indices i % 2 == p would, arriving in any order.
    for part in (torch.tensor([5, 1, 9]), torch.tensor([3, 11, 7]), torch.tensor([0, 2, 4, 6, 8, 10])):
        score.update(logits[part], part)
    assert score.num_samples == 12
    assert tuple(score.compute().values()) == pytest.approx(expected, rel=1e-12)
    score.gather()  # single process: nothing to combine
    with pytest.raises(RuntimeError, match="reset"):
        score.update(logits[:1], torch.tensor([0]))
    score.reset()
    score.update(logits[:2], torch.tensor([0, 1]))
    score.update(logits[2:4], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="evaluated twice"):
        score.compute()


# --------------------------------------------------------------------------- Inception logits
def test_inception_returns_logits_of_the_same_pass():
    torch.manual_seed(0)
    inception = FIDInceptionFeatureExtractor(random_init=True)
    images = torch.rand(2, 3, 32, 32)
    features, logits = inception(images, value_range=(0.0, 1.0), return_logits=True)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(features, inception(images, value_range=(0.0, 1.0)), rtol=0, atol=0)
    # The TF Inception Score's logits: pool features times the classifier weights, without its bias.
    torch.testing.assert_close(logits, features @ inception.fc.weight.T)
    assert inception.fc.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="feature_dims=64"):
        FIDInceptionFeatureExtractor(random_init=True, feature_dims=64)(images, return_logits=True)


# --------------------------------------------------------------------------- reference statistics
def test_reference_statistics_round_trip_and_self_fid(tmp_path):
    features = np.random.default_rng(0).gamma(2.0, 0.5, size=(200, 16))
    statistics = StreamingFeatureStatistics(16)
    statistics.update(features)
    reference = ReferenceStatistics.from_feature_statistics(statistics, describe_fid_inception(False, 16))
    path = reference.save(tmp_path / "stats")  # no suffix: written exactly there, not to "stats.npz"
    assert os.listdir(tmp_path) == ["stats"]
    loaded = ReferenceStatistics.load(path, feature_dims=16)
    np.testing.assert_array_equal(loaded.mu, reference.mu)  # float64 round trip: bit-exact
    np.testing.assert_array_equal(loaded.sigma, reference.sigma)
    np.testing.assert_allclose(loaded.mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(loaded.sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)
    assert loaded.num_samples == 200 and loaded.feature_network == reference.feature_network
    assert loaded.frechet_distance(statistics.mean(), statistics.covariance()) == pytest.approx(0.0, abs=1e-8)
    assert loaded.frechet_distance(statistics.mean() + 1, statistics.covariance()) == pytest.approx(16.0, rel=1e-6)
    # pytorch-fid's format (mu, sigma only) and ADM's reference batches (also images in arr_0) load too.
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=loaded.mu, sigma=loaded.sigma)
    adm = ReferenceStatistics.load(tmp_path / "adm.npz")
    assert adm.num_samples is None and adm.feature_network is None
    np.testing.assert_array_equal(adm.sigma, loaded.sigma)


def test_reference_statistics_errors(tmp_path):
    mu, sigma = np.zeros(8), np.eye(8)
    cases = {
        "missing": (None, FileNotFoundError, "does not exist.*VIRTUAL_imagenet256_labeled"),
        "no_stats.npz": (dict(arr_0=np.zeros((2, 4, 4, 3), np.uint8)), ValueError, "no `mu` and `sigma`.*--samples"),
        "shape.npz": (dict(mu=mu, sigma=np.eye(7)), ValueError, r"`sigma` must have shape \[8, 8\]"),
        "mu.npz": (dict(mu=np.zeros((2, 8)), sigma=sigma), ValueError, r"`mu` must have shape \[D\]"),
        "nan.npz": (dict(mu=np.full(8, np.nan), sigma=sigma), ValueError, "non-finite"),
        "dims.npz": (dict(mu=mu, sigma=sigma), ValueError, "8-d features, but the evaluating network gives 2048"),
    }
    for name, (content, error, message) in cases.items():
        if content is not None:
            np.savez(tmp_path / name, **content)
        with pytest.raises(error, match=message):
            ReferenceStatistics.load(tmp_path / name, feature_dims=2048)
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="cannot read reference statistics"):
        ReferenceStatistics.load(tmp_path / "text.npz")
    np.save(tmp_path / "array.npy", mu)
    with pytest.raises(ValueError, match="single array"):
        ReferenceStatistics.load(tmp_path / "array.npy")


def test_generation_metrics_check_their_inputs(tmp_path):
    statistics = ReferenceStatistics(np.zeros(64), np.eye(64), feature_network=describe_fid_inception(False, 64))
    statistics.save(tmp_path / "pretrained_64.npz")
    # Reference statistics are checked before the network is built (which here would need a download).
    with pytest.raises(FileNotFoundError):
        GenerationMetrics(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="random and of the pretrained network"):
        GenerationMetrics(tmp_path / "pretrained_64.npz", device="cpu", random_init=True, inception_feature_dims=64,
                          compute_inception_score=False)  # fmt: skip
    with pytest.raises(ValueError, match="64-d features, but the evaluating network gives 192-d"):
        GenerationMetrics(statistics, device="cpu", random_init=True, inception_feature_dims=192,
                          compute_inception_score=False)  # fmt: skip
    with pytest.raises(ValueError, match="Inception Score needs the 2048-d"):
        GenerationMetrics(device="cpu", random_init=True, inception_feature_dims=64)
    with pytest.raises(MissingPretrainedWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        GenerationMetrics(device="cpu", inception_weights_path=tmp_path / "missing.pth")

    metrics = GenerationMetrics(
        device="cpu", random_init=True, inception_feature_dims=64, compute_inception_score=False
    )
    with pytest.raises(ValueError, match="value_range=\\(-1, 1\\)"):
        metrics.update(torch.rand(2, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        metrics.update(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        metrics.compute()
    # uint8 images, and the same pixels as [-1, 1] floats, give the same features.
    uint8 = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics.update(uint8)
    metrics.update(uint8.float() / 127.5 - 1, value_range=(-1, 1))
    assert metrics.compute() == {"num_images": 6}  # no reference statistics, no Inception Score
    both = metrics.statistics.state()["feature_sum"]
    metrics.reset()
    metrics.update(uint8)
    torch.testing.assert_close(both, 2 * metrics.statistics.state()["feature_sum"])


# --------------------------------------------------------------------------- sample.py
def test_sample_plan_order_names_and_sharding():
    assert parse_class_ids(["3-5", "1,9", "4"]) == [1, 3, 4, 5, 9] and parse_class_ids(None) is None
    with pytest.raises(ValueError, match="ranges"):
        parse_class_ids(["a"])
    plan = plan_samples([7, 2, 4], 2)
    assert [(s.global_index, s.class_id, s.index_in_class) for s in plan] == [
        (0, 2, 0), (1, 4, 0), (2, 7, 0), (3, 2, 1), (4, 4, 1), (5, 7, 1)]  # fmt: skip
    assert sorted(s.file_name() for s in plan) == [s.file_name() for s in plan]  # names sort in global order
    assert plan[4].file_name() == "00001_class0004.png"
    # Global batches are dealt round-robin: their composition does not depend on the number of processes.
    one = list(batches_of_process(plan, 2))
    two = [list(batches_of_process(plan, 2, p, 2)) for p in (0, 1)]
    assert two[0] == one[0::2] and two[1] == one[1::2]


def test_sample_writes_expected_files_deterministically(samples, workspace, accelerator):
    files = sorted(path.name for path in samples["dir"].glob("*.png"))
    assert files == [f"{j:05d}_class{c:04d}.png" for j in range(IMAGES_PER_CLASS) for c in sorted(CLASS_IDS)]
    assert samples["summary"]["num_generated"] == 10 and samples["summary"]["num_existing"] == 0
    with Image.open(samples["dir"] / files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    recorded = json.loads((samples["dir"] / "sampling_config.json").read_text())
    assert recorded["seed"] == 0 and recorded["num_inference_steps"] == 4

    # The .npz holds the same pixels in the same order, plus the labels; it is memory-mappable.
    with np.load(samples["npz"]) as archive:
        images, labels = archive["arr_0"], archive["arr_1"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [int(name.split("class")[1][:4]) for name in files]
    for index in (0, 7):
        np.testing.assert_array_equal(images[index], np.asarray(Image.open(samples["dir"] / files[index])))
    np.testing.assert_array_equal(locate_npz_images(samples["npz"]).open(), images)

    # Another batch size and a subset of the classes with more images each: every shared file is identical
    # (an image depends on (seed, class, index) only).
    other = workspace["root"] / "samples_other"
    sample_to_folder(_sampling_config(workspace, other, batch_size=4, class_ids=[2, 9], num_images_per_class=3),
                     accelerator)  # fmt: skip
    for path in other.glob("*.png"):
        if (samples["dir"] / path.name).exists():
            assert path.read_bytes() == (samples["dir"] / path.name).read_bytes(), path.name
    assert len(list(other.glob("*.png"))) == 6
    # A different seed gives different images.
    reseeded = workspace["root"] / "samples_seed1"
    sample_to_folder(_sampling_config(workspace, reseeded, seed=1, class_ids=[1], num_images_per_class=1), accelerator)
    assert (reseeded / files[0]).read_bytes() != (samples["dir"] / files[0]).read_bytes()


def test_npy_samples_are_memory_mapped_and_read_like_the_npz(samples, tmp_path):
    from flowmo_diffusers.evaluation.generation import sample_file_batches

    with np.load(samples["npz"]) as archive:
        images = archive["arr_0"]
    npy = tmp_path / "samples.npy"
    np.save(npy, images)
    located = locate_npz_images(npy)
    assert isinstance(located.open(), np.memmap) and located.shape == images.shape
    for process in (0, 1):
        from_npy, total_npy = sample_file_batches(npy, 3, process, 2)
        from_npz, total_npz = sample_file_batches(samples["npz"], 3, process, 2)
        assert total_npy == total_npz == 10
        pairs = list(zip(from_npy, from_npz, strict=True))
        assert pairs
        for (npy_indices, npy_images), (npz_indices, npz_images) in pairs:
            assert npy_indices.tolist() == npz_indices.tolist()
            torch.testing.assert_close(npy_images, npz_images, rtol=0, atol=0)
    np.save(tmp_path / "floats.npy", images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\] uint8"):
        locate_npz_images(tmp_path / "floats.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive or a .npy array"):
        locate_npz_images(tmp_path / "text.npz")


def test_sample_resumes_without_regenerating(samples, workspace, accelerator, tmp_path):
    import shutil

    folder = tmp_path / "resumed"
    shutil.copytree(samples["dir"], folder)
    before = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")}
    summary = sample_to_folder(_sampling_config(workspace, folder), accelerator)
    assert summary["num_generated"] == 0 and summary["num_existing"] == 10
    assert {path.name: path.stat().st_mtime_ns for path in folder.glob("*.png")} == before

    # A deleted file (and a leftover temporary file of an interrupted write) -> exactly that file again.
    deleted = folder / "00001_class0004.png"
    deleted.unlink()
    (folder / ".tmp-00001_class0007-crashed.png").write_bytes(b"partial")
    summary = sample_to_folder(_sampling_config(workspace, folder), accelerator)
    assert summary["num_generated"] == 1
    assert deleted.read_bytes() == (samples["dir"] / deleted.name).read_bytes()
    assert not list(folder.glob(".tmp-*"))
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p != deleted} == {
        name: mtime for name, mtime in before.items() if name != deleted.name
    }

    # Resuming with other image-determining settings would mix two samplers: refused.
    with pytest.raises(ValueError, match="guidance_scale: 3.0 in the folder, 2.0 now"):
        sample_to_folder(_sampling_config(workspace, folder, guidance_scale=2.0), accelerator)
    with pytest.raises(ValueError, match=r"--class_ids must lie in \[0, 10\)"):
        sample_to_folder(_sampling_config(workspace, tmp_path / "bad", class_ids=[3, 10]), accelerator)


# --------------------------------------------------------------------------- evaluate_generation.py
def test_inception_score_of_samples(inception_score_of_samples, samples, workspace):
    report = inception_score_of_samples
    metrics = report["metrics"]
    assert metrics["num_images"] == 10 and "gfid" not in metrics
    assert metrics["inception_score"] >= 1.0 and np.isfinite(metrics["inception_score_std"])
    # The score of the network's logits over the images in file-name order (random init, seed 0).
    torch.manual_seed(0)
    inception = FIDInceptionFeatureExtractor(random_init=True)
    images = torch.from_numpy(np.load(samples["npz"])["arr_0"]).permute(0, 3, 1, 2)
    _, logits = inception(images.float() / 255, value_range=(0, 1), return_logits=True)
    expected_mean, expected_std = inception_score_from_logits(logits, splits=2, shuffle_seed=2020)
    # A random network's score is barely above 1: compare the excess (batches of 4 vs 10 differ in the last bits).
    assert metrics["inception_score"] - 1 == pytest.approx(expected_mean - 1, rel=1e-4)
    assert metrics["inception_score_std"] == pytest.approx(expected_std, abs=1e-9)
    assert report["source"]["sampling"]["seed"] == 0 and report["comparable_to_published_results"] is False
    saved = json.loads((workspace["root"] / "is_report" / "results.json").read_text())
    assert saved["metrics"] == metrics and saved["settings"]["inception_score_shuffle_seed"] == 2020
    markdown = (workspace["root"] / "is_report" / "results.md").read_text()
    assert f"| 10 | - | {metrics['inception_score']:.2f} ± {metrics['inception_score_std']:.2f} |" in markdown
    assert "IS over 2 splits, shuffled with seed 2020" in markdown


def test_reference_statistics_and_gfid(reference_64, samples, workspace, accelerator, tmp_path):
    report = reference_64["report"]
    assert report["mode"] == "reference_statistics" and report["metrics"]["num_images"] == 6
    reference = ReferenceStatistics.load(reference_64["path"], feature_dims=64)
    assert reference.num_samples == 6 and reference.feature_network.startswith("RANDOM-INIT")
    saved = json.loads((workspace["root"] / "reference_report" / "results.json").read_text())
    assert saved["source"]["resolution"] == 32 and saved["source"]["interpolation"] == "bicubic"

    # The center crops the reference was computed from, written as "samples": gFID ~ 0.
    from torchvision.transforms import InterpolationMode

    from flowmo_diffusers.data import load_image_dataset
    from flowmo_diffusers.evaluation.reconstruction import add_global_image_index, build_evaluation_loader

    crops = tmp_path / "crops"
    crops.mkdir()
    dataset = add_global_image_index(load_image_dataset(train_data_dir=str(workspace["photos"])))
    for batch in build_evaluation_loader(dataset, 32, 6, interpolation=InterpolationMode.BICUBIC):
        for index, pixels in zip(batch["labels"].tolist(), batch["pixel_values"]):
            uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(uint8).save(crops / f"{index:02d}.png")
    common = dict(reference_statistics=str(reference_64["path"]), inception_feature_dims=64, no_inception_score=True)
    itself = evaluate_generation(_evaluation_config(tmp_path / "self", samples=str(crops), **common), accelerator)
    assert itself["metrics"]["gfid"] == pytest.approx(0.0, abs=1e-3)

    generated = evaluate_generation(_evaluation_config(tmp_path / "gen", samples=str(samples["dir"]), **common),
                                    accelerator)  # fmt: skip
    assert generated["metrics"]["gfid"] > 1.0  # different image sets
    # The .npz and sampling on the fly (no files) give the same images, hence the same numbers.
    from_npz = evaluate_generation(_evaluation_config(tmp_path / "npz", samples=str(samples["npz"]), **common),
                                   accelerator)  # fmt: skip
    on_the_fly = evaluate_generation(
        _evaluation_config(tmp_path / "fly", pretrained_model_name_or_path=str(workspace["pipeline"]),
                           class_ids=CLASS_IDS, num_images_per_class=IMAGES_PER_CLASS, num_inference_steps=4,
                           decoder_num_inference_steps=2, **common),
        accelerator,
    )  # fmt: skip
    for other in (from_npz, on_the_fly):
        assert other["metrics"]["gfid"] == pytest.approx(generated["metrics"]["gfid"], rel=1e-9)
    markdown = (tmp_path / "gen" / "results.md").read_text()
    assert "NOT COMPARABLE" in markdown and "| source | images | gFID | IS |" in markdown
    assert f"| 10 | {generated['metrics']['gfid']:.3f} | - |" in markdown

    # Sample statistics can be saved and used as a reference themselves: gFID 0.
    stats_path = tmp_path / "sample_stats.npz"
    evaluate_generation(_evaluation_config(tmp_path / "save", samples=str(samples["npz"]), inception_feature_dims=64,
                                           no_inception_score=True, save_sample_statistics=str(stats_path)),
                        accelerator)  # fmt: skip
    again = dict(common, reference_statistics=str(stats_path))
    same = evaluate_generation(_evaluation_config(tmp_path / "same", samples=str(samples["dir"]), **again), accelerator)
    assert same["metrics"]["gfid"] == pytest.approx(0.0, abs=1e-3)


def test_evaluate_generation_errors(workspace, samples, accelerator, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --samples"):
        parse_args(["--samples", "a", "--pretrained_model_name_or_path", "b"])
    with pytest.raises(ValueError, match="exactly one of --samples"):
        parse_args([])
    with pytest.raises(ValueError, match="add --no_inception_score"):
        parse_args(["--samples", "a", "--inception_feature_dims", "64"])
    with pytest.raises(ValueError, match="--random_init_feature_networks was given together"):
        parse_args(["--samples", "a", "--random_init_feature_networks", "--inception_weights_path", "w.pth"])
    with pytest.raises(ValueError, match="needs --resolution"):
        parse_args(["--compute_reference_statistics", "o.npz", "--train_data_dir", "d"])
    config = parse_args(["--samples", "a", "--inception_score_shuffle_seed", "-1", "--class_ids", "0-2"])
    assert config.inception_score_shuffle_seed is None and config.class_ids == [0, 1, 2]

    common = dict(inception_feature_dims=64, no_inception_score=True)
    with pytest.raises(ValueError, match="no images"):
        evaluate_generation(_evaluation_config(tmp_path / "r", samples=str(tmp_path), **common), accelerator)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (32, 32)).save(mixed / "a.png")
    Image.new("RGB", (16, 16)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="same size"):
        evaluate_generation(_evaluation_config(tmp_path / "r", samples=str(mixed), **common), accelerator)
    ReferenceStatistics(np.zeros(4), np.eye(4)).save(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match="no `arr_0` images.*--reference_statistics"):
        evaluate_generation(_evaluation_config(tmp_path / "r", samples=str(tmp_path / "stats.npz"), **common),
                            accelerator)  # fmt: skip
    # A bad reference file fails before any sample is read.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_generation(_evaluation_config(tmp_path / "r", samples=str(samples["dir"]),
                                               reference_statistics=str(tmp_path / "none.npz"), **common),
                            accelerator)  # fmt: skip


# --------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_files_and_metrics_of_one(
    workspace, samples, reference_64, inception_score_of_samples, accelerator, tmp_path
):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): sampling, reference statistics, gFID, IS.

    One launch runs the scripts' entry points in sequence (each interpreter start costs ~10 s here).
    """
    out = tmp_path / "two"
    sample_args = ["--pretrained_model_name_or_path", str(workspace["pipeline"]), "--output_dir", str(out / "samples"),
                   "--class_ids", *map(str, CLASS_IDS), "--num_images_per_class", str(IMAGES_PER_CLASS),
                   "--batch_size", "3", "--npz_path", str(out / "samples.npz"), *SAMPLER_FLAGS]  # fmt: skip
    random = ["--random_init_feature_networks", "--batch_size", "4"]
    runs = [
        ("flowmo_diffusers.evaluation.sampling", sample_args),
        ("flowmo_diffusers.evaluation.generation",
         ["--samples", str(out / "samples"), *random, "--inception_score_splits", "2",
          "--output_dir", str(out / "is")]),
        ("flowmo_diffusers.evaluation.generation",
         ["--compute_reference_statistics", str(out / "reference.npz"), "--train_data_dir", str(workspace["photos"]),
          "--resolution", "32", "--inception_feature_dims", "64", *random, "--output_dir", str(out / "reference")]),
        ("flowmo_diffusers.evaluation.generation",
         ["--samples", str(out / "samples.npz"), "--reference_statistics", str(out / "reference.npz"),
          "--inception_feature_dims", "64", "--no_inception_score", *random, "--output_dir", str(out / "gfid")]),
    ]  # fmt: skip
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import importlib, json, sys\n"
        f"for module, argv in json.loads({json.dumps(json.dumps(runs))}):\n"
        "    importlib.import_module(module).main(argv)\n"
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(driver),
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    # Sampling: byte-identical PNGs and .npz.
    names = sorted(path.name for path in samples["dir"].glob("*.png"))
    assert sorted(path.name for path in (out / "samples").glob("*.png")) == names
    for name in names:
        assert (out / "samples" / name).read_bytes() == (samples["dir"] / name).read_bytes(), name
    assert (out / "samples.npz").read_bytes() == samples["npz"].read_bytes()

    # Inception Score: the gathered logits are put back in global order (the random network's score is close to 1,
    # so compare its excess over 1; another split composition changes it by far more than the tolerance).
    two = json.loads((out / "is" / "results.json").read_text())
    one = inception_score_of_samples
    assert two["settings"]["num_processes"] == 2 and two["metrics"]["num_images"] == 10
    assert two["metrics"]["inception_score"] - 1 == pytest.approx(one["metrics"]["inception_score"] - 1, rel=1e-4)

    # Reference statistics summed over processes, and gFID against them.
    two_reference = ReferenceStatistics.load(out / "reference.npz")
    one_reference = ReferenceStatistics.load(reference_64["path"])
    assert two_reference.num_samples == 6
    np.testing.assert_allclose(two_reference.mu, one_reference.mu, rtol=1e-6, atol=1e-9)
    # The features are float32 and each process computes them in other batches: near-zero covariance entries keep
    # only float32 precision relative to the largest ones (torch 2.5/2.6 differ from 2.14 there by ~1.6e-9).
    scale = float(np.abs(one_reference.sigma).max())
    np.testing.assert_allclose(two_reference.sigma, one_reference.sigma, rtol=1e-5, atol=1e-6 * scale)
    two_gfid = json.loads((out / "gfid" / "results.json").read_text())["metrics"]["gfid"]
    one_gfid = evaluate_generation(
        _evaluation_config(tmp_path / "one_gfid", samples=str(samples["npz"]), inception_feature_dims=64,
                           no_inception_score=True, reference_statistics=str(reference_64["path"])),
        accelerator,
    )["metrics"]["gfid"]  # fmt: skip
    assert two_gfid == pytest.approx(one_gfid, rel=1e-5)
