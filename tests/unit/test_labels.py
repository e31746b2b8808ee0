"""NGFF label images: the pyramid mapping on arrays, and writing into a plate's fields."""

import os

import numpy as np
import pytest
import zarr

from rayscreen.store import RayscreenError
from rayscreen.store.labels import LabelWriter, label_levels, read_label
from rayscreen.testing import make_plate


def test_label_levels_maps_each_level_pixel_to_the_mask_pixel_of_its_corner():
    mask = np.array([[1, 0, 0], [0, 0, 1]], np.uint8)  # step 4: covers 8 x 12 level-0 pixels
    level0, level1, level2 = label_levels(mask, 4, [(10, 13), (5, 6), (2, 3)], [1, 2, 4])
    expected = np.zeros((10, 13), np.uint8)
    expected[:4, :4] = 1
    expected[4:8, 8:12] = 1  # rows 8-9 and column 12: beyond the mask, 0
    np.testing.assert_array_equal(level0, expected)
    np.testing.assert_array_equal(level1, expected[::2, ::2][:5, :6])
    np.testing.assert_array_equal(level2, [[1, 0, 0], [0, 0, 1]])


def test_label_levels_identity_at_step_one():
    mask = (np.random.default_rng(0).random((7, 9)) > 0.5).astype(np.uint8)
    (out,) = label_levels(mask, 1, [(7, 9)], [1])
    np.testing.assert_array_equal(out, mask)


def _files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = open(os.path.join(d, f), "rb").read()
    return out


def test_rewrite_is_byte_identical_and_other_labels_and_wells_are_kept(tmp_path):
    uri = make_plate(str(tmp_path / "p.zarr"), field_shape=(16, 20))
    writer = LabelWriter(uri)
    mask = np.eye(4, 5, dtype=np.uint8)
    writer.write("A01", 0, mask, "nuclei", downsample=4)
    writer.write("A01", 0, mask, "saliency", downsample=4)
    before = _files(uri)
    writer.write("A01", 0, mask, "saliency", downsample=4)
    assert _files(uri) == before
    listed = zarr.open_group(uri, mode="r")["A/1/0/labels"].attrs.asdict()["ome"]["labels"]
    assert listed == ["nuclei", "saliency"]
    assert not any("/labels/" in k for k in before if not k.startswith("A/1/0/"))
    np.testing.assert_array_equal(read_label(uri, "A01", 0, "saliency"), np.kron(mask, np.ones((4, 4))))


def test_rewrite_of_a_label_removes_the_litter_of_an_interrupted_write(tmp_path):
    """infer.labels writes a well's labels before its done flag: a worker killed inside
    zarr's chunk write (temp file, then rename) leaves "<chunk>.<hex>.partial" in a well
    that the rerun rewrites, and the rewrite replaces the label group whole."""
    uri = make_plate(str(tmp_path / "p.zarr"), field_shape=(16, 20))
    writer = LabelWriter(uri)
    mask = np.eye(4, 5, dtype=np.uint8)
    writer.write("A01", 0, mask, "saliency", downsample=4)
    litter = tmp_path / "p.zarr" / "A" / "1" / "0" / "labels" / "saliency" / "0" / "c" / "0" / f"0.{'ab12' * 8}.partial"
    litter.write_bytes(b"half a chunk")
    writer.write("A01", 0, mask, "saliency", downsample=4)
    assert not litter.exists()
    np.testing.assert_array_equal(read_label(uri, "A01", 0, "saliency"), np.kron(mask, np.ones((4, 4))))


def test_bad_label_input_names_plate_well_and_field(tmp_path):
    uri = make_plate(str(tmp_path / "p.zarr"), field_shape=(16, 20))
    writer = LabelWriter(uri)
    with pytest.raises(RayscreenError, match=r"plate 'P1' well A02 field 1: mask shape \(3, 3\); expected \(4, 5\)"):
        writer.write("A02", 1, np.zeros((3, 3), np.uint8), "saliency", downsample=4)
    with pytest.raises(RayscreenError, match="label name 'a/b'"):
        writer.write("A02", 1, np.zeros((4, 5), np.uint8), "a/b", downsample=4)
    with pytest.raises(RayscreenError, match="plate 'P1' well A02 field 0: no label image 'saliency'"):
        read_label(uri, "A02", 0, "saliency")
    assert "labels" not in zarr.open_group(uri, mode="r")["A/2/1"]  # nothing written by the failed calls


def test_write_fields_of_a_well_equals_one_by_one_and_checks_all_first(tmp_path):
    a = make_plate(str(tmp_path / "a.zarr"), field_shape=(16, 20), fields=3)
    b = make_plate(str(tmp_path / "b.zarr"), field_shape=(16, 20), fields=3)
    masks = (np.random.default_rng(1).random((3, 4, 5)) > 0.5).astype(np.uint8)
    LabelWriter(a).write_fields("B02", [0, 1, 2], masks, "saliency", downsample=4)
    for f in range(3):
        LabelWriter(b).write("B02", f, masks[f], "saliency", downsample=4)
    assert _files(a) == _files(b)
    for f in range(3):
        np.testing.assert_array_equal(read_label(a, "B02", f, "saliency"), np.kron(masks[f], np.ones((4, 4))))
    with pytest.raises(RayscreenError, match="well B02: 2 fields but 3 masks"):
        LabelWriter(a).write_fields("B02", [0, 1], masks, "saliency", downsample=4)
    # one bad mask: refused before any field of the call is written
    with pytest.raises(RayscreenError, match="well A01 field 2: mask shape"):
        LabelWriter(a).write_fields("A01", [0, 1, 2], [masks[0], masks[1], masks[2, :3]], "saliency", downsample=4)
    assert not any("A/1/" in k and "/labels" in k for k in _files(a))


def test_a_mask_of_ceil_size_covers_the_remainder_of_an_odd_sized_field(tmp_path):
    uri = make_plate(str(tmp_path / "p.zarr"), field_shape=(18, 21))
    mask = np.zeros((5, 6), np.uint8)  # ceil(18 / 4) x ceil(21 / 4), as infer's saliency tiles
    mask[4, 5] = 1  # the block over rows 16-17, columns 20
    LabelWriter(uri).write("A01", 0, mask, "saliency", downsample=4)
    label = read_label(uri, "A01", 0, "saliency")
    assert label.shape == (18, 21) and label[16:, 20:].all() and label.sum() == 2
    with pytest.raises(RayscreenError, match=r"mask shape \(4, 5\); expected \(5, 6\)"):
        LabelWriter(uri).write("A01", 0, mask[:4, :5], "saliency", downsample=4)
