"""Shared helpers of the synthetic screens: seeded RNG streams, well layouts, ground-truth tables.

Every random draw comes from a generator seeded by the *identity* of what it draws
(``(seed, stream, plate, well, field)``), never from a generator shared across a loop, so a
field's pixels do not depend on which fields were rendered before it (write order, Ray
task scheduling, resuming a half-written plate).
"""

from __future__ import annotations

import math
import numbers
import string
from typing import Any, Sequence

import fsspec
import numpy as np
import pandas as pd

# RNG stream tags: the first words after the seed, so that streams never collide
# (numpy's SeedSequence pads short entropy lists with zeros, so ``[seed]`` and
# ``[seed, 0, 0, 0]`` would otherwise be the same stream).
STREAM_FIELD = 1
STREAM_LAYOUT = 2
STREAM_PLATE = 3
STREAM_COMPOUND = 4

# Standard plate formats used here: wells -> (rows, columns).
PLATE_GRID = {96: (8, 12), 384: (16, 24)}


def invalid_argument(message: str) -> Exception:
    # imported here: rayscreen.store pulls in zarr, which the pure generators do without
    from rayscreen.store.errors import RayscreenError

    return RayscreenError(message)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """``value`` is an integer ``>= low``, else a :class:`~rayscreen.store.RayscreenError`
    naming ``name``: checked before a screen writes anything, so a bad argument leaves no
    half-written folder behind (and is a user error, not a traceback from numpy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise invalid_argument(f"{name}={value!r}: expected an integer >= {low}")


def check_fraction(name: str, value: Any) -> None:
    """``value`` is a number in [0, 1] (NaN is not), else an error naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            or not 0.0 <= value <= 1.0):
        raise invalid_argument(f"{name}={value!r}: expected a fraction in [0, 1]")


def check_shape(name: str, value: Any) -> None:
    """``value`` is a (Y, X) pair of integers >= 1."""
    try:
        ok = len(value) == 2 and all(not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= 1
                                     for v in value)
    except TypeError:  # not a sequence
        ok = False
    if not ok:
        raise invalid_argument(f"{name}={value!r}: expected a (Y, X) pair of integers >= 1")


def field_rng(seed: int, plate_idx: int, well_idx: int, field_idx: int) -> np.random.Generator:
    """The generator of one field: a pure function of (seed, plate, well, field)."""
    return np.random.default_rng([int(seed), STREAM_FIELD, int(plate_idx), int(well_idx), int(field_idx)])


def stream_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator for one named stream (layout, plate effects, compounds) and its keys."""
    return np.random.default_rng([int(seed), int(stream), *(int(k) for k in keys)])


def well_at(index: int, plate_format: int = 384, order: str = "row") -> str:
    """Well name of the ``index``-th well of a plate, counted row-major (``A01, A02, ...``)
    or column-major (``A01, B01, ...``)."""
    n_rows, n_cols = PLATE_GRID[plate_format]
    if not 0 <= index < n_rows * n_cols:
        raise ValueError(f"well index {index} outside a {plate_format}-well plate")
    r, c = (index // n_cols, index % n_cols) if order == "row" else (index % n_rows, index // n_rows)
    return f"{string.ascii_uppercase[r]}{c + 1:02d}"


def well_index(well: str, plate_format: int = 384) -> int:
    """Row-major position of ``well`` (``A01`` -> 0) in a plate: the key of its RNG."""
    _, n_cols = PLATE_GRID[plate_format]
    return string.ascii_uppercase.index(well[0].upper()) * n_cols + int(well[1:]) - 1


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URL without mangling ``s3://``."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def plate_uri(out_dir: str, plate: str) -> str:
    return join(out_dir, f"{plate}.zarr")


def write_table(df: pd.DataFrame, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``df`` as parquet at ``uri`` (local path or any fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        df.to_parquet(f, index=False)
    return uri


def read_tables(out_dir: str, suffix: str, plates: Sequence[str] | None = None,
                storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Concatenate ``<out_dir>/<plate><suffix>`` tables (all plates when ``plates`` is None)."""
    fs, root = fsspec.core.url_to_fs(str(out_dir), **(storage_options or {}))
    root = root.rstrip("/")
    if plates is None:
        paths = sorted(fs.glob(f"{root}/*{suffix}"))
    else:
        paths = [f"{root}/{p}{suffix}" for p in plates]
    if not paths:
        raise FileNotFoundError(f"no *{suffix} ground-truth tables under {out_dir}")
    frames = []
    for p in paths:
        if not fs.exists(p):
            raise FileNotFoundError(f"ground truth {p} does not exist (was the plate written to {out_dir}?)")
        with fs.open(p, "rb") as f:
            frames.append(pd.read_parquet(f))
    return pd.concat(frames, ignore_index=True)


def import_create_plate():
    """The store's ``create_plate``, imported late so the pure generators need no zarr."""
    from rayscreen.store import create_plate

    return create_plate
