"""The MaskGiT prior's transformer over FlowMo token ids: shapes, special ids, kernels, presets."""


import pytest
import torch

from flowmo_diffusers import (
    FlowMoMaskGiTTransformer,
    get_maskgit_preset_config,
    get_preset_config,
)

from testing_utils import MASKGIT_TINY_SIZES
from testing_utils import random_token_ids as random_ids

N, V, C, MASK, NULL = MASKGIT_TINY_SIZES


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
