"""Careless and hostile input to the models and the pipeline: each case ends in a ValueError / TypeError that names
the argument (or config key) and what was expected, before any heavy work; sizes and step counts are bounded before
allocation; config.json values are checked at load; weights that do not match are refused."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from flowmo_diffusers import FlowMoMaskGiTTransformer, FlowMoModel, FlowMoPipeline
from flowmo_diffusers.models.presets import get_maskgit_preset_config

from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline

IDS = torch.zeros(1, 24, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"images": torch.rand(0, 3, 32, 32)}, ValueError, "batch size 0"),
        ({"images": np.zeros((0, 32, 32, 3), dtype=np.uint8)}, ValueError, "batch size 0"),
        ({"images": [PIL.Image.new("RGB", (0, 0))]}, ValueError, "at least 1x1"),
        ({"images": torch.rand(1, 3, 0, 0)}, ValueError, "at least 1x1"),
        ({"images": [torch.rand(3, 32, 32), torch.rand(3, 16, 16)]}, ValueError, "one size"),
        ({"images": [PIL.Image.new("RGB", (32, 32)), torch.rand(3, 32, 32)]}, TypeError, "mixes PIL.Image and Tensor"),
        ({"images": torch.rand(1, 3, 8192, 8192)}, ValueError, "exceed max_image_size=128"),
        ({"indices": torch.zeros(0, 24, dtype=torch.long)}, ValueError, "indices holds no image"),
        ({"indices": np.zeros((0, 24), dtype=np.int64)}, ValueError, "indices holds no image"),
        ({"indices": IDS, "height": "32"}, ValueError, "height must be a positive integer"),
        ({"indices": IDS, "height": 0}, ValueError, "height must be a positive integer"),
        ({"indices": IDS, "height": 8192}, ValueError, "height=8192 exceeds max_image_size=128"),
        ({"indices": IDS, "latents": torch.randn(1, 3, 8192, 8192)}, ValueError, "latents of 8192x8192 exceed max_image_size=128"),
        ({"indices": IDS, "guidance_scale": "1.5"}, ValueError, "guidance_scale must be a finite real number"),
        ({"indices": IDS, "guidance_scale": 1 + 2j}, ValueError, "guidance_scale must be a finite real number"),
        ({"indices": IDS, "guidance_scale": 1e30}, ValueError, "guidance_scale must lie in \\[-100, 100\\]"),
        ({"indices": IDS, "num_inference_steps": True}, ValueError, "num_inference_steps must be a positive integer"),
        ({"indices": IDS, "num_inference_steps": 10**9}, ValueError, "exceeds max_inference_steps=1000"),
        ({"indices": IDS, "generator": 0}, TypeError, "generator must be a torch.Generator"),
        ({"indices": IDS, "generator": [0]}, TypeError, "generator must be a torch.Generator"),
    ],
)
def test_careless_calls_are_refused_with_the_argument_named(tiny_pipeline, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_pipeline(**kwargs)


def test_numpy_integer_step_counts_and_explicit_bounds_are_accepted(tiny_pipeline):
    images = tiny_pipeline(indices=IDS, num_inference_steps=np.int64(2), output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    images = tiny_pipeline(indices=IDS, num_inference_steps=2, height=160, width=32, max_image_size=160,
                           output_type="pt").images
    assert images.shape == (1, 3, 160, 32)
    with pytest.raises(ValueError, match="exceeds max_inference_steps=3"):
        tiny_pipeline(indices=IDS, num_inference_steps=4, max_inference_steps=3)
    with pytest.raises(ValueError, match="exceed max_image_size=16"):
        tiny_pipeline.encode(torch.rand(1, 3, 32, 32), max_image_size=16)


def test_model_calls_with_python_scalars_are_checked(tiny_model):
    sample, code = torch.randn(1, 3, 32, 32), torch.zeros(1, 8, 12)
    with pytest.raises(ValueError, match="timestep must be a flow time in \\[0, 1\\]"):
        tiny_model(sample, 5, code)
    with pytest.raises(ValueError, match="timestep must be a flow time in \\[0, 1\\]"):
        tiny_model(sample, float("nan"), code)
    with pytest.raises(ValueError, match="rotary_emb must be the \\(cos, sin\\) pair"):
        tiny_model(sample, 0.5, code, rotary_emb=tiny_model.decoder_rotary_embedding(16, 16))
    with pytest.raises(ValueError, match="sample must have shape \\(batch, channels, height, width\\)"):
        tiny_model(torch.randn(3, 32, 32), 0.5, code)
    assert tiny_model(sample, 1, code).sample.shape == sample.shape  # an int time is a time


# ----------------------------------------------------------------------------------------------------------------------
# Input range and image conversion
# ----------------------------------------------------------------------------------------------------------------------


def test_a_pixel_slightly_outside_0_1_is_clamped_not_a_range_flip(tiny_pipeline):
    images = torch.rand(1, 3, 32, 32)
    nudged = images.clone()
    nudged[0, 0, 0, 0] = -0.001
    clamped = nudged.clamp(0, 1)
    assert torch.equal(tiny_pipeline.encode(nudged), tiny_pipeline.encode(clamped))
    # diffusers' image processor would have read the nudged tensor as [-1, 1] (and only warned): other ids.
    as_if_minus_one_to_one = tiny_pipeline.autoencoder.encode(nudged).indices
    assert not torch.equal(as_if_minus_one_to_one, tiny_pipeline.encode(nudged))


@pytest.mark.parametrize("value", [-0.01, 1.01, -1.0])
def test_values_beyond_the_tolerance_are_refused_with_the_readme_message(tiny_pipeline, value):
    images = torch.rand(1, 3, 32, 32)
    images[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match="must have values in \\[0, 1\\].*images in \\[-1, 1\\] are not accepted"):
        tiny_pipeline.encode(images)
    with pytest.raises(ValueError, match="must have values in \\[0, 1\\]"):
        tiny_pipeline.encode(images.permute(0, 2, 3, 1).numpy())


def image_with_transparency():
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where visible
    rgba[:, 16:, 3] = 255  # left half fully transparent (color underneath: red)
    return PIL.Image.fromarray(rgba)


def test_one_conversion_for_the_pipeline_and_the_data_pipeline(tiny_pipeline):
    from flowmo_diffusers.data import ImageTransform

    transform = ImageTransform(32, random_crop=False)
    sixteen = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64).astype(np.uint16)
    sixteen[0, 0] = 60000
    assert PIL.Image.fromarray(sixteen).mode == "I;16"
    for image in (image_with_transparency(), PIL.Image.fromarray(sixteen),
                  PIL.Image.new("CMYK", (32, 32), (10, 200, 30, 5)),
                  image_with_transparency().convert("P")):
        training_pixels = transform(image)[None]  # [-1, 1], as training and evaluation see the image
        assert torch.equal(tiny_pipeline.encode(image), tiny_pipeline.encode(training_pixels / 2 + 0.5)), image.mode
    # Transparency becomes white everywhere, 60000 becomes round(60000 / 257) = 233 everywhere.
    assert transform(image_with_transparency())[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    assert round(float(transform(PIL.Image.fromarray(sixteen))[0, 0, 0] + 1) * 127.5) == 233
    rgb16 = np.repeat(sixteen[..., None], 3, axis=-1)
    assert torch.equal(tiny_pipeline.encode(rgb16), tiny_pipeline.encode(PIL.Image.fromarray(sixteen)))


def test_exif_orientation_is_applied_in_the_pipeline(tiny_pipeline, tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 3  # rotated 180 degrees
    PIL.Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    stored = PIL.Image.open(tmp_path / "rotated.jpg")
    upright = np.asarray(stored.convert("RGB"))[::-1, ::-1].copy()
    assert torch.equal(tiny_pipeline.encode(stored), tiny_pipeline.encode(upright))


# ----------------------------------------------------------------------------------------------------------------------
# config.json values and weights
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("decoder_depth", 10**6, "decoder_depth must be an integer in \\[1, 1024\\], got 1000000"),
        ("encoder_depth", True, "encoder_depth must be an integer, got True"),
        ("context_dim", 10**9, "context_dim must be an integer in \\[1, 4096\\]"),
        ("sample_size", 10**6, "sample_size must be an integer in \\[1, 8192\\]"),
        ("patch_size", 0, "patch_size must be an integer in \\[1, 256\\], got 0"),
        ("patch_size", -4, "patch_size must be an integer in \\[1, 256\\], got -4"),
        ("sample_size", "32", "sample_size must be an integer, got '32'"),
        ("mlp_ratio", float("nan"), "mlp_ratio must be finite"),
        ("qkv_bias", "false", "qkv_bias must be true or false"),
        ("decoder_axes_dim", [4, 4], "decoder_axes_dim must be a list of 3 integers"),
        ("decoder_hidden_size", 60000, "encoder/decoder depth and hidden sizes describe a model of about .* parameters"),
    ],
)
def test_flowmo_config_values_are_checked_at_load(tmp_path, key, value, message):
    tiny_flowmo_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"FlowMoModel config: {message}"):
        FlowMoModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_layers", 10**6, "num_layers must be an integer in \\[1, 1024\\]"),
        ("hidden_size", "32", "hidden_size must be an integer, got '32'"),
        ("num_heads", True, "num_heads must be an integer, got True"),
        ("codebook_size", 0, "codebook_size must be an integer in"),
    ],
)
def test_maskgit_config_values_are_checked(key, value, message):
    with pytest.raises(ValueError, match=f"FlowMoMaskGiTTransformer config: {message}"):
        FlowMoMaskGiTTransformer(**dict(get_maskgit_preset_config("maskgit-tiny"), **{key: value}))


def test_weights_that_do_not_match_are_refused(tmp_path):
    tiny_flowmo_model().save_pretrained(tmp_path)
    weights_path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_path)
    name = next(iter(weights))
    save_file({("renamed." + k if k == name else k): v for k, v in weights.items()}, weights_path)
    with pytest.raises(ValueError, match=f"do not match FlowMoModel: 1 missing from the weights \\({name}\\); "
                                         f"1 not in FlowMoModel \\(renamed.{name}\\)"):
        FlowMoModel.from_pretrained(tmp_path)


def test_a_component_of_the_wrong_class_is_refused_at_load(tmp_path):
    tiny_flowmo_pipeline(tiny_flowmo_model()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["autoencoder"] = ["flowmo_diffusers", "FlowMoMaskGiTTransformer"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names flowmo_diffusers.FlowMoMaskGiTTransformer for 'autoencoder', but "
                                         "FlowMoPipeline takes FlowMoModel"):
        FlowMoPipeline.from_pretrained(tmp_path)


def test_model_decode_is_bounded_before_allocation(tiny_model):
    with pytest.raises(ValueError, match="height=8192 exceeds max_image_size=128"):
        tiny_model.decode(IDS, height=8192, width=32)
    with pytest.raises(ValueError, match="num_inference_steps=1000000000 exceeds max_inference_steps=1000"):
        tiny_model.decode(IDS, num_inference_steps=10**9)
    with pytest.raises(ValueError, match="guidance_scale must lie in"):
        tiny_model.decode(IDS, guidance_scale=1e30)
    assert tiny_model.decode(IDS, num_inference_steps=1, height=160, max_image_size=160).sample.shape == (1, 3, 160, 32)
    # The decoder's own step count is bounded like a passed one.
    with pytest.raises(ValueError, match="num_inference_steps=25 exceeds max_inference_steps=3"):
        tiny_model.decode(IDS, max_inference_steps=3)


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_pipeline_call_checks_the_decode_bounds_once(tiny_pipeline, monkeypatch):
    from flowmo_diffusers.models import decoding_flowmo
    from flowmo_diffusers.pipelines import pipeline_flowmo

    in_pipeline = count_calls(monkeypatch, pipeline_flowmo, "check_decode_bounds")
    in_model = count_calls(monkeypatch, decoding_flowmo, "check_decode_bounds")
    tiny_pipeline(indices=IDS, num_inference_steps=2, output_type="pt")
    assert (len(in_pipeline), len(in_model)) == (1, 0)
    tiny_pipeline(images=torch.rand(1, 3, 32, 32), num_inference_steps=2, output_type="pt")
    assert (len(in_pipeline), len(in_model)) == (2, 0)
    # A direct model call is checked once, by the model, also with tiling on (once, not once per chunk of tiles).
    tiny_pipeline.autoencoder.decode(IDS, num_inference_steps=2)
    assert (len(in_pipeline), len(in_model)) == (2, 1)
    tiny_pipeline.autoencoder.enable_tiling(tile_batch_size=1)
    tiled_ids = tiny_pipeline.encode(torch.rand(1, 3, 48, 48))
    tiny_pipeline.autoencoder.decode(tiled_ids, num_inference_steps=2, height=48, width=48)
    assert (len(in_pipeline), len(in_model)) == (2, 2)
    with pytest.raises(ValueError, match="height must be a positive integer, got '48'"):
        tiny_pipeline.autoencoder.decode(tiled_ids, num_inference_steps=2, height="48", width=48)


def test_one_family_of_value_checks():
    from flowmo_diffusers.utils.validation import (
        WrongTypeError,
        check_float,
        check_int,
        check_optional_float,
        check_optional_int,
    )

    # A wrong type is both: Python's TypeError and the ValueError that diffusers' check_inputs raise.
    with pytest.raises(WrongTypeError, match="steps must be a positive integer, got True \\(bool\\)") as raised:
        check_int("steps", True, 1)
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)
    assert check_int("steps", np.int64(3), 1) == 3 and type(check_int("steps", np.int64(3), 1)) is int
    assert check_optional_int("limit", None, 1) is None and check_optional_int("limit", 2, 1) == 2
    with pytest.raises(ValueError, match="limit must be a positive integer, got 0"):
        check_optional_int("limit", 0, 1)
    with pytest.raises(ValueError, match="skips must be an integer >= 0, got -1"):
        check_int("skips", -1, 0)
    with pytest.raises(ValueError, match="depth must be an integer in \\[1, 8\\], got 9"):
        check_int("depth", 9, 1, 8)
    assert check_optional_float("scale", None) is None and check_optional_float("scale", np.float32(0.5), 0, 1) == 0.5
    with pytest.raises(ValueError, match="scale must lie in \\[-100, 100\\], got 1e\\+09"):
        check_float("scale", 1e9, -100.0, 100.0)
    with pytest.raises(ValueError, match="power must be greater than 0, got 0"):
        check_float("power", 0.0, 0.0, exclusive_minimum=True)
    with pytest.raises(ValueError, match="sigma must be a finite real number >= 0, got -1"):
        check_float("sigma", -1, 0.0)
    with pytest.raises(ValueError, match="sigma must be finite, got inf"):
        check_float("sigma", float("inf"), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Values of the wrong kind where they enter: ids as text or ragged lists, float64 images, a numpy code, a code_mask of
# the wrong shape (each used to fail deep inside numpy, torch or the first matmul with a message naming none of them)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices, error, message",
    [
        ("1,2", TypeError, "indices must be integer ids .*got the string '1,2'"),
        ([["1"] * 24], TypeError, "indices must be integer ids, got elements of type \\['str'\\]"),
        ([[0] * 24, [0] * 23], ValueError, "indices must be a rectangular \\(batch, length\\) array of ids"),
        ([[0.0] * 24], ValueError, "indices must hold integers \\(an integer tensor of ids\\), got dtype torch.float64"),
    ],
)
def test_ids_as_text_or_ragged_lists_are_refused_before_decoding(tiny_pipeline, indices, error, message):
    with pytest.raises(error, match=message):
        tiny_pipeline(indices=indices)


def test_ids_as_nested_lists_and_arrays_decode_like_the_tensor(tiny_pipeline):
    ids = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, output_type="pt")
    expected = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(1), **kwargs).images
    for given in (ids.tolist(), ids.numpy(), ids.int().numpy()):
        got = tiny_pipeline(indices=given, generator=torch.Generator().manual_seed(1), **kwargs).images
        assert torch.equal(got, expected), type(given)
    with pytest.raises(ValueError, match="indices holds no image"):
        tiny_pipeline(indices=[])
    # One sequence is one image (diffusers' PipelineTesterMixin batches a single input that way).
    for given in (ids[0], ids[0].tolist()):
        one = tiny_pipeline(indices=given, generator=torch.Generator().manual_seed(1), **kwargs).images
        assert torch.equal(one, tiny_pipeline(indices=ids[:1], generator=torch.Generator().manual_seed(1), **kwargs).images)
    with pytest.raises(ValueError, match="indices must have shape \\(batch, 24\\)"):
        tiny_pipeline(indices=ids[0, :23])


def test_class_labels_as_text_are_refused_by_the_same_check(maskgit_pipeline):
    with pytest.raises(TypeError, match="class_labels must be integer ids"):
        maskgit_pipeline(class_labels="3")
    with pytest.raises(TypeError, match="class_labels must be integer ids, got elements of type"):
        maskgit_pipeline(class_labels=["3", "4"])
    with pytest.raises(ValueError, match="class_labels must hold integers"):
        maskgit_pipeline(class_labels=[1.5])


def test_float64_images_to_encode_are_refused_with_the_dtype_to_use(tiny_model):
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 2 - 1
    with pytest.raises(ValueError, match="images must have the model's dtype torch.float32, got torch.float64"):
        tiny_model.encode(images)
    # Under autocast half / single precision is cast for the matmuls, float64 never is.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiny_model.encode(images.float().bfloat16()).indices.shape == (1, 24)
        with pytest.raises(ValueError, match="images must have the model's dtype"):
            tiny_model.encode(images)
    assert torch.equal(tiny_model.encode(images.float()).indices, tiny_model.encode(images.float()).indices)


def test_a_numpy_code_or_a_code_mask_of_the_wrong_shape_is_refused(tiny_model):
    sample, code = torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 12)
    with pytest.raises(TypeError, match="code must be a torch.Tensor, got ndarray: convert it with torch.from_numpy"):
        tiny_model(sample, 0.5, code.numpy())
    with pytest.raises(ValueError, match="code_mask must have shape \\(2,\\), got \\(3,\\)"):
        tiny_model(sample, 0.5, code, code_mask=torch.ones(3))
    with pytest.raises(ValueError, match="code_mask must have shape \\(2,\\), got \\(2, 1\\)"):
        tiny_model(sample, 0.5, code, code_mask=torch.ones(2, 1))
    with pytest.raises(TypeError, match="code_mask must be a torch.Tensor, got list"):
        tiny_model(sample, 0.5, code, code_mask=[1, 0])
    # A right-shaped mask works as before: 0 is the null code (batch 2 vs 1: float rounding only).
    with torch.no_grad():
        null = tiny_model(sample, 0.5, code + 1, code_mask=torch.tensor([1.0, 0.0])).sample
        alone = tiny_model(sample[1:], 0.5, code[1:] - 1, code_mask=torch.zeros(1)).sample
    torch.testing.assert_close(null[1], alone[0], rtol=0, atol=1e-5)
