"""benchmark_half_precision.py and benchmark_tiling.py run on a given tiny pipeline (no training) and record every
row they print (no timing or quality assertions: the figures are the benchmark's to report)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"_benchmark_script_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_pipeline")
    tiny_flowmo_pipeline(tiny_flowmo_model()).save_pretrained(folder)
    return folder


def test_half_precision_benchmark_compares_every_dtype(tiny_folder, tmp_path, capsys):
    output = tmp_path / "half.jsonl"
    script = load_script("benchmark_half_precision")
    (record,) = script.main(["--pipeline", str(tiny_folder), "--num_eval_images", "4", "--num_inference_steps", "2",
                             "--threads", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| dtype | ids = fp32 |" in printed and "machine:" in printed
    rows = {row["dtype"]: row for row in record["rows"]}
    assert list(rows) == ["fp32", "fp16", "bf16"]
    assert rows["fp32"]["id_agreement"] == 1.0 and rows["fp32"]["reconstruction_vs_fp32"]["max_abs_diff"] == 0.0
    for name, dtype in (("fp16", "torch.float16"), ("bf16", "torch.bfloat16")):
        row = rows[name]
        assert row["weights_dtype"] == dtype and row["output_dtype"] == "torch.float32"
        assert row["reconstruction_vs_fp32"]["nonfinite"] == 0 and row["decoding_vs_fp32"]["nonfinite"] == 0
        assert 0 < row["reconstruction_vs_fp32"]["max_abs_diff"] and row["decoding_vs_fp32"]["psnr_db"] > 30
    (saved,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert saved["rows"] == json.loads(json.dumps(record["rows"]))


def test_tiling_benchmark_scores_every_layout(tiny_folder, tmp_path, capsys):
    output, figure = tmp_path / "tiling.jsonl", tmp_path / "tiling.png"
    script = load_script("benchmark_tiling")
    rows = script.main(["--pipeline", str(tiny_folder), "--downscale", "4", "--num_inference_steps", "1",
                        "--threads", "1", "--figure", str(figure), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| layout | tiles |" in printed and "figure:" in printed
    assert [row["overlap_factor"] for row in rows] == [0.0, 0.25, 0.25, 0.5]
    for row in rows:
        assert [p["photo"] for p in row["photos"]] == ["chelsea.png", "coffee.png"]
        for photo in row["photos"]:
            assert photo["size"][0] % 32 == 0 and photo["size"][1] % 32 == 0 and photo["tiles"] >= 4
            assert photo["seam_score"] == pytest.approx(photo["seam_ratio"] / photo["original_seam_ratio"])
    # More overlap, more tiles; an exact no-overlap grid has one tile per 32x32 block.
    assert rows[0]["tiles"] == sum(p["size"][0] * p["size"][1] // 32**2 for p in rows[0]["photos"])
    assert rows[0]["tiles"] < rows[1]["tiles"] < rows[3]["tiles"]
    from PIL import Image

    with Image.open(figure) as image:
        assert image.width > 3 * image.height // 2
    assert len(output.read_text().splitlines()) == 1


def test_held_out_photographs_are_cropped_to_whole_tiles():
    script = load_script("benchmark_tiling")
    photos = script.held_out_photographs(2, 32)
    assert {name: tuple(p.shape) for name, p in photos.items()} == {
        "chelsea.png": (1, 3, 128, 224), "coffee.png": (1, 3, 192, 288)}
    assert all(-1 <= float(p.min()) and float(p.max()) <= 1 for p in photos.values())
    with pytest.raises(ValueError, match="smaller than one"):
        script.held_out_photographs(64, 32)
    assert torch.is_tensor(photos["chelsea.png"])
