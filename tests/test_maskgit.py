"""MaskGiT prior on FlowMo tokens: transformer, unmasking scheduler, training step, class-conditional pipeline."""

import math
import time

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from hub_stub import local_hub  # noqa: F401  (pytest fixture: local Hub stand-in with the client patched)

from flowmo_diffusers import (
    FlowMoMaskGiTPipeline,
    FlowMoMaskGiTTransformer,
    FlowMoPipeline,
    FlowMoScheduler,
    MaskGiTScheduler,
    get_maskgit_preset_config,
    get_preset_config,
)
from flowmo_diffusers.training.maskgit import drop_class_labels, masked_cross_entropy, maskgit_training_step

N, V, C = 24, 16, 10  # maskgit-tiny: 24 ids of 16 values (flowmo-tiny), 10 classes; mask id 16, null class 10
MASK, NULL = V, C


@pytest.fixture
def tiny_transformer():
    torch.manual_seed(0)
    return FlowMoMaskGiTTransformer(**get_maskgit_preset_config("maskgit-tiny")).eval()


@pytest.fixture
def maskgit_pipeline(tiny_transformer, tiny_model):
    pipeline = FlowMoMaskGiTPipeline(
        transformer=tiny_transformer,
        scheduler=MaskGiTScheduler(mask_token_id=MASK),
        autoencoder=tiny_model,
        decoder_scheduler=FlowMoScheduler(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_ids(batch, generator_seed=0, with_masks=False):
    ids = torch.randint(0, V + int(with_masks), (batch, N), generator=torch.Generator().manual_seed(generator_seed))
    return ids


# ------------------------------------------------------------------------------------------------------------------
# Transformer
@torch.no_grad()
def test_transformer_shapes_and_special_ids(tiny_transformer):
    assert tiny_transformer.mask_token_id == MASK and tiny_transformer.null_class_id == NULL
    ids = random_ids(3, with_masks=True)
    ids[0] = MASK  # all masked
    labels = torch.tensor([0, 9, NULL])  # the null class is a valid input
    logits = tiny_transformer(ids, labels).logits
    assert logits.shape == (3, N, V) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    (as_tuple,) = tiny_transformer(ids, labels, return_dict=False)
    torch.testing.assert_close(as_tuple, logits)
    # The class conditions every position; a position's logits depend on other positions (bidirectional).
    assert not torch.allclose(tiny_transformer(ids, torch.tensor([1, 9, NULL])).logits[0], logits[0])
    changed = ids.clone()
    changed[1, -1] = (changed[1, -1] + 1) % V
    assert not torch.allclose(tiny_transformer(changed, labels).logits[1, 0], logits[1, 0])


def test_transformer_rejects_bad_inputs(tiny_transformer):
    ids, labels = random_ids(2), torch.tensor([0, 1])
    cases = [
        (ids, torch.tensor([0, NULL + 1]), "class_labels must lie in"),
        (ids, torch.tensor([-1, 0]), "class_labels must lie in"),
        (ids, torch.tensor([0, 1, 2]), r"class_labels must have shape \(2,\)"),
        (ids, torch.tensor([0.0, 1.0]), "class_labels must be an integer tensor"),
        (ids[:, :-1], labels, r"input_ids must have shape \(batch, 24\)"),
        (ids[0], labels[:1], r"input_ids must have shape \(batch, 24\)"),
        (ids.float(), labels, "input_ids must be an integer tensor"),
        (torch.full_like(ids, MASK + 1), labels, r"input_ids must lie in \[0, 16\]"),
        (ids - V, labels, r"input_ids must lie in \[0, 16\]"),
    ]
    for bad_ids, bad_labels, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_transformer(bad_ids, bad_labels)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        FlowMoMaskGiTTransformer(**dict(get_maskgit_preset_config("maskgit-tiny"), num_heads=3))


def test_transformer_attention_kernels_and_gradient_checkpointing_agree(tiny_transformer):
    config = dict(tiny_transformer.config)
    eager = FlowMoMaskGiTTransformer(**dict(config, attention_implementation="eager"))
    eager.load_state_dict(tiny_transformer.state_dict())
    ids, labels = random_ids(2, with_masks=True), torch.tensor([3, NULL])
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, labels).logits, tiny_transformer(ids, labels).logits, atol=1e-5, rtol=0)

    def grads(model):
        model.train().zero_grad()
        model(ids, labels).logits.square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads(tiny_transformer)
    tiny_transformer.enable_gradient_checkpointing()
    assert tiny_transformer.is_gradient_checkpointing
    for expected, got in zip(reference, grads(tiny_transformer)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_presets():
    lo = get_maskgit_preset_config("maskgit-flowmo-lo")
    flowmo_lo = get_preset_config("flowmo-lo")
    assert lo["num_indices"] == flowmo_lo["code_length"] * flowmo_lo["context_dim"] // flowmo_lo["bits_per_subtoken"]
    assert lo["codebook_size"] == 2 ** flowmo_lo["bits_per_subtoken"] == 512 and lo["num_classes"] == 1000
    with torch.device("meta"):
        model = FlowMoMaskGiTTransformer(**lo)
    assert 300e6 < sum(p.numel() for p in model.parameters()) < 310e6
    tiny = get_maskgit_preset_config("maskgit-tiny")
    flowmo_tiny = get_preset_config("flowmo-tiny")
    assert tiny["num_indices"] == N == flowmo_tiny["code_length"] * flowmo_tiny["context_dim"] // 4
    with pytest.raises(ValueError, match="unknown MaskGiT preset"):
        get_maskgit_preset_config("maskgit-huge")


# ------------------------------------------------------------------------------------------------------------------
# Scheduler
def test_masking_schedule_values():
    values = {"cosine": math.cos(math.pi / 4), "arccos": 2 / 3, "linear": 0.5}
    for schedule, at_half in values.items():
        scheduler = MaskGiTScheduler(mask_token_id=MASK, masking_schedule=schedule)
        assert scheduler.mask_ratio(0.0) == pytest.approx(1.0) and scheduler.mask_ratio(1.0) == pytest.approx(0.0)
        assert scheduler.mask_ratio(0.5) == pytest.approx(at_half)
        t = torch.linspace(0, 1, 11, dtype=torch.float64)
        expected = torch.tensor([scheduler.mask_ratio(float(x)) for x in t], dtype=torch.float64)
        torch.testing.assert_close(scheduler.mask_ratio(t), expected)
        assert (scheduler.mask_ratio(t).diff() < 0).all()  # strictly decreasing
        with pytest.raises(ValueError):
            scheduler.mask_ratio(1.5)
    # arccos masks more than cosine early on (TiTok's choice): gamma(0.25) = 0.8391 vs 0.9239.
    assert MaskGiTScheduler(MASK, masking_schedule="arccos").mask_ratio(0.25) == pytest.approx(0.839139, abs=1e-6)
    with pytest.raises(ValueError, match="masking_schedule"):
        MaskGiTScheduler(MASK, masking_schedule="square")


def unmask(scheduler, steps, batch=3, seed=0, generator_seed=0):
    """Run the scheduler on random logits from all-masked ids; return the ids after each step."""
    scheduler.set_timesteps(steps)
    ids = torch.full((batch, N), MASK)
    logits_generator = torch.Generator().manual_seed(seed)
    generator = torch.Generator().manual_seed(generator_seed)
    history = []
    for step_index in scheduler.timesteps:
        logits = 3 * torch.randn(batch, N, V, generator=logits_generator)
        ids = scheduler.step(logits, step_index, ids, generator=generator).prev_sample
        history.append(ids)
    return history


@pytest.mark.parametrize("schedule", ["cosine", "arccos", "linear"])
@pytest.mark.parametrize("steps", [1, 4, 8, 12, 30])
def test_masked_count_per_step_follows_schedule(schedule, steps):
    scheduler = MaskGiTScheduler(mask_token_id=MASK, masking_schedule=schedule)
    history = unmask(scheduler, steps)
    masked_before, previous = N, torch.full((3, N), MASK)
    for step_index, ids in enumerate(history):
        nominal = scheduler.num_masked_after_step(step_index, N)
        if step_index == steps - 1:
            expected = 0
        else:
            assert nominal == math.floor(N * scheduler.mask_ratio((step_index + 1) / steps))
            expected = max(1, min(masked_before - 1, nominal))  # MaskGiT's clamp; equals nominal unless S is large
        assert ((ids == MASK).sum(dim=1) == expected).all(), (step_index, expected)
        known = previous != MASK
        assert torch.equal(ids[known], previous[known])  # known ids are never re-masked or changed
        assert ids.max() <= MASK and ids.min() >= 0
        masked_before, previous = expected, ids
    assert (history[-1] != MASK).all()


def test_cosine_counts_literal():
    # floor(24 cos(pi/2 * i/8)) for i = 1..7, then 0.
    history = unmask(MaskGiTScheduler(mask_token_id=MASK), 8, batch=1)
    assert [int((ids == MASK).sum()) for ids in history] == [23, 22, 19, 16, 13, 9, 4, 0]


def test_scheduler_is_deterministic_given_a_generator():
    scheduler = MaskGiTScheduler(mask_token_id=MASK)
    first, second = unmask(scheduler, 6, generator_seed=1), unmask(scheduler, 6, generator_seed=1)
    other = unmask(scheduler, 6, generator_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[-1], other[-1])
    # One generator per sample: each row equals that sample run alone with its generator.
    scheduler.set_timesteps(4)
    logits = torch.randn(2, N, V, generator=torch.Generator().manual_seed(0))
    ids = torch.full((2, N), MASK)
    both = scheduler.step(logits, 0, ids, generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).prev_sample
    for row, seed in enumerate((5, 6)):
        alone = scheduler.step(logits[row:row + 1], 0, ids[:1], generator=torch.Generator().manual_seed(seed))
        assert torch.equal(both[row], alone.prev_sample[0])


def test_temperatures_and_guidance_schedules():
    scheduler = MaskGiTScheduler(mask_token_id=MASK, temperature=4.5)
    scheduler.set_timesteps(8)
    torch.testing.assert_close(scheduler.temperatures, torch.tensor([4.5 * (1 - (i + 1) / 8) for i in range(8)]))
    assert scheduler.temperatures[-1] == 0
    constant = MaskGiTScheduler(mask_token_id=MASK, temperature=2.0, temperature_schedule="constant")
    constant.set_timesteps(5)
    assert torch.equal(constant.temperatures, torch.full((5,), 2.0))

    assert [scheduler.guidance_scale_at(i, 3.0) for i in range(8)] == [3.0] * 8
    linear = MaskGiTScheduler(mask_token_id=MASK, guidance_schedule="linear")
    linear.set_timesteps(5)
    assert [linear.guidance_scale_at(i, 3.0) for i in range(5)] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    linear.set_timesteps(1)
    assert linear.guidance_scale_at(0, 3.0) == 3.0
    cosine = MaskGiTScheduler(mask_token_id=MASK, guidance_schedule="power-cosine", guidance_power=1.0)
    cosine.set_timesteps(4)
    assert [cosine.guidance_scale_at(i, 3.0) for i in range(4)] == pytest.approx(
        [1 + 2 * (1 - math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    )
    with pytest.raises(ValueError, match="step_index"):
        cosine.guidance_scale_at(4, 3.0)


def test_greedy_step_with_zero_temperatures_keeps_most_confident():
    scheduler = MaskGiTScheduler(mask_token_id=MASK, temperature=0.0, sampling_temperature=0.0)
    scheduler.set_timesteps(2)  # step 0 keeps floor(24 cos(pi/4)) = 16 masked
    logits = torch.randn(1, N, V, generator=torch.Generator().manual_seed(0))
    out = scheduler.step(logits, 0, torch.full((1, N), MASK))
    assert torch.equal(out.pred_original_sample, logits.argmax(-1))
    confidence = logits.log_softmax(-1).max(-1).values[0]
    kept = (out.prev_sample[0] != MASK).nonzero().flatten()
    assert set(kept.tolist()) == set(confidence.topk(N - 16).indices.tolist())


def test_scheduler_errors():
    scheduler = MaskGiTScheduler(mask_token_id=MASK)
    ids = torch.full((2, N), MASK)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.randn(2, N, V), 0, ids)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="model_output must have shape"):
        scheduler.step(torch.randn(2, N - 1, V), 0, ids)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(torch.randn(2, N, V), 4, ids)
    with pytest.raises(ValueError, match="integer tensor"):
        scheduler.step(torch.randn(2, N, V), 0, ids.float())
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="mask_token_id"):
        MaskGiTScheduler(mask_token_id=0)


def test_add_noise():
    scheduler = MaskGiTScheduler(mask_token_id=MASK)
    ids = random_ids(4)
    for ratio, count in ((0.5, 12), (0.0, 1), (1.0, N), (0.3, 7)):  # clamp(round(24 r), 1, 24)
        masked, mask = scheduler.add_noise(ids, generator=torch.Generator().manual_seed(0), mask_ratio=ratio)
        assert (mask.sum(dim=1) == count).all()
        assert torch.equal(masked[mask], torch.full((int(mask.sum()),), MASK))
        assert torch.equal(masked[~mask], ids[~mask])
    first = scheduler.add_noise(ids, generator=torch.Generator().manual_seed(3))
    second = scheduler.add_noise(ids, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # Masking ratio r = gamma(u), u ~ U(0, 1): E[cos(pi u / 2)] = 2 / pi; positions uniformly chosen.
    many = random_ids(4000, generator_seed=1)
    _, mask = scheduler.add_noise(many, generator=torch.Generator().manual_seed(0))
    assert mask.float().mean().item() == pytest.approx(2 / math.pi, abs=0.02)
    assert (mask.float().mean(dim=0) - mask.float().mean()).abs().max() < 0.05
    with pytest.raises(ValueError, match="without mask ids"):
        scheduler.add_noise(torch.full((1, N), MASK))


# ------------------------------------------------------------------------------------------------------------------
# Training step
def test_masked_cross_entropy_matches_definition():
    logits = torch.randn(2, N, V, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = random_ids(2)
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(1)) < 0.5
    loss = masked_cross_entropy(logits, targets, mask, label_smoothing=0.1)
    smoothed = 0.9 * F.one_hot(targets, V) + 0.1 / V
    per_position = -(smoothed * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(loss, per_position[mask].mean())
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).any()
    no_smoothing = masked_cross_entropy(logits, targets, mask, label_smoothing=0.0)
    torch.testing.assert_close(no_smoothing, F.cross_entropy(logits[mask], targets[mask]))
    assert masked_cross_entropy(logits, targets, torch.zeros_like(mask)) == 0


def test_class_dropout():
    labels = torch.randint(0, C, (20000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_class_labels(labels, NULL, 0.0), labels)
    assert (drop_class_labels(labels, NULL, 1.0) == NULL).all()
    dropped = drop_class_labels(labels, NULL, 0.1, generator=torch.Generator().manual_seed(1))
    assert (dropped == NULL).float().mean().item() == pytest.approx(0.1, abs=0.01)
    kept = dropped != NULL
    assert torch.equal(dropped[kept], labels[kept])
    again = drop_class_labels(labels, NULL, 0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dropped, again)


def test_training_step(tiny_transformer):
    scheduler = MaskGiTScheduler(mask_token_id=MASK)
    ids, labels = random_ids(8), torch.arange(8)
    generator = torch.Generator().manual_seed(0)
    out = maskgit_training_step(tiny_transformer.train(), scheduler, ids, labels, generator=generator)
    assert out.logits.shape == (8, N, V) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(math.log(V), rel=0.15)  # near-uniform predictions at initialization
    torch.testing.assert_close(out.loss, masked_cross_entropy(out.logits, ids, out.mask, 0.1))
    assert (out.mask.sum(dim=1) >= 1).all() and 0 <= out.accuracy <= 1
    assert ((out.class_labels == labels) | (out.class_labels == NULL)).all()
    out.loss.backward()
    assert tiny_transformer.token_embedding.weight.grad is not None
    with pytest.raises(ValueError, match="mask_token_id"):
        maskgit_training_step(tiny_transformer, MaskGiTScheduler(mask_token_id=V + 1), ids, labels)
    with pytest.raises(ValueError, match="before class dropout"):
        maskgit_training_step(tiny_transformer, scheduler, ids, torch.full((8,), NULL))


# ------------------------------------------------------------------------------------------------------------------
# Pipeline
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
    torch.manual_seed(0)
    transformer = FlowMoMaskGiTTransformer(**get_maskgit_preset_config("maskgit-tiny"))
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
