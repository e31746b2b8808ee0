"""events.jsonl of a training run: which events a reader sees, and which non-finite loss
belongs to the current run_train call (the one that stops Ray Train's restarts)."""

import json

from rayscreen.train.loop import EVENTS, nonfinite_message, nonfinite_since_fit, read_events


def _nonfinite(epoch, from_epoch=0):
    return {"event": "nonfinite", "rank": 0, "epoch": epoch, "step": 3, "from_epoch": from_epoch,
            "message": "training loss is nan; lower train.lr or set train.grad_clip"}


def test_only_a_non_finite_loss_after_the_last_fit_counts():
    first = _nonfinite(1)
    assert nonfinite_since_fit([]) is None
    assert nonfinite_since_fit([{"event": "fit"}, {"event": "start", "from_epoch": 0}, first]) == first
    # the user's next run_train call trains again (its own "fit" comes after the old record)
    assert nonfinite_since_fit([{"event": "fit"}, first, {"event": "fit"}, {"event": "start", "from_epoch": 0}]) is None
    later = _nonfinite(4, from_epoch=3)
    assert nonfinite_since_fit([{"event": "fit"}, first, {"event": "fit"}, later, _nonfinite(5, 3)]) == later
    assert "epoch 4, step 3 (rank 0): training loss is nan" in nonfinite_message(later)


def test_read_events_keeps_the_starts_by_default(tmp_path):
    lines = [{"event": "fit"}, {"event": "start", "from_epoch": 0}, _nonfinite(2), {"event": "start", "from_epoch": 1}]
    (tmp_path / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert [e["from_epoch"] for e in read_events(str(tmp_path))] == [0, 1]
    assert [e.get("event") for e in read_events(str(tmp_path), event=None)] == ["fit", "start", "nonfinite", "start"]
    assert read_events(str(tmp_path), event="nonfinite") == [_nonfinite(2)]
    assert read_events(str(tmp_path / "missing")) == []
