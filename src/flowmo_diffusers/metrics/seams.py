"""Seam score of tiled reconstructions: gradient energy across tile borders over the energy elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def seam_ratio(images: torch.Tensor, row_borders: Sequence[int], col_borders: Sequence[int]) -> float:
    """Mean squared difference of neighbouring pixels across the given borders over that of all other neighbours.

    A tiled decode with visible seams has sharper steps on its tile borders than inside its tiles; a photograph has no
    reason to. Compare with the same ratio of the original image at the same borders: `seam_ratio(decoded) /
    seam_ratio(original)` near 1 means no seam shows.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): the images.
        row_borders (`Sequence[int]`): border rows; border `p` lies between pixel rows `p - 1` and `p`, `0 < p < H`.
        col_borders (`Sequence[int]`): border columns, likewise, `0 < p < W`.

    Returns:
        `float`: the ratio of the two mean energies (differences across rows and across columns pooled).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor of shape (B, C, H, W), got {getattr(images, 'shape', type(images))}")
    height, width = images.shape[-2:]
    for name, borders, length in (("row_borders", row_borders, height), ("col_borders", col_borders, width)):
        if any(not 0 < int(p) < length for p in borders):
            raise ValueError(f"{name} must lie in (0, {length}), got {list(borders)}")
    if not row_borders and not col_borders:
        raise ValueError("row_borders and col_borders are both empty: there is no border to score")
    images = images.double()
    across_rows = (images[..., 1:, :] - images[..., :-1, :]).pow(2)  # index p - 1: between rows p - 1 and p
    across_cols = (images[..., :, 1:] - images[..., :, :-1]).pow(2)
    on_rows = torch.zeros(height - 1, dtype=torch.bool)
    on_rows[[int(p) - 1 for p in row_borders]] = True
    on_cols = torch.zeros(width - 1, dtype=torch.bool)
    on_cols[[int(p) - 1 for p in col_borders]] = True
    on = across_rows[..., on_rows, :].sum() + across_cols[..., on_cols].sum()
    off = across_rows[..., ~on_rows, :].sum() + across_cols[..., ~on_cols].sum()
    on_count = across_rows[..., on_rows, :].numel() + across_cols[..., on_cols].numel()
    off_count = across_rows[..., ~on_rows, :].numel() + across_cols[..., ~on_cols].numel()
    if off_count == 0 or off == 0:
        raise ValueError("the images have no gradient energy off the borders (constant images or borders everywhere)")
    return float((on / on_count) / (off / off_count))
