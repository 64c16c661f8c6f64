"""Codebook usage, entropy and perplexity of token ids (bundled with flowmo_diffusers)."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
import torch

from flowmo_diffusers.metrics.codebook_statistics import codebook_statistics

_DESCRIPTION = """\
Codebook statistics of a tokenizer's ids over a dataset: `codebook_usage` (fraction of the
2**bits_per_id values that occur at least once, pooled over positions), its per-position mean and
minimum, `codebook_entropy_bits` (entropy of the pooled id histogram, in bits, at most bits_per_id)
and `codebook_perplexity` (2**entropy). For FlowMo the ids are the quantizer's sub-token ids
(bits_per_id = bits_per_subtoken: 9 for FlowMo-Lo, 14 for FlowMo-Hi).
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: token ids, one sequence of N integers per image (all of one length).
    bits_per_id: bits of one id; ids lie in [0, 2**bits_per_id).
Returns:
    codebook_usage, codebook_usage_per_position_mean, codebook_usage_per_position_min,
    codebook_entropy_bits, codebook_perplexity (floats); codebook_bits_per_id, codebook_num_ids,
    codebook_num_used (ints).
Examples:
    >>> from flowmo_diffusers.metrics import load_metric
    >>> codebook = load_metric("codebook")
    >>> codebook.compute(predictions=pipe.encode(images), bits_per_id=9)["codebook_entropy_bits"]
"""
_CITATION = """\
@inproceedings{yu2024titok,
  title={An Image is Worth 32 Tokens for Reconstruction and Generation},
  author={Yu, Qihang and Weber, Mark and Deng, Xueqing and Shen, Xiaohui and Cremers, Daniel and Chen, Liang-Chieh},
  booktitle={NeurIPS},
  year={2024}
}
"""


class Codebook(evaluate.Metric):
    __doc__ = _DESCRIPTION + _KWARGS_DESCRIPTION

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            reference_urls=["https://github.com/bytedance/1d-tokenizer"],
        )

    def _compute(self, predictions: list[Any], bits_per_id: int | None = None) -> dict[str, float | int]:
        if bits_per_id is None:
            raise ValueError("bits_per_id is required: ids lie in [0, 2**bits_per_id) (FlowMo: bits_per_subtoken)")
        lengths = {len(ids) for ids in predictions}
        if len(lengths) > 1:
            raise ValueError(f"predictions must hold one id sequence of one length per image, got lengths {sorted(lengths)}")
        ids = torch.from_numpy(np.asarray(predictions, dtype=np.int64).reshape(len(predictions), -1))
        return codebook_statistics(ids, bits_per_id)
