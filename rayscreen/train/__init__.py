"""Weakly supervised training on Ray Train, streamed from plates.

``run_train(config) -> TrainResult`` is the front door (``rayscreen train``,
``jobs/train.py``). Pure pieces: :mod:`.labels` (well labels), :mod:`.splits`
(train/val/test by well, plate or column), :mod:`.step` (torch maths),
:mod:`.checkpoint` (tensors + JSON); :mod:`.plan` makes every check before a worker
starts; :mod:`.loop` is the Ray glue.
"""

from .labels import LABEL_COL, resolve_labels
from .loop import TrainingError, TrainResult, read_events, run_train
from .plan import TrainPlan, plan_run
from .splits import assign_splits

__all__ = ["run_train", "TrainResult", "TrainingError", "plan_run", "TrainPlan", "resolve_labels",
           "assign_splits", "LABEL_COL", "read_events"]
