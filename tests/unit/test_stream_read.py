"""The stream's read loop without Ray: columns of mixed plates, plate lists, tiles that do not fit."""

import pandas as pd
import pytest

from rayscreen.store import BadImageError, RayscreenError
from rayscreen.store.uri import expand_uris
from rayscreen.stream.datasource import StreamOptions, WellTask, plan_wells, read_wells
from rayscreen.testing import make_plate


def _two_plates(tmp_path):
    """Plate A annotates the compound, plate B the gene: no column in common but the well."""
    a = make_plate(str(tmp_path / "A.zarr"), "A", wells=("A01",), fields=1,
                   annotations=pd.DataFrame({"Metadata_Well": ["A01"], "Metadata_Compound": ["DMSO"]}))
    b = make_plate(str(tmp_path / "B.zarr"), "B", wells=("A01",), fields=1,
                   annotations=pd.DataFrame({"Metadata_Well": ["A01"], "Metadata_Gene": ["TP53"]}))
    return a, b


def test_a_block_of_several_plates_keeps_every_plates_annotation_columns(tmp_path):
    a, b = _two_plates(tmp_path)
    # tasks as a caller may build them: each with its own plate's columns only
    tasks = [WellTask(a, "A", "A01", {"Metadata_Compound": "DMSO"}), WellTask(b, "B", "A01", {"Metadata_Gene": "TP53"})]
    (batch,) = read_wells(tasks, StreamOptions(fields_per_block=4))
    assert batch["Metadata_Compound"].tolist() == ["DMSO", None]
    assert batch["Metadata_Gene"].tolist() == [None, "TP53"]


def test_planned_wells_all_carry_the_union_of_the_plates_columns(tmp_path):
    """So blocks holding one plate only have the same columns as mixed blocks."""
    a, b = _two_plates(tmp_path)
    tasks = plan_wells([a, b])
    assert [t.annotations for t in tasks] == [
        {"Metadata_Well": "A01", "Metadata_Compound": "DMSO", "Metadata_Gene": None},
        {"Metadata_Well": "A01", "Metadata_Compound": None, "Metadata_Gene": "TP53"},
    ]
    (batch_a,) = read_wells(tasks[:1], StreamOptions())
    (batch_b,) = read_wells(tasks[1:], StreamOptions())
    assert set(batch_a) == set(batch_b)


def test_overlapping_globs_list_each_plate_once_in_first_order(tmp_path):
    for name in ("A", "B"):
        make_plate(str(tmp_path / "screen" / f"{name}.zarr"), name, wells=("A01",), fields=1)
    a, b = str(tmp_path / "screen" / "A.zarr"), str(tmp_path / "screen" / "B.zarr")
    assert expand_uris([str(tmp_path / "screen" / "*.zarr"), a]) == [a, b]
    assert expand_uris([b + "/", str(tmp_path / "screen" / "*.zarr/"), b]) == [b, a]


def test_a_tile_larger_than_a_field_fails_naming_the_key_and_field_even_when_skipping(tmp_path):
    """A settings/data mismatch, not a bad field: skipping it would skip every field."""
    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01",), fields=1, field_shape=(32, 40))
    report = str(tmp_path / "errors")
    for on_error in ("raise", "skip"):
        with pytest.raises(RayscreenError, match=r"stream.tile \(64, 64\).*plate 'P' well A01 field 0.*32 x 40"):
            list(read_wells(plan_wells([uri]), StreamOptions(tile=(64, 64), on_error=on_error, error_report=report)))


def test_fields_of_different_shapes_in_one_block_name_both_fields(tmp_path):
    """read_plates rejects such plates up front; read_wells called directly says which fields differ."""
    a = make_plate(str(tmp_path / "A.zarr"), "A", wells=("A01",), fields=1, field_shape=(32, 40))
    b = make_plate(str(tmp_path / "B.zarr"), "B", wells=("A01",), fields=1, field_shape=(48, 40))
    with pytest.raises(BadImageError, match=r"plate 'B' well A01 field 0 .*\(2, 48, 40\).*plate 'A' well A01 field 0"):
        list(read_wells(plan_wells([a, b]), StreamOptions(fields_per_block=4)))
    # in blocks of one field each, nothing is stacked together
    assert [batch["image"].shape for batch in read_wells(plan_wells([a, b]), StreamOptions(fields_per_block=1))] == [
        (1, 2, 32, 40), (1, 2, 48, 40)]


def _plate_with_a_nan_pixel(tmp_path):
    """A float plate as another tool may write it: one NaN pixel in well A01 field 0."""
    import numpy as np
    import zarr

    from rayscreen.store import open_plate

    uri = make_plate(str(tmp_path / "F.zarr"), "F", dtype="float32", field_shape=(32, 32), fields=2)
    arr = zarr.open_group(uri, mode="r+")[open_plate(uri).well_path("A01") + "/0/0"]
    data = arr[...]
    data[..., 0, 5, 5] = np.nan
    arr[...] = data
    return uri


def test_a_nan_pixel_is_a_bad_field_named_in_reads_fits_and_skipping_streams(tmp_path):
    """One NaN pixel used to turn the plate's illumination function into ones and its
    normaliser's offset into NaN, so every field of the plate streamed as NaN, unreported."""
    from rayscreen.store import open_plate
    from rayscreen.stream.fit import compute_illumination, fit_normalization

    uri = _plate_with_a_nan_pixel(tmp_path)
    with pytest.raises(BadImageError, match=r"plate 'F' well A01 field 0: 1 NaN/Inf pixel"):
        open_plate(uri).read("A01", 0)
    assert open_plate(uri).read("A01", 1).shape == (2, 32, 32)  # the other fields read as before
    for fit in (lambda: compute_illumination(uri, use_ray=False, progress=False),
                lambda: fit_normalization(uri, "percentile", use_ray=False, progress=False)):
        with pytest.raises(BadImageError, match="plate 'F' well A01 field 0"):
            fit()
    report = tmp_path / "errors"
    batches = list(read_wells(plan_wells([uri]), StreamOptions(on_error="skip", error_report=str(report))))
    streamed = {(w, f) for b in batches for w, f in zip(b["well"], b["field"])}
    assert ("A01", "0") not in streamed and ("A01", "1") in streamed and len(streamed) == 7
    from rayscreen.stream.datasource import load_error_report

    recorded = load_error_report(str(report))
    assert recorded[["well", "field", "kind"]].values.tolist() == [["A01", "0", "BadImageError"]]


def test_fields_of_another_shape_are_named_by_the_illumination_fit(tmp_path):
    import numpy as np
    import zarr

    from rayscreen.store import open_plate
    from rayscreen.stream.fit import compute_illumination

    uri = make_plate(str(tmp_path / "P.zarr"), fields=1)
    path = open_plate(uri).well_path("B01") + "/0/0"
    group = zarr.open_group(uri, mode="r+")
    old = group[path]
    group.create_array(path, shape=(2, 30, 40), dtype=old.dtype, chunks=(1, 30, 40), overwrite=True,
                       dimension_names=("c", "y", "x"))[...] = np.ones((2, 30, 40), old.dtype)
    with pytest.raises(BadImageError, match=r"plate 'P1' well B01 field 0: field shape \(2, 30, 40\) differs"):
        compute_illumination(uri, use_ray=False, progress=False)
    # split into one task per field, the shapes first meet when the driver merges: the plate is named
    with pytest.raises(BadImageError, match=r"P\.zarr: cannot merge .* expected every field of a plate"):
        compute_illumination(uri, use_ray=False, progress=False, fields_per_task=1)


def test_a_channel_index_the_plate_lacks_is_refused_naming_its_channels(tmp_path):
    from rayscreen.store import open_plate

    plate = open_plate(make_plate(str(tmp_path / "P.zarr"), fields=1))
    with pytest.raises(RayscreenError, match=r"plate 'P1' has no channel index 5; it has 2 channels \['DNA', 'Actin'\]"):
        plate.read("A01", 0, channels=[5])
    assert (plate.read("A01", 0, channels=[-1]) == plate.read("A01", 0, channels=["Actin"])).all()


# -- fields read ahead in threads (StreamOptions.read_threads)


def test_prefetched_keeps_order_bounds_the_window_and_passes_unwanted_items(tmp_path):
    import threading
    import time

    from rayscreen.stream.datasource import prefetched

    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (7 - i % 7))  # later items finish first: order must come from the items
        if i == 5:
            raise ValueError("item 5")
        return i * 10

    drawn = []

    def items():
        for i in range(12):
            drawn.append(i)
            yield i

    out, ahead = [], []
    for item, future in prefetched(work, items(), threads=3, wanted=lambda i: i != 4):
        ahead.append(len(drawn) - 1 - item)  # items drawn beyond the one handed out
        if future is None:
            out.append((item, None))
            continue
        try:
            out.append((item, future.result()))
        except ValueError as e:
            out.append((item, str(e)))
    assert out == [(i, None if i == 4 else "item 5" if i == 5 else i * 10) for i in range(12)]
    assert max(ahead) == 2  # the window: `threads` items submitted, one of them handed out
    assert 4 not in started and sorted(started) == [i for i in range(12) if i != 4]


def test_prefetched_with_one_thread_runs_each_item_in_its_turn():
    from rayscreen.stream.datasource import prefetched

    calls = []
    gen = prefetched(lambda i: calls.append(i) or i, range(3), threads=1)
    item, future = next(gen)
    assert calls == [0] and future.result() == 0  # nothing read ahead


def _damaged_plate(tmp_path):
    """4 wells x 3 fields; well A02 field 1 lost a chunk, well B01 is listed but never written."""
    import os
    import shutil

    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01", "A02", "B01", "B02"), fields=3,
                     field_shape=(16, 24))
    os.remove(os.path.join(uri, "A", "2", "1", "0", "c", "0", "0", "0"))
    shutil.rmtree(os.path.join(uri, "B", "1"))
    return uri


@pytest.mark.parametrize("threads", [2, 8])
def test_reading_ahead_gives_the_rows_and_reports_of_a_plain_loop(tmp_path, threads):
    """Rows (order, pixels) and the skip report are those of read_threads=1; with on_error
    raise the first bad field in loop order raises, after the blocks before it."""
    import numpy as np

    from rayscreen.stream.datasource import load_error_report

    uri = _damaged_plate(tmp_path)
    runs = {}
    for k in (1, threads):
        report = str(tmp_path / f"errors{k}")
        options = StreamOptions(on_error="skip", error_report=report, read_threads=k, fields_per_block=2)
        batches = list(read_wells(plan_wells([uri]), options))
        keys = [(w, f) for b in batches for w, f in zip(b["well"], b["field"])]
        pixels = np.concatenate([b["image"] for b in batches])
        left_out = load_error_report(report).sort_values(["well", "field"], na_position="first")
        runs[k] = keys, pixels, left_out[["well", "field"]].astype(str).values.tolist()
    keys, pixels, left_out = runs[1]
    assert keys == [("A01", "0"), ("A01", "1"), ("A01", "2"), ("A02", "0"), ("A02", "2"),
                    ("B02", "0"), ("B02", "1"), ("B02", "2")]
    assert runs[threads][0] == keys
    np.testing.assert_array_equal(runs[threads][1], pixels)
    assert runs[threads][2] == left_out and [w for w, _ in left_out] == ["A02", "B01"]

    seen = []
    with pytest.raises(RayscreenError, match=r"plate 'P' well A02 field 1"):
        for b in read_wells(plan_wells([uri]), StreamOptions(read_threads=threads, fields_per_block=1)):
            seen += list(zip(b["well"], b["field"]))
    assert seen == [("A01", "0"), ("A01", "1"), ("A01", "2"), ("A02", "0")]


def test_large_fields_are_read_fewer_at_a_time(tmp_path, monkeypatch):
    """At most READ_AHEAD_BYTES of raw fields ahead of the consumer: full-resolution fields
    8 at a time in every read task would hold hundreds of MB that Ray does not account for."""
    import rayscreen.stream.datasource as ds

    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01",), fields=1, field_shape=(100, 50))  # 2 x 10 kB
    tasks = plan_wells([uri])
    plate_of = lambda u: ds.open_plate(u)  # noqa: E731
    assert ds.read_ahead(tasks, StreamOptions(read_threads=8), plate_of) == 8
    monkeypatch.setattr(ds, "READ_AHEAD_BYTES", 3 * 2 * 100 * 50 * 2)  # three fields of both channels
    assert ds.read_ahead(tasks, StreamOptions(read_threads=8), plate_of) == 3
    assert ds.read_ahead(tasks, StreamOptions(read_threads=8, channels=("DNA",)), plate_of) == 6
    assert ds.read_ahead(tasks, StreamOptions(read_threads=2), plate_of) == 2
    monkeypatch.setattr(ds, "READ_AHEAD_BYTES", 10)
    assert ds.read_ahead(tasks, StreamOptions(read_threads=8), plate_of) == 1
    missing = [WellTask(str(tmp_path / "nothing.zarr"), "X", "A01")]
    assert ds.read_ahead(missing, StreamOptions(read_threads=8), plate_of) == 1  # its error comes with the read


def test_read_plates_gives_its_read_tasks_the_field_size(tmp_path):
    """So a read task bounds its read-ahead without a field's metadata requests of its own."""
    import rayscreen.stream.datasource as ds

    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01",), fields=1, field_shape=(100, 50))
    tasks = plan_wells([uri])

    def no_plate(uri):
        raise AssertionError("read_ahead opened a plate")

    options = StreamOptions(read_threads=8, field_bytes=2 * 100 * 50 * 2)
    assert ds.read_ahead(tasks, options, no_plate) == 8
    assert ds.raw_field_bytes(ds.open_plate(uri), ("DNA",)) == 100 * 50 * 2


@pytest.mark.parametrize("threads", [1, 8])
def test_a_storage_error_on_a_wells_metadata_comes_after_the_fields_before_it(tmp_path, threads):
    """An OSError (S3 after s3fs's retries) reading well A02's metadata: the rows of A01 come
    first and the error then, as in a plain loop, not while reading ahead."""
    import rayscreen.stream.datasource as ds

    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01", "A02"), fields=3, field_shape=(8, 8))

    class FlakyWell:  # the plate, but its storage fails on one well's metadata
        def __init__(self, plate):
            self.plate = plate

        def __getattr__(self, name):
            return getattr(self.plate, name)

        def well_meta(self, well):
            if well == "A02":
                raise OSError("slow down")
            return self.plate.well_meta(well)

    plate = FlakyWell(ds.open_plate(uri))
    seen = []
    with pytest.raises(OSError, match="slow down"):
        for b in read_wells(plan_wells([uri]), StreamOptions(read_threads=threads, fields_per_block=1),
                            plate_of=lambda u: plate):
            seen += list(zip(b["well"], b["field"]))
    assert seen == [("A01", "0"), ("A01", "1"), ("A01", "2")]
