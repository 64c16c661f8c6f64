import pytest
import torch

from flowmo_diffusers import FlowMoModel, get_preset_config
from flowmo_diffusers.models import patchify, unpatchify


def test_patchify_is_channel_last_and_invertible():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # first patch, first pixel: the 3 channels are adjacent
    assert patches[0, 0, :3].tolist() == [images[0, 0, 0, 0], images[0, 1, 0, 0], images[0, 2, 0, 0]]
    assert torch.equal(unpatchify(patches, 4, 8, 8), images)


def test_encode_shapes_and_index_inverse(tiny_model):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    output = tiny_model.encode(images)
    assert output.code.shape == (3, 8, 12)
    assert output.indices.shape == (3, tiny_model.num_indices) == (3, 24)
    assert output.indices.dtype == torch.int64
    assert 0 <= output.indices.min() and output.indices.max() < tiny_model.codebook_size == 16
    assert set(output.code.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(tiny_model.indices_to_code(output.indices), output.code, rtol=0, atol=1e-6)
    # other image sizes that are multiples of the patch size work too (RoPE positions)
    assert tiny_model.encode(torch.zeros(1, 3, 16, 24)).indices.shape == (1, 24)


def test_decoder_returns_velocity_and_null_code_differs(tiny_model):
    code = tiny_model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).code
    noisy = torch.randn(2, 3, 32, 32)
    velocity = tiny_model(noisy, torch.tensor([0.3, 0.8]), code).sample
    assert velocity.shape == noisy.shape
    null = tiny_model(noisy, torch.tensor([0.3, 0.8]), code, code_mask=torch.zeros(2)).sample
    assert (velocity - null).abs().max() > 1e-4
    # the null code is the all-zero code including the mask channel: independent of the code itself
    other_null = tiny_model(noisy, torch.tensor([0.3, 0.8]), -code, code_mask=torch.zeros(2)).sample
    torch.testing.assert_close(null, other_null)
    # samples are independent within a batch, and a mask keeps or drops per sample
    mixed = tiny_model(noisy, torch.tensor([0.3, 0.8]), code, code_mask=torch.tensor([1.0, 0.0])).sample
    torch.testing.assert_close(mixed[0], velocity[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], null[1], rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    tiny_model.train()
    images, noisy = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)

    def gradients():
        tiny_model.zero_grad()
        output = tiny_model.encode(images, return_quantizer_losses=True)
        velocity = tiny_model(noisy, torch.tensor([0.4, 0.6]), output.code).sample
        (velocity.square().mean() + output.quantizer.loss).backward()
        return {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    plain = gradients()
    tiny_model.enable_gradient_checkpointing()
    assert tiny_model.decoder.gradient_checkpointing and tiny_model.encoder.gradient_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    # every parameter takes part in the graph: nothing unused for DDP
    assert set(plain) == {name for name, _ in tiny_model.named_parameters()}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = FlowMoModel.from_pretrained(tmp_path)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(images).indices, tiny_model.encode(images).indices)
    assert loaded.config.bits_per_subtoken == 4


@pytest.mark.parametrize("axes", [(4, 6, 6), [4, 6, 6]])
def test_config_is_equal_after_save_and_load(tmp_path, axes):
    config = dict(get_preset_config("flowmo-tiny"), encoder_axes_dim=axes)
    model = FlowMoModel(**config)
    model.save_pretrained(tmp_path)
    loaded = FlowMoModel.from_pretrained(tmp_path)

    def public(config):
        return {key: value for key, value in config.items() if not key.startswith("_")}

    assert public(loaded.config) == public(model.config)  # tuples registered as JSON brings them back
    assert loaded.config.encoder_axes_dim == [4, 6, 6]


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(3, 32, 32), "shape \\(batch, channels, height, width\\)"),
        (torch.zeros(1, 4, 32, 32), "must have 3 channels"),
        (torch.zeros(1, 3, 30, 32), "multiples of patch_size 4"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_images_are_named(tiny_model, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(images)


@pytest.mark.parametrize(
    "indices, message",
    [
        (torch.zeros(1, 23, dtype=torch.long), "shape \\(batch, 24\\)"),
        (torch.zeros(24, dtype=torch.long), "shape \\(batch, 24\\)"),
        (torch.zeros(1, 24), "integer tensor"),
        (torch.full((1, 24), 16, dtype=torch.long), "\\[0, 16\\)"),
        (torch.full((1, 24), -1, dtype=torch.long), "\\[0, 16\\)"),
    ],
)
def test_bad_indices_are_named(tiny_model, indices, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.indices_to_code(indices)


def test_bad_decoder_inputs(tiny_model):
    with pytest.raises(ValueError, match="code must have shape"):
        tiny_model(torch.randn(1, 3, 32, 32), 0.5, torch.zeros(1, 8, 11))
    with pytest.raises(ValueError, match="timestep must be"):
        tiny_model(torch.randn(2, 3, 32, 32), torch.zeros(3), torch.zeros(2, 8, 12))


def test_presets_and_bad_configs():
    for name, bits, bpp in [("flowmo-lo", 9, 0.0703), ("flowmo-hi", 14, 0.2188)]:
        with torch.device("meta"):
            model = FlowMoModel(**get_preset_config(name))
        assert model.config.bits_per_subtoken == bits
        assert model.bits_per_pixel == pytest.approx(bpp, abs=1e-4)
        assert model.num_indices == 256 * model.config.context_dim // bits
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset_config("flowmo-xl")
    with pytest.raises(ValueError, match="not a multiple of bits_per_subtoken"):
        FlowMoModel(**dict(get_preset_config("flowmo-tiny"), context_dim=10))
    with pytest.raises(ValueError, match="axes_dim"):
        FlowMoModel(**dict(get_preset_config("flowmo-tiny"), decoder_axes_dim=[8, 12, 10]))
