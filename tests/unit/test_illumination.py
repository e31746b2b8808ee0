import json

import numpy as np
import pytest
from scipy import ndimage

from rayscreen.store import RayscreenError, create_plate, open_plate
from rayscreen.store.extras import read_plate_array, write_plate_array
from rayscreen.stream.illumination import (IlluminationAccumulator, accumulate, compute_plate_illumination, correct,
                                           illumination_function, load_illumination, save_illumination,
                                           select_fields)

SHAPE = (48, 64)  # (Y, X)


def vignetting(shape, centre=(0.5, 0.5), strength=0.6):
    """Bright centre, dark corners: 1 at ``centre`` falling to 1 - strength at distance 1."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    r2 = ((y / (shape[0] - 1) - centre[0]) ** 2 + (x / (shape[1] - 1) - centre[1]) ** 2) / 0.5
    return 1.0 - strength * r2


def texture(rng, shape):
    """Cell-like texture: smoothed noise, positive, the same statistics everywhere."""
    t = ndimage.gaussian_filter(rng.random(shape), 2)
    return 200 + 3000 * (t - t.min()) / (t.max() - t.min())


@pytest.fixture(scope="module")
def vignetted_plate(tmp_path_factory):
    """16 fields, 2 channels; channel 1's bright spot is off centre."""
    uri = str(tmp_path_factory.mktemp("illum") / "P1.zarr")
    truth = np.stack([vignetting(SHAPE), vignetting(SHAPE, centre=(0.3, 0.7), strength=0.5)])
    wells = ["A01", "A02", "B01", "B02"]
    writer = create_plate(uri, "P1", wells, ["DNA", "Actin"], SHAPE, "uint16", 4)
    rng = np.random.default_rng(0)
    for w in wells:
        for f in range(4):
            image = np.stack([texture(rng, SHAPE) for _ in range(2)]) * truth
            writer.write_field(w, f, np.rint(image).astype(np.uint16))
        writer.complete_well(w, 4)
    return uri, truth


def cv(image):
    return image.std(axis=(-2, -1)) / image.mean(axis=(-2, -1))


@pytest.mark.parametrize("method", ["gaussian", "median"])
def test_illumination_recovers_vignetting_and_correction_flattens_the_plate(vignetted_plate, method):
    uri, truth = vignetted_plate
    illum = compute_plate_illumination(uri, method=method)
    assert illum.shape == (2, *SHAPE) and illum.dtype == np.float32
    for c in range(2):
        assert np.corrcoef(illum[c].ravel(), truth[c].ravel())[0, 1] > 0.95
    # floored at 1 so correction never raises a pixel; the bright centre is > 1.5x the dark corners
    assert illum.min() == 1.0 and (illum.max(axis=(1, 2)) > 1.5).all()

    plate = open_plate(uri)
    raw = np.stack([plate.read(w, f) for w, f in select_fields(plate)]).astype(np.float64)
    corrected = np.stack([correct(image, illum) for image in raw])
    assert corrected.dtype == np.float32 and (corrected <= raw + 1e-3).all()
    before, after = cv(raw.mean(axis=0)), cv(corrected.mean(axis=0))
    assert (after < 0.5 * before).all(), (before, after)
    # near-corner / centre ratios of the plate's mean field, about 0.7 before, move close to 1
    for images, tolerance in ((raw, (0.25, 0.4)), (corrected, (0.0, 0.1))):
        mean = images.mean(axis=0)
        for c in range(2):
            centre = mean[c, 21:27, 29:35].mean()
            for corner in (mean[c, 4:10, 4:10], mean[c, -10:-4, -10:-4]):
                assert tolerance[0] <= abs(corner.mean() / centre - 1) <= tolerance[1]


def test_accumulator_merges_partial_sums_exactly_and_clips_outliers():
    rng = np.random.default_rng(1)
    fields = [rng.integers(0, 1000, (2, 16, 16)).astype(np.uint16) for _ in range(6)]
    whole = IlluminationAccumulator(clip_percentile=None)
    for f in fields:
        whole.add(f)
    a, b = IlluminationAccumulator(None), IlluminationAccumulator(None)
    for f in fields[:2]:
        a.add(f)
    for f in fields[2:]:
        b.add(f)
    merged = a.merge(b).merge(IlluminationAccumulator(None))
    assert merged.count == 6
    np.testing.assert_array_equal(merged.result(), whole.result())
    np.testing.assert_allclose(whole.result(), np.mean(fields, axis=0), rtol=1e-6)

    # one saturated debris pixel must not print into the robust average
    debris = [f.copy() for f in fields]
    debris[0][0, 5, 5] = 65535
    assert accumulate(debris)[0, 5, 5] < 1000
    assert accumulate(debris, clip_percentile=None)[0, 5, 5] > 10000
    with pytest.raises(ValueError, match="differs"):
        IlluminationAccumulator().add(fields[0]).add(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="no field"):
        IlluminationAccumulator().result()


def test_illumination_function_is_smooth_normalised_and_handles_empty_channels():
    rng = np.random.default_rng(2)
    mean = np.stack([vignetting((300, 400)) * (1 + 0.2 * rng.standard_normal((300, 400))), np.zeros((300, 400))])
    illum = illumination_function(mean)  # shrunk to 256 px for filtering and back
    assert illum.shape == mean.shape
    assert np.percentile(illum[0], 2) == pytest.approx(1.0, abs=0.01)
    # smooth: the 20% pixel noise is gone
    assert np.abs(np.diff(illum[0], axis=1)).max() < 0.01
    np.testing.assert_array_equal(illum[1], 1.0)
    with pytest.raises(ValueError, match="method"):
        illumination_function(mean, method="mean")
    with pytest.raises(ValueError, match="does not match"):
        correct(np.ones((1, 300, 400)), illum)


@pytest.mark.parametrize("ngff", ["0.5", "0.4"])
def test_save_and_load_round_trip_with_the_plate(tmp_path, ngff):
    uri = str(tmp_path / "P.zarr")
    writer = create_plate(uri, "P", ["A01"], ["DNA", "Actin"], (8, 10), "uint16", 1, ngff=ngff)
    writer.write_field("A01", 0, np.ones((2, 8, 10), np.uint16))
    writer.complete_well("A01", 1)
    assert load_illumination(uri) is None

    illum = (1 + np.random.default_rng(3).random((2, 8, 10))).astype(np.float32)
    save_illumination(uri, illum, params={"method": "gaussian", "fields": 1}, channels=["DNA", "Actin"])
    np.testing.assert_array_equal(load_illumination(uri), illum)
    plate = open_plate(uri)
    entry = plate.rayscreen_attrs()["illumination"]
    assert entry["version"] == 1 and entry["path"] == "rayscreen/illumination/v1"
    assert entry["params"] == {"method": "gaussian", "fields": 1} and entry["shape"] == [2, 8, 10]
    json.dumps(entry)
    # the plate is untouched otherwise: same wells, its layout kept, pixels readable
    assert plate.wells == ["A01"] and "layout" in plate.rayscreen_attrs()
    np.testing.assert_array_equal(plate.read("A01", "0"), 1)

    # saving again replaces the array
    save_illumination(uri, illum * 2)
    np.testing.assert_array_equal(load_illumination(uri), illum * 2)


def test_plate_arrays_reject_bad_names_and_report_absence(tmp_path):
    uri = str(tmp_path / "P.zarr")
    create_plate(uri, "P", ["A01"], ["DNA"], (4, 4), "uint16", 1)
    assert read_plate_array(uri, "nothing/here") is None
    write_plate_array(uri, "stats/v1", np.arange(3.0), {"k": 1})
    array, attrs = read_plate_array(uri, "stats/v1")
    np.testing.assert_array_equal(array, [0, 1, 2])
    assert attrs == {"k": 1}
    with pytest.raises(RayscreenError, match="relative path"):
        write_plate_array(uri, "../escape", np.zeros(2))


def test_select_fields_subsamples_reproducibly(vignetted_plate):
    plate = open_plate(vignetted_plate[0])
    everything = select_fields(plate)
    assert len(everything) == 16 and everything[0] == ("A01", "0")
    some = select_fields(plate, max_fields=5, seed=4)
    assert len(some) == 5 and some == select_fields(plate, max_fields=5, seed=4)
    assert set(some) <= set(everything) and some == sorted(some, key=everything.index)


# -- the job (in this process; tests/integration/test_illum.py runs it on Ray)


def test_compute_illumination_in_partials_equals_one_pass_and_resumes(vignetted_plate, tmp_path):
    import shutil

    from rayscreen.stream.fit import compute_illumination

    uri = str(tmp_path / "P1.zarr")
    shutil.copytree(vignetted_plate[0], uri)
    # 16 fields in groups of 5: four partial sums merged on the driver
    assert compute_illumination([uri], use_ray=False, fields_per_task=5, progress=False) == {uri: "computed"}
    np.testing.assert_allclose(load_illumination(uri), compute_plate_illumination(uri), rtol=1e-6)
    entry = open_plate(uri).rayscreen_attrs()["illumination"]
    assert entry["fields"] == 16 and entry["params"]["method"] == "gaussian" and entry["params"]["level"] == 0

    # same parameters: skipped, however the work is split; other parameters: recomputed
    assert compute_illumination(uri, use_ray=False, fields_per_task=2, progress=False) == {uri: "skipped"}
    before = load_illumination(uri)
    assert compute_illumination(uri, method="median", use_ray=False, progress=False) == {uri: "computed"}
    np.testing.assert_allclose(load_illumination(uri), compute_plate_illumination(uri, method="median"), rtol=1e-6)
    assert not np.allclose(load_illumination(uri), before)
    assert compute_illumination(uri, method="median", use_ray=False, progress=False) == {uri: "skipped"}
    assert compute_illumination(uri, method="median", overwrite=True, use_ray=False, progress=False) == {
        uri: "computed"}
    with pytest.raises(RayscreenError, match="matches nothing"):
        compute_illumination(str(tmp_path / "nothing*.zarr"), use_ray=False)


def test_a_cut_short_or_damaged_illumination_is_recomputed_not_skipped(vignetted_plate, tmp_path, monkeypatch):
    """The skip rule compared parameters only: a recompute killed while it rewrote the array
    left the old parameters over a partial array, so the rerun said "up to date" and every
    stream then failed on the missing chunk (or, killed after the array, applied another
    function without a word)."""
    import pathlib
    import shutil

    from rayscreen.stream import illumination as illum_module
    from rayscreen.stream.fit import compute_illumination
    from rayscreen.stream.illumination import illumination_entry

    uri = str(tmp_path / "P1.zarr")
    shutil.copytree(vignetted_plate[0], uri)
    assert compute_illumination(uri, use_ray=False, progress=False) == {uri: "computed"}
    good = load_illumination(uri)

    # a chunk lost (a plate copied in part): recomputed, not skipped
    chunk = sorted(p for p in (pathlib.Path(uri) / "rayscreen" / "illumination" / "v1").rglob("*")
                   if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))[-1]
    chunk.unlink()
    assert compute_illumination(uri, use_ray=False, progress=False) == {uri: "computed"}
    np.testing.assert_array_equal(load_illumination(uri), good)

    # a rewrite cut short before its array was stored: the plate no longer claims a function
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the array")

    monkeypatch.setattr(illum_module, "write_plate_array", killed)
    with pytest.raises(KeyboardInterrupt):
        compute_illumination(uri, method="median", use_ray=False, progress=False, overwrite=True)
    monkeypatch.undo()
    assert illumination_entry(uri) is None and load_illumination(uri) is None
    assert compute_illumination(uri, use_ray=False, progress=False) == {uri: "computed"}
    np.testing.assert_array_equal(load_illumination(uri), good)


def test_illumination_at_a_coarser_level(tmp_path):
    """Streaming level 1 resamples the level-0 function to the level's shape."""
    from rayscreen.stream.datasource import StreamOptions, plan_wells, read_wells
    from rayscreen.stream.illumination import illumination_at
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "p.zarr"), wells=("A01",), fields=2, field_shape=(32, 40), levels=2)
    illum = np.stack([vignetting((32, 40)), vignetting((32, 40), strength=0.3)]) * 2 + 1
    save_illumination(uri, illum.astype(np.float32))
    small = illumination_at(load_illumination(uri), (16, 20))
    assert small.shape == (2, 16, 20) and small.min() >= 1.0
    assert abs(small[0, 8, 10] - illum[0, 16, 20]) < 0.1  # the centre stays the centre
    rows = [b for b in read_wells(plan_wells([uri]), StreamOptions(level=1, illumination=True))]
    plate = open_plate(uri)
    for i, f in enumerate(rows[0]["field"]):
        np.testing.assert_array_equal(rows[0]["image"][i], correct(plate.read("A01", f, level=1), small))


@pytest.mark.parametrize("make", ["illumination", "channel_stats"])
def test_the_fitters_hold_a_field_at_a_time_in_float64_one_channel_at_a_time(make):
    """Each read task adds fields to an accumulator; whole-field float64 copies (the cast, the
    deviations, the clip) peaked at 8x a uint16 field, in every task at once. One channel at
    a time, the transient stays under 3x the field (the running sum is allocated on the first
    field, before the measurement)."""
    import tracemalloc

    from rayscreen.stream.normalize import ChannelStats

    rng = np.random.default_rng(0)
    fields = [rng.integers(0, 4000, (5, 256, 320)).astype(np.uint16) for _ in range(2)]
    acc = IlluminationAccumulator() if make == "illumination" else ChannelStats(seed=0)
    acc.add(fields[0])
    tracemalloc.start()
    try:
        acc.add(fields[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * fields[1].nbytes, f"{peak / fields[1].nbytes:.1f}x the field"


def test_the_stream_keeps_the_corrections_of_a_few_plates_only(tmp_path):
    """A profile actor lives for the whole screen: it kept every plate's illumination
    function it ever used (110 MB each at 5 x 2160 x 2560), 1000 plates = 110 GB."""
    from rayscreen.store import open_plate
    from rayscreen.stream import datasource
    from rayscreen.stream.datasource import StreamOptions, _Corrections
    from rayscreen.testing import make_plate

    corrections = _Corrections(StreamOptions(illumination=True))
    uris = []
    for i in range(6):
        uri = make_plate(str(tmp_path / f"p{i}.zarr"), f"P{i}", wells=("A01",), fields=1, field_shape=(16, 16))
        save_illumination(uri, np.full((2, 16, 16), 1.0 + i, np.float32))
        uris.append(uri)
    field = np.full((2, 16, 16), 60, np.uint16)
    for i, uri in enumerate(uris + uris[:1]):  # the first plate again after it was dropped: loaded again
        np.testing.assert_allclose(corrections(open_plate(uri), field, None), 60 / (1.0 + (i % 6)))
        # kept by the process, across tasks
        assert datasource._loaded_corrections.cache_info().currsize <= datasource.LOADED_PLATES
