"""Helpers shared by the analysis verbs: which columns are metadata, which are features,
which rows are controls. Profile tables follow the cytomining convention: ``Metadata_*``
columns (plate, well, field, compound, ...) and float feature columns, one row per
field, well or treatment."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

METADATA_PREFIX = "Metadata_"
CONTROL_COLUMN = "Metadata_Control"
PLATE_COLUMN = "Metadata_Plate"


def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    """The ``Metadata_*`` columns of ``profiles``, in table order."""
    return [c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(profiles: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The feature columns: ``features`` when given (checked), else every numeric column
    that is not ``Metadata_*``."""
    if features is not None:
        require_columns(profiles, features, "feature")
        return list(features)
    return [c for c in profiles.columns
            if not str(c).startswith(METADATA_PREFIX) and pd.api.types.is_numeric_dtype(profiles[c])
            and not pd.api.types.is_bool_dtype(profiles[c])]


def require_columns(profiles: pd.DataFrame, columns: Sequence[str], what: str = "annotation") -> None:
    """Raise ``ValueError`` naming every column of ``columns`` missing from ``profiles``."""
    missing = [c for c in columns if c not in profiles.columns]
    if missing:
        raise ValueError(f"missing {what} column(s) {missing}; the table has {list(profiles.columns)}")


# how a missing annotation reaches a table: NaN from pandas, "" from the results store
# (string arrays have no NaN), "nan"/"None" from a column that went through astype(str)
MISSING_WORDS = frozenset({"", "nan", "none", "<na>", "null"})


def missing_values(values: pd.Series) -> np.ndarray:
    """(n,) bool: the entries of an annotation column that say nothing (NaN, None, or a
    blank, ``"nan"`` or ``"None"`` string)."""
    na = values.isna().to_numpy()
    words = values.astype(str).str.strip().str.lower().isin(MISSING_WORDS).to_numpy()
    return na | words


def _control_kind(value) -> str | None:
    # Screens annotate controls either as a bool (True = the DMSO / negative control), a 1/0
    # (1.0/0.0 once a CSV column with blanks went through pandas), or a word ("negative",
    # "positive", or JUMP-CP's Metadata_control_type "negcon"/"poscon"); anything else (False,
    # 0, "", "treated", "trt", NaN) is not a control.
    if isinstance(value, (bool, np.bool_)):
        return "negative" if value else None
    if isinstance(value, (int, np.integer, float, np.floating)):
        return "negative" if value == 1 else None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("negative", "neg", "negcon", "true", "1"):
            return "negative"
        if word in ("positive", "pos", "poscon"):
            return "positive"
    return None


def control_mask(profiles: pd.DataFrame, controls=None, *, kind: str = "negative",
                 column: str = CONTROL_COLUMN, required: bool = True) -> np.ndarray:
    """Boolean mask (n_rows,) of the control rows of ``profiles``.

    ``controls`` selects them:

    - ``None``: from ``column`` (``Metadata_Control``): a bool (True = negative control) or
      ``"negative"``/``"positive"``; ``kind`` is ``"negative"``, ``"positive"`` or ``"any"``.
      A missing column is a ``ValueError`` when ``required``, else no row is a control.
    - ``"all"``: every row (pycytominer's ``samples="all"``).
    - another string: a pandas expression, e.g. ``"Metadata_Compound == 'DMSO'"``.
    - an array of bools, one per row.
    """
    n = len(profiles)
    if controls is None:
        if column not in profiles.columns:
            if required:
                raise ValueError(f"no control column {column!r} to find the {kind} controls; "
                                 f"pass controls= (a mask or a query) or add the column")
            return np.zeros(n, dtype=bool)
        kinds = [_control_kind(v) for v in profiles[column].to_numpy()]
        if kind == "any":
            return np.array([k is not None for k in kinds], dtype=bool)
        if kind not in ("negative", "positive"):
            raise ValueError(f"kind must be 'negative', 'positive' or 'any', got {kind!r}")
        return np.array([k == kind for k in kinds], dtype=bool)
    if isinstance(controls, str):
        if controls == "all":
            return np.ones(n, dtype=bool)
        return np.asarray(profiles.eval(controls), dtype=bool).reshape(n)
    mask = np.asarray(controls, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"controls mask has shape {mask.shape}, expected ({n},) (one per row)")
    return mask


def order_columns(profiles: pd.DataFrame) -> pd.DataFrame:
    """``Metadata_*`` columns first, then the rest, each group in its original order."""
    meta = metadata_columns(profiles)
    return profiles[meta + [c for c in profiles.columns if c not in meta]]
