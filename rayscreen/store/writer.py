"""Writing OME-Zarr HCS plates (NGFF 0.5 on Zarr v3 by default, 0.4 on Zarr v2 on request).

Layout written (``A/1`` is well A01, ``0`` its first field, ``0`` level 0)::

    P1.zarr/                 plate metadata (+ rayscreen.annotations)
      A/1/                   well metadata, written LAST: it marks the well complete
        0/                   image group: multiscales + omero channels
          0                  array (c, y, x), chunks (1, Y, X), blosc-zstd
          1                  optional pyramid levels, 2x downsampled in y and x

Resumable: a well's metadata (and ``rayscreen.complete``) is written only after all its
fields, so a crash leaves it incomplete and a rerun rewrites it; complete wells are skipped.
Writers of different wells never touch the same object, so wells can be written in
parallel by Ray tasks, each with its own ``PlateWriter`` opened on the same URI.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numcodecs
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from . import annotations as ann
from .errors import BadImageError, RayscreenError
from .ngff import (Acquisition, Axis, Multiscale, PlateMeta, WellImage, WellMeta, WellRef, display_windows,
                   sort_wells)
from .plate import NAMESPACE, check_finite
from .uri import exists, filesystem, make_store
from .wells import PLATE_FORMATS, parse_well, plate_format_for, row_index, row_name, well_name

# One field-channel per chunk: zarr spends a fraction of a millisecond orchestrating each
# chunk, so chunks far below ~1 MB cost throughput, while per-channel chunks still let a
# reader fetch only the channels it needs.
DEFAULT_CLEVEL = 3  # zstd 3 compresses microscopy as well as 5 here, ~30% faster (benchmarks/ingest.py)


def _compressor(zarr_format: int):
    if zarr_format == 3:
        # crc32c (a core Zarr v3 codec) turns a garbled or truncated chunk into an error:
        # blosc alone can decode some truncated buffers into garbage without complaint.
        return [BloscCodec(cname="zstd", clevel=DEFAULT_CLEVEL, shuffle="bitshuffle"), Crc32cCodec()]
    return numcodecs.Blosc(cname="zstd", clevel=DEFAULT_CLEVEL, shuffle=numcodecs.Blosc.BITSHUFFLE)


def downsample(image: np.ndarray) -> np.ndarray:
    """(C, Y, X) -> (C, Y//2, X//2) by 2x2 block means, in the input dtype."""
    c, y, x = image.shape
    y2, x2 = y // 2, x // 2
    blocks = image[:, : y2 * 2, : x2 * 2].reshape(c, y2, 2, x2, 2).astype(np.float64)
    out = blocks.mean(axis=(2, 4))
    if np.issubdtype(image.dtype, np.integer):
        out = np.rint(out)
    return out.astype(image.dtype)


class PlateWriter:
    """Writes fields of one plate. Create with :func:`create_plate`."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage_options = storage_options
        self._store = make_store(self.uri, storage_options, read_only=False, strict=False)
        self._root = zarr.open_group(store=self._store, mode="r+")
        attrs = dict(self._root.attrs.asdict())
        self.meta = PlateMeta.from_attrs(attrs, where=self.uri)
        layout = attrs[NAMESPACE]["layout"]
        self.channels: list[str] = layout["channels"]
        self.field_shape: tuple[int, int] = tuple(layout["field_shape"])
        self.dtype = np.dtype(layout["dtype"])
        self.levels: int = layout["levels"]
        self.chunks: tuple[int, int, int] = tuple(layout["chunks"])
        self.zarr_format = self._root.metadata.zarr_format
        self._paths = self.meta.well_names()

    def __getstate__(self):
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["storage_options"])

    def raise_field_count(self, n: int) -> None:
        """Make the plate's ``field_count`` (and its acquisitions' ``maximumfieldcount``) at
        least ``n``: a resumed write may give an unfinished well more fields than the first
        run planned, and readers size their stores by this count."""
        if (self.meta.field_count or 0) >= n:
            return
        acquisitions = tuple(dataclasses.replace(a, maximumfieldcount=max(a.maximumfieldcount, n))
                             if a.maximumfieldcount is not None else a for a in self.meta.acquisitions)
        self.meta = dataclasses.replace(self.meta, field_count=int(n), acquisitions=acquisitions)
        self._root.attrs.update(self.meta.to_attrs())

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def wells(self) -> list[str]:
        return list(self._paths)

    def _path(self, well: str) -> str:
        w = well_name(well, context=f"plate {self.name!r}")
        if w not in self._paths:
            raise RayscreenError(f"plate {self.name!r} was created without well {w}")
        return self._paths[w]

    def is_complete(self, well: str) -> bool:
        return self.complete_fields(well) is not None

    def complete_fields(self, well: str) -> int | None:
        """How many fields a complete well was written with; ``None`` while it is incomplete."""
        try:
            group = self._root[self._path(well)]
        except KeyError:
            return None
        ns = group.attrs.get(NAMESPACE, {})
        return int(ns.get("fields", 0)) if ns.get("complete") else None

    def complete_wells(self) -> list[str]:
        return [w for w in self.wells if self.is_complete(w)]

    def write_field(self, well: str, field: int, image: np.ndarray, *, source: str | None = None) -> None:
        """Write field ``field`` (0-based) of ``well``: ``image`` is (C, Y, X) of the plate's dtype.

        Raises ``BadImageError`` naming the plate, well and field when shape, channel
        count or dtype differ from the plate's, or a float image holds NaN/Inf. ``source``
        says where the image came from (ingest: the LoadData site and its files); errors
        name it, since the 0-based field index alone does not point at an input file.
        """
        where = f"plate {self.name!r} well {well_name(well)} field {field}"
        if source:
            where = f"{where} ({source})"
        image = np.asarray(image)
        expected = (len(self.channels), *self.field_shape)
        if image.shape != expected:
            raise BadImageError(f"{where}: image shape {image.shape} (C, Y, X); expected {expected}")
        if image.dtype != self.dtype:
            raise BadImageError(f"{where}: dtype {image.dtype}; expected {self.dtype} like the rest of the plate")
        check_finite(image, where)
        path = self._path(well)
        well_group = self._root.require_group(path)
        if self.is_complete(well):
            raise RayscreenError(f"{where}: the well is already complete; refusing to overwrite it")
        image_group = well_group.require_group(str(field))
        scales, level_image = [], image
        for level in range(self.levels):
            if level:
                level_image = downsample(level_image)
            chunks = (min(self.chunks[0], level_image.shape[0]), min(self.chunks[1], level_image.shape[1]),
                      min(self.chunks[2], level_image.shape[2]))
            kwargs: dict[str, Any] = dict(name=str(level), shape=level_image.shape, chunks=chunks,
                                          dtype=self.dtype, fill_value=0, overwrite=True,
                                          compressors=_compressor(self.zarr_format),
                                          # every chunk stored, so a missing chunk is always an error
                                          config={"write_empty_chunks": True})
            if self.zarr_format == 3:
                kwargs["dimension_names"] = ["c", "y", "x"]
            else:
                kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
            arr = image_group.create_array(**kwargs)
            arr[...] = level_image
            scales.append((1.0, float(2**level), float(2**level)))
        ms = Multiscale(axes=(Axis("c", "channel"), Axis("y", "space"), Axis("x", "space")),
                        paths=tuple(str(i) for i in range(self.levels)), scales=tuple(scales),
                        channel_names=tuple(self.channels), version=self.meta.version)
        image_group.attrs.update(ms.to_attrs(name=f"{self.name}/{well_name(well)}/{field}",
                                             windows=display_windows(image)))

    def drop_fields_from(self, well: str, n_fields: int) -> list[str]:
        """Delete the field groups numbered ``n_fields`` and above of an incomplete well (an
        interrupted write of a well that now has fewer sites); returns their names. A complete
        well is refused: its fields are what readers see."""
        group = self._root.get(self._path(well))
        if group is None:
            return []
        if group.attrs.get(NAMESPACE, {}).get("complete"):
            raise RayscreenError(f"plate {self.name!r} well {well_name(well)} is complete: its fields are not "
                                 "dropped")
        extra = [k for k in group.group_keys() if k.isdigit() and int(k) >= n_fields]
        for k in extra:
            del group[k]
        return extra

    def complete_well(self, well: str, n_fields: int | None = None, acquisition: int = 0) -> None:
        """Mark a well complete by writing its NGFF well metadata, last of all its objects."""
        path = self._path(well)
        group = self._root.require_group(path)
        present = sorted((k for k in group.group_keys()), key=lambda k: int(k) if k.isdigit() else k)
        if n_fields is not None and len(present) != n_fields:
            raise RayscreenError(f"plate {self.name!r} well {well_name(well)}: {len(present)} fields written, "
                                 f"expected {n_fields}; not marking it complete")
        meta = WellMeta(tuple(WellImage(p, acquisition) for p in present), version=self.meta.version)
        group.attrs.update({**meta.to_attrs(), NAMESPACE: {"complete": True, "fields": len(present)}})

    def set_annotations(self, annotations: pd.DataFrame) -> None:
        """Store per-well annotations (``Metadata_Well`` + other ``Metadata_*``) in the plate."""
        df = ann.normalise_platemap(annotations, source=f"annotations of plate {self.name!r}")
        if ann.PLATE_COL in df.columns:
            df = df[df[ann.PLATE_COL].astype(str) == self.name].drop(columns=ann.PLATE_COL)
        unknown = sorted(set(df[ann.WELL_COL]) - set(self._paths))
        if unknown:
            raise RayscreenError(f"annotations name wells {unknown[:10]} that plate {self.name!r} does not have")
        ns = dict(self._root.attrs.get(NAMESPACE, {}))
        ns["annotations"] = ann.annotations_to_attrs(df)
        self._root.attrs.update({NAMESPACE: ns})

    def update_rayscreen_attrs(self, **entries: Any) -> None:
        """Merge entries into the plate's ``rayscreen`` namespace (illumination, normalisation...)."""
        ns = dict(self._root.attrs.get(NAMESPACE, {}))
        ns.update(entries)
        self._root.attrs.update({NAMESPACE: ns})


def create_plate(
    uri: str,
    name: str,
    wells: Sequence[str],
    channels: Sequence[str],
    field_shape: tuple[int, int],
    dtype: str | np.dtype,
    field_count: int | None = None,
    *,
    annotations: pd.DataFrame | None = None,
    ngff: str = "0.5",
    chunks: tuple[int, int, int] | None = None,
    levels: int = 1,
    plate_format: int | None = None,
    acquisitions: Sequence[dict] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> PlateWriter:
    """Create a plate (or reopen it to resume) and return its writer.

    Wells are listed in the plate metadata up front; each becomes complete when its
    fields are written and :meth:`PlateWriter.complete_well` is called. An existing
    plate with the same layout is reopened (resume); one with another layout is an
    error unless ``overwrite``. ``chunks`` is (c, y, x), default one field-channel.
    """
    if ngff not in ("0.4", "0.5"):
        raise RayscreenError(f"ngff version {ngff!r}: expected '0.4' or '0.5'")
    if not wells:
        raise RayscreenError(f"plate {name!r}: no wells to write")
    canonical = [well_name(w, context=f"plate {name!r}") for w in wells]
    if len(set(canonical)) != len(canonical):
        raise RayscreenError(f"plate {name!r}: wells listed twice: "
                             f"{sorted({w for w in canonical if canonical.count(w) > 1})}")
    dtype = np.dtype(dtype)
    y, x = (int(v) for v in field_shape)
    chunks = tuple(chunks) if chunks else (1, y, x)
    layout = {"channels": list(channels), "field_shape": [y, x], "dtype": dtype.str, "levels": int(levels),
              "chunks": list(chunks)}

    if exists(uri, storage_options) and not overwrite:
        try:
            writer = PlateWriter(uri, storage_options)
        except (RayscreenError, KeyError) as e:
            raise RayscreenError(f"{uri} exists and is not a rayscreen plate ({e}); pass overwrite=True to replace it") from None
        if writer.name != name:  # two names that map to one store (case-insensitive disks)
            raise RayscreenError(f"{uri} holds plate {writer.name!r}, not {name!r}: two plates cannot share a "
                                 "store; use distinct plate names or another output")
        found = {"channels": writer.channels, "field_shape": list(writer.field_shape), "dtype": writer.dtype.str,
                 "levels": writer.levels, "chunks": list(writer.chunks)}
        if found != layout or sorted(writer.wells) != sorted(canonical) or writer.meta.version != ngff:
            raise RayscreenError(f"{uri} exists with another layout ({found}, {len(writer.wells)} wells, "
                                 f"NGFF {writer.meta.version}); expected {layout}, {len(canonical)} wells, NGFF {ngff}. "
                                 "Use a new output or overwrite=True")
        if field_count is not None:
            writer.raise_field_count(int(field_count))
        if annotations is not None:
            writer.set_annotations(annotations)
        return writer

    if plate_format:
        if plate_format not in PLATE_FORMATS:
            raise RayscreenError(f"plate_format {plate_format}: expected one of {sorted(PLATE_FORMATS)}")
        n_rows, n_cols = PLATE_FORMATS[plate_format]
    else:
        n_rows, n_cols = plate_format_for(canonical, context=f"plate {name!r}")
    rows = tuple(row_name(i) for i in range(n_rows))
    columns = tuple(str(i + 1) for i in range(n_cols))
    refs = []
    for w in canonical:
        r, c = parse_well(w)
        if row_index(r) >= n_rows or c > n_cols:
            raise RayscreenError(f"well {w} lies outside a {n_rows}x{n_cols} plate {name!r}")
        refs.append(WellRef(f"{r}/{c}", row_index(r), c - 1))
    acqs = tuple(Acquisition(int(a["id"]), a.get("name"), a.get("maximumfieldcount")) for a in acquisitions or [{"id": 0}])
    meta = PlateMeta(name, rows, columns, tuple(sort_wells(refs)), field_count, acqs, ngff)

    store = make_store(uri, storage_options, read_only=False, strict=False)
    zarr_format = 3 if ngff == "0.5" else 2
    if overwrite and exists(uri, storage_options):
        fs, path = filesystem(uri, storage_options)
        fs.rm(path, recursive=True)
    root = zarr.open_group(store=store, mode="w", zarr_format=zarr_format)
    root.attrs.update({**meta.to_attrs(), NAMESPACE: {"version": 1, "layout": layout}})
    writer = PlateWriter(uri, storage_options)
    if annotations is not None:
        writer.set_annotations(annotations)
    return writer
