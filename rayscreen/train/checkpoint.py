"""Training checkpoints as tensors + JSON: nothing is ever unpickled on load.

A checkpoint directory (one per epoch, handed to ``ray.train.Checkpoint``) holds::

    model.pt       model state_dict (tensors only)
    optimizer.pt   optimiser state_dict (tensors, numbers, lists)
    scheduler.pt   scheduler state_dict (numbers), absent without a schedule
    extra.pt       further named state dicts of tensors (WS-DINO: its student, teacher and centre)
    state.json     epoch, best epoch/value, metric history, resolved config, classes,
                   channels, normalisation statistics, class map of the split

All ``.pt`` files are read with ``torch.load(weights_only=True)``. No random state is
stored: every random draw of an epoch (crops, augmentation, mixup, dropout, batch order)
is seeded by (train.seed, rank, epoch), so a resumed epoch draws what it drew before.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL, OPTIMIZER, SCHEDULER, EXTRA, STATE = "model.pt", "optimizer.pt", "scheduler.pt", "extra.pt", "state.json"


@dataclass
class TrainState:
    """Everything a resumed run and inference need besides the tensors."""

    epoch: int = 0  # epochs completed
    best_epoch: int | None = None
    best_value: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    meta: dict[str, Any] = field(default_factory=dict)  # config, classes, channels, normalization, model

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "best_epoch": self.best_epoch, "best_value": self.best_value,
                "history": self.history, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(epoch=int(d["epoch"]), best_epoch=d.get("best_epoch"), best_value=d.get("best_value"),
                   history=list(d.get("history", [])), meta=dict(d.get("meta", {})))


def _json_safe(v: Any) -> Any:
    # NaN metrics (e.g. ROC-AUC with one class) as null: strict JSON
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def save_checkpoint(directory: str, state: TrainState, model: dict[str, torch.Tensor],
                    optimizer: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
    """Write a checkpoint into an existing local ``directory``; returns it."""
    torch.save({k: v.detach().cpu() for k, v in model.items()}, os.path.join(directory, MODEL))
    if optimizer is not None:
        torch.save(optimizer, os.path.join(directory, OPTIMIZER))
    if scheduler is not None:
        torch.save(scheduler, os.path.join(directory, SCHEDULER))
    if extra:
        torch.save({name: {k: v.detach().cpu() for k, v in sd.items()} for name, sd in extra.items()},
                   os.path.join(directory, EXTRA))
    with open(os.path.join(directory, STATE), "w") as f:
        json.dump(_json_safe(state.to_dict()), f, indent=1, default=str)
    return directory


def load_checkpoint(directory: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``{"state": TrainState, "model": ..., "optimizer": ... | None, "scheduler": ... | None,
    "extra": ... | None}`` from a checkpoint directory; tensors via ``weights_only=True``."""
    def load(name):
        path = os.path.join(directory, name)
        return torch.load(path, map_location=map_location, weights_only=True) if os.path.exists(path) else None

    with open(os.path.join(directory, STATE)) as f:
        state = TrainState.from_dict(json.load(f))
    return {"state": state, "model": load(MODEL), "optimizer": load(OPTIMIZER), "scheduler": load(SCHEDULER),
            "extra": load(EXTRA)}
