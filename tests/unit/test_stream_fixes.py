"""The stream's error report under hostile plate names, malformed well image paths under
on_error="skip", the fit stage's tasks in flight, and plates planned in threads."""

import re
import threading
import time

import numpy as np
import pytest
import zarr

from rayscreen.store import RayscreenError, open_plate
from rayscreen.stream import datasource, fit, plates
from rayscreen.stream.datasource import StreamOptions, load_error_report, plan_wells, read_wells, report_file_name
from rayscreen.stream.illumination import IlluminationAccumulator
from rayscreen.stream.normalize import ChannelStats
from rayscreen.testing import make_plate

# -- 1. the error report's file names


def _unfinished(path, name):
    """A rayscreen plate whose one well was never completed: reported under on_error="skip"."""
    return make_plate(str(path), name, wells=("A01",), fields=1, complete=False)


def _json_files(root):
    return sorted(p for p in root.rglob("*.json") if p.name != "zarr.json")


def test_a_plate_named_with_dot_dots_reports_inside_the_report_directory(tmp_path):
    """Was: '../../../escaped' wrote its record three levels above the report directory."""
    uri = _unfinished(tmp_path / "plates" / "p.zarr", "../../../escaped")
    report = tmp_path / "out" / "a" / "b" / "report"
    list(read_wells(plan_wells([uri]), StreamOptions(on_error="skip", error_report=str(report))))
    files = _json_files(tmp_path)
    assert len(files) == 1 and files[0].parent == report
    records = load_error_report(str(report))
    assert records["plate"].tolist() == ["../../../escaped"] and records["well"].tolist() == ["A01"]


def test_plate_names_with_a_slash_or_sanitising_alike_each_get_their_own_record(tmp_path):
    """Was: FileNotFoundError in the read task for 'screen1/plateA' (a subdirectory that did
    not exist); the real names stay in the records, and names that sanitise alike differ by
    their hash."""
    names = ["screen1/plateA", "screen1_plateA", "screen1 plateA"]
    uris = [_unfinished(tmp_path / f"p{i}.zarr", n) for i, n in enumerate(names)]
    report = tmp_path / "report"
    list(read_wells(plan_wells(uris), StreamOptions(on_error="skip", error_report=str(report))))
    files = _json_files(tmp_path)
    assert len(files) == 3 and {f.parent for f in files} == {report}
    assert len({f.name.split("_A01_")[0] for f in files}) == 3  # the plate part of each differs
    records = load_error_report(str(report))
    assert sorted(records["plate"]) == sorted(names)
    assert set(records["kind"]) == {"missing well"}


def test_report_file_name_is_one_safe_segment():
    for plate in ("../../../escaped", "a/b", "..", "", "é\x00:*?"):
        name = report_file_name({"plate": plate, "well": "../A01", "field": "../0"})
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.json", name), name
        assert not name.startswith(".")
    a = report_file_name({"plate": "a/b", "well": "A01", "field": None})
    b = report_file_name({"plate": "a_b", "well": "A01", "field": None})
    assert a.split("_A01_")[0] != b.split("_A01_")[0] and "_A01_well_" in a


# -- 2. a well listing an image path that leaves the well


def _foreign_plate(path, image_path, bad="B/1"):
    """An NGFF 0.4 plate of wells A/1 and B/1, one field '0' each, except that well ``bad``
    lists ``image_path``."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["plate"] = {"version": "0.4", "name": "foreign", "rows": [{"name": "A"}, {"name": "B"}],
                           "columns": [{"name": "1"}],
                           "wells": [{"path": "A/1", "rowIndex": 0, "columnIndex": 0},
                                     {"path": "B/1", "rowIndex": 1, "columnIndex": 0}]}
    for well in ("A/1", "B/1"):
        images = [{"path": image_path if well == bad else "0"}]
        group = root.create_group(well)
        group.attrs["well"] = {"version": "0.4", "images": images}
        img = group.create_group("0")
        img.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
                                     "datasets": [{"path": "0"}]}]
        img.create_array("0", data=np.ones((4, 4), np.uint16))
    return str(path)


def test_a_well_image_path_leaving_the_well_is_skipped_and_reported(tmp_path):
    """Was a bare zarr ValueError from the read, which on_error="skip" did not catch."""
    uri = _foreign_plate(tmp_path / "f.zarr", "../../A/1/0")
    report = str(tmp_path / "report")
    with pytest.raises(RayscreenError, match=re.escape(f"{uri}/B/1: well.images[0].path is '../../A/1/0'")):
        list(read_wells(plan_wells([uri]), StreamOptions()))
    (batch,) = read_wells(plan_wells([uri]), StreamOptions(on_error="skip", error_report=report))
    assert batch["well"].tolist() == ["A01"]
    records = load_error_report(report)
    assert records[["plate", "well", "field", "kind"]].values.tolist() == [["foreign", "B01", None, "RayscreenError"]]
    assert "well.images[0].path" in records["error"][0]


def test_a_malformed_first_well_does_not_hide_the_plates_layout(tmp_path):
    """The plate's channels, shape and dtype come from its first readable field: a malformed
    first well made the whole plate unreadable, even under on_error="skip"; now that well
    alone is skipped and reported, and with on_error="raise" the read still fails naming it."""
    uri = _foreign_plate(tmp_path / "f.zarr", "../../B/1/0", bad="A/1")
    plate = open_plate(uri)
    assert plate.shape == (1, 4, 4) and plate.channels == ["c0"]
    with pytest.raises(RayscreenError, match=re.escape(f"{uri}/A/1: well.images[0].path is '../../B/1/0'")):
        list(read_wells(plan_wells([uri]), StreamOptions()))
    report = str(tmp_path / "report")
    (batch,) = read_wells(plan_wells([uri]), StreamOptions(on_error="skip", error_report=report))
    assert batch["well"].tolist() == ["B01"]
    assert load_error_report(report)["well"].tolist() == ["A01"]
    only_bad = _foreign_plate(tmp_path / "g.zarr", "../../B/1/0", bad="A/1")
    zarr.open_group(only_bad, mode="r+")["B/1"].attrs["well"] = {"version": "0.4", "images": [{"path": "../x"}]}
    with pytest.raises(RayscreenError, match=r"no readable field.*A/1: well.images\[0\].path is '../../B/1/0'"):
        open_plate(only_bad).shape


# -- 3. the fit stage's tasks in flight


def test_tasks_in_flight_fill_the_driver_budget_even_with_no_cpu_yet():
    big = fit.illumination_partial_bytes((5, 2160, 2560))  # a 5-channel 2160 x 2560 field: 221 MB
    assert big == 5 * 2160 * 2560 * 8
    assert fit.tasks_in_flight(big, 0) == fit.DRIVER_BUDGET_BYTES // big == 9
    assert fit.tasks_in_flight(big, 64) == 128  # 2 per CPU, even past the budget
    assert fit.tasks_in_flight(1024**2, 0) == 2048
    assert fit.tasks_in_flight(None, 0) == 2 and fit.tasks_in_flight(None, 3.5) == 6
    assert fit.tasks_in_flight(3 * fit.DRIVER_BUDGET_BYTES, 0) == 2
    assert fit.tasks_in_flight(100, 0, budget=1000) == 10


def test_partial_size_estimates_hold_what_a_task_returns():
    fields = np.random.default_rng(0).integers(0, 4000, (6, 3, 50, 60), dtype=np.uint16)
    acc = IlluminationAccumulator()
    stats = ChannelStats(seed=[0, 1, 2])
    for f in fields:
        acc.add(f)
        stats.add(f)
    assert fit.illumination_partial_bytes(fields.shape[1:]) == acc.sum.nbytes
    assert stats.sample.nbytes + stats.keys.nbytes <= fit.stats_partial_bytes(3, len(fields))
    # bounded by the sample size, however many fields a task reads
    assert fit.stats_partial_bytes(5, 10_000) == fit.stats_partial_bytes(5, 1_000_000)


# -- 4. plates planned in threads


def _slow_open(monkeypatch, module, uris):
    """Patch ``module.open_plate`` to wait longer for earlier plates (so they finish last) and
    to record the threads that opened them."""
    threads = []
    real = module.open_plate

    def open_plate(uri, *args, **kwargs):
        time.sleep(0.03 * (len(uris) - uris.index(uri)) if uri in uris else 0)
        threads.append(threading.current_thread().name)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(module, "open_plate", open_plate)
    return threads


def _plates(tmp_path, n=6):
    return [make_plate(str(tmp_path / f"p{i}.zarr"), f"P{i}", wells=("A01", "B02", "A02")[:1 + i % 3], fields=1,
                       seed=i) for i in range(n)]


def test_plan_wells_opens_plates_in_threads_in_the_same_order(tmp_path, monkeypatch):
    uris = _plates(tmp_path)
    monkeypatch.setattr(datasource, "PLANNING_THREADS", 1)
    sequential = plan_wells(uris, where={"Metadata_Compound": ["DMSO", "cpd1", "cpd2"]})
    monkeypatch.setattr(datasource, "PLANNING_THREADS", 16)
    threads = _slow_open(monkeypatch, datasource, uris)
    threaded = plan_wells(uris, where={"Metadata_Compound": ["DMSO", "cpd1", "cpd2"]})
    assert threaded == sequential
    assert [t.plate for t in threaded] == ["P0", "P1", "P1", "P2", "P2", "P2", "P3", "P4", "P4", "P5", "P5", "P5"]
    assert "MainThread" not in threads and len(set(threads)) > 1


def test_plan_wells_raises_the_first_failing_plate_in_order(tmp_path, monkeypatch):
    uris = _plates(tmp_path, 3)
    missing = [str(tmp_path / "gone1.zarr"), str(tmp_path / "gone2.zarr")]
    order = [uris[0], missing[0], uris[1], missing[1], uris[2]]
    _slow_open(monkeypatch, datasource, order)  # gone2 fails before gone1
    with pytest.raises(RayscreenError, match=re.escape(missing[0]) + ": no such plate"):
        plan_wells(order)
    with pytest.raises(RayscreenError, match=r"filter on annotation column 'Metadata_X': plate 'P0'"):
        plan_wells(uris, where={"Metadata_X": 1})


def test_read_plates_checks_plates_opened_in_threads_in_order(tmp_path, monkeypatch):
    uris = _plates(tmp_path, 5)
    other = make_plate(str(tmp_path / "rgb.zarr"), "RGB", wells=("A01",), fields=1, channels=("R", "G", "B"))
    twin = make_plate(str(tmp_path / "twin.zarr"), "P0", wells=("A01",), fields=1)
    threads = _slow_open(monkeypatch, plates, uris + [other, twin])
    # the first error in plate order, though the later plate's check would fail too
    with pytest.raises(RayscreenError, match=re.escape(f"{uris[0]} and {twin} are both named 'P0'")):
        plates.read_plates(uris + [twin, other])
    assert "MainThread" not in threads[1:] and len(set(threads[1:])) > 1  # uris[0] is opened once, up front
    with pytest.raises(RayscreenError, match=re.escape(f"{other} has ['R', 'G', 'B']")):
        plates.read_plates(uris + [other, twin])


def test_read_plates_keeps_the_callers_channel_filter_after_checking_the_plates(tmp_path, monkeypatch):
    """The threaded checks must not rebind the caller's ``channels`` with a plate's channel names."""
    uris = _plates(tmp_path, 3)
    made = {}
    monkeypatch.setattr(plates, "read_datasource", lambda source, **_: made.setdefault("source", source))
    monkeypatch.setattr(plates, "_default_num_tasks", lambda *_: None)
    plates.read_plates(uris, channels=["Actin"])
    assert made["source"]._options.channels == ("Actin",)


def test_open_plates_opens_in_order_and_raises_the_first_bad_plate(tmp_path):
    """Planners open a screen's plates in threads (their layout read there); the plates come
    back in config order and the first unreadable one, in that order, is the error."""
    from rayscreen.stream.datasource import open_plates

    uris = [make_plate(str(tmp_path / f"P{i}.zarr"), f"P{i}", wells=("A01",), fields=1, field_shape=(8, 8))
            for i in range(5)]
    assert [p.name for p in open_plates(uris)] == ["P0", "P1", "P2", "P3", "P4"]
    with pytest.raises(RayscreenError, match=re.escape(str(tmp_path / "nope2.zarr"))):
        open_plates([uris[0], str(tmp_path / "nope2.zarr"), uris[1], str(tmp_path / "nope3.zarr")])
