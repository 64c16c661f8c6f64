"""The MaskGiT training step: masked cross-entropy, class dropout, one optimizer step."""

import math

import pytest
import torch
import torch.nn.functional as F

from flowmo_diffusers import MaskGiTScheduler
from flowmo_diffusers.training.maskgit import drop_class_labels, masked_cross_entropy, maskgit_training_step

from testing_utils import MASKGIT_TINY_SIZES
from testing_utils import random_token_ids as random_ids

N, V, C, MASK, NULL = MASKGIT_TINY_SIZES


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
    # The loss reaches the inputs: every sample has a masked position, so the mask id's embedding gets a gradient.
    assert tiny_transformer.token_embedding.weight.grad[MASK].abs().sum() > 0
    with pytest.raises(ValueError, match="mask_token_id"):
        maskgit_training_step(tiny_transformer, MaskGiTScheduler(mask_token_id=V + 1), ids, labels)
    with pytest.raises(ValueError, match="before class dropout"):
        maskgit_training_step(tiny_transformer, scheduler, ids, torch.full((8,), NULL))
