"""Tiled encode and decode: the layout of overlapping tiles over an image, splitting, and blending the overlaps.

FlowMo turns a `sample_size` image into a fixed number of tokens, so a larger image is tokenized as a grid of
overlapping tiles (diffusers' `AutoencoderKL.enable_tiling` does the same for its VAE). Tiles advance by
`stride = tile_size - overlap`; the last row and column are aligned to the image edge, so every pixel is covered
whatever the image size. Decoded tiles are blended with ramps across each overlap whose weights sum to one at every
pixel, so no seam shows.
"""

import math
from dataclasses import dataclass

import torch

#: Blend ramps across an overlap: "linear" (diffusers' `blend_v` / `blend_h`) or "cosine" (smooth at both ends).
BLEND_MODES = ("linear", "cosine")


def tile_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering `[0, length)`: every `tile_size - overlap`, the last one ending at `length`."""
    if length < tile_size:
        raise ValueError(f"an image side of {length} pixels is smaller than one tile ({tile_size})")
    stride = tile_size - overlap
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """
    The tiles an image of `height` x `width` is cut into.

    Args:
        height (`int`), width (`int`): image size in pixels, each at least `tile_size`.
        tile_size (`int`): side of a square tile (the model's `sample_size` by default).
        overlap (`int`): pixels shared by neighbouring tiles (more for the edge-aligned last row / column).
    """

    height: int
    width: int
    tile_size: int
    overlap: int

    def __post_init__(self):
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"tile overlap must lie in [0, tile_size={self.tile_size}), got {self.overlap}")
        if self.height < self.tile_size or self.width < self.tile_size:
            raise ValueError(
                f"with tiling, images must be at least one tile ({self.tile_size}x{self.tile_size}) large, got "
                f"{self.height}x{self.width}; disable tiling or pad the image"
            )

    @property
    def row_starts(self) -> list[int]:
        return tile_starts(self.height, self.tile_size, self.overlap)

    @property
    def col_starts(self) -> list[int]:
        return tile_starts(self.width, self.tile_size, self.overlap)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        return len(self.row_starts), len(self.col_starts)

    @property
    def num_tiles(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_size(self) -> tuple[int, int]:
        return self.height, self.width

    def origins(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row-major: tile `r * cols + c` is row r, column c."""
        return [(top, left) for top in self.row_starts for left in self.col_starts]

    def borders(self) -> tuple[list[int], list[int]]:
        """Where tile edges fall inside the image: (rows, cols), sorted; a border at `p` lies between pixels `p - 1`
        and `p` (the edges a seam would show at, e.g. for [`~flowmo_diffusers.metrics.seams.seam_ratio`])."""

        def inside(starts, length):
            edges = {start for start in starts} | {start + self.tile_size for start in starts}
            return sorted(edge for edge in edges if 0 < edge < length)

        return inside(self.row_starts, self.height), inside(self.col_starts, self.width)


def split_into_tiles(images: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B * num_tiles, C, tile, tile)`, image-major then row-major (tile t of image b is row
    `b * num_tiles + t`)."""
    size = grid.tile_size
    tiles = [images[:, :, top : top + size, left : left + size] for top, left in grid.origins()]
    return torch.stack(tiles, dim=1).flatten(0, 1)


def _axis_weights(length: int, starts: list[int], tile_size: int, mode: str) -> torch.Tensor:
    """`(len(starts), tile_size)` float64 weights along one axis that sum to one at every position of `[0, length)`.

    Each tile ramps up across its overlap with the previous tile and down across its overlap with the next; the ramps
    are strictly positive (sampled at pixel centres) so the normalization below never divides by zero, and where only
    two tiles meet (the usual case) the two ramps already sum to one.
    """
    weights = torch.ones(len(starts), tile_size, dtype=torch.float64)
    for index, start in enumerate(starts):
        if index > 0:
            ramp_in = starts[index - 1] + tile_size - start
            weights[index, :ramp_in] *= _ramp(ramp_in, mode)
        if index + 1 < len(starts):
            ramp_out = start + tile_size - starts[index + 1]
            weights[index, tile_size - ramp_out :] *= _ramp(ramp_out, mode).flip(0)
    total = torch.zeros(length, dtype=torch.float64)
    for index, start in enumerate(starts):
        total[start : start + tile_size] += weights[index]
    for index, start in enumerate(starts):  # normalize where more than two tiles overlap (edge-aligned last tile)
        weights[index] /= total[start : start + tile_size]
    return weights


def _ramp(length: int, mode: str) -> torch.Tensor:
    """Rising weights at pixel centres of an overlap of `length` pixels, `ramp[k] + ramp[length - 1 - k] = 1`."""
    position = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return position if mode == "linear" else 0.5 - 0.5 * torch.cos(math.pi * position)


def blend_weights(grid: TileGrid, mode: str = "linear") -> torch.Tensor:
    """`(num_tiles, tile, tile)` float64 weight maps, row-major like [`TileGrid.origins`]; placed at their tiles'
    origins they sum to one at every pixel of the image."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {BLEND_MODES}, got {mode!r}")
    rows = _axis_weights(grid.height, grid.row_starts, grid.tile_size, mode)
    cols = _axis_weights(grid.width, grid.col_starts, grid.tile_size, mode)
    return (rows[:, None, :, None] * cols[None, :, None, :]).flatten(0, 1)


def blend_tiles(tiles: torch.Tensor, grid: TileGrid, mode: str = "linear") -> torch.Tensor:
    """Inverse of [`split_into_tiles`]: `(B * num_tiles, C, tile, tile)` -> `(B, C, H, W)`, overlaps blended with
    [`blend_weights`] (so split then blend returns the image)."""
    if tiles.ndim != 4 or tiles.shape[0] % grid.num_tiles or tuple(tiles.shape[-2:]) != (grid.tile_size,) * 2:
        raise ValueError(
            f"tiles must have shape (B * {grid.num_tiles}, C, {grid.tile_size}, {grid.tile_size}), got {tuple(tiles.shape)}"
        )
    batch_size = tiles.shape[0] // grid.num_tiles
    tiles = tiles.reshape(batch_size, grid.num_tiles, *tiles.shape[1:])
    weights = blend_weights(grid, mode).to(device=tiles.device, dtype=torch.float32)
    output = tiles.new_zeros((batch_size, tiles.shape[2], grid.height, grid.width), dtype=torch.float32)
    size = grid.tile_size
    for index, (top, left) in enumerate(grid.origins()):
        output[:, :, top : top + size, left : left + size] += tiles[:, index].float() * weights[index]
    return output


__all__ = ["BLEND_MODES", "TileGrid", "blend_tiles", "blend_weights", "split_into_tiles", "tile_starts"]
