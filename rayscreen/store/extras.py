"""Derived arrays and attributes stored with a plate, under its ``rayscreen`` namespace.

Per-plate results that later stages need next to the pixels (an illumination function,
fitted normalisation statistics) live inside the plate, so they travel with it (copy the
plate, copy its corrections)::

    P1.zarr/
      rayscreen/illumination/v1     a float array, e.g. (C, Y, X), chunked per channel
      (zarr.json / .zattrs)         "rayscreen": {"illumination": {...}, "normalization": {...}}

NGFF readers (ome-zarr-py included) find wells through the plate metadata, so an extra
``rayscreen`` group beside the row groups is invisible to them.

These work on any plate, including ones rayscreen did not write (``PlateWriter`` needs the
layout that :func:`~rayscreen.store.create_plate` stores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from .errors import RayscreenError
from .plate import NAMESPACE
from .uri import make_store
from .writer import _compressor

ARRAY_GROUP = NAMESPACE  # arrays live under <plate>/rayscreen/<name>


def _open_root(plate_uri: str, storage_options: dict[str, Any] | None, mode: str) -> zarr.Group:
    store = make_store(plate_uri, storage_options, read_only=mode == "r", strict=mode == "r")
    try:
        return zarr.open_group(store=store, mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise RayscreenError(f"{plate_uri}: no plate there ({type(e).__name__})") from None


def _check_name(name: str) -> list[str]:
    parts = [p for p in str(name).strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise RayscreenError(f"plate array name {name!r}: expected a relative path like 'illumination/v1'")
    return parts


def write_plate_array(plate_uri: str, name: str, array: np.ndarray, attrs: dict[str, Any] | None = None,
                      storage_options: dict[str, Any] | None = None) -> str:
    """Write ``array`` at ``<plate>/rayscreen/<name>`` (replacing one there) with JSON ``attrs``.

    The array is chunked along its first axis (one channel per chunk for (C, Y, X)) and
    compressed like the plate's fields. Returns the path inside the plate.
    """
    parts = _check_name(name)
    array = np.ascontiguousarray(array)
    root = _open_root(plate_uri, storage_options, "r+")
    group = root.require_group(ARRAY_GROUP)
    for p in parts[:-1]:
        group = group.require_group(p)
    zarr_format = root.metadata.zarr_format
    chunks = (1, *array.shape[1:]) if array.ndim > 1 else array.shape
    kwargs: dict[str, Any] = dict(name=parts[-1], shape=array.shape, chunks=chunks, dtype=array.dtype,
                                  fill_value=0, overwrite=True, compressors=_compressor(zarr_format),
                                  config={"write_empty_chunks": True})
    if zarr_format == 2:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    arr = group.create_array(**kwargs)
    arr[...] = array
    arr.attrs.update(attrs or {})
    return "/".join([ARRAY_GROUP, *parts])


def _plate_array(plate_uri: str, name: str, storage_options: dict[str, Any] | None) -> zarr.Array | None:
    """The array at ``<plate>/rayscreen/<name>`` (None where there is none; a group there is an error)."""
    path = "/".join([ARRAY_GROUP, *_check_name(name)])
    root = _open_root(plate_uri, storage_options, "r")
    try:
        node = root[path]
    except KeyError:
        return None
    if not isinstance(node, zarr.Array):
        raise RayscreenError(f"{plate_uri}/{path} is a group, not an array")
    return node


def plate_array_complete(plate_uri: str, name: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the array :func:`write_plate_array` put at ``<plate>/rayscreen/<name>`` exists
    with every chunk stored (one listing of its chunk keys, not a read of its data)."""
    node = _plate_array(plate_uri, name, storage_options)
    return node is not None and node.nchunks_initialized == node.nchunks


def read_plate_array(plate_uri: str, name: str,
                     storage_options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]] | None:
    """``(array, attrs)`` written by :func:`write_plate_array`, or ``None`` where there is none.

    A missing chunk of an array that exists is an error (``MissingChunkError``), not zeros.
    """
    node = _plate_array(plate_uri, name, storage_options)
    return None if node is None else (node[...], dict(node.attrs.asdict()))


def update_plate_attrs(plate_uri: str, storage_options: dict[str, Any] | None = None, **entries: Any) -> None:
    """Merge ``entries`` into the plate's ``rayscreen`` attributes (read back with ``Plate.rayscreen_attrs()``).

    Like ``PlateWriter.update_rayscreen_attrs`` but for any plate, including foreign ones.
    Read-modify-write: callers must not update one plate's attributes concurrently.
    """
    root = _open_root(plate_uri, storage_options, "r+")
    ns = dict(root.attrs.get(NAMESPACE, {}))
    ns.update(entries)
    root.attrs.update({NAMESPACE: ns})
