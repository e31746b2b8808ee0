import functools
import json

import numpy as np
import pandas as pd
import pytest

from rayscreen.store import create_plate, open_plate
from rayscreen.testing.plates import make_plate
from rayscreen.stream.normalize import (ChannelStats, ControlScaler, IntensityScaler, MeanStdScaler, PercentileScaler,
                                        control_wells, fit_plate_normalizer, load_normalization, make_normalizer,
                                        save_normalization)


def fields(seed=0, n=8):
    """(2, 20, 30) uint16 fields: channel 0 uniform on [0, 1000), channel 1 normal(500, 50)."""
    rng = np.random.default_rng(seed)
    return [np.stack([rng.integers(0, 1000, (20, 30)), rng.normal(500, 50, (20, 30))]).astype(np.uint16)
            for _ in range(n)]


def test_channel_stats_are_exact_moments_and_merge_like_one_pass():
    images = fields()
    pixels = np.stack(images).astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    one = ChannelStats()
    for im in images:
        one.add(im)
    np.testing.assert_allclose(one.mean, pixels.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(one.std(), pixels.std(axis=1), rtol=1e-10)
    a, b = ChannelStats(seed=1), ChannelStats(seed=2)
    for im in images[:3]:
        a.add(im)
    for im in images[3:]:
        b.add(im)
    merged = a.merge(b).merge(ChannelStats())
    assert merged.count == pixels.shape[1] and merged.fields == 8
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std(), one.std(), rtol=1e-10)


def test_pixel_sample_is_bounded_and_its_percentiles_are_close():
    stats = ChannelStats(pixels_per_field=300, max_samples=1000, seed=0)
    images = fields(n=20)
    for im in images:
        stats.add(im)
    assert stats.sample.shape == (2, 1000)  # 20 x 300 drawn, 1000 kept
    pixels = np.stack(images).astype(np.float64).transpose(1, 0, 2, 3).reshape(2, -1)
    for q in (5, 50, 95):
        got, want = stats.percentiles(q), np.percentile(pixels, q, axis=1)
        assert abs(got[0] - want[0]) < 40 and abs(got[1] - want[1]) < 8, (q, got, want)


def test_percentile_scaler_maps_low_and_high_to_0_and_1():
    images = fields()
    scaler = PercentileScaler(low=1, high=99).fit(images)
    out = scaler.transform(images[0])
    assert out.dtype == np.float32 and out.shape == images[0].shape
    assert out.min() == 0.0 and out.max() == 1.0
    # the pixel at the fitted low percentile maps to 0, one halfway to high maps to 0.5
    lo, hi = scaler.offset, scaler.offset + scaler.scale
    probe = np.stack([np.full((1, 2), lo[0]), np.full((1, 2), (lo[1] + hi[1]) / 2)])
    np.testing.assert_allclose(scaler.transform(probe)[:, 0, 0], [0.0, 0.5], atol=1e-6)
    assert 0 <= lo[0] < 30 and 970 < hi[0] <= 1000


def test_meanstd_scaler_standardises_the_fitted_fields_exactly():
    images = fields()
    scaler = MeanStdScaler().fit(images)
    out = np.stack([scaler.transform(im) for im in images]).astype(np.float64)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-5)
    # a constant channel gets scale 1, not a division by 0
    flat = MeanStdScaler().fit([np.full((1, 4, 4), 7.0)])
    np.testing.assert_array_equal(flat.transform(np.full((1, 4, 4), 9.0)), 2.0)


@pytest.mark.parametrize("scaler", [PercentileScaler(2, 98), MeanStdScaler(),
                                    ControlScaler("percentile", "x == 1", 5, 95), ControlScaler("meanstd")])
def test_to_dict_is_plain_json_and_round_trips(scaler):
    assert not scaler.fitted
    with pytest.raises(ValueError, match="not fitted"):
        scaler.transform(np.zeros((2, 3, 3)))
    scaler.fit(fields())
    d = json.loads(json.dumps(scaler.to_dict()))
    back = IntensityScaler.from_dict(d)
    assert type(back) is type(scaler) and back.to_dict() == scaler.to_dict()
    image = fields(seed=5, n=1)[0]
    np.testing.assert_array_equal(back.transform(image), scaler.transform(image))
    # a channel subset behaves like the full scaler on those channels
    np.testing.assert_array_equal(back.select([1]).transform(image[1:]), scaler.transform(image)[1:])
    with pytest.raises(ValueError, match="channels"):
        back.transform(image[:1])


def test_make_normalizer_by_name():
    assert isinstance(make_normalizer("percentile", low=0.5), PercentileScaler)
    assert isinstance(make_normalizer("meanstd"), MeanStdScaler)
    assert make_normalizer("control", stat="percentile").stat == "percentile"
    with pytest.raises(ValueError, match="expected one of"):
        make_normalizer("zscore")
    with pytest.raises(ValueError, match="low < high"):
        PercentileScaler(99, 1)


@pytest.fixture
def control_plate(tmp_path):
    """A01/B01 are DMSO controls around 100; A02/B02 treated around 300."""
    uri = str(tmp_path / "P.zarr")
    wells = ["A01", "A02", "B01", "B02"]
    annotations = pd.DataFrame({"Metadata_Well": wells, "Metadata_Compound": ["DMSO", "cpd", "DMSO", "cpd"],
                                "Metadata_Control": ["negative", None, "negative", None]})
    writer = create_plate(uri, "P", wells, ["DNA"], (16, 16), "uint16", 2, annotations=annotations)
    rng = np.random.default_rng(0)
    for w in wells:
        centre = 100 if w.endswith("1") else 300
        for f in range(2):
            writer.write_field(w, f, rng.normal(centre, 10, (1, 16, 16)).astype(np.uint16))
        writer.complete_well(w, 2)
    return uri


def test_control_scaler_fits_on_control_wells_only_and_travels_with_the_plate(control_plate):
    annotations = open_plate(control_plate).annotations
    assert control_wells(annotations) == ["A01", "B01"]
    assert control_wells(annotations, "Metadata_Compound == 'cpd'") == ["A02", "B02"]
    assert load_normalization(control_plate) is None

    control = fit_plate_normalizer(control_plate, ControlScaler(controls="Metadata_Compound == 'DMSO'"), save=True)
    everything = fit_plate_normalizer(control_plate, MeanStdScaler())
    assert abs(control.offset[0] - 99.5) < 2 and abs(control.scale[0] - 10) < 1.5  # uint16 truncates
    assert 150 < everything.offset[0] < 250 and everything.scale[0] > 50
    loaded = load_normalization(control_plate)
    assert isinstance(loaded, ControlScaler) and loaded.to_dict() == control.to_dict()
    assert open_plate(control_plate).rayscreen_attrs()["normalization"]["method"] == "control"
    # treated wells sit about 20 control standard deviations above the controls
    treated = loaded.transform(open_plate(control_plate).read("A02", 0))
    assert 15 < treated.mean() < 25

    save_normalization(control_plate, everything)
    assert isinstance(load_normalization(control_plate), MeanStdScaler)
    with pytest.raises(ValueError, match="not fitted"):
        save_normalization(control_plate, PercentileScaler())
    with pytest.raises(ValueError, match="no control well"):
        fit_plate_normalizer(control_plate, ControlScaler(controls="Metadata_Compound == 'none'"))


# -- the job (in this process; tests/integration/test_illum.py runs it on Ray)


def test_fit_normalization_in_partials_matches_one_pass_and_resumes(control_plate):
    from rayscreen.store import RayscreenError
    from rayscreen.stream.fit import compute_illumination, fit_normalization

    uri = control_plate
    # meanstd is exact however the fields are split: compare with the one-pass fit
    assert fit_normalization(uri, "meanstd", use_ray=False, fields_per_task=3, progress=False) == {uri: "fitted"}
    one_pass = fit_plate_normalizer(uri, MeanStdScaler())
    loaded = load_normalization(uri)
    np.testing.assert_allclose(loaded.offset, one_pass.offset, rtol=1e-12)
    np.testing.assert_allclose(loaded.scale, one_pass.scale, rtol=1e-10)
    entry = open_plate(uri).rayscreen_attrs()["normalization"]
    assert entry["fields"] == 8 and entry["fit"] == {"max_fields": None, "seed": 0, "illumination": None, "level": 0,
                                                     "wells": entry["fit"]["wells"]}
    assert len(entry["fit"]["wells"]) == 16  # a digest of the wells fitted on

    assert fit_normalization(uri, "meanstd", use_ray=False, progress=False) == {uri: "skipped"}
    # another method, other parameters, or illumination now on: refitted
    assert fit_normalization(uri, "control", use_ray=False, progress=False) == {uri: "fitted"}
    control = load_normalization(uri)
    assert isinstance(control, ControlScaler) and abs(control.offset[0] - 99.5) < 2
    assert fit_normalization(uri, "control", use_ray=False, progress=False) == {uri: "skipped"}
    assert fit_normalization(uri, "control", controls="Metadata_Compound == 'cpd'", use_ray=False,
                             progress=False) == {uri: "fitted"}
    assert abs(load_normalization(uri).offset[0] - 299.5) < 2
    with pytest.raises(RayscreenError, match="no illumination function stored"):
        fit_normalization(uri, "percentile", illumination=True, use_ray=False, progress=False)
    compute_illumination(uri, use_ray=False, progress=False)
    assert fit_normalization(uri, "percentile", illumination=True, use_ray=False, progress=False) == {uri: "fitted"}
    fit = open_plate(uri).rayscreen_attrs()["normalization"]["fit"]
    assert fit["illumination"] == open_plate(uri).rayscreen_attrs()["illumination"]["params"]
    # a new illumination function makes the normaliser stale: refitted
    compute_illumination(uri, method="median", use_ray=False, progress=False)
    assert fit_normalization(uri, "percentile", illumination=True, use_ray=False, progress=False) == {uri: "fitted"}
    with pytest.raises(RayscreenError, match="no control well matches"):
        fit_normalization(uri, "control", controls="Metadata_Compound == 'none'", use_ray=False, progress=False)
    with pytest.raises(RayscreenError, match="zscore"):
        fit_normalization(uri, "zscore", use_ray=False)


def test_a_platemap_that_moves_the_controls_refits_the_control_scaler(control_plate, tmp_path):
    """The query stays the same, but another platemap makes other wells the controls: the
    stored scaler was fitted on the old ones and must not be kept as up to date."""
    from rayscreen.stream.fit import fit_normalization

    def platemap(name, controls):
        path = tmp_path / name
        pd.DataFrame({"Metadata_Plate": "P", "Metadata_Well": ["A01", "A02", "B01", "B02"],
                      "Metadata_Control": [("negative" if w in controls else None) for w in
                                           ["A01", "A02", "B01", "B02"]]}).to_csv(path, index=False)
        return str(path)

    old, new = platemap("old.csv", ["A01", "B01"]), platemap("new.csv", ["A02", "B02"])
    assert fit_normalization(control_plate, "control", platemap=old, use_ray=False, progress=False) == {
        control_plate: "fitted"}
    assert abs(load_normalization(control_plate).offset[0] - 99.5) < 2
    assert fit_normalization(control_plate, "control", platemap=old, use_ray=False, progress=False) == {
        control_plate: "skipped"}
    assert fit_normalization(control_plate, "control", platemap=new, use_ray=False, progress=False) == {
        control_plate: "fitted"}
    assert abs(load_normalization(control_plate).offset[0] - 299.5) < 2


def test_stream_normalizer_names_the_plate_and_the_way_out(control_plate):
    """One checker for every stage: missing normaliser, or another method's than the config's."""
    from rayscreen.store import RayscreenError
    from rayscreen.stream.normalize import stream_normalizer

    with pytest.raises(RayscreenError, match=r"P\.zarr: no normalisation stored.*rayscreen illum.*normalize: none"):
        stream_normalizer(control_plate, illumination=False)
    fit_plate_normalizer(control_plate, MeanStdScaler(), save=True)
    assert isinstance(stream_normalizer(control_plate, illumination=False, method="meanstd"), MeanStdScaler)
    assert isinstance(stream_normalizer(control_plate, illumination=False), MeanStdScaler)  # method not asked
    with pytest.raises(RayscreenError, match=r"P\.zarr: stores a 'meanstd' normalisation but stream.normalize is "
                                             r"'percentile'"):
        stream_normalizer(control_plate, illumination=False, method="percentile")


def test_the_normaliser_is_fitted_at_the_streams_level_and_refused_at_another(tmp_path):
    """A coarser level averages pixels: percentiles fitted at level 0 left a level-1 stream's
    values far from [0, 1]'s ends (meanstd: std 0.5, not 1, on noise)."""
    from rayscreen.store import RayscreenError
    from rayscreen.stream.datasource import StreamOptions, plan_wells, read_wells
    from rayscreen.stream.fit import fit_normalization
    from rayscreen.stream.normalize import stream_normalizer
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "p.zarr"), fields=2, field_shape=(64, 64), levels=2)
    assert fit_normalization(uri, "meanstd", level=1, use_ray=False, progress=False) == {uri: "fitted"}
    assert open_plate(uri).rayscreen_attrs()["normalization"]["fit"]["level"] == 1
    images = np.concatenate([b["image"] for b in read_wells(plan_wells([uri]), StreamOptions(level=1, normalize=True))])
    np.testing.assert_allclose(images.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(0, 2, 3)), 1, rtol=1e-4)
    with pytest.raises(RayscreenError, match=r"fitted on level 1 fields but stream.level is 0; rerun `rayscreen "
                                             r"illum` with stream.level: 0"):
        stream_normalizer(uri, illumination=False, level=0)
    with pytest.raises(RayscreenError, match="stream.level is 0"):
        list(read_wells(plan_wells([uri]), StreamOptions(level=0, normalize=True)))
    # another level is another fit: not skipped as up to date
    assert fit_normalization(uri, "meanstd", level=0, use_ray=False, progress=False) == {uri: "fitted"}


def test_a_control_query_on_a_column_the_plate_lacks_names_it_and_the_columns(control_plate):
    from rayscreen.store import RayscreenError
    from rayscreen.stream.fit import fit_normalization

    with pytest.raises(RayscreenError, match=r"plate 'P' .*: the control query \"`Metadata_Treatmnt` == 'DMSO'\" "
                                             r"\(analysis.control_column / control_value\) does not apply .*"
                                             r"'Metadata_Compound', 'Metadata_Control'"):
        fit_normalization(control_plate, "control", controls="`Metadata_Treatmnt` == 'DMSO'", use_ray=False,
                          progress=False)


def test_a_coarser_level_resamples_the_illumination_function_once_per_task_not_per_field(tmp_path, monkeypatch):
    from rayscreen.stream import illumination
    from rayscreen.stream.fit import compute_illumination, fit_normalization
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "p.zarr"), fields=2, field_shape=(64, 64), levels=2)
    compute_illumination(uri, use_ray=False, progress=False)
    calls = []
    real = illumination.illumination_at
    monkeypatch.setattr(illumination, "illumination_at", lambda illum, shape: calls.append(shape) or real(illum, shape))
    fit_normalization(uri, "meanstd", illumination=True, level=1, use_ray=False, progress=False, fields_per_task=4)
    assert calls == [(32, 32), (32, 32)]  # 8 fields in 2 tasks: once each (it cost 50x the correction per field)


def test_corrections_version_follows_what_the_stream_applies(tmp_path):
    """The digest changes with a refit that changes the stored illumination array or the
    scaler's values, not with corrections the stream does not apply; None when it applies none."""
    from rayscreen.stream.illumination import save_illumination
    from rayscreen.stream.normalize import corrections_version

    uri = make_plate(str(tmp_path / "P.zarr"), name="P", wells=("A01", "A02"), fields=2, field_shape=(32, 32))
    version = functools.partial(corrections_version, uri)
    assert version(illumination=False, normalize="none") is None
    illum = np.ones((2, 32, 32), np.float32)
    save_illumination(uri, illum, params={"method": "gaussian"})
    save_normalization(uri, fit_plate_normalizer(uri, MeanStdScaler()))
    both = version(illumination=True, normalize="meanstd")
    assert both == version(illumination=True, normalize="meanstd")  # read twice: the same
    save_illumination(uri, illum, params={"method": "gaussian"})  # the same function saved again
    assert version(illumination=True, normalize="meanstd") == both
    norm_only = version(illumination=False, normalize="meanstd")
    illum[0, :16] = 1.5  # same params, another array (other fields, e.g. after an ingest finished)
    save_illumination(uri, illum, params={"method": "gaussian"})
    assert version(illumination=True, normalize="meanstd") != both
    assert version(illumination=False, normalize="meanstd") == norm_only  # the stream does not apply it
    scaler = fit_plate_normalizer(uri, MeanStdScaler())
    scaler.scale = scaler.scale * 2
    save_normalization(uri, scaler)
    assert version(illumination=False, normalize="meanstd") != norm_only


def test_corrections_are_loaded_once_per_process_and_again_after_a_refit(tmp_path, monkeypatch):
    """Read tasks of one well each (full resolution) and infer's one-well calls loaded the
    plate's illumination function again for every well; the worker process now keeps it, and
    a refit (another stored function) is loaded afresh, never the stale one applied."""
    from rayscreen.store import open_plate
    from rayscreen.stream import illumination
    from rayscreen.stream.datasource import StreamOptions, WellTask, read_wells
    from rayscreen.stream.illumination import correct, save_illumination

    uri = make_plate(str(tmp_path / "P.zarr"), name="P", wells=("A01", "A02"), fields=2, field_shape=(32, 32))
    illum = np.ones((2, 32, 32), np.float32)
    illum[:, :, :16] = 0.5
    save_illumination(uri, illum, params={"method": "gaussian"})
    loads = []
    real = illumination.load_illumination
    monkeypatch.setattr(illumination, "load_illumination", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    options = StreamOptions(illumination=True)

    def read(well):  # one read task (or one infer call) per well, as at full resolution
        (batch,) = read_wells([WellTask(uri, "P", well, {})], options)
        return batch["image"]

    raw = open_plate(uri).read("A02", "1")
    np.testing.assert_allclose(read("A01")[0], correct(open_plate(uri).read("A01", "0"), illum), rtol=1e-6)
    np.testing.assert_allclose(read("A02")[1], correct(raw, illum), rtol=1e-6)
    assert loads == [uri]  # two tasks, one load
    refit = illum.copy()
    refit[:, :16] = 2.0
    save_illumination(uri, refit, params={"method": "gaussian"})
    np.testing.assert_allclose(read("A02")[1], correct(raw, refit), rtol=1e-6)
    assert loads == [uri, uri]
