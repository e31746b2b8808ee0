"""The CellProfiler LoadData CSV convention.

One row per site (field): ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` and,
for each channel, ``FileName_<Channel>`` and ``PathName_<Channel>``. Other ``Metadata_*``
columns that are constant within a well become the well's annotations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile

from ..store import RayscreenError, well_name
from ..store.annotations import PLATE_COL, WELL_COL
from ..store.uri import filesystem

SITE_COL = "Metadata_Site"
REQUIRED = (PLATE_COL, WELL_COL, SITE_COL)


@dataclass(frozen=True)
class LoadData:
    """A validated LoadData table: ``table`` has one row per (plate, well, site)."""

    source: str
    table: pd.DataFrame
    channels: tuple[str, ...]

    @property
    def plates(self) -> list[str]:
        return sorted(self.table[PLATE_COL].astype(str).unique())

    def image_path(self, row: pd.Series, channel: str) -> str:
        folder = str(row[f"PathName_{channel}"])
        name = str(row[f"FileName_{channel}"])
        if "://" in folder:
            return f"{folder.rstrip('/')}/{name}"
        if not os.path.isabs(folder):
            # relative folders are relative to the CSV, as CellProfiler resolves them
            folder = os.path.join(os.path.dirname(os.path.abspath(self.source)), folder)
        return os.path.join(folder, name)

    def annotations(self, plate: str) -> pd.DataFrame:
        """Per-well annotations of one plate: the ``Metadata_*`` columns constant within each well."""
        t = self.table[self.table[PLATE_COL].astype(str) == plate]
        meta = [c for c in t.columns if c.startswith("Metadata_") and c not in REQUIRED]
        constant = [c for c in meta if (t.groupby(WELL_COL)[c].nunique(dropna=False) <= 1).all()]
        return t.groupby(WELL_COL, sort=True)[constant].first().reset_index()


def read_loaddata(path: str, storage_options: dict[str, Any] | None = None) -> LoadData:
    """Read and validate a LoadData CSV; raises naming the file and the problem."""
    fs, fpath = filesystem(path, storage_options)
    if not fs.exists(fpath):
        raise RayscreenError(f"LoadData CSV {path} does not exist")
    with fs.open(fpath, "rb") as f:
        table = pd.read_csv(f)
    missing = [c for c in REQUIRED if c not in table.columns]
    channels = tuple(c[len("FileName_"):] for c in table.columns if c.startswith("FileName_"))
    if missing:
        raise RayscreenError(f"LoadData CSV {path}: missing required column(s) {missing}; "
                             f"expected {list(REQUIRED)} plus FileName_<Channel>/PathName_<Channel>")
    if not channels:
        raise RayscreenError(f"LoadData CSV {path}: no FileName_<Channel> column; found {list(table.columns)}")
    no_path = [c for c in channels if f"PathName_{c}" not in table.columns]
    if no_path:
        raise RayscreenError(f"LoadData CSV {path}: FileName_{no_path[0]} has no matching PathName_{no_path[0]} column")
    if table.empty:
        raise RayscreenError(f"LoadData CSV {path} has no rows")
    table = table.copy()
    table[PLATE_COL] = table[PLATE_COL].astype(str)
    table[WELL_COL] = [well_name(w, context=f"LoadData CSV {path} row {i + 2}") for i, w in enumerate(table[WELL_COL])]
    dup = table.duplicated([PLATE_COL, WELL_COL, SITE_COL], keep=False)
    if dup.any():
        p, w, site = table.loc[dup, [PLATE_COL, WELL_COL, SITE_COL]].iloc[0].tolist()
        raise RayscreenError(f"LoadData CSV {path}: duplicate rows for plate {p!r} well {w} site {site}: "
                             f"each site must appear once, with one file per channel")
    return LoadData(path, table.sort_values([PLATE_COL, WELL_COL, SITE_COL]).reset_index(drop=True), channels)


def read_image(path: str, where: str) -> np.ndarray:
    """One greyscale plane (Y, X) from a TIFF or PNG; raises naming the file and the field."""
    try:
        if path.lower().endswith((".tif", ".tiff")):
            image = tifffile.imread(path)
        else:
            image = iio.imread(path)
    except FileNotFoundError:
        raise RayscreenError(f"{where}: image file {path} is missing") from None
    except Exception as e:
        raise RayscreenError(f"{where}: cannot read image file {path} ({type(e).__name__}: {e})") from None
    image = np.squeeze(image)
    if image.ndim != 2:
        raise RayscreenError(f"{where}: image file {path} has shape {image.shape}; expected one 2-D greyscale plane")
    return image
