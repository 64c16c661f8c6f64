"""Golden tests against numbers produced by running the original FlowMo code (see fixtures/original_tiny/README.md)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoModel, FlowMoPipeline, get_preset_config
from flowmo_diffusers.conversion import (
    CheckpointConversionError,
    UnsafeCheckpointError,
    config_from_original,
    convert_original_state_dict,
    load_original_checkpoint,
)
from flowmo_diffusers.training import checkpointing

from testing_utils import CONVERSION_SCRIPT as SCRIPT
from testing_utils import ORIGINAL_CHECKPOINT as CHECKPOINT
from testing_utils import ORIGINAL_TINY, WritesAMarker
from testing_utils import load_conversion_script as load_script

TOLERANCE = 1e-4  # fp32 on CPU; measured differences are below 1e-6


ORIGINAL_CONFIG = ["--original_config", str(ORIGINAL_TINY / "config.yaml"), "--original_dit_base", str(ORIGINAL_TINY / "dit_base.json")]


def convert(output_path, *extra):
    """Runs the conversion script's main in this process (the CLI itself is exercised in a subprocess below)."""
    load_script().main(["--checkpoint_path", str(CHECKPOINT), "--output_path", str(output_path), *(extra or ORIGINAL_CONFIG)])


@pytest.fixture(scope="module")
def reference():
    return load_file(ORIGINAL_TINY / "reference.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("converted")
    convert(output)
    pipeline = FlowMoPipeline.from_pretrained(output)
    pipeline.set_progress_bar_config(disable=True)
    return output, pipeline


def test_written_folder_is_safetensors_only(converted):
    folder, _ = converted
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "autoencoder/config.json",
        "autoencoder/diffusion_pytorch_model.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
    ]


def test_token_ids_and_code_identical(converted, reference):
    _, pipeline = converted
    output = pipeline.autoencoder.encode(reference["images"])
    assert torch.equal(output.indices, reference["indices"])
    assert torch.equal(output.code, reference["code"])
    torch.testing.assert_close(output.unquantized_code, reference["code_prequant"], rtol=0, atol=TOLERANCE)
    assert torch.equal(pipeline.encode(reference["images"] / 2 + 0.5), reference["indices"])


def test_decoder_velocity_matches(converted, reference):
    _, pipeline = converted
    model = pipeline.autoencoder
    with torch.no_grad():
        velocity = model(reference["noise"], torch.full((2,), 0.7), reference["code"]).sample
        null = model(reference["noise"], 0.7, reference["code"], code_mask=torch.zeros(2)).sample
    torch.testing.assert_close(velocity, reference["velocity"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(null, reference["velocity_null"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("recon_guided", {}),
        ("recon_unguided", {"guidance_scale": 1.0}),
    ],
)
def test_25_step_reconstruction_matches(converted, reference, name, kwargs):
    _, pipeline = converted
    images = pipeline(
        images=reference["images"] / 2 + 0.5, latents=reference["noise"], output_type="pt", **kwargs
    ).images
    torch.testing.assert_close(images * 2 - 1, reference[name], rtol=0, atol=TOLERANCE)


def test_decoding_token_ids_needs_no_image(converted, reference):
    _, pipeline = converted
    images = pipeline(indices=reference["indices"], latents=reference["noise"], output_type="pt").images
    torch.testing.assert_close(images * 2 - 1, reference["recon_guided"], rtol=0, atol=TOLERANCE)


def test_linear_schedule_matches(converted, reference):
    _, pipeline = converted
    from flowmo_diffusers import FlowMoScheduler

    linear = FlowMoPipeline(pipeline.autoencoder, FlowMoScheduler(time_schedule="linear"))
    linear.set_progress_bar_config(disable=True)
    images = linear(indices=reference["indices"], latents=reference["noise"], num_inference_steps=10, output_type="pt")
    torch.testing.assert_close(images.images * 2 - 1, reference["recon_linear"], rtol=0, atol=TOLERANCE)


def test_ema_weights_are_used_and_no_ema_differs(tmp_path, reference):
    convert(tmp_path, *ORIGINAL_CONFIG, "--no_ema")
    model = FlowMoModel.from_pretrained(tmp_path / "autoencoder")
    with torch.no_grad():
        velocity = model(reference["noise"], 0.7, reference["code"]).sample
    assert (velocity - reference["velocity"]).abs().max() > 1e-2


def test_bf16_conversion_halves_the_weights(tmp_path, converted):
    fp32_folder, _ = converted
    convert(tmp_path, *ORIGINAL_CONFIG, "--dtype", "bf16")
    weights = "autoencoder/diffusion_pytorch_model.safetensors"
    ratio = (tmp_path / weights).stat().st_size / (fp32_folder / weights).stat().st_size
    assert 0.45 < ratio < 0.55
    assert {tensor.dtype for tensor in load_file(tmp_path / weights).values()} == {torch.bfloat16}
    model = FlowMoModel.from_pretrained(tmp_path / "autoencoder", torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["flowmo-lo", "flowmo-hi"])
def test_trainer_config_yaml_maps_to_preset(name):
    config = config_from_original(ORIGINAL_TINY / f"config_{name.replace('-', '_')}.yaml")
    assert config == get_preset_config(name)


@pytest.mark.parametrize("name", ["flowmo-lo", "flowmo-hi"])
def test_released_checkpoint_layout_converts(name):
    """Every key of the released models (names and shapes recorded from the original) maps or is a known unused one."""
    original_shapes = json.loads((ORIGINAL_TINY / f"original_keys_{name.replace('-', '_')}.json").read_text())
    config = get_preset_config(name)
    with torch.device("meta"):
        model = FlowMoModel(**config)
        original = {key: torch.empty(shape) for key, shape in original_shapes.items()}
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    converted = convert_original_state_dict(original, shapes, config)
    assert set(converted) == set(shapes)
    # 608 original tensors; the unused ones (encoder modulation, time embedding and image head, decoder code head,
    # the last blocks' unread streams) are dropped.
    assert len(original) == 608 and len(converted) == len(shapes) < len(original)


def test_mismatches_name_the_keys(tmp_path):
    state_dict, source = load_original_checkpoint(str(CHECKPOINT))
    assert source == "model_ema_state_dict"
    config = config_from_original(ORIGINAL_TINY / "config.yaml", json.loads((ORIGINAL_TINY / "dit_base.json").read_text())["dit_b_4"])
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in FlowMoModel(**config).state_dict().items()}

    broken = dict(state_dict)
    del broken["decoder.img_in.weight"]
    broken["decoder.extra_head.weight"] = torch.zeros(1)
    broken["encoder.txt_in.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointConversionError) as error:
        convert_original_state_dict(broken, shapes, config)
    message = str(error.value)
    assert "missing keys (1): decoder.img_in.weight" in message
    assert "unexpected keys (1): decoder.extra_head.weight" in message
    assert "encoder.txt_in.bias: checkpoint (7,)" in message

    command = [sys.executable, str(SCRIPT), "--checkpoint_path", str(CHECKPOINT), "--preset", "flowmo-lo"]
    result = subprocess.run(command + ["--output_path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "mis-shaped keys" in result.stderr and "does not match" in result.stderr


def test_hostile_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    bad = tmp_path / "hostile.pth"
    state_dict, _ = load_original_checkpoint(str(CHECKPOINT))
    torch.save({"model_ema_state_dict": state_dict, "payload": WritesAMarker(marker)}, bad)
    assert not marker.exists()

    with pytest.raises(UnsafeCheckpointError) as error:
        load_original_checkpoint(str(bad))
    message = str(error.value)
    assert "non-tensor pickled objects" in message and "refused for safety" in message and str(bad) in message
    assert "weights_only" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's advice is not chained
    # One class for every refusal: the converter's and the training checkpoints' (it is a ValueError).
    assert error.value.__class__ is checkpointing.UnsafeCheckpointError and isinstance(error.value, ValueError)

    command = [sys.executable, str(SCRIPT), "--checkpoint_path", str(bad), *ORIGINAL_CONFIG]
    result = subprocess.run(command + ["--output_path", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "non-tensor pickled objects" in result.stderr and "refused for safety" in result.stderr
    assert "weights_only=False" not in result.stderr and "`weights_only` set to `False`" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(str(tmp_path / "missing.pth"))
