"""flowmo_diffusers.pipelines.demo: what the demo page shows for one image, on the tiny pipeline."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.pipelines import per_pixel_variance
from flowmo_diffusers.pipelines.demo import (
    DemoResult,
    FastDecoder,
    enlarge,
    prepare_image,
    reconstruct_for_demo,
)
from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline

FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)


def photo(width=48, height=40, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels, mode=mode)


def tiny_student(k=2):
    """A tiny K-pass "student": the config a distillation run saves (K steps, no guidance, its teacher named)."""
    model = tiny_flowmo_model(seed=1, sampling_num_inference_steps=k, sampling_guidance_scale=1.0,
                              distilled_from="teacher-folder")
    return tiny_flowmo_pipeline(model)


def decode(pipeline, ids, seed, **kwargs):
    return pipeline(indices=ids, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)


def as_array(image):
    return np.asarray(image, dtype=np.float32) / 255.0


@torch.no_grad()
def test_every_panel_is_the_decoder_it_names(tiny_pipeline):
    image, seed = photo(), 5
    student = tiny_student()
    result = reconstruct_for_demo(
        tiny_pipeline, image, fast_decoders=[("dpm", 2), FastDecoder("heun", 2), ("unipc", 3)], student=student,
        seed=seed, num_variance_samples=3,
    )
    assert isinstance(result, DemoResult)
    prepared = prepare_image(image, 32)
    assert as_array(result.image).tolist() == as_array(prepared).tolist()
    ids = tiny_pipeline.encode(prepared)
    assert torch.equal(result.indices, ids[0]) and result.indices.shape == (24,)
    assert result.bits_per_index == 4 and result.bits_per_pixel == pytest.approx(24 * 4 / 32**2)  # 0.094

    names = [r.name for r in result.reconstructions]
    assert names == ["paper sampler (25 steps, guidance 1.5)", "DPM-Solver++ 2 steps", "Heun 2 steps",
                     "UniPC 3 steps", "distilled student (2 passes)"]
    expected = [
        decode(tiny_pipeline, ids, seed),
        decode(FlowMoPipeline(tiny_pipeline.autoencoder, DPMSolverMultistepScheduler(**FLOW)), ids, seed,
               num_inference_steps=2),
        decode(FlowMoPipeline(tiny_pipeline.autoencoder, FlowMatchHeunDiscreteScheduler()), ids, seed,
               num_inference_steps=2),
        decode(FlowMoPipeline(tiny_pipeline.autoencoder, UniPCMultistepScheduler(**FLOW)), ids, seed,
               num_inference_steps=3),
        decode(student, ids, seed),
    ]
    assert [r.num_decoder_passes for r in result.reconstructions] == [e.num_decoder_passes for e in expected]
    assert [r.num_decoder_passes for r in result.reconstructions] == [31, 3, 3, 4, 2]
    for reconstruction, reference in zip(result.reconstructions, expected):
        assert reconstruction.image.size == (32, 32)
        # PIL output is the np output rounded to 8 bits.
        np.testing.assert_allclose(as_array(reconstruction.image), reference.images[0], atol=0.5 / 255 + 1e-6)
    # The decoders really differ (same ids, same noise): the panels are not one image repeated.
    assert as_array(result.reconstructions[0].image).tolist() != as_array(result.reconstructions[1].image).tolist()

    samples = tiny_pipeline(indices=ids, num_images_per_prompt=3, output_type="np",
                            generator=[torch.Generator().manual_seed(seed + k) for k in range(3)]).images
    np.testing.assert_allclose(result.variance, per_pixel_variance(samples, 3)[0], rtol=1e-6, atol=1e-7)
    assert result.variance.shape == (32, 32) and result.variance.max() > 0 and result.num_variance_samples == 3

    rows = result.timings()
    assert [row[0] for row in rows] == ["encode (token ids)", *names, "variance: 3 paper-sampler samples"]
    assert [row[1] for row in rows] == [0, 31, 3, 3, 4, 2, 93]
    # The table's milliseconds are the timed parts of the result, one row each.
    parts = [result.encode_seconds, *[r.seconds for r in result.reconstructions], result.variance_seconds]
    assert [row[2] for row in rows] == [round(seconds * 1000, 1) for seconds in parts]
    assert result.indices_text(per_line=10).splitlines()[0].split() == [str(int(i)) for i in ids[0, :10]]
    assert len(result.indices_text(per_line=10).splitlines()) == 3


@torch.no_grad()
def test_the_paper_sampler_is_used_whatever_scheduler_the_pipeline_holds(tiny_pipeline):
    image = photo(seed=1)
    reference = reconstruct_for_demo(tiny_pipeline, image, num_variance_samples=0)
    tiny_pipeline.scheduler = UniPCMultistepScheduler(**FLOW)
    result = reconstruct_for_demo(tiny_pipeline, image, num_variance_samples=0)
    assert isinstance(tiny_pipeline.scheduler, UniPCMultistepScheduler)  # the caller's pipeline is left as it was
    assert as_array(result.reconstructions[0].image).tolist() == as_array(reference.reconstructions[0].image).tolist()
    assert result.variance is None and result.variance_seconds is None and result.variance_image() is None
    assert len(result.timings()) == 2 and result.reconstructions[0].num_decoder_passes == 31
    assert isinstance(reference.reconstructions[0].image, PIL.Image.Image)


@torch.no_grad()
def test_seeds_decide_the_noise(tiny_pipeline):
    image = photo(seed=2)
    first = reconstruct_for_demo(tiny_pipeline, image, seed=0, num_variance_samples=0).reconstructions[0].image
    again = reconstruct_for_demo(tiny_pipeline, image, seed=0, num_variance_samples=0).reconstructions[0].image
    other = reconstruct_for_demo(tiny_pipeline, image, seed=1, num_variance_samples=0).reconstructions[0].image
    assert as_array(first).tolist() == as_array(again).tolist() != as_array(other).tolist()


def test_prepare_image_frames_any_upload_as_the_model_reads_it():
    wide = photo(width=90, height=30, seed=3)
    square = prepare_image(wide, 32)
    assert square.size == (32, 32) and square.mode == "RGB"
    # A center crop: the left and right thirds of a wide image are cut off, not squeezed in.
    halves = PIL.Image.new("RGB", (90, 30), (255, 0, 0))
    halves.paste((0, 0, 255), (30, 0, 60, 30))
    assert prepare_image(halves, 16).getpixel((8, 8)) == (0, 0, 255)
    transparent = PIL.Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert prepare_image(transparent, 8).getpixel((4, 4)) == (255, 255, 255)  # onto white, as everywhere
    with pytest.raises(TypeError, match="image must be a PIL image"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), 8)


def test_enlarge_by_whole_factors():
    small = photo(width=32, height=32)
    big = enlarge(small, 256)
    assert big.size == (256, 256) and big.getpixel((7, 7)) == small.getpixel((0, 0))  # nearest neighbour
    assert enlarge(small, 100).size == (96, 96) and enlarge(small, 20) is small


def test_variance_image_is_white_at_the_peak():
    result = DemoResult(image=photo(), indices=torch.zeros(24, dtype=torch.long), bits_per_index=4,
                        bits_per_pixel=0.09, encode_seconds=0.0, reconstructions=[], num_variance_samples=2,
                        variance=np.array([[0.0, 0.1], [0.2, 0.4]], np.float32), variance_seconds=0.0)
    assert np.asarray(result.variance_image()).tolist() == [[0, 64], [128, 255]]
    result.variance = np.zeros((2, 2), np.float32)
    assert np.asarray(result.variance_image()).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fast_decoders=[("ddpm", 4)]), ValueError, "unknown solver 'ddpm'"),
        (dict(fast_decoders=[("euler", 0)]), ValueError, "num_inference_steps of euler must be an integer in"),
        (dict(fast_decoders=[("euler", True)]), TypeError, "num_inference_steps of euler must be an integer"),
        (dict(fast_decoders=[("euler", 1001)]), ValueError, r"\[1, 1000\]"),
        (dict(fast_decoders=["euler"]), TypeError, "fast_decoders entries must be"),
        (dict(fast_decoders="euler"), TypeError, "fast_decoders must be a list"),
        (dict(num_variance_samples=1), ValueError, "num_variance_samples must be 0 .* or at least 2"),
        (dict(num_variance_samples=65), ValueError, "num_variance_samples must be an integer in"),
        (dict(seed=-1), ValueError, "seed must be an integer in"),
        (dict(seed=1.5), TypeError, "seed must be an integer"),
        (dict(student="folder"), TypeError, "student must be a FlowMoPipeline"),
        (dict(image=np.zeros((32, 32, 3), np.uint8)), TypeError, "image must be a PIL image"),
    ],
)
def test_bad_arguments_are_named_before_any_work(tiny_pipeline, monkeypatch, kwargs, error, match):
    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline ran before the arguments were checked")

    monkeypatch.setattr(FlowMoPipeline, "__call__", no_work)
    monkeypatch.setattr(FlowMoPipeline, "encode", no_work)
    arguments = {"image": photo(), **kwargs}
    with pytest.raises(error, match=match):
        reconstruct_for_demo(tiny_pipeline, **arguments)


def test_a_student_of_another_token_format_or_as_the_main_pipeline_is_refused(tiny_pipeline):
    other = tiny_flowmo_pipeline(tiny_flowmo_model(code_length=4))
    with pytest.raises(ValueError, match="student reads another token format"):
        reconstruct_for_demo(tiny_pipeline, photo(), student=other)
    with pytest.raises(ValueError, match="pass the teacher as pipeline and the student as student"):
        reconstruct_for_demo(tiny_student(), photo())
    with pytest.raises(TypeError, match="pipeline must be a FlowMoPipeline"):
        reconstruct_for_demo(tiny_pipeline.autoencoder, photo())
