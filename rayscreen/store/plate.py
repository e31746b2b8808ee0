"""Reading OME-Zarr HCS plates: ``open_plate(uri) -> Plate``.

Lazy like ``xarray.open_zarr``: opening reads the plate's root metadata only (one
request on S3); a well's metadata is read the first time it is asked for, a field's
pixels when it is read. A ``Plate`` pickles as its URI and options, so it can be sent
to Ray workers, which open their own filesystem.

Axis rule: fields are returned as (C, Y, X). A plate without a ``c`` axis gives C = 1;
``t`` is indexed (``t=0`` by default); ``z`` is indexed when ``z`` is an int, or
max-projected when ``z="max"`` (the default; a single plane is simply squeezed).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import numpy as np
import pandas as pd
import zarr

from . import annotations as ann
from .errors import (BadImageError, CorruptDataError, IncompleteWellError, MissingChunkError, MissingWellError,
                     NotAPlateError, RayscreenError)
from .ngff import Multiscale, PlateMeta, WellMeta
from .uri import exists, make_store
from .wells import well_name

NAMESPACE = "rayscreen"


def _attrs(node) -> dict[str, Any]:
    return dict(node.attrs.asdict())


log = logging.getLogger(__name__)


class Plate:
    """An OME-Zarr HCS plate. See the module docstring for laziness and the axis rule."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 platemap: pd.DataFrame | str | None = None, strict: bool | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage_options = storage_options
        self.strict = strict
        self._platemap = platemap
        self._open()

    # -- pickling: carry the URI, reopen lazily in the receiving process
    def __getstate__(self):
        return {"uri": self.uri, "storage_options": self.storage_options, "platemap": self._platemap,
                "strict": self.strict}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["storage_options"], state["platemap"], state["strict"])

    def __repr__(self) -> str:
        return f"<Plate {self.name!r} {self.uri} wells={len(self.wells)} ngff={self.ngff_version}>"

    def _open(self) -> None:
        # check_chunks: a truncated blosc chunk raises even when missing chunks fill (strict=False);
        # strict=None (the default) decides by the plate's writer, below
        self._store = make_store(self.uri, self.storage_options, read_only=True, strict=self.strict is not False,
                                 check_chunks=True)
        try:
            self._root = zarr.open_group(store=self._store, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
                zarr.errors.ContainsArrayError) as e:
            if isinstance(e, zarr.errors.ContainsArrayError):
                what = "a Zarr array, not a group"
            elif not exists(self.uri, self.storage_options):  # asked only on this error path
                raise NotAPlateError(f"{self.uri}: no such plate (nothing there)") from None
            else:
                what = "no Zarr group there"
            raise NotAPlateError(f"{self.uri} is not an OME-Zarr HCS plate: {what} ({type(e).__name__})") from None
        attrs = _attrs(self._root)
        if self.strict is None and "layout" not in (attrs.get(NAMESPACE) or {}):
            # rayscreen's writer (the only one that records a layout; illum's attributes on
            # another tool's plate do not count) writes every chunk, empty ones too: one missing
            # is a lost write. Other writers (ome-zarr-py through zarr 3's default) skip chunks
            # that are all fill value, which zarr reads back as that value: data, not a loss.
            # Switched on the store itself: the group and its arrays read through this object.
            self._store.fill_missing = True
        self.meta = PlateMeta.from_attrs(attrs, where=self.uri)
        self._well_paths = self.meta.well_names()
        self._arrays: dict[str, zarr.Array] = {}
        self._well_meta: dict[str, WellMeta] = {}
        self._multiscales: dict[str, Multiscale] = {}

    # -- plate-level facts
    @property
    def name(self) -> str:
        return self.meta.name or self.uri.rsplit("/", 1)[-1].removesuffix(".zarr")

    @property
    def ngff_version(self) -> str:
        return self.meta.version

    @property
    def zarr_format(self) -> int:
        return self._root.metadata.zarr_format

    @property
    def wells(self) -> list[str]:
        """Wells listed in the plate metadata, as ``A01``; some may be absent on disk."""
        return list(self._well_paths)

    @property
    def rows(self) -> tuple[str, ...]:
        return self.meta.rows

    @property
    def columns(self) -> tuple[str, ...]:
        return self.meta.columns

    def well_path(self, well: str) -> str:
        w = well_name(well, context=f"plate {self.name!r}")
        try:
            return self._well_paths[w]
        except KeyError:
            raise RayscreenError(f"plate {self.name!r} has no well {w!r} (it lists {len(self._well_paths)} wells)") from None

    def well_meta(self, well: str) -> WellMeta:
        w = well_name(well)
        if w not in self._well_meta:
            path = self.well_path(w)
            try:
                group = self._root[path]
            except KeyError:
                if self.written_by_rayscreen:
                    raise IncompleteWellError(self._incomplete(w, "nothing of it is on disk", path)) from None
                raise MissingWellError(f"plate {self.name!r}: well {w} is listed but missing on disk ({path})") from None
            meta = WellMeta.from_attrs(_attrs(group), where=f"{self.uri}/{path}")
            if meta is None:
                # rayscreen writes a well's metadata last, so a well without it was never completed
                if self.written_by_rayscreen:
                    raise IncompleteWellError(self._incomplete(w, "it has no well metadata", path))
                raise MissingWellError(f"plate {self.name!r}: well {w} has no well metadata (incomplete or not a well)")
            self._well_meta[w] = meta
        return self._well_meta[w]

    @functools.cached_property
    def written_by_rayscreen(self) -> bool:
        """Whether rayscreen's writer made this plate (it records a layout): such a plate lists
        every well when it is created and writes each well's metadata last."""
        return "layout" in (_attrs(self._root).get(NAMESPACE) or {})

    def _incomplete(self, well: str, what: str, path: str) -> str:
        return (f"plate {self.name!r} ({self.uri}): well {well} was not completed by the writer ({what}: {path}); "
                f"rayscreen lists a plate's wells when it creates it and writes each well's metadata last. "
                f"Finish the ingest (`rayscreen ingest` resumes where it stopped), or set stream.on_error: skip "
                f"to go on without this well")

    def fields(self, well: str, acquisition: int | str | None = None) -> list[str]:
        """Field (image) paths of a well, e.g. ``["0", "1"]``: of one ``acquisition`` (its id),
        or of every acquisition (``"all"``), or, by default, the well's fields when they come
        from one imaging run. A well imaged in several acquisitions (before / after, another
        objective) raises by default: what rayscreen computes per well (one weak label, one
        profile) must not pool two runs' fields."""
        images = self.well_meta(well).images
        if acquisition is None:
            runs = sorted({i.acquisition for i in images}, key=str)
            if len(runs) > 1:
                names = {a.id: a.name for a in self.meta.acquisitions}
                listed = ", ".join(f"{r}" + (f" ({names[r]!r})" if names.get(r) else "") for r in runs)
                raise RayscreenError(f"plate {self.name!r} well {well_name(well)}: fields of {len(runs)} "
                                     f"acquisitions ({listed}); rayscreen reads one imaging run per well and would "
                                     f"pool them: write each acquisition as a plate of its own")
            return [i.path for i in images]
        return [i.path for i in images if acquisition == "all" or i.acquisition == acquisition]

    @property
    def acquisitions(self) -> list[int]:
        return [a.id for a in self.meta.acquisitions]

    def present_wells(self) -> tuple[list[str], list[str]]:
        """(present, missing) wells. Reads every well's metadata: one request per well."""
        present, missing = [], []
        for w in self.wells:
            try:
                self.well_meta(w)
                present.append(w)
            except MissingWellError:
                missing.append(w)
        return present, missing

    @functools.cached_property
    def _first_field(self) -> tuple[str, str]:
        """(well, field) of the first field on disk: it tells the plate's layout (channels,
        shape, dtype). Wells missing or with malformed metadata are passed over, so one bad
        well leaves the rest of the plate readable; reading that well still fails, naming it
        (or is skipped and reported under ``on_error: skip``)."""
        malformed: RayscreenError | None = None
        for w in self.wells:
            try:
                fields = self.fields(w, acquisition="all")  # any run tells the plate's layout
            except MissingWellError:
                continue
            except RayscreenError as e:  # malformed well metadata (never a transport error)
                malformed = malformed or e
                continue
            if fields:
                return w, fields[0]
        if malformed is not None:
            raise RayscreenError(f"plate {self.name!r} ({self.uri}) has no readable field; "
                                 f"the first unreadable well: {malformed}") from malformed
        raise RayscreenError(f"plate {self.name!r} ({self.uri}) has no field on disk")

    def multiscale(self, well: str, field: str) -> Multiscale:
        """The field's image metadata (cached: one request per field per process)."""
        path = f"{self.well_path(well)}/{field}"
        if path not in self._multiscales:
            try:
                group = self._root[path]
            except KeyError:
                raise MissingWellError(f"plate {self.name!r} well {well_name(well)} field {field}: "
                                       f"image group {path} is missing") from None
            self._multiscales[path] = Multiscale.from_attrs(_attrs(group), where=f"{self.uri}/{path}")
        return self._multiscales[path]

    @functools.cached_property
    def _reference(self) -> Multiscale:
        return self.multiscale(*self._first_field)

    @property
    def channels(self) -> list[str]:
        ms = self._reference
        n = self._array(*self._first_field, 0).shape[ms.axis_names.index("c")] if "c" in ms.axis_names else 1
        names = list(ms.channel_names)
        return names if len(names) == n else [f"c{i}" for i in range(n)]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, Y, X) of level 0 (of the first field; rayscreen plates share one shape)."""
        ms = self._reference
        arr = self._array(*self._first_field, 0)
        dims = dict(zip(ms.axis_names, arr.shape))
        return (dims.get("c", 1), dims["y"], dims["x"])

    @property
    def planes(self) -> dict[str, int]:
        """Sizes of the ``t`` and ``z`` axes of level 0 (of the first field; 1 where the axis
        is absent): what the axis rule reduces (t indexed, z max-projected by default)."""
        ms = self._reference
        dims = dict(zip(ms.axis_names, self._array(*self._first_field, 0).shape))
        return {"t": int(dims.get("t", 1)), "z": int(dims.get("z", 1))}

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array(*self._first_field, 0).dtype)

    @property
    def levels(self) -> int:
        return len(self._reference.paths)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self._array(*self._first_field, 0).chunks)

    @property
    def axes(self) -> str:
        return self._reference.axis_names

    @functools.cached_property
    def _stored_annotations(self) -> dict[str, Any]:
        return _attrs(self._root).get(NAMESPACE, {}).get("annotations", {})

    @property
    def annotations(self) -> pd.DataFrame:
        """One row per listed well: ``Metadata_Plate``, ``Metadata_Well``, other ``Metadata_*``."""
        df = ann.annotations_from_attrs(self.name, self.wells, self._stored_annotations)
        if self._platemap is not None:
            df = ann.override(df, ann.platemap_by_plate(self._platemap, self.storage_options), self.name)
        return df

    def with_platemap(self, platemap: pd.DataFrame | str) -> "Plate":
        """The same plate, with ``platemap``'s annotations overriding the stored ones."""
        return Plate(self.uri, self.storage_options, platemap, self.strict)

    def rayscreen_attrs(self) -> dict[str, Any]:
        return _attrs(self._root).get(NAMESPACE, {})

    # -- pixels
    def _array(self, well: str, field: str, level: int) -> zarr.Array:
        key = f"{self.well_path(well)}/{field}/{level}"
        if key not in self._arrays:
            ms = self.multiscale(well, field)
            if not 0 <= level < len(ms.paths):
                raise RayscreenError(f"plate {self.name!r} well {well} field {field}: no level {level} "
                                     f"(it has {len(ms.paths)})")
            path = f"{self.well_path(well)}/{field}/{ms.paths[level]}"
            try:
                self._arrays[key] = self._root[path]
            except KeyError:
                raise MissingWellError(f"plate {self.name!r} well {well} field {field}: array {path} is missing") from None
        return self._arrays[key]

    def read(self, well: str, field: str | int, level: int = 0, *, channels: Sequence[int | str] | None = None,
             t: int = 0, z: int | str = "max") -> np.ndarray:
        """Pixels of one field as (C, Y, X) in the stored dtype (see the module's axis rule).

        ``channels`` selects by index or name (only those chunks are read). Raises
        ``MissingChunkError``/``CorruptDataError`` naming plate, well and field when a
        chunk is absent or cannot be decoded, and ``BadImageError`` when a float field
        holds NaN or Inf (one such pixel would otherwise turn a plate's illumination
        function and normaliser into NaN or no-ops, and every field after them).
        """
        well = well_name(well)
        field = str(field)
        where = f"plate {self.name!r} well {well} field {field}"
        ms = self.multiscale(well, field)
        arr = self._array(well, field, level)
        axes = ms.axis_names
        index: list[Any] = []
        for name, size in zip(axes, arr.shape):
            plane = t if name == "t" else z if name == "z" and isinstance(z, int) else None
            if plane is not None and not 0 <= plane < size:
                raise RayscreenError(f"{where}: {name}={plane} is outside the field's {size} {name} plane(s); "
                                     f"expected 0 to {size - 1}")
            if name == "t":
                index.append(t)
            elif name == "c" and channels is not None:
                index.append(self._channel_indices(channels))
            elif name == "z" and isinstance(z, int):
                index.append(z)
            else:
                index.append(slice(None))
        try:
            data = arr.oindex[tuple(index)] if channels is not None else arr[tuple(index)]
        except (MissingChunkError, CorruptDataError) as e:  # the store names the chunk; add plate, well, field
            raise type(e)(f"{where}: {e}") from None
        except (RayscreenError, KeyError):
            raise
        except Exception as e:  # codec errors come from blosc/zstd/numcodecs with varied types
            raise CorruptDataError(f"{where}: cannot decode a chunk ({type(e).__name__}: {e})") from e
        kept = [n for n, i in zip(axes, index) if not isinstance(i, int)]
        if "z" in kept:
            data = data.max(axis=kept.index("z"))
            kept.remove("z")
        if "c" not in kept:
            data = data[np.newaxis]
            kept.insert(0, "c")
        check_finite(data, where)
        return np.ascontiguousarray(np.transpose(data, [kept.index(a) for a in "cyx"]))

    def _channel_indices(self, channels: Sequence[int | str]) -> list[int]:
        names = self.channels
        out = []
        for c in channels:
            if isinstance(c, str):
                if c not in names:
                    raise RayscreenError(f"plate {self.name!r} has no channel {c!r}; it has {names}")
                out.append(names.index(c))
            else:
                if not -len(names) <= int(c) < len(names):
                    raise RayscreenError(f"plate {self.name!r} has no channel index {c}; it has {len(names)} "
                                         f"channels {names}")
                out.append(int(c) % len(names))
        return out


def open_plate(uri: str, storage_options: dict[str, Any] | None = None, *,
               platemap: pd.DataFrame | str | None = None, strict: bool | None = None) -> Plate:
    """Open an OME-Zarr HCS plate (NGFF 0.4/Zarr v2 or 0.5/Zarr v3) at a path, ``file://`` or ``s3://`` URI.

    ``storage_options`` go to fsspec (for S3: ``endpoint_url``, ``anon``, ``profile``...;
    credentials come from the standard places). ``platemap`` (a DataFrame or a file)
    overrides the annotations stored in the plate. A missing chunk raises
    ``MissingChunkError`` in plates rayscreen wrote (it writes every chunk, so one missing is
    a lost write) and reads as the fill value in other tools' plates (zarr 3, and so
    ome-zarr-py, skip chunks that are all fill value); ``strict=True`` / ``False`` forces
    either. A truncated blosc chunk raises ``CorruptDataError`` either way.
    """
    return Plate(uri, storage_options, platemap, strict)


def check_finite(image: np.ndarray, where: str) -> None:
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise BadImageError(f"{where}: {bad} NaN/Inf pixel(s) in a float image; expected finite values")


def wells_to_redo(status: np.ndarray, read_error: int, absent: int, plate_uris: np.ndarray,
                  storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """The wells a stage's rerun computes again, (n,) bool, from the stored ``field_status``
    (n, n_fields) with its ``read_error`` and ``absent`` codes: a read error in any field
    (maybe transient), or no field at all on a plate rayscreen wrote (:func:`unfinished_wells`).
    infer and profile share it: their stores code the two states differently."""
    status = np.asarray(status)
    return (status == read_error).any(axis=1) | unfinished_wells(_no_field(status, absent), plate_uris,
                                                                  storage_options)


def _no_field(status: np.ndarray, absent: int) -> np.ndarray:
    return (status == absent).all(axis=1) & (status.shape[1] > 0)


def wells_to_retry(status: np.ndarray, read_error: int, absent: int) -> np.ndarray:
    """The wells a writer flags ``retry`` (:meth:`ResultsWriter.write_well`), (n,) bool, from
    their ``field_status`` (n, n_fields): a read error in any field, or no field at all. The
    flagged wells are all that :func:`wells_to_redo` looks at on a rerun (which plates the
    no-field wells are on is only known then)."""
    status = np.atleast_2d(np.asarray(status))
    return (status == read_error).any(axis=1) | _no_field(status, absent)


def unfinished_wells(no_field: np.ndarray, plate_uris: np.ndarray,
                     storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Of the wells found without any field (``no_field``, (n,) bool; ``plate_uris`` (n,) their
    plates), those whose plate rayscreen wrote, (n,) bool: there such a well is an ingest not
    finished yet, where in other tools' plates it is a sparse plate's absent well, for good.
    Only the plates of such wells are opened (root metadata), usually none."""
    no_field = np.asarray(no_field, bool)
    if not no_field.any():
        return no_field
    uris = np.asarray(plate_uris, dtype=object)
    ours = {u: open_plate(u, storage_options).written_by_rayscreen for u in dict.fromkeys(uris[no_field])}
    return no_field & np.array([ours.get(u, False) for u in uris], bool)


_TOLD_TIMEPOINTS: set[str] = set()


def warn_of_timepoints(plate: Plate) -> None:
    """Log, once per plate and process, that a plate with several timepoints streams t=0
    only (the axis rule): a time-lapse screen would otherwise lose its later timepoints
    without a word."""
    if plate.uri in _TOLD_TIMEPOINTS:
        return
    _TOLD_TIMEPOINTS.add(plate.uri)
    t = plate.planes["t"]
    if t > 1:
        log.warning("plate %r (%s) has %d timepoints; rayscreen reads t=0 only", plate.name, plate.uri, t)
