"""Aggregate profiles: field → well → treatment, by mean or median.

Two inputs, one verb:

- a profile table (pandas, ``Metadata_*`` columns + feature columns, one row per field or
  well) → a table with one row per group; ``Metadata_*`` columns that are constant inside
  every group (``Metadata_MOA`` when grouping by compound) are kept, the others dropped
  (with a warning when a column is constant in some groups and not in others: a typo or
  blank annotation in one well, which would otherwise silently drop the whole column).
- an xarray ``DataArray``/``Dataset`` whose first dimension holds the rows (``field`` or
  ``well``) and carries the grouping keys as coordinates along it. Arrays backed by dask
  stay lazy: only the keys (small) are read, so a screen's profiles need not fit in memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ._table import feature_columns, metadata_columns, order_columns, require_columns

METHODS = ("mean", "median")

WELL = ("Metadata_Plate", "Metadata_Well")
TREATMENT = ("Metadata_Compound", "Metadata_Concentration")


def aggregate(profiles, by: Sequence[str] | str = WELL, method: str = "mean", *,
              features: Sequence[str] | None = None, dim: str | None = None,
              count_column: str | None = None):
    """Aggregate rows of ``profiles`` sharing the values of ``by``.

    Parameters
    ----------
    profiles : pandas.DataFrame, xarray.DataArray or xarray.Dataset
        DataFrame: ``Metadata_*`` columns and feature columns, one row per field or well.
        xarray: dims (``dim``, ``feature``) (``dim`` defaults to the first dimension), with
        every key of ``by`` a coordinate along ``dim``; may be dask-backed.
    by : column or coordinate names
        e.g. ``("Metadata_Plate", "Metadata_Well")`` (field → well) or
        ``("Metadata_Compound", "Metadata_Concentration")`` (well → treatment).
    method : ``"mean"`` or ``"median"``
        NaN values are skipped.
    features : feature columns (DataFrame only); default every non-``Metadata_`` numeric column.
    count_column : if given, a column/coordinate holding the number of rows in each group.

    Returns
    -------
    The same kind of object with one row per group: a DataFrame sorted by ``by``; or an
    xarray object whose ``dim`` is replaced by ``by[0]`` (one key) or ``"group"`` (several
    keys, each a coordinate along ``group``).
    """
    by = [by] if isinstance(by, str) else list(by)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not by:
        raise ValueError("by must name at least one column")
    if isinstance(profiles, pd.DataFrame):
        return _aggregate_frame(profiles, by, method, features, count_column)
    if isinstance(profiles, (xr.DataArray, xr.Dataset)):
        return _aggregate_xarray(profiles, by, method, dim, count_column)
    raise TypeError(f"profiles must be a pandas DataFrame or an xarray object, got {type(profiles).__name__}")


def _aggregate_frame(profiles: pd.DataFrame, by: list[str], method: str,
                     features: Sequence[str] | None, count_column: str | None) -> pd.DataFrame:
    require_columns(profiles, by, "grouping")
    features = [c for c in feature_columns(profiles, features) if c not in by]
    grouped = profiles.groupby(by, sort=True, dropna=False, observed=True)
    out = getattr(grouped[features], method)()
    # Metadata constant within each group describes the group (the MOA of a compound, the
    # plate of a well); metadata varying within a group (the field of a well) has no value.
    others = [c for c in metadata_columns(profiles) if c not in by]
    parts = []
    if count_column:
        parts.append(grouped.size().rename(count_column))
    if others:
        varies = grouped[others].nunique(dropna=False) > 1  # (groups, others)
        constant = [c for c in others if not varies[c].any()]
        _warn_inconsistent(profiles, grouped, varies, by)
        if constant:
            parts.append(grouped[constant].first())
    # one concat, not insert/join column by column: a wide profile table (thousands of
    # features) would otherwise be fragmented into many blocks (pandas PerformanceWarning)
    out = pd.concat(parts + [out], axis=1) if parts else out
    # the group keys as columns by concat too: reset_index() inserts them one by one into a
    # groupby result that pandas holds as one block per feature column
    keys = out.index.to_frame(index=False)
    return order_columns(pd.concat([keys, out.reset_index(drop=True)], axis=1))


# columns that say where a row was imaged; they may differ within a treatment anywhere
POSITION_COLUMNS = frozenset({"Metadata_Plate", "Metadata_Well", "Metadata_Field", "Metadata_Site",
                              "Metadata_Row", "Metadata_Col", "Metadata_Column", "Metadata_Fields"})


def _warn_inconsistent(profiles: pd.DataFrame, grouped, varies: pd.DataFrame, by: list[str]) -> None:
    """Warn about each ``Metadata_*`` column dropped for differing within some groups while
    constant within the other groups of several rows, naming how many groups and one of
    them with its values.

    A column that differs within every group of several rows (the field of a well, the
    well of a treatment) is per-row metadata and goes silently; one that differs in a few
    groups only is an annotation (a MOA) that one well got wrong or blank, and dropping it
    for the whole table fails much later ("lacks Metadata_MOA") far from the cause.
    """
    multi = grouped.size().to_numpy() > 1
    codes = grouped.ngroup().to_numpy()  # the group of each row, in the order of ``varies``
    for c in varies.columns:
        if c in POSITION_COLUMNS:
            # where a sample was imaged, not what it is: a compound on one plate and DMSO on
            # every plate is a sound layout, not an annotation to fix
            continue
        bad = varies[c].to_numpy()
        if not bad.any() or bad[multi].all():
            continue
        first = int(np.flatnonzero(bad)[0])
        key = varies.index[first]
        key = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        values = pd.unique(profiles[c].to_numpy()[codes == first]).tolist()
        warnings.warn(f"aggregate: dropping {c!r}: it differs within {int(bad.sum())} of {len(bad)} group(s) by "
                      f"{by} and is constant within the others; e.g. {key} has {values}. Fix the annotation "
                      f"(or group by {c!r}) to keep it", UserWarning, stacklevel=4)


def _aggregate_xarray(profiles, by: list[str], method: str, dim: str | None, count_column: str | None):
    dim = dim or next(iter(profiles.dims))
    missing = [k for k in by if k not in profiles.coords]
    if missing:
        raise ValueError(f"missing grouping coordinate(s) {missing}; coordinates are {list(profiles.coords)}")
    wrong = [k for k in by if profiles[k].dims != (dim,)]
    if wrong:
        raise ValueError(f"grouping coordinate(s) {wrong} must lie along {dim!r}")
    # One integer code per row for the combination of keys: xarray groups by one coordinate
    # cleanly (several groupers would give a dense plate x well x ... grid). The keys are
    # metadata, small enough to load; the profiles stay lazy.
    keys = pd.MultiIndex.from_arrays([profiles[k].to_numpy() for k in by], names=by)
    codes, uniques = pd.factorize(keys, sort=True, use_na_sentinel=False)
    # Coordinates along dim other than the keys (field names, per-field flags) do not
    # describe a group; drop them rather than let xarray guess.
    extra = [c for c, v in profiles.coords.items() if dim in v.dims and c != dim and c not in by]
    work = profiles.drop_vars(extra + by + ([dim] if dim in profiles.coords else []))
    work = work.assign_coords(_group=(dim, codes))
    if method == "median":
        # dask's nanmedian refuses to reduce over all axes of an array (a 1-D per-field
        # score inside one group); a length-1 helper axis makes every reduction partial.
        out = work.expand_dims("_one", axis=-1).groupby("_group").median().squeeze("_one", drop=True)
    else:
        out = work.groupby("_group").mean()
    out_dim = by[0] if len(by) == 1 else "group"
    out = out.rename({"_group": out_dim})
    if len(by) == 1:
        out = out.assign_coords({out_dim: np.asarray(uniques.get_level_values(0))})  # factorize drops level names
    else:
        out = out.drop_vars(out_dim).assign_coords(
            {k: (out_dim, np.asarray(uniques.get_level_values(i))) for i, k in enumerate(by)})
    if count_column:
        out = out.assign_coords({count_column: (out_dim, np.bincount(codes, minlength=len(uniques)))})
    return out
