"""FlowMoMaskGiTTransformer: a class-conditional, bidirectional MaskGiT transformer over FlowMo token ids.

The backbone is `transformers`' BERT encoder stack (`transformers.models.bert.modeling_bert.BertEncoder`, built from
a `BertConfig`), as TiTok's `ImageBert` (bytedance/1d-tokenizer, `modeling/maskgit.py`) does; only the embeddings
and the output head are ours. The weights live in this model's own state dict
(`encoder.layer.{i}.attention.self.query.weight`, ...), so only this package's config is saved.

Dependency: `transformers`, imported when the model is built (not when `flowmo_diffusers` is imported, since the core
install does not require it). Tested with transformers 5.23, where we rely on: `BertEncoder(config)(hidden_states)`
returning `.last_hidden_state`; the attention kernel being read from `config._attn_implementation` (a bare
`BertEncoder` is not a `PreTrainedModel`, so we set it); `BertLayer` being a `GradientCheckpointingLayer`, whose
`gradient_checkpointing` flag and checkpoint function diffusers' `ModelMixin.enable_gradient_checkpointing` sets.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from ..utils.files import FollowUmaskSaveMixin
from ..utils.validation import FloatRule, IntRule, validate_config
from .modeling_utils import StrictLoadingMixin


@dataclass
class FlowMoMaskGiTTransformerOutput(BaseOutput):
    """
    Output of [`FlowMoMaskGiTTransformer`].

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_indices, codebook_size)`): unnormalized log-probabilities
            of every position's token id (the mask id is never predicted).
    """

    logits: torch.Tensor


#: Bounds of every `config.json` value, checked at construction (and so at `from_pretrained`) before any weight exists.
CONFIG_RULES = {
    "num_indices": IntRule(1, 65536),
    "codebook_size": IntRule(1, 2**24),
    "num_classes": IntRule(1, 10**6),
    "hidden_size": IntRule(1, 65536),
    "num_layers": IntRule(1, 1024),
    "num_heads": IntRule(1, 1024),
    "intermediate_size": IntRule(1, 262144),
    "dropout": FloatRule(0.0, 1.0),
    "layer_norm_eps": FloatRule(0.0, 1.0, exclusive_minimum=True),
    "initializer_range": FloatRule(0.0, 10.0),
}


class FlowMoMaskGiTTransformer(StrictLoadingMixin, FollowUmaskSaveMixin, ModelMixin, ConfigMixin):
    r"""
    MaskGiT transformer (Chang et al., 2022) over the `num_indices` token ids of an image, conditioned on a class.

    Input sequence: `[class token, id_1, ..., id_N]`. Image ids take values in `[0, codebook_size)`, plus the mask id
    `codebook_size` (= `mask_token_id`) for unknown positions. Class ids take values in `[0, num_classes)`, plus the
    null class `num_classes` (= `null_class_id`) used for classifier-free guidance and class dropout in training.
    Token, class and learned absolute position embeddings are summed, layer-normalized (BERT's embedding layer),
    passed through a BERT encoder (bidirectional self-attention, post-LN) and projected to `codebook_size` logits
    per image position (TiTok's `lm_head`); the class position's output is dropped.

    Parameters:
        num_indices (`int`): token ids per image (FlowMo-Lo: 512).
        codebook_size (`int`): values of one token id (FlowMo-Lo: 2**9 = 512).
        num_classes (`int`): number of real classes (ImageNet: 1000); one more id is the null class.
        hidden_size, num_layers, num_heads, intermediate_size (`int`): BERT encoder size.
        dropout (`float`): dropout on the embeddings, hidden states and attention probabilities.
        layer_norm_eps (`float`): LayerNorm epsilon (BERT: 1e-12).
        initializer_range (`float`): std of the (truncated) normal initialization (BERT: 0.02).
        attention_implementation (`str`): transformers attention kernel, `"sdpa"` or `"eager"`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["BertLayer"]
    # `compile_repeated_blocks()` compiles one BERT layer and reuses the graph for all `num_layers` of them (diffusers'
    # regional compilation); transformers' `BertLayer` is the block the encoder stack repeats.
    _repeated_blocks = ["BertLayer"]

    @register_to_config
    def __init__(
        self,
        num_indices: int = 512,
        codebook_size: int = 512,
        num_classes: int = 1000,
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_heads: int = 16,
        intermediate_size: int = 4096,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        attention_implementation: str = "sdpa",
    ):
        super().__init__()
        validate_config(type(self).__name__, dict(locals()), CONFIG_RULES)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if attention_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attention_implementation must be 'sdpa' or 'eager', got {attention_implementation!r}")

        self.token_embedding = nn.Embedding(codebook_size + 1, hidden_size)  # + the mask id
        self.class_embedding = nn.Embedding(num_classes + 1, hidden_size)  # + the null class
        self.position_embedding = nn.Embedding(num_indices + 1, hidden_size)  # + the class position
        self.embedding_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.embedding_dropout = nn.Dropout(dropout)
        try:
            from transformers import BertConfig
            from transformers.models.bert.modeling_bert import BertEncoder
        except ImportError as error:
            raise ImportError(
                "FlowMoMaskGiTTransformer uses transformers' BERT encoder stack: pip install 'transformers>=5'"
            ) from error
        bert_config = BertConfig(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            hidden_act="gelu",
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            layer_norm_eps=layer_norm_eps,
            is_decoder=False,
            add_cross_attention=False,
        )
        # BertEncoder is a plain nn.Module (not a PreTrainedModel), so nothing picks the kernel for it: without this
        # transformers falls back to eager attention. Both kernels compute the same function.
        bert_config._attn_implementation = attention_implementation
        self.encoder = BertEncoder(bert_config)
        self.lm_head = nn.Linear(hidden_size, codebook_size)
        self.register_buffer("position_ids", torch.arange(num_indices + 1), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialization (as TiTok's `post_init`), with a truncated normal."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        """Id of a masked (unknown) position: `codebook_size`."""
        return self.config.codebook_size

    @property
    def null_class_id(self) -> int:
        """Class id of the unconditional (null) class: `num_classes`."""
        return self.config.num_classes

    def check_inputs(self, input_ids: torch.Tensor, class_labels: torch.Tensor) -> None:
        """Raise ValueError unless `input_ids` `(B, num_indices)` and `class_labels` `(B,)` are valid integer ids."""
        n, v, c = self.config.num_indices, self.config.codebook_size, self.config.num_classes
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] != n:
            raise ValueError(f"input_ids must have shape (batch, {n}), got {tuple(input_ids.shape)}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > v):
            raise ValueError(
                f"input_ids must lie in [0, {v}] ({v} is the mask id), got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        if not isinstance(class_labels, torch.Tensor):
            raise ValueError(f"class_labels must be a torch.Tensor, got {type(class_labels).__name__}")
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor of class ids, got dtype {class_labels.dtype}")
        if class_labels.ndim != 1 or class_labels.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"class_labels must have shape ({input_ids.shape[0]},) to match input_ids, "
                f"got {tuple(class_labels.shape)}"
            )
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > c):
            raise ValueError(
                f"class_labels must lie in [0, {c}] ({c} is the null class), got range "
                f"[{int(class_labels.min())}, {int(class_labels.max())}]"
            )

    def forward(
        self,
        input_ids: torch.LongTensor,
        class_labels: torch.LongTensor,
        return_dict: bool = True,
    ) -> FlowMoMaskGiTTransformerOutput | tuple:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(B, num_indices)`): token ids, `mask_token_id` where unknown.
            class_labels (`torch.LongTensor` of shape `(B,)`): class ids; `null_class_id` for the unconditional pass.
            return_dict (`bool`): return a [`FlowMoMaskGiTTransformerOutput`] rather than a tuple.

        Returns:
            `logits` `(B, num_indices, codebook_size)`, in the dtype of the model.
        """
        self.check_inputs(input_ids, class_labels)
        input_ids = input_ids.long()
        class_labels = class_labels.long()
        hidden_states = torch.cat(
            [self.class_embedding(class_labels)[:, None], self.token_embedding(input_ids)], dim=1
        ) + self.position_embedding(self.position_ids)[None]
        hidden_states = self.embedding_dropout(self.embedding_norm(hidden_states))
        # BertLayer is a transformers GradientCheckpointingLayer: ModelMixin.enable_gradient_checkpointing() sets its
        # `gradient_checkpointing` flag and checkpoint function, and the layer checkpoints itself in training mode.
        hidden_states = self.encoder(hidden_states).last_hidden_state
        logits = self.lm_head(hidden_states[:, 1:])
        if not return_dict:
            return (logits,)
        return FlowMoMaskGiTTransformerOutput(logits=logits)
