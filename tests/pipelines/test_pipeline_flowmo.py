import numpy as np
import PIL.Image
import pytest
import torch

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler


def straightforward_reconstruction(model, images, noise, steps=25, guidance=1.5):
    """The original's loop: one decoder pass per step plus a separate null-code pass inside the guidance interval."""
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(steps)
    code = model.encode(images).code
    latents = noise.clone()
    for index in range(steps):
        t, t_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        times = t.expand(len(images))
        velocity = model(latents, times, code).sample
        if scheduler.is_guidance_step(t):
            null = model(latents, times, code, code_mask=torch.zeros(len(images))).sample
            velocity = null + guidance * (velocity - null)
        latents = latents - (t - t_next) * velocity
    return latents.clamp(-1, 1)


@torch.no_grad()
def test_batched_guidance_equals_straightforward_path(tiny_pipeline):
    images = torch.rand(2, 3, 32, 32)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fast = tiny_pipeline(images=images, latents=noise, output_type="pt").images
    reference = straightforward_reconstruction(tiny_pipeline.autoencoder, images * 2 - 1, noise)
    torch.testing.assert_close(fast * 2 - 1, reference, rtol=0, atol=1e-5)


def test_encode_then_decode_indices_equals_reconstruction(tiny_pipeline):
    images = torch.rand(2, 3, 32, 32)
    indices = tiny_pipeline.encode(images)
    assert indices.shape == (2, 24) and indices.dtype == torch.int64
    generator = torch.Generator().manual_seed(0)
    from_ids = tiny_pipeline(indices=indices, generator=generator, output_type="np").images
    generator = torch.Generator().manual_seed(0)
    from_images = tiny_pipeline(images=images, generator=generator, output_type="np").images
    assert from_ids.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(from_ids, from_images, atol=1e-5)


def test_generator_makes_sampling_reproducible(tiny_pipeline):
    ids = torch.randint(0, 16, (2, 24))
    first = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(7), output_type="pt").images
    second = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(7), output_type="pt").images
    other = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(8), output_type="pt").images
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert 0 <= first.min() and first.max() <= 1


def test_input_formats_agree(tiny_pipeline):
    array = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pil = [PIL.Image.fromarray(image) for image in array]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255
    expected = tiny_pipeline.encode(tensor)
    assert torch.equal(tiny_pipeline.encode(pil), expected)
    assert torch.equal(tiny_pipeline.encode(array), expected)
    assert torch.equal(tiny_pipeline.encode(array.astype(np.float32) / 255), expected)
    assert torch.equal(tiny_pipeline.encode(tensor[0]), expected[:1])
    outputs = tiny_pipeline(images=pil[:1], num_inference_steps=2, output_type="pil").images
    assert isinstance(outputs[0], PIL.Image.Image) and outputs[0].size == (32, 32)


def test_decode_size_options(tiny_pipeline):
    ids = torch.randint(0, 16, (1, 24))
    images = tiny_pipeline(indices=ids, height=16, width=24, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 16, 24)


def test_save_and_load_pipeline(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = FlowMoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    ids = torch.randint(0, 16, (1, 24))
    noise = torch.randn(1, 3, 32, 32)
    expected = tiny_pipeline(indices=ids, latents=noise, num_inference_steps=3, output_type="pt").images
    reloaded = loaded(indices=ids, latents=noise, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"images": torch.rand(1, 3, 32, 32), "indices": torch.zeros(1, 24, dtype=torch.long)}, "exactly one of"),
        ({"images": torch.rand(1, 4, 32, 32)}, "\\(B, 3, H, W\\)"),
        ({"images": torch.rand(1, 3, 30, 30)}, "multiples of patch_size"),
        ({"images": torch.full((1, 3, 32, 32), float("inf"))}, "NaN or infinite"),
        ({"images": torch.full((1, 3, 32, 32), 3.0)}, "values in \\[0, 1\\]"),
        ({"images": np.zeros((1, 3, 32, 32), dtype=np.float32)}, "channel-last|\\(B, H, W, 3\\)"),
        ({"images": "cat.png"}, "PIL images, numpy arrays or torch tensors"),
        ({"images": []}, "empty"),
        ({"indices": torch.zeros(1, 24)}, "integer tensor"),
        ({"indices": torch.zeros(1, 25, dtype=torch.long)}, "shape \\(batch, 24\\)"),
        ({"indices": torch.full((1, 24), 99)}, "\\[0, 16\\)"),
        ({"indices": torch.zeros(1, 24, dtype=torch.long), "latents": torch.zeros(1, 3, 16, 16)}, "latents must be"),
        ({"indices": torch.zeros(1, 24, dtype=torch.long), "height": 30}, "multiples of patch_size"),
        ({"indices": torch.zeros(1, 24, dtype=torch.long), "output_type": "latents"}, "output_type"),
        ({"indices": torch.zeros(1, 24, dtype=torch.long), "num_inference_steps": 0}, "num_inference_steps"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(**kwargs)


def test_from_pretrained_by_hub_repo_id_and_push_to_hub(local_hub, tiny_pipeline, tmp_path):
    """The real FlowMoPipeline against the local Hub stand-in (tests/hub_stub.py): push, then load by repo id."""
    tiny_pipeline.save_pretrained(tmp_path / "saved")
    local_hub.add_repo("user/flowmo-tiny", tmp_path / "saved")
    loaded = FlowMoPipeline.from_pretrained("user/flowmo-tiny")
    assert local_hub.downloaded_files("user/flowmo-tiny") == {
        "model_index.json",
        "autoencoder/config.json",
        "autoencoder/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    }
    assert not local_hub.unhandled
    for name, tensor in tiny_pipeline.autoencoder.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[name], tensor), name

    tiny_pipeline.push_to_hub("user/flowmo-pushed", token="hf_test_token")
    pushed = {path for commit in local_hub.commits if commit.repo_id == "user/flowmo-pushed" for path in commit.files}
    assert {"model_index.json", "autoencoder/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= pushed
    assert not any(path.endswith((".bin", ".pth")) for path in pushed)
    again = FlowMoPipeline.from_pretrained("user/flowmo-pushed")
    ids = torch.randint(0, 16, (1, 24))
    noise = torch.randn(1, 3, 32, 32)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(
        again(indices=ids, latents=noise, num_inference_steps=2, output_type="pt").images,
        tiny_pipeline(indices=ids, latents=noise, num_inference_steps=2, output_type="pt").images,
        rtol=0,
        atol=1e-6,
    )


# ------------------------------------------------------------------ several decodings per input, callbacks


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


@torch.no_grad()
def test_num_images_per_prompt_orders_like_diffusers_with_noise_per_sample(tiny_pipeline):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = tiny_pipeline(images=images, num_images_per_prompt=3, generator=seeds(0, 1, 2, 3, 4, 5),
                        num_inference_steps=4, output_type="pt").images
    assert out.shape == (6, 3, 32, 32)
    # all samples of image 0, then image 1's; sample k is seeded by generator k alone
    for k in range(6):
        alone = tiny_pipeline(images=images[k // 3 : k // 3 + 1], generator=seeds(k), num_inference_steps=4,
                              output_type="pt").images
        torch.testing.assert_close(out[k : k + 1], alone, rtol=0, atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[3] - out[4]).abs().max() > 1e-3  # each its own noise

    # one generator: the batch's noise is drawn at once, as decoding the repeated ids
    ids = tiny_pipeline.encode(images)
    single = tiny_pipeline(indices=ids, num_images_per_prompt=2, generator=torch.Generator().manual_seed(9),
                           num_inference_steps=4, output_type="pt").images
    repeated = tiny_pipeline(indices=ids.repeat_interleave(2, dim=0), generator=torch.Generator().manual_seed(9),
                             num_inference_steps=4, output_type="pt").images
    torch.testing.assert_close(single, repeated, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer"),
        ({"num_images_per_prompt": 2, "generator": [torch.Generator()] * 2}, "inputs x num_images_per_prompt"),
        ({"num_images_per_prompt": 2, "latents": torch.randn(2, 3, 32, 32)}, "latents must be a tensor of shape \\(4,"),
        ({"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]},
         "callback_on_step_end_tensor_inputs has to be in \\['latents'\\]"),
        ({"callback_on_step_end": "not callable"}, "callback_on_step_end must be callable"),
    ],
)
def test_bad_sampling_arguments_are_named(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline(indices=torch.zeros(2, 24, dtype=torch.long), num_inference_steps=2, **kwargs)


@torch.no_grad()
def test_per_pixel_variance_of_several_reconstructions(tiny_pipeline):
    from flowmo_diffusers.pipelines import per_pixel_variance

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = tiny_pipeline(images=images, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0),
                        num_inference_steps=4, output_type="pt").images
    variance = per_pixel_variance(out, 4)
    assert variance.shape == (2, 32, 32) and variance.dtype == torch.float32
    expected = out.reshape(2, 4, 3, 32, 32).var(dim=1, unbiased=False).mean(dim=1)
    torch.testing.assert_close(variance, expected)
    assert variance.min() >= 0 and variance.mean() > 0
    # numpy and PIL outputs give the same picture (PIL up to its uint8 rounding)
    as_np = tiny_pipeline(images=images, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0),
                          num_inference_steps=4, output_type="np").images
    np.testing.assert_allclose(per_pixel_variance(as_np, 4), variance.numpy(), atol=1e-6)
    as_pil = tiny_pipeline(images=images, num_images_per_prompt=4, generator=torch.Generator().manual_seed(0),
                           num_inference_steps=4).images
    np.testing.assert_allclose(per_pixel_variance(as_pil, 4), variance.numpy(), atol=5e-3)
    assert np.all(per_pixel_variance(np.repeat(as_np[:1], 3, axis=0), 3) == 0)
    with pytest.raises(ValueError, match="whole number of groups"):
        per_pixel_variance(out, 3)
    with pytest.raises(ValueError, match=">= 2"):
        per_pixel_variance(out, 1)


@torch.no_grad()
def test_callback_reads_and_replaces_the_latents_each_step(tiny_pipeline):
    ids = torch.randint(0, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        assert pipe is tiny_pipeline and set(callback_kwargs) == {"latents"}
        seen.append((step_index, float(timestep), callback_kwargs["latents"].clone()))
        return callback_kwargs

    plain = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(0), output_type="pt").images
    recorded = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(0), output_type="pt",
                             callback_on_step_end=record).images
    assert torch.equal(recorded, plain)  # returning the latents unchanged changes nothing
    assert [step for step, _, _ in seen] == list(range(25))
    assert [t for _, t, _ in seen] == tiny_pipeline.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2].clamp(-1, 1) / 2 + 0.5, plain)  # the last step's latents are the images
    trajectory = {step: latents for step, _, latents in seen}

    def swap_in(pipe, step_index, timestep, callback_kwargs):
        # from step 10 on, continue run A's trajectory inside run B (other noise): B must end where A ends
        return {"latents": trajectory[10]} if step_index == 10 else callback_kwargs

    other = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(1), output_type="pt").images
    swapped = tiny_pipeline(indices=ids, generator=torch.Generator().manual_seed(1), output_type="pt",
                            callback_on_step_end=swap_in).images
    assert (other - plain).abs().max() > 1e-2
    torch.testing.assert_close(swapped, plain, rtol=0, atol=1e-6)

    with pytest.raises(TypeError, match="must return a dict"):
        tiny_pipeline(indices=ids, num_inference_steps=2, callback_on_step_end=lambda *args: None)
    with pytest.raises(ValueError, match="must keep the shape"):
        tiny_pipeline(indices=ids, num_inference_steps=2, callback_on_step_end=lambda *a: {"latents": torch.zeros(1)})


def test_diffusers_pipeline_callback_objects_work(tiny_pipeline):
    from diffusers.callbacks import PipelineCallback

    class ZeroAtTheEnd(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == pipeline.scheduler.num_inference_steps - 1:
                callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
            return callback_kwargs

    out = tiny_pipeline(indices=torch.zeros(1, 24, dtype=torch.long), num_inference_steps=3, output_type="pt",
                        callback_on_step_end=ZeroAtTheEnd()).images
    assert torch.equal(out, torch.full_like(out, 0.5))
