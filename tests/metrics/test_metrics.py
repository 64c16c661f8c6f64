"""Tests for flowmo_diffusers.metrics (rFID, PSNR, SSIM, LPIPS and their evaluate modules).

No pretrained network can be downloaded in CI, so networks are built with their explicit
random-initialisation options; loading real weights is tested with locally saved random
state dicts of the same architecture, and missing weights must raise a clear error.
"""

import json
import os
import subprocess
import sys
import textwrap
import urllib.error

import numpy as np
import pytest
import torch

from flowmo_diffusers.metrics import (
    IMAGE_PAIR_METRICS,
    FIDInceptionFeatureExtractor,
    LPIPSDistance,
    MissingPretrainedWeightsError,
    ReconstructionMetrics,
    StreamingFeatureStatistics,
    build_fid_inception_v3,
    bundled_metric_path,
    frechet_distance,
    images_to_uint8_hwc,
    psnr_per_image,
    psnr_pooled_over_batch,
    ssim_per_image,
    sum_across_processes,
)

skimage_data = pytest.importorskip("skimage.data")
skimage_metrics = pytest.importorskip("skimage.metrics")


# --------------------------------------------------------------------------- helpers
def closed_form_frechet_distance_commuting(mu1, eigenvalues1, mu2, eigenvalues2):
    """FID for covariances sharing eigenvectors: ||mu1-mu2||^2 + sum_i (sqrt(l1_i) - sqrt(l2_i))^2."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eigenvalues1) - np.sqrt(eigenvalues2)) ** 2))


def random_rotation(dims, rng):
    q, r = np.linalg.qr(rng.standard_normal((dims, dims)))
    return q * np.sign(np.diag(r))


def real_image_batch(size=64):
    """Three natural images from scikit-image, [3, 3, size, size] in [-1, 1]."""
    images = []
    for image in (skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()):
        step = min(image.shape[0], image.shape[1]) // size
        images.append(image[: size * step : step, : size * step : step])
    uint8 = np.stack(images)  # [3, size, size, 3]
    return torch.from_numpy(uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def perturbed(images, noise_std=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (images + noise_std * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def flowmo_paper_float_images(images):
    """FlowMo evaluate.py's PSNR/SSIM input, written out independently of the package."""
    unit = (images.clamp(-1.0, 1.0) + 1) / 2
    quantised = (unit * 255.0).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()
    return quantised.astype(np.float32) / 255.0


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    variances1, variances2 = rng.uniform(0.5, 3.0, 8), rng.uniform(0.5, 3.0, 8)
    distance = frechet_distance(mu1, np.diag(variances1), mu2, np.diag(variances2))
    # sqrtm of a diagonal matrix is exact up to rounding, so only float64 round-off remains.
    assert distance == pytest.approx(
        closed_form_frechet_distance_commuting(mu1, variances1, mu2, variances2), rel=1e-12
    )


def test_frechet_distance_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    dims = 16
    rotation = random_rotation(dims, rng)
    eigenvalues1, eigenvalues2 = rng.uniform(0.1, 4.0, dims), rng.uniform(0.1, 4.0, dims)
    sigma1 = rotation @ np.diag(eigenvalues1) @ rotation.T
    sigma2 = rotation @ np.diag(eigenvalues2) @ rotation.T
    mu1, mu2 = rng.standard_normal(dims), rng.standard_normal(dims)
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    # Well-conditioned 16x16 matrices: the Schur square root is accurate to ~1e-13 relative.
    assert distance == pytest.approx(
        closed_form_frechet_distance_commuting(mu1, eigenvalues1, mu2, eigenvalues2), rel=1e-9
    )
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------- streaming statistics
def test_streaming_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(2)
    features = 3.0 + rng.standard_normal((257, 12)) @ rng.standard_normal((12, 12))
    statistics = StreamingFeatureStatistics(12)
    for batch in np.array_split(features, [5, 100, 101, 200]):  # uneven batches, one of size 1
        statistics.update(torch.from_numpy(batch).float() if len(batch) == 5 else batch)
    features[:5] = features[:5].astype(np.float32)  # the first batch went in as float32
    assert int(statistics.num_samples) == 257
    np.testing.assert_allclose(statistics.mean(), np.mean(features, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(statistics.covariance(), np.cov(features, rowvar=False), rtol=1e-10, atol=1e-11)


def test_streaming_fid_of_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(3)
    dims, num_samples = 4, 20000
    rotation = random_rotation(dims, rng)
    eigenvalues1, eigenvalues2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(dims), np.array([1.0, -0.5, 0.0, 0.25])
    samples1 = mu1 + (rng.standard_normal((num_samples, dims)) * np.sqrt(eigenvalues1)) @ rotation.T
    samples2 = mu2 + (rng.standard_normal((num_samples, dims)) * np.sqrt(eigenvalues2)) @ rotation.T
    statistics1, statistics2 = StreamingFeatureStatistics(dims), StreamingFeatureStatistics(dims)
    for chunk1, chunk2 in zip(np.array_split(samples1, 7), np.array_split(samples2, 7)):
        statistics1.update(chunk1)
        statistics2.update(chunk2)

    streamed = statistics1.frechet_distance(statistics2)
    # Exact part: the streamed statistics give the same FID as np.mean / np.cov of all samples.
    from_numpy = frechet_distance(
        samples1.mean(0), np.cov(samples1, rowvar=False), samples2.mean(0), np.cov(samples2, rowvar=False)
    )
    assert streamed == pytest.approx(from_numpy, rel=1e-10)
    # Statistical part: the true FID is ~1.9; with N = 20000 samples per set the estimator's
    # error is O(trace(sigma) * sqrt(dims / N)) ~ 0.07 at most, dominated by the squared
    # mean difference (std ~ 2 |dmu| sqrt(2 * 2 / N) ~ 0.02). 0.1 is a > 4-sigma bound.
    expected = closed_form_frechet_distance_commuting(mu1, eigenvalues1, mu2, eigenvalues2)
    assert streamed == pytest.approx(expected, abs=0.1)


def test_fid_of_a_feature_set_against_itself_is_zero():
    rng = np.random.default_rng(4)
    features = rng.gamma(2.0, 0.5, size=(300, 32))  # non-negative like Inception pool features
    statistics1, statistics2 = StreamingFeatureStatistics(32), StreamingFeatureStatistics(32)
    statistics1.update(features)
    statistics2.update(features[::-1].copy())  # order must not matter
    assert statistics1.frechet_distance(statistics2) == pytest.approx(0.0, abs=1e-9)


def test_merging_two_halves_equals_the_whole():
    rng = np.random.default_rng(5)
    features = rng.standard_normal((101, 10)) + 1.0
    whole, first_half, second_half = (StreamingFeatureStatistics(10) for _ in range(3))
    whole.update(features)
    first_half.update(features[:40])
    second_half.update(features[40:])

    merged = StreamingFeatureStatistics.from_state(first_half.state()).merge(second_half)
    assert int(merged.num_samples) == 101
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-11, atol=1e-13)
    # state() returns copies: mutating it leaves the accumulator untouched.
    state = first_half.state()
    state["feature_sum"].zero_()
    assert float(first_half.feature_sum.abs().sum()) > 0


def test_statistics_reject_wrong_feature_dimension():
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        StreamingFeatureStatistics(8).update(np.zeros((2, 9)))


class TwoIdenticalProcessesAccelerator:
    """Stands in for an ``accelerate.Accelerator`` in a 2-process run where both processes saw the same data."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self):
        self.reduced_tensors = 0

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        self.reduced_tensors += 1
        return tensor * 2


def test_sum_across_processes_paths():
    tensor = torch.arange(3, dtype=torch.float64)
    assert torch.equal(sum_across_processes(tensor, TwoIdenticalProcessesAccelerator()), 2 * tensor)
    # A single process (no process group) returns an independent copy.
    copy = sum_across_processes(tensor)
    assert torch.equal(copy, tensor) and copy.data_ptr() != tensor.data_ptr()

    accelerate = pytest.importorskip("accelerate")
    assert torch.equal(sum_across_processes(tensor, accelerate.Accelerator(cpu=True)), tensor)


# --------------------------------------------------------------------------- PSNR / SSIM
def test_images_to_uint8_truncates_like_flowmo():
    images = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    # (x + 1) / 2 * 255 = 0, 0, 127.5, 254.87, 255, 255 -> truncated, not rounded.
    assert images_to_uint8_hwc(images)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_psnr_and_ssim_equal_scikit_image_on_real_images():
    originals = real_image_batch()
    reconstructions = perturbed(originals)
    originals_float, reconstructions_float = flowmo_paper_float_images(originals), flowmo_paper_float_images(
        reconstructions
    )

    expected_psnr = [
        skimage_metrics.peak_signal_noise_ratio(o, r) for o, r in zip(originals_float, reconstructions_float)
    ]
    expected_ssim = [
        skimage_metrics.structural_similarity(r, o, data_range=1.0, channel_axis=-1)
        for o, r in zip(originals_float, reconstructions_float)
    ]
    np.testing.assert_array_equal(psnr_per_image(originals, reconstructions), expected_psnr)
    np.testing.assert_array_equal(ssim_per_image(originals, reconstructions), expected_ssim)
    # FlowMo's released code evaluated PSNR on the whole batch at once.
    assert psnr_pooled_over_batch(originals, reconstructions) == skimage_metrics.peak_signal_noise_ratio(
        originals_float, reconstructions_float
    )

    # The float path equals scikit-image on the uint8 images with data_range=255 up to float32 rounding.
    originals_uint8, reconstructions_uint8 = images_to_uint8_hwc(originals), images_to_uint8_hwc(reconstructions)
    uint8_psnr = [
        skimage_metrics.peak_signal_noise_ratio(o, r, data_range=255)
        for o, r in zip(originals_uint8, reconstructions_uint8)
    ]
    uint8_ssim = [
        skimage_metrics.structural_similarity(o, r, data_range=255, channel_axis=-1)
        for o, r in zip(originals_uint8, reconstructions_uint8)
    ]
    np.testing.assert_allclose(psnr_per_image(originals, reconstructions), uint8_psnr, rtol=1e-5)
    np.testing.assert_allclose(ssim_per_image(originals, reconstructions), uint8_ssim, rtol=1e-5)

    assert 20 < min(expected_psnr) < 40 and 0.3 < min(expected_ssim) < 1.0  # sanity: a real, mild perturbation
    assert np.all(ssim_per_image(originals, originals) == 1.0)


def test_psnr_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        psnr_per_image(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr_per_image(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# --------------------------------------------------------------------------- LPIPS
def test_lpips_random_init_is_zero_for_identical_images_and_positive_otherwise():
    torch.manual_seed(0)
    lpips_alex = LPIPSDistance(net="alex", pretrained=False)
    originals = real_image_batch(size=64)[:2]
    identical = lpips_alex(originals, originals.clone())
    different = lpips_alex(originals, perturbed(originals, noise_std=0.2))
    assert identical.shape == (2,) and different.shape == (2,)
    assert torch.all(identical == 0)
    assert torch.all(different > 0)


def test_lpips_loads_backbone_weights_from_a_local_file(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    torchvision_state = {
        key: value for key, value in alexnet(weights=None).state_dict().items() if key.startswith("features.")
    }
    weights_path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision_state, weights_path)

    lpips_alex = LPIPSDistance(net="alex", pretrained=True, backbone_weights_path=weights_path)
    trunk = lpips_alex.lpips_model.net
    assert torch.equal(getattr(trunk.slice1, "0").weight, torchvision_state["features.0.weight"])
    assert torch.equal(getattr(trunk.slice5, "10").bias, torchvision_state["features.10.bias"])
    # The calibrated linear heads are the ones shipped with the lpips package.
    import lpips

    packaged = torch.load(
        os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/alex.pth"), map_location="cpu", weights_only=True
    )
    assert torch.equal(lpips_alex.lpips_model.lin0.model[1].weight, packaged["lin0.model.1.weight"])


def test_lpips_missing_weights_raise_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MissingPretrainedWeightsError, match=r"alexnet-owt-7be5be79\.pth.*backbone_weights_path"):
        LPIPSDistance(net="alex", backbone_weights_path=tmp_path / "missing.pth")

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingPretrainedWeightsError) as error:
        LPIPSDistance(net="vgg")
    message = str(error.value)
    assert "vgg16-397923af.pth" in message and "backbone_weights_path" in message
    assert os.path.join(str(tmp_path / "torch_home"), "hub", "checkpoints") in message


# --------------------------------------------------------------------------- FID Inception
def test_inception_random_init_gives_2048_features_identical_to_pytorch_fid(monkeypatch):
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(0)
    ours = FIDInceptionFeatureExtractor(random_init=True)
    # pytorch-fid's own InceptionV3 (FlowMo's network), built around a fresh architecture
    # instead of downloading, then given our random weights.
    monkeypatch.setattr(pytorch_fid_inception, "fid_inception_v3", build_fid_inception_v3)
    pytorch_fid_model = pytorch_fid_inception.InceptionV3([3]).eval()
    pytorch_fid_model.blocks.load_state_dict(ours.blocks.state_dict())

    images = torch.rand(2, 3, 40, 24) * 2 - 1
    features = ours(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and not torch.equal(features[0], features[1])
    with torch.no_grad():
        expected = pytorch_fid_model((images + 1) / 2)[0].flatten(1)  # FlowMo fed [0, 1] images
    assert torch.equal(features, expected)


def test_inception_loads_weights_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    state_dict = build_fid_inception_v3().state_dict()
    weights_path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state_dict, weights_path)
    inception = FIDInceptionFeatureExtractor(weights_path=weights_path)
    mixed_7c = inception.blocks[3][2]
    assert torch.equal(mixed_7c.branch_pool.conv.weight, state_dict["Mixed_7c.branch_pool.conv.weight"])
    assert torch.equal(inception.blocks[0][0].bn.running_var, state_dict["Conv2d_1a_3x3.bn.running_var"])


def test_inception_accepts_unit_range_input_and_smaller_feature_dims():
    torch.manual_seed(0)
    inception = FIDInceptionFeatureExtractor(random_init=True, feature_dims=64)  # first block only: cheap
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    features = inception(images)
    assert features.shape == (2, 64)
    # [0, 1] input with value_range=(0, 1) is the same computation as [-1, 1] input.
    torch.testing.assert_close(inception((images + 1) / 2, value_range=(0.0, 1.0)), features)
    with pytest.raises(ValueError, match="value_range"):
        inception(images, value_range=(0, 255))


def test_inception_missing_weights_raise_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MissingPretrainedWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth.*weights_path"):
        FIDInceptionFeatureExtractor(weights_path=tmp_path / "missing.pth")

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(MissingPretrainedWeightsError, match=r"downloading https://github\.com/mseitzer/pytorch-fid"):
        FIDInceptionFeatureExtractor()
    with pytest.raises(ValueError, match="random_init"):
        FIDInceptionFeatureExtractor(weights_path=tmp_path / "x.pth", random_init=True)


# --------------------------------------------------------------------------- ReconstructionMetrics
def test_reconstruction_metrics_match_the_individual_metrics():
    torch.manual_seed(0)
    metrics = ReconstructionMetrics(
        lpips_nets=("alex", "vgg"), device="cpu", random_init=True, inception_feature_dims=64
    )
    batches = [real_image_batch(size=32), real_image_batch(size=32).flip(-1)[:2]]
    reconstructions = [perturbed(batch, seed=index) for index, batch in enumerate(batches)]
    for originals, reconstructed in zip(batches, reconstructions):
        metrics.update(originals, reconstructed)
    results = metrics.compute()
    assert set(results) == {"rfid", "psnr", "ssim", "lpips", "lpips_vgg"}

    all_originals, all_reconstructions = torch.cat(batches), torch.cat(reconstructions)
    assert results["psnr"] == pytest.approx(psnr_per_image(all_originals, all_reconstructions).mean(), rel=1e-12)
    assert results["ssim"] == pytest.approx(ssim_per_image(all_originals, all_reconstructions).mean(), rel=1e-12)
    for key, net in (("lpips", "alex"), ("lpips_vgg", "vgg")):
        expected_lpips = metrics.lpips_models[net](all_originals, all_reconstructions).double().mean().item()
        assert results[key] == pytest.approx(expected_lpips, rel=1e-5)
    original_features = metrics.feature_extractor(all_originals).double().numpy()
    reconstruction_features = metrics.feature_extractor(all_reconstructions).double().numpy()
    expected_rfid = frechet_distance(
        original_features.mean(0),
        np.cov(original_features, rowvar=False),
        reconstruction_features.mean(0),
        np.cov(reconstruction_features, rowvar=False),
    )
    # 5 samples in 64 dims give singular covariances, for which sqrtm is only accurate to
    # about sqrt(machine epsilon) of the matrix scale; compare at that scale.
    covariance_scale = np.trace(np.cov(original_features, rowvar=False)) + np.trace(
        np.cov(reconstruction_features, rowvar=False)
    )
    assert results["rfid"] == pytest.approx(expected_rfid, abs=1e-6 * covariance_scale)

    # gather() sums every state over processes; means are unchanged if all processes saw the same data.
    accelerator = TwoIdenticalProcessesAccelerator()
    gathered = metrics.gather(accelerator).compute()
    assert int(metrics.num_images) == 10 and accelerator.reduced_tensors == 12
    for key in ("psnr", "ssim", "lpips", "lpips_vgg"):
        assert gathered[key] == pytest.approx(results[key], rel=1e-12)
    with pytest.raises(RuntimeError, match="gather"):
        metrics.update(batches[0], reconstructions[0])
    with pytest.raises(RuntimeError, match="already"):
        metrics.gather(accelerator)


def test_reconstruction_metrics_flowmo_batch_psnr_and_identical_images():
    torch.manual_seed(0)
    metrics = ReconstructionMetrics(device="cpu", random_init=True, inception_feature_dims=64, psnr_mode="flowmo_batch")
    originals = real_image_batch(size=32)
    reconstructions = perturbed(originals)
    metrics.update(originals, reconstructions)
    metrics.update(originals[:2], reconstructions[:2])
    results = metrics.gather().compute()  # no process group: gather is a no-op
    expected = (
        psnr_pooled_over_batch(originals, reconstructions) + psnr_pooled_over_batch(originals[:2], reconstructions[:2])
    ) / 2
    assert results["psnr"] == pytest.approx(expected, rel=1e-12)
    assert set(results) == {"rfid", "psnr", "ssim", "lpips"}

    metrics.reset()
    metrics.update(originals, originals)
    identical = metrics.compute()
    assert identical["ssim"] == 1.0 and identical["lpips"] == 0.0 and identical["psnr"] == float("inf")
    assert identical["rfid"] == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_metrics_validate_options():
    with pytest.raises(ValueError, match="lpips_nets"):
        ReconstructionMetrics(lpips_nets=("squeeze",), device="cpu", random_init=True, inception_feature_dims=64)
    with pytest.raises(ValueError, match="psnr_mode"):
        ReconstructionMetrics(psnr_mode="mean", device="cpu", random_init=True, inception_feature_dims=64)


# --------------------------------------------------------------------------- evaluate modules
OFFLINE_EVALUATE_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    import torch

    def refuse_network(*args, **kwargs):
        raise OSError("network access attempted while loading an offline metric")

    socket.socket.connect = refuse_network  # any network use would fail loudly
    socket.create_connection = refuse_network

    from flowmo_diffusers.metrics import IMAGE_PAIR_METRICS, bundled_metric_path, load_metric
    import evaluate

    originals = torch.load(sys.argv[1])
    reconstructions = torch.load(sys.argv[2])
    options = {
        "psnr": {},
        "ssim": {},
        "lpips": {"net": "alex", "pretrained": False, "device": "cpu"},
        "rfid": {"random_init": True, "feature_dims": 64, "device": "cpu", "batch_size": 2},
    }
    results = {}
    for name in IMAGE_PAIR_METRICS:
        metric = evaluate.load(bundled_metric_path(name)) if name == "psnr" else load_metric(name)
        metric.add_batch(predictions=reconstructions[:2], references=originals[:2])
        metric.add_batch(predictions=list(reconstructions[2:].numpy()), references=list(originals[2:].numpy()))
        torch.manual_seed(0)  # same random networks as the parent process
        results[name] = metric.compute(**options[name])[name]
        results[name + "_type"] = type(metric).__name__
        if name == "lpips":
            identical = metric.compute(predictions=originals, references=originals, **options["lpips"])
            results["lpips_identical"] = identical["lpips"]
    print("RESULTS" + json.dumps(results))
    """)


def test_evaluate_modules_load_offline_from_local_paths_and_compute(tmp_path):
    for name in IMAGE_PAIR_METRICS:
        assert os.path.isfile(os.path.join(bundled_metric_path(name), f"{name}.py"))
    originals = real_image_batch(size=32)
    reconstructions = perturbed(originals)
    torch.save(originals, tmp_path / "originals.pt")
    torch.save(reconstructions, tmp_path / "reconstructions.pt")

    environment = dict(os.environ)
    environment.update(
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),  # fresh module cache: the scripts really get copied and imported
        HF_MODULES_CACHE=str(tmp_path / "hf_home" / "modules"),
    )
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_EVALUATE_SCRIPT,
            str(tmp_path / "originals.pt"),
            str(tmp_path / "reconstructions.pt"),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(completed.stdout.split("RESULTS", 1)[1])

    assert results["psnr_type"] == "Psnr" and results["rfid_type"] == "Rfid"
    assert results["psnr"] == pytest.approx(psnr_per_image(originals, reconstructions).mean(), rel=1e-12)
    assert results["ssim"] == pytest.approx(ssim_per_image(originals, reconstructions).mean(), rel=1e-12)
    torch.manual_seed(0)
    expected_lpips = LPIPSDistance(net="alex", pretrained=False)(originals, reconstructions).double().mean().item()
    assert results["lpips"] == pytest.approx(expected_lpips, rel=1e-4)
    assert results["lpips_identical"] == 0.0
    torch.manual_seed(0)
    inception = FIDInceptionFeatureExtractor(random_init=True, feature_dims=64)
    statistics = [StreamingFeatureStatistics(64), StreamingFeatureStatistics(64)]
    statistics[0].update(inception(originals))
    statistics[1].update(inception(reconstructions))
    assert results["rfid"] == pytest.approx(statistics[0].frechet_distance(statistics[1]), rel=1e-4)
