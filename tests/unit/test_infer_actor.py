"""The inference actor called directly (no Ray): what a retried call rewrites, and how many
wells it holds at once."""

import os
import threading
import time

import numpy as np
import pytest

from rayscreen.infer.run import PLATES_KEPT, READ_AHEAD, READERS, InferWells, WellScoring, create_store, plan_infer

from ..integration.infer_helpers import infer_config, make_screen


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("screen"))
    return make_screen(root, n_plates=1)  # 6 wells of 3 fields


def _actor(screen, out):
    uris, ckpt = screen
    config = infer_config(uris, ckpt, out)
    plan = plan_infer(config)
    writer = create_store(plan, config)
    return InferWells(WellScoring.of(plan, config, use_gpu=False)), plan, writer


def _batch(plan, indices):
    """A map_batches batch (batch_format numpy) of the wells ``indices``."""
    wells = plan.wells.iloc[list(indices)]
    return {"index": np.asarray(indices, np.int64), "plate_uri": wells["plate_uri"].to_numpy(object),
            "plate": wells["plate"].to_numpy(object), "well": wells["well"].to_numpy(object)}


def _well_chunks(store, index):
    """{path: (mtime_ns, bytes)} of every chunk of well ``index`` (first coordinate = the well)."""
    out = {}
    for dirpath, _, files in os.walk(store):
        rel = os.path.relpath(dirpath, store).split(os.sep)
        if len(rel) >= 3 and rel[1] == "c" and rel[2] == str(index):
            for f in files:
                p = os.path.join(dirpath, f)
                out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
        elif len(rel) == 2 and rel[1] == "c" and str(index) in files:  # 1-d variables: c/<index>
            p = os.path.join(dirpath, str(index))
            out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


def test_a_retried_call_does_not_rewrite_a_well_another_attempt_finished(tmp_path, screen):
    """A lost actor's task is run again whole: its wells that the first attempt wrote are
    done and must stay as written (a rewrite cut short leaves a done well with chunks of two
    attempts) -- reported with their stored field count, not computed again."""
    actor, plan, writer = _actor(screen, tmp_path / "out")
    store = os.path.join(str(tmp_path / "out"), "results.zarr")
    first = actor(_batch(plan, [0, 1]))
    assert first["n_fields"].tolist() == [3, 3] and writer.done_mask().tolist() == [1, 1, 0, 0, 0, 0]
    before = {i: _well_chunks(store, i) for i in (0, 1)}
    assert len(before[0]) >= 10  # every variable's chunk of the well, and its done flag
    time.sleep(0.05)  # a rewrite would show in the mtimes
    calls = []
    actor.predictor = (lambda p: lambda batch: (calls.append(len(batch["image"])), p(batch))[1])(actor.predictor)
    again = actor(_batch(plan, [0, 1, 2]))  # the retry of a task whose first attempt wrote 0 and 1
    assert again["index"].tolist() == [0, 1, 2] and again["n_fields"].tolist() == [3, 3, 3]
    assert calls == [3]  # only well 2 was scored
    assert {i: _well_chunks(store, i) for i in (0, 1)} == before
    assert writer.done_mask().tolist() == [1, 1, 1, 0, 0, 0]


def test_a_call_holds_a_bounded_number_of_wells_whatever_its_size(tmp_path, screen):
    """A call of many wells (29 wells of ~0.5 GB each at scale) reads READ_AHEAD wells
    ahead of the one scored, not all of them at once; the results are those of the wells
    in order."""
    actor, plan, writer = _actor(screen, tmp_path / "out")
    lock, state = threading.Lock(), {"started": 0, "scored": 0, "held": 0, "running": 0, "most_running": 0}
    read, predict = actor._read, actor.predictor

    def slow_read(row):
        with lock:
            state["started"] += 1
            state["running"] += 1
            state["most_running"] = max(state["most_running"], state["running"])
            state["held"] = max(state["held"], state["started"] - state["scored"])
        try:
            return read(row)
        finally:
            with lock:
                state["running"] -= 1

    def slow_predict(batch):
        time.sleep(0.05)  # the model is slower than the reads: unbounded reads would race ahead
        out = predict(batch)
        with lock:
            state["scored"] += 1
        return out

    actor._read, actor.predictor = slow_read, slow_predict
    out = actor(_batch(plan, range(6)))
    assert out["n_fields"].tolist() == [3] * 6 and writer.done_mask().all()
    assert state["held"] <= READ_AHEAD + 1, state
    assert state["most_running"] >= 1 and state["running"] == 0


def test_a_read_error_fails_the_call_at_its_well_after_the_wells_before_are_written(tmp_path, screen):
    from rayscreen.store import RayscreenError

    actor, plan, writer = _actor(screen, tmp_path / "out")
    read = actor._read

    def failing(row):
        if int(row["index"]) == 2:
            raise RayscreenError("plate 'P1' well B01: unreadable")
        return read(row)

    actor._read = failing
    with pytest.raises(RayscreenError, match="B01: unreadable"):
        actor(_batch(plan, range(6)))
    assert writer.done_mask().tolist() == [1, 1, 0, 0, 0, 0]


def test_a_well_with_malformed_metadata_is_left_out_under_skip_and_fails_otherwise(tmp_path_factory, tmp_path):
    """Another tool's well listing an image path outside the well: a clear error naming the
    key by default; under stream.on_error: skip the well is written with no field and
    reported, as the stream does for the same well."""
    import zarr

    from rayscreen.store import RayscreenError
    from rayscreen.stream.datasource import load_error_report

    uris, ckpt = make_screen(str(tmp_path_factory.mktemp("bad")), n_plates=1)
    well = zarr.open_group(f"{uris[0]}/A/2", mode="r+")
    ome = dict(well.attrs["ome"])
    ome["well"] = {**ome["well"], "images": [{"path": "../../A/1/0"}]}
    well.attrs["ome"] = ome

    plan = plan_infer(infer_config(uris, ckpt, tmp_path / "strict"))
    create_store(plan, infer_config(uris, ckpt, tmp_path / "strict"))
    strict = InferWells(WellScoring.of(plan, infer_config(uris, ckpt, tmp_path / "strict"), use_gpu=False))
    with pytest.raises(RayscreenError, match=r"A/2: well.images\[0\].path is '../../A/1/0'"):
        strict(_batch(plan, [1]))

    config = infer_config(uris, ckpt, tmp_path / "skip").replace(
        stream=infer_config(uris, ckpt, tmp_path / "skip").stream.__class__(normalize="none", on_error="skip"))
    plan = plan_infer(config)
    create_store(plan, config)
    out = InferWells(WellScoring.of(plan, config, use_gpu=False))(_batch(plan, [0, 1]))
    assert out["n_fields"].tolist() == [3, 0]
    records = load_error_report(plan.options.error_report)
    assert records["well"].tolist() == ["A02"] and "well.images[0].path" in records["error"][0]


def test_the_actor_opens_each_plate_once_across_calls_and_keeps_a_few(tmp_path, screen):
    """An infer actor lives for a whole screen: its reads opened the plate (metadata reads)
    again for every call, and the plates it kept were never let go."""
    actor, plan, _ = _actor(screen, tmp_path / "out")
    actor(_batch(plan, [0, 1]))
    actor(_batch(plan, [2, 3]))
    info = actor._plate_of.cache_info()
    # one plate, two lookups per well (its fields, then its pixels): opened by the first reads
    # (one per reader thread at most, racing) and reused by every later one
    assert info.currsize == 1 and info.misses <= READERS and info.hits + info.misses == 8
    assert info.hits >= 8 - READERS and info.maxsize == PLATES_KEPT
