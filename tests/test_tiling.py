import numpy as np
import pytest

from semibench.data.tiling import Tile, parse_tile_id, reassemble, tile_grid, tile_id


@pytest.mark.parametrize("h,w,t", [(1000, 1000, 250), (10, 7, 4), (5, 5, 5), (3, 9, 10)])
def test_tiles_cover_each_pixel_exactly_once(h, w, t):
    grid = tile_grid(h, w, t)
    cover = np.zeros((h, w), dtype=int)
    for tile in grid:
        assert 1 <= tile.height <= t and 1 <= tile.width <= t
        tile.cut(cover)[...] += 1
    assert (cover == 1).all()
    assert len(grid) == -(-h // t) * -(-w // t)


def test_monuseg_grid_is_16_tiles_of_250_row_major():
    grid = tile_grid(1000, 1000, 250)
    assert len(grid) == 16
    assert {(g.height, g.width) for g in grid} == {(250, 250)}
    assert [(g.row, g.col) for g in grid[:5]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    assert (grid[6].top, grid[6].left) == (250, 500)


def test_uneven_grid_has_smaller_last_tiles():
    grid = tile_grid(10, 7, 4)
    assert [(g.top, g.left, g.height, g.width) for g in grid if g.row == 2] == [(8, 0, 2, 4), (8, 4, 2, 3)]


@pytest.mark.parametrize("shape", [(12, 9), (12, 9, 3)])
def test_tiles_reassemble_to_the_image(shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    grid = tile_grid(shape[0], shape[1], 5)
    pieces = [(t, t.cut(image).copy()) for t in grid]
    assert np.array_equal(reassemble(pieces, shape[0], shape[1]), image)


def test_reassemble_rejects_missing_or_duplicate_tiles():
    image = np.arange(16).reshape(4, 4)
    pieces = [(t, t.cut(image)) for t in tile_grid(4, 4, 2)]
    with pytest.raises(ValueError, match="exactly once"):
        reassemble(pieces[:-1], 4, 4)
    with pytest.raises(ValueError, match="exactly once"):
        reassemble(pieces + pieces[:1], 4, 4)
    with pytest.raises(ValueError, match="does not match|!="):
        reassemble([(Tile(0, 0, 0, 0, 2, 2), np.zeros((3, 2)))], 4, 4)


def test_tile_ids_round_trip_even_with_underscores_in_the_image_id():
    assert tile_id("TCGA-2Z-A9J9-01A-01-TS1", 3, 1) == "TCGA-2Z-A9J9-01A-01-TS1_r3_c1"
    assert parse_tile_id("a_r1_c2_r0_c3") == ("a_r1_c2", 0, 3)
    with pytest.raises(ValueError):
        parse_tile_id("no-tile-here")
