"""The profile stage's driver without Ray: GPU choice, plate checks, the well writes from a
thread pool (run_profile with the actor stream replaced by rows made here) and the store's
attributes."""

import json
import os
import threading
import time

import numpy as np
import pytest
import torch
import zarr

import rayscreen.profile.predictor as predictor
import rayscreen.profile.run as profile_run
from rayscreen.config import ConfigError, config_from_dict
from rayscreen.profile.image_qc import qc_metric_names
from rayscreen.profile.run import WellWrites, plan_profile, run_profile
from rayscreen.stream.datasource import check_plate_set
from rayscreen.store import RayscreenError
from rayscreen.store.results import ResultsWriter
from rayscreen.testing import make_plate

# --------------------------------------------------------------------------- profile.use_gpu


# --------------------------------------------------------------------------- plate checks


class FakePlate:
    def __init__(self, name, channels):
        self.name, self.channels = name, list(channels)


def test_plate_set_returns_the_streamed_channels():
    plates = [("s3://b/p1.zarr", FakePlate("P1", ["DNA", "Actin"])), ("s3://b/p2.zarr", FakePlate("P2", ["DNA", "Actin"]))]
    assert check_plate_set(plates) == ["DNA", "Actin"]
    assert check_plate_set(plates, ["Actin"]) == ["Actin"]
    assert check_plate_set([]) == []


def test_plate_set_rejects_two_plates_of_one_name_naming_both_uris():
    plates = [("s3://b/a.zarr", FakePlate("P1", ["DNA"])), ("s3://b/x.zarr", FakePlate("P2", ["DNA"])),
              ("s3://b/b.zarr", FakePlate("P1", ["DNA"]))]
    with pytest.raises(RayscreenError) as err:
        check_plate_set(plates)
    assert "s3://b/a.zarr" in str(err.value) and "s3://b/b.zarr" in str(err.value) and "'P1'" in str(err.value)
    with pytest.raises(ConfigError):  # train's planner passes its own error type
        check_plate_set(plates, error=ConfigError)


def test_plate_set_rejects_a_channel_a_later_plate_lacks():
    plates = [("/d/p1.zarr", FakePlate("P1", ["DNA", "Actin"])), ("/d/p2.zarr", FakePlate("P2", ["DNA", "Mito"]))]
    with pytest.raises(RayscreenError, match="Actin") as err:
        check_plate_set(plates, ["DNA", "Actin"])
    assert "/d/p1.zarr" in str(err.value) and "/d/p2.zarr" in str(err.value)


def test_plate_set_names_the_missing_channel_and_the_plates():
    plates = [("/d/p1.zarr", FakePlate("P1", ["DNA"])), ("/d/p2.zarr", FakePlate("P2", ["DNA"]))]
    with pytest.raises(RayscreenError, match=r"stream.channels: \['Mito'\]") as err:
        check_plate_set(plates, ["DNA", "Mito"])
    assert "/d/p1.zarr" in str(err.value) and "/d/p2.zarr" in str(err.value)


def test_plan_profile_checks_every_plate_not_only_the_first(tmp_path):
    p1 = make_plate(str(tmp_path / "p1.zarr"), "P1", wells=("A01",), fields=1, field_shape=(8, 8),
                    channels=("DNA", "Actin"))
    p2 = make_plate(str(tmp_path / "p2.zarr"), "P2", wells=("A01",), fields=1, field_shape=(8, 8),
                    channels=("DNA", "Mito"))
    twin = make_plate(str(tmp_path / "twin.zarr"), "P1", wells=("A01",), fields=1, field_shape=(8, 8),
                      channels=("DNA", "Actin"))
    config = config_from_dict({"plates": [p1, p2], "output": str(tmp_path / "out"),
                               "stream": {"channels": ["DNA", "Actin"], "normalize": "none"}})
    with pytest.raises(RayscreenError, match="Actin") as err:
        plan_profile(config)
    assert p2 in str(err.value)
    with pytest.raises(RayscreenError, match="both named 'P1'") as err:
        plan_profile(config.replace(plates=[p1, twin]))
    assert p1 in str(err.value) and twin in str(err.value)


# --------------------------------------------------------------------------- run_profile without Ray

D = 5  # features of the stand-in network


class StandInPredictor:
    """What run_profile asks of its probe: feature names and a network to fingerprint."""

    def __init__(self, *args, **kwargs):
        self.features = [f"f{i}" for i in range(D)]
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, D)


def field_row(plate, well, field):
    seed = sum(map(ord, f"{plate}/{well}/{field}"))
    rng = np.random.default_rng(seed)
    return rng.normal(size=D).astype(np.float32), rng.random(len(qc_metric_names(2))).astype(np.float32)


def send_rows(rows, on_batch):
    """(plate, well, field) rows to ``on_batch`` as the actors' output: batches of 3 rows."""
    for k in range(0, len(rows), 3):
        chunk = rows[k:k + 3]
        made = [field_row(*r) for r in chunk]
        on_batch({"plate": np.array([r[0] for r in chunk]), "well": np.array([r[1] for r in chunk]),
                  "field": np.array([r[2] for r in chunk]), "profile": np.stack([m[0] for m in made]),
                  "qc": np.stack([m[1] for m in made])})


@pytest.fixture
def driver(tmp_path, monkeypatch):
    """run_profile over two plates of 12 wells, its actor stream replaced by rows made here
    (batches of 3 rows, wells interleaved) and no Ray."""
    wells = tuple(f"{r}{c:02d}" for r in "AB" for c in range(1, 7))
    uris = [make_plate(str(tmp_path / f"P{p}.zarr"), f"P{p}", wells=wells, fields=2, field_shape=(8, 8))
            for p in (1, 2)]

    def stream(config, plan, todo, normalizers, on_batch):
        send_rows([(plate, well, f) for f in ("0", "1") for plate, well in todo], on_batch)
        return None

    monkeypatch.setattr(predictor, "ProfilePredictor", StandInPredictor)
    monkeypatch.setattr(profile_run, "_profile_fields", stream)
    monkeypatch.setattr(profile_run, "ensure_ray", lambda: None)

    def config(output, **profile):
        return config_from_dict({"plates": uris, "output": str(tmp_path / output), "stream": {"normalize": "none"},
                                 "profile": {"classical": False, **profile}})

    return config


def store_files(uri):
    """{relative path: bytes} of a local store, the root's creation and finish times and the
    run's output directory left out."""
    out = {}
    for dirpath, _, files in os.walk(uri):
        for f in files:
            path = os.path.join(dirpath, f)
            data = open(path, "rb").read()
            if os.path.relpath(path, uri) == "zarr.json":
                doc = json.loads(data)
                for key in ("created", "finished"):
                    doc["attributes"]["rayscreen"].pop(key, None)
                doc["attributes"]["rayscreen"]["config"].pop("output")
                data = json.dumps(doc, sort_keys=True).encode()
            out[os.path.relpath(path, uri)] = data
    return out


class SerialWrites:
    """The driver's writes as they were: each well written in the driver, one after the other."""

    def __init__(self, writer, on_written=None, **_):
        self.writer, self.on_written = writer, on_written

    def submit(self, index, values, **flags):
        self.writer.write_well(index, values, **flags)
        self.on_written(index)

    def finish(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def slowed_writes(monkeypatch, fail_on=None):
    """write_well slowed (a PUT's latency, in random order) and counting how many run at once."""
    original = ResultsWriter.write_well
    state = {"now": 0, "most": 0, "calls": [], "lock": threading.Lock()}
    rng = np.random.default_rng(1)
    delays = iter(rng.uniform(0.005, 0.03, 10_000))

    def write_well(self, index, values, **flags):
        with state["lock"]:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["calls"].append(index)
            delay = next(delays)
        try:
            time.sleep(delay)
            if fail_on is not None and index == fail_on:
                raise OSError(f"PUT failed for well {index}")
            original(self, index, values, **flags)
        finally:
            with state["lock"]:
                state["now"] -= 1

    monkeypatch.setattr(ResultsWriter, "write_well", write_well)
    return state


def test_wells_are_written_concurrently_into_the_same_bytes_as_one_by_one(driver, monkeypatch):
    state = slowed_writes(monkeypatch)
    concurrent = run_profile(driver("concurrent"), progress=False)
    assert state["most"] > 1  # written from the pool, not one after the other in the driver
    assert sorted(state["calls"]) == list(range(24))  # every well once
    with monkeypatch.context() as m:
        m.setattr(profile_run, "WellWrites", SerialWrites)
        serial = run_profile(driver("serial"), progress=False)
    a, b = store_files(concurrent), store_files(serial)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    done = zarr.open_group(concurrent, mode="r")["done"][...]
    assert (done == 1).all()
    assert zarr.open_group(concurrent, mode="r").attrs["rayscreen"]["last_run"] == {"computed": 24, "skipped": 0}


def test_the_progress_bar_counts_each_written_well(driver, monkeypatch):
    counted = []

    class Counting(profile_run.Progress):
        def update(self, n=1):
            counted.append(threading.current_thread() is threading.main_thread())
            super().update(n)

    monkeypatch.setattr(profile_run, "Progress", Counting)
    run_profile(driver("run"), progress=False)
    assert len(counted) == 24 and all(counted)  # once a well, from the driver's thread


def test_a_failed_write_fails_the_stage_after_the_writes_in_flight(driver, monkeypatch):
    original = ResultsWriter.write_well
    state = slowed_writes(monkeypatch, fail_on=7)
    config = driver("run")
    with pytest.raises(OSError, match="PUT failed for well 7"):
        run_profile(config, progress=False)
    assert state["now"] == 0  # no write runs on after the stage failed
    assert not [t for t in threading.enumerate() if t.name.startswith("profile-write")]
    root = zarr.open_group(config.output + "/profiles.zarr", mode="r")
    assert root["done"][7] == 0
    assert "finished" not in root.attrs["rayscreen"]  # not finalized
    written = int(root["done"][...].sum())
    assert written < 24
    # once the fault is gone, a rerun writes the rest
    monkeypatch.setattr(ResultsWriter, "write_well", original)
    root = zarr.open_group(run_profile(config, progress=False), mode="r")
    assert (root["done"][...] == 1).all()
    assert root.attrs["rayscreen"]["last_run"] == {"computed": 24 - written, "skipped": written}


def test_well_writes_raise_the_first_error_and_take_each_well_once(tmp_path):
    written = []

    class Writer:
        variables = {}

        def write_well(self, index, values, **flags):
            time.sleep(0.01)
            if index == 3:
                raise OSError("boom on 3")
            written.append(index)

    writes = WellWrites(Writer(), threads=4)
    with pytest.raises(OSError, match="boom on 3"):
        with writes:
            for i in range(40):
                writes.submit(i, {})
            writes.finish()
    assert 3 not in written and len(written) == len(set(written)) < 40  # stopped early, none twice
    with pytest.raises(OSError, match="boom on 3"):
        writes.submit(99, {})  # a swallowed error still stops the next write

    writes = WellWrites(Writer(), threads=2)
    with writes:
        writes.submit(0, {})
        with pytest.raises(RayscreenError, match="twice"):
            writes.submit(0, {})


def test_well_writes_keep_the_wells_before_another_error(tmp_path):
    """The stream fails: the wells already handed to the writer are still written."""
    written, counted = [], []

    class Writer:
        variables = {}

        def write_well(self, index, values, **flags):
            time.sleep(0.02)
            written.append(index)

    with pytest.raises(KeyError):
        with WellWrites(Writer(), on_written=counted.append, threads=2) as writes:
            for i in range(6):
                writes.submit(i, {})
            raise KeyError("the stream failed")
    assert sorted(written) == list(range(6)) and sorted(counted) == list(range(6))


def test_the_store_records_the_weights_uri_without_its_password(driver):
    uri = run_profile(driver("run", weights="https://alice:hunter2@models.example/w.pt"), progress=False)
    attrs = zarr.open_group(uri, mode="r").attrs["rayscreen"]
    assert attrs["checkpoint"] == "https://alice:***@models.example/w.pt"
    assert "hunter2" not in json.dumps(dict(zarr.open_group(uri, mode="r").attrs))


def test_rows_a_retried_task_sends_again_are_counted_once(driver, monkeypatch):
    """Ray runs a task again after losing its actor, and the rows it had already sent come
    again (at least once). Counted twice, a well's row count was reached with a field
    missing: written with a read error there, its last field then dropped as done."""
    def stream(config, plan, todo, normalizers, on_batch):
        rows = [(plate, well, f) for f in ("0", "1") for plate, well in todo]
        send_rows(rows[:5] + rows[:5] + rows[5:], on_batch)  # a task's first rows, then its retry from the start
        return None

    clean = run_profile(driver("clean"), progress=False)
    monkeypatch.setattr(profile_run, "_profile_fields", stream)
    retried = run_profile(driver("retried"), progress=False)
    status = zarr.open_group(retried, mode="r")["field_status"][...]
    assert (status == 0).all()  # every field profiled, none taken for a read error
    a, b = store_files(clean), store_files(retried)
    assert [k for k in a if a[k] != b[k]] == []


def test_a_well_with_malformed_metadata_is_written_without_fields_under_skip(driver, monkeypatch, tmp_path):
    """The stream skips (and reports) another tool's well whose image path leaves the well;
    the driver then asked the plate for that well's fields to tell a read error from an
    absent field, and the plate's error stopped the stage."""
    import dataclasses

    config = driver("skip")
    config = config.replace(stream=dataclasses.replace(config.stream, on_error="skip"))
    well = zarr.open_group(f"{config.plates[0]}/A/2", mode="r+")
    ome = dict(well.attrs["ome"])
    ome["well"] = {**ome["well"], "images": [{"path": "../../A/1/0"}]}
    well.attrs["ome"] = ome

    def stream(config, plan, todo, normalizers, on_batch):  # as the stream: the malformed well left out
        send_rows([(p, w, f) for f in ("0", "1") for p, w in todo if (p, w) != ("P1", "A02")], on_batch)
        return None

    monkeypatch.setattr(profile_run, "_profile_fields", stream)
    ds = zarr.open_group(run_profile(config, progress=False), mode="r")
    wells = [str(w) for w in ds["well"][...]]
    status = ds["field_status"][...]
    assert status[wells.index("P1/A02")].tolist() == [1, 1]  # no field: as an absent well
    assert (np.delete(status, wells.index("P1/A02"), axis=0) == 0).all() and (ds["done"][...] == 1).all()


def test_a_rerun_profiles_again_only_the_well_with_a_read_error(driver, monkeypatch):
    """A field on disk that sent no row is a read error (maybe transient): its well alone is
    flagged retry, and a rerun profiles that well again and skips the others."""
    config = driver("retry")

    def lossy(config, plan, todo, normalizers, on_batch):  # field 1 of P1/A03 failed to read
        send_rows([(p, w, f) for f in ("0", "1") for p, w in todo if (p, w, f) != ("P1", "A03", "1")], on_batch)
        return None

    monkeypatch.setattr(profile_run, "_profile_fields", lossy)
    uri = run_profile(config, progress=False)
    ds = zarr.open_group(uri, mode="r")
    wells = [str(w) for w in ds["well"][...]]
    assert ds["field_status"][wells.index("P1/A03")].tolist() == [0, 2]
    assert sorted(os.listdir(os.path.join(uri, "retry", "c"))) == [str(wells.index("P1/A03"))]
    sent = []

    def full(config, plan, todo, normalizers, on_batch):
        sent.extend(todo)
        send_rows([(p, w, f) for f in ("0", "1") for p, w in todo], on_batch)
        return None

    monkeypatch.setattr(profile_run, "_profile_fields", full)
    ds = zarr.open_group(run_profile(config, progress=False), mode="r")
    assert [tuple(t) for t in sent] == [("P1", "A03")]
    assert (ds["field_status"][...] == 0).all() and (ds["done"][...] == 1).all()
    assert os.listdir(os.path.join(uri, "retry", "c")) == []  # the flag went with the rewrite
    assert ds.attrs["rayscreen"]["last_run"] == {"computed": 1, "skipped": 23}
