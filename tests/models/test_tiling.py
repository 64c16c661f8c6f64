"""Tiled encode and decode: the tile layout, the blend weights, split + blend, and the model and pipeline glue."""

import pytest
import torch

from flowmo_diffusers.models.tiling import TileGrid, blend_tiles, blend_weights, split_into_tiles, tile_starts

from testing_utils import tiny_flowmo_model, tiny_flowmo_pipeline


@pytest.mark.parametrize("length,tile,overlap", [(32, 32, 8), (45, 32, 8), (70, 32, 8), (64, 32, 0), (100, 32, 16)])
def test_tile_starts_cover_the_side_exactly(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    # Regular stride except for the edge-aligned last tile, which overlaps at least `overlap`.
    assert all(b - a == tile - overlap for a, b in zip(starts[:-2], starts[1:-1]))
    assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("mode", ["linear", "cosine"])
@pytest.mark.parametrize("size", [(32, 32), (45, 70), (100, 37)])
def test_blend_weights_sum_to_one(mode, size):
    grid = TileGrid(*size, tile_size=32, overlap=8)
    weights = blend_weights(grid, mode)
    assert weights.shape == (grid.num_tiles, 32, 32) and (weights > 0).all()
    total = torch.zeros(size, dtype=torch.float64)
    for weight, (top, left) in zip(weights, grid.origins()):
        total[top : top + 32, left : left + 32] += weight
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["linear", "cosine"])
def test_split_then_blend_returns_the_image(mode):
    images = torch.rand(2, 3, 45, 70, generator=torch.Generator().manual_seed(0))
    grid = TileGrid(45, 70, tile_size=32, overlap=8)
    tiles = split_into_tiles(images, grid)
    assert tiles.shape == (2 * grid.num_tiles, 3, 32, 32) and grid.grid == (2, 3)
    # Tile t of image b is the crop at origins()[t].
    top, left = grid.origins()[4]
    torch.testing.assert_close(tiles[grid.num_tiles + 4], images[1, :, top : top + 32, left : left + 32], rtol=0, atol=0)
    torch.testing.assert_close(blend_tiles(tiles, grid, mode), images, rtol=0, atol=1e-6)


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="at least one tile"):
        TileGrid(31, 64, tile_size=32, overlap=8)
    with pytest.raises(ValueError, match="tile overlap"):
        TileGrid(64, 64, tile_size=32, overlap=32)
    with pytest.raises(ValueError, match="blend mode"):
        blend_weights(TileGrid(64, 64, 32, 8), "gaussian")


def test_enable_tiling_checks_its_arguments():
    model = tiny_flowmo_model()
    for kwargs, name in [(dict(tile_sample_min_size=30), "tile_sample_min_size"), (dict(tile_overlap_factor=0.7),
                         "tile_overlap_factor"), (dict(tile_batch_size=0), "tile_batch_size"),
                         (dict(blend_mode="box"), "blend_mode")]:
        with pytest.raises(ValueError, match=name):
            model.enable_tiling(**kwargs)
    assert not model.use_tiling


def test_tiled_model_round_trip_of_a_non_square_image():
    model = tiny_flowmo_model().eval()
    model.enable_tiling(tile_batch_size=4)
    images = torch.rand(2, 3, 45, 70, generator=torch.Generator().manual_seed(1)) * 2 - 1
    encoded = model.encode(images)
    grid = encoded.tile_grid
    assert grid.grid == (2, 3) and grid.image_size == (45, 70)
    assert encoded.indices.shape == (2, 6, model.num_indices)
    assert encoded.code.shape == (2, 6, model.config.code_length, model.config.context_dim)
    # Each tile's ids are the untiled encoding of that crop.
    model.disable_tiling()
    top, left = grid.origins()[5]
    crop_ids = model.encode(images[:, :, top : top + 32, left : left + 32]).indices
    torch.testing.assert_close(encoded.indices[:, 5], crop_ids, rtol=0, atol=0)
    model.enable_tiling()
    noise = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(2))
    from_ids = model.decode(encoded.indices, num_inference_steps=2, latents=noise).sample
    from_code = model.decode(encoded.code, num_inference_steps=2, height=45, width=70,
                             generator=torch.Generator().manual_seed(2)).sample
    assert from_ids.shape == (2, 3, 45, 70)
    torch.testing.assert_close(from_ids, from_code)  # the drawn noise is one image, as passed
    with pytest.raises(ValueError, match="height and width the image was encoded at"):
        model.decode(encoded.indices, num_inference_steps=2)  # default size: a 1x1 grid
    with pytest.raises(ValueError, match="at least one tile"):
        model.encode(images[:, :, :31])
    with pytest.raises(ValueError, match="return_quantizer_losses"):
        model.encode(images, return_quantizer_losses=True)


def test_pipeline_tiling_and_named_errors():
    pipe = tiny_flowmo_pipeline()
    images = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="patch_size"):
        pipe(images=torch.rand(1, 3, 45, 70), num_inference_steps=1)  # tiling off: a size the model cannot take
    pipe.enable_tiling(tile_overlap_factor=0.5, blend_mode="cosine")
    ids = pipe.encode(images)
    assert ids.shape == (1, pipe.autoencoder.tile_grid(40, 72).num_tiles, pipe.autoencoder.num_indices)
    decoded = pipe(indices=ids, height=40, width=72, num_inference_steps=2, output_type="pt").images
    reconstructed = pipe(images=images, num_inference_steps=2, output_type="np").images
    assert decoded.shape == (1, 3, 40, 72) and reconstructed.shape == (1, 40, 72, 3)
    with pytest.raises(ValueError, match="at least one tile"):
        pipe.encode(torch.rand(1, 3, 24, 64))
    with pytest.raises(ValueError, match="callback"):
        pipe(indices=ids, height=40, width=72, num_inference_steps=2, callback_on_step_end=lambda p, i, t, kw: kw)
    pipe.disable_tiling()
    assert pipe.encode(torch.rand(1, 3, 32, 32)).shape == (1, pipe.autoencoder.num_indices)
