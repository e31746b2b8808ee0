"""Well labels from the annotations: pure functions on the annotations DataFrame.

A field inherits its well's label, so labels are resolved once per well on the driver
and travel with the stream as a column (:data:`LABEL_COL`).

- binary: ``label.column`` with ``label.positive`` (class 1) and optionally
  ``label.negative`` (class 0; default: every other non-missing value),
- multiclass: ``label.classes`` (these values, in this order) or, when neither
  ``positive`` nor ``classes`` is given, every value of the column (sorted).

Values are matched by their text (``1`` in the YAML matches ``1`` or ``"1"`` in the
annotations), because annotations round-trip through JSON and CSV platemaps.
Wells whose value is in no class get label -1 and are left out of training.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..config import ConfigError, LabelConfig
from ..store.annotations import label_text

LABEL_COL = "Metadata_TrainLabel"  # int class index per well, added to the stream's rows
UNLABELLED = -1


def resolve_labels(annotations: pd.DataFrame, label: LabelConfig) -> tuple[np.ndarray, list[str]]:
    """Class index per well (row of ``annotations``) and the class names.

    ``annotations``: one row per well (``Metadata_Plate``, ``Metadata_Well``, ...).
    Returns ``(labels, classes)``: ``labels`` int64 (N,), -1 where the well's value is in
    no class; ``classes`` the K class names (str). Raises :class:`ConfigError` naming
    ``label.*`` when the column is missing, a configured value matches no well, a value is
    in two classes, or fewer than two classes result.
    """
    if not label.column:
        raise ConfigError("label.column: required for training (the annotation column holding each well's label)")
    if label.column not in annotations.columns:
        cols = [c for c in annotations.columns if c not in ("Metadata_Plate", "Metadata_Well")]
        raise ConfigError(f"label.column: {label.column!r} is not an annotation column of the plates; "
                          f"they have {cols}")
    if label.positive is not None and label.classes is not None:
        raise ConfigError("label: give either positive/negative (binary) or classes (multiclass), not both")
    if label.negative is not None and label.positive is None:
        raise ConfigError("label.negative: needs label.positive (binary labels)")
    values = [label_text(v) for v in annotations[label.column]]
    present = {v for v in values if v is not None}

    def check(key: str, wanted: list[Any]) -> list[str]:
        texts = [label_text(v) for v in wanted]
        for v, t in zip(wanted, texts):
            if t not in present:
                raise ConfigError(f"{key}: value {v!r} matches no well in column {label.column!r} "
                                  f"(values: {sorted(present)[:20]})")
        return texts

    if label.positive is not None:
        pos = check("label.positive", label.positive)
        if label.negative is not None:
            neg = check("label.negative", label.negative)
            both = sorted(set(pos) & set(neg))
            if both:
                raise ConfigError(f"label.positive and label.negative both list {both}")
        else:
            neg = sorted(present - set(pos))
        if not neg:
            raise ConfigError(f"label.positive: every well of column {label.column!r} is positive; "
                              "no negative class")
        index = {**{v: 0 for v in neg}, **{v: 1 for v in pos}}
        classes = [neg[0] if len(neg) == 1 else "negative", pos[0] if len(pos) == 1 else "positive"]
    else:
        if label.classes is not None:
            texts = check("label.classes", label.classes)
            if len(set(texts)) != len(texts):
                raise ConfigError(f"label.classes: {label.classes} lists a value twice")
            classes = texts
        else:
            classes = sorted(present)
        index = {v: i for i, v in enumerate(classes)}
    if len(classes) < 2:
        raise ConfigError(f"label: column {label.column!r} gives {len(classes)} class(es) {classes}; "
                          "training needs at least two")
    labels = np.array([index.get(v, UNLABELLED) if v is not None else UNLABELLED for v in values], dtype=np.int64)
    return labels, classes
