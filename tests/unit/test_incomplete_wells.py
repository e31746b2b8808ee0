"""A plate whose ingest did not finish: its listed wells without metadata are an unfinished
write, not a sparse plate. The stream must not pass over them silently (a stage would
record them done, and a rerun after the ingest finished would never score them)."""

import numpy as np
import pytest

from rayscreen.store import IncompleteWellError, MissingWellError, create_plate, open_plate
from rayscreen.store.plate import wells_to_retry
from rayscreen.store.results import create_results, Variable
from rayscreen.stream.datasource import StreamOptions, load_error_report, plan_wells, read_wells
from rayscreen.stream.illumination import select_fields


def half_ingested(tmp_path):
    """A01 complete (2 fields), A02 one field written then stopped, B01 never started."""
    uri = str(tmp_path / "p.zarr")
    writer = create_plate(uri, "P", ["A01", "A02", "B01"], ["DNA"], (8, 8), "uint8", 1)
    for f in range(2):
        writer.write_field("A01", f, np.full((1, 8, 8), f + 1, np.uint8))
    writer.complete_well("A01", 2)
    writer.write_field("A02", 0, np.ones((1, 8, 8), np.uint8))
    return uri


def test_the_stream_stops_at_a_well_the_ingest_did_not_finish(tmp_path):
    uri = half_ingested(tmp_path)
    with pytest.raises(IncompleteWellError, match=r"plate 'P' .*well A02 was not completed by the writer.*"
                                                  r"`rayscreen ingest` resumes.*stream.on_error: skip"):
        list(read_wells(plan_wells([uri]), StreamOptions()))
    # skipping, each is reported and the rest streams
    report = str(tmp_path / "errors")
    batches = list(read_wells(plan_wells([uri]), StreamOptions(on_error="skip", error_report=report)))
    assert [(w, f) for b in batches for w, f in zip(b["well"], b["field"])] == [("A01", "0"), ("A01", "1")]
    assert load_error_report(report)[["well", "kind"]].values.tolist() == [["A02", "missing well"],
                                                                           ["B01", "missing well"]]
    # a correction fitted on part of the plate would be kept as the plate's: refused too
    with pytest.raises(IncompleteWellError, match="well A02"):
        select_fields(open_plate(uri), None)


def test_a_sparse_plate_of_another_tool_is_not_an_unfinished_ingest(tmp_path):
    """Without rayscreen's layout record (another writer), a listed well absent on disk is
    a sparse plate: reported, never fatal, as before."""
    import zarr

    uri = half_ingested(tmp_path)
    root = zarr.open_group(uri, mode="r+")
    attrs = dict(root.attrs["rayscreen"])
    del attrs["layout"]
    root.attrs["rayscreen"] = attrs
    plate = open_plate(uri)
    assert not plate.written_by_rayscreen
    with pytest.raises(MissingWellError) as caught:
        plate.fields("B01")
    assert not isinstance(caught.value, IncompleteWellError)
    batches = list(read_wells(plan_wells([uri]), StreamOptions()))
    assert sum(len(b["well"]) for b in batches) == 2
    assert [w for w, f in select_fields(plate, None)] == ["A01", "A01"]


def test_wells_with_no_field_at_all_are_reopened_for_a_rerun(tmp_path):
    """A stage records a well it found nothing of with every field slot absent; the next run
    looks for it again (one metadata read) instead of keeping it done for good. A well with
    some fields, or no slots, is left alone."""
    import pandas as pd

    wells = pd.DataFrame({"plate": "P", "well": ["A01", "A02", "B01"]})
    writer = create_results(str(tmp_path / "r.zarr"), wells, {"field": 2},
                            [Variable("field_status", ("well", "field"), "int8", 1)], kind="results")
    statuses = [np.array([0, 1], np.int8),  # one field, one slot unused
                np.array([1, 1], np.int8),  # nothing on disk
                np.array([2, 1], np.int8)]  # a read error
    assert wells_to_retry(np.stack(statuses), 2, 1).tolist() == [False, True, True]
    assert wells_to_retry(np.zeros((1, 0), np.int8), 2, 1).tolist() == [False]  # no slots: nothing to find
    for i, status in enumerate(statuses):
        writer.write_well(i, {"field_status": status}, retry=bool(wells_to_retry(status, 2, 1)[0]))
    writer.finalize()
    assert writer.reopen_wells("field_status", lambda v, at: (v == 1).all(axis=1)) == [1]
    assert writer.done_wells() == [0, 2]
    assert writer.reopen_wells("field_status", lambda v, at: (v == 2).any(axis=1)) == [2]


def test_a_well_of_several_acquisitions_is_refused_rather_than_pooled(tmp_path):
    """Two acquisitions are two imaging runs of a well (before / after, another objective);
    the stream pooled both runs' fields as one well's, under one weak label. A plate that
    lists several acquisitions but whose wells each hold one run streams."""
    import zarr

    from rayscreen.testing.plates import make_two_acquisition_plate

    uri = make_two_acquisition_plate(str(tmp_path / "acq.zarr"))
    message = r"plate 'acq' well B03: fields of 2 acquisitions \(1 \('before'\), 2 \('after'\)\)"
    with pytest.raises(Exception, match=message):
        list(read_wells(plan_wells([uri]), StreamOptions()))
    with pytest.raises(Exception, match=message):
        select_fields(open_plate(uri), None)
    # the well's images from one acquisition: streamed, though the plate lists two
    well = zarr.open_group(uri, mode="r+")["B/3"]
    well.attrs["well"] = {"version": "0.4", "images": [{"path": "0", "acquisition": 1},
                                                       {"path": "1", "acquisition": 1}]}
    batches = list(read_wells(plan_wells([uri]), StreamOptions()))
    assert [f for b in batches for f in b["field"]] == ["0", "1"]


def test_illum_leaves_out_unwritten_wells_when_skipping_and_refits_once_they_are_written(tmp_path):
    """With stream.on_error: skip the fitters go on without the wells an ingest has not
    written, and record them, so the next run (ingest finished) fits the whole plate again
    rather than calling the partial fit up to date."""
    from rayscreen.stream.fit import compute_illumination, fit_normalization
    from rayscreen.stream.illumination import illumination_entry
    from rayscreen.stream.normalize import normalization_entry

    uri = half_ingested(tmp_path)
    kw = dict(use_ray=False, progress=False)
    with pytest.raises(IncompleteWellError, match="well A02"):
        compute_illumination(uri, **kw)
    assert compute_illumination(uri, skip_incomplete=True, **kw) == {uri: "computed"}
    assert illumination_entry(uri)["params"]["incomplete_wells"] == ["A02", "B01"]
    assert illumination_entry(uri)["fields"] == 2
    assert fit_normalization(uri, illumination=True, skip_incomplete=True, **kw) == {uri: "fitted"}
    assert normalization_entry(uri)["fit"]["incomplete_wells"] == ["A02", "B01"]

    writer = open_plate_writer(uri)
    writer.write_field("A02", 1, np.ones((1, 8, 8), np.uint8))
    writer.complete_well("A02", 2)
    writer.write_field("B01", 0, np.ones((1, 8, 8), np.uint8))
    writer.complete_well("B01", 1)
    assert compute_illumination(uri, skip_incomplete=True, **kw) == {uri: "computed"}
    assert "incomplete_wells" not in illumination_entry(uri)["params"] and illumination_entry(uri)["fields"] == 5
    assert fit_normalization(uri, illumination=True, skip_incomplete=True, **kw) == {uri: "fitted"}
    assert compute_illumination(uri, skip_incomplete=True, **kw) == {uri: "skipped"}
    assert fit_normalization(uri, illumination=True, skip_incomplete=True, **kw) == {uri: "skipped"}


def test_the_illum_stage_counts_the_wells_it_left_for_later(tmp_path):
    from rayscreen.config import config_from_dict
    from rayscreen.stream.fit import run_illum

    uri = half_ingested(tmp_path)
    config = config_from_dict({"plates": [uri], "output": str(tmp_path / "out"),
                               "stream": {"illumination": True, "on_error": "skip"}})
    assert run_illum(config, progress=False)["wells_to_retry"] == 4  # A02 and B01, in the function and the scaler
    writer = open_plate_writer(uri)
    writer.write_field("A02", 1, np.ones((1, 8, 8), np.uint8))
    writer.complete_well("A02", 2)
    writer.write_field("B01", 0, np.ones((1, 8, 8), np.uint8))
    writer.complete_well("B01", 1)
    assert run_illum(config, progress=False)["wells_to_retry"] == 0


def open_plate_writer(uri):
    from rayscreen.store import create_plate

    # create_plate on an existing plate of the same layout reopens it (the ingest's resume)
    return create_plate(uri, "P", ["A01", "A02", "B01"], ["DNA"], (8, 8), "uint8", 1)


def test_profile_plans_a_sparse_plate_of_another_tool(tmp_path):
    """An ome-zarr-py plate without field_count, a listed well never imaged: planning the
    profile stage asked that well for its fields and failed (infer planned it)."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    from rayscreen.config import config_from_dict
    from rayscreen.profile.run import plan_profile

    uri = str(tmp_path / "sparse.zarr")
    import zarr

    root = zarr.open_group(uri, mode="w", zarr_format=2)
    write_plate_metadata(root, ["A"], ["1", "2"], ["A/1", "A/2"], fmt=FormatV04())
    well = root.require_group("A/1")
    write_well_metadata(well, [{"path": "0"}], fmt=FormatV04())
    write_image(np.ones((2, 32, 32), np.uint16), well.require_group("0"), axes="cyx", fmt=FormatV04())
    plan = plan_profile(config_from_dict({"plates": [uri], "output": str(tmp_path / "out"),
                                          "stream": {"normalize": "none"}}))
    assert plan["n_fields"] == 1 and plan["fields"] == {("sparse", "A01"): ["0"], ("sparse", "A02"): []}


def test_unfinished_wells_are_no_field_wells_of_plates_rayscreen_wrote(tmp_path):
    import zarr

    from rayscreen.store.plate import unfinished_wells

    ours = half_ingested(tmp_path)
    theirs = str(tmp_path / "theirs.zarr")
    import shutil

    shutil.copytree(ours, theirs)
    root = zarr.open_group(theirs, mode="r+")
    root.attrs["rayscreen"] = {k: v for k, v in root.attrs["rayscreen"].items() if k != "layout"}
    uris = np.array([ours, ours, theirs, theirs], dtype=object)
    assert unfinished_wells(np.array([False, True, False, True]), uris).tolist() == [False, True, False, False]
    # nothing without a field: no plate is opened (a missing one would raise)
    assert not unfinished_wells(np.zeros(2, bool), np.array(["/nowhere.zarr"] * 2, dtype=object)).any()
