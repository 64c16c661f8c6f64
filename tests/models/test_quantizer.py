import pytest
import torch
from safetensors.torch import load_file

from flowmo_diffusers import LookupFreeQuantizer

from testing_utils import ORIGINAL_TINY


@pytest.fixture(scope="module")
def reference():
    return load_file(ORIGINAL_TINY / "reference.safetensors")


def test_indices_and_code_match_original_14_bit(reference):
    quantizer = LookupFreeQuantizer(bits_per_subtoken=14)
    output = quantizer(reference["lfq14_input"])
    assert output.indices.dtype == torch.int64
    assert torch.equal(output.indices, reference["lfq14_indices"])
    assert torch.equal(output.quantized, reference["lfq14_quantized"])


def test_training_losses_match_original(reference):
    quantizer = LookupFreeQuantizer(bits_per_subtoken=14)
    output = quantizer(reference["lfq14_input"], return_losses=True)
    for name in ("per_sample_entropy", "codebook_entropy", "commitment"):
        torch.testing.assert_close(getattr(output, name), reference[f"lfq14_{name}"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.entropy_loss, reference["lfq14_entropy_aux_loss"], rtol=1e-5, atol=1e-6)

    tiny = LookupFreeQuantizer(bits_per_subtoken=4)
    output = tiny(reference["code_prequant"], return_losses=True)
    torch.testing.assert_close(output.entropy_loss, reference["lfq_entropy_aux_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.commitment, reference["lfq_commitment"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, reference["lfq_quantizer_loss"], rtol=1e-5, atol=1e-7)


def test_id_layout_and_exact_inverse():
    quantizer = LookupFreeQuantizer(bits_per_subtoken=3)
    # one token of 6 channels = 2 sub-tokens; channel g * 2 + h is bit g of sub-token h
    code = torch.tensor([[[1.0, -1.0, -1.0, 1.0, 1.0, 0.0]]])
    output = quantizer(code)
    assert output.indices.tolist() == [[1 + 4, 2]]  # zero counts as negative
    assert torch.equal(quantizer.indices_to_code(output.indices, code_length=1), torch.where(code > 0, 1.0, -1.0))

    ids = torch.randint(0, 8, (5, 4 * 2))
    assert torch.equal(quantizer.code_to_indices(quantizer.indices_to_code(ids, code_length=4)), ids)


def test_straight_through_gradient_and_losses_only_on_request():
    quantizer = LookupFreeQuantizer(bits_per_subtoken=4)
    code = torch.randn(2, 3, 8, requires_grad=True)
    output = quantizer(code)
    assert output.loss.item() == 0.0
    output.quantized.sum().backward()
    torch.testing.assert_close(code.grad, torch.ones_like(code))
    assert quantizer(code, return_losses=True).loss.item() != 0.0


def test_channels_not_multiple_of_bits():
    with pytest.raises(ValueError, match="multiple of bits_per_subtoken"):
        LookupFreeQuantizer(bits_per_subtoken=4)(torch.randn(1, 2, 6))
