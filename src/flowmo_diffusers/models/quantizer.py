"""Lookup-free quantization (LFQ) of FlowMo codes and the token-id layout of the original implementation."""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn

from ..utils.validation import check_int


@dataclass
class LFQOutput(BaseOutput):
    """
    Output of [`LookupFreeQuantizer`].

    Args:
        quantized (`torch.Tensor` of shape `(batch_size, code_length, context_dim)`):
            Code quantized to {-1, +1}; in training mode gradients pass straight through to the input.
        indices (`torch.LongTensor` of shape `(batch_size, code_length * subtokens_per_token)`):
            Token ids, `subtokens_per_token = context_dim // bits_per_subtoken` ids per code token, each in
            `[0, 2**bits_per_subtoken)`. Id `t * subtokens_per_token + h` is sub-token `h` of code token `t`.
        loss (`torch.Tensor`, scalar, float32 whatever the code's dtype, as are the other losses):
            Weighted quantizer loss `entropy_loss_weight * entropy_loss + commitment_loss_weight * commitment`;
            zero unless the training losses were requested.
        entropy_loss (`torch.Tensor`, scalar): per-sample entropy minus the entropy of the batch-mean distribution.
        per_sample_entropy (`torch.Tensor`, scalar): mean entropy of each position's code distribution.
        codebook_entropy (`torch.Tensor`, scalar): entropy of the code distribution averaged over the batch.
        commitment (`torch.Tensor`, scalar): mean squared distance between the input and its quantization.
    """

    quantized: torch.Tensor
    indices: torch.LongTensor
    loss: torch.Tensor
    entropy_loss: torch.Tensor
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    commitment: torch.Tensor


class LookupFreeQuantizer(nn.Module):
    r"""
    Lookup-free quantizer (Yu et al., 2023) laid out exactly as FlowMo's.

    A code of shape `(B, T, C)` holds `C = bits_per_subtoken * subtokens_per_token` channels per token. Channel
    `g * subtokens_per_token + h` is bit `g` of sub-token `h` (the original's `b t (fg fh) -> b fg (t fh)`
    regrouping); a bit is 1 where the channel is positive (0 maps to bit 0, i.e. -1) and the id of a sub-token is
    `sum_g bit_g * 2**g`.

    Parameters:
        bits_per_subtoken (`int`): bits of one token id (the original's `codebook_size_for_entropy`): 9 for
            FlowMo-Lo, 14 for FlowMo-Hi.
        entropy_temperature (`float`): softmax temperature of the entropy loss.
        entropy_loss_weight (`float`): weight of the entropy loss in `loss`.
        commitment_loss_weight (`float`): weight of the commitment loss in `loss`.
    """

    def __init__(
        self,
        bits_per_subtoken: int,
        entropy_temperature: float = 0.1,
        entropy_loss_weight: float = 0.0025,
        commitment_loss_weight: float = 0.000625,
    ):
        super().__init__()
        self.bits_per_subtoken = check_int("bits_per_subtoken", bits_per_subtoken, 1, 62)
        self.entropy_temperature = entropy_temperature
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.register_buffer("bit_values", 2 ** torch.arange(bits_per_subtoken, dtype=torch.long), persistent=False)

    @property
    def codebook_size(self) -> int:
        return 2**self.bits_per_subtoken

    def _split_subtokens(self, code: torch.Tensor) -> torch.Tensor:
        """`(B, T, G * H)` -> `(B, T * H, G)`: one row of G bits per sub-token."""
        batch_size, code_length, channels = code.shape
        if channels % self.bits_per_subtoken != 0:
            raise ValueError(
                f"code has {channels} channels, which is not a multiple of bits_per_subtoken={self.bits_per_subtoken}"
            )
        subtokens = channels // self.bits_per_subtoken
        code = code.reshape(batch_size, code_length, self.bits_per_subtoken, subtokens)
        return code.transpose(2, 3).reshape(batch_size, code_length * subtokens, self.bits_per_subtoken)

    def _merge_subtokens(self, rows: torch.Tensor, code_length: int) -> torch.Tensor:
        """Inverse of `_split_subtokens`: `(B, T * H, G)` -> `(B, T, G * H)`."""
        batch_size = rows.shape[0]
        rows = rows.reshape(batch_size, code_length, -1, self.bits_per_subtoken)
        return rows.transpose(2, 3).reshape(batch_size, code_length, -1)

    def codebook(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """All `2**bits_per_subtoken` codewords in {-1, +1}, shape `(codebook_size, bits_per_subtoken)`."""
        ids = torch.arange(self.codebook_size, device=device or self.bit_values.device)
        return ((ids[:, None] & self.bit_values.to(ids.device)) != 0).to(dtype) * 2 - 1

    def code_to_indices(self, code: torch.Tensor) -> torch.LongTensor:
        """Token ids `(B, T * H)` of a code `(B, T, G * H)` (quantized or not: only signs matter)."""
        bits = self._split_subtokens(code) > 0
        return (bits.long() * self.bit_values).sum(-1)

    def indices_to_code(self, indices: torch.LongTensor, code_length: int, dtype=torch.float32) -> torch.Tensor:
        """Exact inverse of [`code_to_indices`] on quantized codes: ids `(B, T * H)` -> code `(B, T, G * H)`."""
        bits = (indices[..., None] & self.bit_values) != 0
        return self._merge_subtokens(bits.to(dtype) * 2 - 1, code_length)

    def entropy_losses(self, rows: torch.Tensor):
        """
        MAGVIT-v2 entropy terms of the soft assignment of each row `(N..., G)` to the codebook.

        Returns `(per_sample_entropy, codebook_entropy, entropy_loss)`.
        """
        # Float32 even under autocast, which would run the logits' matmul in half precision (see `forward`). The meta
        # device (shape-only checks) has no autocast to switch off.
        no_autocast = nullcontext() if rows.device.type == "meta" else torch.autocast(rows.device.type, enabled=False)
        with no_autocast:
            rows = rows.float()
            # 2 x . c equals -|x - c|^2 up to a per-row constant, so these are distance-based logits.
            logits = 2 * rows @ self.codebook(rows.dtype, rows.device).T
            logits = logits / self.entropy_temperature
            probs = logits.softmax(-1)
            per_sample_entropy = -(probs * logits.log_softmax(-1)).sum(-1).mean()
            mean_probs = probs.reshape(-1, probs.shape[-1]).mean(0)
            # The 1e-5 inside the log is the original's; it keeps empty codebook entries finite.
            codebook_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
        return per_sample_entropy, codebook_entropy, per_sample_entropy - codebook_entropy

    def forward(self, code: torch.Tensor, return_losses: bool = False) -> LFQOutput:
        """
        Args:
            code (`torch.Tensor` of shape `(B, T, C)`): continuous encoder output.
            return_losses (`bool`): compute the entropy and commitment losses (training).
        """
        code_length = code.shape[1]
        # Float32 inside whatever the encoder's dtype: the entropy terms average 2**bits probabilities of about
        # 2**-bits each (float16 holds 2**-14 only as a subnormal; bfloat16 sums them with 8 bits of mantissa), and
        # the losses feed the optimizer. Signs, and so ids, do not change; `quantized` is returned in `code`'s dtype.
        rows = self._split_subtokens(code.float())
        signs = torch.where(rows > 0, 1.0, -1.0).to(rows.dtype)
        indices = ((rows > 0).long() * self.bit_values).sum(-1)
        zero = rows.new_zeros(())
        per_sample_entropy = codebook_entropy = entropy_loss = commitment = loss = zero
        if return_losses:
            per_sample_entropy, codebook_entropy, entropy_loss = self.entropy_losses(rows)
            commitment = F.mse_loss(rows, signs.detach())
            loss = self.entropy_loss_weight * entropy_loss + self.commitment_loss_weight * commitment
        # Straight-through estimator: forward value is the sign, gradient is the identity.
        quantized_rows = rows + (signs - rows).detach()
        return LFQOutput(
            quantized=self._merge_subtokens(quantized_rows, code_length).to(code.dtype),
            indices=indices,
            loss=loss,
            entropy_loss=entropy_loss,
            per_sample_entropy=per_sample_entropy,
            codebook_entropy=codebook_entropy,
            commitment=commitment,
        )
