"""Ingest from a LoadData CSV (in-process writer; the Ray path is an integration test)."""

import os

import numpy as np
import pandas as pd
import pytest
import tifffile
import imageio.v3 as iio

from rayscreen.cli import main
from rayscreen.ingest import ingest, read_loaddata
from rayscreen.store import RayscreenError, open_plate

CHANNELS = ("DNA", "Actin")


def plane(plate, well, site, c, shape=(24, 30), dtype=np.uint16):
    rng = np.random.default_rng([ord(plate[-1]), ord(well[0]), int(well[1:]), site, c])
    return rng.integers(0, 3000, shape).astype(dtype)


def write_screen(root, plates=("PA", "PB"), wells=("A01", "A02", "B03"), sites=2, fmt="tif", rows_extra=None):
    """Images + LoadData CSV; returns the CSV path. Folders are relative to the CSV."""
    rows = []
    for p in plates:
        os.makedirs(root / p, exist_ok=True)
        for w in wells:
            for s in range(1, sites + 1):
                row = {"Metadata_Plate": p, "Metadata_Well": w.lower() if w == "A02" else w, "Metadata_Site": s,
                       "Metadata_Compound": "DMSO" if w == "A01" else f"c{w}", "Metadata_Field_Note": f"s{s}"}
                for c, ch in enumerate(CHANNELS):
                    name = f"{w}_s{s}_{ch}.{fmt}"
                    img = plane(p, w, s, c, dtype=np.uint8 if fmt == "png" else np.uint16)
                    (tifffile.imwrite if fmt == "tif" else iio.imwrite)(root / p / name, img)
                    row[f"FileName_{ch}"] = name
                    row[f"PathName_{ch}"] = p
                rows.append(row)
    df = pd.DataFrame(rows)
    csv = root / "load_data.csv"
    df.to_csv(csv, index=False)
    return csv


@pytest.mark.parametrize("fmt,ngff", [("tif", "0.5"), ("png", "0.4")])
def test_ingest_round_trip(tmp_path, fmt, ngff):
    csv = write_screen(tmp_path, fmt=fmt)
    uris = ingest(str(csv), str(tmp_path / "out"), use_ray=False, ngff=ngff, progress=False)
    assert [os.path.basename(u) for u in uris] == ["PA.zarr", "PB.zarr"]
    plate = open_plate(uris[1])
    assert plate.name == "PB" and plate.channels == list(CHANNELS) and plate.ngff_version == ngff
    assert plate.wells == ["A01", "A02", "B03"] and plate.fields("B03") == ["0", "1"]
    dtype = np.uint8 if fmt == "png" else np.uint16
    for c in range(2):
        np.testing.assert_array_equal(plate.read("A02", 1)[c], plane("PB", "A02", 2, c, dtype=dtype))
    ann = plate.annotations.set_index("Metadata_Well")
    assert ann.loc["B03", "Metadata_Compound"] == "cB03"
    assert "Metadata_Field_Note" not in ann.columns  # varies within a well: not a well annotation
    assert "Metadata_Site" not in ann.columns


def test_a_gzipped_loaddata_ingests_like_the_plain_one(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=1)
    gz = tmp_path / "load_data.csv.gz"
    pd.read_csv(csv).to_csv(gz, index=False)
    (uri,) = ingest(str(gz), str(tmp_path / "out"), use_ray=False, progress=False)  # folders relative to it
    np.testing.assert_array_equal(open_plate(uri).read("A01", 0)[1], plane("PA", "A01", 1, 1))


def test_ingest_platemap_overrides(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    pd.DataFrame({"Metadata_Plate": ["PA"], "Metadata_Well": ["A1"], "Metadata_Compound": ["taxol"],
                  "Metadata_MOA": ["microtubule stabiliser"]}).to_csv(tmp_path / "pm.csv", index=False)
    uri, = ingest(str(csv), str(tmp_path / "out"), platemap=str(tmp_path / "pm.csv"), use_ray=False, progress=False)
    ann = open_plate(uri).annotations.set_index("Metadata_Well")
    assert ann.loc["A01", "Metadata_Compound"] == "taxol" and ann.loc["A01", "Metadata_MOA"] == "microtubule stabiliser"
    assert ann.loc["B03", "Metadata_Compound"] == "cB03"


def test_resume_after_a_missing_file(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    victim = tmp_path / "PA" / "B03_s2_Actin.tif"
    saved = victim.read_bytes()
    victim.unlink()
    with pytest.raises(RayscreenError, match=r"plate 'PA' well B03 site 2 channel Actin: image file .*B03_s2_Actin.tif is missing"):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, wells_per_task=1, progress=False)
    plate = open_plate(str(tmp_path / "out" / "PA.zarr"))
    assert plate.present_wells() == (["A01", "A02"], ["B03"])  # the failing well is not marked complete
    done_chunk = tmp_path / "out" / "PA.zarr" / "A" / "1" / "0" / "0" / "c" / "0" / "0" / "0"
    mtime = done_chunk.stat().st_mtime_ns
    victim.write_bytes(saved)
    ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    plate = open_plate(str(tmp_path / "out" / "PA.zarr"))
    assert plate.present_wells() == (["A01", "A02", "B03"], [])
    assert done_chunk.stat().st_mtime_ns == mtime  # complete wells were skipped, not rewritten
    np.testing.assert_array_equal(plate.read("B03", 1)[1], plane("PA", "B03", 2, 1))


def test_rerun_drops_fields_an_interrupted_write_left_beyond_the_sites_now_listed(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), sites=4)
    (tmp_path / "PA" / "B03_s4_Actin.tif").unlink()  # B03's fields 0-2 are written, then site 4 fails
    with pytest.raises(RayscreenError, match="well B03 site 4 channel Actin"):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    # the user drops B03's sites 3 and 4 and reruns: the third field written before must go
    _edit_csv(csv, lambda d: d[~((d.Metadata_Well == "B03") & d.Metadata_Site.isin(["3", "4"]))])
    ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    plate = open_plate(str(tmp_path / "out" / "PA.zarr"))
    assert plate.present_wells() == (["A01", "A02", "B03"], []) and plate.fields("B03") == ["0", "1"]
    assert sorted(os.listdir(tmp_path / "out" / "PA.zarr" / "B" / "3")) == ["0", "1", "zarr.json"]
    np.testing.assert_array_equal(plate.read("B03", 1)[0], plane("PA", "B03", 2, 0))


@pytest.mark.parametrize("plate, expected", [
    ("../escaped", "row 2: Metadata_Plate '../escaped' cannot name a plate store"),
    ("a/b", "Metadata_Plate 'a/b' cannot name a plate store"),
    ("..", "Metadata_Plate '..' cannot name a plate store"),
])
def test_plate_names_that_are_not_one_path_segment_are_refused(tmp_path, plate, expected):
    csv = write_screen(tmp_path, plates=("PA",))
    _edit_csv(csv, lambda d: d.assign(Metadata_Plate=plate))
    with pytest.raises(RayscreenError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.zarr").exists()


def test_plates_differing_only_in_case_are_refused(tmp_path):
    csv = write_screen(tmp_path, plates=("PA", "pa"))
    with pytest.raises(RayscreenError, match="plates 'PA' and 'pa' differ only in case"):
        read_loaddata(str(csv))


def test_a_store_holding_another_plate_is_not_reused(tmp_path):
    from rayscreen.store.writer import create_plate

    uri = str(tmp_path / "P.zarr")
    create_plate(uri, "P", ["A01"], ["DNA"], (8, 8), np.uint16)
    with pytest.raises(RayscreenError, match="holds plate 'P', not 'p'"):
        create_plate(uri, "p", ["A01"], ["DNA"], (8, 8), np.uint16)


def test_wells_beyond_a_1536_well_plate_are_named_with_the_plate(tmp_path):
    from rayscreen.store.writer import create_plate

    with pytest.raises(RayscreenError, match=r"plate 'P7': well\(s\) \['AG01'\] lie outside a 1536-well plate "
                                             r"\(rows A-AF, columns 1-48\)"):
        create_plate(str(tmp_path / "P7.zarr"), "P7", ["B02", "AG01"], ["DNA"], (8, 8), np.uint16)


def _edit_csv(csv, fn):
    df = pd.read_csv(csv, dtype=str)  # as text: the edit must not rewrite plate 001 as 1
    df = fn(df)
    df.to_csv(csv, index=False)


def test_loaddata_missing_columns(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    _edit_csv(csv, lambda d: d.drop(columns=["Metadata_Site"]))
    with pytest.raises(RayscreenError, match=r"missing required column\(s\) \['Metadata_Site'\]"):
        read_loaddata(str(csv))
    _edit_csv(csv, lambda d: d.assign(Metadata_Site=1).drop(columns=["PathName_DNA"]))
    with pytest.raises(RayscreenError, match="FileName_DNA has no matching PathName_DNA"):
        read_loaddata(str(csv))


def test_loaddata_duplicate_site(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    _edit_csv(csv, lambda d: pd.concat([d, d.iloc[[0]]]))
    with pytest.raises(RayscreenError, match="duplicate rows for plate 'PA' well A01 site 1: each site"):
        read_loaddata(str(csv))


def test_loaddata_sites_1_and_01_are_one_site(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    _edit_csv(csv, lambda d: pd.concat([d, d.iloc[[0]].assign(Metadata_Site="01")]))
    with pytest.raises(RayscreenError, match="duplicate rows for plate 'PA' well A01 site 1 \\(written '1', '01'\\)"):
        read_loaddata(str(csv))


def test_loaddata_unknown_well(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    _edit_csv(csv, lambda d: d.assign(Metadata_Well=["9Z"] + list(d.Metadata_Well[1:])))
    with pytest.raises(RayscreenError, match="unknown well name '9Z' in LoadData CSV .* row 2"):
        read_loaddata(str(csv))


def test_inconsistent_shape_dtype_and_unreadable(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",))
    tifffile.imwrite(tmp_path / "PA" / "A02_s1_DNA.tif", np.zeros((20, 30), np.uint16))
    with pytest.raises(RayscreenError, match="plate 'PA' well A02 site 1: channels differ in shape"):
        ingest(str(csv), str(tmp_path / "o1"), use_ray=False, progress=False)
    for ch in CHANNELS:
        tifffile.imwrite(tmp_path / "PA" / f"A02_s1_{ch}.tif", np.zeros((24, 30), np.float32))
    with pytest.raises(RayscreenError, match=r"plate 'PA' well A02 site 1: image shape \(24, 30\) \(Y, X\) dtype float32 "
                                             r"in channel DNA file .*A02_s1_DNA.tif.*; expected shape \(24, 30\) dtype uint16"):
        ingest(str(csv), str(tmp_path / "o2"), use_ray=False, progress=False)
    (tmp_path / "PA" / "A02_s1_DNA.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(RayscreenError, match="cannot read image file .*A02_s1_DNA.tif"):
        ingest(str(csv), str(tmp_path / "o3"), use_ray=False, progress=False)
    tifffile.imwrite(tmp_path / "PA" / "A02_s1_DNA.tif", np.zeros((3, 24, 30), np.uint16))
    with pytest.raises(RayscreenError, match=r"shape \(3, 24, 30\); expected one 2-D greyscale plane"):
        ingest(str(csv), str(tmp_path / "o4"), use_ray=False, progress=False)


def test_nan_float_images(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=1)
    for ch in CHANNELS:
        img = np.ones((24, 30), np.float32)
        if ch == "Actin":
            img[3, 4] = np.inf
        tifffile.imwrite(tmp_path / "PA" / f"A01_s1_{ch}.tif", img)
    with pytest.raises(RayscreenError, match="plate 'PA' well A01 site 1 channel Actin file .*A01_s1_Actin.tif: 1 NaN/Inf"):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)


def test_cli_errors_exit_nonzero_and_name_the_file(tmp_path, capsys):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=1)
    (tmp_path / "PA" / "A01_s1_DNA.tif").unlink()
    code = main(["--quiet", "ingest", str(csv), str(tmp_path / "out"), "--no-ray"])
    assert code == 2
    assert "A01_s1_DNA.tif is missing" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    assert "nope.zarr: no such plate" in capsys.readouterr().err


def test_numeric_looking_plate_ids_stay_text(tmp_path):
    """Plate "001" is not the number 1: not in the plate's name, its file, or a platemap."""
    csv = write_screen(tmp_path, plates=("001",), wells=("A01", "B03"), sites=1)
    _edit_csv(csv, lambda d: d.assign(Metadata_Dose=[0.5, 2.0]))
    assert "001,A01" in csv.read_text()  # the CSV itself says 001
    pd.DataFrame({"Metadata_Plate": ["001", "1"], "Metadata_Well": ["B03", "A01"],
                  "Metadata_MOA": ["tubulin", "plate 1, not 001"]}).to_csv(tmp_path / "pm.csv", index=False)
    uri, = ingest(str(csv), str(tmp_path / "out"), platemap=str(tmp_path / "pm.csv"), use_ray=False, progress=False)
    assert os.path.basename(uri) == "001.zarr"
    plate = open_plate(uri)
    ann = plate.annotations.set_index("Metadata_Well")
    assert plate.name == "001" and set(ann["Metadata_Plate"]) == {"001"}
    assert ann.loc["B03", "Metadata_MOA"] == "tubulin" and pd.isna(ann.loc["A01", "Metadata_MOA"])
    assert ann["Metadata_Dose"].tolist() == [0.5, 2.0]  # other Metadata_* keep their types
    # a platemap given when opening selects its rows by the same text
    later = plate.with_platemap(str(tmp_path / "pm.csv")).annotations.set_index("Metadata_Well")
    assert later.loc["B03", "Metadata_MOA"] == "tubulin"


def test_platemap_plate_ids_typed_by_parquet_are_text(tmp_path):
    """A parquet platemap whose writer stored plate 7 as an integer still selects plate "7"."""
    pytest.importorskip("pyarrow")
    csv = write_screen(tmp_path, plates=("7",), wells=("A01", "A02"), sites=1)
    pd.DataFrame({"Metadata_Plate": [7, 8], "Metadata_Well": ["A01", "A01"],
                  "Metadata_MOA": ["seven", "eight"]}).to_parquet(tmp_path / "pm.parquet")
    uri, = ingest(str(csv), str(tmp_path / "out"), platemap=str(tmp_path / "pm.parquet"), use_ray=False, progress=False)
    assert open_plate(uri).annotations.set_index("Metadata_Well").loc["A01", "Metadata_MOA"] == "seven"


def test_sites_as_text_keep_numeric_order(tmp_path):
    """Sites are read as text (as written in the LoadData) but ordered as numbers: site 10 is
    field 9, not field 1."""
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=11)
    uri, = ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    plate = open_plate(uri)
    for field, site in ((1, 2), (9, 10), (10, 11)):
        np.testing.assert_array_equal(plate.read("A01", field)[0], plane("PA", "A01", site, 0))


def test_wrong_shape_names_site_and_files(tmp_path):
    """The 0-based field index is the writer's business: the error names the LoadData site
    (2, the second field) and the files that made the image, and the shape expected."""
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01", "A02"), sites=2)
    for ch in CHANNELS:
        tifffile.imwrite(tmp_path / "PA" / f"A02_s2_{ch}.tif", np.zeros((24, 31), np.uint16))
    with pytest.raises(RayscreenError, match=r"plate 'PA' well A02 site 2: image shape \(24, 31\) \(Y, X\) dtype uint16 "
                                             r"in channel DNA file .*/PA/A02_s2_DNA.tif, channel Actin file "
                                             r".*/PA/A02_s2_Actin.tif; expected shape \(24, 30\) dtype uint16 .*"
                                             r"first site, well A01 site 1"):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    # channels of one site that disagree: each channel's file and shape named
    tifffile.imwrite(tmp_path / "PA" / "A02_s2_DNA.tif", np.zeros((24, 30), np.uint16))
    with pytest.raises(RayscreenError, match=r"well A02 site 2: channels differ in shape or dtype \(channel DNA file "
                                             r".*A02_s2_DNA.tif: shape \(24, 30\).*A02_s2_Actin.tif: shape \(24, 31\)"):
        ingest(str(csv), str(tmp_path / "out2"), use_ray=False, progress=False)


def test_loaddata_pathname_and_csv_as_file_uris(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01", "A02"), sites=2)
    _edit_csv(csv, lambda d: d.assign(PathName_DNA=f"file://{tmp_path}/PA"))  # Actin stays relative
    uri, = ingest(f"file://{csv}", str(tmp_path / "out"), use_ray=False, progress=False)
    plate = open_plate(uri)
    assert plate.present_wells() == (["A01", "A02"], [])
    for c in range(2):
        np.testing.assert_array_equal(plate.read("A02", 1)[c], plane("PA", "A02", 2, c))
    (tmp_path / "PA" / "A02_s2_DNA.tif").unlink()
    with pytest.raises(RayscreenError, match=rf"plate 'PA' well A02 site 2 channel DNA: image file file://{tmp_path}/PA/"
                                             r"A02_s2_DNA.tif is missing"):
        ingest(str(csv), str(tmp_path / "out2"), use_ray=False, progress=False)


def test_relative_pathname_resolves_against_a_remote_csv():
    from rayscreen.ingest import LoadData

    ld = LoadData("s3://bucket/screen/csv/load_data.csv", pd.DataFrame(), ("DNA", "Actin"))
    row = pd.Series({"FileName_DNA": "a.tif", "PathName_DNA": "../images",
                     "FileName_Actin": "b.tif", "PathName_Actin": float("nan")})
    assert ld.site_files(row) == {"DNA": "s3://bucket/screen/images/a.tif", "Actin": "s3://bucket/screen/csv/b.tif"}


def test_loaddata_empty_identifier(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=2)
    _edit_csv(csv, lambda d: d.assign(Metadata_Site=[1, None]))
    with pytest.raises(RayscreenError, match=r"load_data.csv row 3: Metadata_Site is empty; expected a value in every "
                                             r"row \(plate 'PA', well 'A01'"):
        read_loaddata(str(csv))


def test_a_complete_well_whose_sites_changed_is_an_error_not_skipped(tmp_path):
    """A rerun skips complete wells; if the LoadData now lists another number of sites for
    one (images added since), keeping its old fields silently would lose the new ones."""
    csv = write_screen(tmp_path, plates=("PA",))
    full = pd.read_csv(csv, dtype=str)
    # first ingest: A01 imaged at one site only
    full[~((full["Metadata_Well"] == "A01") & (full["Metadata_Site"] == "2"))].to_csv(csv, index=False)
    uri, = ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    assert len(open_plate(uri).fields("A01")) == 1
    full.to_csv(csv, index=False)  # the second site of A01 arrives
    with pytest.raises(RayscreenError, match=r"plate 'PA' .*1 complete well.*A01 \(1 written, 2 in the LoadData\)"):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False)
    assert len(open_plate(uri).fields("A01")) == 1  # nothing was touched


@pytest.mark.parametrize("kwargs, expected", [
    ({"levels": 0}, r"levels=0: expected an integer >= 1"),
    ({"levels": -1}, r"levels=-1: expected an integer >= 1"),
    ({"wells_per_task": 0}, r"wells_per_task=0: expected an integer >= 1"),
    ({"wells_per_task": -2}, r"wells_per_task=-2: expected an integer >= 1"),
    ({"chunks": (1, 0, 8)}, r"chunks=\(1, 0, 8\): expected None or a \(c, y, x\) triple of integers >= 1"),
    ({"chunks": (1, 8)}, r"chunks=\(1, 8\): expected None or a \(c, y, x\) triple"),
    ({"ngff": "0.3"}, r"ngff='0.3': expected '0.4' or '0.5'"),
    # 24 x 30 images halve to 1 x 1 at level 4 (the fifth level) and to nothing after it
    ({"levels": 6}, r"levels=6: plate 'PA' has 24 x 30 images \(well A01 site 1\), which halve to nothing; "
                    r"expected at most 5 level\(s\)"),
])
def test_ingest_out_of_range_arguments_fail_before_writing(tmp_path, kwargs, expected):
    csv = write_screen(tmp_path, plates=("PA",))
    with pytest.raises(RayscreenError, match=expected):
        ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_ingest_most_levels_the_images_allow(tmp_path):
    csv = write_screen(tmp_path, plates=("PA",), wells=("A01",), sites=1)
    uri, = ingest(str(csv), str(tmp_path / "out"), use_ray=False, progress=False, levels=5)
    assert open_plate(uri).read("A01", 0, level=4).shape == (2, 1, 1)


def test_a_table_saved_in_another_encoding_is_named_not_a_traceback(tmp_path, capsys):
    """A CSV from Excel on Windows (cp1252 'µM') was a bare UnicodeDecodeError with exit code 1;
    UTF-8 with Excel's byte-order mark reads; an empty file is named too."""
    from rayscreen.store import read_platemap

    header = "Metadata_Plate,Metadata_Well,FileName_DNA,PathName_DNA,Metadata_Dose\n"
    latin = tmp_path / "ld.csv"
    latin.write_bytes((header + "P1,A01,a.tif,.,1 µM\n").encode("cp1252"))
    with pytest.raises(RayscreenError, match=r"LoadData CSV .*ld.csv: not UTF-8 text \(byte b'\\xb5' on line 2\); "
                                             r"save it as UTF-8"):
        read_loaddata(str(latin))
    assert main(["ingest", str(latin), str(tmp_path / "out"), "--no-ray"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    platemap = tmp_path / "pm.csv"
    platemap.write_bytes("Metadata_Well,Metadata_Dose\nA01,1 µM\n".encode("cp1252"))
    with pytest.raises(RayscreenError, match=r"platemap .*pm.csv: not UTF-8 text"):
        read_platemap(str(platemap))
    platemap.write_bytes("\ufeffMetadata_Well,Metadata_Dose\nA01,1 µM\n".encode("utf-8"))  # Excel's CSV UTF-8
    assert read_platemap(str(platemap))["Metadata_Dose"].tolist() == ["1 µM"]
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(RayscreenError, match=r"LoadData CSV .*empty.csv: the file is empty"):
        read_loaddata(str(empty))


def test_loaddata_by_plate_gives_each_plate_its_rows_only(tmp_path):
    """An ingest task gets its plate's rows (the whole table of a large screen was
    deserialised by every task), with the CSV's source and channels kept for its paths."""
    from rayscreen.ingest.loaddata import LoadData

    table = pd.DataFrame({"Metadata_Plate": ["P2", "P1", "P2", "P1"], "Metadata_Well": ["A01", "A01", "A02", "B01"],
                          "Metadata_Site": ["1"] * 4, "FileName_DNA": ["a", "b", "c", "d"], "PathName_DNA": ["x"] * 4})
    data = LoadData(str(tmp_path / "ld.csv"), table, ("DNA",))
    split = data.by_plate()
    assert list(split) == ["P1", "P2"]
    assert split["P1"].table["FileName_DNA"].tolist() == ["b", "d"]
    assert split["P2"].table["Metadata_Well"].tolist() == ["A01", "A02"]
    assert split["P1"].channels == ("DNA",) and split["P1"].image_path(split["P1"].table.iloc[0], "DNA") == \
        data.image_path(table.iloc[1], "DNA")


def test_a_semicolon_separated_csv_is_named_as_such(tmp_path):
    """A spreadsheet saved with ';' (many locales) was read as one column: 'missing required
    column(s) [...]' without a word on why."""
    from rayscreen.store import read_platemap

    path = tmp_path / "ld.csv"
    path.write_text("Metadata_Plate;Metadata_Well;Metadata_Site;FileName_DNA;PathName_DNA\nP1;A01;1;a.tif;.\n")
    with pytest.raises(RayscreenError, match=r"missing required column.*looks? separated by semicolons"):
        read_loaddata(str(path))
    path.write_text("Metadata_Well;Metadata_Dose\nA01;1\n")
    with pytest.raises(RayscreenError, match=r"expected a 'Metadata_Well' column.*separated by semicolons"):
        read_platemap(str(path))
