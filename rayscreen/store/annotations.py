"""Platemaps: per-well annotations (``Metadata_Plate``, ``Metadata_Well``, other ``Metadata_*``).

Annotations are stored inside the plate (namespaced ``rayscreen`` attributes) so that a
plate is self-contained; an external platemap given later overrides them column by column.
"""

from __future__ import annotations

import functools
import io
import json
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .errors import RayscreenError
from .uri import filesystem
from .wells import well_name

PLATE_COL = "Metadata_Plate"
WELL_COL = "Metadata_Well"
# Identifiers, not quantities: read as text so that pandas' type guessing cannot turn
# plate "001" into the number 1 (which then names another plate, or matches none).
ID_COLS = (PLATE_COL, WELL_COL)
# the identifier columns of rayscreen's own tables (split.csv, profile tables, qc.csv, hits)
TABLE_ID_COLS = (*ID_COLS, "Metadata_Field", "Metadata_Site", "Metadata_Batch", "Metadata_Compound", "Metadata_MOA")


def read_csv_table(source: Any, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` of a table rayscreen wrote, with its identifier columns (plate, well,
    field, batch, compound, MOA) as text: what was written as plate ``001`` reads back as
    ``"001"``, not the number 1, and still matches the plate's stores. Quantities
    (concentration, features) keep pandas' types."""
    return pd.read_csv(source, dtype={c: str for c in TABLE_ID_COLS}, **kwargs)


def label_text(v: Any) -> str | None:
    """A value as text, as training names classes and identifiers are matched: 1.0 -> "1"
    (a whole float: an integer column that held a missing value), "a" -> "a", missing
    (None, NaN, pd.NA) -> None."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def as_identifier(values: pd.Series) -> pd.Series:
    """``values`` as text, missing values kept missing (not the string ``"nan"``).

    For tables whose reader already guessed a type (parquet, a DataFrame given in code):
    integers become their decimal text, and a float column holding whole numbers (an
    integer column with a missing value) loses the ``.0`` it would otherwise gain.
    """

    return values.map(lambda v: pd.NA if (text := label_text(v)) is None else text).astype(object)


COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")


def read_input_file(fs, path: str) -> bytes:
    """The bytes of a user's table, decompressed by its name (``.csv.gz`` and the like, as
    cytomining tools write them): through a file object pandas cannot tell by itself."""
    with fs.open(path, "rb", compression="infer") as f:
        return f.read()


def read_input_text(fs, path: str, source: str) -> str:
    """A user's text table (CSV, TSV; compressed by its name) as text. UTF-8, with or without
    the byte-order mark Excel's "CSV UTF-8" writes; anything else (a spreadsheet saved in
    Windows-1252, a binary file) raises naming ``source`` and the first byte that is not
    UTF-8, rather than guessing an encoding: a guessed wrong one turns "µM" into another
    compound name without a word."""
    data = read_input_file(fs, path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RayscreenError(f"{source}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} on line {line}); "
                             "save it as UTF-8 (in Excel: 'CSV UTF-8 (Comma delimited)')") from None


def parse_input_table(text: str, source: str, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` of a user's table (``read_input_text``); a file pandas cannot parse
    raises naming ``source``."""
    try:
        return pd.read_csv(io.StringIO(text), **kwargs)
    except pd.errors.EmptyDataError:
        raise RayscreenError(f"{source}: the file is empty (expected a header row of column names)") from None
    except pd.errors.ParserError as e:
        sep = kwargs.get("sep", ",")
        raise RayscreenError(f"{source}: cannot be read as a {'tab' if sep == chr(9) else repr(sep)}-separated "
                             f"table: {e}") from None


def table_suffix(path: str) -> str:
    """``.csv`` for ``x.csv.gz``: the table's own suffix, beneath any compression."""
    for ext in COMPRESSED:
        if path.endswith(ext):
            path = path[:-len(ext)]
    return "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""


def read_platemap(uri: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Read a CSV, TSV or parquet platemap; well names normalised to ``A01``.

    Returns one row per (plate, well) with ``Metadata_Well`` (and ``Metadata_Plate``
    when the file has it) first. Raises naming the file when a column is missing or a
    well name cannot be parsed.
    """
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise RayscreenError(f"platemap {uri} does not exist")
    suffix = table_suffix(path)
    if suffix == ".parquet":
        with fs.open(path, "rb") as f:
            df = pd.read_parquet(f)  # typed by its writer; normalise_platemap casts the identifiers
    else:
        df = parse_input_table(read_input_text(fs, path, f"platemap {uri}"), f"platemap {uri}",
                               sep="\t" if suffix in (".tsv", ".txt") else ",",
                               dtype={c: str for c in ID_COLS})  # keys the file lacks are ignored
    return normalise_platemap(df, source=f"platemap {uri}")


def separator_hint(columns: Sequence[Any]) -> str:
    """A hint for a table read as one column whose name holds another separator (a CSV saved
    with ';', as spreadsheets in many locales do, or a TSV named .csv); "" otherwise."""
    if len(columns) != 1:
        return ""
    for sep, name in ((";", "semicolons"), ("\t", "tabs"), (",", "commas")):
        if sep in str(columns[0]):
            return (f"; the header was read as one column: its fields look separated by {name}. rayscreen reads "
                    "comma-separated .csv and tab-separated .tsv/.txt files: save it as such")
    return ""


def normalise_platemap(df: pd.DataFrame, source: str = "platemap") -> pd.DataFrame:
    if WELL_COL not in df.columns:
        raise RayscreenError(f"{source}: expected a {WELL_COL!r} column, found columns {list(df.columns)}"
                             f"{separator_hint(list(df.columns))}")
    df = df.copy()
    if PLATE_COL in df.columns:
        # plate names are text wherever the table came from (parquet ints, a DataFrame in code)
        df[PLATE_COL] = as_identifier(df[PLATE_COL])
    # each row's number as a spreadsheet shows it (the header is row 1) for the messages: a
    # blank well is a row to find, not "unknown well name nan"
    rows = [i + 2 for i in range(len(df))]
    blank = [r for r, w in zip(rows, df[WELL_COL]) if pd.isna(w) or not str(w).strip()]
    if blank:
        raise RayscreenError(f"{source}: {WELL_COL} is empty in row(s) {blank[:10]} (the header is row 1); "
                             "expected a well name such as A01 in every row")
    df[WELL_COL] = [well_name(w, context=f"{source} row {r}") for r, w in zip(rows, df[WELL_COL])]
    keys = [c for c in (PLATE_COL, WELL_COL) if c in df.columns]
    dup = df.duplicated(keys, keep=False)
    if dup.any():
        named = ["/".join(map(str, k)) for k in df.loc[dup, keys].drop_duplicates().itertuples(index=False)]
        raise RayscreenError(f"{source}: more than one row for {', '.join(named[:5])}"
                             f"{' ...' if len(named) > 5 else ''} (rows {[r for r, d in zip(rows, dup) if d][:10]}); "
                             "expected one row per well" + (" and plate" if PLATE_COL in keys else ""))
    first = keys + [c for c in df.columns if c not in keys]
    return df[first].reset_index(drop=True)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def annotations_to_attrs(df: pd.DataFrame) -> dict[str, Any]:
    """Column-wise JSON for the plate's attributes: ``{"columns": [...], "wells": {well: [..]}}``."""
    cols = [c for c in df.columns if c not in (PLATE_COL, WELL_COL)]
    return {
        "columns": cols,
        "wells": {w: [_jsonable(v) for v in row] for w, row in zip(df[WELL_COL], df[cols].itertuples(index=False))},
    }


def annotations_from_attrs(plate: str, wells: list[str], attrs: dict[str, Any] | None) -> pd.DataFrame:
    """One row per well of the plate (wells without annotations get missing values)."""
    cols = list((attrs or {}).get("columns", []))
    stored = (attrs or {}).get("wells", {})
    rows = [[plate, w, *stored.get(w, [None] * len(cols))] for w in wells]
    return pd.DataFrame(rows, columns=[PLATE_COL, WELL_COL, *cols])


class PlatemapByPlate:
    """A normalised platemap split by ``Metadata_Plate`` once: :func:`override` of each plate of
    a screen looks its rows up instead of normalising and filtering the whole map again (a
    screen's map of 384k rows took seconds per plate, hours per stage start)."""

    def __init__(self, platemap: pd.DataFrame, source: str = "platemap"):
        self.source = source
        pm = normalise_platemap(platemap, source)
        self.columns = [c for c in pm.columns if c != PLATE_COL]
        self._all = None if PLATE_COL in pm.columns else pm
        self._by_plate = ({str(k): rows.drop(columns=PLATE_COL) for k, rows in pm.groupby(PLATE_COL, sort=False)}
                          if PLATE_COL in pm.columns else {})
        self.plates = sorted(self._by_plate)

    def rows(self, plate: str) -> pd.DataFrame | None:
        """The rows for ``plate`` (without ``Metadata_Plate``); every row when the map names no
        plates; None, with a warning, when it names others."""
        if self._all is not None:
            return self._all
        if plate not in self._by_plate:
            # most often the platemap keys plates by file name or barcode and the plate's
            # NGFF name is the other: every label would be missing, silently
            shown = self.plates
            warnings.warn(f"the platemap has no row for plate {plate!r} (it names plates "
                          f"{shown[:10]}{' ...' if len(shown) > 10 else ''}); plate {plate!r} keeps its own "
                          "annotations. Metadata_Plate must be the plate's name as `rayscreen info` shows it",
                          stacklevel=3)
            return None
        return self._by_plate[plate]


def platemap_by_plate(platemap: pd.DataFrame | str | PlatemapByPlate,
                      storage_options: dict[str, Any] | None = None) -> PlatemapByPlate:
    """``platemap`` (a file URI, a table, or already split) split by plate; a file is read
    once per process while it is unchanged (one ``info`` request to tell)."""
    if isinstance(platemap, PlatemapByPlate):
        return platemap
    if not isinstance(platemap, str):
        return PlatemapByPlate(platemap)
    fs, path = filesystem(platemap, storage_options)
    fs.invalidate_cache(path)  # s3fs answers info from an earlier listing (a plates glob): stale once edited
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise RayscreenError(f"platemap {platemap} does not exist") from None
    stamp = tuple(str(info.get(k)) for k in ("size", "mtime", "LastModified", "ETag", "etag"))
    return _platemap_file(platemap, json.dumps(storage_options or {}, sort_keys=True, default=str), stamp)


@functools.lru_cache(maxsize=2)
def _platemap_file(uri: str, storage_options: str, stamp: tuple[str, ...]) -> PlatemapByPlate:
    """A platemap file read and split by plate, kept by this process: every plate of a screen
    is opened with the same platemap URI, and each read the whole file again. ``stamp`` (its
    size and modification stamp) is only a key: an edited platemap is read afresh.
    ``storage_options`` is JSON (a key must be hashable)."""
    return PlatemapByPlate(read_platemap(uri, json.loads(storage_options) or None), f"platemap {uri}")


def override(base: pd.DataFrame, platemap: pd.DataFrame | PlatemapByPlate, plate: str) -> pd.DataFrame:
    """``base`` with ``platemap``'s values replacing or adding per well.

    Wells the platemap names take its values; other wells keep theirs (a new column is
    missing for them). Rows for other plates are ignored; a well the plate lacks is an error.
    ``platemap``: a table, or :func:`platemap_by_plate`'s split of it (a screen's plates one
    after another).
    """
    split = platemap_by_plate(platemap)
    pm = split.rows(plate)
    if pm is None:  # no row for this plate (warned): it keeps its own annotations, and no empty columns
        return base
    unknown = sorted(set(pm[WELL_COL]) - set(base[WELL_COL]))
    if unknown:
        raise RayscreenError(f"{split.source} names wells {unknown[:10]} that plate {plate!r} does not have")
    out = base.set_index(WELL_COL)
    pm = pm.set_index(WELL_COL)
    for col in pm.columns:
        if col not in out.columns:
            # object dtype: wells the platemap does not name get a missing value, which a
            # numpy int64/bool column cannot hold
            out[col] = pd.Series(pd.NA, index=out.index, dtype=object)
        elif out[col].dtype != pm[col].dtype:
            out[col] = out[col].astype(object)
        out.loc[pm.index, col] = pm[col]
        if out[col].dtype == object and out[col].notna().all() and pm[col].dtype != object:
            out[col] = out[col].astype(pm[col].dtype)  # every well named: keep the platemap's dtype
    return out.reset_index()[list(base.columns) + [c for c in pm.columns if c not in base.columns]]
