"""The plate store on local disk: round trips, the axis rule, annotations, bad input."""

import json
import os
import warnings
import pickle

import numpy as np
import pandas as pd
import pytest
import zarr

from rayscreen.store import (BadImageError, CorruptDataError, MissingChunkError, MissingWellError, NotAPlateError,
                             RayscreenError, create_plate, open_plate, read_platemap, well_name)
from rayscreen.store.info import format_info, plate_info
from rayscreen.testing import make_plate, random_field


def block_mean_by_hand(image):
    """Level 1 as the writer documents it, computed here: each 2x2 block's mean, rounded to
    the nearest integer with ties to even (np.rint) for integer dtypes, in the input dtype.
    Written with integer sums so it does not share the writer's float path."""
    c, y, x = image.shape
    sums = image[:, : y // 2 * 2, : x // 2 * 2].astype(np.int64).reshape(c, y // 2, 2, x // 2, 2).sum(axis=(2, 4))
    q, r = np.divmod(sums, 4)  # mean = q + r/4, r in 0..3
    return (q + (r == 3) + ((r == 2) & (q % 2 == 1))).astype(image.dtype)


def test_block_mean_by_hand_rounds_as_rint():
    image = np.array([[[0, 1, 1, 1, 2, 3, 1, 2], [0, 1, 0, 1, 3, 3, 2, 2]]], np.uint16)  # means .5 .75 2.75 1.75
    # 0.5 -> 0 (ties to even), 0.75 -> 1, 2.75 -> 3, 1.75 -> 2
    assert block_mean_by_hand(image).tolist() == [[[0, 1, 3, 2]]]
    assert block_mean_by_hand(np.array([[[1, 2], [1, 2]]], np.uint16)).tolist() == [[[2]]]  # 1.5 -> 2 (even)


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_round_trip(tmp_path, ngff):
    uri = make_plate(str(tmp_path / "p.zarr"), ngff=ngff, levels=2)
    plate = open_plate(uri)
    assert plate.name == "P1" and plate.ngff_version == ngff
    assert plate.zarr_format == (3 if ngff == "0.5" else 2)
    assert plate.wells == ["A01", "A02", "B01", "B02"]
    assert plate.channels == ["DNA", "Actin"] and plate.shape == (2, 32, 40) and plate.dtype == np.uint16
    assert plate.fields("B02") == ["0", "1"] and plate.levels == 2 and plate.chunks == (1, 32, 40)
    for well in plate.wells:
        for f in (0, 1):
            expected = random_field(0, well, f, (2, 32, 40))
            np.testing.assert_array_equal(plate.read(well, str(f)), expected)
            level1 = plate.read(well, f, level=1)
            assert level1.shape == (2, 16, 20) and level1.dtype == np.uint16
            np.testing.assert_array_equal(level1, block_mean_by_hand(expected))
            # one block written out: the mean of its four pixels, not any one of them
            block = expected[1, 2:4, 6:8].astype(np.float64)
            assert level1[1, 1, 3] == np.rint(block.mean())
    np.testing.assert_array_equal(plate.read("a1", 0, channels=["Actin"]), random_field(0, "A01", 0, (2, 32, 40))[1:])
    # a plate pickles as its URI and reopens in the receiving process
    again = pickle.loads(pickle.dumps(plate))
    np.testing.assert_array_equal(again.read("A02", 1), plate.read("A02", 1))


def test_metadata_as_the_spec_asks(tmp_path):
    make_plate(str(tmp_path / "p.zarr"))
    root = json.loads((tmp_path / "p.zarr" / "zarr.json").read_text())["attributes"]["ome"]
    assert root["version"] == "0.5" and root["plate"]["version"] == "0.5"
    assert [r["name"] for r in root["plate"]["rows"]] == list("ABCDEFGH")  # a 96-well plate
    assert root["plate"]["wells"][3] == {"path": "B/2", "rowIndex": 1, "columnIndex": 1}
    assert root["plate"]["field_count"] == 2 and root["plate"]["acquisitions"] == [{"id": 0}]
    well = json.loads((tmp_path / "p.zarr" / "B" / "2" / "zarr.json").read_text())["attributes"]["ome"]
    assert well["well"]["images"] == [{"path": "0", "acquisition": 0}, {"path": "1", "acquisition": 0}]
    image = json.loads((tmp_path / "p.zarr" / "B" / "2" / "0" / "zarr.json").read_text())["attributes"]["ome"]
    assert [a["name"] for a in image["multiscales"][0]["axes"]] == ["c", "y", "x"]
    assert [c["label"] for c in image["omero"]["channels"]] == ["DNA", "Actin"]
    arr = json.loads((tmp_path / "p.zarr" / "B" / "2" / "0" / "0" / "zarr.json").read_text())
    assert arr["dimension_names"] == ["c", "y", "x"]
    assert any(c["name"] == "blosc" and c["configuration"]["cname"] == "zstd" for c in arr["codecs"])


@pytest.mark.parametrize("name", ["A01", "a1", "A1", "A/1", "a_01", " A01 "])
def test_well_names_normalise(name):
    assert well_name(name) == "A01"


@pytest.mark.parametrize("bad", ["", "1A", "A0", "A", "ABC1", "A1234"])
def test_bad_well_name_is_named(bad):
    with pytest.raises(RayscreenError, match="unknown well name"):
        well_name(bad)


def test_annotations_stored_and_overridden(tmp_path):
    uri = make_plate(str(tmp_path / "p.zarr"))
    ann = open_plate(uri).annotations
    assert list(ann.columns[:2]) == ["Metadata_Plate", "Metadata_Well"]
    assert ann.set_index("Metadata_Well").loc["A02", "Metadata_Compound"] == "cpd1"
    pm = tmp_path / "pm.tsv"
    pd.DataFrame({"Metadata_Plate": ["P1", "P1", "OTHER"], "Metadata_Well": ["a2", "B/1", "A01"],
                  "Metadata_Compound": ["X", "Y", "Z"], "Metadata_MOA": ["m1", "m2", "m3"]}).to_csv(pm, sep="\t", index=False)
    over = open_plate(uri, platemap=str(pm)).annotations.set_index("Metadata_Well")
    assert over.loc["A02", "Metadata_Compound"] == "X" and over.loc["B01", "Metadata_MOA"] == "m2"
    assert over.loc["A01", "Metadata_Compound"] == "DMSO"  # the platemap's A01 is another plate's
    assert over.loc["A01", "Metadata_Concentration"] == 0.0  # columns not in the platemap stay


def test_platemap_formats_and_errors(tmp_path):
    df = pd.DataFrame({"Metadata_Well": ["A1", "h12"], "Metadata_Dose": [1.0, 2.0]})
    df.to_parquet(tmp_path / "pm.parquet")
    assert read_platemap(str(tmp_path / "pm.parquet"))["Metadata_Well"].tolist() == ["A01", "H12"]
    for name, sep in (("pm.csv.gz", ","), ("pm.tsv.gz", "\t"), ("pm.txt.bz2", "\t")):  # as cytomining tools write them
        df.to_csv(tmp_path / name, sep=sep, index=False)  # pandas compresses by the name
        assert read_platemap(str(tmp_path / name))["Metadata_Dose"].tolist() == [1.0, 2.0], name
    df.rename(columns={"Metadata_Well": "Well"}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(RayscreenError, match="bad.csv.*Metadata_Well"):
        read_platemap(str(tmp_path / "bad.csv"))
    pd.DataFrame({"Metadata_Well": ["A01", "a1"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(RayscreenError, match=r"dup.csv: more than one row for A01 \(rows \[2, 3\]\); expected one row "
                                             r"per well$"):
        read_platemap(str(tmp_path / "dup.csv"))
    pd.DataFrame({"Metadata_Well": ["A01", None, "A03"]}).to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(RayscreenError, match=r"blank.csv: Metadata_Well is empty in row\(s\) \[3\] \(the header is "
                                             r"row 1\)"):
        read_platemap(str(tmp_path / "blank.csv"))
    pd.DataFrame({"Metadata_Well": ["A01", "well 7"]}).to_csv(tmp_path / "odd.csv", index=False)
    with pytest.raises(RayscreenError, match=r"odd.csv row 3"):
        read_platemap(str(tmp_path / "odd.csv"))
    uri = make_plate(str(tmp_path / "p.zarr"))
    pd.DataFrame({"Metadata_Well": ["P24"], "Metadata_X": [1]}).to_csv(tmp_path / "out.csv", index=False)
    with pytest.raises(RayscreenError, match=r"platemap .*out.csv names wells \['P24'\] that plate"):
        open_plate(uri, platemap=str(tmp_path / "out.csv")).annotations


def test_sparse_plate_reports_missing_wells(tmp_path):
    uri = str(tmp_path / "p.zarr")
    writer = create_plate(uri, "S", ["A01", "A02", "C05"], ["DNA"], (8, 8), "uint8", 1)
    writer.write_field("A01", 0, np.ones((1, 8, 8), np.uint8))
    writer.complete_well("A01", 1)
    writer.write_field("A02", 0, np.ones((1, 8, 8), np.uint8))  # never completed
    plate = open_plate(uri)
    assert plate.wells == ["A01", "A02", "C05"]
    assert plate.present_wells() == (["A01"], ["A02", "C05"])
    # rayscreen listed them when it created the plate: not completed, rather than sparse
    with pytest.raises(MissingWellError, match="well C05 was not completed by the writer \\(nothing of it is on disk"):
        plate.fields("C05")
    with pytest.raises(MissingWellError, match="well A02 was not completed by the writer \\(it has no well metadata"):
        plate.fields("A02")
    info = plate_info(uri)
    assert info["wells_missing"] == ["A02", "C05"] and info["fields"] == 1 and info["wells_incomplete"]
    assert "not completed by the writer (ingest unfinished?): A02, C05" in format_info(info)


def test_missing_chunk_raises_not_zeros(tmp_path):
    uri = make_plate(str(tmp_path / "p.zarr"))
    os.remove(tmp_path / "p.zarr" / "B" / "1" / "1" / "0" / "c" / "1" / "0" / "0")
    plate = open_plate(uri)
    with pytest.raises(MissingChunkError, match="plate 'P1' well B01 field 1"):
        plate.read("B01", 1)
    plate.read("B01", 1, channels=["DNA"])  # the other channel's chunk is still there
    # opting out (for foreign plates written without empty chunks) fills, as zarr does
    assert open_plate(uri, strict=False).read("B01", 1)[1].max() == 0


@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_corrupt_chunk_names_the_field(tmp_path, damage):
    uri = make_plate(str(tmp_path / "p.zarr"))
    chunk = tmp_path / "p.zarr" / "A" / "2" / "0" / "0" / "c" / "0" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(bytes(b ^ 0x5A for b in data) if damage == "garble" else data[: len(data) // 3])
    with pytest.raises(CorruptDataError, match="plate 'P1' well A02 field 0"):
        open_plate(uri).read("A02", 0)


@pytest.mark.parametrize("keep", ["half", "all but one byte", "part of the header"])
def test_truncated_v2_blosc_chunk_raises_not_wrong_pixels(tmp_path, keep):
    """Zarr v2 chunks have no checksum and c-blosc trusts its header's size, so a cut chunk
    used to decode (sometimes) into wrong pixels with no error; its header is checked now."""
    uri = make_plate(str(tmp_path / "p.zarr"), ngff="0.4", levels=2)
    array = tmp_path / "p.zarr" / "A" / "2" / "1" / "0"
    assert json.loads((array / ".zarray").read_text())["compressor"]["id"] == "blosc"
    chunk = array / "1" / "0" / "0"  # channel Actin of well A02 field 1, level 0
    data = chunk.read_bytes()
    assert int.from_bytes(data[12:16], "little") == len(data)  # blosc's cbytes: the whole chunk
    chunk.write_bytes(data[: {"half": len(data) // 2, "all but one byte": len(data) - 1, "part of the header": 10}[keep]])
    expected = random_field(0, "A02", 1, (2, 32, 40))
    message = r"plate 'P1' well A02 field 1: chunk 'A/2/1/0/1/0/0' .*truncated or damaged"
    for plate in (open_plate(uri), open_plate(uri, strict=False)):  # filling missing chunks is no licence
        for _ in range(3):  # the old failure was nondeterministic
            with pytest.raises(CorruptDataError, match=message):
                plate.read("A02", 1)
            with pytest.raises(CorruptDataError, match=message):
                plate.read("A02", "1", channels=["Actin"])
        np.testing.assert_array_equal(plate.read("A02", 1, channels=["DNA"]), expected[:1])  # its other chunk is whole
        np.testing.assert_array_equal(plate.read("A02", 1, level=1), block_mean_by_hand(expected))  # and so is level 1
    # array metadata found through consolidated metadata (.zmetadata) is checked the same way
    zarr.consolidate_metadata(uri, zarr_format=2)
    with pytest.raises(CorruptDataError, match=message):
        open_plate(uri).read("A02", 1)


def test_truncated_v3_chunk_without_checksum_raises(tmp_path):
    """A foreign Zarr v3 plate whose chunks end in blosc (no crc32c) gets the same header check;
    one compressed with zstd raises from the codec itself."""
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    root.attrs["ome"] = {"version": "0.5", "plate": {"rows": [{"name": "A"}], "columns": [{"name": "1"}],
                                                      "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0}]}}
    well = root.create_group("A/1")
    well.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "0"}, {"path": "1"}]}}
    data = random_field(0, "A01", 0, (1, 64, 64))[0]
    for field, codec in (("0", zarr.codecs.BloscCodec()), ("1", zarr.codecs.ZstdCodec())):
        img = well.create_group(field)
        img.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "y"}, {"name": "x"}],
                                                                "datasets": [{"path": "0"}]}]}
        img.create_array("0", data=data, compressors=[codec])
        chunk = tmp_path / "f.zarr" / "A" / "1" / field / "0" / "c" / "0" / "0"
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    plate = open_plate(str(tmp_path / "f.zarr"))
    with pytest.raises(CorruptDataError, match=r"plate 'f' well A01 field 0: chunk 'A/1/0/0/c/0/0' .*truncated"):
        plate.read("A01", 0)
    with pytest.raises(CorruptDataError, match="plate 'f' well A01 field 1: cannot decode a chunk"):
        plate.read("A01", 1)


def test_not_a_plate(tmp_path):
    with pytest.raises(NotAPlateError, match="nothing.zarr: no such plate"):
        open_plate(str(tmp_path / "nothing.zarr"))
    (tmp_path / "folder.zarr").mkdir()
    with pytest.raises(NotAPlateError, match="no Zarr group"):
        open_plate(str(tmp_path / "folder.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["hello"] = 1
    with pytest.raises(NotAPlateError, match="expected 'plate' metadata.*attribute keys"):
        open_plate(str(tmp_path / "plain.zarr"))
    g = zarr.open_group(str(tmp_path / "image.zarr"), mode="w")
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "y"}, {"name": "x"}], "datasets": []}]}
    with pytest.raises(NotAPlateError, match="single image"):
        open_plate(str(tmp_path / "image.zarr"))
    zarr.create_array(str(tmp_path / "array.zarr"), shape=(4,), dtype="u1")
    with pytest.raises(NotAPlateError):
        open_plate(str(tmp_path / "array.zarr"))


def test_writer_rejects_bad_images(tmp_path):
    writer = create_plate(str(tmp_path / "p.zarr"), "P", ["A01"], ["DNA", "Actin"], (8, 8), "float32", 1)
    with pytest.raises(BadImageError, match=r"plate 'P' well A01 field 0: image shape \(1, 8, 8\).*expected \(2, 8, 8\)"):
        writer.write_field("A01", 0, np.zeros((1, 8, 8), np.float32))
    with pytest.raises(BadImageError, match="dtype float64; expected float32"):
        writer.write_field("A01", 0, np.zeros((2, 8, 8), np.float64))
    bad = np.zeros((2, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.raises(BadImageError, match="1 NaN/Inf"):
        writer.write_field("A01", 0, bad)
    with pytest.raises(RayscreenError, match="without well B01"):
        writer.write_field("B01", 0, np.zeros((2, 8, 8), np.float32))
    with pytest.raises(RayscreenError, match="1 fields written, expected 2"):
        writer.write_field("A01", 0, np.zeros((2, 8, 8), np.float32)) or writer.complete_well("A01", 2)
    assert not writer.is_complete("A01")


def test_reopen_resumes_or_refuses(tmp_path):
    uri = str(tmp_path / "p.zarr")
    make_plate(uri, complete=False)
    writer = create_plate(uri, "P1", ["A01", "A02", "B01", "B02"], ["DNA", "Actin"], (32, 40), "uint16", 2)
    assert writer.complete_wells() == []
    with pytest.raises(RayscreenError, match="another layout"):
        create_plate(uri, "P1", ["A01"], ["DNA"], (32, 40), "uint16", 2)
    writer = create_plate(uri, "P1", ["A01"], ["DNA"], (32, 40), "uint16", 2, overwrite=True)
    assert open_plate(uri).wells == ["A01"]


@pytest.mark.parametrize("ngff", ["0.4", "0.5"])
def test_a_resumed_plate_counts_the_fields_it_now_plans(tmp_path, ngff):
    """An ingest stopped, its LoadData then gave an unfinished well a third site: the plate's
    field_count (by which infer and profile size their stores) must follow."""
    uri = str(tmp_path / "p.zarr")
    acquisitions = [{"id": 0, "maximumfieldcount": 2}]
    create_plate(uri, "P1", ["A01"], ["DNA"], (8, 8), "uint16", 2, ngff=ngff, acquisitions=acquisitions)
    writer = create_plate(uri, "P1", ["A01"], ["DNA"], (8, 8), "uint16", 3, ngff=ngff, acquisitions=acquisitions)
    for f in range(3):
        writer.write_field("A01", f, np.ones((1, 8, 8), np.uint16))
    writer.complete_well("A01", 3)
    plate = open_plate(uri)
    assert plate.meta.field_count == 3 and plate.meta.acquisitions[0].maximumfieldcount == 3
    assert plate.fields("A01") == ["0", "1", "2"] and plate.meta.version == ngff
    create_plate(uri, "P1", ["A01"], ["DNA"], (8, 8), "uint16", 1, ngff=ngff)  # fewer: never lowered
    assert open_plate(uri).meta.field_count == 3


def test_axes_rule_tczyx_and_yx(tmp_path):
    """Foreign layouts: t and z indexed or max-projected; no c axis gives C = 1."""
    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    root.attrs["ome"] = {"version": "0.5", "plate": {"rows": [{"name": "A"}], "columns": [{"name": "01"}],
                                                      "wells": [{"path": "A/01", "rowIndex": 0, "columnIndex": 0}]}}
    well = root.create_group("A/01")
    well.attrs["ome"] = {"version": "0.5", "well": {"images": [{"path": "0"}, {"path": "1"}]}}
    data5 = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.uint16).reshape(2, 3, 4, 5, 6)
    data2 = np.arange(30, dtype=np.float32).reshape(5, 6)
    for field, data, axes in (("0", data5, "tczyx"), ("1", data2, "yx")):
        img = well.create_group(field)
        img.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": a} for a in axes],
                                                                "datasets": [{"path": "s0"}]}]}
        img.create_array("s0", data=data)
    plate = open_plate(str(tmp_path / "f.zarr"))
    assert plate.wells == ["A01"] and plate.fields("a1") == ["0", "1"]
    np.testing.assert_array_equal(plate.read("A01", 0), data5[0].max(axis=1))
    for kwargs, message in (({"z": 4}, "z=4 is outside the field's 4 z plane"), ({"t": 2}, "t=2 is outside")):
        with pytest.raises(RayscreenError, match=f"plate .* well A01 field 0: {message}"):  # not a 'corrupt chunk'
            plate.read("A01", 0, **kwargs)
    np.testing.assert_array_equal(plate.read("A01", 0, t=1, z=2), data5[1, :, 2])
    np.testing.assert_array_equal(plate.read("A01", 1), data2[None])
    # what the rule reduces is told: `rayscreen info` shows the planes a field stream leaves out
    assert plate.planes == {"t": 2, "z": 4}
    info = plate_info(str(tmp_path / "f.zarr"))
    assert info["planes"] == {"t": 2, "z": 4} and not info["wells_incomplete"]
    assert "planes: 2 timepoint(s), 4 z-plane(s); fields stream as t=0, z max-projected" in format_info(info)


def test_every_stage_says_when_it_reads_only_the_first_timepoint(tmp_path, caplog):
    """read_plates warned, but infer (which reads wells itself) and the illum fitters read
    t=0 of a time-lapse plate without a word. Once per plate."""
    from rayscreen.store.plate import warn_of_timepoints
    from rayscreen.stream.illumination import select_fields

    test_axes_rule_tczyx_and_yx(tmp_path)
    plate = open_plate(str(tmp_path / "f.zarr"))
    with caplog.at_level("WARNING", logger="rayscreen"):
        select_fields(plate)
    assert caplog.text.count("has 2 timepoints; rayscreen reads t=0 only") == 1
    with caplog.at_level("WARNING", logger="rayscreen"):
        warn_of_timepoints(plate)
        select_fields(plate)
    assert caplog.text.count("has 2 timepoints; rayscreen reads t=0 only") == 1  # once per plate


def test_multiple_acquisitions(tmp_path):
    """A well imaged in two acquisitions: fields of each are selectable."""
    from rayscreen.testing.plates import make_two_acquisition_plate

    plate = open_plate(make_two_acquisition_plate(str(tmp_path / "acq.zarr")))
    assert plate.acquisitions == [1, 2] and plate.fields("B03", acquisition="all") == ["0", "1"]
    with pytest.raises(RayscreenError, match=r"well B03: fields of 2 acquisitions \(1 \('before'\), 2 \('after'\)\)"):
        plate.fields("B03")  # what the stages ask: one imaging run per well
    assert plate.fields("B03", acquisition=2) == ["1"]
    assert plate.read("B03", plate.fields("B03", acquisition=2)[0]).max() == 2
    # described whole: `rayscreen info` and the plate's layout take every run
    assert plate.shape == (1, 4, 4) and plate_info(str(tmp_path / "acq.zarr"))["fields"] == 2


@pytest.mark.parametrize("dtype, values", [(np.uint8, (0, 254)), (np.float32, (0.0, 1.0)), (np.uint16, (1, 4000))])
def test_display_window_follows_the_data_so_viewers_do_not_show_black(tmp_path, dtype, values):
    """ome-zarr-py hands the omero window to napari as contrast limits: a uint8 or 0-1 float
    plate under a 0-65535 window shows black."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from rayscreen.store import create_plate

    rng = np.random.default_rng(0)
    image = rng.uniform(*values, size=(2, 32, 32)).astype(dtype)
    uri = str(tmp_path / "W.zarr")
    create_plate(uri, "W", ["A01"], ["DNA", "Actin"], (32, 32), dtype, 1).write_field("A01", 0, image)
    node = next(iter(Reader(parse_url(f"{uri}/A/1/0"))()))
    limits = node.metadata["contrast_limits"]
    assert len(limits) == 2
    for (start, end), channel in zip(limits, image):
        assert np.percentile(channel, 0.5) <= end and start <= np.percentile(channel, 99.5) and start < end
        assert end <= float(np.max(channel)) + 1e-6 and start >= float(np.min(channel)) - 1e-6


def test_a_platemap_naming_no_row_of_the_plate_warns_with_the_names_it_has(tmp_path):
    """Platemaps keyed by file name while the plate's NGFF name is a barcode matched nothing,
    and every label went missing without a word."""
    uri = make_plate(str(tmp_path / "P1.zarr"), "BC-000123", wells=("A01",), fields=1)
    pm = pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["A01"], "Metadata_MOA": ["taxol"]})
    with pytest.warns(UserWarning, match=r"no row for plate 'BC-000123' \(it names plates \['P1'\]\)"):
        # the plate's own annotations, without an empty column of the platemap's
        assert "Metadata_MOA" not in open_plate(uri, platemap=pm).annotations.columns
    pm["Metadata_Plate"] = "BC-000123"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_plate(uri, platemap=pm).annotations["Metadata_MOA"].tolist() == ["taxol"]


def test_a_screens_platemap_file_is_read_once_and_again_when_edited(tmp_path, monkeypatch):
    """Every plate of a screen is opened with the same platemap URI; each read, normalised and
    filtered the whole file again (seconds per plate for a 384k-row map). Now it is read once
    per process and split by plate, and an edited file is read afresh."""
    from rayscreen.store import annotations

    uris = [make_plate(str(tmp_path / f"P{i}.zarr"), f"P{i}", wells=("A01", "A02"), fields=1) for i in range(3)]
    path = tmp_path / "map.csv"
    rows = [f"P{i},{w},cpd{i}{w}" for i in range(3) for w in ("A01", "A02")]
    path.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound\n" + "\n".join(rows) + "\n")
    reads = []
    real = annotations.read_platemap
    monkeypatch.setattr(annotations, "read_platemap", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    got = [open_plate(u, platemap=str(path)).annotations["Metadata_Compound"].tolist() for u in uris]
    assert got == [["cpd0A01", "cpd0A02"], ["cpd1A01", "cpd1A02"], ["cpd2A01", "cpd2A02"]]
    assert reads == [str(path)]
    path.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound\nP1,A02,edited\n")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # even within one tick
    a01, a02 = open_plate(uris[1], platemap=str(path)).annotations["Metadata_Compound"].tolist()
    assert a02 == "edited" and a01 == open_plate(uris[1]).annotations["Metadata_Compound"][0]  # the plate's own
    assert len(reads) == 2


def test_info_on_a_plate_whose_write_finished_no_well_yet(tmp_path):
    uri = str(tmp_path / "p.zarr")
    writer = create_plate(uri, "P", ["A01", "A02"], ["DNA"], (8, 8), "uint16", 1)
    writer.write_field("A01", 0, np.ones((1, 8, 8), np.uint16))  # stopped before complete_well
    info = plate_info(uri)
    assert info["wells_present"] == 0 and info["wells_missing"] == ["A01", "A02"] and info["shape"] is None
    assert "0 present of 2 listed, no field written yet" in format_info(info)
    writer.complete_well("A01", 1)
    info = plate_info(uri)
    assert info["shape"] == (1, 8, 8) and "field shape (C, Y, X): (1, 8, 8)" in format_info(info)


def test_an_edited_platemap_on_s3_is_read_again_though_its_folder_was_listed(s3_bucket):
    """s3fs answers info() from an earlier listing of the folder (a plates glob beside the
    map): the cache key would not change and the old map would be kept."""
    import s3fs

    from rayscreen.store.annotations import platemap_by_plate
    from rayscreen.store.uri import expand_uris

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    uri = f"{bucket}/screen/map.csv"
    fs.pipe(uri, b"Metadata_Well,Metadata_Compound\nA01,old\n")
    fs.pipe(f"{bucket}/screen/P.zarr/zarr.json", b"{}")
    expand_uris(f"{bucket}/screen/*.zarr", options)  # lists the folder, as a config's glob does
    assert platemap_by_plate(uri, options).rows("P")["Metadata_Compound"].tolist() == ["old"]
    # edited elsewhere (another process, a colleague): not through this process's cached filesystem
    s3fs.S3FileSystem(skip_instance_cache=True, **options).pipe(uri, b"Metadata_Well,Metadata_Compound\nA01,newer\n")
    assert platemap_by_plate(uri, options).rows("P")["Metadata_Compound"].tolist() == ["newer"]


def test_zarr_stores_on_s3_skip_s3fs_size_requests_unless_the_user_sets_concurrency():
    """s3fs sends a HEAD before every whole-object GET when max_concurrency > 1 (to split
    objects over 50 MiB); Zarr's chunks are smaller, so the stores ask for 1."""
    from rayscreen.store.uri import make_store, zarr_storage_options

    assert zarr_storage_options("s3://b/p.zarr", None) == {"max_concurrency": 1}
    mine = {"endpoint_url": "http://127.0.0.1:1", "max_concurrency": 4}
    assert zarr_storage_options("s3://b/p.zarr", mine) == mine
    assert zarr_storage_options("gs://b/p.zarr", {"token": "anon"}) == {"token": "anon"}
    assert zarr_storage_options("/data/p.zarr", None) is None
    store = make_store("s3://b/p.zarr", {"endpoint_url": "http://127.0.0.1:1"})
    assert store._store.fs.max_concurrency == 1
