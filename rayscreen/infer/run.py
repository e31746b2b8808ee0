"""``rayscreen infer``: score every well of a screen into ``<output>/results.zarr``, exactly once.

Why the unit of work is a well, not a field
-------------------------------------------
``read_plates`` streams fields in blocks that do not align with wells, and when an actor
dies Ray Data restarts it and runs its unfinished *tasks* again -- a task is a whole input
block, however many ``map_batches`` calls it makes, and tasks are retried without limit.
If fields of one well could land in different calls, the well's aggregates would need a
shuffle or a stateful sink, and a retry could mix halves of two attempts. So the dataset
here has one row per *well* (index in the store, plate URI, plate, well), in blocks of one
call's wells each (:func:`well_blocks`): a lost actor costs at most one call's wells per
task it held, not thousands. Each ``map_batches`` call of the actor pool
(:class:`InferWells`) reads whole wells with the stream's own read loop
(:func:`rayscreen.stream.read_wells`: same channel selection, illumination,
normalisation and ``on_error`` handling as ``read_plates``), runs the
:class:`~rayscreen.infer.predictor.Predictor` on their fields, aggregates, and writes
each well with :meth:`ResultsWriter.write_well` -- all its chunks, then its done flag.
A call first drops the wells whose done flag is already set (a retried task's wells that
an earlier attempt finished): a rewrite cut short would leave a done well with chunks of
two attempts, and two attempts need not give the same bytes (another GPU model, another
kernel). No two calls share a chunk. While the model works on one well, reader threads
read the next :data:`READ_AHEAD` wells (never more: a well can be half a GB) and a writer
thread writes the last ones (at most :data:`WRITES_IN_FLIGHT` queued): I/O hidden behind
compute, memory bounded by a few wells whatever a call's size. A call returns only once
all its wells are written. Each call gets at least 4 forward batches of work, so Ray's
per-call overhead and the one read a call cannot hide (its first well's) stay small;
``benchmarks/infer.py`` measures it.

With ``infer.labels: NAME`` each field's mask is also written into the input plate as
an NGFF label image (:class:`rayscreen.store.labels.LabelWriter`), by the write thread
just before the well's results, so the well's done flag covers it too (a well whose
labels failed is not marked done).

Resume: wells already done are dropped from the dataset before anything is read.
Every check of the inputs (checkpoint, channels, classes, input size, output URI)
happens on the driver before the first pixel is read.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import math
import os
import sys
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd

from ..config import Config, ConfigError, write_config
from ..progress import Progress
from ..raylocal import drain, ensure_ray, resolve_use_gpu, stage_data_context, stream_failure
from ..store import MissingWellError, RayscreenError, open_plate
from ..store.plate import unfinished_wells, warn_of_timepoints, wells_to_redo, wells_to_retry
from ..store.annotations import label_text, read_csv_table
from ..store.labels import LabelWriter, check_label_name, downsampled_shape
from ..store.results import DONE, ResultsWriter, Variable, create_results
from ..store.uri import filesystem, is_remote, join, local_path, mask_url_passwords
from ..stream.datasource import (StreamOptions, WellTask, in_threads, open_plates, plan_wells,
                                 raise_unless_skipping, raw_field_bytes, read_wells, report_left_out)
from ..stream.normalize import corrections_versions
from ..stream.plates import expand_uris
from .predictor import Predictor, PredictorSettings, aggregate_well

log = logging.getLogger(__name__)

# field_status values (docs/outputs.md)
OK, ABSENT, READ_ERROR, QC_FLAGGED, NOT_FINITE = 0, 1, 2, 3, 4


def results_variables(n_fields: int, n_classes: int, n_features: int, saliency_shape: tuple[int, int] | None
                      ) -> tuple[dict[str, int], list[Variable]]:
    """(sizes, variables) of a results store; see docs/outputs.md for their meaning.
    ``saliency_shape`` None (``infer.saliency: none``): no ``saliency`` / ``mask`` variables
    (a profiles-only run does not store field-sized arrays of zeros)."""
    sizes = {"field": n_fields, "class": n_classes, "feature": n_features}
    fk, wf = ("well", "field", "class"), ("well", "field")
    variables = [
        Variable("field_status", wf, "int8", ABSENT,
                 {"flag_values": [OK, ABSENT, READ_ERROR, QC_FLAGGED, NOT_FINITE],
                  "flag_meanings": "scored absent read_error qc_flagged not_finite"}),
        Variable("field_scores", fk, "float32", attrs={"long_name": "class probabilities per field"}),
        Variable("field_map_max", fk, "float32", attrs={"long_name": "maximum of each class-specific map"}),
        Variable("field_map_y", fk, "int32", -1, {"units": "field pixels"}),
        Variable("field_map_x", fk, "int32", -1, {"units": "field pixels"}),
        Variable("field_profile", ("well", "field", "feature"), "float32"),
        Variable("well_scores", ("well", "class"), "float32"),
        Variable("well_profile", ("well", "feature"), "float32"),
        Variable("n_fields", ("well",), "int16", 0, {"long_name": "fields used for the well's aggregates"}),
    ]
    if saliency_shape is not None:
        sizes["y"], sizes["x"] = saliency_shape
        variables += [Variable("saliency", ("well", "field", "y", "x"), "float16"),
                      Variable("mask", ("well", "field", "y", "x"), "uint8", 0)]
    return sizes, variables


def well_outputs(fields: list[str], read: dict[str, np.ndarray], pred: dict[str, np.ndarray] | None,
                 n_fields: int, aggregate: str, shapes: dict[str, tuple[int, ...]], model=None
                 ) -> dict[str, np.ndarray]:
    """One well's block of every results variable.

    ``fields``: the well's field names in order (slot i = fields[i]); ``read``: names of
    the fields actually read -> their row in ``pred`` (the Predictor's output for them,
    in that order); fields listed but not read were read errors (skipped); fields whose
    scores or profile are not finite are left out of the well's aggregates (status 4).
    ``shapes``: per-variable shape without the well dim (from the store).
    """
    out = {name: np.full(shape, np.nan if name in _FLOATS else 0, dtype=_DTYPES[name])
           for name, shape in shapes.items()}
    out["field_status"][:] = ABSENT
    out["field_map_y"][:] = -1
    out["field_map_x"][:] = -1
    rows = []
    for slot, name in enumerate(fields):
        if name not in read:
            out["field_status"][slot] = READ_ERROR
            continue
        r = read[name]
        if not (np.isfinite(pred["scores"][r]).all() and np.isfinite(pred["profile"][r]).all()):
            # NaN/inf pixels (a float plate of another tool) or weights: its scores are kept
            # for inspection, but one such field would make the well's scores and profile NaN
            out["field_status"][slot] = NOT_FINITE
            out["field_scores"][slot] = pred["scores"][r]
            continue
        rows.append(r)
        out["field_status"][slot] = OK
        out["field_scores"][slot] = pred["scores"][r]
        out["field_map_max"][slot] = pred["map_max"][r]
        out["field_map_y"][slot] = pred["map_y"][r]
        out["field_map_x"][slot] = pred["map_x"][r]
        out["field_profile"][slot] = pred["profile"][r]
        for name in ("saliency", "mask"):
            if name in out:  # absent from a store written with infer.saliency: none
                out[name][slot] = pred[name][r]
    used = np.array(rows, dtype=int)
    scores = pred["scores"][used] if len(used) else np.zeros((0, shapes["well_scores"][0]), np.float32)
    maps = pred["class_maps"][used] if len(used) else None
    out["well_scores"][:] = aggregate_well(scores, aggregate, maps, model)
    if len(used):
        out["well_profile"][:] = pred["profile"][used].mean(axis=0)
    out["n_fields"][...] = len(used)
    return out


_FLOATS = {"field_scores", "field_map_max", "field_profile", "saliency", "well_scores", "well_profile"}
_DTYPES = {"field_status": "int8", "field_scores": "float32", "field_map_max": "float32", "field_map_y": "int32",
           "field_map_x": "int32", "field_profile": "float32", "saliency": "float16", "mask": "uint8",
           "well_scores": "float32", "well_profile": "float32", "n_fields": "int16"}


@dataclass(frozen=True)
class InferPlan:
    """What the driver works out before any pixel is read."""

    checkpoint: str
    results_uri: str
    wells: pd.DataFrame  # plate, plate_uri, well, Metadata_* (store order)
    n_fields: int
    field_shape: tuple[int, int]
    classes: list[str]
    feature_dim: int
    options: StreamOptions
    settings: PredictorSettings
    meta: Any
    labels: str | None = None  # label image name: masks also written into the plates
    model_fingerprint: str = ""  # sha256 of the weights and the artefact's metadata (infer_settings)


@dataclass(frozen=True)
class WellScoring:
    """What an actor of the pool needs, and no more: Ray pickles it into every actor (and
    again into each restarted one), so it must not grow with the screen -- the plan's wells
    table holds every well of it (384k rows for a 1000-plate screen)."""

    checkpoint: str  # the artefact to load (its real URI: credentials included)
    results_uri: str
    n_fields: int  # fields per well the store was sized for
    options: StreamOptions  # how to read a well (storage_options included)
    settings: PredictorSettings
    aggregate: str  # infer.aggregate
    labels: str | None = None  # infer.labels
    num_cpus: float = 1.0  # CPUs the actor reserved: its torch threads
    use_gpu: bool = False  # the actor reserved a GPU: the model runs on it

    @classmethod
    def of(cls, plan: InferPlan, config: Config, use_gpu: bool) -> "WellScoring":
        ic = config.infer
        return cls(checkpoint=plan.checkpoint, results_uri=plan.results_uri, n_fields=plan.n_fields,
                   options=plan.options, settings=plan.settings, aggregate=ic.aggregate, labels=plan.labels,
                   num_cpus=ic.num_cpus, use_gpu=use_gpu)


# Wells read ahead of the one the model works on, and reader threads. Two are enough to
# hide a well's read behind the model's work on the one before; each more is one more
# well in memory (about 0.5 GB at 9 fields of 5 x 2160 x 2160 float32 pixels).
READ_AHEAD = 2
READERS = 2
# wells handed to the writer thread and not yet written (values and saliency maps: a fraction
# of a well's pixels); when writes are slower than the model, it waits instead of queueing more
WRITES_IN_FLIGHT = 2
PLATES_KEPT = 4  # plates an actor keeps open

_Item = TypeVar("_Item")
_Read = TypeVar("_Read")


@contextmanager
def read_ahead(pool: Executor, read: Callable[[_Item], _Read], items: Iterable[_Item],
               ahead: int = READ_AHEAD) -> Iterator[Iterator[_Read]]:
    """``read(item)`` of each of ``items`` on ``pool``, yielded in order, while the reads of
    the next ``ahead`` items run: at most ``ahead`` + 1 items are read or being read and not
    yet taken, however many ``items`` there are (the one the caller waits for, and ``ahead``
    behind it). A read's error is raised when its item is reached, as the read's own result
    would be. On leaving the block, reads not started are cancelled and the block waits for
    those running: no read outlives it.

    ``with read_ahead(pool, read, wells) as results: for result in results: ...``
    """
    pending: deque[Future] = deque()
    todo = iter(items)

    def results() -> Iterator[_Read]:
        for item in todo:
            pending.append(pool.submit(read, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield results()
    finally:
        for fut in pending:
            fut.cancel()
        wait(pending)


def _device(use_gpu: bool) -> str:
    import torch

    # an actor that reserved no GPU runs on the CPU even on a GPU node: another actor may hold it
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


class InferWells:
    """The actor of the pool: model loaded once, then whole wells in, one summary row per well out."""

    def __init__(self, job: WellScoring):
        import torch

        from ..models.artefact import build_model

        so = job.options.storage_options
        # as many torch threads as CPUs this actor reserved: Ray's OMP_NUM_THREADS default
        # only reaches torch if set before torch's first import in the worker, and a worker
        # process reused by Ray may have imported it already
        torch.set_num_threads(max(1, int(job.num_cpus)))
        self.device = _device(job.use_gpu)
        self.model, _ = build_model(job.checkpoint, so, map_location=self.device)
        self.predictor = Predictor(self.model, job.settings, device=self.device)
        self.job = job
        self.writer = ResultsWriter(job.results_uri, so)
        self.shapes = {name: self.writer.shape_of(name) for name in self.writer.variables}
        # reader threads read the next wells while the model runs; another writes the last
        # ones (on S3 a write is tens of ms of latency per chunk): I/O hidden behind compute
        self.reader, self.writes = ThreadPoolExecutor(READERS), ThreadPoolExecutor(1)
        # plate URI -> open Plate, the last PLATES_KEPT (wells stream plate after plate; an actor
        # lives for a whole screen, and each Plate keeps every field's metadata it read, ~4 KB a field)
        self._plate_of = functools.lru_cache(maxsize=PLATES_KEPT)(
            functools.partial(open_plate, storage_options=so))
        self._labels: dict[str, LabelWriter] = {}  # plate URI -> its label writer (infer.labels)

    def _write(self, row: dict[str, Any], values: dict[str, np.ndarray], names: list[str], pred) -> None:
        """Write one well: its label images first (``infer.labels``), then its results,
        whose done flag comes last -- a well whose labels failed is not marked done."""
        job = self.job
        if job.labels and pred is not None:
            uri = row["plate_uri"]
            try:
                writer = self._labels.get(uri) or self._labels.setdefault(
                    uri, LabelWriter(uri, job.options.storage_options))
                writer.write_fields(row["well"], names, pred["mask"], job.labels,
                                    level=job.options.level, downsample=job.settings.saliency_downsample,
                                    description=f"rayscreen infer: {job.settings.saliency} saliency mask "
                                                f"({mask_url_passwords(job.checkpoint)})")
            except RayscreenError:
                raise
            except Exception as e:  # the store's own errors (permissions, network) name no well
                raise RayscreenError(f"plate {row['plate']!r} well {row['well']}: cannot write label image "
                                     f"{job.labels!r} into {uri} ({type(e).__name__}: {e}); infer.labels "
                                     "needs write access to the plates") from e
        retry = bool(wells_to_retry(values["field_status"], READ_ERROR, ABSENT)[0])
        self.writer.write_well(int(row["index"]), values, retry=retry)

    def _read(self, row: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray | None]:
        uri, options = row["plate_uri"], self.job.options
        plate = self._plate_of(uri)
        where = f"plate {row['plate']!r} well {row['well']}"
        try:
            fields = plate.fields(row["well"])
        except MissingWellError as e:
            raise_unless_skipping(e, options.on_error)
            # sparse plate: every field ABSENT; the well is looked for again on the next run
            return [], [], None
        except RayscreenError as e:
            # malformed well metadata (another tool's plate): bad data, skipped and reported as
            # the stream does, under on_error: skip
            if options.on_error != "skip":
                raise
            report_left_out(options, WellTask(uri, row["plate"], row["well"], {}), None, e)
            return [], [], None
        if len(fields) > self.job.n_fields:
            raise RayscreenError(f"{where}: {len(fields)} fields, more than the {self.job.n_fields} "
                                 "the results store was sized for (the plate's field_count)")
        names, images = [], []
        task = WellTask(row["plate_uri"], row["plate"], row["well"], {})
        for batch in read_wells([task], options, plate_of=self._plate_of):
            names += [str(f) for f in batch["field"]]
            images.append(batch["image"])
        return fields, names, (np.concatenate(images) if images else None)

    def _already_done(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) int: each well's stored n_fields where its done flag is set, -1 elsewhere."""
        done = self.writer.values_at(DONE, indices) == 1
        out = np.full(len(indices), -1, np.int64)
        if done.any():
            out[done] = self.writer.values_at("n_fields", indices[done])
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["index"]))]
        # a retried task's wells that an earlier attempt finished are reported, not rewritten
        n_used = self._already_done(np.asarray(batch["index"], np.int64))
        todo = [i for i in range(len(rows)) if n_used[i] < 0]
        written: list[Future] = []
        try:
            with read_ahead(self.reader, self._read, [rows[i] for i in todo]) as reads:
                for i, (fields, names, images) in zip(todo, reads):
                    pred = self.predictor({"image": images}) if images is not None else None
                    images = None  # the well's pixels go while the next is scored (read_ahead's bound)
                    values = well_outputs([str(f) for f in fields], {n: j for j, n in enumerate(names)}, pred,
                                          self.job.n_fields, self.job.aggregate, self.shapes, self.model)
                    if len(written) >= WRITES_IN_FLIGHT:
                        wait([written[-WRITES_IN_FLIGHT]])  # writes behind: wait rather than pile wells up
                    written.append(self.writes.submit(self._write, rows[i], values, names, pred))
                    n_used[i] = int(values["n_fields"])
        finally:
            wait(written)  # no read (read_ahead) or write of this call outlives it (a retry may follow)
        for fut in written:
            fut.result()  # the call returns only once all its wells are written (or raises)
        return {"index": batch["index"], "n_fields": n_used,
                "pid": np.full(len(rows), os.getpid(), np.int64)}


def plan_infer(config: Config) -> InferPlan:
    """Every check that can fail, on the driver, before a pixel is read."""
    from ..models.artefact import build_model

    ic = config.infer
    so = config.storage_options
    checkpoint = ic.checkpoint or join(config.output, "train", "model")
    try:
        model, meta = build_model(checkpoint, so)
    except FileNotFoundError as e:
        raise ConfigError(f"infer.checkpoint {checkpoint}: not found ({e})") from None
    uris = expand_uris(config.plates, config.storage_options)
    if not uris:
        raise ConfigError("plates: no plate URIs given")
    plates = open_plates(uris, so)
    channels = list(config.stream.channels) if config.stream.channels else None
    for p in plates:
        wanted = channels or list(meta.channels)
        missing = [c for c in wanted if c not in p.channels]
        if missing or (channels and channels != list(meta.channels)):
            raise RayscreenError(f"plate {p.name!r} ({p.uri}) channels {p.channels} (stream.channels: {channels}) "
                                 f"differ from the model's channels {list(meta.channels)} ({checkpoint})")
    n_classes = len(meta.classes)
    if getattr(model, "num_classes", n_classes) != n_classes:
        raise RayscreenError(f"{checkpoint}: the model has {model.num_classes} classes, its artefact lists "
                             f"{n_classes} ({meta.classes})")
    label_classes = config.label.classes
    if label_classes and [label_text(c) for c in label_classes] != [str(c) for c in meta.classes]:
        raise ConfigError(f"label.classes {label_classes} differ from the model's classes {meta.classes} "
                          f"({checkpoint})")
    trained = meta.normalization or {}
    for key, now, then in (("stream.normalize", config.stream.normalize, trained.get("method")),
                           ("stream.illumination", config.stream.illumination, trained.get("illumination"))):
        if then is not None and now != then:  # statistics of other pixels: every score silently off
            raise ConfigError(f"{key}: {now!r}, but the model was trained on fields streamed with {key}: {then!r} "
                              f"({checkpoint}); set it as in training")
    level = config.stream.level
    trained_level = meta.input.get("level")
    if trained_level is not None and int(trained_level) != level:
        raise ConfigError(f"stream.level {level}: the model was trained on level {trained_level} ({checkpoint})")
    warn_of_other_geometry(model, meta.input, checkpoint)
    for p in plates:
        warn_of_timepoints(p)
    shapes = {(p.shape[1] >> level, p.shape[2] >> level) for p in plates}
    if len(shapes) > 1:
        raise RayscreenError(f"plates have different field shapes at level {level}: {sorted(shapes)}")
    field_shape = shapes.pop()
    min_size = int(getattr(model, "min_size", 1))
    if min(field_shape) < min_size:
        raise RayscreenError(f"fields are {field_shape[0]}x{field_shape[1]} at level {level}; the model "
                             f"({meta.model['name']}) needs at least {min_size}x{min_size}")
    if ic.aggregate == "model" and not hasattr(model, "pooling"):
        raise ConfigError(f"infer.aggregate: 'model' needs a model with MIL pooling; {meta.model['name']} has none")
    if ic.aggregate == "model" and not getattr(model.pooling, "permutation_invariant", True):
        # 'model' pools a well's fields side by side as one bag: fine for pooling that ignores
        # where instances lie, meaningless for one that models position (WSCNN-FC's grid)
        raise ConfigError(f"infer.aggregate: 'model' pools a well's fields side by side as one bag; the model's "
                          f"{type(model.pooling).__name__} depends on where evidence lies in a field, so use "
                          f"'max' or 'mean' over the fields' scores")
    # (the config refuses a saliency_downsample, batch_size or concurrency below 1 already)
    if min(field_shape) // ic.saliency_downsample < 1:
        raise ConfigError(f"infer.saliency_downsample {ic.saliency_downsample}: expected 1..{min(field_shape)}")
    if ic.labels is not None:
        if ic.saliency == "none":
            raise ConfigError(f"infer.labels {ic.labels!r}: needs a saliency mask; infer.saliency is 'none'")
        try:
            check_label_name(ic.labels)
        except RayscreenError as e:
            raise ConfigError(f"infer.labels: {e}") from None
        for p in plates:  # the label images go into the plates: fail now, not after the first well
            if not is_remote(p.uri) and not os.access(local_path(p.uri), os.W_OK):
                raise ConfigError(f"infer.labels {ic.labels!r}: plate {p.name!r} ({p.uri}) is not writable; "
                                  "label images are written into the plates")

    tasks = plan_wells(uris, so)
    if ic.split != "all":
        tasks = _filter_split(config, tasks)
    n_fields = max(_max_fields(p) for p in plates)
    records = []
    for t in tasks:
        records.append({"plate": t.plate, "well": t.well, "plate_uri": t.plate_uri, "Metadata_Plate": t.plate,
                        **{k: v for k, v in t.annotations.items() if k.startswith("Metadata_")}})
    wells = pd.DataFrame.from_records(records)
    if wells.empty:
        raise ConfigError(f"infer.split {ic.split!r}: no wells to score")
    options = StreamOptions(storage_options=so, channels=tuple(channels or meta.channels), level=level,
                            illumination=config.stream.illumination, normalize=config.stream.normalize != "none",
                            dtype="float32", on_error=config.stream.on_error,
                            error_report=join(config.output, "infer", "errors"),
                            read_threads=config.stream.read_threads,
                            # the read-ahead bound, known here: the actors need not ask a plate per call
                            field_bytes=max(raw_field_bytes(p, channels or meta.channels) for p in plates))
    if options.normalize:
        from ..stream.normalize import stream_normalizer

        def check(p) -> None:  # the stream's own checks, before any field is read
            stream_normalizer(p.uri, so, illumination=config.stream.illumination, method=config.stream.normalize,
                              level=config.stream.level)

        list(in_threads(check, plates))
    settings = PredictorSettings(batch_size=ic.batch_size, saliency=ic.saliency,
                                 saliency_downsample=ic.saliency_downsample, saliency_sigma=ic.saliency_sigma,
                                 mask_threshold=ic.mask_threshold, mask_nms_size=ic.mask_nms_size)
    return InferPlan(checkpoint=checkpoint, results_uri=join(config.output, "results.zarr"), wells=wells,
                     n_fields=max(n_fields, 1), field_shape=field_shape, classes=[str(c) for c in meta.classes],
                     feature_dim=int(model.feature_dim), options=options, settings=settings, meta=meta,
                     labels=ic.labels, model_fingerprint=model_fingerprint(model, meta))


def _max_fields(plate) -> int:
    """The most fields a well of ``plate`` has: its recorded field_count, else (plates of
    other tools need not record it) the most of any well present; a sparse plate lists wells
    it does not have."""
    if plate.meta.field_count:
        return int(plate.meta.field_count)

    def count(well: str) -> int:
        try:
            return len(plate.fields(well))
        except MissingWellError:
            return 0

    # one metadata request per well: concurrent, since on S3 each is a round trip
    with ThreadPoolExecutor(max_workers=16) as pool:
        return max(pool.map(count, plate.wells), default=0)


def model_fingerprint(model, meta) -> str:
    """sha256 (16 hex digits) of the model's tensors and of the metadata that decides how a
    field is scored (architecture, channels, classes, normalisation, input): two artefacts
    give the same one only if they score every field the same. Not the training config,
    epoch or metrics: a finished run exported again (a resumed ``rayscreen run``) is the
    same model."""
    from ..models import weights_fingerprint

    scoring = {k: v for k, v in meta.to_dict().items() if k in ("model", "channels", "classes", "normalization",
                                                                 "input")}
    return weights_fingerprint(model, scoring)


def _filter_split(config: Config, tasks: list[WellTask]) -> list[WellTask]:
    uri = join(config.output, "train", "split.csv")
    fs, path = filesystem(uri, config.storage_options)
    if not fs.exists(path):
        raise ConfigError(f"infer.split {config.infer.split!r}: no {uri}; run `rayscreen train` first or use split: all")
    with fs.open(path) as f:
        split = read_csv_table(f)
    keep = set(zip(split.loc[split["split"] == config.infer.split, "Metadata_Plate"].astype(str),
                   split.loc[split["split"] == config.infer.split, "Metadata_Well"].astype(str)))
    return [t for t in tasks if (t.plate, t.well) in keep]


def infer_settings(plan: InferPlan, config: Config) -> dict[str, Any]:
    """What a well's stored values depend on: the model (its weights and metadata), the
    stream and the scoring settings. A resumed run with other settings is refused rather
    than mixed into the store (create_results)."""
    ic, s = config.infer, config.stream
    return {"model": plan.model_fingerprint, "stream.channels": list(plan.options.channels), "stream.level": s.level,
            "stream.illumination": s.illumination, "stream.normalize": s.normalize,
            "infer.aggregate": ic.aggregate, "infer.saliency": ic.saliency,
            "infer.saliency_downsample": ic.saliency_downsample, "infer.saliency_sigma": ic.saliency_sigma,
            "infer.mask_threshold": ic.mask_threshold, "infer.mask_nms_size": ic.mask_nms_size,
            # done wells of a run without label images would never get them
            "infer.labels": ic.labels}


def store_attrs(plan: InferPlan, config: Config) -> dict[str, Any]:
    """The results store's record of the run. URIs as the config record has them: a URL's
    password masked (an ``https://user:password@host/model`` checkpoint), since the store
    is read by whoever reads the results."""
    ic = config.infer
    return {"model": plan.meta.model, "checkpoint": mask_url_passwords(plan.checkpoint), "config": config.to_record(),
            "channels": list(plan.options.channels), "aggregate": ic.aggregate, "saliency": ic.saliency}


def create_store(plan: InferPlan, config: Config, overwrite: bool | None = None) -> ResultsWriter:
    """The results store of ``plan``: created, or reopened to resume (see :func:`create_results`)."""
    ic = config.infer
    saliency_shape = None if ic.saliency == "none" else downsampled_shape(plan.field_shape, ic.saliency_downsample)
    sizes, variables = results_variables(plan.n_fields, len(plan.classes), plan.feature_dim, saliency_shape)
    coords = {"class": plan.classes, "feature": [f"deep_{i}" for i in range(plan.feature_dim)]}
    store_wells = plan.wells.drop(columns=["plate_uri"])
    return create_results(plan.results_uri, store_wells, sizes, variables, coords=coords, kind="results",
                          attrs=store_attrs(plan, config), settings=infer_settings(plan, config),
                          storage_options=config.storage_options,
                          overwrite=ic.overwrite if overwrite is None else overwrite)


def warn_of_other_geometry(model: Any, trained_input: dict[str, Any], checkpoint: str) -> str | None:
    """Warn (and return the message) when a model whose pooling is not size-invariant
    (noisy-OR, ISR, the FC head: :attr:`MILPooling.size_invariant`) was trained on crops,
    tiles or 2x2 mosaics: infer scores whole fields, where such a pooling's logits shift
    with the number of instances (or the FC head's grid covers another area), so scores are
    not on the scale the model learned. Max, mean, LSE, GM, Noisy-AND and attention pool
    about alike at any size, and are meant to be trained on crops and scored on fields."""
    pooling = getattr(model, "pooling", None)
    if pooling is None or getattr(pooling, "size_invariant", True):
        return None
    seen = [f"{k} {trained_input[k]}" for k in ("crop", "tile") if trained_input.get(k)]
    seen += ["2x2 mosaics"] if trained_input.get("mosaic") else []
    if not seen:
        return None
    message = (f"{checkpoint}: the model's {type(pooling).__name__} depends on how many instances a bag has, "
               f"and it was trained on {', '.join(seen)} while infer scores whole fields: its scores shift "
               "with the field's size. Rank wells by them, but do not read them as probabilities; or "
               "train with max, mean or lse pooling")
    log.warning("%s", message)
    return message


def run_infer(config: Config, *, progress: bool = True, overwrite: bool | None = None,
              on_well: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Score the screen of ``config`` into ``<output>/results.zarr``; returns its URI.

    Resumes a store left by an interrupted run (done wells are not recomputed). The
    root attrs' ``last_run`` says how many wells this call computed and skipped.
    ``on_well(summary)`` is called on the driver for each well written (index,
    n_fields, pid of the actor that wrote it) -- progress hooks and fault tests.
    """
    plan = plan_infer(config)
    writer = create_store(plan, config, overwrite)
    done = writer.done_mask()  # listed once; the two reopen steps clear their wells in it
    # again: wells of plates whose stored corrections were refitted since they were scored,
    writer.reopen_changed_plates(corrections_versions(
        dict(zip(plan.wells["plate"], plan.wells["plate_uri"])), config.storage_options,
        illumination=config.stream.illumination, normalize=config.stream.normalize), done)
    # wells with a read error (maybe transient), and wells of rayscreen's plates with no
    # field on disk last time (an ingest then unfinished; another tool's absent well is final)
    plate_uris = plan.wells["plate_uri"].to_numpy()
    retried = writer.reopen_wells("field_status", lambda st, at: wells_to_redo(
        st, READ_ERROR, ABSENT, plate_uris[at], config.storage_options), done)
    todo = [{"index": i, "plate_uri": r.plate_uri, "plate": r.plate, "well": r.well}
            for i, r in enumerate(plan.wells.itertuples()) if not done[i]]
    if progress:
        again = f" ({len(retried)} of them again: they had read errors or no field on disk)" if retried else ""
        print(f"infer: {len(plan.wells)} wells, {int(done.sum())} already done, {len(todo)} to score{again} "
              f"-> {plan.results_uri}", file=sys.stderr)
    empty = np.zeros(len(plan.wells), bool)  # wells written this run without a field scored

    def track(row: dict[str, Any]) -> None:
        empty[int(row["index"])] = int(row["n_fields"]) == 0
        if on_well is not None:
            on_well(row)

    if todo:
        with Progress(len(todo), "infer", "well", enabled=progress) as bar, stage_data_context():
            failure = _score_wells(plan, config, todo, track, bar, progress=progress)
        if failure is not None:
            raise stream_failure(failure, RayscreenError)
    done_now = writer.done_mask()
    missing = [writer.keys[i] for i in np.flatnonzero(~done_now)]
    if missing:
        raise RayscreenError(f"{plan.results_uri}: {len(missing)} wells not written: {missing[:10]}")
    writer.finalize(done=done_now, finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    last_run={"computed": len(todo), "skipped": int(done.sum())},
                    wells_to_retry=int(unfinished_wells(empty, plan.wells["plate_uri"].to_numpy(),
                                                        config.storage_options).sum()))
    write_config(config)
    return plan.results_uri


def well_blocks(n_wells: int, per_call: int) -> list[slice]:
    """The dataset's blocks: ``per_call`` consecutive wells each, the last the rest.

    Ray Data hands an actor task a whole block (``map_batches`` bundles blocks up to its
    ``batch_size``, so a block of exactly ``batch_size`` rows is a task of one call) and
    runs the task again when its actor is lost: a block is what a retry redoes.
    """
    per_call = max(1, int(per_call))
    return [slice(start, min(start + per_call, n_wells)) for start in range(0, n_wells, per_call)]


def wells_per_call(batch_size: int, n_fields: int) -> int:
    """Wells per actor call: >= 4 forward batches of work, so the per-call overhead (Ray's,
    and the first well's read, which nothing earlier in the call can hide) stays a small share."""
    return max(1, math.ceil(4 * batch_size / max(1, n_fields)))


def wells_dataset(todo: list[dict[str, Any]], per_call: int):
    """The Ray dataset of the wells ``todo``, one block (so one task, one call) per ``per_call``
    wells: to be mapped with ``map_batches(..., batch_size=per_call)``.

    ``from_blocks`` keeps the blocks as given; ``from_items`` would split the wells evenly,
    into blocks a row short of ``per_call`` that ``map_batches`` then bundles in twos (it
    bundles blocks until a bundle holds ``batch_size`` rows).
    """
    import pyarrow as pa
    import ray

    return ray.data.from_blocks([pa.Table.from_pylist(todo[s]) for s in well_blocks(len(todo), per_call)])


def _score_wells(plan: InferPlan, config: Config, todo: list[dict[str, Any]],
                 on_well: Callable[[dict[str, Any]], None] | None, bar: Progress, *,
                 progress: bool = True) -> Exception | None:
    """Run the actor pool over ``todo``; returns the error that stopped it (None when done),
    for the caller to raise once this frame (and the pool) is gone: :func:`drain`."""
    import ray

    ic = config.infer
    ensure_ray()
    use_gpu, note = resolve_use_gpu("infer.use_gpu", ic.use_gpu)
    if progress:
        print(note, file=sys.stderr)
    else:
        log.debug(note)
    per_call = wells_per_call(ic.batch_size, plan.n_fields)
    ds = wells_dataset(todo, per_call)
    # (no memory= reservation: Ray schedules by it as a hard resource, and a few wells of a
    # large plate would have kept actors off nodes that hold them; read_ahead bounds the wells)
    ds = ds.map_batches(InferWells, fn_constructor_kwargs={"job": WellScoring.of(plan, config, use_gpu)},
                        batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=ic.concurrency),
                        num_gpus=1 if use_gpu else None, num_cpus=ic.num_cpus, batch_format="numpy")

    def handle(row: dict[str, Any]) -> None:
        if on_well is not None:
            on_well(row)
        bar.update()

    return drain(ds.iter_rows(), handle)
