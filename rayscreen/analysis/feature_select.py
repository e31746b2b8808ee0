"""Select features: drop all-NaN, low-variance and redundant (highly correlated) ones.

Each operation is a function returning the feature names to drop; :func:`feature_select`
chains them in a fixed order (NaN first, so that variance and correlation see real
numbers; variance before correlation, since a constant feature has no correlation).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._table import control_mask, feature_columns

OPERATIONS = ("drop_na", "variance", "correlation")


def all_nan_features(profiles: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """Features with no finite value in any row."""
    cols = feature_columns(profiles, features)
    values = profiles[cols].to_numpy(dtype=float)
    return [c for c, ok in zip(cols, np.isfinite(values).any(axis=0)) if not ok]


def low_variance_features(profiles: pd.DataFrame, features: Sequence[str] | None = None,
                          min_variance: float = 0.0) -> list[str]:
    """Features that are constant (max == min over finite values) or whose variance
    (ddof=0, NaN skipped) is at most ``min_variance``. Comparing max and min rather than
    the variance with 0 catches constant features whose float variance is ~1e-34."""
    cols = feature_columns(profiles, features)
    values = profiles[cols].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        constant = np.nanmax(values, axis=0) == np.nanmin(values, axis=0)
        low = np.nanvar(values, axis=0) <= min_variance
    return [c for c, drop in zip(cols, constant | low) if drop]


def correlated_features(profiles: pd.DataFrame, features: Sequence[str] | None = None,
                        threshold: float = 0.9, method: str = "pearson") -> list[str]:
    """One feature of each pair whose absolute correlation exceeds ``threshold``.

    Greedy in column order: a feature is kept unless it correlates above the threshold
    with a feature already kept, so of a correlated pair the later column is dropped and
    the result is deterministic. (pycytominer drops the one with the larger total
    correlation instead; both leave no pair above the threshold.) Correlations use the
    rows where both features are present, and only pairs present together in at least 3
    rows and half the rows: two points always lie on a line, so a feature measured in two
    wells would otherwise correlate +-1 with every feature after it and drop them all.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    cols = feature_columns(profiles, features)
    # NaN correlations (a constant or empty feature) count as uncorrelated.
    min_periods = max(3, (len(profiles) + 1) // 2)
    corr = np.nan_to_num(profiles[cols].corr(method=method, min_periods=min_periods).abs().to_numpy(), nan=0.0)
    kept: list[int] = []
    dropped = []
    for i, name in enumerate(cols):
        if kept and corr[i, kept].max() > threshold:
            dropped.append(name)
        else:
            kept.append(i)
    return dropped


def check_operations(operations: Sequence[str]) -> None:
    """Raises ValueError naming the operations that are not in :data:`OPERATIONS`."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown operation(s) {unknown}; expected some of {OPERATIONS}")


def feature_select(profiles: pd.DataFrame, operations: Sequence[str] = OPERATIONS, *,
                   features: Sequence[str] | None = None, samples="all",
                   min_variance: float = 0.0, corr_threshold: float = 0.9,
                   corr_method: str = "pearson") -> pd.DataFrame:
    """Drop features from a profile table.

    Parameters
    ----------
    profiles : DataFrame, ``Metadata_*`` columns + feature columns.
    operations : any of ``"drop_na"`` (all-NaN features; always warned about, listing
        them), ``"variance"`` (constant or variance <= ``min_variance``) and
        ``"correlation"`` (one of each pair with ``|r| > corr_threshold``), applied in
        that order.
    samples : rows to decide on: ``"all"``, a pandas query, or a boolean mask (e.g.
        decide on control wells only); the drop applies to every row.

    Returns
    -------
    ``profiles`` without the dropped feature columns (metadata and row order unchanged).
    """
    check_operations(operations)
    cols = feature_columns(profiles, features)
    subset = profiles.loc[control_mask(profiles, samples)]
    drop: list[str] = []
    if "drop_na" in operations:
        nan = all_nan_features(subset, cols)
        if nan:
            warnings.warn(f"dropping {len(nan)} all-NaN feature(s): {nan}", stacklevel=2)
        drop += nan
    if "variance" in operations:
        left = [c for c in cols if c not in drop]
        drop += low_variance_features(subset, left, min_variance)
    if "correlation" in operations:
        left = [c for c in cols if c not in drop]
        drop += correlated_features(subset, left, corr_threshold, corr_method)
    return profiles.drop(columns=drop)
