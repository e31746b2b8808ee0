"""A Ray Data ``Datasource`` over OME-Zarr HCS plates: one row per field (or tile).

Planning happens on the driver and reads only each plate's root metadata (wells and
annotations). The unit of work is a well: a read task carries a list of
(plate URI, well, annotation values) and nothing else about the screen, opens its own
filesystem, reads the well's metadata and streams its fields out in small blocks, so no
process ever holds a whole plate. Wells of one plate are kept together in a task
(chunks of a field never span wells, so tasks never share a chunk).

Bad data mid-stream: ``on_error="raise"`` (default) fails the job with an error naming
plate/well/field; ``on_error="skip"`` records each bad field (and each well missing on
disk) as one JSON line under ``error_report`` and streams on, so every field is either
read or reported. Wells listed but absent on disk (sparse plates of other tools) are always
reported, never fatal; in a plate rayscreen wrote, such a well is an ingest cut short
(``IncompleteWellError``), which fails the job unless ``on_error="skip"``. Settings the data cannot meet (a tile larger than a field, fields of
different shapes in one batch) are not bad data: they fail the job in either mode.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pandas as pd

from ..store import BadImageError, IncompleteWellError, MissingWellError, RayscreenError, open_plate
from ..store.uri import filesystem

ROW_KEYS = ("plate", "well", "field")
T = TypeVar("T")
R = TypeVar("R")


# Concurrent field reads per read task: on an object store each field is a few sequential
# requests (image group, array metadata, chunks) of tens of milliseconds each, against a few
# milliseconds of decoding, so a task reading one field after another mostly waits
# (benchmarks/s3_read.py). Threads, not asyncio: Plate.read is zarr's synchronous API, which
# hands the requests to zarr's own event loop and waits, so the threads only wait.
READ_THREADS = 8
# ... and at most this many bytes of raw fields ahead per read task: 8 full-resolution fields
# of 5 x 2160 x 2160 uint16 would be 370 MB in every read task, which Ray Data's memory
# accounting does not see. A large field's chunks are fetched concurrently by zarr anyway.
READ_AHEAD_BYTES = 256 * 2**20


@dataclass(frozen=True)
class StreamOptions:
    """What every read task needs besides its wells (small: travels with each task)."""

    storage_options: dict[str, Any] | None = None
    fields: tuple[str, ...] | None = None
    channels: tuple[str | int, ...] | None = None
    level: int = 0
    tile: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    illumination: bool = False
    normalize: bool = False
    dtype: str | None = None  # cast (e.g. "float32"); corrections always give float32
    on_error: str = "raise"
    error_report: str | None = None
    fields_per_block: int = 4
    # also a "saturation" column (C,): the fraction of each channel's raw pixels at the
    # detector's maximum, measured before the corrections (which divide it away)
    saturation: bool = False
    # fields read at once, ahead of the one being yielded (see READ_THREADS); 1 = one after another
    read_threads: int = READ_THREADS
    # raw bytes of a field as read (channels read, level 0), known to the planner: read tasks
    # then need not open a field's metadata to bound their read-ahead (None: they do)
    field_bytes: int | None = None


@dataclass(frozen=True)
class WellTask:
    plate_uri: str
    plate: str
    well: str
    annotations: dict[str, Any] = field(default_factory=dict)


def plan_wells(uris: Sequence[str], storage_options=None, wells: Sequence[str] | None = None,
               where: dict[str, Any] | None = None, platemap=None) -> list[WellTask]:
    """Wells to read, in plate then well order, with their annotations; filters applied.

    ``where`` maps an annotation column to a value or a list of values to keep.
    Raises naming the column when a filter names a column no plate has.
    """
    from ..store.wells import well_name

    keep_wells = {well_name(w) for w in wells} if wells else None

    def plan(uri: str) -> list[WellTask]:
        plate = open_plate(uri, storage_options, platemap=platemap)
        ann = plate.annotations
        for col, values in (where or {}).items():
            if col not in ann.columns:
                raise RayscreenError(f"filter on annotation column {col!r}: plate {plate.name!r} has "
                                     f"columns {list(ann.columns)}")
            values = values if isinstance(values, (list, tuple, set)) else [values]
            ann = ann[ann[col].isin(list(values))]
        if keep_wells is not None:
            ann = ann[ann["Metadata_Well"].isin(keep_wells)]
        return [WellTask(plate.uri, plate.name, rec["Metadata_Well"],
                         {k: _plain(v) for k, v in rec.items() if k not in ("Metadata_Plate",)})
                for rec in ann.to_dict("records")]

    out = [task for tasks in in_threads(plan, uris) for task in tasks]
    # plates may have different annotation columns: every well carries them all (None where its
    # plate has none, as for a missing value), so every block of the stream has one schema
    columns = list(dict.fromkeys(k for task in out for k in task.annotations))
    return [WellTask(t.plate_uri, t.plate, t.well, {k: t.annotations.get(k) for k in columns}) for t in out]


def check_plate_set(plates: Sequence[tuple[str, Any]], wanted: Sequence[str] | None = None, *,
                    error: type[Exception] = RayscreenError) -> list[str]:
    """The channels a run over ``plates`` (``(uri, plate)`` pairs in config order; a plate is
    anything with ``.name`` and ``.channels``) streams: ``wanted`` (``stream.channels``) when
    given, else the plates' channels. Checked on metadata, before any work, as the stream
    will need them: every plate has the same channels in the same order (a block stacks its
    fields into one array), no two plates share a name (results are keyed by plate and well),
    and every wanted channel is there. Raises ``error`` naming the plates' URIs and the
    clashing name or the missing channel.

    The profile and train planners share it (train passes its ``ConfigError``)."""
    channels: list[str] | None = None
    first_uri = ""
    seen: dict[str, str] = {}
    for uri, plate in plates:
        if plate.name in seen:
            raise error(f"plates: {seen[plate.name]} and {uri} are both named {plate.name!r} (their NGFF name); "
                        "wells are keyed by plate name and well, so theirs would be ambiguous")
        seen[plate.name] = uri
        if channels is None:
            channels, first_uri = list(plate.channels), uri
        elif list(plate.channels) != channels:
            lacking = [c for c in (wanted or channels) if c not in plate.channels]
            raise error(f"plates: {first_uri} has channels {channels} but {uri} has {list(plate.channels)}"
                        f"{f' (it lacks {lacking})' if lacking else ''}; one run needs one channel set")
    if not wanted:
        return channels or []
    missing = [c for c in wanted if c not in (channels or [])]
    if missing:
        uris = [u for u, _ in plates]
        listed = ", ".join(uris[:5]) + (f" and {len(uris) - 5} more" if len(uris) > 5 else "")
        raise error(f"stream.channels: {missing} not in the plates' channels {channels} (plates {listed})")
    return list(wanted)


# Plates opened at once while planning: each open is a few small requests (root metadata,
# annotations), so 1000 plates on S3 opened one after another took minutes before any work
# started; the threads wait on the network, not the GIL.
PLANNING_THREADS = 16


def in_threads(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, run in up to ``threads`` threads, yielded in the order of
    ``items`` - as ``map(fn, items)`` would, errors included: the error of an item is raised
    when its turn comes (so the first failing item in order raises, as in a plain loop, with
    its own message naming its plate), and the items not started yet are cancelled.
    ``threads``: default ``PLANNING_THREADS``."""
    items = list(items)
    threads = PLANNING_THREADS if threads is None else threads
    if len(items) <= 1 or threads <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="rayscreen-plan")
    try:
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        # on an error (or a caller that stops early) do not wait for every plate still queued
        pool.shutdown(wait=False, cancel_futures=True)


def open_plates(uris: Sequence[str], storage_options: dict[str, Any] | None = None, *,
                platemap=None) -> list[Any]:
    """The plates at ``uris``, opened in the planning threads with their layout read
    (channels, shape: a few small requests each, which a planner then asks for plate after
    plate); errors raised in the order of ``uris``."""

    def opened(uri: str):
        plate = open_plate(uri, storage_options, platemap=platemap)
        plate.channels  # noqa: B018 -- reads (and caches) the plate's layout here, in the thread
        return plate

    return list(in_threads(opened, uris))


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def _report(options: StreamOptions, record: dict[str, Any]) -> None:
    if options.error_report is None:
        return
    fs, path = filesystem(options.error_report, options.storage_options)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{report_file_name(record)}", "w") as f:
        f.write(json.dumps(record))


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe(part: Any, limit: int = 48) -> str:
    return _UNSAFE.sub("_", str(part))[:limit] or "_"


def report_file_name(record: dict[str, Any]) -> str:
    """The file name of one error-report record: ``<plate>-<hash>_<well>_<field>_<uuid>.json``.

    The plate name comes from the plate's own metadata and may hold anything: '/' (a
    legitimate 'screen1/plateA' made the open fail) or '../..' (wrote outside the report
    directory). So every part is cut to letters, digits, '_' and '-' (no dots: no '..',
    no hidden files), and a hash of the real plate name keeps plates whose names sanitise
    alike apart; the real names stay in the JSON record, which is what load_error_report
    reads. The uuid keeps the reports of one field by retried tasks from overwriting each
    other."""
    plate = str(record["plate"])
    digest = hashlib.sha1(plate.encode()).hexdigest()[:8]
    field = record.get("field")
    return (f"{_safe(plate)}-{digest}_{_safe(record['well'])}_{_safe('well' if field is None else field)}_"
            f"{uuid.uuid4().hex[:8]}.json")


def load_error_report(error_report: str, storage_options=None) -> pd.DataFrame:
    """The fields (and wells) that a stream could not read: plate, well, field, kind, error."""
    fs, path = filesystem(error_report, storage_options)
    cols = ["plate", "well", "field", "kind", "error"]
    if not fs.exists(path):
        return pd.DataFrame(columns=cols)
    records = [json.loads(fs.cat(p)) for p in sorted(fs.find(path)) if p.endswith(".json")]
    df = pd.DataFrame(records, columns=cols).astype(object)
    df = df.where(df.notna(), None)
    # a retried task may report the same field twice: one line per field
    return df.drop_duplicates(["plate", "well", "field", "kind"]).sort_values(["plate", "well", "field"],
                                                                             na_position="first").reset_index(drop=True)


LOADED_PLATES = 2  # plates whose corrections a worker process keeps


@functools.lru_cache(maxsize=LOADED_PLATES)
def _loaded_corrections(plate_uri: str, channel_idx: tuple[int, ...] | None, shape: tuple[int, int],
                        illumination: bool, normalize: bool, level: int, storage_options: str,
                        version: str) -> tuple[Any, Any]:
    """(illumination function restricted to ``channel_idx`` and resampled to ``shape``, or
    None; normaliser of those channels, or None) of a plate, kept by this worker process
    across read tasks and infer calls: a full-resolution read task holds one well
    (MIN_TASK_BYTES) and an infer actor reads one well per call, and each loaded the plate's
    illumination function (110 MB for 5 x 2160 x 2560) again. ``version`` (the stored
    corrections' digest) is only a key: a refit is loaded afresh. ``storage_options`` is JSON
    (a key must be hashable). Two threads may load the same plate at once; both get its values."""
    from .illumination import illumination_at, load_illumination
    from .normalize import stream_normalizer

    options = json.loads(storage_options)
    illum = norm = None
    if illumination:
        illum = load_illumination(plate_uri, options)
        if illum is None:
            raise RayscreenError(f"plate {plate_uri}: no illumination function stored; "
                                 "run `rayscreen illum` on it first")
        illum = illumination_at(illum if channel_idx is None else illum[list(channel_idx)], shape)
    if normalize:
        norm = stream_normalizer(plate_uri, options, illumination=illumination, level=level)
        if channel_idx is not None:
            norm = norm.select(list(channel_idx))
    return illum, norm


class _Corrections:
    """Per-plate illumination and normalisation, loaded once per plate per worker process
    (:func:`_loaded_corrections`) already restricted to the streamed channels and resampled
    to the streamed level.

    Applied as ``normalizer.transform(correct(field, illum))``: the same functions, so a
    streamed field equals those calls on ``open_plate(uri).read(well, field)``.
    """

    def __init__(self, options: StreamOptions):
        self.options = options

    def __call__(self, plate: Any, image: np.ndarray, channel_idx: list[int] | None) -> np.ndarray:
        """``image`` (C, Y, X) of ``plate`` (an open :class:`~rayscreen.store.plate.Plate`)
        corrected: float32 (C, Y, X), or cast to ``options.dtype``."""
        from .normalize import corrections_digest

        o = self.options
        if not (o.illumination or o.normalize):
            return image.astype(o.dtype) if o.dtype else image
        illum, norm = _loaded_corrections(
            plate.uri, None if channel_idx is None else tuple(channel_idx), tuple(image.shape[-2:]),
            o.illumination, o.normalize, o.level, json.dumps(o.storage_options or {}, sort_keys=True, default=str),
            corrections_digest(plate.rayscreen_attrs(), illumination=o.illumination, normalize=o.normalize))
        out = image
        if illum is not None:
            from .illumination import correct

            out = correct(out, illum)
        if norm is not None:
            out = norm.transform(out)
        out = out if out.dtype == np.float32 else out.astype(np.float32)
        return out.astype(o.dtype, copy=False) if o.dtype else out


def _field_items(tasks: list[WellTask], options: StreamOptions, plate_of: Callable[[str], Any]
                 ) -> Iterator[tuple[str, WellTask, Any, Any]]:
    """The work of ``tasks`` in order, one item per field: ``("field", task, plate, field)``;
    ``("well", task, None, error)`` for a well that cannot be read as a whole, which the
    consumer reports or raises in its turn; ``("fatal", task, None, error)`` for an error
    that fails the read whatever ``on_error`` says. Reads each well's metadata (one request).
    Errors travel as items so that they surface after the fields before them, as in a loop."""
    for task in tasks:
        try:
            plate = plate_of(task.plate_uri)
        except Exception as e:  # noqa: BLE001 -- raised by the consumer in its turn
            yield "fatal", task, None, e
            return
        try:
            plate.well_meta(task.well)
        except RayscreenError as e:  # MissingWellError, or malformed well metadata
            yield "well", task, None, e
            continue
        except Exception as e:  # noqa: BLE001 -- a storage error (after s3fs's retries): in its turn
            yield "fatal", task, None, e
            return
        try:
            fields = plate.fields(task.well)
        except Exception as e:  # noqa: BLE001 -- e.g. a well of several acquisitions: a setting to change
            yield "fatal", task, None, e
            return
        if options.fields is not None:
            fields = [f for f in fields if f in options.fields]
        for f in fields:
            yield "field", task, plate, f


def _read_field(item: tuple[str, WellTask, Any, Any], options: StreamOptions
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw image (C, Y, X) in the stored dtype, saturation (C,) or None) of a field item."""
    _, task, plate, f = item
    image = plate.read(task.well, f, options.level, channels=options.channels)
    return image, (raw_saturation(image) if options.saturation else None)


def prefetched(fn: Callable[[T], R], items: Iterable[T], threads: int, wanted: Callable[[T], bool] = lambda _: True
               ) -> Iterator[tuple[T, "Future[R] | None"]]:
    """``(item, future of fn(item))`` in the order of ``items``, with ``fn`` running in up to
    ``threads`` threads on the items ahead of the consumer: at most ``threads`` items are
    submitted and not yet taken, so memory stays bounded however long ``items`` is. Items
    ``wanted`` rejects pass through with ``None``. ``items`` is drawn in the caller's thread.
    With ``threads`` <= 1, ``fn`` runs in the caller's thread when the item's turn comes."""
    if threads <= 1:
        for item in items:
            yield item, (_done(fn, item) if wanted(item) else None)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rayscreen-read")
    window: collections.deque = collections.deque()
    try:
        for item in items:
            window.append((item, pool.submit(fn, item) if wanted(item) else None))
            if len(window) >= threads:
                yield window.popleft()
        while window:
            yield window.popleft()
    finally:
        # a consumer that stops (an error, a closed generator) does not wait for reads queued ahead
        pool.shutdown(wait=False, cancel_futures=True)


def _done(fn: Callable[[T], R], item: T) -> "Future[R]":
    future: Future = Future()
    try:
        future.set_result(fn(item))
    except BaseException as e:  # noqa: BLE001 -- handed to the consumer, as a pool's future would
        future.set_exception(e)
    return future


def read_ahead(tasks: list[WellTask], options: StreamOptions, plate_of: Callable[[str], Any]) -> int:
    """Fields to read at once for ``tasks``: ``options.read_threads``, fewer where that many
    raw fields (``options.field_bytes``, else of the first plate: level 0, the channels read)
    would pass :data:`READ_AHEAD_BYTES`; 1 when the plate cannot be opened (its error comes in
    turn)."""
    if options.read_threads <= 1 or not tasks:
        return 1
    field_bytes = options.field_bytes
    if field_bytes is None:
        try:
            field_bytes = raw_field_bytes(plate_of(tasks[0].plate_uri), options.channels)
        except Exception:  # noqa: BLE001 -- reported by the read itself, in order
            return 1
    return int(max(1, min(options.read_threads, READ_AHEAD_BYTES // max(field_bytes, 1))))


def raw_field_bytes(plate: Any, channels: Sequence[Any] | None) -> int:
    """Bytes of one field of ``plate`` as stored (level 0, the ``channels`` read, or all)."""
    c, y, x = plate.shape
    return (len(channels) if channels else c) * y * x * plate.dtype.itemsize


def read_wells(tasks: list[WellTask], options: StreamOptions, *,
               plate_of: Callable[[str], Any] | None = None) -> Iterable[dict[str, Any]]:
    """Yield row batches (dicts of columns) for the fields of ``tasks``. Pure Python, no Ray:
    the read task's body, also usable directly (tests, single-process baselines).
    ``plate_of``: plate URI -> open Plate, for a caller that reads many calls' wells and keeps
    its plates open (an infer actor), so each plate's metadata is read once, not once per call;
    by default each plate is opened once per call.

    Fields are read ``options.read_threads`` at a time (fewer for large fields: see
    :func:`read_ahead`), ahead of the one being yielded; rows, reports and errors come in the
    order of a plain loop over wells and fields."""
    if plate_of is None:
        plate_of = functools.lru_cache(maxsize=None)(lambda uri: open_plate(uri, options.storage_options))
    correct = _Corrections(options)
    rows: list[dict[str, Any]] = []
    items = _field_items(tasks, options, plate_of)
    threads = read_ahead(tasks, options, plate_of)
    for (kind, task, plate, f), future in prefetched(functools.partial(_read_field, options=options), items,
                                                     threads, wanted=lambda item: item[0] == "field"):
        if kind == "fatal":
            raise f
        if kind == "well":
            e = f
            if isinstance(e, MissingWellError):
                raise_unless_skipping(e, options.on_error)
                report_left_out(options, task, None, e, "missing well")
            else:
                # malformed well metadata (a foreign plate's, e.g. an image path '../../B/1/0'): bad
                # data like an unreadable field, so skipped and reported as the whole well
                if options.on_error != "skip":
                    raise e
                report_left_out(options, task, None, e)
            continue
        channel_idx = plate._channel_indices(options.channels) if options.channels else None
        try:
            image, saturated = future.result()
            image = correct(plate, image, channel_idx)
        except RayscreenError as e:
            if options.on_error != "skip":
                raise
            report_left_out(options, task, f, e)
            continue
        base = {"plate": task.plate, "well": task.well, "field": f, **task.annotations}
        if saturated is not None:
            base["saturation"] = saturated
        if options.tile:
            from .tiling import tiles

            # a settings/data mismatch, not an unreadable field: fails the job even when
            # skipping bad fields (read_plates checks each plate's first field up front)
            y, x = image.shape[-2:]
            if options.tile[0] > y or options.tile[1] > x:
                raise RayscreenError(f"stream.tile {options.tile}: larger than plate {task.plate!r} well "
                                     f"{task.well} field {f}, which is {y} x {x} pixels at level "
                                     f"{options.level}; expected a tile of at most the field's size")
            stack, positions = tiles(image, options.tile, options.stride or options.tile)
            for t, (ty, tx) in zip(stack, positions):
                rows.append({**base, "image": t, "tile_y": int(ty), "tile_x": int(tx)})
        else:
            rows.append({**base, "image": image})
        if len(rows) >= options.fields_per_block:
            yield _to_batch(rows)
            rows = []
    if rows:
        yield _to_batch(rows)


def report_left_out(options: StreamOptions, task: WellTask, field: Any, error: Exception,
                    kind: str | None = None) -> None:
    """Report a field (``field`` None: the whole well) that the stream leaves out, and why."""
    _report(options, {"plate": task.plate, "well": task.well, "field": field, "kind": kind or type(error).__name__,
                      "error": str(error)})


def raise_unless_skipping(error: MissingWellError, on_error: str) -> None:
    """Re-raise ``error`` if it is an :class:`IncompleteWellError` (a well the plate's writer
    has not finished: an ingest under way or cut short) and ``on_error`` is not "skip": passing
    over it would record the well as done without its fields. Any other missing well (a
    sparse plate's absent well) is the caller's to pass over."""
    if isinstance(error, IncompleteWellError) and on_error != "skip":
        raise error


def saturation_fraction(image, max_value: float | None = None) -> float:
    """Fraction of the pixels of ``image`` (any shape) at or above ``max_value``. Default: the
    dtype's maximum for integer images; for float images (no natural ceiling) the image's own
    maximum, as CellProfiler's ``PercentMaximal``."""
    image = np.asarray(image)
    if max_value is None:
        max_value = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else image.max()
    return float(np.mean(image >= max_value))


def raw_saturation(image: np.ndarray) -> np.ndarray:
    """:func:`saturation_fraction` of each channel of a raw field (C, Y, X): float32 (C,).
    Measured in the read task, before illumination correction rescales the clipped pixels."""
    return np.array([saturation_fraction(plane) for plane in np.asarray(image)], dtype=np.float32)


def _to_batch(rows: list[dict[str, Any]]) -> dict[str, Any]:
    # rows of several plates may share a block: the block has every row's columns (None
    # where a row has none, as plan_wells fills them)
    batch = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)}
    first = rows[0]
    for r in rows[1:]:  # read_plates checks each plate's first field; this catches the others
        if r["image"].shape != first["image"].shape or r["image"].dtype != first["image"].dtype:
            raise BadImageError(
                f"plate {r['plate']!r} well {r['well']} field {r['field']} streams a {r['image'].shape} "
                f"{r['image'].dtype} image but plate {first['plate']!r} well {first['well']} field "
                f"{first['field']} a {first['image'].shape} {first['image'].dtype} one; the fields of a "
                "stream must share one shape and dtype to stack into a batch")
    batch["image"] = np.stack(batch["image"])
    for k, v in list(batch.items()):
        if k != "image":
            batch[k] = np.asarray(v, dtype=object if any(isinstance(x, str) or x is None for x in v) else None)
    return batch


def split_tasks(wells: list[WellTask], n: int) -> list[list[WellTask]]:
    """``n`` contiguous groups of about equal size (wells of a plate stay together)."""
    n = max(1, min(n, len(wells)))
    bounds = np.linspace(0, len(wells), n + 1).round().astype(int)
    return [wells[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
