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


def test_stride_defaults_to_the_tile_and_sizes_may_be_scalars():
    assert tile_positions((32, 40), 16) == tile_positions((32, 40), (16, 16), (16, 16))
    assert tile_positions((16, 16), 16) == [(0, 0)]
    # overlapping tiles: stride 8 over 32 pixels gives starts 0, 8, 16
    assert [y for y, _ in tile_positions((32, 16), (16, 16), (8, 16))] == [0, 8, 16]
    with pytest.raises(ValueError, match="positive"):
        tile_positions((32, 40), (16, 16), (0, 16))


def test_a_stride_larger_than_the_tile_is_rejected_since_pixels_would_be_lost():
    # tile 32 every 48 px over 100 columns would leave columns 32-47 (and 80-83) in no tile
    with pytest.raises(ValueError, match=r"stride \(8, 48\) is larger than the tile \(8, 32\)"):
        tiles(np.zeros((1, 8, 100)), (8, 32), (8, 48))
    with pytest.raises(ValueError, match="larger than the tile"):
        tile_positions((32, 40), 16, (17, 8))
    assert tile_positions((16, 40), 16, 16) == [(0, 0), (0, 16), (0, 24)]  # stride = tile is fine


def test_random_crop_rejects_a_crop_larger_than_the_field():
    with pytest.raises(ValueError, match="larger than the field"):
        random_crop(np.zeros((1, 8, 8)), (9, 4), np.random.default_rng(0))
    crops = {random_crop(np.arange(64).reshape(1, 8, 8), 4, np.random.default_rng(s))[0, 0, 0] for s in range(30)}
    assert len(crops) > 5  # positions vary with the seed


def test_random_crops_of_a_stream_batch_are_keyed_by_row_and_seed():
    from rayscreen.stream.tiling import random_crops

    images = np.arange(4 * 2 * 16 * 20, dtype=np.float32).reshape(4, 2, 16, 20)
    batch = {"image": images, "plate": np.array(["P"] * 4, dtype=object),
             "well": np.array(["A01", "A01", "B02", "B02"], dtype=object), "field": np.array(["0", "1", "0", "1"])}
    out = random_crops(batch, (8, 10), seed=3)
    assert out["image"].shape == (4, 2, 8, 10) and out["well"] is batch["well"]
    for i in range(4):
        y, x = out["crop_y"][i], out["crop_x"][i]
        assert 0 <= y <= 8 and 0 <= x <= 10
        np.testing.assert_array_equal(out["image"][i], images[i, :, y:y + 8, x:x + 10])
    # a row's crop does not depend on the other rows of its block; it changes with the seed
    alone = random_crops({k: v[2:3] for k, v in batch.items()}, (8, 10), seed=3)
    assert (alone["crop_y"][0], alone["crop_x"][0]) == (out["crop_y"][2], out["crop_x"][2])
    positions = {tuple(random_crops(batch, (8, 10), seed=s)["crop_y"]) for s in range(10)}
    assert len(positions) > 3
