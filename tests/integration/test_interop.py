"""Interop both ways with ome-zarr-py, and schema validation with ome-zarr-models."""

import numpy as np
import pytest
import zarr

from rayscreen.store import open_plate
from rayscreen.testing import make_plate, random_field

ome_zarr = pytest.importorskip("ome_zarr")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Reader  # noqa: E402
from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata  # noqa: E402

pytestmark = pytest.mark.integration


def _write_with_ome_zarr(path, fmt):
    """A 2-row plate, 2 fields per well, axes czyx, written by ome-zarr-py."""
    rng = np.random.default_rng(7)
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    rows, cols = ["A", "B"], ["1", "2", "3"]
    wells = ["A/1", "A/3", "B/2"]
    write_plate_metadata(root, rows, cols, wells, fmt=fmt, field_count=2, name="ozp")
    truth = {}
    for wpath in wells:
        row, col = wpath.split("/")
        well = root.require_group(row).require_group(col)
        write_well_metadata(well, [{"path": "0"}, {"path": "1"}], fmt=fmt)
        for f in ("0", "1"):
            data = rng.integers(0, 60000, (3, 1, 64, 48), dtype=np.uint16)  # c, z, y, x
            write_image(data, well.require_group(f), axes="czyx", fmt=fmt, scale_factors=[2])
            truth[(f"{row}0{col}", f)] = data
    return truth


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=["0.4", "0.5"])
def test_ome_zarr_py_plates_read_pixel_exactly(tmp_path, fmt):
    truth = _write_with_ome_zarr(tmp_path / "ozp.zarr", fmt)
    plate = open_plate(str(tmp_path / "ozp.zarr"))
    assert plate.ngff_version == fmt.version and plate.name == "ozp"
    assert plate.wells == ["A01", "A03", "B02"] and plate.levels == 2
    assert plate.shape == (3, 64, 48) and plate.axes == "czyx"
    for (well, field), data in truth.items():
        np.testing.assert_array_equal(plate.read(well, field), data[:, 0])
        # level 1 is the array ome-zarr-py wrote and reads back, pixel for pixel (its own
        # downsampling, not a decimation of level 0: checked below so the comparison has teeth)
        image_node = list(Reader(parse_url(str(tmp_path / "ozp.zarr" / plate.well_path(well) / field)))())[0]
        theirs = np.asarray(image_node.data[1])
        assert theirs.shape == (3, 1, 32, 24)
        assert not np.array_equal(theirs[:, 0], data[:, 0, ::2, ::2])
        level1 = plate.read(well, field, level=1)
        assert level1.dtype == np.uint16
        np.testing.assert_array_equal(level1, theirs[:, 0])


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=["0.4", "0.5"])
def test_a_blank_channel_that_ome_zarr_py_left_unwritten_reads_as_zeros(tmp_path, fmt):
    """zarr 3 skips chunks that are all fill value: a blank channel of another tool's plate has
    no chunk on disk. That is data (zeros), not a lost write as in a plate rayscreen wrote."""
    import os

    from rayscreen.store import MissingChunkError

    path = tmp_path / "ozp.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["A"], ["1"], ["A/1"], fmt=fmt, name="ozp")
    well = root.require_group("A").require_group("1")
    write_well_metadata(well, [{"path": "0"}], fmt=fmt)
    data = np.zeros((2, 64, 48), np.uint16)
    data[0] = 7  # channel 1 blank
    write_image(data, well.require_group("0"), axes="cyx", fmt=fmt, scale_factors=[],
                storage_options={"chunks": (1, 64, 48)})
    chunks = [f for _, _, files in os.walk(path / "A" / "1" / "0") for f in files if not f.startswith((".", "zarr"))]
    assert len(chunks) == 1  # the blank channel's chunk was never written
    np.testing.assert_array_equal(open_plate(str(path)).read("A01", 0), data)
    # rayscreen's illum stores its attributes in the plate: it stays another tool's plate
    from rayscreen.stream.fit import compute_illumination, fit_normalization

    compute_illumination(str(path), use_ray=False, progress=False)
    fit_normalization(str(path), "percentile", use_ray=False, progress=False)
    np.testing.assert_array_equal(open_plate(str(path)).read("A01", 0), data)
    with pytest.raises(MissingChunkError, match="plate 'ozp' well A01 field 0"):
        open_plate(str(path), strict=True).read("A01", 0)  # forced strict, as for rayscreen's plates


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_our_plates_read_in_ome_zarr_py(tmp_path, ngff):
    uri = make_plate(str(tmp_path / "ours.zarr"), ngff=ngff, levels=2)
    plate_node = list(Reader(parse_url(uri))())[0]
    assert [type(s).__name__ for s in plate_node.specs] == ["Plate"]
    # ome-zarr-py stitches the first field of every well into one plate-sized image
    # (8 x 12 wells of 32 x 40 pixels); well A01 is the top-left tile
    stitched = np.asarray(plate_node.data[0])
    assert stitched.shape == (2, 8 * 32, 12 * 40)
    np.testing.assert_array_equal(stitched[:, :32, :40], random_field(0, "A01", 0, (2, 32, 40)))
    np.testing.assert_array_equal(stitched[:, 32:64, 40:80], random_field(0, "B02", 0, (2, 32, 40)))
    well_reader = Reader(parse_url(f"{uri}/B/1/1"))
    image = list(well_reader())[0]
    np.testing.assert_array_equal(np.asarray(image.data[0]), random_field(0, "B01", 1, (2, 32, 40)))
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["channel_names"] == ["DNA", "Actin"]
    assert len(image.data) == 2


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_our_plates_validate_against_ngff_schemas(tmp_path, ngff):
    pytest.importorskip("ome_zarr_models")
    from ome_zarr_models import v04, v05

    uri = make_plate(str(tmp_path / "ours.zarr"), ngff=ngff)
    group = zarr.open_group(uri, mode="r")
    # from_zarr validates the plate, every well and every image against the NGFF models
    hcs = (v05 if ngff == "0.5" else v04).HCS.from_zarr(group)
    assert hcs.n_wells == 4
    assert len(list(hcs.well_groups)) == 4


def _label_nodes(image_uri):
    """{label name: ome-zarr-py node} of the label images ome-zarr-py finds under an image."""
    return {n.metadata.get("name"): n for n in Reader(parse_url(image_uri))()
            if "Label" in [type(s).__name__ for s in n.specs]}


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_label_images_read_in_ome_zarr_py_and_validate(tmp_path, ngff):
    pytest.importorskip("ome_zarr_models")
    from ome_zarr_models import v04, v05

    from rayscreen.store.labels import LabelWriter

    uri = make_plate(str(tmp_path / "ours.zarr"), ngff=ngff, levels=2)  # fields 32 x 40
    mask = np.zeros((8, 10), np.uint8)
    mask[2:4, 3:5] = 1
    LabelWriter(uri).write("B01", 1, mask, "saliency", downsample=4, description="test mask")
    labels = _label_nodes(f"{uri}/B/1/1")
    assert list(labels) == ["saliency"]
    level0, level1 = (np.asarray(d) for d in labels["saliency"].data)
    expected = np.kron(mask, np.ones((4, 4), np.uint8))
    np.testing.assert_array_equal(level0, expected)
    np.testing.assert_array_equal(level1, expected[::2, ::2])
    # the plate, its images and the label group all still validate; the pixels are untouched
    models = v05 if ngff == "0.5" else v04
    group = zarr.open_group(uri, mode="r")
    assert models.HCS.from_zarr(group).n_wells == 4
    listed = models.Labels.from_zarr(group["B/1/1/labels"]).attributes
    assert (listed.ome.labels if ngff == "0.5" else listed.labels) == ["saliency"]
    np.testing.assert_array_equal(open_plate(uri).read("B01", 1), random_field(0, "B01", 1, (2, 32, 40)))


@pytest.mark.parametrize("fmt", [FormatV04(), FormatV05()], ids=["0.4", "0.5"])
def test_label_images_into_an_ome_zarr_py_plate(tmp_path, fmt):
    """A foreign plate (czyx, 2x pyramid): the label has axes zyx with z of size 1, the image's scales."""
    from rayscreen.store.labels import LabelWriter, read_label

    _write_with_ome_zarr(tmp_path / "ozp.zarr", fmt)
    uri = str(tmp_path / "ozp.zarr")
    mask = np.zeros((16, 12), np.uint8)  # level 1 (32 x 24) downsampled 2x
    mask[5, 7] = 1
    LabelWriter(uri).write("A03", "1", mask, "cells", level=1, downsample=2)
    node = _label_nodes(f"{uri}/A/3/1")["cells"]
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    level0 = np.asarray(node.data[0])
    assert level0.shape == (1, 64, 48)
    # one mask pixel = 2 level-1 pixels = 4 level-0 pixels
    assert level0.sum() == 16 and level0[0, 20:24, 28:32].all()
    np.testing.assert_array_equal(read_label(uri, "A03", "1", "cells", level=1), np.kron(mask, np.ones((2, 2))))
