"""The records of a non-finite training loss (one file per rank and run name) and the
events.jsonl reader."""

import json

from rayscreen.train.loop import (EVENTS, clear_nonfinite, nonfinite_message, read_events, read_nonfinite,
                                  write_nonfinite)


def _record(rank, time, epoch=2):
    return {"rank": rank, "epoch": epoch, "step": 3, "from_epoch": 0, "time": time,
            "message": "training loss is nan; lower train.lr or set train.grad_clip"}


def test_the_earliest_record_of_the_run_is_the_one_reported(tmp_path):
    run_dir = str(tmp_path)
    assert read_nonfinite(run_dir, "train") is None
    write_nonfinite(run_dir, "train", _record(1, 10.0))
    write_nonfinite(run_dir, "train", _record(0, 12.0))
    write_nonfinite(run_dir, "other", _record(0, 5.0))  # another run name in the same output
    assert read_nonfinite(run_dir, "train") == _record(1, 10.0)
    assert "epoch 2, step 3 (rank 1): training loss is nan" in nonfinite_message(read_nonfinite(run_dir, "train"))
    # the next run_train call of the run starts with none; the other run keeps its own
    clear_nonfinite(run_dir, "train")
    assert read_nonfinite(run_dir, "train") is None and read_nonfinite(run_dir, "other") == _record(0, 5.0)


def test_an_unreadable_record_is_skipped_with_a_warning(tmp_path, caplog):
    write_nonfinite(str(tmp_path), "train", _record(0, 10.0))
    (tmp_path / "nonfinite" / "train-rank-1.json").write_text('{"rank": 1, "epo')  # cut short
    with caplog.at_level("WARNING"):
        assert read_nonfinite(str(tmp_path), "train") == _record(0, 10.0)
    assert "unreadable non-finite loss record" in caplog.text and "train-rank-1.json" in caplog.text


def test_read_events_keeps_the_starts_by_default(tmp_path):
    lines = [{"event": "start", "from_epoch": 0}, {"event": "nonfinite", **_record(0, 1.0)},
             {"event": "start", "from_epoch": 1}]
    (tmp_path / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert [e["from_epoch"] for e in read_events(str(tmp_path))] == [0, 1]
    assert [e["event"] for e in read_events(str(tmp_path), event=None)] == ["start", "nonfinite", "start"]
    assert read_events(str(tmp_path), event="nonfinite") == [{"event": "nonfinite", **_record(0, 1.0)}]
    assert read_events(str(tmp_path / "missing")) == []
