"""``rayscreen infer``: score every well of a screen into ``<output>/results.zarr``, exactly once.

Why the unit of work is a well, not a field
-------------------------------------------
``read_plates`` streams fields in blocks that do not align with wells, and Ray Data
re-runs a batch (on another actor) when an actor dies. If fields of one well could
land in different calls, the well's aggregates would need a shuffle or a stateful
sink, and a retry could mix halves of two attempts. So the dataset here has one row
per *well* (index in the store, plate URI, plate, well); each ``map_batches`` call of
the actor pool (:class:`InferWells`) reads whole wells with the stream's own read
loop (:func:`rayscreen.stream.read_wells`: same channel selection, illumination,
normalisation and ``on_error`` handling as ``read_plates``), runs the
:class:`~rayscreen.infer.predictor.Predictor` on their fields, aggregates, and writes
each well with :meth:`ResultsWriter.write_well` -- all its chunks, then its done flag.
A retried call rewrites the same chunks with the same bytes, so a well is written
exactly once in effect, and no two calls share a chunk. Reading the next wells and
writing the last one run in two threads while the model works on the current one (I/O
hidden behind compute); a call returns only once all its wells are written. Each call
gets at least 4 forward batches of work, so Ray's per-call overhead and the one read a
call cannot hide (its first well's) stay small; ``benchmarks/infer.py`` measures it.

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
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..config import Config, ConfigError, write_config
from ..progress import Progress
from ..raylocal import drain, ensure_ray, stage_data_context, stream_failure
from ..store import MissingWellError, RayscreenError, open_plate
from ..store.plate import unfinished_wells, warn_of_timepoints, wells_to_redo
from ..store.annotations import label_text, read_csv_table
from ..store.labels import LabelWriter, check_label_name, downsampled_shape
from ..store.results import ResultsWriter, Variable, create_results
from ..store.uri import filesystem, is_remote, join, local_path
from ..stream.datasource import StreamOptions, WellTask, plan_wells, raise_unless_skipping, read_wells
from ..stream.normalize import corrections_versions
from ..stream.plates import expand_uris
from .predictor import Predictor, PredictorSettings, aggregate_well

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


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class InferWells:
    """The actor of the pool: model loaded once, then whole wells in, one summary row per well out."""

    def __init__(self, plan: InferPlan, aggregate: str, storage_options=None, num_cpus: float = 1.0):
        import torch

        from ..models.artefact import build_model

        # as many torch threads as CPUs this actor reserved: Ray's OMP_NUM_THREADS default
        # only reaches torch if set before torch's first import in the worker, and a worker
        # process reused by Ray may have imported it already
        torch.set_num_threads(max(1, int(num_cpus)))
        self.device = _device()
        self.model, _ = build_model(plan.checkpoint, storage_options, map_location=self.device)
        self.predictor = Predictor(self.model, plan.settings, device=self.device)
        self.plan, self.aggregate = plan, aggregate
        self.writer = ResultsWriter(plan.results_uri, storage_options)
        self.shapes = {name: self.writer.shape_of(name) for name in self.writer.variables}
        # one thread reads the next wells while the model runs; another writes the last
        # one (on S3 a write is tens of ms of latency per chunk): I/O hidden behind compute
        self.reader, self.writes = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
        self._plates: dict[str, Any] = {}  # plate URI -> Plate (metadata read once per actor)
        self._labels: dict[str, LabelWriter] = {}  # plate URI -> its label writer (infer.labels)

    def _write(self, row: dict[str, Any], values: dict[str, np.ndarray], names: list[str], pred) -> None:
        """Write one well: its label images first (``infer.labels``), then its results,
        whose done flag comes last -- a well whose labels failed is not marked done."""
        if self.plan.labels and pred is not None:
            uri = row["plate_uri"]
            try:
                writer = self._labels.get(uri) or self._labels.setdefault(
                    uri, LabelWriter(uri, self.plan.options.storage_options))
                writer.write_fields(row["well"], names, pred["mask"], self.plan.labels,
                                    level=self.plan.options.level, downsample=self.plan.settings.saliency_downsample,
                                    description=f"rayscreen infer: {self.plan.settings.saliency} saliency mask "
                                                f"({self.plan.checkpoint})")
            except RayscreenError:
                raise
            except Exception as e:  # the store's own errors (permissions, network) name no well
                raise RayscreenError(f"plate {row['plate']!r} well {row['well']}: cannot write label image "
                                     f"{self.plan.labels!r} into {uri} ({type(e).__name__}: {e}); infer.labels "
                                     "needs write access to the plates") from e
        self.writer.write_well(int(row["index"]), values)

    def _read(self, row: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray | None]:
        uri = row["plate_uri"]
        plate = self._plates.get(uri) or self._plates.setdefault(
            uri, open_plate(uri, self.plan.options.storage_options))
        where = f"plate {row['plate']!r} well {row['well']}"
        try:
            fields = plate.fields(row["well"])
        except MissingWellError as e:
            raise_unless_skipping(e, self.plan.options.on_error)
            # sparse plate: every field ABSENT; the well is looked for again on the next run
            return [], [], None
        if len(fields) > self.plan.n_fields:
            raise RayscreenError(f"{where}: {len(fields)} fields, more than the {self.plan.n_fields} "
                                 "the results store was sized for (the plate's field_count)")
        names, images = [], []
        task = WellTask(row["plate_uri"], row["plate"], row["well"], {})
        for batch in read_wells([task], self.plan.options):
            names += [str(f) for f in batch["field"]]
            images.append(batch["image"])
        return fields, names, (np.concatenate(images) if images else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["index"]))]
        futures = [self.reader.submit(self._read, r) for r in rows]
        n_used, written = [], []
        try:
            for row, fut in zip(rows, futures):
                fields, names, images = fut.result()
                pred = self.predictor({"image": images}) if images is not None else None
                values = well_outputs([str(f) for f in fields], {n: i for i, n in enumerate(names)}, pred,
                                      self.plan.n_fields, self.aggregate, self.shapes, self.model)
                written.append(self.writes.submit(self._write, row, values, names, pred))
                n_used.append(int(values["n_fields"]))
        finally:
            for fut in futures + written:
                fut.exception()  # wait: no read or write of this call outlives it (a retry may follow)
        for fut in written:
            fut.result()  # the call returns only once all its wells are written (or raises)
        return {"index": batch["index"], "n_fields": np.array(n_used, np.int64),
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
    plates = [open_plate(u, so) for u in uris]
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
    if ic.saliency_downsample < 1 or min(field_shape) // ic.saliency_downsample < 1:
        raise ConfigError(f"infer.saliency_downsample {ic.saliency_downsample}: expected 1..{min(field_shape)}")
    if ic.batch_size < 1 or ic.concurrency < 1:
        raise ConfigError("infer.batch_size and infer.concurrency must be >= 1")
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
                            error_report=join(config.output, "infer", "errors"))
    if options.normalize:
        from ..stream.normalize import stream_normalizer

        for p in plates:  # the stream's own checks, before any field is read
            stream_normalizer(p.uri, so, illumination=config.stream.illumination, method=config.stream.normalize,
                              level=config.stream.level)
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


def run_infer(config: Config, *, progress: bool = True, overwrite: bool | None = None,
              on_well: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Score the screen of ``config`` into ``<output>/results.zarr``; returns its URI.

    Resumes a store left by an interrupted run (done wells are not recomputed). The
    root attrs' ``last_run`` says how many wells this call computed and skipped.
    ``on_well(summary)`` is called on the driver for each well written (index,
    n_fields, pid of the actor that wrote it) -- progress hooks and fault tests.
    """
    plan = plan_infer(config)
    ic = config.infer
    saliency_shape = None if ic.saliency == "none" else downsampled_shape(plan.field_shape, ic.saliency_downsample)
    sizes, variables = results_variables(plan.n_fields, len(plan.classes), plan.feature_dim, saliency_shape)
    coords = {"class": plan.classes, "feature": [f"deep_{i}" for i in range(plan.feature_dim)]}
    store_wells = plan.wells.drop(columns=["plate_uri"])
    attrs = {"model": plan.meta.model, "checkpoint": plan.checkpoint, "config": config.to_record(),
             "channels": list(plan.options.channels), "aggregate": ic.aggregate, "saliency": ic.saliency}
    writer = create_results(plan.results_uri, store_wells, sizes, variables, coords=coords, kind="results",
                            attrs=attrs, settings=infer_settings(plan, config),
                            storage_options=config.storage_options,
                            overwrite=ic.overwrite if overwrite is None else overwrite)
    # again: wells of plates whose stored corrections were refitted since they were scored,
    writer.reopen_changed_plates(corrections_versions(
        dict(zip(plan.wells["plate"], plan.wells["plate_uri"])), config.storage_options,
        illumination=config.stream.illumination, normalize=config.stream.normalize))
    # wells with a read error (maybe transient), and wells of rayscreen's plates with no
    # field on disk last time (an ingest then unfinished; another tool's absent well is final)
    retried = writer.reopen_wells("field_status", lambda st: wells_to_redo(
        st, READ_ERROR, ABSENT, plan.wells["plate_uri"].to_numpy(), config.storage_options))
    done = writer.done_mask()
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
            failure = _score_wells(plan, config, todo, track, bar)
        if failure is not None:
            raise stream_failure(failure, RayscreenError)
    missing = [writer.keys[i] for i in np.flatnonzero(~writer.done_mask())]
    if missing:
        raise RayscreenError(f"{plan.results_uri}: {len(missing)} wells not written: {missing[:10]}")
    writer.finalize(finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    last_run={"computed": len(todo), "skipped": int(done.sum())},
                    wells_to_retry=int(unfinished_wells(empty, plan.wells["plate_uri"].to_numpy(),
                                                        config.storage_options).sum()))
    write_config(config)
    return plan.results_uri


def _score_wells(plan: InferPlan, config: Config, todo: list[dict[str, Any]],
                 on_well: Callable[[dict[str, Any]], None] | None, bar: Progress) -> Exception | None:
    """Run the actor pool over ``todo``; returns the error that stopped it (None when done),
    for the caller to raise once this frame (and the pool) is gone: :func:`drain`."""
    import ray

    ic = config.infer
    # the cluster's GPUs, not the driver's: a CPU-only head submitting to GPU workers (the
    # usual `ray job submit`) must still reserve them, and a GPU laptop's driver must not
    # ask a CPU-only cluster for GPUs it can never schedule (as train and profile decide)
    ensure_ray()
    gpu = ray.cluster_resources().get("GPU", 0) > 0
    # >= 4 batches of work per actor call: the per-call overhead (Ray's, and the first
    # well's read, which nothing earlier in the call can hide) stays a small share
    per_call = max(1, math.ceil(4 * ic.batch_size / plan.n_fields))
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 4 * ic.concurrency * 4)))
    ds = ds.map_batches(InferWells, fn_constructor_kwargs={"plan": plan, "aggregate": ic.aggregate,
                                                           "storage_options": config.storage_options,
                                                           "num_cpus": ic.num_cpus},
                        batch_size=per_call, compute=ray.data.ActorPoolStrategy(size=ic.concurrency),
                        num_gpus=1 if gpu else None, num_cpus=ic.num_cpus, batch_format="numpy")

    def handle(row: dict[str, Any]) -> None:
        if on_well is not None:
            on_well(row)
        bar.update()

    return drain(ds.iter_rows(), handle)
