"""float16 and bfloat16 weights (`from_pretrained(..., torch_dtype=...)`): reconstruction, decoding from ids and the
quantizer against float32 on the same inputs and noise, a residual stream beyond float16's range, save/load."""

import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers import FlowMoPipeline
from flowmo_diffusers.models.quantizer import LookupFreeQuantizer

from testing_utils import save_tiny_flowmo_pipeline, tiny_flowmo_model, tiny_flowmo_pipeline

FLOAT16_MAX = torch.finfo(torch.float16).max  # 65504
# Agreement with float32 on flowmo-tiny (perturbed weights, 5 steps), as bounds. Measured: float16 76 dB, ids 100 %;
# bfloat16 58 dB, 47 of 48 ids (bfloat16 keeps 8 bits of mantissa, so a code channel near zero can flip sign).
BOUNDS = {torch.float16: dict(psnr=60.0, ids=0.95), torch.bfloat16: dict(psnr=45.0, ids=0.90)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def inputs(resolution=32, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, resolution, resolution, generator=generator)  # [0, 1], the pipeline's range
    noise = torch.randn(batch, 3, resolution, resolution, generator=generator)
    return images, noise


def loaded(folder, dtype) -> FlowMoPipeline:
    pipe = FlowMoPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_float32(tmp_path_factory):
    return save_tiny_flowmo_pipeline(tmp_path_factory.mktemp("float32_pipeline"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_agrees_with_float32(saved_float32, dtype):
    images, noise = inputs()
    reference, half = loaded(saved_float32, torch.float32), loaded(saved_float32, dtype)
    assert half.autoencoder.dtype == dtype and all(p.dtype == dtype for p in half.autoencoder.parameters())
    call = dict(latents=noise, num_inference_steps=5, output_type="pt")

    ids, half_ids = reference.encode(images), half.encode(images)
    assert half_ids.dtype == torch.int64 and half_ids.shape == ids.shape
    assert (half_ids == ids).float().mean().item() >= BOUNDS[dtype]["ids"]

    expected = reference(images=images, **call).images
    reconstruction = half(images=images, **call).images
    # Decoding runs the sampler state in float32 whatever the weights: outputs are float32, finite, in [0, 1].
    assert reconstruction.dtype == torch.float32 and torch.isfinite(reconstruction).all()
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1
    assert psnr(reconstruction, expected) >= BOUNDS[dtype]["psnr"]

    # Decoding the same (float32) ids isolates the decoder from sign flips in the encoder.
    decoded, expected_decoded = half(indices=ids, **call).images, reference(indices=ids, **call).images
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    assert psnr(decoded, expected_decoded) >= BOUNDS[dtype]["psnr"]
    # The bound is not met by chance: another noise gives a far worse match.
    other = reference(indices=ids, latents=torch.randn_like(noise), num_inference_steps=5, output_type="pt").images
    assert psnr(other, expected_decoded) < BOUNDS[dtype]["psnr"] - 10


def massive_activation_model():
    """flowmo-tiny, 4 blocks deep, whose residual streams grow by 3e4 per block on channel 0 (every MLP's output
    bias; gates opened): past float16's 65504 after three blocks, as "massive activations" of trained transformers
    do. Every read of a stream is a LayerNorm, so in float32 this is a working model."""
    model = tiny_flowmo_model(encoder_depth=4, decoder_depth=4)
    with torch.no_grad():
        for transformer in (model.encoder, model.decoder):
            for block in transformer.blocks:
                for stream in (block.code_stream, block.image_stream):
                    if stream.attention_only:
                        continue
                    stream.ff.net[2].bias[0] = 30_000.0
                    if stream.modulation is not None:  # gate2 of channel 0 near 1
                        stream.modulation.bias[5 * stream.modulation.out_features // 6] += 1.0
    return model


def largest_stream_value(model, run) -> float:
    """The largest |value| any block writes into a residual stream while `run()` runs."""
    largest = [0.0]

    def hook(module, args, outputs):
        for states in outputs:
            if states is not None:
                largest[0] = max(largest[0], states.detach().float().abs().max().item())

    handles = [block.register_forward_hook(hook) for t in (model.encoder, model.decoder) for block in t.blocks]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return largest[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_stream_beyond_float16_range(tmp_path, dtype):
    images, noise = inputs()
    reference = tiny_flowmo_pipeline(massive_activation_model())
    call = dict(latents=noise, num_inference_steps=5, output_type="pt")
    expected_ids = reference.encode(images)
    # The float32 model really holds values float16 cannot (so the test would fail with a float16 stream).
    stream_max = largest_stream_value(reference.autoencoder, lambda: reference(indices=expected_ids, **call))
    assert stream_max > 1.5 * FLOAT16_MAX
    expected = reference(images=images, **call).images

    reference.save_pretrained(tmp_path)
    half = loaded(tmp_path, dtype)
    encoded = half.autoencoder.encode(half.preprocess(images).to(dtype))
    assert torch.isfinite(encoded.unquantized_code).all()
    assert (encoded.indices == expected_ids).float().mean().item() >= BOUNDS[dtype]["ids"]
    reconstruction = half(images=images, **call).images
    decoded = half(indices=expected_ids, **call).images
    for output in (reconstruction, decoded):
        assert output.dtype == torch.float32 and torch.isfinite(output).all()
    assert psnr(decoded, reference(indices=expected_ids, **call).images) >= BOUNDS[dtype]["psnr"]
    assert psnr(reconstruction, expected) >= BOUNDS[dtype]["psnr"] - 10  # after any id flips


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 14])
def test_quantizer_computes_in_float32(dtype, bits):
    quantizer = LookupFreeQuantizer(bits)
    code = torch.randn(3, 8, 2 * bits, generator=torch.Generator().manual_seed(bits)).to(dtype)
    half = quantizer(code, return_losses=True)
    full = quantizer(code.float(), return_losses=True)  # the same values, in float32
    assert half.quantized.dtype == dtype and torch.equal(half.quantized.float(), full.quantized)
    assert torch.equal(half.indices, full.indices)
    for name in ("loss", "entropy_loss", "per_sample_entropy", "codebook_entropy", "commitment"):
        value = getattr(half, name)
        assert value.dtype == torch.float32 and torch.equal(value, getattr(full, name)), name
    # Under autocast (mixed-precision training) the entropy terms stay float32 too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = quantizer(code.float(), return_losses=True)
    torch.testing.assert_close(autocast.entropy_loss, full.entropy_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_and_load_in_half_precision(tmp_path, saved_float32, dtype):
    images, noise = inputs()
    half = loaded(saved_float32, dtype)
    call = dict(latents=noise, num_inference_steps=3, output_type="pt")
    expected = half(images=images, **call).images
    half.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "autoencoder" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {dtype}
    again = loaded(tmp_path, dtype)
    assert again.autoencoder.dtype == dtype
    assert torch.equal(again(images=images, **call).images, expected)
    # A half-precision folder loads back as float32 (upcast weights, same values).
    upcast = loaded(tmp_path, torch.float32)
    assert upcast.autoencoder.dtype == torch.float32
    for name, tensor in upcast.autoencoder.state_dict().items():
        assert torch.equal(tensor, weights[name].float()), name
