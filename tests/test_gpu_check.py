"""benchmarks/gpu_check.py: the CPU smoke run of the GPU check (the same code path as on a GPU), its JSON, the
RESULTS.md section it fills (on a copy), --from_json, the global deadline and the refusal of bad arguments."""

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from testing_utils import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
#: The CPU run as documented (its defaults: one image, no warm-up, one timed run per row; the GPU's deadline and
#: budgets).
SMOKE = ["--device", "cpu", "--preset", "flowmo-tiny", "--threads", "1"]


def load_gpu_check():
    return load_script(SCRIPT)


def run_script(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def outside_markers(text):
    return text[: text.index(BEGIN)], text[text.index(END):]


def between_markers(text):
    return text[text.index(BEGIN) + len(BEGIN): text.index(END)]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One CPU run with --write_results on a copy of RESULTS.md (shared by the tests that read it)."""
    folder = tmp_path_factory.mktemp("gpu_check")
    results = folder / "RESULTS.md"
    shutil.copy(RESULTS, results)
    output = folder / "check.json"
    start = time.perf_counter()
    completed = run_script(*SMOKE, "--output", output, "--write_results", "--results_path", results)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return dict(folder=folder, results=results, output=output, stdout=completed.stdout,
                wall_s=time.perf_counter() - start)


def test_cpu_run_records_every_row_with_figures(smoke_run):
    report = json.loads(smoke_run["output"].read_text())
    rows = {row["name"]: row for row in report["rows"]}
    ok = [row for row in report["rows"] if row["status"] == "ok"]
    assert len(ok) >= 6 and report["complete"] and report["stopped_by"] is None
    for row in ok:
        assert row["figures"] and all(isinstance(v, (int, float)) and math.isfinite(v) for v in row["figures"].values())
        assert row["wall_s"] > 0 and row["budget_s"] > 0 and row["error"] is None
    for row in report["rows"]:  # every row that is not ok says why
        assert row["status"] == "ok" or row["error"]
    expected = ["reconstruct_paper_bf16", "reconstruct_1pass_bf16", "reconstruct_2pass_bf16", "reconstruct_4pass_bf16",
                "decoder_mfu_bf16", "decoder_floor_bf16", "decoder_floor_bf16_batch1", "fp32_vs_bf16_agreement",
                "attention_native", "train_1a_bf16", "train_1b_block_bf16", "distill_block_bf16", "distill_call_bf16",
                "train_1b_call_bf16"]
    for name in expected:
        assert rows[name]["status"] == "ok", (name, rows[name].get("error"))
    # The students decode in K passes, the paper sampler in 31 (25 steps, 6 guided).
    passes = [rows[f"reconstruct_{k}_bf16"]["figures"]["num_decoder_passes"] for k in ("paper", "1pass", "2pass", "4pass")]
    assert passes == [31, 1, 2, 4]
    for name in ("train_1a_bf16", "train_1b_block_bf16", "distill_block_bf16", "distill_call_bf16"):
        assert rows[name]["figures"]["peak_memory_bytes"] > 0 and rows[name]["figures"]["images_per_s"] > 0
    assert rows["distill_call_bf16"]["details"]["distill_k"] == 4
    assert rows["distill_call_bf16"]["details"]["posttrain_checkpointing"] == "call"
    assert rows["train_1b_block_bf16"]["details"]["posttrain_checkpointing"] == "block"
    floor = rows["decoder_floor_bf16_batch1"]["figures"]
    assert floor["batch_size"] == 1 and floor["floor_fraction"] == pytest.approx(floor["floor_s"] / floor["latency_s"])
    agreement = rows["fp32_vs_bf16_agreement"]["figures"]
    assert 0 < agreement["max_abs_diff"] < 1 and agreement["mean_abs_diff"] <= agreement["max_abs_diff"]
    # A backend that cannot run here is a failed row with its error, and the rows after it still ran.
    if not importlib.util.find_spec("flash_attn"):
        assert rows["attention_flash"]["status"] == "failed" and "flash" in rows["attention_flash"]["error"].lower()
        names = [row["name"] for row in report["rows"]]
        after = names[names.index("attention_flash") + 1:]
        assert after and all(rows[name]["status"] == "ok" for name in after)
    assert report["environment"]["device"] == "cpu" and report["preset"] == "flowmo-tiny"
    assert report["batch_size"] == 1 and report["arguments"]["repeats"] == 1 and report["arguments"]["warmup"] == 0
    assert "| row | what | status | result |" in smoke_run["stdout"]


def test_write_results_fills_only_the_marked_block(smoke_run):
    before, after = RESULTS.read_text(), smoke_run["results"].read_text()
    assert outside_markers(after) == outside_markers(before)
    block = between_markers(after)
    report = json.loads(smoke_run["output"].read_text())
    for row in report["rows"]:
        assert f"`{row['name']}`" in block
    assert "flowmo-tiny" in block and "| row | what | status | result |" in block and "Not measured yet" not in block


def test_from_json_rewrites_the_block_from_a_saved_run(smoke_run, tmp_path):
    script = load_gpu_check()
    target = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, target)
    script.main(["--from_json", str(smoke_run["output"]), "--results_path", str(target)])
    assert target.read_text() == smoke_run["results"].read_text()
    # A bare JSON list of rows is accepted too.
    rows = json.loads(smoke_run["output"].read_text())["rows"]
    bare = tmp_path / "rows.json"
    bare.write_text(json.dumps(rows))
    shutil.copy(RESULTS, target)
    script.main(["--from_json", str(bare), "--results_path", str(target)])
    block = between_markers(target.read_text())
    assert all(f"`{row['name']}`" in block for row in rows)
    assert outside_markers(target.read_text()) == outside_markers(RESULTS.read_text())


def test_global_deadline_keeps_the_json_and_says_what_was_not_run(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, results)
    output = tmp_path / "check.json"
    completed = run_script(*SMOKE, "--time_limit_s", "0.01", "--output", output, "--write_results",
                           "--results_path", results)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["stopped_by"] == "deadline" and not report["complete"] and len(report["rows"]) >= 6
    for row in report["rows"]:
        assert row["status"] in ("skipped", "failed") and "--time_limit_s" in row["error"]
    assert "stopped by: deadline" in between_markers(results.read_text())


@pytest.mark.parametrize(
    "bad, named",
    [
        (["--preset", "flowmo-huge"], "--preset"),
        (["--output", "{tmp}/no/such/folder/check.json"], "--output"),
        (["--output", "{tmp}"], "--output"),
        (["--rows", "reconstruct_paper_bf16,no_such_row"], "--rows"),
        (["--batch_size", "0"], "--batch_size"),
        (["--time_limit_s", "nan"], "--time_limit_s"),
        (["--pretrained", "{tmp}/missing"], "--pretrained"),
        (["--results_path", "{tmp}/nomarkers.md"], "--results_path"),
        (["--results_path", str(RESULTS)], "--results_path"),  # CPU figures never go into the real RESULTS.md
    ],
)
def test_bad_arguments_are_refused_before_any_work(bad, named, tmp_path, monkeypatch, capsys):
    script = load_gpu_check()
    monkeypatch.setattr(script.flowmo_bench, "build_model", lambda *a, **k: pytest.fail("built a model"))
    copy = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, copy)
    (tmp_path / "nomarkers.md").write_text("# results\n")
    real = digest(RESULTS)
    args = ["--device", "cpu", "--preset", "flowmo-tiny", "--output", str(tmp_path / "check.json"), "--write_results",
            "--results_path", str(copy)]
    args += [item.format(tmp=tmp_path) for item in bad]
    with pytest.raises(SystemExit) as raised:
        script.main(args)
    assert raised.value.code == 2
    assert named in capsys.readouterr().err
    assert digest(copy) == digest(RESULTS) and digest(RESULTS) == real
    assert not (tmp_path / "check.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    script = load_gpu_check()
    with pytest.raises(SystemExit):
        script.main(["--output", str(tmp_path / "check.json")])  # the defaults: --device cuda --preset flowmo-lo
    assert "--device cuda" in capsys.readouterr().err and not (tmp_path / "check.json").exists()


@pytest.mark.parametrize(
    "content, extra",
    [
        (None, []),  # the file does not exist
        ("{not json", []),
        ('{"rows": []}', []),
        ('[{"name": "x", "status": "maybe"}]', []),
        ('[{"name": "x", "status": "ok"}]', ["--output", "{tmp}/x.json"]),  # --from_json measures nothing
    ],
)
def test_bad_from_json_is_refused(content, extra, tmp_path, capsys):
    script = load_gpu_check()
    saved = tmp_path / "saved.json"
    if content is not None:
        saved.write_text(content)
    copy = tmp_path / "RESULTS.md"
    shutil.copy(RESULTS, copy)
    with pytest.raises(SystemExit):
        script.main(["--from_json", str(saved), "--results_path", str(copy)] + [e.format(tmp=tmp_path) for e in extra])
    assert "--from_json" in capsys.readouterr().err and digest(copy) == digest(RESULTS)


def test_marked_block_replacement_and_its_errors():
    script = load_gpu_check()
    replace = script.common.replace_marked_block
    text = f"head\n{BEGIN}\nold\n{END}\ntail\n"
    assert replace(text, BEGIN, END, "new\n") == f"head\n{BEGIN}\nnew\n{END}\ntail\n"
    for broken in ("no markers", f"{END}\n{BEGIN}", f"{BEGIN}{BEGIN}{END}"):
        with pytest.raises(ValueError):
            replace(broken, BEGIN, END, "x")


def test_time_function_stops_at_the_deadline_after_one_run():
    script = load_gpu_check()
    calls = []
    timing = script.common.time_function(lambda: calls.append(time.sleep(0.01)), "cpu", warmup=0, repeats=1000,
                                         deadline=time.perf_counter() + 0.05)
    assert 1 <= timing["runs"] < 1000
    timing = script.common.time_function(lambda: None, "cpu", warmup=0, repeats=5, deadline=time.perf_counter() - 1)
    assert timing["runs"] == 1


def test_a_model_that_cannot_be_built_is_recorded_in_every_row(tmp_path, monkeypatch):
    script = load_gpu_check()

    def fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB")

    monkeypatch.setattr(script.flowmo_bench, "build_model", fail)
    output = tmp_path / "check.json"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        script.main(SMOKE + ["--output", str(output)])
    report = json.loads(output.read_text())
    assert report["stopped_by"] == "build failed" and not report["complete"]
    assert all(row["status"] == "failed" and "OutOfMemoryError" in row["error"] for row in report["rows"])
