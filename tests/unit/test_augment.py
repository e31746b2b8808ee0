import numpy as np
import pytest
import torch

from rayscreen.stream.augment import (AffineParams, AugmentConfig, Augmenter, affine, augment, class_mosaics, mosaic,
                                      random_flips, random_gain, random_noise, random_rot90, sample_affine, sample_angles)


def batch(seed=0, shape=(8, 2, 16, 16)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_flips_and_rot90_are_exact_permutations_with_exact_inverses():
    x = batch()
    for op in (random_flips, random_rot90):
        y = op(x, 3)
        # per image and channel the same multiset of values
        torch.testing.assert_close(y.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values, rtol=0, atol=0)
    # each image is one of its four turns, and turning it back restores it exactly
    y = random_rot90(x, 3)
    turns = []
    for a, b in zip(x, y):
        k = [k for k in range(4) if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b)]
        assert len(k) == 1
        assert torch.equal(torch.rot90(b, -k[0], dims=(-2, -1)), a)
        turns.append(k[0])
    assert len(set(turns)) > 1
    # flips are their own inverses: flipping with the same draw twice is the identity
    torch.testing.assert_close(random_flips(random_flips(x, 5), 5), x, rtol=0, atol=0)
    assert not torch.equal(random_flips(x, 5), x)


def test_rot90_keeps_non_square_batches_rectangular():
    x = batch(shape=(16, 1, 6, 10))
    y = random_rot90(x, 0)
    assert y.shape == x.shape
    for a, b in zip(x, y):  # each image is either unchanged or turned by 180 degrees
        assert torch.equal(a, b) or torch.equal(a.flip(-1).flip(-2), b)


def test_angles_are_drawn_from_the_union_of_both_intervals():
    angles = sample_angles(4000, generator=0).numpy()
    low = (angles >= -20) & (angles <= 20)
    high = (angles >= 160) & (angles <= 200)
    assert (low | high).all()
    assert 0.45 < low.mean() < 0.55  # intervals of equal length, equally likely
    assert angles[low].min() < -19 and angles[low].max() > 19 and angles[high].min() < 161


def test_translation_moves_a_bright_pixel_at_most_40_pixels():
    config = AugmentConfig(flips=False, rot90=False, angles=((0.0, 0.0),), scale=(1.0, 1.0))
    x = torch.zeros(64, 1, 128, 128)
    x[:, 0, 64, 64] = 1.0
    y = augment(x, config, generator=1)
    shifts = []
    for image in y[:, 0]:
        peak = divmod(int(image.argmax()), 128)
        shifts.append((peak[0] - 64, peak[1] - 64))
        assert image.sum() == pytest.approx(1.0, abs=1e-4)  # moved, not lost
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 40 and np.abs(shifts).max() >= 30


def test_affine_matches_exact_transforms():
    x = batch(shape=(1, 1, 20, 30))
    # integer translation: an exact shift (dx right, dy down), zeros coming in
    y = affine(x, AffineParams(torch.tensor([0.0]), torch.tensor([[3.0, -2.0]]), torch.tensor([1.0])))
    torch.testing.assert_close(y[..., :18, 3:], x[..., 2:, :27])
    assert y[..., :, :3].abs().max() < 1e-5 and y[..., 18:, :].abs().max() < 1e-5
    # 180 degrees is both flips; 90 degrees (square) is torch.rot90, i.e. counter-clockwise
    y = affine(x, AffineParams(torch.tensor([180.0]), torch.zeros(1, 2), torch.ones(1)))
    torch.testing.assert_close(y, x.flip(-1).flip(-2), atol=1e-5, rtol=0)
    sq = batch(shape=(1, 2, 16, 16))
    y = affine(sq, AffineParams(torch.tensor([90.0]), torch.zeros(1, 2), torch.ones(1)))
    torch.testing.assert_close(y, torch.rot90(sq, 1, dims=(-2, -1)), atol=1e-5, rtol=0)
    # scale 2 about the centre doubles a point's distance from it (rigid on a non-square image)
    dot = torch.zeros(1, 1, 21, 31)
    dot[0, 0, 10, 19] = 1.0  # 4 pixels right of the centre (10, 15)
    y = affine(dot, AffineParams(torch.tensor([0.0]), torch.zeros(1, 2), torch.tensor([2.0])))
    assert divmod(int(y.argmax()), 31) == (10, 23)
    y = affine(dot, AffineParams(torch.tensor([90.0]), torch.zeros(1, 2), torch.ones(1)))
    assert divmod(int(y.argmax()), 31) == (6, 15)  # now 4 pixels above the centre


def test_augment_is_deterministic_under_a_seed_and_varies_otherwise():
    x = batch()
    torch.testing.assert_close(augment(x, generator=7), augment(x, generator=7), rtol=0, atol=0)
    assert not torch.equal(augment(x, generator=7), augment(x, generator=8))
    a, b = Augmenter(seed=3), Augmenter(seed=3)
    first = a(x)
    torch.testing.assert_close(first, b(x), rtol=0, atol=0)
    assert not torch.equal(first, a(x))  # the generator advances batch to batch
    p = sample_affine(1000, generator=0)
    assert p.scale.min() >= 0.8 and p.scale.max() <= 1.2 and p.translate.abs().max() <= 40
    out = augment(torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8), generator=0)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))


def test_mosaic_layout_is_exact_for_numpy_and_torch():
    images = np.arange(4 * 2 * 3 * 5).reshape(4, 2, 3, 5)
    m = mosaic(images)
    assert m.shape == (2, 6, 10)
    np.testing.assert_array_equal(m[:, :3, :5], images[0])
    np.testing.assert_array_equal(m[:, :3, 5:], images[1])
    np.testing.assert_array_equal(m[:, 3:, :5], images[2])
    np.testing.assert_array_equal(m[:, 3:, 5:], images[3])
    np.testing.assert_array_equal(mosaic(torch.from_numpy(images)).numpy(), m)
    with pytest.raises(ValueError, match="expected 4"):
        mosaic(images[:3])


def test_class_mosaics_take_four_fields_of_one_class():
    # each image is constant, its value = its index; labels: 0 0 0 0 0 1 1 2
    images = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 1, 4, 4).clone()
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    mosaics, out_labels = class_mosaics(images, labels, generator=0)
    assert mosaics.shape == (8, 1, 8, 8) and torch.equal(out_labels, labels)
    for i, m in enumerate(mosaics):
        members = [int(m[0, y, x]) for y in (0, 4) for x in (0, 4)]
        assert i in members and all(labels[j] == labels[i] for j in members)
        if labels[i] == 0:
            assert len(set(members)) == 4  # enough of class 0 to draw without replacement
    assert all(int(v) == 7 for v in mosaics[7].flatten())  # the only one of class 2
    again, _ = class_mosaics(images, labels, generator=0)
    assert torch.equal(again, mosaics)
    small, _ = class_mosaics(images, labels.numpy(), generator=0, out_size=(4, 4))
    assert small.shape == (8, 1, 4, 4)


def test_random_gain_scales_each_channel_of_each_image_by_one_log_normal_factor():
    x = batch(shape=(4000, 2, 4, 4)) + 0.5
    out = random_gain(x, 0.3, generator=0)
    ratio = out / x
    # one factor per (image, channel), the same over all its pixels
    torch.testing.assert_close(ratio, ratio[:, :, :1, :1].expand_as(ratio))
    log_gain = ratio[:, :, 0, 0].log()
    assert abs(float(log_gain.mean())) < 0.02 and abs(float(log_gain.std()) - 0.3) < 0.02
    assert abs(float(np.corrcoef(log_gain[:, 0], log_gain[:, 1])[0, 1])) < 0.1  # channels drawn apart
    # off by default: the geometric draws of a seed are unchanged by the new option
    y = batch()
    torch.testing.assert_close(augment(y, AugmentConfig(intensity=0.0), generator=5), augment(y, generator=5),
                               rtol=0, atol=0)
    plain, gained = augment(y, generator=5), augment(y, AugmentConfig(intensity=0.2), generator=5)
    assert not torch.equal(plain, gained)
    # the gain comes after the geometry: the same pixels, each (image, channel) scaled by one factor
    inside = plain > 0.05
    ratio = torch.where(inside, gained / plain.clamp_min(1e-6), torch.nan)
    per_channel = ratio.flatten(2).nanmedian(-1).values
    torch.testing.assert_close(torch.where(inside, ratio, 0), torch.where(inside, per_channel[..., None, None], 0))
    with pytest.raises(ValueError, match="intensity"):
        AugmentConfig(intensity=-0.1)


def test_random_noise_has_a_per_image_sd_up_to_the_maximum():
    x = torch.zeros(2000, 2, 16, 16)
    out = random_noise(x, 0.1, generator=0)
    sd = out.flatten(1).std(1)
    assert float(sd.max()) <= 0.1 * 1.1 and float(sd.min()) < 0.01  # per image, from [0, max]
    assert abs(float(sd.mean()) - 0.05) < 0.005  # uniform: mean max / 2
    assert abs(float(out.mean())) < 1e-3
    assert torch.equal(random_noise(x, 0.1, generator=0), out)
    y = batch()
    plain = augment(y, AugmentConfig(intensity=0.2), generator=5)
    noisy = augment(y, AugmentConfig(intensity=0.2, noise=0.05), generator=5)
    assert 0 < float((noisy - plain).std()) < 0.05  # the same draws up to the gain, then noise
    with pytest.raises(ValueError, match="noise"):
        AugmentConfig(noise=2.0)
