"""diffusers' pipeline conventions on both pipelines, as its PipelineTesterMixin checks them: the `guidance_scale`,
`num_timesteps` and `interrupt` properties, a callback that changes `pipe._guidance_scale` (from the next step on) or
sets `pipe._interrupt`, `output_type="latent"`, and `_repeated_blocks` naming real module classes."""

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler

from flowmo_diffusers import FlowMoPipeline, FlowMoScheduler

from testing_utils import MASKGIT_TINY_SIZES, tiny_flowmo_model, tiny_maskgit_pipeline, tiny_maskgit_transformer

N, V, C, MASK, NULL = MASKGIT_TINY_SIZES


def token_ids(batch=2, seed=0):
    return torch.randint(0, 16, (batch, 24), generator=torch.Generator().manual_seed(seed))


def noise(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def switch_guidance_off_after(step, value=1.0):
    def callback(pipe, step_index, timestep, callback_kwargs):
        if step_index == step:
            pipe._guidance_scale = value
        return callback_kwargs

    return callback


def interrupt_after(step, seen):
    def callback(pipe, step_index, timestep, callback_kwargs):
        seen.append(callback_kwargs["latents"].clone())
        if step_index == step:
            pipe._interrupt = True
        return callback_kwargs

    return callback


@torch.no_grad()
def reference_decode(model, ids, latents, steps, guidance_at):
    """The original's loop from token ids, written out: Euler on t = (i/N)^4, a separate null-code pass inside the
    guidance interval, guidance `guidance_at(step_index)` for each step."""
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(steps)
    code = model.indices_to_code(ids)
    latents = latents.clone()
    for index in range(steps):
        t, t_next = scheduler.sigmas[index], scheduler.sigmas[index + 1]
        times = t.expand(len(ids))
        velocity = model(latents, times, code).sample
        if scheduler.is_guidance_step(t) and guidance_at(index) != 1.0:
            null = model(latents, times, code, code_mask=torch.zeros(len(ids))).sample
            velocity = null + guidance_at(index) * (velocity - null)
        latents = latents - (t - t_next) * velocity
    return latents.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# FlowMoPipeline
# ----------------------------------------------------------------------------------------------------------------------


def test_properties_follow_the_call_and_a_guidance_callback(tiny_pipeline):
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        seen.append((pipe.num_timesteps, pipe.guidance_scale, pipe.interrupt))
        return callback_kwargs

    tiny_pipeline(indices=token_ids(), num_inference_steps=3, guidance_scale=2.0, callback_on_step_end=record)
    assert seen == [(3, 2.0, False)] * 3  # known to every callback, from the first step
    assert (tiny_pipeline.num_timesteps, tiny_pipeline.guidance_scale, tiny_pipeline.interrupt) == (3, 2.0, False)
    tiny_pipeline(indices=token_ids(), num_inference_steps=2)
    assert tiny_pipeline.guidance_scale == 1.5  # the decoder's own default

    # diffusers' test_callback_cfg: +1 per step ends at the start value + num_timesteps.
    def increase(pipe, step_index, timestep, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    tiny_pipeline(indices=token_ids(), num_inference_steps=4, guidance_scale=2.0, callback_on_step_end=increase)
    assert tiny_pipeline.guidance_scale == 2.0 + tiny_pipeline.num_timesteps == 6.0

    # Heun takes two model evaluations per step but the last: num_timesteps counts the solver's timesteps.
    tiny_pipeline.scheduler = FlowMatchHeunDiscreteScheduler()
    tiny_pipeline(indices=token_ids(), num_inference_steps=3)
    assert tiny_pipeline.num_timesteps == 5


def test_switching_guidance_off_at_step_k_equals_unguided_steps_from_k_plus_1(tiny_pipeline):
    # 25 steps of the paper's grid: steps 4..9 lie in the guidance interval; off after step 6 leaves 4, 5, 6 guided.
    ids, latents, k = token_ids(), noise(), 6
    kwargs = dict(indices=ids, latents=latents, num_inference_steps=25, guidance_scale=1.5, output_type="latent")
    switched = tiny_pipeline(callback_on_step_end=switch_guidance_off_after(k), **kwargs)
    assert tiny_pipeline.guidance_scale == 1.0
    assert switched.num_decoder_passes == 25 + 3

    model = tiny_pipeline.autoencoder
    schedule = lambda index: 1.5 if index <= k else 1.0  # noqa: E731
    reference = reference_decode(model, ids, latents, 25, schedule)
    torch.testing.assert_close(switched.images, reference, rtol=0, atol=1e-5)
    # The model's per-step guidance is the same code path as the pipeline's: bit-identical.
    direct = model.decode(ids, latents=latents, num_inference_steps=25, guidance_scale=schedule)
    assert torch.equal(switched.images, direct.sample) and direct.num_decoder_passes == 28
    # ... and it is neither the guided nor the unguided run.
    guided = tiny_pipeline(**kwargs).images
    unguided = tiny_pipeline(**{**kwargs, "guidance_scale": 1.0}).images
    assert not torch.allclose(switched.images, guided, atol=1e-4)
    assert not torch.allclose(switched.images, unguided, atol=1e-4)
    # Switching off after the last guided step changes nothing.
    late = tiny_pipeline(callback_on_step_end=switch_guidance_off_after(9), **kwargs)
    assert torch.equal(late.images, guided) and late.num_decoder_passes == 31


def test_a_callback_turning_guidance_on_late_and_a_bad_value(tiny_pipeline):
    kwargs = dict(indices=token_ids(), latents=noise(), num_inference_steps=25, output_type="latent")
    on = tiny_pipeline(guidance_scale=1.0, callback_on_step_end=switch_guidance_off_after(7, value=3.0), **kwargs)
    reference = reference_decode(tiny_pipeline.autoencoder, kwargs["indices"], kwargs["latents"], 25,
                                 lambda index: 1.0 if index <= 7 else 3.0)
    torch.testing.assert_close(on.images, reference, rtol=0, atol=1e-5)
    assert on.num_decoder_passes == 25 + 2  # steps 8 and 9
    with pytest.raises(ValueError, match="guidance_scale must lie in"):
        tiny_pipeline(guidance_scale=1.5, callback_on_step_end=switch_guidance_off_after(0, value=1e9), **kwargs)
    with pytest.raises(TypeError, match="guidance_scale must be a real number"):
        tiny_pipeline(guidance_scale=1.5, callback_on_step_end=switch_guidance_off_after(0, value="off"), **kwargs)


def test_interrupt_stops_sampling_after_that_step(tiny_pipeline):
    seen, k = [], 2
    out = tiny_pipeline(indices=token_ids(), latents=noise(), num_inference_steps=5, output_type="latent",
                        callback_on_step_end=interrupt_after(k, seen))
    assert len(seen) == k + 1 and tiny_pipeline.interrupt
    # diffusers' test_pipeline_interrupt: the output is the state after step k (decode's sample: clamped).
    assert torch.equal(out.images, seen[k].clamp(-1, 1))
    scheduler = FlowMoScheduler()
    scheduler.set_timesteps(5)
    guided = sum(bool(scheduler.is_guidance_step(t)) for t in scheduler.sigmas[: k + 1])
    assert out.num_decoder_passes == k + 1 + guided
    # The next call starts afresh.
    full = tiny_pipeline(indices=token_ids(), latents=noise(), num_inference_steps=5, output_type="latent")
    assert not tiny_pipeline.interrupt and full.num_decoder_passes == 6
    assert not torch.equal(full.images, out.images)


def test_latent_output_is_the_sample_before_postprocessing(tiny_pipeline):
    kwargs = dict(indices=token_ids(), num_inference_steps=3)
    latent = tiny_pipeline(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    pt = tiny_pipeline(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    assert latent.shape == (2, 3, 32, 32) and latent.dtype == torch.float32
    assert latent.min() >= -1 and latent.max() <= 1 and latent.min() < 0  # the model's range, not [0, 1]
    assert torch.equal(latent / 2 + 0.5, pt)
    (as_tuple,) = tiny_pipeline(generator=torch.Generator().manual_seed(0), output_type="latent", return_dict=False,
                                **kwargs)
    assert torch.equal(as_tuple, latent)
    reconstruction = tiny_pipeline(images=torch.rand(1, 3, 32, 32), num_inference_steps=2, output_type="latent")
    assert reconstruction.images.shape == (1, 3, 32, 32)

    # diffusers' test_callback_inputs: latents zeroed at the last step are the latent output.
    def zero_last(pipe, step_index, timestep, callback_kwargs):
        if step_index == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    zeroed = tiny_pipeline(output_type="latent", callback_on_step_end=zero_last, **kwargs).images
    assert zeroed.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------------------
# FlowMoMaskGiTPipeline
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_unmasking(pipeline, labels, steps, guidance_at, generator):
    """The unmasking loop written out, guidance `guidance_at(step_index)` for each step."""
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    labels = torch.tensor(labels)
    ids = torch.full((len(labels), N), MASK, dtype=torch.long)
    scheduler.set_timesteps(steps)
    for index in range(steps):
        weight = scheduler.guidance_scale_at(index, guidance_at(index))
        if weight != 1.0:
            both = transformer(torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, NULL)])).logits
            conditional, unconditional = both.float().chunk(2)
            logits = unconditional + weight * (conditional - unconditional)
        else:
            logits = transformer(ids, labels).logits.float()
        ids = scheduler.step(logits, index, ids, generator=generator).prev_sample
    return ids


def test_maskgit_properties_and_guidance_switched_off_at_step_k(tiny_model):
    # BERT's 0.02 initialization leaves the logits almost class-blind, so guidance would change no draw: a larger one.
    maskgit_pipeline = tiny_maskgit_pipeline(tiny_maskgit_transformer(initializer_range=1.0), tiny_model)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kwargs = dict(class_labels=[1, 2], num_inference_steps=6, guidance_scale=3.0, output_type="latent")
    k = 2
    switched = maskgit_pipeline(generator=seed(), callback_on_step_end=switch_guidance_off_after(k), **kwargs)
    assert (maskgit_pipeline.guidance_scale, maskgit_pipeline.num_timesteps, maskgit_pipeline.interrupt) == (1.0, 6, False)
    reference = reference_unmasking(maskgit_pipeline, [1, 2], 6, lambda index: 3.0 if index <= k else 1.0, seed())
    assert torch.equal(switched.images, reference)
    guided = maskgit_pipeline(generator=seed(), **kwargs).images
    assert torch.equal(guided, reference_unmasking(maskgit_pipeline, [1, 2], 6, lambda index: 3.0, seed()))
    unguided = maskgit_pipeline(generator=seed(), **{**kwargs, "guidance_scale": 1.0}).images
    assert not torch.equal(switched.images, guided) and not torch.equal(switched.images, unguided)

    def increase(pipe, step_index, timestep, callback_kwargs):
        pipe._guidance_scale += 1.0
        return callback_kwargs

    maskgit_pipeline(generator=seed(), callback_on_step_end=increase, **kwargs)
    assert maskgit_pipeline.guidance_scale == 3.0 + maskgit_pipeline.num_timesteps


def test_maskgit_interrupt_returns_the_ids_of_that_step_and_decodes_them_filled(maskgit_pipeline):
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kwargs = dict(class_labels=[1, 2], num_inference_steps=6, decoder_num_inference_steps=2)
    seen, k = [], 1
    latent = maskgit_pipeline(generator=seed(), output_type="latent", callback_on_step_end=interrupt_after(k, seen),
                              **kwargs)
    assert len(seen) == k + 1 and maskgit_pipeline.interrupt
    assert torch.equal(latent.images, seen[k]) and (latent.images == MASK).any()  # still partly masked

    seen = []
    decoded = maskgit_pipeline(generator=seed(), output_type="pt", callback_on_step_end=interrupt_after(k, seen),
                               **kwargs)
    filled = decoded.indices
    assert filled.max() < V  # every mask filled by the step's prediction, so it decodes
    known = seen[k] != MASK
    assert torch.equal(filled[known], seen[k][known])
    decoder = FlowMoPipeline(autoencoder=maskgit_pipeline.autoencoder, scheduler=FlowMoScheduler())
    decoder.set_progress_bar_config(disable=True)
    generator = seed()
    maskgit_pipeline(generator=generator, output_type="latent", callback_on_step_end=interrupt_after(k, []), **kwargs)
    expected = decoder(indices=filled, num_inference_steps=2, generator=generator, output_type="pt").images
    torch.testing.assert_close(decoded.images, expected, rtol=0, atol=1e-6)


def test_maskgit_latent_output_is_the_token_ids(maskgit_pipeline):
    out = maskgit_pipeline([3, 4], num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, N) and out.images.dtype == torch.int64 and torch.equal(out.images, out.indices)

    def zero_last(pipe, step_index, timestep, callback_kwargs):
        if step_index == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    zeroed = maskgit_pipeline([3, 4], num_inference_steps=3, output_type="latent", callback_on_step_end=zero_last)
    assert zeroed.images.abs().sum() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Regional compilation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, expected_count", [
    (lambda: tiny_flowmo_model(), lambda model: model.config.encoder_depth + model.config.decoder_depth),
    (lambda: tiny_maskgit_transformer(), lambda model: model.config.num_layers),
])
def test_repeated_blocks_name_the_module_classes_that_repeat(build, expected_count):
    model = build()
    assert model._repeated_blocks
    for name in model._repeated_blocks:
        blocks = [module for module in model.modules() if type(module).__name__ == name]
        assert len(blocks) == expected_count(model), name
        assert len({type(block) for block in blocks}) == 1
