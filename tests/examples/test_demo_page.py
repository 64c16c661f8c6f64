"""examples/demo/app.py in a real headless browser: the system's Chromium, driven by Playwright, loads the page,
submits an example image and sees the reconstructions, the bits per pixel, the variance map, the timings and the ids."""

import importlib.util
import os
import subprocess
import sys

import PIL.Image
import pytest
import torch

from flowmo_diffusers.pipelines.demo import prepare_image
from testing_utils import EXAMPLES, load_script, tiny_flowmo_model, tiny_flowmo_pipeline

DEMO = EXAMPLES / "demo"
CHROMIUM = "/usr/bin/chromium"


def browser_tools():
    """Playwright's sync API, or a skip naming what is missing (Gradio, Playwright or Chromium). Under CI (`CI=true`,
    as .ci/run is run) a missing piece fails instead: .ci/run installs all three, so a skip there would hide a gap."""
    missing = None
    if importlib.util.find_spec("gradio") is None:
        missing = 'Gradio is not installed (pip install -e ".[demo]" or ".[test]")'
    elif importlib.util.find_spec("playwright") is None:
        missing = 'Playwright is not installed (pip install -e ".[test]")'
    elif not os.path.isfile(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test cannot run in CI: {missing}; .ci/run installs it")
        pytest.skip(missing)
    from playwright import sync_api

    return sync_api


def load_screenshot_script():
    """examples/demo/screenshot.py as a module: the test drives the page with the functions the screenshot uses."""
    return load_script(DEMO / "screenshot.py")


def load_app():
    return load_script(DEMO / "app.py")


def test_the_app_loads_a_pipeline_by_hub_id(local_hub, tmp_path):
    pipeline = tiny_flowmo_pipeline()
    pipeline.save_pretrained(tmp_path / "pipeline")
    local_hub.add_repo("user/flowmo-tiny", tmp_path / "pipeline")
    app = load_app()
    args = app.parse_args(["--pretrained_model_name_or_path", "user/flowmo-tiny", "--device", "cpu"])
    loaded = app.load(args.pretrained_model_name_or_path, args.device)
    for name, weight in pipeline.autoencoder.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[name], weight), name
    assert app.describe(loaded, "user/flowmo-tiny") == (
        "`user/flowmo-tiny`: 32x32 images, 24 ids of 4 bits each (0.0938 bits per pixel)"
    )
    assert args.examples and all(path.endswith(".png") for path in args.examples)  # the shipped examples


def test_the_app_refuses_a_missing_default_pipeline_with_the_command_to_make_it(tmp_path):
    # Run where outputs/train_flowmo does not exist: the error names the training command (no Gradio needed).
    result = subprocess.run([sys.executable, str(DEMO / "app.py")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "no pipeline in outputs/train_flowmo/" in result.stderr
    assert "accelerate launch examples/train_flowmo/train.py" in result.stderr
    result = subprocess.run([sys.executable, str(DEMO / "app.py"), "--pretrained_model_name_or_path", str(tmp_path),
                             "--num_variance_samples", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--num_variance_samples must be 0 or at least 2, got 1" in result.stderr


@torch.no_grad()
def test_the_page_reconstructs_an_example_in_a_headless_browser(tmp_path):
    sync_api = browser_tools()
    screenshot = load_screenshot_script()

    pipeline = tiny_flowmo_pipeline()
    pipeline.save_pretrained(tmp_path / "pipeline")
    student = tiny_flowmo_model(seed=1, sampling_num_inference_steps=2, sampling_guidance_scale=1.0,
                                distilled_from=str(tmp_path / "pipeline"))
    tiny_flowmo_pipeline(student).save_pretrained(tmp_path / "student")
    example = sorted(DEMO.glob("images/*.png"))[0]
    expected_ids = pipeline.encode(prepare_image(PIL.Image.open(example), 32))[0].tolist()

    port = screenshot.free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}  # Gradio's copies of the images stay here
    arguments = ["--pretrained_model_name_or_path", tmp_path / "pipeline", "--student", tmp_path / "student",
                 "--device", "cpu", "--solvers", "dpm", "heun", "--solver_steps", "2", "--num_variance_samples", "3"]
    with open(tmp_path / "app.log", "w") as log:
        process = screenshot.start_app(arguments, port, env=env, log=log)
    try:
        screenshot.wait_until_serving(url, process, timeout=180)
        with sync_api.sync_playwright() as playwright:
            browser = screenshot.launch_chromium(playwright, CHROMIUM)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, timeout=120_000)
            page.get_by_text("FlowMo: tokenize and reconstruct").first.wait_for(timeout=60_000)  # the page loaded
            assert page.title() == "FlowMo: tokenize and reconstruct"
            # Nothing to reconstruct yet: the page says so instead of failing.
            page.locator("#run").click()
            page.get_by_text("Upload an image or pick an example first.").first.wait_for(timeout=60_000)

            screenshot.reconstruct_example(page, url, example=0, timeout_ms=180_000)
            rate = page.locator("#bits_per_pixel textarea, #bits_per_pixel input").first.input_value()
            assert rate == "0.0938 bits per pixel (24 ids x 4 bits for a 32x32 image)"
            # The input as the model reads it, the paper sampler, DPM-Solver++ 2, Heun 2 and the student.
            page.wait_for_function("() => document.querySelectorAll('#reconstructions img').length >= 5",
                                   timeout=60_000)
            assert page.locator("#reconstructions img").count() == 5
            captions = page.locator("#reconstructions").inner_text()
            for caption in ("input (as the model reads it)", "paper sampler", "DPM-Solver++ 2 steps", "Heun 2 steps",
                            "distilled student"):
                assert caption in captions
            page.locator("#variance img").first.wait_for(timeout=60_000)
            timings = page.locator("#timings")
            timings.get_by_text("variance: 3 paper-sampler samples").first.wait_for(timeout=60_000)
            # The table reads as its header, then each row's three cells on lines of their own (Gradio 6.0 renders a
            # sticky copy of the header and a sizing row first: the rows are what follows the last header).
            cells = [line for line in timings.inner_text().rsplit("\nms\n", 1)[1].splitlines() if line.strip()]
            rows = [cells[start : start + 3] for start in range(0, len(cells), 3)]
            assert {name: passes for name, passes, _ in rows} == {
                "encode (token ids)": "0", "paper sampler (25 steps, guidance 1.5)": "31", "DPM-Solver++ 2 steps": "3",
                "Heun 2 steps": "3", "distilled student (2 passes)": "2", "variance: 3 paper-sampler samples": "93",
            }
            assert all(float(milliseconds) >= 0 for _, _, milliseconds in rows)
            ids = page.locator("#token_ids textarea").first.input_value()
            assert [int(i) for i in ids.split()] == expected_ids  # the ids of the example, as the package computes
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
