"""Codebook statistics (usage, entropy, perplexity) against a direct numpy computation, alone, across two processes
and as the bundled `evaluate` module."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmo_diffusers.metrics import CodebookStatistics, bundled_metric_path, codebook_statistics

from testing_utils import launch


def numpy_statistics(ids: np.ndarray, bits: int) -> dict:
    """The definitions, written directly: np.unique counts and -sum p log2 p."""
    size = 2**bits
    values, counts = np.unique(ids, return_counts=True)
    probabilities = counts / counts.sum()
    entropy = float(-(probabilities * np.log2(probabilities)).sum())
    per_position = np.array([len(np.unique(ids[:, position])) / size for position in range(ids.shape[1])])
    return {
        "codebook_usage": len(values) / size,
        "codebook_usage_per_position_mean": per_position.mean(),
        "codebook_usage_per_position_min": per_position.min(),
        "codebook_entropy_bits": entropy,
        "codebook_perplexity": 2.0**entropy,
        "codebook_num_ids": ids.size,
        "codebook_num_used": len(values),
    }


def skewed_ids(batch, positions, bits, seed=0):
    generator = np.random.default_rng(seed)
    # Geometric-ish draws: a skewed histogram with unused values, so usage < 1 and entropy < bits.
    ids = np.minimum(generator.geometric(0.2, size=(batch, positions)) - 1, 2**bits - 1)
    ids[:, 0] = 3  # one position stuck on one value: the per-position minimum sees it
    return ids.astype(np.int64)


@pytest.mark.parametrize("dense", [True, False])
def test_streaming_statistics_equal_numpy(dense):
    ids = skewed_ids(12, 7, bits=6)
    statistics = CodebookStatistics(6, dense=dense)
    for batch in np.array_split(ids, 4):  # streaming in uneven batches equals the whole at once
        statistics.update(torch.from_numpy(batch))
    result = statistics.compute()
    expected = numpy_statistics(ids, 6)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, rel=1e-12), name
    assert result["codebook_bits_per_id"] == 6
    assert result["codebook_usage_per_position_min"] == 1 / 64
    assert 0 < result["codebook_entropy_bits"] < 6


def test_extremes_uniform_and_collapsed():
    every_value = torch.arange(256).reshape(4, 64)  # each of the 2**8 values exactly once
    result = codebook_statistics(every_value, bits_per_id=8)
    assert result["codebook_usage"] == 1.0
    assert result["codebook_entropy_bits"] == pytest.approx(8.0, abs=1e-12)
    assert result["codebook_perplexity"] == pytest.approx(256.0, rel=1e-12)
    collapsed = codebook_statistics(torch.full((5, 3), 7), bits_per_id=8)
    assert collapsed["codebook_entropy_bits"] == 0.0 and collapsed["codebook_perplexity"] == 1.0
    assert collapsed["codebook_usage"] == 1 / 256


def test_wide_ids_are_counted_sparsely():
    """56-bit ids (the width of a FlowMo-Hi token if it were one id) have no dense histogram; counts stay exact."""
    generator = np.random.default_rng(1)
    ids = generator.integers(0, 2**56, size=(6, 5), dtype=np.int64)
    ids[3:] = ids[:3]  # repeats, so counts are not all 1
    statistics = CodebookStatistics(56)
    assert not statistics.dense
    statistics.update(torch.from_numpy(ids))
    result = statistics.compute()
    expected = numpy_statistics(ids, 56)
    assert result["codebook_num_used"] == expected["codebook_num_used"] == 15
    assert result["codebook_entropy_bits"] == pytest.approx(expected["codebook_entropy_bits"], rel=1e-12)
    assert result["codebook_usage"] == pytest.approx(15 / 2**56, rel=1e-12)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="bits_per_id"):
        CodebookStatistics(0)
    with pytest.raises(ValueError, match="bits_per_id"):
        CodebookStatistics(18, dense=True)
    statistics = CodebookStatistics(4)
    with pytest.raises(TypeError, match="indices"):
        statistics.update(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="indices"):
        statistics.update([[1, 2]])
    with pytest.raises(ValueError, match="indices"):
        statistics.update(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="update"):
        statistics.compute()
    statistics.update(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="indices"):
        statistics.update(torch.zeros(1, 4, dtype=torch.long))


def test_two_processes_equal_one(tmp_path):
    ids = torch.from_numpy(skewed_ids(8, 6, bits=5, seed=2))
    torch.save(ids, tmp_path / "ids.pt")
    launch(Path(__file__).with_name("codebook_statistics_two_processes.py"),
           [tmp_path / "ids.pt", tmp_path / "out.json"], num_processes=2)
    results = json.loads((tmp_path / "out.json").read_text())
    expected = numpy_statistics(ids.numpy(), 5)
    for mode in ("dense", "sparse"):
        for name, value in expected.items():
            assert results[mode][name] == pytest.approx(value, rel=1e-12), (mode, name)


def test_evaluate_module_equals_numpy(tmp_path):
    evaluate = pytest.importorskip("evaluate")
    ids = skewed_ids(6, 4, bits=5, seed=3)
    environment = dict(os.environ, HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                       HF_MODULES_CACHE=str(tmp_path / "modules"))
    script = (
        "import json, sys, evaluate, numpy as np\n"
        "from flowmo_diffusers.metrics import load_metric\n"
        "metric = load_metric('codebook')\n"
        "ids = np.array(json.loads(sys.argv[1]))\n"
        "metric.add_batch(predictions=list(ids[:2]))\n"
        "metric.add_batch(predictions=ids[2:].tolist())\n"
        "print('RESULTS' + json.dumps(metric.compute(bits_per_id=5)))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script, json.dumps(ids.tolist())], env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.split("RESULTS", 1)[1])
    for name, value in numpy_statistics(ids, 5).items():
        assert result[name] == pytest.approx(value, rel=1e-12), name
    assert os.path.isfile(os.path.join(bundled_metric_path("codebook"), "codebook.py"))
    assert math.isfinite(result["codebook_perplexity"])
