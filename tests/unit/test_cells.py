"""Nuclei and single-cell crops: on fields drawn by hand, where the answer is known."""

import numpy as np
import pytest
import torch

from rayscreen.stream.cells import crops_at, nucleus_centres, otsu_mask
from rayscreen.train.step import nucleus_crops

NUCLEI = [(20, 30), (70, 90), (100, 20)]


def field(shape=(128, 128), nuclei=NUCLEI, radius=6, speck=(5, 120)):
    """(Y, X) float32 DNA plane: bright disks on a dim noisy background, and a one-pixel speck."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    plane = np.random.default_rng(0).normal(0.1, 0.01, shape)
    for y, x in nuclei:
        plane[(yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2] = 1.0
    if speck:
        plane[speck] = 1.0  # debris: smaller than min_area
    return plane.astype(np.float32)


def test_nucleus_centres_finds_each_disk_and_ignores_debris():
    centres = nucleus_centres(field())
    assert sorted(map(tuple, centres.tolist())) == sorted(NUCLEI)


def test_a_flat_or_empty_field_has_no_nuclei():
    assert nucleus_centres(np.zeros((32, 32), np.float32)).shape == (0, 2)
    assert not otsu_mask(np.ones((8, 8), np.float32)).any()


def test_crops_at_centres_each_crop_and_reflects_at_the_border():
    image = np.stack([field(), 2 * field()])
    crops = crops_at(image, np.array([[20, 30], [0, 0]]), 16)
    assert crops.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(crops[0], image[:, 12:28, 22:38])  # centre pixel at (8, 8)
    np.testing.assert_array_equal(crops[1, :, 8:, 8:], image[:, :8, :8])  # the field's corner, reflected around


def test_nucleus_crops_centre_a_nucleus_and_repeat_with_the_seed():
    images = torch.from_numpy(np.stack([np.stack([field(nuclei=[n]), np.zeros((128, 128), np.float32)])
                                        for n in NUCLEI]))
    images = torch.roll(images, shifts=1, dims=1)  # DNA is channel 1 here
    crops = nucleus_crops(images, 16, torch.Generator().manual_seed(0), channel=1, jitter=4)
    assert crops.shape == (3, 2, 16, 16)
    # a 6 px disk moved by at most 4 px still covers the crop's centre
    assert bool((crops[:, 1, 8, 8] == 1.0).all())
    again = nucleus_crops(images, 16, torch.Generator().manual_seed(0), channel=1, jitter=4)
    assert torch.equal(crops, again)


def test_a_field_without_nuclei_gets_a_random_crop_inside_it():
    images = torch.zeros((2, 1, 40, 50))
    crops = nucleus_crops(images, 32, torch.Generator().manual_seed(1))
    assert crops.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="train.crop 64 is larger than the fields"):
        nucleus_crops(images, 64, torch.Generator())
