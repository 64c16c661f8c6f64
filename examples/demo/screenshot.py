#!/usr/bin/env python
"""Screenshot of the demo page after a reconstruction (docs/images/demo.png), taken by headless Chromium through
Playwright: starts `app.py` on a free port, picks an example image, presses the button, waits for the
reconstructions and saves the page.

    python examples/demo/screenshot.py --pretrained_model_name_or_path outputs/train_flowmo --output docs/images/demo.png

It drives the system's Chromium (`--chromium`, default /usr/bin/chromium: `apt-get install chromium`); Playwright's
own browser download is never needed. tests/examples/test_demo_page.py drives the page with the same functions.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
REPO = APP.parents[2]
SYSTEM_CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(app_arguments, port: int, env=None, log=None) -> subprocess.Popen:
    """`python app.py APP_ARGUMENTS --port PORT` in the background (its output to `log`, a file object)."""
    command = [sys.executable, str(APP), *map(str, app_arguments), "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `url` until it answers; raise if the app exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo app exited with status {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the demo app did not serve {url} within {timeout:.0f} s")


def reconstruct_example(page, url: str, example: int = 0, timeout_ms: float = 120_000) -> None:
    """Open the page, load example `example`, press the button and wait until the reconstructions and the bits per
    pixel are shown (a Playwright `Page`)."""
    page.goto(url, timeout=timeout_ms)
    page.locator("#examples button").nth(example).click(timeout=timeout_ms)
    page.locator("#input_image img").first.wait_for(timeout=timeout_ms)  # the example is in the input
    page.locator("#run").click()
    page.locator("#reconstructions img").first.wait_for(timeout=timeout_ms)
    page.wait_for_function(
        "() => (document.querySelector('#bits_per_pixel textarea, #bits_per_pixel input') || {}).value",
        timeout=timeout_ms,
    )


def launch_chromium(playwright, executable_path: str = SYSTEM_CHROMIUM):
    if not os.path.isfile(executable_path):
        raise FileNotFoundError(f"no Chromium at {executable_path}: apt-get install chromium, or pass --chromium")
    return playwright.chromium.launch(executable_path=executable_path, headless=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default="outputs/train_flowmo")
    parser.add_argument("--student", default=None)
    parser.add_argument("--output", default=str(REPO / "docs" / "images" / "demo.png"))
    parser.add_argument("--example", type=int, default=0, help="Which example image to reconstruct.")
    parser.add_argument("--chromium", default=SYSTEM_CHROMIUM)
    parser.add_argument("--width", type=int, default=1400, help="Browser window width in pixels.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Seconds for the app to start and to answer.")
    args, app_arguments = parser.parse_known_args()  # anything else goes to app.py (e.g. --solvers dpm heun)

    from playwright.sync_api import sync_playwright

    app_arguments = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, *app_arguments]
    if args.student:
        app_arguments += ["--student", args.student]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start_app(app_arguments, port)
    try:
        wait_until_serving(url, process, args.timeout)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright, args.chromium)
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            reconstruct_example(page, url, args.example, args.timeout * 1000)
            page.wait_for_timeout(500)  # let the images finish painting
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
