"""Illumination and normalisation jobs on a real local Ray, and their use in the stream."""

import os

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from rayscreen.config import Config, StreamConfig
from rayscreen.store import create_plate, open_plate
from rayscreen.stream import read_plates
from rayscreen.stream.fit import compute_illumination, fit_normalization, run_illum
from rayscreen.stream.illumination import compute_plate_illumination, correct, load_illumination
from rayscreen.stream.normalize import load_normalization

pytestmark = pytest.mark.integration

SHAPE = (48, 64)
WELLS = ["A01", "A02", "B01", "B02"]
CENTRE = (slice(20, 28), slice(28, 36))
CORNERS = [(slice(2, 10), slice(2, 10)), (slice(-10, -2), slice(-10, -2)),
           (slice(2, 10), slice(-10, -2)), (slice(-10, -2), slice(2, 10))]


def vignetting(shape=SHAPE, strength=0.5):
    """A smooth known illumination: 1 at the centre, 1 - strength at the corners."""
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return 1.0 - strength * (((y / (shape[0] - 1) - 0.5) ** 2 + (x / (shape[1] - 1) - 0.5) ** 2) / 0.5)


def write_screen(root, n=2, storage_options=None):
    """``n`` plates of 4 wells x 4 fields of cell-like texture multiplied by ``vignetting``;
    A01/B01 are negative controls."""
    uris = []
    rng = np.random.default_rng(7)
    ann = pd.DataFrame({"Metadata_Well": WELLS, "Metadata_Compound": ["DMSO", "cpd", "DMSO", "cpd"],
                        "Metadata_Control": ["negative", None, "negative", None]})
    for p in range(n):
        uri = f"{root}/v{p}.zarr"
        writer = create_plate(uri, f"V{p}", WELLS, ["DNA", "Actin"], SHAPE, "uint16", 4, annotations=ann,
                              storage_options=storage_options)
        for w in WELLS:
            for f in range(4):
                t = ndimage.gaussian_filter(rng.random((2, *SHAPE)), (0, 2, 2))
                t = 200 + 3000 * (t - t.min()) / (t.max() - t.min())
                writer.write_field(w, f, np.rint(t * vignetting()).astype(np.uint16))
            writer.complete_well(w, 4)
        uris.append(uri)
    return uris


def corner_ratio(images):
    """Mean over fields (N, C, Y, X) -> the worst |corner / centre - 1| over channels and corners."""
    mean = np.mean(images, axis=0)
    return max(abs(mean[c][corner].mean() / mean[c][CENTRE].mean() - 1)
               for c in range(mean.shape[0]) for corner in CORNERS)


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    return write_screen(tmp_path_factory.mktemp("illum"))


def test_illumination_job_flattens_vignetting_and_the_stream_applies_it_exactly(screen, ray_local):
    status = compute_illumination(screen, fields_per_task=3, progress=False)  # 6 tasks per plate
    assert status == {u: "computed" for u in screen}
    for uri in screen:  # the Ray job equals the single-process computation
        np.testing.assert_allclose(load_illumination(uri), compute_plate_illumination(uri), rtol=1e-5)
    assert fit_normalization(screen, "meanstd", illumination=True, fields_per_task=5,
                             progress=False) == {u: "fitted" for u in screen}

    raw = read_plates(screen).take_all()
    corrected = read_plates(screen, illumination=True).take_all()
    both = read_plates(screen, illumination=True, normalize=True, override_num_blocks=3).take_all()
    assert len(raw) == len(corrected) == len(both) == 2 * 4 * 4
    # the vignetting: corners about 50% darker than the centre before, within 10% after
    before = corner_ratio([r["image"].astype(np.float64) for r in raw])
    after = corner_ratio([r["image"] for r in corrected])
    assert before > 0.35 and after < 0.1, (before, after)

    illum = {u: load_illumination(u) for u in screen}
    norm = {u: load_normalization(u) for u in screen}
    by_name = {open_plate(u).name: u for u in screen}
    for r in both:
        uri = by_name[r["plate"]]
        expected = norm[uri].transform(correct(open_plate(uri).read(r["well"], r["field"]), illum[uri]))
        assert r["image"].dtype == np.float32
        np.testing.assert_array_equal(r["image"], expected)
    # meanstd fitted on corrected fields: the streamed screen is standardised per plate and channel
    for name in by_name:
        stack = np.stack([r["image"] for r in both if r["plate"] == name]).astype(np.float64)
        np.testing.assert_allclose(stack.mean(axis=(0, 2, 3)), 0, atol=1e-4)
        np.testing.assert_allclose(stack.std(axis=(0, 2, 3)), 1, atol=1e-4)

    # resumed: nothing to do; other parameters recompute
    assert compute_illumination(screen, progress=False) == {u: "skipped" for u in screen}
    assert compute_illumination(screen[:1], size=4.0, progress=False) == {screen[0]: "computed"}
    # the normaliser of plate 0 was fitted after the old function: the stream refuses it...
    with pytest.raises(Exception, match="another illumination function"):
        read_plates(screen[:1], illumination=True, normalize=True).take_all()
    # ...and a new fit replaces it
    assert fit_normalization(screen, "meanstd", illumination=True, progress=False) == {
        screen[0]: "fitted", screen[1]: "skipped"}
    # statistics of corrected fields must not be applied to raw ones
    with pytest.raises(Exception, match="illumination-corrected fields"):
        read_plates(screen[:1], normalize=True).take_all()


def test_run_illum_stage_from_a_config(tmp_path, ray_local):
    uris = write_screen(tmp_path, n=2)
    config = Config(plates=[str(tmp_path / "v*.zarr")], output=str(tmp_path / "run"),
                    stream=StreamConfig(illumination=True, normalize="control"))
    out = run_illum(config, progress=False)
    assert out["plates"] == uris
    assert out["illumination"] == {u: "computed" for u in uris}
    assert out["normalization"] == {u: "fitted" for u in uris}
    for uri in uris:
        scaler = load_normalization(uri)
        assert scaler.method == "control"
        # fitted on the corrected control wells (A01, B01) only
        plate, illum = open_plate(uri), load_illumination(uri)
        controls = np.stack([correct(plate.read(w, f), illum) for w in ("A01", "B01") for f in range(4)])
        np.testing.assert_allclose(scaler.offset, controls.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-9)
    again = run_illum(config, progress=False)
    assert set(again["illumination"].values()) == set(again["normalization"].values()) == {"skipped"}
    # no normaliser and no illumination: nothing happens
    idle = run_illum(config.replace(stream=StreamConfig(illumination=False, normalize="none")), progress=False)
    assert idle["illumination"] == idle["normalization"] == {}


def test_missing_corrections_fail_naming_the_plate(tmp_path, ray_local):
    uri = write_screen(tmp_path, n=1)[0]
    with pytest.raises(Exception, match="v0.zarr: no illumination function stored"):
        read_plates(uri, illumination=True).take_all()
    with pytest.raises(Exception, match="v0.zarr: no normalisation stored"):
        read_plates(uri, normalize=True).take_all()


def test_illumination_on_s3(ray_local, s3_bucket):
    bucket, options = s3_bucket
    uris = write_screen(bucket, n=1, storage_options=options)
    assert compute_illumination(uris, options, fields_per_task=8, progress=False) == {uris[0]: "computed"}
    rows = read_plates(uris, storage_options=options, illumination=True).take_all()
    assert len(rows) == 16 and corner_ratio([r["image"] for r in rows]) < 0.1
    illum = load_illumination(uris[0], options)
    plate = open_plate(uris[0], options)
    for r in rows[:4]:
        np.testing.assert_array_equal(r["image"], correct(plate.read(r["well"], r["field"]), illum))


def test_jobs_illum_entry_point(tmp_path, ray_local, capsys):
    """``jobs/illum.py --config``: parses the config before Ray, then runs the stage on the
    Ray it finds (here the test session's; under ``ray job submit``, the cluster)."""
    from rayscreen.cli import job_main

    path = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "illum.py")
    assert "job_main(\"illum\")" in open(path).read()  # jobs/illum.py is this entry point

    uris = write_screen(tmp_path, n=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"plates: ['{tmp_path}/v*.zarr']\noutput: {tmp_path}/run\n"
                      "stream: {illumination: true, normalize: percentile}\n")
    assert job_main("illum", ["--config", str(config)]) == 0
    assert '"illumination": {"' + uris[0] + '": "computed"}' in capsys.readouterr().out
    assert load_illumination(uris[0]) is not None and load_normalization(uris[0]).method == "percentile"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"plates: ['{tmp_path}/v*.zarr']\noutput: x\nstream: {{illumination: yes, normalise: 1}}\n")
    assert job_main("illum", ["--config", str(bad), "--quiet"]) == 2
    assert "normalise" in capsys.readouterr().err


def test_tasks_in_flight_follow_the_cluster_as_it_grows(ray_local):
    """The fit stage submits as many tasks as its budget of partials holds and at least 2 per
    CPU, asking the cluster's CPUs again after every result (an autoscaling cluster starts
    with none; counted once, demand stayed at 2 tasks and the cluster never grew). Real Ray
    tasks; the CPU count the stage sees is given as a growing sequence."""
    import time

    from rayscreen.stream import fit

    seen = iter([0, 0, 1, 4, 8] + [8] * 200)
    asked = []

    def cpus():
        asked.append(next(seen))
        return asked[-1]

    class Count:
        def __init__(self, n=1):
            self.n = n

        def merge(self, other):
            return Count(self.n + other.n)

    def task(i):
        time.sleep(0.01)
        return Count()

    done = {}
    jobs = [(f"p{k}", [(i,) for i in range(30)]) for k in range(2)]
    fit._reduce_per_plate(jobs, task, lambda uri, m: done.setdefault(uri, m.n), use_ray=True, max_in_flight=None,
                          progress=False, what="test", partial_bytes=fit.DRIVER_BUDGET_BYTES, cluster_cpus=cpus)
    assert done == {"p0": 30, "p1": 30}  # every partial merged once, per plate
    assert len(asked) == 1 + 60  # once to start, then after every result
    assert [fit.tasks_in_flight(fit.DRIVER_BUDGET_BYTES, c) for c in asked[:5]] == [2, 2, 2, 8, 16]
