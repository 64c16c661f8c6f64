"""The benchmark scripts run on tiny settings and produce their tables and records (no timing assertions)."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from testing_utils import load_script, save_tiny_flowmo_pipeline

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name):
    return load_script(BENCHMARKS / f"{name}.py")


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_benchmark_flowmo_runs_every_measurement(tmp_path, capsys):
    output = tmp_path / "flowmo.jsonl"
    script = load_benchmark("benchmark_flowmo")
    rows = script.main(
        ["--preset", "flowmo-tiny", "--device", "cpu", "--batch_size", "1", "--steps", "2", "--posttrain_k", "2",
         "--warmup", "0", "--repeats", "1", "--threads", "1", "--output", str(output)]
    )
    printed = capsys.readouterr().out
    expected = ["encode", "decoder_step", "decoder_floor", "reconstruct", "train_step_1a", "train_step_1b"]
    assert [row["measurement"] for row in rows] == expected
    assert "| what | model | dtype |" in printed and "machine:" in printed and "peak memory: psutil RSS" in printed
    records = read_records(output)
    assert [record["measurement"] for record in records] == expected
    for record in records:
        # The latency is the median of the timed runs, and the throughput follows from it.
        assert record["latency_s"] == statistics.median(record["times_s"]) and len(record["times_s"]) == record["runs"]
        assert record["images_per_s"] == pytest.approx(record["batch_size"] / record["latency_s"])
        assert record["memory"]["peak_bytes"] > 0
        assert record["environment"]["torch_threads"] == 1 and record["environment"]["cpu"]
    assert records[1]["flops"] > 0
    floor = records[2]
    assert floor["flops"] == records[1]["flops"] and floor["floor_s"] > 0
    assert floor["floor_fraction"] == pytest.approx(floor["floor_s"] / floor["latency_s"])
    assert sum(op["seconds_total"] for op in floor["matmuls"]) == pytest.approx(floor["floor_times_s"][0])
    assert "| matmul | shape | count |" in printed and "at most" in printed


def test_benchmark_flowmo_bf16_and_call_checkpointing(tmp_path):
    script = load_benchmark("benchmark_flowmo")
    rows = script.main(
        ["--preset", "flowmo-tiny", "--dtype", "bf16", "--what", "train_step", "--stages", "1b",
         "--posttrain_checkpointing", "call", "--posttrain_k", "2", "--warmup", "0", "--repeats", "1",
         "--threads", "1", "--optimizer", "sgd", "--output", ""]
    )
    assert [row["measurement"] for row in rows] == ["train_step_1b"]
    assert rows[0]["posttrain_checkpointing"] == "call" and rows[0]["dtype"] == "bf16"
    assert rows[0]["optimizer"].startswith("SGD (no optimizer state)")


def test_reconstruction_ablation_variants_match_the_straightforward_path(tmp_path, capsys):
    output = tmp_path / "ablation.jsonl"
    script = load_benchmark("benchmark_reconstruction_ablation")
    rows = script.main(
        ["--preset", "flowmo-tiny", "--batch_size", "1", "--steps", "4", "--warmup", "1", "--repeats", "1",
         "--threads", "1", "--attention_backends", "_native_math,no_such_backend", "--output", str(output)]
    )
    printed = capsys.readouterr().out
    assert "| variant | median ms |" in printed
    by_name = {row["variant"]: row for row in rows}
    assert len(read_records(output)) == len(rows)
    exact = [
        "straightforward (original loop)",
        "+ batched guidance",
        "+ RoPE once (= pipeline loop)",
        "FlowMoPipeline",
        "+ attention _native_math",
    ]
    for name in exact:
        assert by_name[name]["within_tolerance"], (name, by_name[name]["max_abs_diff_vs_straightforward"])
    assert "max_abs_diff_vs_straightforward" in by_name["+ bf16 autocast"]
    assert "error" in by_name["+ attention no_such_backend"]


def test_flop_count_of_the_paper_decoder():
    utils = load_benchmark("benchmark_utils")
    from flowmo_diffusers import get_preset_config

    flops = utils.decoder_forward_flops(get_preset_config("flowmo-lo"), batch_size=1, height=256, width=256)
    # 16 blocks over 4096 patches + 256 code tokens at width 1152: about 3.6 TFLOP per image.
    assert 3.0e12 < flops < 4.2e12


def test_matmul_inventory_is_what_the_decoder_and_encoder_run(monkeypatch):
    """Every token-sized linear layer and attention call of a forward, by shape and count, is in the inventory."""
    import collections

    import torch

    from flowmo_diffusers import FlowMoModel, get_preset_config
    from flowmo_diffusers.models import transformer_flowmo

    utils = load_benchmark("benchmark_utils")
    config = get_preset_config("flowmo-tiny")
    model = FlowMoModel(**config).eval()
    batch_size, side = 2, 32
    seen = collections.Counter()

    def record_linear(module, inputs, output):
        rows = inputs[0].reshape(-1, module.in_features).shape[0]
        if rows > batch_size:  # modulation and timestep-embedding layers run on one row per image
            seen["linear", (rows, module.in_features, module.out_features)] += 1

    original_attention = transformer_flowmo.joint_attention

    def record_attention(query, key, value, scale):
        seen["attention", tuple(query.shape)] += 1
        return original_attention(query, key, value, scale)

    monkeypatch.setattr(transformer_flowmo, "joint_attention", record_attention)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record_linear)

    def expected(entries):
        counts = collections.Counter()
        for entry in entries:
            counts[entry["op"], tuple(entry["shape"])] += entry["count"]
        return counts

    images = torch.rand(batch_size, 3, side, side) * 2 - 1
    with torch.no_grad():
        code = model.encode(images).code
        assert seen == expected(utils.encoder_matmuls(config, batch_size, side, side))
        seen.clear()
        model(images, torch.full((batch_size,), 0.5), code)
    assert seen == expected(utils.decoder_matmuls(config, batch_size, side, side))


@pytest.mark.parametrize("bad", [["--what", "nothing"], ["--stages", "2"]])
def test_bad_arguments_are_refused(bad):
    script = load_benchmark("benchmark_flowmo")
    with pytest.raises(SystemExit):
        script.parse_args(bad)


def test_fast_decoding_benchmark_measures_every_decoder(tmp_path, capsys):
    """With a given teacher and student (no training), every decoder row is measured on held-out tiles."""

    import torch

    from flowmo_diffusers import FlowMoPipeline
    from flowmo_diffusers.training.distillation import make_student_config

    from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline

    tiny_flowmo_pipeline(tiny_flowmo_model(0)).save_pretrained(tmp_path / "teacher")
    student = tiny_flowmo_model(0)
    make_student_config(student, 1, teacher="teacher")
    FlowMoPipeline(autoencoder=student, scheduler=student.sampling_scheduler()).save_pretrained(tmp_path / "student")
    output = tmp_path / "fast.jsonl"
    script = load_benchmark("benchmark_fast_decoding")
    script.main(["--teacher", str(tmp_path / "teacher"), "--students", f"1={tmp_path / 'student'}", "--distill_ks", "1",
                 "--solver_steps", "2", "--num_eval_images", "4", "--timing_rounds", "1", "--threads", "1",
                 "--output", str(output)])
    printed = capsys.readouterr().out
    assert "| decoder | passes |" in printed and "two-seed agreement" in printed
    (record,) = read_records(output)
    rows = {row["decoder"]: row for row in record["results"]}
    assert {row["family"] for row in rows.values()} == {"paper", "euler", "heun", "unipc", "dpm", "student"}
    paper = rows["paper sampler (Euler 25, guidance 1.5)"]
    assert paper["passes"] == 31 and paper["psnr_vs_paper"] == 99.0 and paper["speedup_vs_paper"] == 1.0
    assert rows["distilled student, K=1"]["passes"] == 1 and rows["Heun 2"]["passes"] >= 3
    assert all(row["seconds_per_image"] == statistics.median(row["times_s"]) and 0 < row["ssim"] <= 1
               for row in rows.values())
    assert all(row["speedup_vs_paper"] == pytest.approx(paper["seconds_per_image"] / row["seconds_per_image"])
               for row in rows.values())
    assert record["reference"]["num_eval_images"] == 4 and set(record["thresholds"]) == {"euler", "heun", "unipc", "dpm"}
    # A blurred image has less high-frequency energy than the original.
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert script.high_frequency_energy(blurred) < 0.5 * script.high_frequency_energy(images)


def test_distill_step_trains_a_copy_and_leaves_the_teacher_and_encoder_alone():
    """`--stages distill`: the student (a copy of the model, K passes in its config) is trained, its encoder frozen
    (token ids must not move), and the teacher it distils from is unchanged."""
    import argparse

    import torch

    from testing_utils import tiny_flowmo_model

    script = load_benchmark("benchmark_flowmo")
    teacher = tiny_flowmo_model(0)
    student = script.make_student(teacher, 2)
    assert student.config.sampling_num_inference_steps == 2 and teacher.config.sampling_num_inference_steps == 25
    before = {name: p.clone() for name, p in student.named_parameters()}
    teacher_before = [p.clone() for p in teacher.parameters()]
    args = argparse.Namespace(device="cpu", dtype="fp32", seed=0, perceptual="mse", posttrain_checkpointing="block",
                              optimizer="adam", warmup=0, repeats=1, preset="flowmo-tiny", pretrained=None,
                              resolution=32)
    row = script.bench_distill_step(student, teacher, torch.rand(2, 3, 32, 32) * 2 - 1, args)
    assert row["measurement"] == "train_step_distill" and row["distill_k"] == 2 and row["teacher_passes"] == 25
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("decoder.") for name in changed)
    assert row["trained_parameters"] == sum(p.numel() for p in student.decoder.parameters())
    assert not student.training and not any(p.requires_grad for p in student.parameters())


def test_step_reduce_benchmark_counts_one_collective_for_the_stacked_reduce(tmp_path):
    """Two real processes: the stacked reduce (the loops' one per step) is one all-reduce with or without the
    preemption flag and gives the figures of `accelerator.reduce` per entry, which runs one per entry."""
    from testing_utils import launch

    output = tmp_path / "reduce.jsonl"
    log = launch(BENCHMARKS / "benchmark_step_reduce.py", ["--terms", "3", "--rounds", "1", "--calls", "2",
                                                          "--output", str(output)], num_processes=2)
    records = {r["contender"]: r for r in read_records(output)}
    assert {name: r["collectives"] for name, r in records.items()} == {
        "stacked, with the preemption flag": 1, "stacked, without the flag": 1,
        "accelerator.reduce per entry, with the flag": 4, "accelerator.reduce per entry, without the flag": 3}, log
    assert all(r["processes"] == 2 and len(r["runs_us"]) == 1 for r in records.values())


# --------------------------------------------------------------------------- half precision and tiling
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_flowmo_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


def test_half_precision_benchmark_compares_every_dtype(tiny_folder, tmp_path, capsys):
    output = tmp_path / "half.jsonl"
    script = load_benchmark("benchmark_half_precision")
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
    script = load_benchmark("benchmark_tiling")
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
    script = load_benchmark("benchmark_tiling")
    photos = script.held_out_photographs(2, 32)
    assert {name: tuple(p.shape) for name, p in photos.items()} == {
        "chelsea.png": (1, 3, 128, 224), "coffee.png": (1, 3, 192, 288)}
    assert all(-1 <= float(p.min()) and float(p.max()) <= 1 for p in photos.values())
    with pytest.raises(ValueError, match="smaller than one"):
        script.held_out_photographs(64, 32)
    assert torch.is_tensor(photos["chelsea.png"])


def test_benchmark_first_look_measures_the_held_out_photographs(tmp_path, capsys):
    model = save_tiny_flowmo_pipeline(tmp_path / "model")
    log = tmp_path / "train.log"
    log.write_text("Steps:  50%|#####     | 600/1200 [02:01<02:00, 5.0it/s]\rSteps: 100%|##########| 1200/1200 "
                   "[03:58<00:00, 5.03it/s, loss=0.1]\n")
    output, figure = tmp_path / "first_look.jsonl", tmp_path / "figure.png"
    script = load_benchmark("benchmark_first_look")
    rows = script.main(["--model", str(model), "--decoders", "2x1.5", "1x1", "--train_log", str(log),
                        "--figure", str(figure), "--threads", "1", "--output", str(output)])
    printed = capsys.readouterr().out
    assert [row["decoder"] for row in rows] == ["2x1.5", "1x1"]
    for row in rows:
        assert row["images"] == ["chelsea", "coffee"] and len(row["psnr"]) == len(row["ssim"]) == 2
        assert row["psnr_mean"] == pytest.approx(statistics.mean(row["psnr"]))
        assert (row["steps"], row["max_train_steps"], row["train_loop_s"]) == (1200, 1200, 238)
    assert "| 1x1 |" in printed and "1200 steps in 238 s" in printed and figure.stat().st_size > 0
    assert [record["decoder"] for record in read_records(output)] == ["2x1.5", "1x1"]
    with pytest.raises(SystemExit):
        script.main(["--model", str(model), "--decoders", "fast"])
