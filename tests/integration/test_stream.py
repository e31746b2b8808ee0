"""read_plates on a real local Ray: exactly once, right annotations, right pixels, bad data."""

import os
from collections import Counter

import numpy as np
import pytest

from rayscreen.store import RayscreenError, open_plate
from rayscreen.stream import load_error_report, read_plates, read_wells
from rayscreen.stream.datasource import StreamOptions, plan_wells
from rayscreen.testing import make_plate, random_field

from ..bench_loader import load_benchmark

pytestmark = pytest.mark.integration

WELLS = ("A01", "A02", "B01", "B02", "C03")


def _screen(root, n=3, storage_options=None):
    return [make_plate(f"{root}/p{i}.zarr", name=f"P{i}", wells=WELLS, fields=3, seed=i,
                       storage_options=storage_options) for i in range(n)]


def _check_exactly_once(rows, uris, storage_options=None):
    keys = Counter((r["plate"], r["well"], r["field"]) for r in rows)
    assert set(keys.values()) == {1}
    assert len(keys) == len(uris) * len(WELLS) * 3
    for r in rows:
        i = int(r["plate"][1:])
        np.testing.assert_array_equal(r["image"], random_field(i, r["well"], int(r["field"]), (2, 32, 40)))
        ann = open_plate(uris[i], storage_options).annotations.set_index("Metadata_Well")
        assert r["Metadata_Compound"] == ann.loc[r["well"], "Metadata_Compound"]


def test_multi_plate_screen_streams_exactly_once(tmp_path, ray_local):
    uris = _screen(tmp_path)
    ds = read_plates(str(tmp_path / "p*.zarr"), override_num_blocks=4)
    _check_exactly_once(ds.take_all(), uris)


def test_stream_from_s3(ray_local, s3_bucket):
    bucket, options = s3_bucket
    uris = _screen(bucket, n=2, storage_options=options)
    _check_exactly_once(read_plates(uris, storage_options=options).take_all(), uris, options)


def test_filters(tmp_path, ray_local):
    uris = _screen(tmp_path, n=2)
    rows = read_plates(uris, where={"Metadata_Compound": "DMSO"}, channels=["Actin"], fields=[0, 2]).take_all()
    assert {r["well"] for r in rows} == {"A01", "B01", "C03"} and {r["field"] for r in rows} == {"0", "2"}
    assert all(r["image"].shape == (1, 32, 40) for r in rows) and len(rows) == 2 * 3 * 2
    with pytest.raises(RayscreenError, match="no channel 'GFP'"):
        read_plates(uris, channels=["GFP"])
    with pytest.raises(RayscreenError, match="column 'Metadata_MOA'"):
        read_plates(uris, where={"Metadata_MOA": "x"})
    with pytest.raises(RayscreenError, match=r"channel index 2; it has 2 channels"):
        read_plates(uris, channels=[2])
    with pytest.raises(RayscreenError, match=r"fields=\['f1', 7\] match no field of plate .* fields \['0', '1', '2'\]"):
        read_plates(uris, fields=["f1", 7])  # a filter that matched nothing streamed nothing, silently


def test_tiles(tmp_path, ray_local):
    uri = make_plate(str(tmp_path / "p.zarr"), wells=("A01",), fields=1)
    rows = read_plates([uri], tile=np.int64(16)).take_all()  # a size computed from an array shape
    full = random_field(0, "A01", 0, (2, 32, 40))
    assert len(rows) == 2 * 3  # 32 / 16 rows of tiles x ceil(40 / 16) columns
    for r in rows:
        y, x = r["tile_y"], r["tile_x"]
        np.testing.assert_array_equal(r["image"], full[:, y:y + 16, x:x + 16])


def _damage(root, plate, well_path, field, kind):
    chunk = root / plate / well_path / str(field) / "0" / "c" / "1" / "0" / "0"
    if kind == "missing":
        os.remove(chunk)
    else:
        chunk.write_bytes(chunk.read_bytes()[:50])


def test_bad_field_fails_the_job_by_default(tmp_path, ray_local):
    uris = _screen(tmp_path, n=2)
    _damage(tmp_path, "p1.zarr", "B/2", 1, "truncate")
    with pytest.raises(Exception, match="plate 'P1' well B02 field 1"):
        read_plates(uris).take_all()


def test_skip_mode_accounts_for_every_field(tmp_path, ray_local):
    uris = _screen(tmp_path, n=3)
    _damage(tmp_path, "p1.zarr", "B/2", 1, "truncate")
    _damage(tmp_path, "p2.zarr", "A/1", 0, "missing")
    import shutil
    shutil.rmtree(tmp_path / "p0.zarr" / "C" / "3")  # a whole well gone mid-screen
    report = str(tmp_path / "errors")
    rows = read_plates(uris, on_error="skip", error_report=report, override_num_blocks=3).take_all()
    bad = load_error_report(report)
    assert bad[["plate", "well", "field", "kind"]].values.tolist() == [
        ["P0", "C03", None, "missing well"],
        ["P1", "B02", "1", "CorruptDataError"],
        ["P2", "A01", "0", "MissingChunkError"],
    ]
    read = {(r["plate"], r["well"], r["field"]) for r in rows}
    assert len(read) == len(rows) == 3 * 5 * 3 - 3 - 2  # every field read once or reported
    assert ("P1", "B02", "1") not in read and ("P1", "B02", "0") in read


def test_read_wells_without_ray(tmp_path):
    """The read task's body is plain Python: the single-process baseline and unit tests use it."""
    uris = _screen(tmp_path, n=1)
    batches = list(read_wells(plan_wells(uris), StreamOptions(fields_per_block=4)))
    assert sum(len(b["well"]) for b in batches) == 15 and batches[0]["image"].shape == (4, 2, 32, 40)


def test_a_channel_subset_is_corrected_with_its_own_channels_illumination_and_scaler(tmp_path):
    """channels=["Actin"] with illumination and normalisation: each streamed pixel is the
    Actin raw value / Actin's illumination, minus Actin's offset, over Actin's scale - not
    DNA's (channel 0), whatever the order of the requested channels. Runs the read task's
    body (read_wells) without Ray."""
    from rayscreen.stream.illumination import illumination_params, save_illumination
    from rayscreen.stream.normalize import MeanStdScaler, fit_params, save_normalization

    uri = make_plate(str(tmp_path / "p0.zarr"), name="P0", wells=("A01", "B02"), fields=2, seed=5)
    yy, xx = np.mgrid[0:32, 0:40].astype(np.float32)
    illum = np.stack([1.0 + xx / 39.0,  # DNA: brighter to the right, 1..2
                      2.0 + 3.0 * yy / 31.0])  # Actin: brighter downwards, 2..5
    save_illumination(uri, illum, params=illumination_params(), channels=["DNA", "Actin"], fields=4)
    scaler = MeanStdScaler()
    scaler.offset, scaler.scale = np.array([300.0, 40.0]), np.array([500.0, 250.0])  # DNA, Actin
    save_normalization(uri, scaler, fit=fit_params(illumination=illumination_params()), fields=4)

    def by_hand(raw, c):  # channel c's correction, written out
        return (raw.astype(np.float64) / illum[c] - scaler.offset[c]) / scaler.scale[c]

    for channels in (("Actin",), ("Actin", "DNA")):
        options = StreamOptions(channels=channels, illumination=True, normalize=True)
        rows = [(w, f, img) for b in read_wells(plan_wells([uri]), options)
                for w, f, img in zip(b["well"], b["field"], b["image"])]
        assert len(rows) == 4
        for well, field, image in rows:
            raw = random_field(5, well, int(field), (2, 32, 40))
            assert image.shape == (len(channels), 32, 40) and image.dtype == np.float32
            np.testing.assert_allclose(image[0], by_hand(raw[1], 1), rtol=1e-5, atol=1e-5)
            # DNA's correction of the same Actin pixels is far from it
            assert np.abs(by_hand(raw[1], 0) - image[0]).mean() > 0.1
            if len(channels) == 2:
                np.testing.assert_allclose(image[1], by_hand(raw[0], 0), rtol=1e-5, atol=1e-5)


def test_peak_memory_of_four_plates_is_within_25_percent_of_one(tmp_path):
    """Backpressure: streaming 4 plates peaks at most 25% above streaming 1 plate of the
    same size. Measured as the summed PSS (shared object-store pages counted once) of a
    fresh process and all its descendants - its own local Ray's GCS, raylet and workers -
    sampled every 50 ms (benchmarks/stream.py --memory); a fresh process, so that what
    earlier tests of this session left running does not dilute the comparison. 1 plate
    first, so what it leaves behind counts against the 4-plate run."""
    bench = load_benchmark("stream")
    result = bench.memory("tiny", str(tmp_path))
    plate_bytes = int(result["plate_mb"] * 1e6)
    one, four = result["one"], result["four"]
    summary = {k: result[k] for k in ("plate_mb", "ratio", "ratios")} | {
        n: {k: v // 2**20 for k, v in result[n]["peak"].items()} for n in ("one", "four")}
    assert one["fields"] == 64 and four["fields"] == 4 * 64
    # the test has power: holding the 3 extra plates' pixels would break the bound
    assert 3 * plate_bytes > 0.25 * one["peak"]["pss"], summary
    assert result["ratio"] <= 1.25, summary
    # and the private memory of the processes (not the object store) does not grow with plates
    assert result["ratios"]["pss_anon"] <= 1.25, summary


def test_count_is_the_number_of_rows_streamed(tmp_path, ray_local):
    """Ray's count() trusts the read tasks' row counts: none is promised that the stream may not keep."""
    import shutil

    uri = make_plate(str(tmp_path / "p.zarr"), wells=("A01", "A02", "B01"), fields=2, field_shape=(32, 40))
    # the well is listed, not on disk (in a plate rayscreen wrote, an ingest cut short: skipped
    # when asked, else an error)
    shutil.rmtree(tmp_path / "p.zarr" / "B" / "1")
    for kwargs, n in (({}, 2 * 2), ({"tile": 16}, 2 * 2 * 6), ({"fields": [0]}, 2), ({"tile": 16, "fields": [1]}, 2 * 6)):
        ds = read_plates(uri, on_error="skip", **kwargs)
        assert ds.count() == len(ds.take_all()) == n, kwargs


def test_plates_of_different_field_shapes_are_rejected_before_reading_unless_tiles_make_them_equal(tmp_path,
                                                                                                   ray_local):
    a = make_plate(str(tmp_path / "a.zarr"), "A", wells=("A01",), fields=1, field_shape=(32, 40))
    b = make_plate(str(tmp_path / "b.zarr"), "B", wells=("A01",), fields=1, field_shape=(48, 40))
    # whatever the block layout: one block holding both plates used to fail in np.stack
    for blocks in (1, 2):
        with pytest.raises(RayscreenError, match=r"plates 'A' .* and 'B' .* different shapes: \(2, 32, 40\) uint16 "
                                                 r"and \(2, 48, 40\) uint16"):
            read_plates([a, b], override_num_blocks=blocks)
    rows = read_plates([a, b], tile=16, override_num_blocks=1).take_all()
    assert len(rows) == 2 * 3 + 3 * 3 and {r["image"].shape for r in rows} == {(2, 16, 16)}
    c = make_plate(str(tmp_path / "c.zarr"), "C", wells=("A01",), fields=1, dtype="uint8")
    with pytest.raises(RayscreenError, match=r"plates 'A' .* and 'C' .* different dtypes"):
        read_plates([a, c])
    rows = read_plates([a, c], dtype="float32", override_num_blocks=1).take_all()
    assert {r["image"].dtype for r in rows} == {np.dtype("float32")} and len(rows) == 2


def test_overlapping_globs_stream_a_plate_once_and_two_plates_of_one_name_are_rejected(tmp_path, ray_local):
    import re

    a = make_plate(str(tmp_path / "screen" / "A.zarr"), "A", wells=("A01",), fields=1)
    rows = read_plates([str(tmp_path / "screen" / "*.zarr"), a + "/"]).take_all()
    assert [(r["plate"], r["well"], r["field"]) for r in rows] == [("A", "A01", "0")]
    p1 = make_plate(str(tmp_path / "batch1" / "P1.zarr"), "P1", wells=("A01",), fields=1, seed=1)
    p2 = make_plate(str(tmp_path / "batch2" / "P1.zarr"), "P1", wells=("A01",), fields=1, seed=2)
    with pytest.raises(RayscreenError, match=re.escape(f"plates {p1} and {p2} are both named 'P1'")):
        read_plates([p1, p2])


def test_tile_settings_the_plates_cannot_meet_fail_before_reading_even_when_skipping(tmp_path, ray_local):
    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01",), fields=1, field_shape=(32, 40))
    with pytest.raises(RayscreenError, match=r"stream.tile \(64, 64\): larger than the fields of plate 'P' .*"
                                             r"well A01 field 0 is 32 x 40 pixels at level 0"):
        read_plates(uri, tile=64, on_error="skip")
    with pytest.raises(RayscreenError, match=r"stream.stride \(48, 48\): stride \(48, 48\) is larger than the tile"):
        read_plates(uri, tile=32, stride=48)
    with pytest.raises(RayscreenError, match=r"stream.stride \(8, 8\): a stride needs a tile size"):
        read_plates(uri, stride=8)
    with pytest.raises(RayscreenError, match="plate 'P' well A01 field 0: no level 1"):
        read_plates(uri, level=1)


def test_a_fields_filter_is_checked_against_the_plates_field_count_not_only_its_first_well(tmp_path, ray_local):
    """Well A01 was imaged at one site only (a failed autofocus): fields=[2] is still valid."""
    from rayscreen.store import create_plate

    uri = str(tmp_path / "p.zarr")
    writer = create_plate(uri, "P", ["A01", "A02"], ["DNA"], (16, 16), "uint16", 3)
    for well, n in (("A01", 1), ("A02", 3)):
        for f in range(n):
            writer.write_field(well, f, np.full((1, 16, 16), f, np.uint16))
        writer.complete_well(well, n)
    rows = read_plates([uri], fields=[2]).take_all()
    assert [(r["well"], r["field"]) for r in rows] == [("A02", "2")]
    with pytest.raises(RayscreenError, match=r"well A01 has fields \['0'\], and its field_count is 3"):
        read_plates([uri], fields=[5])


def test_wells_as_plate_well_pairs_read_only_those(tmp_path, ray_local):
    """A resumed stage asks for the wells it has still to do on each plate. By well name
    alone, every plate's wells of those names were read (a profile rerun redid every done
    plate's wells, then dropped them)."""
    uris = _screen(tmp_path, n=2)
    rows = read_plates(uris, wells=[("P1", "A01"), ("P1", "b2")]).take_all()
    assert sorted({(r["plate"], r["well"]) for r in rows}) == [("P1", "A01"), ("P1", "B02")]
    assert len(rows) == 2 * 3
    # names alone still mean "on every plate"
    rows = read_plates(uris, wells=["A01"]).take_all()
    assert sorted({(r["plate"], r["well"]) for r in rows}) == [("P0", "A01"), ("P1", "A01")]
