"""Progress of long stages: plain lines in logs, a tqdm bar on a terminal, nothing when quiet."""

import io

import pytest

from rayscreen.progress import Progress, iter_progress
from rayscreen.train.loop import epoch_line


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _log_of(total: int, desc: str, every: float) -> str:
    """What a Progress writes to a log (not a terminal) while counting ``total`` wells."""
    out = io.StringIO()
    with Progress(total, desc, "well", every=every, file=out) as bar:
        for _ in range(total):
            bar.update()
    return out.getvalue()


def test_a_log_gets_plain_lines_and_one_at_the_end():
    text = _log_of(5, "infer", every=0)
    lines = text.splitlines()
    assert len(lines) == 5 and "\r" not in text
    assert lines[0].startswith("infer: 1/5 wells (20%, ") and lines[-1].startswith("infer: 5/5 wells (100%, ")


def test_lines_are_throttled_to_one_per_interval_plus_the_last():
    lines = _log_of(1000, "profile", every=3600).splitlines()
    assert len(lines) == 1 and lines[0].startswith("profile: 1000/1000 wells (100%, ")


def test_a_stage_stopped_early_says_where_it_stopped():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(10, "ingest", "well group", every=3600, file=out) as bar:
            bar.update(3)
            raise RuntimeError("a well failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ingest: 3/10 well groups (30%, ")


@pytest.mark.parametrize("total, enabled", [(5, False), (0, True)])
def test_quiet_or_empty_shows_nothing(total, enabled):
    out = Terminal()
    with Progress(total, "infer", "well", enabled=enabled, every=0, file=out) as bar:
        bar.update(5)
    assert out.getvalue() == ""
    assert bar.n == 5  # still counted


def test_a_terminal_gets_a_tqdm_bar():
    out = Terminal()
    with Progress(4, "illumination", "task", file=out) as bar:
        bar.update(4)
    text = out.getvalue()
    assert "\r" in text and "4/4" in text and "illumination" in text


def test_iter_progress_yields_every_item(capsys):
    assert list(iter_progress(range(3), 3, "ingest", "well group")) == [0, 1, 2]
    assert capsys.readouterr().err.startswith("ingest: 3/3 well groups (100%, ")
    assert list(iter_progress(range(3), 3, "ingest", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_epoch_line_states_losses_metrics_and_throughput():
    metrics = {"train_loss": 0.51234, "val_loss": 0.6, "val_accuracy": 0.75, "val_balanced_accuracy": 0.7,
               "val_roc_auc": 0.8, "seconds": 2.0}
    line = epoch_line(3, 10, metrics, 100)
    assert line.startswith("[rayscreen train] epoch 3/10  train_loss 0.5123  val_loss 0.6000  val_acc 0.750")
    assert line.endswith("(2.0 s, 50.0 fields/s)") and "\n" not in line
    distilled = epoch_line(3, 10, {**metrics, "train_distill_loss": 1.0, "train_teacher_entropy": 2.0,
                                   "train_teacher_batch_entropy": 3.0}, 100, collapsed="flat", distill=True)
    assert "distill_loss 1.0000  teacher_entropy 2.00/3.00" in distilled
    assert "TEACHER COLLAPSED (flat: this epoch is never kept)" in distilled
