"""metrics.agreement (float PSNR, max difference, id agreement) and metrics.seams (gradient energy on tile borders),
with TileGrid.borders, the border positions they are scored at."""

import math

import pytest
import torch

from flowmo_diffusers.metrics.agreement import id_agreement, output_agreement
from flowmo_diffusers.metrics.seams import seam_ratio
from flowmo_diffusers.models.tiling import TileGrid


def test_output_agreement_against_hand_computed_values():
    reference = torch.zeros(2, 3, 4, 4)
    other = reference.clone()
    other[0] += 0.02  # mse 4e-4 on image 0 -> 10 log10(4 / 4e-4) = 40 dB; image 1 identical -> capped at 200
    result = output_agreement(reference, other)
    assert result["psnr_db"] == pytest.approx((40.0 + 200.0) / 2)
    assert result["max_abs_diff"] == pytest.approx(0.02) and result["nonfinite"] == 0
    other[1, 0, 0, 0] = float("nan")
    broken = output_agreement(reference, other)
    assert broken["nonfinite"] == 1 and math.isnan(broken["psnr_db"])
    assert output_agreement(reference, reference + 0.02, data_range=1.0)["psnr_db"] == pytest.approx(10 * math.log10(1 / 4e-4))


def test_id_agreement_and_refusals():
    ids = torch.arange(10)[None]
    other = ids.clone()
    other[0, :3] = 99
    assert id_agreement(ids, other) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="one shape"):
        id_agreement(ids, ids[:, :5])
    with pytest.raises(ValueError, match="integer"):
        id_agreement(ids.float(), ids.float())
    with pytest.raises(ValueError, match="one shape"):
        output_agreement(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_tile_grid_borders():
    # 70 wide, 32 tiles, overlap 8: starts 0, 24, 38 (edge-aligned) -> edges 24, 32, 38, 56 inside the image.
    grid = TileGrid(32, 70, tile_size=32, overlap=8)
    assert grid.borders() == ([], [24, 32, 38, 56])
    assert TileGrid(64, 96, tile_size=32, overlap=0).borders() == ([32], [32, 64])


def test_seam_ratio_finds_steps_on_the_borders():
    generator = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 64).repeat(64, 1)[None, None].expand(1, 3, 64, 64).clone()
    textured = smooth + 0.01 * torch.randn(1, 3, 64, 64, generator=generator)
    assert seam_ratio(textured, [32], [32]) == pytest.approx(1.0, abs=0.3)
    seamed = textured.clone()
    seamed[..., 32:] += 0.2  # a step between columns 31 and 32
    seamed[..., 32:, :] += 0.2
    assert seam_ratio(seamed, [32], [32]) > 50 * seam_ratio(textured, [32], [32])
    # The step is invisible at other borders.
    assert seam_ratio(seamed, [16], [16]) < 2
    assert seam_ratio(seamed, [], [32]) > 50  # one axis only


@pytest.mark.parametrize("rows,cols,match", [([0], [], "row_borders"), ([], [64], "col_borders"), ([], [], "empty")])
def test_seam_ratio_refuses_bad_borders(rows, cols, match):
    with pytest.raises(ValueError, match=match):
        seam_ratio(torch.rand(1, 3, 64, 64), rows, cols)
    with pytest.raises(ValueError, match="no gradient energy"):
        seam_ratio(torch.ones(1, 3, 8, 8), [4], [4])
