import numpy as np
import pytest

from rayscreen.stream.tiling import random_crop, tile_positions, tiles


def test_positions_cover_the_field_with_the_last_tile_on_the_edge():
    assert tile_positions((32, 40), (16, 16), (16, 16)) == [(0, 0), (0, 16), (0, 24), (16, 0), (16, 16), (16, 24)]
    assert tile_positions((10, 10), (4, 4), (3, 3)) == [(y, x) for y in (0, 3, 6) for x in (0, 3, 6)]


def test_tiles_are_exact_slices_and_cover_every_pixel():
    image = np.arange(2 * 30 * 50).reshape(2, 30, 50)
    stack, positions = tiles(image, (16, 16), (16, 16))
    covered = np.zeros((30, 50), bool)
    for t, (y, x) in zip(stack, positions):
        np.testing.assert_array_equal(t, image[:, y:y + 16, x:x + 16])
        covered[y:y + 16, x:x + 16] = True
    assert covered.all() and stack.shape == (len(positions), 2, 16, 16)
    with pytest.raises(ValueError, match="larger than the field"):
        tiles(image, (64, 16), (64, 16))


def test_random_crop_is_seeded_and_inside():
    image = np.arange(3 * 20 * 20).reshape(3, 20, 20)
    a = random_crop(image, (8, 8), np.random.default_rng(1))
    b = random_crop(image, (8, 8), np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 8, 8) and np.isin(a, image).all()
