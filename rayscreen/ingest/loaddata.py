"""The CellProfiler LoadData CSV convention.

One row per site (field): ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` and,
for each channel, ``FileName_<Channel>`` and ``PathName_<Channel>``. Other ``Metadata_*``
columns that are constant within a well become the well's annotations.

The CSV and the images may be local paths or URIs (``file://``, ``s3://``, any fsspec
protocol); remote ones are read through fsspec with the ingest's ``storage_options``.
A relative ``PathName`` is resolved against the CSV's folder, local or remote.
"""

from __future__ import annotations

import io
import os
import posixpath
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import imageio.v3 as iio
import numpy as np
import pandas as pd
import tifffile

from ..store import RayscreenError, well_name
from ..store.annotations import PLATE_COL, WELL_COL, parse_input_table, read_input_text, separator_hint
from ..store.uri import filesystem, is_remote, local_path

SITE_COL = "Metadata_Site"
REQUIRED = (PLATE_COL, WELL_COL, SITE_COL)


def _identifier_columns(columns: list[str]) -> list[str]:
    """Columns read as text: identifiers and file names, never numbers (plate ``001`` stays
    ``001``, a file ``0001`` keeps its zeros). Other ``Metadata_*`` keep pandas' types."""
    return [c for c in columns if c in REQUIRED or c.startswith(("FileName_", "PathName_"))]


def _site_order(values: pd.Series) -> pd.Series:
    """Sort key for sites: numerically when every site is a number (site 10 after site 2),
    as text otherwise."""
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers if numbers.notna().all() else values


@dataclass(frozen=True)
class LoadData:
    """A validated LoadData table: ``table`` has one row per (plate, well, site)."""

    source: str
    table: pd.DataFrame
    channels: tuple[str, ...]
    # how to reach remote images (and the CSV); kept out of repr: it may hold credentials
    storage_options: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def plates(self) -> list[str]:
        return sorted(self.table[PLATE_COL].astype(str).unique())

    def by_plate(self) -> dict[str, "LoadData"]:
        """``{plate: LoadData of that plate's rows}``, split once: each ingest task gets its
        plate's rows only (the whole table of a large screen, 3.5M rows, was ~3 GB to
        deserialise in every task) and the driver filters the table once, not once per plate."""
        return {str(plate): dataclasses.replace(self, table=rows)
                for plate, rows in self.table.groupby(PLATE_COL, sort=True)}

    def image_path(self, row: pd.Series, channel: str) -> str:
        """The image of ``channel`` for one site: a local path or a URI (``s3://...``)."""
        folder = row[f"PathName_{channel}"]
        folder = "" if pd.isna(folder) else str(folder)  # an empty PathName: the CSV's own folder
        name = str(row[f"FileName_{channel}"])
        if "://" in folder:
            return f"{folder.rstrip('/')}/{name}"
        if os.path.isabs(folder):
            return os.path.join(folder, name)
        # relative folders are relative to the CSV, as CellProfiler resolves them
        if is_remote(self.source):
            protocol, _, csv_path = self.source.partition("://")
            # posixpath, not os.path: a URI's separators are "/" everywhere; normpath folds "../"
            path = posixpath.normpath(posixpath.join(posixpath.dirname(csv_path), folder, name))
            return f"{protocol}://{path}"
        return os.path.join(os.path.dirname(os.path.abspath(local_path(self.source))), folder, name)

    def site_files(self, row: pd.Series) -> dict[str, str]:
        """``{channel: image path or URI}`` of one site, in channel order."""
        return {c: self.image_path(row, c) for c in self.channels}

    def annotations(self, plate: str) -> pd.DataFrame:
        """Per-well annotations of one plate: the ``Metadata_*`` columns constant within each well."""
        t = self.table[self.table[PLATE_COL].astype(str) == plate]
        meta = [c for c in t.columns if c.startswith("Metadata_") and c not in REQUIRED]
        constant = [c for c in meta if (t.groupby(WELL_COL)[c].nunique(dropna=False) <= 1).all()]
        return t.groupby(WELL_COL, sort=True)[constant].first().reset_index()


def _check_plate_names(plates: pd.Series, path: str) -> None:
    """A plate's name becomes its store's file name (``<out>/<plate>.zarr``): it must be one
    path segment, and no two plates may differ only in case (one store on macOS/Windows disks)."""
    names = sorted(set(plates))
    folded: dict[str, str] = {}
    for name in names:
        if "/" in name or "\\" in name or name.strip() in ("", ".", ".."):
            row = int(np.flatnonzero((plates == name).to_numpy())[0])
            raise RayscreenError(f"LoadData CSV {path} row {row + 2}: Metadata_Plate {name!r} cannot name a plate "
                                 "store; expected a name without '/' or '\\', not '.' or '..'")
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise RayscreenError(f"LoadData CSV {path}: plates {other!r} and {name!r} differ only in case; their "
                                 "stores would be one folder on a case-insensitive disk. Rename one")


def read_loaddata(path: str, storage_options: dict[str, Any] | None = None) -> LoadData:
    """Read and validate a LoadData CSV; raises naming the file and the problem."""
    fs, fpath = filesystem(path, storage_options)
    if not fs.exists(fpath):
        raise RayscreenError(f"LoadData CSV {path} does not exist")
    source = f"LoadData CSV {path}"
    text = read_input_text(fs, fpath, source)  # .csv.gz as well
    # the header first: the identifier columns (FileName_<Channel>...) are named by the file
    columns = list(parse_input_table(text, source, nrows=0).columns)
    table = parse_input_table(text, source, dtype={c: str for c in _identifier_columns(columns)})
    missing = [c for c in REQUIRED if c not in table.columns]
    channels = tuple(c[len("FileName_"):] for c in table.columns if c.startswith("FileName_"))
    if missing:
        raise RayscreenError(f"LoadData CSV {path}: missing required column(s) {missing}; "
                             f"expected {list(REQUIRED)} plus FileName_<Channel>/PathName_<Channel>"
                             f"{separator_hint(list(table.columns))}")
    if not channels:
        raise RayscreenError(f"LoadData CSV {path}: no FileName_<Channel> column; found {list(table.columns)}")
    no_path = [c for c in channels if f"PathName_{c}" not in table.columns]
    if no_path:
        raise RayscreenError(f"LoadData CSV {path}: FileName_{no_path[0]} has no matching PathName_{no_path[0]} column")
    if table.empty:
        raise RayscreenError(f"LoadData CSV {path} has no rows")
    for col in [*REQUIRED, *(f"FileName_{c}" for c in channels)]:
        blank = table[col].isna()
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            raise RayscreenError(f"LoadData CSV {path} row {i + 2}: {col} is empty; expected a value in every row "
                                 f"(plate {table[PLATE_COL].iloc[i]!r}, well {table[WELL_COL].iloc[i]!r}, "
                                 f"site {table[SITE_COL].iloc[i]!r})")
    table = table.copy()
    table[PLATE_COL] = table[PLATE_COL].astype(str)
    _check_plate_names(table[PLATE_COL], path)
    table[WELL_COL] = [well_name(w, context=f"LoadData CSV {path} row {i + 2}") for i, w in enumerate(table[WELL_COL])]
    # numeric sites compare as numbers: "1" and "01" name one site (one field), not two
    keys = pd.DataFrame({"plate": table[PLATE_COL], "well": table[WELL_COL], "site": _site_order(table[SITE_COL])})
    dup = keys.duplicated(keep=False)
    if dup.any():
        p, w, site = keys[dup].iloc[0].tolist()
        written = table.loc[dup & (keys["plate"] == p) & (keys["well"] == w) & (keys["site"] == site), SITE_COL]
        spellings = "" if written.nunique() == 1 else f" (written {', '.join(map(repr, written.unique()))})"
        raise RayscreenError(f"LoadData CSV {path}: duplicate rows for plate {p!r} well {w} site "
                             f"{written.iloc[0]}{spellings}: each site must appear once, with one file per channel")
    table = table.sort_values([PLATE_COL, WELL_COL, SITE_COL], kind="stable",
                              key=lambda c: _site_order(c) if c.name == SITE_COL else c).reset_index(drop=True)
    # a local CSV's absolute path: relative PathNames must resolve the same in a Ray worker,
    # whose working directory may differ from the driver's
    source = path if is_remote(path) else os.path.abspath(local_path(path))
    return LoadData(source, table, channels, storage_options)


def read_image(path: str, where: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """One greyscale plane (Y, X) from a TIFF or PNG at a local path or a URI; raises naming
    ``where`` (plate, well, site, channel) and the file."""
    tiff = path.lower().endswith((".tif", ".tiff"))
    try:
        if is_remote(path):
            # one GET for the whole file: tifffile on a remote file object would issue a
            # ranged request per tag and strip
            fs, fpath = filesystem(path, storage_options)
            source: Any = io.BytesIO(fs.cat_file(fpath))
        else:
            source = local_path(path)  # file:// is a local file: no fsspec round trip
        if tiff:
            image = tifffile.imread(source)
        elif isinstance(source, io.BytesIO):
            # bytes carry no file name: tell imageio the format by the URI's extension
            image = iio.imread(source, extension=os.path.splitext(path)[1].lower() or None)
        else:
            image = iio.imread(source)
    except FileNotFoundError:
        raise RayscreenError(f"{where}: image file {path} is missing") from None
    except Exception as e:
        raise RayscreenError(f"{where}: cannot read image file {path} ({type(e).__name__}: {e})") from None
    image = np.squeeze(image)
    if image.ndim != 2:
        raise RayscreenError(f"{where}: image file {path} has shape {image.shape}; expected one 2-D greyscale plane")
    return image
