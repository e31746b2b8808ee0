"""Train/validation/test splits of wells: pure functions on the well table.

No field of a validation or test well ever reaches training: the split is made per
well (``by: well``, stratified by label so that rare positives land in every split),
per plate (``by: plate``) or per value of a grouping column (``by: column``, e.g.
held-out compounds); a field inherits its well's split.

``column_values`` gives an explicit assignment for ``by: plate``/``by: column``:
``{"train": [...], "val": [...], "test": [...]}``. Groups it does not list go to
``train`` unless it has a ``train`` key, in which case they are left out ("none").
E.g. the split hint of the WSCNN simulation: ``by: column, column: Metadata_Split,
column_values: {train: [train], val: [val], test: [test]}``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..config import ConfigError, SplitConfig
from ..store.annotations import label_text
from .labels import UNLABELLED

SPLITS = ("train", "val", "test")
NONE = "none"  # unlabelled wells and groups an explicit assignment leaves out


def _counts(n: int, val: float, test: float) -> tuple[int, int]:
    """Members of a group of ``n`` going to val and test (rounded, at least one each
    where the fraction is positive and enough members remain for training). Validation is
    served first: training cannot run without it (it picks the epoch), while a test split
    is optional, so two members (two plates, a class of two wells) go to train and val."""
    n_val, n_test = int(round(val * n)), int(round(test * n))
    if val > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    while n_val + n_test >= n and (n_val or n_test):  # keep at least one for training
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def check_split_config(split: SplitConfig) -> None:
    """``train.split`` settings that no plate can make right (fractions, a missing column)."""
    if not (0 <= split.val < 1 and 0 <= split.test < 1 and split.val + split.test < 1):
        raise ConfigError(f"train.split: val={split.val}, test={split.test}: expected fractions >= 0 "
                          "with val + test < 1")
    if split.by == "column" and not split.column:
        raise ConfigError("train.split.column: required for by: column (e.g. Metadata_Compound)")
    if split.by == "well" and split.column_values is not None:
        raise ConfigError("train.split.column_values: only for by: plate or by: column")


def assign_splits(wells: pd.DataFrame, labels: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Split name per well (row of ``wells``): "train", "val", "test" or "none".

    ``wells``: one row per well with ``Metadata_Plate``, ``Metadata_Well`` and the
    annotation columns; ``labels``: (N,) class index, -1 for unlabelled (always "none").
    Deterministic in ``split.seed``.
    """
    check_split_config(split)
    labels = np.asarray(labels)
    out = np.full(len(wells), NONE, dtype=object)
    labelled = labels != UNLABELLED
    rng = np.random.default_rng(split.seed)
    if split.by == "well":
        for k in np.unique(labels[labelled]):
            members = np.flatnonzero(labels == k)
            members = members[rng.permutation(len(members))]
            n_val, n_test = _counts(len(members), split.val, split.test)
            out[members[:n_val]] = "val"
            out[members[n_val:n_val + n_test]] = "test"
            out[members[n_val + n_test:]] = "train"
        return out
    if split.by == "plate":
        groups = wells["Metadata_Plate"].astype(str).to_numpy()
    else:
        if split.column not in wells.columns:
            raise ConfigError(f"train.split.column: {split.column!r} is not an annotation column of the plates")
        groups = np.array([label_text(v) for v in wells[split.column]], dtype=object)
        blank = int(sum(g is None for g in groups[labelled]))
        if blank:
            warnings.warn(f"train.split.column {split.column!r}: {blank} labelled well(s) have no value there and "
                          "are left out of training, validation and test", stacklevel=2)
    if split.column_values is not None:
        unknown = sorted(set(split.column_values) - set(SPLITS))
        if unknown:
            raise ConfigError(f"train.split.column_values: keys {unknown}; expected train, val, test")
        target: dict[str, str] = {}
        present = {g for g in groups if g is not None}
        for name, values in split.column_values.items():
            for v in values:
                t = label_text(v)
                if t not in present:
                    raise ConfigError(f"train.split.column_values.{name}: {v!r} matches no well "
                                      f"({'plate' if split.by == 'plate' else split.column})")
                if t in target:
                    raise ConfigError(f"train.split.column_values: {v!r} is in both {target[t]} and {name}")
                target[t] = name
        default = NONE if "train" in split.column_values else "train"
        assigned = np.array([target.get(g, default) if g is not None else NONE for g in groups], dtype=object)
    else:
        unique = sorted({g for g in groups[labelled] if g is not None})
        order = [unique[i] for i in rng.permutation(len(unique))]
        n_val, n_test = _counts(len(order), split.val, split.test)
        target = {g: ("val" if i < n_val else "test" if i < n_val + n_test else "train") for i, g in enumerate(order)}
        assigned = np.array([target.get(g, NONE) for g in groups], dtype=object)
    out[labelled] = assigned[labelled]
    return out


def check_split(table: pd.DataFrame, classes: list[str]) -> None:
    """Refuse splits training cannot use: an empty train or val split, or fewer than two
    classes among the training wells. ``table``: ``split`` and ``label_index`` per well."""
    for name in ("train", "val"):
        if not (table["split"] == name).any():
            raise ConfigError(f"train.split: the {name} split is empty "
                              f"({int((table['split'] != NONE).sum())} labelled wells; check train.split and label.*)")
    train_classes = sorted(set(table.loc[table["split"] == "train", "label_index"]))
    if len(train_classes) < 2:
        names = [classes[i] for i in train_classes]
        raise ConfigError(f"train.split: the training split has {len(train_classes)} class(es) {names}; "
                          "training needs at least two")
