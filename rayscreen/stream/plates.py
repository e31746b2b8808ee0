"""``read_plates(uris, ...) -> ray.data.Dataset``: the Ray glue around :mod:`.datasource`."""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any, Sequence

import numpy as np
from ray.data import Dataset, read_datasource
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..store import RayscreenError, open_plate
from ..store.uri import expand_uris
from .datasource import StreamOptions, WellTask, plan_wells, read_wells, split_tasks


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
    """Read tasks are contiguous groups of wells across all plates of a screen."""

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
            rows = len(group) * self._fields_per_well
            meta = BlockMetadata(num_rows=rows, size_bytes=int(rows * self._field_bytes), input_files=None,
                                 exec_stats=None)

            def read_fn(group=group):
                for batch in read_wells(group, options):
                    yield BlockAccessor.batch_to_block(batch)

            tasks.append(ReadTask(read_fn, meta, per_task_row_limit=per_task_row_limit))
        return tasks


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
) -> Dataset:
    """A Ray Dataset with one row per field (or tile) of the plates.

    Columns: ``image`` (C, Y, X), ``plate``, ``well``, ``field`` (+ ``tile_y``, ``tile_x``
    when ``tile`` is set) and every annotation column of the well (``Metadata_*``).
    Filters: ``wells``, ``fields``, ``channels`` (names or indices), ``where``
    (annotation column -> value or list of values). ``illumination``/``normalize`` apply
    the per-plate functions stored with each plate (float32 out). ``on_error="skip"``
    records bad fields under ``error_report`` (see ``load_error_report``) instead of failing.
    ``num_cpus``: CPUs each read task reserves (Ray's default 1 when None); a fraction lets
    reads share a node with CPU-bound consumers, e.g. training workers that keep whole CPUs.
    """
    if on_error not in ("raise", "skip"):
        raise RayscreenError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
    uris = expand_uris(uris, storage_options)
    if not uris:
        raise RayscreenError("read_plates: no plate URIs given")
    if on_error == "skip" and error_report is None:
        error_report = os.path.join(tempfile.gettempdir(), f"rayscreen-errors-{uuid.uuid4().hex[:8]}")
    tasks = plan_wells(uris, storage_options, wells, where, platemap)
    if not tasks:
        raise RayscreenError(f"read_plates: the filters leave no well to read in {len(uris)} plate(s)")
    first = open_plate(uris[0], storage_options)
    channel_names = first.channels
    for uri in uris[1:]:
        other = open_plate(uri, storage_options).channels
        if other != channel_names:
            raise RayscreenError(f"plates have different channels: {uris[0]} has {channel_names}, {uri} has {other}")
    if channels:
        first._channel_indices(channels)  # raises naming the missing channel
    c, y, x = first.shape
    n_channels = len(channels) if channels else c
    itemsize = 4 if (illumination or normalize) else np.dtype(dtype or first.dtype).itemsize
    field_bytes = n_channels * (y >> level) * (x >> level) * itemsize
    pair = (lambda v: None if v is None else (v, v) if isinstance(v, int) else tuple(v))
    options = StreamOptions(
        storage_options=storage_options,
        fields=tuple(str(f) for f in fields) if fields is not None else None,
        channels=tuple(channels) if channels else None,
        level=level, tile=pair(tile), stride=pair(stride), illumination=illumination, normalize=normalize,
        dtype=dtype, on_error=on_error, error_report=error_report,
        # blocks of ~16 MB: large enough to amortise per-block overhead, small enough to stream
        fields_per_block=max(1, int(16e6 // max(field_bytes, 1))),
    )
    fields_per_well = first.meta.field_count or len(first.fields(first._first_field[0]))
    if override_num_blocks is None:
        override_num_blocks = _default_num_tasks(len(tasks), len(tasks) * fields_per_well * field_bytes)
    ds = read_datasource(PlateDatasource(tasks, options, field_bytes, fields_per_well),
                         override_num_blocks=override_num_blocks, concurrency=concurrency, num_cpus=num_cpus)
    ds._rayscreen_error_report = error_report  # where skipped fields are recorded
    return ds
