"""Classical baseline features on fields with known answers."""

import numpy as np
import pytest

from rayscreen.profile.classical import classical_feature_names, classical_features


def discs(shape, centres, radius, value=1.0, background=0.1):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    out = np.full(shape, background, dtype=np.float64)
    for cy, cx in centres:
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = value
    return out


def as_dict(image, channels):
    return dict(zip(classical_feature_names(channels), classical_features(image)))


def test_names_match_values():
    image = np.random.default_rng(0).random((3, 32, 32))
    assert len(classical_features(image)) == len(classical_feature_names(["a", "b", "c"]))


def test_objects_counted_and_measured():
    centres = [(16, 16), (16, 48), (48, 16), (48, 48)]
    dna = discs((64, 64), centres, radius=6)
    f = as_dict(dna[None], ["DNA"])
    assert f["DNA_obj_count"] == 4
    assert f["DNA_obj_density"] == pytest.approx(4 / (64 * 64 / 1e4))
    assert f["DNA_obj_area_mean"] == pytest.approx(np.pi * 36, rel=0.15)
    assert f["DNA_obj_area_std"] == pytest.approx(0.0, abs=1e-9)  # identical discs
    assert f["DNA_obj_eccentricity"] < 0.3  # round
    assert 0.9 < f["DNA_obj_intensity"] <= 1.0  # the smoothed mask takes in a rim of background
    assert f["DNA_fg_fraction"] == pytest.approx(4 * np.pi * 36 / 64 ** 2, rel=0.2)
    assert f["DNA_fg_mean"] == pytest.approx(1.0, abs=0.1) and f["DNA_bg_mean"] == pytest.approx(0.1, abs=0.05)


def test_intensity_statistics_by_hand():
    plane = np.zeros((10, 10))
    plane[:5] = 2.0  # half 0, half 2
    f = as_dict(plane[None], ["c"])
    assert f["c_int_mean"] == pytest.approx(1.0)
    assert f["c_int_std"] == pytest.approx(1.0)
    assert f["c_int_p25"] == 0.0 and f["c_int_p75"] == 2.0
    assert f["c_int_skew"] == pytest.approx(0.0, abs=1e-12)
    assert f["c_int_kurt"] == pytest.approx(-2.0)  # two-point distribution: excess kurtosis -2


def test_texture_separates_stripes_from_flat():
    yy, xx = np.mgrid[0:64, 0:64]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * xx / 4.0)
    flat = np.full((64, 64), 0.5)
    fs = as_dict(stripes[None], ["c"])
    ff = as_dict(flat[None], ["c"])
    assert ff["c_glcm_d1_contrast"] == 0.0 and ff["c_glcm_d1_ASM"] == pytest.approx(1.0)
    assert fs["c_glcm_d1_contrast"] > 10 and fs["c_glcm_d1_ASM"] < 0.5
    assert np.isfinite([v for k, v in ff.items() if "obj" not in k]).all()


def test_channel_correlation():
    rng = np.random.default_rng(1)
    a = rng.random((32, 32))
    f = as_dict(np.stack([a, a, 1 - a]), ["x", "y", "z"])
    assert f["x_y_corr"] == pytest.approx(1.0) and f["x_z_corr"] == pytest.approx(-1.0)


def test_empty_field_object_stats_nan_counts_zero():
    f = as_dict(np.zeros((1, 16, 16)), ["c"])
    assert f["c_obj_count"] == 0 and np.isnan(f["c_obj_area_mean"])


def test_rejects_2d():
    with pytest.raises(ValueError, match="C, Y, X"):
        classical_features(np.zeros((8, 8)))


def test_a_field_of_noise_has_no_objects_and_a_field_with_cells_keeps_them():
    """Otsu splits pure noise in two: the smoothed noise blobs passed as hundreds of nuclei,
    so a well whose cells a toxic compound killed had the highest count on the plate."""
    from scipy import ndimage as ndi

    from rayscreen.profile.classical import classical_feature_names, classical_features

    rng = np.random.default_rng(0)
    names = classical_feature_names(["DNA"])
    noise = rng.normal(100.0, 5.0, (1, 128, 128))
    empty = dict(zip(names, classical_features(noise)))
    assert empty["DNA_obj_count"] == 0 and empty["DNA_fg_fraction"] == 0
    cells = np.zeros((128, 128))
    cells[np.ix_([24, 64, 104], [24, 64, 104])] = 1.0  # 9 nuclei, well apart
    cells = ndi.gaussian_filter(cells, 3.0)
    field = noise + 400 * cells[None] / cells.max()
    full = dict(zip(names, classical_features(field)))
    assert full["DNA_obj_count"] == 9 and full["DNA_fg_fraction"] > 0
