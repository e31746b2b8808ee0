"""Profile tables in the cytomining convention: ``Metadata_*`` columns first, then float
features; read and written as CSV or Parquet so pycytominer (and CellProfiler users'
tools) read them as they are."""

from __future__ import annotations

import os

import pandas as pd
import xarray as xr

from ..store.annotations import read_csv_table
from ._table import METADATA_PREFIX, order_columns


def _metadata_name(name: str) -> str:
    # Coordinates of the results store are short ("plate", "well"); tables prefix them.
    name = str(name)
    return name if name.startswith(METADATA_PREFIX) else METADATA_PREFIX + name[:1].upper() + name[1:]


def to_table(profiles: xr.DataArray, feature_dim: str = "feature") -> pd.DataFrame:
    """A (row, feature) DataArray of profiles → a profile table.

    Every coordinate along the row dimension (and the row index itself) becomes a
    ``Metadata_*`` column (``well`` → ``Metadata_Well``; names already prefixed are kept),
    every feature a column named by the ``feature_dim`` coordinate. Loads the data.
    """
    if profiles.ndim != 2 or feature_dim not in profiles.dims:
        raise ValueError(f"expected a 2-D DataArray with a {feature_dim!r} dimension, got dims {profiles.dims}")
    row_dim = next(d for d in profiles.dims if d != feature_dim)
    profiles = profiles.transpose(row_dim, feature_dim)
    names = ([str(f) for f in profiles[feature_dim].to_numpy()] if feature_dim in profiles.coords
             else [f"feature_{i}" for i in range(profiles.sizes[feature_dim])])
    table = pd.DataFrame(profiles.to_numpy(), columns=names)
    meta = {}
    for name, coord in profiles.coords.items():
        if coord.dims == (row_dim,):
            meta[_metadata_name(name)] = coord.to_numpy()
    return pd.concat([pd.DataFrame(meta), table], axis=1)


def write_table(profiles: pd.DataFrame, path: str) -> str:
    """Write a profile table (``Metadata_*`` columns first) as ``.csv``, ``.csv.gz`` or
    ``.parquet`` (by extension). Returns ``path``."""
    profiles = order_columns(profiles)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".parquet"):
        profiles.to_parquet(path, index=False)
    elif path.endswith((".csv", ".csv.gz")):
        profiles.to_csv(path, index=False)
    else:
        raise ValueError(f"unknown profile table format for {path!r}; use .csv, .csv.gz or .parquet")
    return path


def read_table(path: str) -> pd.DataFrame:
    """Read a profile table written by :func:`write_table` (or by pycytominer)."""
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return read_csv_table(path)
