"""MaskGiT's unmasking scheduler: schedules, counts per step, temperatures and guidance, determinism, errors."""

import math

import pytest
import torch

from flowmo_diffusers import MaskGiTScheduler

from testing_utils import MASKGIT_TINY_SIZES
from testing_utils import random_token_ids as random_ids

N, V, C, MASK, NULL = MASKGIT_TINY_SIZES


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
