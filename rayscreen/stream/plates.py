"""``read_plates(uris, ...) -> ray.data.Dataset``: the Ray glue around :mod:`.datasource`."""

from __future__ import annotations

import logging
import numbers
import os
import tempfile
import uuid
from typing import Any, Sequence

import numpy as np
from ray.data import Dataset, read_datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..store import RayscreenError, open_plate
from ..store.plate import warn_of_timepoints
from ..store.uri import expand_uris
from .datasource import (READ_THREADS, StreamOptions, WellTask, in_threads, plan_wells, raw_field_bytes, read_wells,
                         split_tasks)
from .tiling import tile_positions

log = logging.getLogger(__name__)


# Read tasks carry at least this much decompressed data when the cluster has enough
# tasks without going smaller: each task opens its plates and loads their corrections
# (tens of ms), which Ray's default of 200 read tasks would pay 200 times on a small screen.
MIN_TASK_BYTES = 64 * 1024**2


def _default_num_tasks(n_wells: int, total_bytes: int) -> int | None:
    """Read tasks for a screen: at least 2 per CPU of the cluster (so every core has work
    and one task is always queued behind the running one), more when that would make a task
    larger than ``MIN_TASK_BYTES``; never more than one per well. ``None`` (Ray decides)
    when Ray is not running yet."""
    import ray

    if not ray.is_initialized():
        return None
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(n_wells, max(2 * cpus, -(-total_bytes // MIN_TASK_BYTES))))


class PlateDatasource(Datasource):
    """Read tasks are contiguous groups of wells across all plates of a screen.

    ``field_bytes``: what one field streams out (all its tiles), an estimate for Ray's
    memory planning. Row counts are left unknown (``num_rows=None``), since Ray's
    ``count()`` trusts them: the plate's ``field_count`` is only the most fields a well
    has, wells may be missing on disk, and skipped fields are not streamed, so no count
    made from metadata alone is exact.
    """

    def __init__(self, wells: list[WellTask], options: StreamOptions, field_bytes: int, fields_per_well: int):
        self._wells = wells
        self._options = options
        self._field_bytes = field_bytes
        self._fields_per_well = fields_per_well

    def get_name(self) -> str:
        return "ReadPlates"

    def estimate_inmemory_data_size(self) -> int:
        return len(self._wells) * self._fields_per_well * self._field_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        tasks = []
        options = self._options
        for group in split_tasks(self._wells, parallelism):
            n_fields = len(group) * self._fields_per_well
            meta = BlockMetadata(num_rows=None, size_bytes=int(n_fields * self._field_bytes), input_files=None,
                                 exec_stats=None)

            def read_fn(group=group):
                for batch in read_wells(group, options):
                    yield BlockAccessor.batch_to_block(batch)

            tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def _row_layout(plate, level: int, n_channels: int, tile: tuple[int, int] | None,
                stride: tuple[int, int] | None, dtype: np.dtype | None) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype) of the images a plate streams and its tiles per field, from the metadata
    of its first field (rayscreen plates share one field shape). Raises naming ``stream.tile``
    and the plate, well and field when a tile does not fit in the field."""
    well, field = plate._first_field
    arr = plate._array(well, field, level)  # raises naming the plate when it has no such level
    dims = dict(zip(plate.multiscale(well, field).axis_names, arr.shape))
    y, x = dims["y"], dims["x"]
    warn_of_timepoints(plate)
    dtype = dtype if dtype is not None else np.dtype(arr.dtype)
    if tile is None:
        return (n_channels, y, x), dtype, 1
    if tile[0] > y or tile[1] > x:
        raise RayscreenError(f"stream.tile {tile}: larger than the fields of plate {plate.name!r} ({plate.uri}): "
                             f"well {well} field {field} is {y} x {x} pixels at level {level}; expected a tile "
                             "of at most the field's size")
    return (n_channels, *tile), dtype, len(tile_positions((y, x), tile, stride))


class _Failed:
    """An error kept to be raised later, in the order of a sequential loop."""

    def __init__(self, error: BaseException):
        self.error = error


def _outcome(fn) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - raised again by _result, in order
        return _Failed(e)


def _result(value: Any) -> Any:
    if isinstance(value, _Failed):
        raise value.error
    return value


def read_plates(
    uris: str | Sequence[str],
    *,
    storage_options: dict[str, Any] | None = None,
    wells: Sequence[str] | None = None,
    fields: Sequence[str | int] | None = None,
    channels: Sequence[str | int] | None = None,
    where: dict[str, Any] | None = None,
    platemap=None,
    level: int = 0,
    tile: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    illumination: bool = False,
    normalize: bool = False,
    dtype: str | None = None,
    on_error: str = "raise",
    error_report: str | None = None,
    override_num_blocks: int | None = None,
    concurrency: int | None = None,
    num_cpus: float | None = None,
    saturation: bool = False,
    read_threads: int = READ_THREADS,
) -> Dataset:
    """A Ray Dataset with one row per field (or tile) of the plates.

    Columns: ``image`` (C, Y, X), ``plate``, ``well``, ``field`` (+ ``tile_y``, ``tile_x``
    when ``tile`` is set) and every annotation column of the well (``Metadata_*``).
    Filters: ``wells`` (well names, on every plate; or ``(plate name, well)`` pairs, as a
    resumed stage asks for the wells it has still to do), ``fields``, ``channels`` (names or indices), ``where``
    (annotation column -> value or list of values). ``illumination``/``normalize`` apply
    the per-plate functions stored with each plate (float32 out). ``on_error="skip"``
    records bad fields under ``error_report`` (see ``load_error_report``) instead of failing.
    ``saturation``: also a ``saturation`` column (C,), each channel's fraction of raw pixels at
    the detector's maximum, measured before the corrections (QC).
    ``read_threads``: fields each read task reads at once, ahead of the one it yields (object
    stores answer each request in tens of milliseconds; 1 reads one field after another).
    ``num_cpus``: CPUs each read task reserves (Ray's default 1 when None); a fraction lets
    reads share a node with CPU-bound consumers, e.g. training workers that keep whole CPUs.
    """
    if on_error not in ("raise", "skip"):
        raise RayscreenError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    if read_threads < 1:
        raise RayscreenError(f"read_threads={read_threads}: expected at least 1 (1 = one field after another)")
    uris = expand_uris(uris, storage_options)
    if not uris:
        raise RayscreenError("read_plates: no plate URIs given")
    if on_error == "skip" and error_report is None:
        import ray

        error_report = os.path.join(tempfile.gettempdir(), f"rayscreen-errors-{uuid.uuid4().hex[:8]}")
        # read tasks write their reports where they run: a local temp dir is the driver's only
        # on a one-node cluster; on several nodes each node keeps its own part
        several = ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1
        (log.warning if several else log.info)(
            "read_plates: skipped fields are recorded under %s%s", error_report,
            " on each node that read them; pass error_report= a URI every node can write (S3, a shared "
            "filesystem) to collect them" if several else "")
    pairs = None
    if wells is not None and any(isinstance(w, (tuple, list)) for w in wells):
        from ..store.wells import well_name

        pairs = {(str(p), well_name(w)) for p, w in wells}
        wells = sorted({w for _, w in pairs})
    tasks = plan_wells(uris, storage_options, wells, where, platemap)
    if pairs is not None:
        tasks = [t for t in tasks if (t.plate, t.well) in pairs]
    if not tasks:
        raise RayscreenError(f"read_plates: the filters leave no well to read in {len(uris)} plate(s)")
    pair = (lambda v: None if v is None else (int(v), int(v)) if isinstance(v, numbers.Integral)
            else tuple(int(x) for x in v))
    tile, stride = pair(tile), pair(stride)
    if stride is not None and tile is None:
        raise RayscreenError(f"stream.stride {stride}: a stride needs a tile size (stream.tile); "
                             "whole fields have no stride")
    if tile is not None:
        try:  # positive sizes, stride at most the tile: checked on a field of exactly one tile
            tile_positions(tile, tile, stride)
        except ValueError as e:
            raise RayscreenError(f"stream.tile {tile}, stream.stride {stride}: {e}") from None
    first = open_plate(uris[0], storage_options)
    if channels:
        first._channel_indices(channels)  # raises naming the missing channel
    if fields is not None:
        # checked from metadata of one well and the plate's field_count, not every well: a
        # filter matching neither most likely names fields another way (other tools' plates
        # may not count from 0) and would stream nothing, silently
        well0 = first._first_field[0]
        have = [str(f) for f in first.fields(well0)]
        counted = [str(i) for i in range(first.meta.field_count or 0)]
        if not set(map(str, fields)) & set(have + counted):
            raise RayscreenError(f"read_plates: fields={list(fields)} match no field of plate {first.name!r}: well "
                                 f"{well0} has fields {have}" + (f", and its field_count is {len(counted)}"
                                                                 if counted else ""))
    n_channels = len(channels) if channels else len(first.channels)
    out_dtype = np.dtype(dtype) if dtype else np.dtype("float32") if (illumination or normalize) else None
    # every plate against the first, from metadata only (no pixels read): rows are keyed by
    # (plate, well, field), and a block stacks its rows' images into one array
    def prepare(uri: str) -> tuple[Any, Any, Any]:
        # the requests of each plate (root, first well's and field's metadata, its array's),
        # made in threads; what failed is kept and raised in the checks below, so they raise
        # the same first error as a plain loop over the plates would
        plate = first if uri == uris[0] else open_plate(uri, storage_options)
        plate_channels = _outcome(lambda: plate.channels)
        layout = _outcome(lambda: _row_layout(plate, level, n_channels, tile, stride, out_dtype))
        return plate, plate_channels, layout

    seen: dict[str, str] = {}
    # (not named `channels`: that is the caller's channel filter, used below)
    for uri, (plate, plate_channels, layout) in zip(uris, in_threads(prepare, uris)):
        if _result(plate_channels) != first.channels:
            raise RayscreenError(f"plates have different channels: {uris[0]} has {first.channels}, "
                                 f"{uri} has {plate_channels}")
        if plate.name in seen:
            raise RayscreenError(f"plates {seen[plate.name]} and {uri} are both named {plate.name!r}; one stream "
                                 "keys its rows by (plate, well, field), so their wells would be ambiguous")
        seen[plate.name] = uri
        layout = _result(layout)
        if plate is first:
            row_shape, row_dtype, tiles_per_field = layout
        elif layout[:2] != (row_shape, row_dtype):
            what, fix = ("shapes", "tile them (stream.tile)") if layout[0] != row_shape else ("dtypes", "cast (dtype=)")
            raise RayscreenError(
                f"plates {first.name!r} ({uris[0]}) and {plate.name!r} ({uri}) stream images of different {what}: "
                f"{row_shape} {row_dtype} and {layout[0]} {layout[1]} (C, Y, X at level {level}); a block stacks "
                f"its images into one array, so read them in separate streams or {fix}")
    row_bytes = int(np.prod(row_shape)) * row_dtype.itemsize
    field_bytes = tiles_per_field * row_bytes
    options = StreamOptions(
        storage_options=storage_options,
        fields=tuple(str(f) for f in fields) if fields is not None else None,
        channels=tuple(channels) if channels else None,
        level=level, tile=tile, stride=stride, illumination=illumination, normalize=normalize,
        dtype=dtype, on_error=on_error, error_report=error_report, saturation=saturation,
        read_threads=read_threads, field_bytes=raw_field_bytes(first, channels),
        # blocks of ~16 MB: large enough to amortise per-block overhead, small enough to stream
        # (it counts rows: fields, or tiles when tiling)
        fields_per_block=max(1, int(16e6 // max(row_bytes, 1))),
    )
    fields_per_well = first.meta.field_count or len(first.fields(first._first_field[0]))
    if fields is not None:
        fields_per_well = min(fields_per_well, len(set(options.fields)))
    if override_num_blocks is None:
        override_num_blocks = _default_num_tasks(len(tasks), len(tasks) * fields_per_well * field_bytes)
    ds = read_datasource(PlateDatasource(tasks, options, field_bytes, fields_per_well),
                         override_num_blocks=override_num_blocks, concurrency=concurrency, num_cpus=num_cpus)
    ds._rayscreen_error_report = error_report  # where skipped fields are recorded
    return ds
