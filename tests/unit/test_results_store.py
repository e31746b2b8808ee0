"""The results store: xarray-readable layout, one chunk per well, done flags, resume, refusal."""

import os
import pickle

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rayscreen.store.results import (NotAResultsStoreError, ResultsLayoutError, ResultsWriter, Variable,
                                     create_results, open_results)
from rayscreen.store.errors import RayscreenError

WELLS = pd.DataFrame({"plate": ["P1", "P1", "P2"], "well": ["A01", "b2", "A/1"],
                      "Metadata_Compound": ["dmso", None, "taxol"], "Metadata_Dose": [0.0, 1.5, np.nan],
                      "Metadata_Rep": [1, 2, 3]})
SIZES = {"field": 2, "class": 2, "y": 2, "x": 3}
VARS = [Variable("field_status", ("well", "field"), "int8", fill=1),
        Variable("well_scores", ("well", "class"), "float32"),
        Variable("saliency", ("well", "field", "y", "x"), "float16", attrs={"units": "a.u."})]


def _create(uri, **kw):
    return create_results(str(uri), WELLS, SIZES, VARS, coords={"class": ["neg", "pos"]},
                          attrs={"model": "tiny"}, **kw)


def _values(k):
    sal = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) / 8 + k
    return {"field_status": np.array([0, 2]), "well_scores": np.array([0.25 + k / 10, 0.75 - k / 10]),
            "saliency": sal}


def test_layout_readable_by_plain_xarray(tmp_path):
    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    assert writer.keys == ["P1/A01", "P1/B02", "P2/A01"]
    writer.write_well(1, _values(1))
    writer.finalize(finished="now")
    ds = xr.open_zarr(str(uri))  # no rayscreen involved in reading
    assert list(ds["well"].values) == ["P1/A01", "P1/B02", "P2/A01"]
    assert list(ds["plate"].values) == ["P1", "P1", "P2"]
    assert list(ds["row"].values) == ["A", "B", "A"] and list(ds["column"].values) == [1, 2, 1]
    assert list(ds["Metadata_Compound"].values) == ["dmso", "", "taxol"]
    np.testing.assert_array_equal(ds["Metadata_Dose"].values, [0.0, 1.5, np.nan])
    assert list(ds["Metadata_Rep"].values) == [1, 2, 3]
    assert list(ds["class"].values) == ["neg", "pos"] and list(ds["field"].values) == [0, 1]
    assert ds["saliency"].dims == ("well", "field", "y", "x") and ds["saliency"].dtype == np.float16
    assert ds["saliency"].attrs["units"] == "a.u."
    # unwritten wells read as the fill: NaN floats, the integer fill unmasked (int8 stays int8)
    assert ds["field_status"].dtype == np.int8
    np.testing.assert_array_equal(ds["field_status"].values, [[1, 1], [0, 2], [1, 1]])
    np.testing.assert_allclose(ds["well_scores"].values[1], [0.35, 0.65], rtol=1e-6)
    assert np.isnan(ds["well_scores"].values[[0, 2]]).all()
    np.testing.assert_array_equal(ds["saliency"].values[1], _values(1)["saliency"].astype(np.float16))
    np.testing.assert_array_equal(ds["done"].values, [0, 1, 0])
    meta = ds.attrs["rayscreen"]
    assert meta["kind"] == "results" and meta["model"] == "tiny" and meta["finished"] == "now"
    assert meta["complete"] is False and meta["n_done"] == 1
    # consolidated metadata lives in the root document: opening reads one object
    import json
    root = json.loads((uri / "zarr.json").read_text())
    assert "well_scores" in root["consolidated_metadata"]["metadata"]
    assert open_results(str(uri))["well_scores"].shape == (3, 2)


def test_one_chunk_per_well_and_done_written(tmp_path):
    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    writer.write_well(2, _values(2))
    # well 2 owns exactly chunk 2 of each variable: nothing else exists yet
    assert sorted(os.listdir(uri / "well_scores" / "c")) == ["2"]
    assert sorted(os.listdir(uri / "saliency" / "c")) == ["2"]
    assert sorted(os.listdir(uri / "done" / "c")) == ["2"]
    assert writer.done_wells() == [2]


def test_rewrite_is_idempotent_bytes(tmp_path):
    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    writer.write_well(0, _values(0))
    before = (uri / "saliency" / "c" / "0" / "0" / "0" / "0").read_bytes()
    writer.write_well(0, _values(0))
    assert (uri / "saliency" / "c" / "0" / "0" / "0" / "0").read_bytes() == before
    other = _create(tmp_path / "other.zarr")
    other.write_well(0, _values(0))
    assert (tmp_path / "other.zarr" / "saliency" / "c" / "0" / "0" / "0" / "0").read_bytes() == before


def test_resume_keeps_done_wells_and_pickles(tmp_path):
    uri = tmp_path / "r.zarr"
    _create(uri).write_well(1, _values(1))
    again = _create(uri)  # same layout: reopened, not wiped
    assert again.done_wells() == [1]
    clone = pickle.loads(pickle.dumps(again))  # what a Ray worker receives
    clone.write_well(0, _values(0))
    assert again.done_wells() == [0, 1]
    assert again.index_of("P2", "a1") == 2
    with pytest.raises(RayscreenError, match="P3.*A01"):
        again.index_of("P3", "A01")


def test_other_layout_refused_unless_overwrite(tmp_path):
    uri = tmp_path / "r.zarr"
    _create(uri).write_well(1, _values(1))
    with pytest.raises(ResultsLayoutError, match=r"other wells, sizes or variables.*drops \['P2/A01'\]"):
        create_results(str(uri), WELLS.iloc[:2], SIZES, VARS, coords={"class": ["neg", "pos"]})
    with pytest.raises(ResultsLayoutError, match=r"variables that differ: \['extra'\]"):
        create_results(str(uri), WELLS, SIZES, VARS + [Variable("extra", ("well",), "float32")],
                       coords={"class": ["neg", "pos"]})
    fresh = create_results(str(uri), WELLS.iloc[:2], SIZES, VARS, coords={"class": ["neg", "pos"]},
                           overwrite=True)
    assert fresh.n_wells == 2 and fresh.done_wells() == []


def test_resume_with_other_settings_or_annotations_is_refused(tmp_path):
    """A rerun with another model (or stream, or scoring settings) would leave the done wells
    computed one way and the rest another; changed annotations would be stale coordinates."""
    uri = tmp_path / "r.zarr"
    _create(uri, settings={"model": "aaaa", "stream.level": 0}).write_well(1, _values(1))
    assert _create(uri, settings={"model": "aaaa", "stream.level": 0}).done_wells() == [1]  # same: resumed
    with pytest.raises(ResultsLayoutError, match=r"model \('aaaa' -> 'bbbb'\).*overwrite: true"):
        _create(uri, settings={"model": "bbbb", "stream.level": 0})
    with pytest.raises(ResultsLayoutError, match=r"stream.level \(0 -> 1\)"):
        _create(uri, settings={"model": "aaaa", "stream.level": 1})
    fixed = WELLS.assign(Metadata_Compound=["dmso", "nocodazole", "taxol"])
    with pytest.raises(ResultsLayoutError, match=r"annotation Metadata_Compound \(well P1/B02: '' -> 'nocodazole'\)"):
        create_results(str(uri), fixed, SIZES, VARS, coords={"class": ["neg", "pos"]},
                       settings={"model": "aaaa", "stream.level": 0})
    with pytest.raises(ResultsLayoutError, match=r"annotation Metadata_MOA \(new\)"):
        create_results(str(uri), WELLS.assign(Metadata_MOA="x"), SIZES, VARS, coords={"class": ["neg", "pos"]},
                       settings={"model": "aaaa", "stream.level": 0})
    assert _create(uri, settings={"model": "aaaa", "stream.level": 0}).done_wells() == [1]  # nothing was touched
    nan = tmp_path / "nan.zarr"
    _create(nan, settings={"infer.mask_threshold": float("nan"), "channels": ("DNA",)}).write_well(0, _values(0))
    # the same settings again, NaN and tuple included: resumed (NaN != NaN must not refuse it)
    assert _create(nan, settings={"infer.mask_threshold": float("nan"), "channels": ["DNA"]}).done_wells() == [0]
    assert _create(uri, settings={"model": "bbbb"}, overwrite=True).done_wells() == []


def test_an_interrupted_creation_is_created_again(tmp_path):
    """xarray writes the root attrs before the arrays: a creation cut short must not look
    like a store to resume (it would fail later on a missing array, naming none)."""
    import shutil

    import zarr

    uri = tmp_path / "r.zarr"
    _create(uri)
    assert zarr.open_group(str(uri), mode="r").attrs["rayscreen"]["layout_hash"]  # set once complete
    # what a killed creation leaves: the root attrs of the start, some arrays missing
    root = zarr.open_group(str(uri), mode="r+")
    root.attrs["rayscreen"] = {**root.attrs["rayscreen"], "layout_hash": None}
    shutil.rmtree(uri / "done")
    with pytest.raises(RayscreenError, match="creation was interrupted"):  # a reader is told, not misled
        open_results(str(uri))
    writer = _create(uri)
    assert writer.done_wells() == [] and (uri / "done").exists()
    writer.write_well(0, _values(0))
    assert _create(uri).done_wells() == [0]


def test_foreign_output_refused_unless_overwrite(tmp_path):
    uri = tmp_path / "r.zarr"
    uri.mkdir()
    (uri / "precious.txt").write_text("not yours")
    with pytest.raises(NotAResultsStoreError, match="not a rayscreen results store.*overwrite"):
        _create(uri)
    assert (uri / "precious.txt").exists()
    writer = _create(uri, overwrite=True)
    assert not (uri / "precious.txt").exists() and writer.done_wells() == []
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    _create(empty)  # an empty directory is fine


def test_write_well_checks_names_and_shapes(tmp_path):
    writer = _create(tmp_path / "r.zarr")
    vals = _values(0)
    with pytest.raises(RayscreenError, match="missing \\['saliency'\\]"):
        writer.write_well(0, {k: v for k, v in vals.items() if k != "saliency"})
    with pytest.raises(RayscreenError, match="P1/A01.*well_scores has shape \\(3,\\)"):
        writer.write_well(0, {**vals, "well_scores": np.zeros(3)})
    with pytest.raises(RayscreenError, match="index 5"):
        writer.write_well(5, vals)
    assert writer.done_wells() == []


def test_bad_definitions_named(tmp_path):
    with pytest.raises(RayscreenError, match="must start with 'well'"):
        Variable("x", ("field",), "float32")
    with pytest.raises(RayscreenError, match="no size given for dims \\['feature'\\]"):
        create_results(str(tmp_path / "a"), WELLS, SIZES, [Variable("p", ("well", "feature"), "float32")])
    with pytest.raises(RayscreenError, match="wells listed twice"):
        create_results(str(tmp_path / "b"), pd.concat([WELLS, WELLS.iloc[:1]]), SIZES, VARS)


def test_resume_sweeps_the_temporary_files_of_killed_writes(tmp_path):
    """A worker killed inside zarr's write (temp file, then rename) leaves "<chunk>.<hex>.partial";
    reopening to resume removes it and nothing else."""
    uri = tmp_path / "r.zarr"
    _create(uri).write_well(1, _values(1))
    chunk_dir = uri / "well_scores" / "c" / "0"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    litter = chunk_dir / f"0.{'ab12' * 8}.partial"
    litter.write_bytes(b"half a chunk")
    keep = chunk_dir / "notes.partial"  # not zarr's name pattern: not ours to delete
    keep.write_bytes(b"x")
    before = sorted(p.name for p in (uri / "well_scores" / "c").rglob("*") if p.is_file() and p != litter)
    again = _create(uri)
    assert not litter.exists()
    assert keep.exists()
    assert sorted(p.name for p in (uri / "well_scores" / "c").rglob("*") if p.is_file()) == before
    assert again.done_wells() == [1]


def _read_errors(values, at):
    return (values == 2).any(axis=1)


def test_wells_with_read_errors_are_reopened_for_a_rerun(tmp_path):
    """A field recorded as a read error may have been transient: a rerun clears the done flag
    of the wells that hold one (and only those), before anything is rewritten."""
    writer = _create(tmp_path / "r.zarr")
    clean = dict(_values(0), field_status=np.array([0, 0]))
    writer.write_well(0, clean)
    writer.write_well(1, _values(1), retry=True)  # field 1 is a read error
    writer.write_well(2, clean)
    writer.finalize()
    assert open_results(str(tmp_path / "r.zarr")).attrs["rayscreen"]["complete"] is True
    assert writer.reopen_wells("field_status", _read_errors) == [1]
    assert writer.done_wells() == [0, 2]
    # a rerun that dies now must not leave the store saying it is complete
    attrs = open_results(str(tmp_path / "r.zarr")).attrs["rayscreen"]
    assert attrs["complete"] is False and attrs["n_done"] == 2
    assert writer.reopen_wells("field_status", _read_errors) == []  # not done: nothing more to reopen
    writer.write_well(1, dict(_values(1), field_status=np.array([0, 0])))  # read this time
    assert writer.reopen_wells("field_status", _read_errors) == [] and writer.done_wells() == [0, 1, 2]


def test_flags_are_stored_chunks_listed_not_read(tmp_path):
    """done and retry exist as chunks only where they are 1, and the stage start lists them;
    select sees only the done wells flagged retry. A clean write never deletes (no request per
    well): a stale retry flag stays until its well is reopened, and select re-checks it."""
    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    clean = dict(_values(1), field_status=np.array([0, 0]))
    writer.write_well(0, _values(0), retry=True)
    writer.write_well(1, clean)
    writer.write_well(2, _values(2), retry=True)
    assert sorted(os.listdir(uri / "done" / "c")) == ["0", "1", "2"]
    assert sorted(os.listdir(uri / "retry" / "c")) == ["0", "2"]
    (uri / "done" / "c" / ("1." + "0" * 32 + ".partial")).write_bytes(b"")  # a killed local write's litter
    (uri / "done" / "c" / "17").write_bytes(b"")  # a key past the wells: not a flag of this store
    flag = (uri / "done" / "c" / "1").read_bytes()
    (uri / "done" / "c" / "1").write_bytes(b"not a chunk")  # listed, never read
    assert writer.done_wells() == [0, 1, 2]
    (uri / "done" / "c" / "1").write_bytes(flag)
    writer.write_well(2, dict(_values(2), field_status=np.array([0, 0])))  # read this time
    assert sorted(os.listdir(uri / "retry" / "c")) == ["0", "2"]  # not deleted by the clean write
    seen = []

    def select(values, at):
        seen.append(at.tolist())
        assert values.shape == (len(at), 2)  # field_status of those wells only
        return (values == 2).any(axis=1)

    assert writer.reopen_wells("field_status", select) == [0] and seen == [[0, 2]]  # 2's flag was stale
    assert sorted(f for f in os.listdir(uri / "done" / "c") if f.isdigit()) == ["1", "17", "2"]
    assert sorted(os.listdir(uri / "retry" / "c")) == ["2"]  # cleared with the reopened well's done
    assert open_results(str(uri))["done"].values.tolist() == [0, 1, 1]


def test_a_store_from_before_flags_by_presence_is_read_chunk_by_chunk(tmp_path):
    """Older stores wrote explicit 0 chunks for cleared done flags and had no retry flags: a
    listing would count the 0s as done. They are read as then, and every done well is offered
    to select."""
    import zarr

    uri = tmp_path / "old.zarr"
    writer = _create(uri)
    for i in range(3):
        writer.write_well(i, _values(i))
    root = zarr.open_group(str(uri), mode="r+")
    ns = dict(root.attrs["rayscreen"])
    del ns["flags_by_presence"]
    root.attrs["rayscreen"] = ns
    zarr.open_array(str(uri / "done"), mode="r+").with_config({"write_empty_chunks": True})[1] = 0  # as then
    assert (uri / "done" / "c" / "1").exists()
    old = ResultsWriter(str(uri))
    assert old.done_wells() == [0, 2]
    seen = []
    assert old.reopen_wells("field_status", lambda v, at: seen.append(at.tolist()) or _read_errors(v, at)) == [0, 2]
    assert seen == [[0, 2]] and old.done_wells() == []
    old.write_well(1, _values(1), retry=True)  # no retry flag written into an old store
    assert old.done_wells() == [1] and not (uri / "retry" / "c").exists()


def test_flags_listed_on_s3(s3_bucket):
    """The listing on an object store (moto's S3 server): done and retry wells found from the
    keys, a cleared flag's key deleted."""
    import s3fs

    bucket, options = s3_bucket
    uri = f"{bucket}/r.zarr"
    writer = create_results(uri, WELLS, SIZES, VARS, coords={"class": ["neg", "pos"]}, storage_options=options)
    writer.write_well(0, _values(0))
    writer.write_well(2, _values(2), retry=True)
    assert writer.done_wells() == [0, 2]
    # s3fs would keep every listed key (~650 B each, 384k wells) in its directory cache for good
    assert not [k for k in writer._store.fs.dircache if "/done/c" in k or "/retry/c" in k]
    assert writer.reopen_wells("field_status", _read_errors) == [2]
    fs = s3fs.S3FileSystem(**options)
    fs.invalidate_cache()
    assert sorted(k.rsplit("/", 1)[1] for k in fs.find(f"{uri}/done/c")) == ["0"]
    assert ResultsWriter(uri, options).done_wells() == [0]


def test_wells_of_a_plate_whose_corrections_changed_are_reopened(tmp_path):
    """A plate's stored corrections refitted since its wells were written: those wells (and
    only those) are reopened, with a warning naming the plate, before the new versions are
    recorded. A plate with no recorded version (an older store) is taken as it is."""
    writer = _create(tmp_path / "r.zarr")
    for i in range(3):
        writer.write_well(i, _values(i))
    writer.finalize()
    assert writer.reopen_changed_plates({"P1": "aaa", "P2": None}) == {}  # first record: nothing to compare
    assert writer.reopen_changed_plates({"P1": "aaa", "P2": None}) == {}
    with pytest.warns(UserWarning, match=r"'P1' \(2 wells\)"):
        assert writer.reopen_changed_plates({"P1": "bbb", "P2": None}) == {"P1": 2}
    assert writer.done_wells() == [2]
    attrs = open_results(str(tmp_path / "r.zarr")).attrs["rayscreen"]
    assert attrs["complete"] is False and attrs["n_done"] == 1
    assert attrs["plate_versions"] == {"P1": "bbb", "P2": None}
    with pytest.warns(UserWarning, match=r"1 plate\(s\) .*'P2' \(1 wells\)"):
        assert writer.reopen_changed_plates({"P1": "bbb", "P2": "ccc"}) == {"P2": 1}
    assert writer.done_wells() == []

    old = _create(tmp_path / "old.zarr")
    old.write_well(0, _values(0))
    import zarr  # as a store written before versions were recorded: no plate_versions at all

    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    root.attrs["rayscreen"] = {k: v for k, v in root.attrs["rayscreen"].items() if k != "plate_versions"}
    old = ResultsWriter(str(tmp_path / "old.zarr"))  # reopened, as a later run does
    with pytest.warns(UserWarning, match="did not record the plates' corrections.*overwrite: true"):
        assert old.reopen_changed_plates({"P1": "zzz"}) == {} and old.done_wells() == [0]


def test_write_variable_rewrites_one_variable_of_done_wells_and_nothing_else(tmp_path):
    """QC changes only the field statuses of finished wells: one concurrent write of those
    chunks, the wells' other variables and their flags as they were."""
    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    for i in range(3):
        writer.write_well(i, _values(i), retry=i == 2)
    before = open_results(str(uri)).load()
    writer.write_variable("field_status", np.array([0, 2]), np.array([[3, 0], [3, 3]]))
    after = open_results(str(uri)).load()
    assert after["field_status"].values.tolist() == [[3, 0], [0, 2], [3, 3]]
    for name in ("well_scores", "saliency", "done", "retry"):
        xr.testing.assert_identical(after[name], before[name])
    with pytest.raises(RayscreenError, match=r"field_status values of shape \(2,\) for 1 wells; expected \(1, 2\)"):
        writer.write_variable("field_status", np.array([1]), np.array([3, 3]))
    writer.write_variable("field_status", np.array([], np.int64), np.zeros((0, 2)))  # nothing to do


def test_done_wells_mask_reads_a_store_without_writing_to_it(tmp_path):
    """The report's view of the finished wells: listed from a read-only store."""
    from rayscreen.store.results import done_wells_mask

    uri = tmp_path / "r.zarr"
    writer = _create(uri)
    writer.write_well(0, _values(0))
    writer.write_well(2, _values(2), retry=True)
    assert done_wells_mask(str(uri)).tolist() == [True, False, True]
    writer.reopen_wells("field_status", lambda values, at: at == 2)
    assert done_wells_mask(str(uri)).tolist() == [True, False, False]


def test_a_stage_start_lists_the_done_flags_once(tmp_path):
    """The stage start lists the done flags once (about 400 requests at 384k wells on S3) and
    hands the mask to both reopen steps, which clear their wells in it: the mask then matches
    a fresh listing, and each step works from the mask it is given, not a listing of its own."""
    writer = _create(tmp_path / "r.zarr")
    writer.write_well(0, _values(0), retry=True)  # plate P1
    writer.write_well(1, _values(1))  # P1
    writer.write_well(2, _values(2), retry=True)  # P2, a read error in field 1
    writer.reopen_changed_plates({"P1": "a", "P2": "a"})
    stale = writer.done_mask()
    stale[[0, 2]] = False  # as if listed before wells 0 and 2 were written: no listing of its own
    assert writer.reopen_wells("field_status", _read_errors, stale) == [] and writer.done_wells() == [0, 1, 2]

    done = writer.done_mask()
    with pytest.warns(UserWarning, match=r"'P1' \(2 wells\)"):
        assert writer.reopen_changed_plates({"P1": "b", "P2": "a"}, done) == {"P1": 2}
    assert done.tolist() == [False, False, True]
    seen = []
    assert writer.reopen_wells("field_status", lambda v, at: seen.append(at.tolist()) or _read_errors(v, at),
                               done) == [2]
    assert seen == [[2]]  # well 0's retry flag is set, but P1's refit already reopened it
    assert done.tolist() == writer.done_mask().tolist() == [False, False, False]
    writer.finalize(done=done)
    assert open_results(str(tmp_path / "r.zarr")).attrs["rayscreen"]["n_done"] == 0
