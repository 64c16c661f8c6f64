"""The class-conditional MaskGiT pipeline on FlowMo tokens: outputs, reference loop, saving, Hub, callbacks."""

import time

import numpy as np
import PIL.Image
import pytest
import torch

from flowmo_diffusers import (
    FlowMoMaskGiTPipeline,
    FlowMoMaskGiTTransformer,
    FlowMoPipeline,
    FlowMoScheduler,
    MaskGiTScheduler,
)
from flowmo_diffusers.training.maskgit import maskgit_training_step

from testing_utils import MASKGIT_TINY_SIZES, tiny_maskgit_transformer

N, V, C, MASK, NULL = MASKGIT_TINY_SIZES


def test_pipeline_output_types(maskgit_pipeline):
    kwargs = dict(num_inference_steps=4, decoder_num_inference_steps=2)
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    latent = maskgit_pipeline([1, 2], generator=seed(), output_type="latent", **kwargs)
    assert latent.images.shape == (2, N) and latent.images.dtype == torch.int64
    assert 0 <= latent.images.min() and latent.images.max() < V and torch.equal(latent.images, latent.indices)
    pt = maskgit_pipeline(torch.tensor([1, 2]), generator=seed(), output_type="pt", **kwargs)
    assert pt.images.shape == (2, 3, 32, 32) and 0 <= pt.images.min() and pt.images.max() <= 1
    assert torch.equal(pt.indices, latent.indices)  # ids are drawn first, then the decoder's noise
    np_out = maskgit_pipeline(np.array([1, 2]), generator=seed(), output_type="np", **kwargs)
    assert np_out.images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np_out.images, pt.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = maskgit_pipeline(5, generator=seed(), output_type="pil", **kwargs).images
    assert len(pil) == 1 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    images, indices = maskgit_pipeline([3], output_type="np", return_dict=False, **kwargs)
    assert images.shape == (1, 32, 32, 3) and indices.shape == (1, N)


@torch.no_grad()
def test_pipeline_equals_reference_loop_and_flowmo_decoding(maskgit_pipeline):
    """Batched conditional + null passes equal separate passes; decoding is FlowMoPipeline's, noise continuing the
    same generator."""
    labels = torch.tensor([0, 7])
    out = maskgit_pipeline(labels, num_inference_steps=5, guidance_scale=2.5, decoder_num_inference_steps=3,
                           generator=torch.Generator().manual_seed(4), output_type="pt")
    transformer, scheduler = maskgit_pipeline.transformer, MaskGiTScheduler(mask_token_id=MASK)
    scheduler.set_timesteps(5)
    generator = torch.Generator().manual_seed(4)
    ids = torch.full((2, N), MASK)
    for step_index in range(5):
        conditional = transformer(ids, labels).logits
        unconditional = transformer(ids, torch.full_like(labels, NULL)).logits
        logits = unconditional + 2.5 * (conditional - unconditional)
        ids = scheduler.step(logits, step_index, ids, generator=generator).prev_sample
    assert torch.equal(ids, out.indices)
    decoder = FlowMoPipeline(autoencoder=maskgit_pipeline.autoencoder, scheduler=FlowMoScheduler())
    decoder.set_progress_bar_config(disable=True)
    expected = decoder(indices=ids, num_inference_steps=3, guidance_scale=1.5, generator=generator, output_type="pt")
    torch.testing.assert_close(out.images, expected.images, atol=1e-6, rtol=0)


def test_pipeline_errors(maskgit_pipeline, tiny_transformer):
    for labels, message in ((10, r"\[0, 10\)"), ([-1], r"\[0, 10\)"), ([1.5], "integers"), ([], "empty"),
                            (True, "class ids"), (torch.zeros(1, 2, dtype=torch.long), "1-D")):
        with pytest.raises(ValueError, match=message):
            maskgit_pipeline(labels, output_type="latent")
    with pytest.raises(ValueError, match="output_type"):
        maskgit_pipeline(0, output_type="latents")
    with pytest.raises(ValueError, match="num_inference_steps"):
        maskgit_pipeline(0, num_inference_steps=0)
    with pytest.raises(ValueError, match="generators"):
        maskgit_pipeline([0, 1], generator=[torch.Generator()], output_type="latent")
    maskgit_pipeline.scheduler = MaskGiTScheduler(mask_token_id=V + 1)
    with pytest.raises(ValueError, match="mask id"):
        maskgit_pipeline(0, output_type="latent")
    maskgit_pipeline.transformer = FlowMoMaskGiTTransformer(**dict(tiny_transformer.config, num_indices=N + 1))
    with pytest.raises(ValueError, match="autoencoder produces 24 ids"):
        maskgit_pipeline(0, output_type="latent")


def test_save_load_round_trip(maskgit_pipeline, tmp_path):
    maskgit_pipeline.scheduler = MaskGiTScheduler(mask_token_id=MASK, masking_schedule="arccos",
                                                  guidance_schedule="linear")
    maskgit_pipeline.save_pretrained(tmp_path)
    loaded = FlowMoMaskGiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, FlowMoMaskGiTTransformer) and isinstance(loaded.scheduler, MaskGiTScheduler)
    assert isinstance(loaded.decoder_scheduler, FlowMoScheduler)
    assert loaded.scheduler.config.masking_schedule == "arccos"
    assert loaded.scheduler.config.guidance_schedule == "linear"
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.transformer.config) == public(maskgit_pipeline.transformer.config)
    for name, tensor in maskgit_pipeline.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], tensor), name
    kwargs = dict(num_inference_steps=4, decoder_num_inference_steps=2, output_type="pt")
    before = maskgit_pipeline([1, 2], generator=torch.Generator().manual_seed(0), **kwargs)
    after = loaded([1, 2], generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(before.images, after.images, atol=1e-6, rtol=0)


def test_loads_by_hub_repo_id(maskgit_pipeline, local_hub, tmp_path):
    maskgit_pipeline.save_pretrained(tmp_path / "saved")
    local_hub.add_repo("user/tiny-maskgit", tmp_path / "saved")
    loaded = FlowMoMaskGiTPipeline.from_pretrained("user/tiny-maskgit")
    assert local_hub.unhandled == []
    assert isinstance(loaded.transformer, FlowMoMaskGiTTransformer) and isinstance(loaded.scheduler, MaskGiTScheduler)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, output_type="latent")
    assert torch.equal(loaded([4], generator=torch.Generator().manual_seed(0), **kwargs).indices,
                       maskgit_pipeline([4], generator=torch.Generator().manual_seed(0), **kwargs).indices)


# ------------------------------------------------------------------------------------------------------------------
# Memorization: the whole train -> sample path learns something.
MEMORIZATION_STEPS = 400


def test_memorizes_four_sequences_and_decodes_them_by_class(tiny_model):
    """4 random id sequences, one per class, learned with the package's training step (masked cross-entropy, label
    smoothing 0.1, 10% class dropout) and AdamW; then class-guided iterative decoding through the pipeline.

    Measured (6 training seeds, 400 steps of batch 16, ~8-11 s on 1-2 busy CPU cores), guidance 3 constant, 8 steps,
    16 samples per class: token accuracy 0.970-0.980 when sampling ids at temperature 1 (label smoothing leaves
    15 * 0.1/16 = 9% of the target mass on wrong ids, which guidance mostly but not fully sharpens away), every
    sample >= 0.79; 0.996-1.000 with greedy ids (sampling_temperature=0), every sample >= 0.958.
    """
    start = time.perf_counter()
    # One thread: these ops are tiny, and a second thread only adds contention on a busy 2-core machine (94 s vs 9 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _memorize_and_decode(tiny_model, start)
    finally:
        torch.set_num_threads(threads)


def _memorize_and_decode(tiny_model, start):
    transformer = tiny_maskgit_transformer()
    scheduler = MaskGiTScheduler(mask_token_id=MASK)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, V, (4, N), generator=generator)
    classes = torch.arange(4)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=2e-3, betas=(0.9, 0.96), weight_decay=0.01)
    batch = torch.arange(16) % 4
    transformer.train()
    for _ in range(MEMORIZATION_STEPS):
        out = maskgit_training_step(transformer, scheduler, sequences[batch], classes[batch], generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    transformer.eval()
    assert out.loss.item() < 1.0  # the floor with label smoothing 0.1 over 16 ids is ~0.5

    pipeline = FlowMoMaskGiTPipeline(transformer, scheduler, tiny_model, FlowMoScheduler())
    pipeline.set_progress_bar_config(disable=True)
    labels = torch.arange(64) % 4
    sampled = pipeline(labels, num_inference_steps=8, guidance_scale=3.0, output_type="latent",
                       generator=torch.Generator().manual_seed(1)).indices
    pipeline.scheduler = MaskGiTScheduler.from_config(scheduler.config, sampling_temperature=0.0)
    greedy = pipeline(labels, num_inference_steps=8, guidance_scale=3.0, output_type="latent",
                      generator=torch.Generator().manual_seed(1)).indices
    sampled_accuracy = (sampled == sequences[labels]).float().mean(dim=1)
    greedy_accuracy = (greedy == sequences[labels]).float().mean(dim=1)
    print(f"memorization: {MEMORIZATION_STEPS} steps, loss {out.loss.item():.3f}, token accuracy sampled "
          f"{sampled_accuracy.mean():.4f} (min {sampled_accuracy.min():.3f}), greedy {greedy_accuracy.mean():.4f} "
          f"(min {greedy_accuracy.min():.3f}), {time.perf_counter() - start:.1f} s")
    assert sampled_accuracy.mean() >= 0.93 and sampled_accuracy.min() >= 0.7
    assert greedy_accuracy.mean() >= 0.98 and greedy_accuracy.min() >= 0.9
    # Each sample is closest to its own class's sequence.
    distances = (sampled[:, None, :] != sequences[None]).sum(-1)
    assert torch.equal(distances.argmin(dim=1), labels)


@torch.no_grad()
def test_num_images_per_prompt_gives_each_image_its_own_draws(maskgit_pipeline):
    kwargs = dict(num_inference_steps=4, decoder_num_inference_steps=2)
    seeds = lambda *values: [torch.Generator().manual_seed(v) for v in values]  # noqa: E731
    out = maskgit_pipeline([1, 2], num_images_per_prompt=2, generator=seeds(0, 1, 2, 3), output_type="pt", **kwargs)
    assert out.indices.shape == (4, N) and out.images.shape == (4, 3, 32, 32)
    # label 1's two images, then label 2's; image k comes from generator k alone
    for k, label in enumerate([1, 1, 2, 2]):
        alone = maskgit_pipeline([label], generator=seeds(k), output_type="pt", **kwargs)
        assert torch.equal(out.indices[k], alone.indices[0])
        torch.testing.assert_close(out.images[k : k + 1], alone.images, rtol=0, atol=1e-6)
    assert not torch.equal(out.indices[0], out.indices[1])
    with pytest.raises(ValueError, match="class labels x num_images_per_prompt"):
        maskgit_pipeline([1, 2], num_images_per_prompt=2, generator=seeds(0, 1), **kwargs)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        maskgit_pipeline([1], num_images_per_prompt=0, **kwargs)


@torch.no_grad()
def test_callback_reads_and_replaces_the_token_ids(maskgit_pipeline):
    kwargs = dict(num_inference_steps=5, decoder_num_inference_steps=2, output_type="latent")
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        seen.append((step_index, callback_kwargs["latents"].clone()))
        return callback_kwargs

    plain = maskgit_pipeline([3, 4], generator=torch.Generator().manual_seed(0), **kwargs).indices
    recorded = maskgit_pipeline([3, 4], generator=torch.Generator().manual_seed(0), callback_on_step_end=record,
                                **kwargs).indices
    assert torch.equal(recorded, plain)
    assert [step for step, _ in seen] == list(range(5))
    masked = [int((ids == MASK).sum()) for _, ids in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] > 0
    assert torch.equal(seen[-1][1], plain)

    target = torch.arange(2 * N).reshape(2, N) % V

    def replace_at_the_end(pipe, step_index, timestep, callback_kwargs):
        return {"latents": target} if step_index == 4 else callback_kwargs

    out = maskgit_pipeline([3, 4], generator=torch.Generator().manual_seed(0), callback_on_step_end=replace_at_the_end,
                           **kwargs)
    assert torch.equal(out.indices, target)
    with pytest.raises(ValueError, match="has to be in \\['latents'\\]"):
        maskgit_pipeline([3], callback_on_step_end=record, callback_on_step_end_tensor_inputs=["ids"], **kwargs)


def test_a_distilled_decoder_decodes_the_prior_samples_in_its_own_k_passes(tiny_transformer, tiny_model):
    """With no decoder arguments, the prior's tokens are decoded with the decoder's own sampler: a 2-pass student's."""
    from flowmo_diffusers.training.distillation import make_student_config

    make_student_config(tiny_model, 2, teacher="teacher")
    pipeline = FlowMoMaskGiTPipeline(transformer=tiny_transformer, scheduler=MaskGiTScheduler(mask_token_id=MASK),
                                     autoencoder=tiny_model, decoder_scheduler=tiny_model.sampling_scheduler())
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(class_labels=[1, 2], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    ids = pipeline(class_labels=[1, 2], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    generator = torch.Generator().manual_seed(0)
    pipeline(class_labels=[1, 2], num_inference_steps=2, output_type="latent", generator=generator)  # same draws
    expected = tiny_model.decode(ids, generator=generator)
    assert expected.num_decoder_passes == 2
    torch.testing.assert_close(out.images * 2 - 1, expected.sample, rtol=0, atol=1e-6)
