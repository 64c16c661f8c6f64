#!/usr/bin/env python
"""A Gradio page over any FlowMoPipeline: upload an image (or pick an example) and see its token ids and bits per
pixel, its reconstruction by the paper sampler, by fast diffusers solvers and by a distilled student, the time each
took, and the per-pixel variance of several reconstructions.

    pip install -e ".[demo]"
    accelerate launch examples/train_flowmo/train.py          # the offline main job: writes outputs/train_flowmo
    python examples/demo/app.py                               # http://127.0.0.1:7860
    python examples/demo/app.py --pretrained_model_name_or_path flowmo-lo --student flowmo-lo-4pass --device cuda

The page is a thin layout: what it shows is computed by `flowmo_diffusers.pipelines.demo.reconstruct_for_demo`
(docs/demo.md describes each panel and flag).
"""

import argparse
import os
import sys
from pathlib import Path

# Gradio reports usage to its servers unless told not to; this page must work offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

from flowmo_diffusers import FlowMoPipeline  # noqa: E402
from flowmo_diffusers.pipelines.demo import SOLVERS, enlarge, reconstruct_for_demo  # noqa: E402
from flowmo_diffusers.utils.validation import positive_int  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_EXAMPLES = sorted(str(path) for path in (HERE / "images").glob("*.png"))
DEFAULT_PIPELINE = "outputs/train_flowmo"
TRAIN_COMMAND = "accelerate launch examples/train_flowmo/train.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=DEFAULT_PIPELINE,
                        help="A FlowMoPipeline folder or Hub id (default: the offline main job's output folder).")
    parser.add_argument("--student", default=None, help="A distilled student pipeline (folder or Hub id) to show too.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0 for every interface).")
    parser.add_argument("--port", type=positive_int, default=7860)
    parser.add_argument("--examples", nargs="*", default=DEFAULT_EXAMPLES, help="Example images offered on the page.")
    parser.add_argument("--solvers", nargs="*", default=["dpm", "euler"], choices=sorted(SOLVERS),
                        help="Fast solvers ticked when the page opens.")
    parser.add_argument("--solver_steps", type=positive_int, default=4, help="Their steps when the page opens.")
    parser.add_argument("--num_variance_samples", type=int, default=4, help="0 for no variance map, else >= 2.")
    parser.add_argument("--display_size", type=positive_int, default=256,
                        help="Images are enlarged (nearest neighbour, whole factors) to at most this many pixels.")
    args = parser.parse_args(argv)
    if args.num_variance_samples == 1 or args.num_variance_samples < 0:
        parser.error(f"--num_variance_samples must be 0 or at least 2, got {args.num_variance_samples}")
    for path in args.examples:
        if not os.path.isfile(path):
            parser.error(f"--examples: {path!r} is not a file")
    if args.pretrained_model_name_or_path == DEFAULT_PIPELINE and not os.path.isdir(DEFAULT_PIPELINE):
        parser.error(f"no pipeline in {DEFAULT_PIPELINE}/: train one first ({TRAIN_COMMAND}) or pass "
                     "--pretrained_model_name_or_path (a FlowMoPipeline folder or Hub id)")
    return args


def import_gradio():
    try:
        import gradio
    except ImportError:
        sys.exit('the demo page needs Gradio: pip install -e ".[demo]"')
    return gradio


def load(path, device):
    pipeline = FlowMoPipeline.from_pretrained(path).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def describe(pipeline, name) -> str:
    config = pipeline.autoencoder.config
    size = config.sample_size
    return (f"`{name}`: {size}x{size} images, {pipeline.autoencoder.num_indices} ids of {config.bits_per_subtoken} "
            f"bits each ({pipeline.autoencoder.bits_per_pixel:.4f} bits per pixel)")


def build_page(gr, pipeline, student, args):
    """The page's layout and its one event; every figure comes from `reconstruct_for_demo`."""
    title = "FlowMo: tokenize and reconstruct"
    intro = f"# {title}\nTokenizer {describe(pipeline, args.pretrained_model_name_or_path)}."
    if student is not None:
        intro += f" Student `{args.student}`."

    def run(image, solvers, steps, seed, num_variance_samples):
        if image is None:
            raise gr.Error("Upload an image or pick an example first.")
        try:
            result = reconstruct_for_demo(
                pipeline, image, fast_decoders=[(solver, int(steps)) for solver in solvers], student=student,
                seed=int(seed), num_variance_samples=int(num_variance_samples),
            )
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error))  # the package names the bad setting; show it on the page
        size = args.display_size
        gallery = [(enlarge(result.image, size), "input (as the model reads it)")]
        # Captions are one line under each image: the decoder's short name; passes and times are in the table.
        gallery += [(enlarge(r.image, size), r.name.split(" (")[0]) for r in result.reconstructions]
        variance = result.variance_image()
        rate = (f"{result.bits_per_pixel:.4f} bits per pixel ({len(result.indices)} ids x {result.bits_per_index} "
                f"bits for a {result.image.width}x{result.image.height} image)")
        return (rate, gallery, None if variance is None else enlarge(variance, size), result.timings(),
                result.indices_text())

    with gr.Blocks(title=title) as page:
        gr.Markdown(intro)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Image", elem_id="input_image")
                solvers = gr.CheckboxGroup(choices=[(label, key) for key, (label, _, _) in SOLVERS.items()],
                                           value=list(args.solvers), label="Fast solvers (training-free)")
                steps = gr.Slider(1, 25, value=args.solver_steps, step=1, label="Fast solver steps")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (the noise of every decoder)")
                variance_samples = gr.Slider(0, 16, value=args.num_variance_samples, step=1,
                                             label="Reconstructions for the variance map (0: none)")
                button = gr.Button("Tokenize and reconstruct", variant="primary", elem_id="run")
                if args.examples:
                    gr.Examples(examples=[[path] for path in args.examples], inputs=[image], label="Examples",
                                elem_id="examples")
            with gr.Column(scale=2):
                rate = gr.Textbox(label="Bits per pixel", elem_id="bits_per_pixel", interactive=False)
                # PNG, not Gradio's default WebP: the panels are compared pixel by pixel.
                gallery = gr.Gallery(label="Reconstructions (same token ids, same noise)", elem_id="reconstructions",
                                     columns=4, height="auto", object_fit="contain", format="png")
                timings = gr.Dataframe(headers=["what", "decoder passes", "ms"], label="Time taken",
                                       elem_id="timings", interactive=False)
                with gr.Row():
                    variance = gr.Image(label="Per-pixel variance (white = most)", elem_id="variance",
                                        type="pil", interactive=False, format="png", scale=1)
                    ids = gr.Textbox(label="Token ids", elem_id="token_ids", lines=8, interactive=False, scale=2)
        button.click(run, inputs=[image, solvers, steps, seed, variance_samples],
                     outputs=[rate, gallery, variance, timings, ids])
    return page


def main(argv=None):
    args = parse_args(argv)
    gr = import_gradio()
    pipeline = load(args.pretrained_model_name_or_path, args.device)
    student = load(args.student, args.device) if args.student else None
    page = build_page(gr, pipeline, student, args)
    # System fonts: the default theme would fetch Google Fonts, which an offline machine cannot reach.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    # Gradio's gallery keeps a 450 px minimum height on wide screens, blank below one row of reconstructions.
    css = "#reconstructions .fixed-height { min-height: 0 !important; }"
    page.launch(server_name=args.host, server_port=args.port, theme=theme, css=css, show_error=True)


if __name__ == "__main__":
    main()
