"""Malformed foreign NGFF metadata: each error is a RayscreenError naming the plate, well or
field, the metadata key, what was expected and what was found (not a bare KeyError/TypeError)."""

import copy
import re

import numpy as np
import pytest
import zarr

from rayscreen.store import RayscreenError, open_plate
from rayscreen.store.ngff import Multiscale, PlateMeta, WellMeta

PLATE = {"version": "0.4", "name": "bad", "rows": [{"name": "A"}], "columns": [{"name": "1"}],
         "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}]}
WELL = {"version": "0.4", "images": [{"path": "0"}]}


def multiscales(axes="yx", datasets=None):
    return [{"version": "0.4", "axes": [{"name": a} for a in axes], "datasets": datasets or [{"path": "0"}]}]


def write_plate(path, plate=PLATE, well=WELL, ms=None, data=None):
    """A Zarr v2 / NGFF 0.4 plate of one well A/1 with one field, metadata as given."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["plate"] = plate
    w = root.create_group("A/1")
    w.attrs["well"] = well
    img = w.create_group("0")
    img.attrs["multiscales"] = ms or multiscales()
    img.create_array("0", data=np.ones((4, 4), np.uint16) if data is None else data)
    return str(path)


def plate_with(**changes):
    plate = copy.deepcopy(PLATE)
    plate.update(changes)
    return {"plate": plate}


# -- plate metadata: names the plate URI and the key

@pytest.mark.parametrize("changes, message", [
    ({"wells": [{"path": "A1", "rowIndex": 0, "columnIndex": 0}]},
     r"plate\.wells\[0\]\.path is 'A1'; expected '<row>/<column>'"),
    ({"wells": [{"path": "A/1/0", "rowIndex": 0, "columnIndex": 0}]}, r"plate\.wells\[0\]\.path is 'A/1/0'"),
    ({"columns": [{"name": "x1"}], "wells": [{"path": "A/x1", "rowIndex": 0, "columnIndex": 0}]},
     r"plate\.wells\[0\]\.path is 'A/x1'; expected .*column number"),
    ({"rows": [{"nom": "A"}]}, r"plate\.rows\[0\] metadata has no 'name' \(found keys \['nom'\]\)"),
    ({"rows": ["A"]}, r"plate\.rows\[0\] metadata should be an object with a 'name'; found a string 'A'"),
    ({"columns": [{"name": None}]}, r"plate\.columns\[0\]\.name should be a string; found null"),
    ({"rows": None}, r"plate\.rows should be a list; found null"),
    ({"wells": {"path": "A/1"}}, r"plate\.wells should be a list; found an object"),
    ({"wells": ["A/1"]}, r"plate\.wells\[0\] metadata should be an object with a 'path'; found a string"),
    ({"wells": [{"rowIndex": 0, "columnIndex": 0}]}, r"plate\.wells\[0\] metadata has no 'path'"),
    ({"wells": [{"path": "A/1", "rowIndex": "first", "columnIndex": 0}]},
     r"plate\.wells\[0\]\.rowIndex should be a non-negative integer; found a string 'first'"),
    ({"wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": -1}]},
     r"plate\.wells\[0\]\.columnIndex should be a non-negative integer; found a number -1"),
    ({"wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}, {"path": "A/01", "rowIndex": 0, "columnIndex": 0}]},
     r"plate\.wells\[1\]\.path 'A/01' and the well path 'A/1' before it both name well A01"),
    ({"acquisitions": [{"name": "before"}]}, r"plate\.acquisitions\[0\] metadata has no 'id'"),
    ({"acquisitions": [{"id": "one"}]}, r"plate\.acquisitions\[0\]\.id should be a non-negative integer"),
    ({"acquisitions": {"id": 1}}, r"plate\.acquisitions should be a list; found an object"),
])
def test_malformed_plate_metadata_names_plate_and_key(changes, message):
    with pytest.raises(RayscreenError, match=r"^/data/bad\.zarr: " + message):
        PlateMeta.from_attrs(plate_with(**changes), where="/data/bad.zarr")


def test_plate_metadata_not_an_object():
    with pytest.raises(RayscreenError, match=r"/data/bad\.zarr: the 'plate' metadata should be an object; found a list"):
        PlateMeta.from_attrs({"plate": [PLATE]}, where="/data/bad.zarr")


def test_well_path_without_slash_on_disk_names_the_plate(tmp_path):
    """The reviewer's case through open_plate: was ValueError: not enough values to unpack."""
    plate = dict(PLATE, wells=[{"path": "A1", "rowIndex": 0, "columnIndex": 0}])
    uri = write_plate(tmp_path / "bad.zarr", plate=plate)
    with pytest.raises(RayscreenError, match=re.escape(uri) + r": plate\.wells\[0\]\.path is 'A1'"):
        open_plate(uri)


# -- well paths without rowIndex/columnIndex: matched to the plate's row/column names

def test_unpadded_path_matches_a_padded_column_name(tmp_path):
    """NGFF makes the path '<row name>/<column name>'; some writers pad one and not the other.
    Path 'A/1' under columns ['01'] (no indices) is the one column numbered 1."""
    plate = dict(PLATE, columns=[{"name": "01"}], wells=[{"path": "A/1"}])
    uri = write_plate(tmp_path / "p.zarr", plate=plate)
    opened = open_plate(uri)
    assert opened.wells == ["A01"] and opened.meta.wells[0].column_index == 0
    assert opened.read("A01", 0).shape == (1, 4, 4)


def test_path_names_matched_by_number_and_case():
    meta = PlateMeta.from_attrs(plate_with(rows=[{"name": "A"}, {"name": "B"}],
                                           columns=[{"name": "01"}, {"name": "02"}, {"name": "10"}],
                                           wells=[{"path": "b/2"}, {"path": "A/10"}, {"path": "A/01"}]), where="p")
    assert [(w.row_index, w.column_index) for w in meta.wells] == [(1, 1), (0, 2), (0, 0)]
    assert meta.well_names() == {"B02": "b/2", "A10": "A/10", "A01": "A/01"}


@pytest.mark.parametrize("columns, path, found", [
    (["01"], "A/2", r"it lists 1: \['01'\]"),
    (["1", "01"], "A/001", r"it lists 2 that match it: \['1', '01'\]"),
])
def test_unmatched_or_ambiguous_column_is_an_error(columns, path, found):
    changes = {"columns": [{"name": c} for c in columns], "wells": [{"path": path}]}
    with pytest.raises(RayscreenError, match=rf"^/data/p\.zarr: plate\.wells\[0\]\.path '{path}' names column "
                                             rf"'{path[2:]}' and gives no columnIndex.*{found}"):
        PlateMeta.from_attrs(plate_with(**changes), where="/data/p.zarr")


def test_unmatched_row_is_an_error():
    with pytest.raises(RayscreenError, match=r"plate\.wells\[0\]\.path 'C/1' names row 'C' and gives no rowIndex"):
        PlateMeta.from_attrs(plate_with(wells=[{"path": "C/1", "columnIndex": 0}]), where="p")


# -- well metadata: names the well's URI

@pytest.mark.parametrize("well, message", [
    ({"version": "0.4", "images": None}, r"well\.images should be a list; found null"),
    ({"version": "0.4", "images": "0"}, r"well\.images should be a list; found a string '0'"),
    ({"version": "0.4", "images": [{"acquisition": 0}]}, r"well\.images\[0\] metadata has no 'path'"),
    ({"version": "0.4", "images": ["0"]}, r"well\.images\[0\] metadata should be an object with a 'path'"),
    ({"version": "0.4", "images": [{"path": "0"}, {"path": "../../B/1/0"}]},
     r"well\.images\[1\]\.path is '\.\./\.\./B/1/0'; expected the name of one image group inside the well"),
    ({"version": "0.4", "images": [{"path": "0/0"}]}, r"well\.images\[0\]\.path is '0/0'; expected .*no '/'"),
    ({"version": "0.4", "images": [{"path": ".."}]}, r"well\.images\[0\]\.path is '\.\.'; expected"),
    ({"version": "0.4", "images": [{"path": "."}]}, r"well\.images\[0\]\.path is '\.'; expected"),
    ({"version": "0.4", "images": [{"path": ""}]}, r"well\.images\[0\]\.path is ''; expected .*not empty"),
])
def test_malformed_well_metadata_names_the_well(well, message):
    with pytest.raises(RayscreenError, match=r"^/data/p\.zarr/A/1: " + message):
        WellMeta.from_attrs({"well": well}, where="/data/p.zarr/A/1")


def test_well_images_not_a_list_on_disk(tmp_path):
    """The reviewer's case: was TypeError: 'NoneType' object is not iterable."""
    uri = write_plate(tmp_path / "bad.zarr", well={"version": "0.4", "images": None})
    plate = open_plate(uri)
    with pytest.raises(RayscreenError, match=re.escape(f"{uri}/A/1") + r": well\.images should be a list; found null"):
        plate.fields("A01")


def test_well_image_path_leaving_the_well_on_disk(tmp_path):
    """A foreign well listing '../../B/1/0': was a bare zarr ValueError from the read (not a
    RayscreenError, so `rayscreen info` showed a traceback and on_error: skip let it through)."""
    uri = write_plate(tmp_path / "bad.zarr", well={"version": "0.4", "images": [{"path": "../../B/1/0"}]})
    plate = open_plate(uri)
    with pytest.raises(RayscreenError, match=re.escape(f"{uri}/A/1: well.images[0].path is '../../B/1/0'")):
        plate.fields("A01")


def test_integer_and_named_image_paths_are_single_segments():
    meta = WellMeta.from_attrs({"well": {"images": [{"path": 0}, {"path": "field_1"}, {"path": "a.b"}]}}, where="w")
    assert [i.path for i in meta.images] == ["0", "field_1", "a.b"]


# -- image (field) metadata: names the field's URI

@pytest.mark.parametrize("ms, message", [
    ([{"axes": [{"name": "zy"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}],
     r"multiscales\[0\]\.axes are \['zy', 'y', 'x'\]; expected each of t, c, z, y, x at most once.*unknown axis names \['zy'\]"),
    ([{"axes": [{"name": "cz"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}],
     r"unknown axis names \['cz'\]"),
    (multiscales("yyx"), r"axes are \['y', 'y', 'x'\].*repeated axes \['y'\]"),
    (multiscales("cy"), r"axes are \['c', 'y'\].*\(no x\)"),
    (multiscales("c"), r"\(no y and no x\)"),
    ([{"axes": [{"type": "space"}, {"name": "x"}], "datasets": [{"path": "0"}]}],
     r"multiscales\[0\]\.axes\[0\] metadata has no 'name'"),
    ([{"axes": "yx", "datasets": [{"path": "0"}]}], r"multiscales\[0\]\.axes should be a list; found a string 'yx'"),
    (multiscales("yx", datasets=[{"coordinateTransformations": []}]),
     r"multiscales\[0\]\.datasets\[0\] metadata has no 'path' \(found keys \['coordinateTransformations'\]\)"),
    ([{"axes": [{"name": "y"}, {"name": "x"}], "datasets": []}],
     r"multiscales\[0\]\.datasets is empty; expected at least one resolution level"),
    ([{"axes": [{"name": "y"}, {"name": "x"}], "datasets": None}], r"multiscales\[0\]\.datasets should be a list; found null"),
    (multiscales("yx", datasets=[{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0]}]}]),
     r"multiscales\[0\]\.datasets\[0\] scale should be 2 numbers, one per axis \['y', 'x'\]; found a list \[1\.0\]"),
    (multiscales("yx", datasets=[{"path": "0", "coordinateTransformations": {"type": "scale"}}]),
     r"multiscales\[0\]\.datasets\[0\]\.coordinateTransformations should be a list"),
    ({"axes": ["y", "x"]}, r"multiscales should be a list of objects; found an object"),
    (["yx"], r"multiscales\[0\] should be an object; found a string 'yx'"),
])
def test_malformed_image_metadata_names_the_field(ms, message):
    with pytest.raises(RayscreenError, match=r"^/data/p\.zarr/A/1/0: .*" + message):
        Multiscale.from_attrs({"multiscales": ms}, where="/data/p.zarr/A/1/0")


@pytest.mark.parametrize("omero, message", [
    ([{"label": "DNA"}], r"omero should be an object; found a list"),
    ({"channels": {"label": "DNA"}}, r"omero\.channels should be a list; found an object"),
    ({"channels": ["DNA"]}, r"omero\.channels\[0\] should be an object; found a string 'DNA'"),
])
def test_malformed_omero_names_the_field(omero, message):
    with pytest.raises(RayscreenError, match=r"^f: " + message):
        Multiscale.from_attrs({"multiscales": multiscales(), "omero": omero}, where="f")


@pytest.mark.parametrize("ms, message", [
    (multiscales("yx", datasets=[{"coordinateTransformations": []}]), r"multiscales\[0\]\.datasets\[0\] metadata has no 'path'"),
    ([{"version": "0.4", "axes": [{"name": "zy"}, {"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}],
     r"unknown axis names \['zy'\]"),
])
def test_reviewer_field_cases_on_disk(tmp_path, ms, message):
    """Were KeyError: 'path' and ValueError: 'x' is not in list (the axis check was a substring test)."""
    data = np.ones((2, 4, 4), np.uint16) if len(ms[0]["axes"]) == 3 else None
    uri = write_plate(tmp_path / "bad.zarr", ms=ms, data=data)
    plate = open_plate(uri)
    with pytest.raises(RayscreenError, match=re.escape(f"{uri}/A/1/0") + ": .*" + message):
        plate.read("A01", 0)


def test_valid_metadata_still_reads():
    """What the checks must let through: 0.3 string axes, no transforms, integer names, labels."""
    ms = Multiscale.from_attrs({"multiscales": [{"axes": ["c", "y", "x"], "datasets": [
        {"path": 0}, {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 2]}]}]}],
        "omero": {"channels": [{"label": "DNA"}, {}]}}, where="f")
    assert ms.axis_names == "cyx" and ms.paths == ("0", "1") and ms.scales == ((1.0, 1.0, 1.0), (1, 2, 2))
    assert ms.channel_names == ("DNA", "c1")
    meta = PlateMeta.from_attrs(plate_with(columns=[{"name": 1}], wells=[{"path": "A/1", "rowIndex": 0, "columnIndex": 0}],
                                           acquisitions=[{"id": 3}]), where="p")
    assert meta.columns == ("1",) and meta.well_names() == {"A01": "A/1"} and meta.acquisitions[0].id == 3


# -- axis names in any case: iohub writes 'T', 'C', 'Z', 'Y', 'X'

def test_uppercase_axis_names_are_read_as_lower_case():
    ms = Multiscale.from_attrs({"multiscales": [{"axes": [
        {"name": "T", "type": "time"}, {"name": "C", "type": "channel"},
        {"name": "Z", "type": "space", "unit": "micrometer"}, {"name": "Y", "type": "space"},
        {"name": "X", "type": "space"}], "datasets": [{"path": "0"}]}]}, where="f")
    assert ms.axis_names == "tczyx" and ms.axes[2].unit == "micrometer" and ms.axes[0].type == "time"
    assert Multiscale.from_attrs({"multiscales": multiscales(["Y", "x"])}, where="f").axis_names == "yx"
    assert Multiscale.from_attrs({"multiscales": [{"axes": ["C", "Y", "X"], "datasets": [{"path": "0"}]}]},
                                 where="f").axis_names == "cyx"  # 0.3 string axes too


@pytest.mark.parametrize("axes, message", [
    (["Y", "y", "X"], r"axes are \['Y', 'y', 'X'\].*repeated axes \['y'\] \(names compared ignoring case\)"),
    (["ZY", "Y", "X"], r"axes are \['ZY', 'Y', 'X'\].*unknown axis names \['ZY'\]"),
    (["Q", "Y", "X"], r"axes are \['Q', 'Y', 'X'\].*unknown axis names \['Q'\]"),
    (["C", "Y"], r"axes are \['C', 'Y'\].*\(no x\)"),
])
def test_axis_names_in_any_case_are_still_checked(axes, message):
    with pytest.raises(RayscreenError, match=r"^f: multiscales\[0\]\." + message):
        Multiscale.from_attrs({"multiscales": multiscales(axes)}, where="f")


def test_a_plate_with_iohub_uppercase_axes_reads_its_fields(tmp_path):
    """A foreign NGFF 0.5 plate as iohub writes it (TCZYX axes): t indexed, z max-projected."""
    root = zarr.open_group(str(tmp_path / "io.zarr"), mode="w")
    root.attrs["ome"] = {"version": "0.5", "plate": {"rows": [{"name": "A"}], "columns": [{"name": "1"}],
                                                      "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}]}}
    well = root.create_group("A/1")
    well.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "0"}]}}
    data = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.uint16).reshape(2, 3, 4, 5, 6)
    img = well.create_group("0")
    img.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "T", "type": "time"}, {"name": "C", "type": "channel"}] +
                [{"name": a, "type": "space", "unit": "micrometer"} for a in "ZYX"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 2, 0.5, 0.5]}]}]}],
        "omero": {"channels": [{"label": n} for n in ("DNA", "ER", "Mito")]}}
    img.create_array("0", data=data)
    plate = open_plate(str(tmp_path / "io.zarr"))
    assert plate.wells == ["A01"] and plate.channels == ["DNA", "ER", "Mito"] and plate.planes == {"t": 2, "z": 4}
    np.testing.assert_array_equal(plate.read("A01", 0), data[0].max(axis=1))
    np.testing.assert_array_equal(plate.read("A01", 0, t=1, z=2), data[1, :, 2])
