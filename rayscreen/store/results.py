"""The results store: one Zarr v3 group per run stage (``results.zarr``, ``profiles.zarr``)
that plain ``xarray.open_zarr(uri)`` opens as a Dataset. This module is the only writer.

Layout (see docs/outputs.md for the variables infer and profile write)::

    results.zarr/
      zarr.json            root attrs "rayscreen": {kind, version, created, layout_hash, complete, ...}
                           + consolidated metadata, written once by finalize()
      well, plate, row, column, Metadata_*    coordinates on dim `well` (written at creation)
      field, class, feature, ...              index coordinates of the other dims
      <variable>/c/<i>/0/...                  data: ONE WELL PER CHUNK along `well`
      done/c/<i>                              uint8, 1 once well i is complete (written last)
      retry/c/<i>                             uint8, 1 where a write of well i had fields to try
                                              again on a rerun (a read error, or no field on disk);
                                              cleared when the well is reopened

Both flags exist as stored chunks only where they are 1 (a cleared flag deletes its chunk),
so a stage's start finds the done and retry wells by *listing* the two prefixes (S3: one
request per 1000 wells) instead of reading one chunk per well (at 400k wells, 400k GETs
before any work). Stores from before the root attribute ``flags_by_presence`` kept
explicit 0 chunks, have no retry flags and are read chunk by chunk, as then.

How it stays exactly-once under retries (Ray re-runs a batch when an actor dies):

- the skeleton (metadata + coordinates) is written once, by the driver, in
  :func:`create_results`; workers only ever write data chunks;
- every variable is chunked ``(1, *full_rest)``: well ``i`` owns chunk ``i`` of every
  variable, so no two writers share a chunk and a rewrite replaces whole chunks with
  identical bytes (deterministic values, deterministic codecs) -- idempotent;
- :meth:`ResultsWriter.write_well` writes all of a well's variables, then ``done[i] = 1``:
  a crash between the two leaves the well not done, and a rerun rewrites it;
- a rerun of :func:`create_results` on the same layout reopens the store (resume), so
  :meth:`ResultsWriter.done_wells` tells the caller which wells to leave out *before*
  reading any pixels; it also removes the temporary files of chunk writes that a killed
  worker left behind (see :func:`sweep_interrupted_writes`).

Typical use (driver creates, workers write, driver finalizes)::

    writer = create_results(uri, wells_df, sizes={"field": 9, "class": 2},
                            variables=[Variable("well_scores", ("well", "class"), "float32")],
                            coords={"class": ["neg", "pos"]}, kind="results",
                            attrs={"model": "wscnn"}, overwrite=False)
    done = writer.done_mask()               # (n_wells,) bool, one listing
    todo = np.flatnonzero(~done).tolist()
    ...                                     # in workers: writer (pickles as uri+options)
    writer.write_well(i, {"well_scores": np.array([0.1, 0.9], "float32")})
    writer.finalize()                       # driver, once: consolidated metadata
    ds = open_results(uri)                  # xarray.Dataset
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import zarr
from zarr.core.sync import sync  # zarr's own event loop, where its stores' async I/O runs

from .errors import RayscreenError
from .plate import NAMESPACE
from .uri import filesystem, is_remote, local_path, make_store
from .wells import parse_well, well_name

WELL_DIM = "well"
DONE = "done"
RETRY = "retry"
_FLAGS = (DONE, RETRY)
LAYOUT_VERSION = 1


class NotAResultsStoreError(RayscreenError):
    """The output URI holds something that is not a rayscreen results store."""


class ResultsLayoutError(RayscreenError):
    """An existing results store was created for other wells, sizes or variables, or with
    other settings or annotations: resuming it would mix two runs."""


@dataclass(frozen=True)
class Variable:
    """One data variable: ``dims`` start with ``"well"``; ``fill`` is what unwritten
    chunks read as (default NaN for floats, 0 for integers). Float fills are also the
    xarray ``_FillValue`` (read as NaN); integer variables are never masked by xarray."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    fill: float | int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims or self.dims[0] != WELL_DIM:
            raise RayscreenError(f"results variable {self.name!r}: dims {self.dims} must start with 'well'")
        if self.name in _FLAGS or self.name == WELL_DIM:
            raise RayscreenError(f"results variable name {self.name!r} is reserved")
        if len(set(self.dims)) != len(self.dims):
            raise RayscreenError(f"results variable {self.name!r}: repeated dim in {self.dims}")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def fill_value(self):
        if self.fill is not None:
            return self.fill
        return np.nan if self.np_dtype.kind == "f" else 0

    def spec(self) -> dict[str, Any]:
        fill = self.fill_value
        return {"name": self.name, "dims": list(self.dims), "dtype": self.np_dtype.str,
                "fill": None if isinstance(fill, float) and np.isnan(fill) else fill}


def well_keys(wells: pd.DataFrame) -> list[str]:
    """``"<plate>/<well>"`` per row of a wells table (columns ``plate``, ``well``)."""
    return [f"{p}/{well_name(w)}" for p, w in zip(wells["plate"].astype(str), wells["well"].astype(str))]


def _coord_values(series: pd.Series) -> np.ndarray:
    """A 1-D coordinate array xarray/zarr v3 store portably: numbers stay numbers,
    everything else becomes variable-length strings (missing -> "")."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=bool)
    if pd.api.types.is_integer_dtype(series.dtype) and not series.isna().any():
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_numeric_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.array(["" if pd.isna(v) else str(v) for v in series], dtype=object)


def _layout_hash(keys: list[str], sizes: dict[str, int], variables: Sequence[Variable],
                 coords: dict[str, list]) -> str:
    blob = json.dumps({"v": LAYOUT_VERSION, "wells": keys, "sizes": dict(sorted(sizes.items())),
                       "variables": [v.spec() for v in variables],
                       "coords": {k: [str(x) for x in v] for k, v in sorted(coords.items())}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_root(uri: str, storage_options) -> zarr.Group:
    """The store's root group, read-only; missing chunks fill (coordinates are read whole)."""
    return zarr.open_group(store=make_store(uri, storage_options, read_only=True, strict=False), mode="r")


def _read_root_attrs(uri: str, storage_options) -> dict[str, Any] | None:
    """The root ``rayscreen`` attrs of a results store at ``uri``; None if nothing is there;
    raises NotAResultsStoreError if something else is there."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return None
    if fs.isdir(path) and not fs.ls(path):
        return None  # an empty directory is as good as nothing
    try:
        root = _open_root(uri, storage_options)
        ns = root.attrs.get(NAMESPACE)
    except (PermissionError, ConnectionError, TimeoutError) as e:  # not an answer about what is there
        raise RayscreenError(f"{uri}: cannot read it to see whether it is a results store "
                             f"({type(e).__name__}: {e})") from None
    except Exception:  # noqa: BLE001 -- anything else unreadable as a zarr group is "not ours"
        ns = None
    if not isinstance(ns, dict) or ns.get("kind") is None or "layout_hash" not in ns:
        raise NotAResultsStoreError(
            f"{uri} exists and is not a rayscreen results store; refusing to overwrite it "
            "(set overwrite: true in the stage's config section, e.g. --set infer.overwrite=true or "
            "--set profile.overwrite=true, to replace it)")
    return ns


def results_attrs(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The root ``rayscreen`` attributes of the results store at ``uri`` (one metadata read);
    None where nothing is there."""
    return _read_root_attrs(uri, storage_options)


def is_results_store(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    try:
        return _read_root_attrs(uri, storage_options) is not None
    except NotAResultsStoreError:
        return False


def create_results(
    uri: str,
    wells: pd.DataFrame,
    sizes: dict[str, int],
    variables: Sequence[Variable],
    *,
    coords: dict[str, Sequence] | None = None,
    kind: str = "results",
    attrs: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> "ResultsWriter":
    """Create a results store (or reopen it to resume) and return its writer.

    ``wells``: one row per well, in store order: columns ``plate``, ``well`` and any
    annotation columns (``Metadata_*``), each stored as a coordinate on dim ``well``
    (plus derived ``row`` letter and ``column`` number). ``sizes``: length of every
    non-well dim used by ``variables``. ``coords``: index coordinate values for those
    dims (default ``0..n-1``). ``attrs`` go under the root ``rayscreen`` attrs
    (model, checkpoint, config...). ``settings``: what the stored values are computed
    with (a model fingerprint, the stream's and the stage's settings; JSON-able), kept in
    the root attrs.

    An existing store with the same layout (wells, sizes, variables, coords, kind), the
    same ``settings`` and the same annotation values is reopened and keeps its done wells;
    anything else raises ``ResultsLayoutError`` naming what differs (resuming would mix two
    runs in one store), and a non-rayscreen object raises ``NotAResultsStoreError``, unless
    ``overwrite``, which deletes it first. A store whose creation was interrupted (no well
    can be done in it yet) is created again.
    """
    import dask.array as da
    import xarray as xr

    from .. import __version__

    if wells is None or len(wells) == 0:
        raise RayscreenError(f"results store {uri}: no wells to write")
    for col in ("plate", "well"):
        if col not in wells.columns:
            raise RayscreenError(f"results store {uri}: wells table needs a {col!r} column; has {list(wells.columns)}")
    wells = wells.reset_index(drop=True)
    keys = well_keys(wells)
    dup = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
    if dup:
        raise RayscreenError(f"results store {uri}: wells listed twice: {dup[:10]}")
    sizes = {str(k): int(v) for k, v in sizes.items()}
    names = [v.name for v in variables]
    if len(set(names)) != len(names):
        raise RayscreenError(f"results store {uri}: variables listed twice in {names}")
    for v in variables:
        missing = [d for d in v.dims[1:] if d not in sizes]
        if missing:
            raise RayscreenError(f"results variable {v.name!r}: no size given for dims {missing} (sizes: {sizes})")
    coords = {str(k): list(v) for k, v in (coords or {}).items()}
    for dim, values in coords.items():
        if dim not in sizes:
            raise RayscreenError(f"results store {uri}: coords for {dim!r}, which is not in sizes {sizes}")
        if len(values) != sizes[dim]:
            raise RayscreenError(f"results store {uri}: {len(values)} {dim!r} coordinate values for size {sizes[dim]}")
    layout_hash = _layout_hash(keys, sizes, variables, coords)
    settings = json.loads(json.dumps(settings or {}, default=str))  # as stored: lists, not tuples

    fs, path = filesystem(uri, storage_options)
    ns = None if overwrite else _read_root_attrs(uri, storage_options)
    if ns is not None and ns.get("layout_hash") is None:
        ns, overwrite = None, True  # its creation was interrupted: no worker has written to it
    if overwrite:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif ns is not None:
        if ns.get("kind") != kind or ns.get("layout_hash") != layout_hash:
            raise ResultsLayoutError(
                f"{uri} is a rayscreen {ns.get('kind')} store for other wells, sizes or variables "
                f"(this run: {kind}, {len(keys)} wells, sizes {sizes}; "
                f"{_layout_differences(uri, storage_options, ns, keys, variables)}); "
                "use a new output or set overwrite: true in the stage's config section (infer.overwrite, "
                "profile.overwrite)")
        changed = _changed_settings(ns.get("settings"), settings) + _changed_annotations(uri, storage_options, wells)
        if changed:
            raise ResultsLayoutError(
                f"{uri} was written with other settings or annotations: {'; '.join(changed)}. Resuming would mix "
                "two runs in one store; set overwrite: true in the stage's config section (or use a new output) "
                "to compute it again")
        sweep_interrupted_writes(uri)
        return ResultsWriter(uri, storage_options)

    used_dims = {d for v in variables for d in v.dims[1:]}
    ds_coords: dict[str, Any] = {WELL_DIM: np.array(keys, dtype=object)}
    ds_coords["plate"] = (WELL_DIM, np.array(wells["plate"].astype(str).tolist(), dtype=object))
    rows_cols = [parse_well(w) for w in wells["well"].astype(str)]
    ds_coords["row"] = (WELL_DIM, np.array([r for r, _ in rows_cols], dtype=object))
    ds_coords["column"] = (WELL_DIM, np.array([c for _, c in rows_cols], dtype=np.int64))
    for col in wells.columns:
        if col in ("plate", "well"):
            continue
        if col in ds_coords or col in sizes or col in names:
            raise RayscreenError(f"results store {uri}: annotation column {col!r} clashes with a dim, "
                                 "coordinate or variable name")
        ds_coords[col] = (WELL_DIM, _coord_values(wells[col]))
    for dim in sorted(used_dims):
        values = coords.get(dim, list(range(sizes[dim])))
        arr = np.array(values)
        ds_coords[dim] = arr.astype(object) if arr.dtype.kind in "UO" else arr

    n = len(keys)
    data_vars, encoding = {}, {}
    # the flags as variables of their own (their names are reserved for users' variables)
    flags = [(f, Variable(f"_{f}", (WELL_DIM,), "uint8", 0)) for f in _FLAGS]
    for name, v in [(v.name, v) for v in variables] + flags:
        shape = (n, *(sizes[d] for d in v.dims[1:]))
        chunks = (1, *shape[1:])
        # one dask chunk: to_zarr(compute=False) writes metadata only, and a graph of one task per
        # well and variable grows with the wells (15x slower at 20000: benchmarks/store_scale.py)
        data_vars[name] = (v.dims, da.full(shape, v.fill_value, dtype=v.np_dtype, chunks=shape), dict(v.attrs))
        if v.np_dtype.kind == "f":
            encoding[name] = {"_FillValue": v.fill_value, "chunks": chunks}
        else:
            # zarr's fill_value only: xarray must not turn integer flags into masked floats
            encoding[name] = {"_FillValue": None, "fill_value": v.fill_value, "chunks": chunks}
    data_vars[DONE][2].update({"flag_values": [0, 1], "flag_meanings": "not_written complete"})
    data_vars[RETRY][2].update({"flag_values": [0, 1], "flag_meanings": "final retry_on_rerun"})
    # layout_hash None until the whole skeleton is written: xarray writes the root attrs
    # first, and a creation cut short must not be taken for a store to resume
    root_attrs = {NAMESPACE: {"kind": kind, "version": __version__,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "layout_hash": None, "variables": [v.spec() for v in variables],
                              "settings": settings, "complete": False,
                              # filled by reopen_changed_plates; its absence marks an older store
                              "plate_versions": {},
                              # done/retry chunks stored only where the flag is 1 (listed, not read)
                              "flags_by_presence": True, **(attrs or {})}}
    ds = xr.Dataset(data_vars, coords=ds_coords, attrs=root_attrs)
    store = make_store(uri, storage_options, read_only=False, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(store, mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
    writer = ResultsWriter(uri, storage_options)
    writer.update_attrs(layout_hash=layout_hash)
    return writer


def _layout_differences(uri: str, storage_options, ns: dict[str, Any], keys: list[str],
                        variables: Sequence[Variable]) -> str:
    """What differs between a stored layout and this run's: wells and variables (sizes and
    coordinates show in the variables' shapes, which the message's caller states)."""
    root = _open_root(uri, storage_options)
    parts = []
    try:
        stored_keys = [str(k) for k in root[WELL_DIM][...].tolist()]
    except KeyError:
        stored_keys = []
    if stored_keys != keys:
        gone, new = sorted(set(stored_keys) - set(keys)), sorted(set(keys) - set(stored_keys))
        parts.append(f"the store has {len(stored_keys)} wells" + (f"; this run adds {new[:5]}" if new else "")
                     + (f"; drops {gone[:5]}" if gone else "")
                     + ("; the same wells in another order" if not new and not gone else ""))
    stored_vars = {v["name"]: v for v in ns.get("variables") or []}
    wanted = {v.name: v.spec() for v in variables}
    changed = sorted(n for n in set(stored_vars) | set(wanted) if stored_vars.get(n) != wanted.get(n))
    if changed:
        parts.append(f"variables that differ: {changed}")
    return "; ".join(parts) or "sizes or coordinates differ"


def _changed_settings(stored: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """``key (stored -> wanted)`` for every setting that differs; none for a store written
    before settings were recorded (nothing to compare)."""
    if stored is None:
        return []

    def same(a: Any, b: Any) -> bool:  # as JSON: NaN equals NaN, a tuple its list
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    return [f"{k} ({stored.get(k)!r} -> {wanted.get(k)!r})" for k in sorted(set(stored) | set(wanted))
            if not same(stored.get(k), wanted.get(k))]


def _changed_annotations(uri: str, storage_options, wells: pd.DataFrame) -> list[str]:
    """The annotation columns whose stored values differ from ``wells`` (added, removed or
    changed, with the first well that differs): the store's coordinates would be stale."""
    root = _open_root(uri, storage_options)
    wanted = [c for c in wells.columns if c not in ("plate", "well")]
    stored = set(root.array_keys())
    changed = [f"annotation {c} (new)" for c in wanted if c not in stored]
    changed += [f"annotation {c} (no longer given)" for c in sorted(stored)
                if c.startswith("Metadata_") and c not in wanted]
    keys = well_keys(wells)
    for c in wanted:
        if c not in stored:
            continue
        old = [str(v) for v in np.asarray(root[c][...]).tolist()]
        new = [str(v) for v in _coord_values(wells[c]).tolist()]
        if old != new:
            i = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            at = f"well {keys[i]}: {old[i]!r} -> {new[i]!r}" if i < min(len(old), len(new)) else "length"
            changed.append(f"annotation {c} ({at})")
    return changed


# zarr's LocalStore writes a chunk to "<chunk>.<uuid4 hex>.partial" and renames it into
# place; a worker killed between the two (SIGKILL, a lost node) leaves that file behind.
_INTERRUPTED_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def sweep_interrupted_writes(uri: str) -> list[str]:
    """Delete the temporary files of interrupted chunk writes under a local store; returns
    their paths. Readers ignore these files, but they are litter that would grow with every
    killed run. Object stores (S3) write a key in one request, so they have none and are not
    listed. Call it only while no worker writes to the store (the driver, before a rerun):
    a live write's temporary file would be removed under it and that write would fail."""
    if is_remote(uri):
        return []
    removed = []
    for dirpath, _, files in os.walk(local_path(uri)):
        for f in files:
            if _INTERRUPTED_WRITE.search(f):
                path = os.path.join(dirpath, f)
                try:
                    os.unlink(path)
                except FileNotFoundError:  # renamed into place by a writer still finishing
                    continue
                removed.append(path)
    return removed


def _flag_mask(store: Any, arr: zarr.Array, name: str, n_wells: int, by_presence: bool) -> np.ndarray:
    """(n_wells,) bool: where flag array ``arr`` (done, retry; at ``name`` in ``store``) is 1.
    Stores with ``flags_by_presence`` list the flag's chunk keys (one request per 1000 wells
    on S3); older ones read every chunk."""
    if not by_presence:
        return np.asarray(arr[...]) == 1
    prefix = f"{name}/{arr.metadata.encode_chunk_key((0,))[:-1]}"  # "done/c/" (key of chunk 0 minus "0")

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    listed = sync(keys())
    fs = getattr(store, "fs", None)
    if fs is not None:  # s3fs keeps every listed key in its directory cache (~650 B each) for good
        fs.invalidate_cache(f"{store.path}/{prefix}".rstrip("/"))
    flagged = np.zeros(n_wells, bool)
    for key in listed:
        tail = key[len(prefix):]
        # anything else under the prefix (a killed local write's temporary file) is no flag
        if key.startswith(prefix) and tail.isdigit() and int(tail) < n_wells:
            flagged[int(tail)] = True
    return flagged


def done_wells_mask(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """(n_wells,) bool of a results store's done wells, read-only (a report, a reader): by a
    listing of the done flags where the store has ``flags_by_presence``."""
    store = make_store(uri, storage_options, read_only=True, strict=False)
    root = zarr.open_group(store=store, mode="r")
    ns = root.attrs.get(NAMESPACE) or {}
    return _flag_mask(store, root[DONE], DONE, root[DONE].shape[0], bool(ns.get("flags_by_presence")))


class ResultsWriter:
    """Writes wells of an existing results store. Cheap to pickle (URI + options), so Ray
    workers each reopen it; arrays are opened lazily in the process that writes."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri).rstrip("/")
        self.storage_options = storage_options
        self._store = make_store(self.uri, storage_options, read_only=False, strict=False)
        self._root = zarr.open_group(store=self._store, mode="r+")
        ns = self._root.attrs.get(NAMESPACE)
        if not isinstance(ns, dict) or "layout_hash" not in ns:
            raise NotAResultsStoreError(f"{self.uri}: not a rayscreen results store")
        self.kind: str = ns["kind"]
        self.keys: list[str] = [str(k) for k in self._root[WELL_DIM][...].tolist()]
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.variables: dict[str, tuple[str, ...]] = {v["name"]: tuple(v["dims"]) for v in ns["variables"]}
        self.flags_by_presence: bool = bool(ns.get("flags_by_presence"))
        self._arrays: dict[str, zarr.Array] = {}

    def __getstate__(self):
        return {"uri": self.uri, "storage_options": self.storage_options}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["storage_options"])

    @property
    def n_wells(self) -> int:
        return len(self.keys)

    def index_of(self, plate: str, well: str) -> int:
        """Row of ``plate``/``well`` along dim ``well``; raises naming both if absent."""
        key = f"{plate}/{well_name(well)}"
        try:
            return self._index[key]
        except KeyError:
            raise RayscreenError(f"{self.uri}: plate {plate!r} well {well_name(well)} is not in this store") from None

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # data: every chunk stored even if it equals the fill (a present chunk means
            # "written"); flags: a 0 deletes the chunk, so the stored chunks are the 1s. Set
            # with with_config: open_array passes `config` only to an array it creates, and
            # zarr's global default (ZARR_ARRAY__WRITE_EMPTY_CHUNKS) is the user's to change
            self._arrays[name] = zarr.open_array(store=self._store, path=name, mode="r+").with_config(
                {"write_empty_chunks": name not in _FLAGS})
        return self._arrays[name]

    def _flagged(self, name: str) -> np.ndarray:
        """(n_wells,) bool: where flag ``name`` (done, retry) is 1 (:func:`_flag_mask`)."""
        return _flag_mask(self._store, self._array(name), name, self.n_wells, self.flags_by_presence)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of one well's block of variable ``name`` (its shape without the well dim)."""
        return tuple(self._array(name).shape[1:])

    def write_well(self, index: int, values: dict[str, np.ndarray], *, retry: bool = False) -> None:
        """Write every variable of well ``index`` (one chunk each), its retry flag, then its
        done flag.

        ``values`` must hold each variable of the store, shaped like the variable without
        its ``well`` dim, castable to its dtype. ``retry``: the well has fields a rerun should
        try again (a read error, no field on disk; :func:`rayscreen.store.plate.wells_to_retry`):
        :meth:`reopen_wells` looks only at such wells. The flag is set here and cleared only
        when the well is reopened (False leaves it as it is). Rewriting a well rewrites the
        same chunks with the same bytes (idempotent), so retries are harmless.
        """
        if not 0 <= index < self.n_wells:
            raise RayscreenError(f"{self.uri}: well index {index} outside 0..{self.n_wells - 1}")
        where = f"{self.uri} well {self.keys[index]}"
        missing = sorted(set(self.variables) - set(values))
        unknown = sorted(set(values) - set(self.variables))
        if missing or unknown:
            raise RayscreenError(f"{where}: write_well needs exactly the variables {sorted(self.variables)}; "
                                 f"missing {missing}, unknown {unknown}")
        prepared = {}
        for name, value in values.items():
            arr = self._array(name)
            value = np.asarray(value)
            if value.shape != arr.shape[1:]:
                raise RayscreenError(f"{where}: {name} has shape {value.shape}; expected {arr.shape[1:]} "
                                     f"(dims {self.variables[name][1:]})")
            prepared[name] = value.astype(arr.dtype, copy=False)
        for name in sorted(prepared):  # a fixed order: same keys written the same way every time
            self._array(name)[index] = prepared[name]
        # set, never cleared here: a clean well's write would otherwise send a DELETE per well
        # (and need delete rights, and leave a delete marker in a versioned bucket); a stale flag
        # costs one read on a rerun, whose select finds nothing to retry. _reopen clears it.
        if self.flags_by_presence and retry:  # older stores have none: reopen_wells reads all
            self._array(RETRY)[index] = 1
        self._array(DONE)[index] = 1  # last: the well counts as written only now

    def write_variable(self, name: str, indices: np.ndarray, values: np.ndarray) -> None:
        """Rewrite variable ``name`` of the done wells ``indices`` (k,) with ``values`` (k, ...),
        all at once (zarr writes the k chunks concurrently), leaving their other variables and
        flags as they are: for a stage that changes one variable of finished wells (QC's field
        statuses). Each well's chunk is replaced whole, so a rerun after a crash rewrites the
        same bytes."""
        indices = np.asarray(indices, np.int64)
        if not len(indices):
            return
        arr = self._array(name)
        values = np.asarray(values)
        if values.shape != (len(indices), *arr.shape[1:]):
            raise RayscreenError(f"{self.uri}: {name} values of shape {values.shape} for {len(indices)} wells; "
                                 f"expected {(len(indices), *arr.shape[1:])}")
        arr.set_orthogonal_selection((indices,), values.astype(arr.dtype, copy=False))

    def done_mask(self) -> np.ndarray:
        """(n_wells,) bool: True where the well's done flag is set."""
        return self._flagged(DONE)

    def values_at(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Variable ``name`` of the wells ``indices`` only (one chunk read per well), e.g. the
        ``done`` flags of one call's wells, where :meth:`done_mask` lists every well's."""
        return np.asarray(self._array(name).get_orthogonal_selection((np.asarray(indices, np.int64),)))

    def done_wells(self) -> list[int]:
        """Indices of wells whose data is complete (a rerun skips them)."""
        return np.flatnonzero(self.done_mask()).tolist()

    def reopen_wells(self, name: str, select: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     done: np.ndarray | None = None) -> list[int]:
        """Clear the done flag of every done well that ``select`` picks, and return their
        indices: a rerun computes them again. ``select(values, indices)``: ``values`` (k, -1)
        variable ``name`` of the done wells ``indices`` (k,) written with ``retry`` (in stores
        from before retry flags: every done well) -> (k,) bool. The stages use it for fields
        recorded as read errors (``on_error: skip``), which may have been transient (a dropped
        S3 connection), and for wells with no field at all (not on disk yet: an ingest still
        running). Cleared before anything is rewritten, so a crash during the rewrite leaves
        those wells not done rather than half old, half new.

        ``done``: the (n_wells,) mask of :meth:`done_mask`, updated here in place (the
        reopened wells become False), so that a stage start lists the done flags once (about
        400 requests at 384k wells on S3) for its reopen steps and its to-do list; listed
        here when not given."""
        done = self.done_mask() if done is None else done
        candidates = np.flatnonzero(done & self._flagged(RETRY)) if self.flags_by_presence else np.flatnonzero(done)
        hit = np.zeros(self.n_wells, bool)
        if len(candidates):
            values = self.values_at(name, candidates)
            hit[candidates] = np.asarray(select(values.reshape(len(candidates), -1), candidates), bool)
        return self._reopen(done, hit)

    def _reopen(self, done: np.ndarray, hit: np.ndarray) -> list[int]:
        reopened = np.flatnonzero(hit).tolist()
        if reopened:
            # first: a crash during the rewrite must not leave the store saying it is complete
            self.update_attrs(complete=False, n_done=int(done.sum()) - len(reopened))
            # one concurrent write each: the 0s delete the flags' chunks (a refit of every plate
            # cleared 384k flags one request after another). done first: a crash between the
            # two leaves a well not done with its retry flag, which its rewrite sets again anyway
            at = (np.asarray(reopened, np.int64),)
            self._array(DONE).set_orthogonal_selection(at, np.zeros(len(reopened), np.uint8))
            if self.flags_by_presence:
                self._array(RETRY).set_orthogonal_selection(at, np.zeros(len(reopened), np.uint8))
            done[at] = False
        return reopened

    def reopen_changed_plates(self, versions: dict[str, str | None],
                              done: np.ndarray | None = None) -> dict[str, int]:
        """Reopen the done wells of every plate whose ``versions`` entry differs from the one
        recorded with the store, then record ``versions``; returns ``{plate: wells reopened}``.

        A version stands for what a plate's values depend on outside the config (the stream's
        stored corrections of that plate, :func:`rayscreen.stream.normalize.corrections_version`):
        after a refit, wells scored before it would sit beside wells scored after it,
        corrected two ways, in one store. A plate with no recorded version (a store written
        before rayscreen recorded them) is taken as it is. Reopened before the new versions
        are recorded: a crash in between reopens them again, never keeps them. ``done``: as
        in :meth:`reopen_wells` (updated in place; listed here when needed and not given)."""
        ns = self._root.attrs.get(NAMESPACE, {})
        stored = ns.get("plate_versions") or {}
        unrecorded = "plate_versions" not in ns and bool(versions)
        changed = {p for p, v in versions.items() if p in stored and stored[p] != v}
        if done is None and (unrecorded or changed):  # listed only when it is needed
            done = self.done_mask()
        if unrecorded and done.any():
            warnings.warn(f"{self.uri} was written by a rayscreen that did not record the plates' corrections: "
                          "if `rayscreen illum` refitted a plate since its wells were written, they are kept "
                          "as they are (set the stage's overwrite: true, infer.overwrite or profile.overwrite, to "
                          "compute them again); later refits are noticed",
                          stacklevel=2)
        reopened: dict[str, int] = {}
        if changed:
            plates = [k.rpartition("/")[0] for k in self.keys]
            for i in self._reopen(done, done & np.array([p in changed for p in plates], bool)):
                reopened[plates[i]] = reopened.get(plates[i], 0) + 1
        self.update_attrs(plate_versions={**stored, **versions})
        if reopened:
            listed = ", ".join(f"{p!r} ({n} wells)" for p, n in sorted(reopened.items())[:10])
            warnings.warn(f"{self.uri}: {len(reopened)} plate(s) had their stored illumination or normalisation "
                          f"refitted (`rayscreen illum`) since their wells were written: {listed}"
                          f"{' ...' if len(reopened) > 10 else ''}; those wells are computed again", stacklevel=2)
        return reopened

    def update_attrs(self, **entries: Any) -> None:
        """Merge entries into the root ``rayscreen`` attrs (driver only; before finalize)."""
        ns = dict(self._root.attrs.get(NAMESPACE, {}))
        ns.update(entries)
        self._root.attrs.update({NAMESPACE: ns})

    def finalize(self, *, done: np.ndarray | None = None, **attrs: Any) -> None:
        """Once, in the driver, after every well is written: merge ``attrs`` (e.g. a
        finish time), mark the store complete if every well is done, and consolidate
        the metadata so that opening the store (on S3: one request) reads one document.
        ``done``: a :meth:`done_mask` the caller listed after the writes (listed here if not)."""
        done = self.done_mask() if done is None else done
        self.update_attrs(complete=bool(done.all()), n_done=int(done.sum()), **attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # consolidated metadata is a zarr-python v3 extension
            zarr.consolidate_metadata(self._store)


# wells per dask chunk where a stage reads a whole store (aggregate, report): zarr stores one
# well per chunk, and a dask task per well made graphs of 384k tasks per variable; a task of
# 1024 wells reads their chunks concurrently (field -> well means 4.2x faster at 20000 wells
# on local disk: benchmarks/store_scale.py)
READ_WELLS_PER_CHUNK = 1024


def open_results(uri: str, storage_options: dict[str, Any] | None = None, *, chunks: Any = None):
    """The results store at ``uri`` as an ``xarray.Dataset`` (lazy, dask-backed).

    Equivalent to ``xarray.open_zarr(uri)``; raises ``NotAResultsStoreError`` if ``uri``
    holds something else, and ``RayscreenError`` if there is nothing there.
    """
    import xarray as xr

    ns = _read_root_attrs(uri, storage_options)
    if ns is None:
        raise RayscreenError(f"{uri}: no results store there")
    if ns.get("layout_hash") is None:  # the skeleton's last write: some variables may be missing
        raise RayscreenError(f"{uri}: the store's creation was interrupted (it has no layout recorded); "
                             "run its stage again, which creates it afresh")
    store = make_store(uri, storage_options, read_only=True, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(store, consolidated=None, **({} if chunks is None else {"chunks": chunks}))
