"""The MaskGiT training step on FlowMo token ids (shared by `examples/train_maskgit/train.py` and the tests).

One step (MaskGiT, Chang et al. 2022; TiTok's `ImageBert` training in bytedance/1d-tokenizer):

1. mask `clamp(round(N * gamma(u)), 1, N)` random positions per sample, `u ~ U(0, 1)` ([`MaskGiTScheduler.add_noise`]);
2. replace each class label by the null class with probability `class_dropout_prob` (10%), so that one model gives
   both the conditional and the unconditional logits that classifier-free guidance combines;
3. cross-entropy with label smoothing (0.1) on the masked positions only, averaged over all masked positions of the
   batch (TiTok: `(loss * mask).sum() / mask.sum()`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.maskgit_transformer import FlowMoMaskGiTTransformer
from ..schedulers.scheduling_maskgit import MaskGiTScheduler, uniform_noise
from ..utils.validation import check_float

GeneratorType = torch.Generator | list[torch.Generator] | None


@dataclass
class MaskGiTTrainingOutput:
    """What [`maskgit_training_step`] returns.

    Args:
        loss (`torch.Tensor`):
            scalar masked cross-entropy (label-smoothed), to backpropagate.
        accuracy (`torch.Tensor`):
            scalar fraction of masked positions whose argmax equals the target (detached, for logging).
        logits (`torch.Tensor`):
            `(B, N, codebook_size)`.
        mask (`torch.BoolTensor`):
            bool `(B, N)`, the positions that were masked.
        class_labels (`torch.LongTensor`):
            `(B,)`, the labels after class dropout.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    logits: torch.Tensor
    mask: torch.BoolTensor
    class_labels: torch.LongTensor


def drop_class_labels(
    class_labels: torch.LongTensor,
    null_class_id: int,
    drop_prob: float = 0.1,
    generator: GeneratorType = None,
) -> torch.LongTensor:
    """Replace each label by `null_class_id` with probability `drop_prob` (independently per sample)."""
    drop_prob = check_float("drop_prob", drop_prob, 0.0, 1.0)
    if drop_prob == 0:
        return class_labels
    drop = uniform_noise(tuple(class_labels.shape), generator, class_labels.device) < drop_prob
    return torch.where(drop, torch.full_like(class_labels, null_class_id), class_labels)


def masked_cross_entropy(
    logits: torch.Tensor,
    targets: torch.LongTensor,
    mask: torch.BoolTensor,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """
    Mean label-smoothed cross-entropy over the masked positions.

    Args:
        logits (`(B, N, V)`), targets (`(B, N)` ids in [0, V)), mask (bool `(B, N)`, True where the loss counts).
        label_smoothing (`float`): as in `torch.nn.functional.cross_entropy` (target `(1 - e) one_hot + e / V`).

    Returns:
        scalar: `sum(ce * mask) / max(sum(mask), 1)` in float32 (0 when nothing is masked).
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"expected logits (B, N, V), targets and mask (B, N); got {tuple(logits.shape)}, {tuple(targets.shape)}, "
            f"{tuple(mask.shape)}"
        )
    per_position = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view_as(targets)
    weights = mask.float()
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def maskgit_training_step(
    transformer: FlowMoMaskGiTTransformer,
    scheduler: MaskGiTScheduler,
    token_ids: torch.LongTensor,
    class_labels: torch.LongTensor,
    class_dropout_prob: float = 0.1,
    label_smoothing: float = 0.1,
    generator: GeneratorType = None,
) -> MaskGiTTrainingOutput:
    """
    Mask, drop classes, predict, and compute the loss (call `.backward()` on `output.loss` yourself).

    Args:
        transformer (`FlowMoMaskGiTTransformer`):
            the model (in train mode for dropout).
        scheduler (`MaskGiTScheduler`):
            gives the masking schedule and the mask id (must equal the transformer's `mask_token_id`).
        token_ids (`(B, num_indices)`): clean FlowMo ids; class_labels (`(B,)`): ids in `[0, num_classes)`.
        class_dropout_prob, label_smoothing (`float`): 0.1 each by default (MaskGiT / TiTok).
        generator (`GeneratorType`, *optional*):
            for the masking and the class dropout.
    """
    from accelerate.utils import extract_model_from_parallel

    # The forward goes through the wrapper (DDP / FSDP / compile), the attributes come from the model inside.
    model = extract_model_from_parallel(transformer, keep_torch_compile=False)
    if scheduler.config.mask_token_id != model.mask_token_id:
        raise ValueError(
            f"scheduler.mask_token_id ({scheduler.config.mask_token_id}) != transformer.mask_token_id "
            f"({model.mask_token_id})"
        )
    if not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point():
        raise ValueError("class_labels must be an integer tensor")
    if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() >= model.config.num_classes):
        raise ValueError(f"class_labels must lie in [0, {model.config.num_classes}) before class dropout")
    masked_ids, mask = scheduler.add_noise(token_ids, generator=generator)
    labels = drop_class_labels(class_labels, model.null_class_id, class_dropout_prob, generator)
    logits = transformer(masked_ids, labels).logits
    loss = masked_cross_entropy(logits, token_ids, mask, label_smoothing)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == token_ids) & mask
        accuracy = correct.sum().float() / mask.sum().clamp_min(1)
    return MaskGiTTrainingOutput(loss=loss, accuracy=accuracy, logits=logits, mask=mask, class_labels=labels)
