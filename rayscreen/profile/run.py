"""``rayscreen profile CONFIG``: stream every field through :class:`ProfilePredictor` on a
Ray Data actor pool and write ``<output>/profiles.zarr`` through the results store.

Thin glue; the maths is in :mod:`.predictor`, :mod:`.classical` and :mod:`.image_qc`.

The stream reads raw pixels, measures each channel's saturation on them (clipping at the
detector) and corrects illumination when ``stream.illumination``; the actors compute the
other image-QC metrics on those fields, and then apply each plate's stored intensity
normalisation (``stream.normalize``, the same ``transform`` the stream would apply) before
the deep and classical features. The
normalisers are fitted by ``rayscreen illum``, never here: a plate without one fails the
stage before any work, naming the plate.

Exactly once and resumable: the driver creates the store (or reopens it on a rerun),
asks which wells are done, streams only the wells still to do, and writes each well
(all its variables, then its ``done`` flag) as soon as all its fields have come back
from the actors. Only the driver writes (from a few threads, :class:`WellWrites`: each well
is a handful of chunk writes, on S3 one PUT each), one well per chunk, so a retried actor
batch can never write twice. Each field's profile row is small (features only, no pixels), so the
driver holds at most the wells in flight.

Store variables (``docs/outputs.md``): ``field_profile`` (well, field, feature),
``well_profile`` (well, feature), ``field_classical`` / ``well_classical`` (on
``classical_feature``; when ``profile.classical``), ``field_qc`` (well, field,
qc_metric), ``field_status`` (0 profiled, 1 no such field, 2 read error, 3 QC-flagged
by ``rayscreen aggregate``), ``n_fields``, ``done``.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections import defaultdict
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..config import Config, write_config
from ..progress import Progress
from ..raylocal import drain, ensure_ray, resolve_use_gpu, stage_data_context, stream_failure
from ..store import MissingWellError, RayscreenError, open_plate
from ..store.plate import unfinished_wells, wells_to_redo, wells_to_retry
from ..store.results import Variable, create_results
from ..store.uri import join, mask_url_passwords
from ..stream.datasource import check_plate_set, in_threads, open_plates
from ..stream.normalize import corrections_versions

log = logging.getLogger(__name__)

PROFILES = "profiles.zarr"
STATUS_OK, STATUS_MISSING, STATUS_ERROR, STATUS_QC = 0, 1, 2, 3


def profiles_uri(config: Config) -> str:
    return join(config.output, PROFILES)


def _field_index(name: Any, order: dict[str, int], where: str = "") -> int:
    """Field name (``"0"``, ``"1"``, ... as plates name them) -> index along ``field``."""
    key = str(name)
    if key in order:
        return order[key]
    raise RayscreenError(f"{where + ': ' if where else ''}field {key!r} is not one of the well's fields {list(order)}")


def plan_profile(config: Config) -> dict[str, Any]:
    """What the stage will write: wells table (plate, well, Metadata_*), field count,
    channels, each well's field names. Reads plate metadata only (no pixels)."""
    from ..stream import expand_uris
    from ..stream.datasource import plan_wells

    uris = expand_uris(config.plates, config.storage_options)
    plates = dict(zip(uris, open_plates(uris, config.storage_options)))
    channels = check_plate_set(list(plates.items()), config.stream.channels)
    tasks = plan_wells(uris, config.storage_options, platemap=config.platemap)
    if not tasks:
        raise RayscreenError(f"profile: no wells in plates {config.plates}")

    def field_names(t) -> list[str]:
        plate = plates[t.plate_uri]
        count = plate.meta.field_count
        # plates rayscreen writes record their field count; others are asked well by well
        # (a sparse plate's absent well has none: written as such, as infer does)
        try:
            return [str(f) for f in (range(count) if count else plate.fields(t.well))]
        except MissingWellError:
            return []
        except RayscreenError:  # malformed well metadata: the stream skips and reports it under skip
            if config.stream.on_error != "skip":
                raise
            return []

    # another tool's plate: one metadata read per well, in the planning threads
    fields = {(t.plate, t.well): names for t, names in zip(tasks, in_threads(field_names, tasks))}
    rows = [{"plate": t.plate, "well": t.well, "Metadata_Plate": t.plate, **t.annotations} for t in tasks]
    wells = pd.DataFrame(rows)
    meta = ["plate", "well"] + [c for c in wells.columns if c.startswith("Metadata_")]
    return {"uris": uris, "wells": wells[meta], "channels": channels,
            "n_fields": max((len(v) for v in fields.values()), default=0), "fields": fields,
            "plate_uris": {t.plate: t.plate_uri for t in tasks}}


def _variables(n_fields: int, n_features: int, n_classical: int | None, n_qc: int) -> tuple[list, dict]:
    variables = [
        Variable("field_profile", ("well", "field", "feature"), "float32"),
        Variable("well_profile", ("well", "feature"), "float32", attrs={"method": "mean"}),
        Variable("field_qc", ("well", "field", "qc_metric"), "float32"),
        Variable("field_status", ("well", "field"), "int8", fill=STATUS_MISSING,
                 attrs={"flag_values": [0, 1, 2, 3],
                        "flag_meanings": "profiled no_such_field read_error qc_flagged"}),
        Variable("n_fields", ("well",), "int16"),
    ]
    sizes = {"field": n_fields, "feature": n_features, "qc_metric": n_qc}
    if n_classical is not None:
        variables += [Variable("field_classical", ("well", "field", "classical_feature"), "float32"),
                      Variable("well_classical", ("well", "classical_feature"), "float32", attrs={"method": "mean"})]
        sizes["classical_feature"] = n_classical
    return variables, sizes


def well_values(rows: list[dict[str, Any]], field_names: list[str], n_fields: int, n_features: int,
                n_classical: int | None, n_qc: int, present: list[str] | None = None,
                where: str = "") -> dict[str, np.ndarray]:
    """One well's store variables from its field rows (each: ``field``, ``profile`` (D,),
    ``classical`` (K,), ``qc`` (Q,)).

    Slot i holds the i-th of the well's fields: of ``present`` (the well's fields on disk,
    in the plate's order, when they were read), else of ``field_names`` (what the plan
    expects: ``0 .. field_count - 1``). This is infer's rule too, so a slot names the same
    image in both stores. Fields without a row are read errors (status 2); slots beyond the
    well's fields do not exist (status 1). Well aggregates are the NaN-skipping mean over
    profiled fields."""
    names = list(present) if present is not None else list(field_names)
    if len(names) > n_fields:
        raise RayscreenError(f"{where + ': ' if where else ''}{len(names)} fields {names}, more than the "
                             f"{n_fields} the store was sized for (the plate's field_count)")
    order = {f: i for i, f in enumerate(names)}
    status = np.full(n_fields, STATUS_MISSING, np.int8)
    status[:len(names)] = STATUS_ERROR
    out = {"field_profile": np.full((n_fields, n_features), np.nan, np.float32),
           "field_qc": np.full((n_fields, n_qc), np.nan, np.float32)}
    if n_classical is not None:
        out["field_classical"] = np.full((n_fields, n_classical), np.nan, np.float32)
    for r in rows:
        i = _field_index(r["field"], order, where)
        status[i] = STATUS_OK
        out["field_profile"][i] = r["profile"]
        out["field_qc"][i] = r["qc"]
        if n_classical is not None:
            out["field_classical"][i] = r["classical"]
    ok = status == STATUS_OK
    out["field_status"] = status
    out["n_fields"] = np.int16(ok.sum())
    out["well_profile"] = _mean(out["field_profile"][ok], n_features)
    if n_classical is not None:
        out["well_classical"] = _mean(out["field_classical"][ok], n_classical)
    return out


def _mean(values: np.ndarray, n: int) -> np.ndarray:
    if not len(values):
        return np.full(n, np.nan, np.float32)
    with np.errstate(all="ignore"):
        finite = np.isfinite(values)
        total = np.where(finite, values, 0).sum(0)
        count = finite.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def profile_settings(config: Config, channels: list[str], backbone_fingerprint: str) -> dict[str, Any]:
    """What a well's profiles depend on: the backbone and its weights (by content, the
    ``weights_fingerprint`` of the loaded network, so a copied or touched weights file
    resumes and other weights do not), channel handling, and the stream. A resumed run
    with other settings is refused rather than mixed into the store."""
    cfg, s = config.profile, config.stream
    return {"profile.backbone": cfg.backbone, "backbone": backbone_fingerprint,
            "profile.channel_mode": cfg.channel_mode, "profile.rgb": cfg.rgb, "profile.input_size": cfg.input_size,
            "profile.tiles": cfg.tiles, "stream.channels": list(channels), "stream.level": s.level,
            "stream.illumination": s.illumination, "stream.normalize": s.normalize}


def plate_normalizers(config: Config, uris: list[str], channels: list[str]) -> dict[str, dict]:
    """``{plate name: scaler dict}`` of each plate's stored normalisation restricted to
    ``channels``, for :class:`ProfilePredictor` to apply after the QC metrics (which need
    the raw, unclipped pixels). The stream's own checks (:func:`stream_normalizer`) apply:
    a plate without a normaliser, or with a stale one, raises naming the plate. The
    profile stage never fits one itself: that is ``rayscreen illum``'s job."""
    from ..stream.normalize import stream_normalizer

    def selected(uri: str) -> tuple[str, dict[str, Any]]:
        plate = open_plate(uri, config.storage_options)
        scaler = stream_normalizer(uri, config.storage_options, illumination=config.stream.illumination,
                                   method=config.stream.normalize, level=config.stream.level)
        return plate.name, scaler.select(plate._channel_indices(channels)).to_dict()

    return dict(in_threads(selected, uris))  # a few requests per plate: in the planning threads


WRITE_THREADS = 8  # wells written at once: each well is ~8 chunk writes (one S3 PUT each)


class WellWrites:
    """The driver's well writes (:meth:`ResultsWriter.write_well`), from a small thread pool.

    A well is ~8 synchronous chunk writes, one S3 PUT each (20-50 ms): written one after the
    other in the driver they capped the stage at a few wells a second and held up the
    stream. Here up to ``threads`` wells are written at once; wells touch disjoint chunks
    (one well per chunk) and each write still puts its ``done`` flag last.

    :meth:`submit` takes each well once (a second submit of a well raises), and blocks
    while ``max_pending`` writes are queued, so the driver holds a bounded number of wells.
    ``on_written(index)`` runs in the calling thread (the driver's: the progress bar is not
    thread-safe) once a well's write has finished. The first failed write is raised by the
    next :meth:`submit` or :meth:`finish` (not swallowed); after it nothing more is started.
    :meth:`finish` waits for every write and raises the first error; use as a context
    manager: leaving the block, on success or on an error, waits for the writes in flight
    (queued ones are dropped once a write has failed), so none runs on after the stage."""

    def __init__(self, writer: Any, on_written: Callable[[int], None] | None = None, *,
                 threads: int | None = None, max_pending: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        threads = max(1, threads or WRITE_THREADS)
        self._writer = writer
        self._on_written = on_written
        self._max_pending = max(1, max_pending or 4 * threads)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="profile-write")
        self._pending: dict[Any, int] = {}  # future -> well index
        self._submitted: set[int] = set()
        self._error: BaseException | None = None  # the first failed write: raised by every later call
        # the writer's zarr arrays opened here, once, not by racing threads
        for name in getattr(writer, "variables", {}):
            writer.shape_of(name)

    def submit(self, index: int, values: dict[str, np.ndarray], *, retry: bool = False) -> None:
        """Queue well ``index``'s write (``retry``: :meth:`ResultsWriter.write_well`'s flag)."""
        if index in self._submitted:
            raise RayscreenError(f"profile: well {index} written twice in one run")  # a bug, never data
        self._collect(block=len(self._pending) >= self._max_pending)
        self._submitted.add(index)
        self._pending[self._pool.submit(self._writer.write_well, index, values, retry=retry)] = index

    def finish(self) -> None:
        """Wait for every write; raises the first that failed."""
        while self._pending:
            self._collect(block=True, every=True)
        self._raise()

    def _collect(self, block: bool = False, every: bool = False) -> None:
        from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, wait

        self._raise()
        if not self._pending:
            return
        if block:
            finished, _ = wait(list(self._pending), return_when=ALL_COMPLETED if every else FIRST_COMPLETED)
        else:
            finished = [f for f in self._pending if f.done()]
        for future in finished:
            index = self._pending.pop(future)
            error = future.exception()
            if error is not None:
                self._error = self._error or error
            elif self._on_written is not None:
                self._on_written(index)
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __enter__(self) -> WellWrites:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # queued writes are dropped after a failed write (the stage fails; a rerun does them),
        # and kept after another error (the stream's: wells computed before it stay written)
        self._pool.shutdown(wait=True, cancel_futures=self._error is not None)
        if exc_type is None:
            self.finish()
            return
        for future, index in list(self._pending.items()):  # the stage fails with exc; these are counted or logged
            if future.cancelled():
                continue
            if future.exception() is not None:
                log.error("profile: writing well %d failed too: %r", index, future.exception())
            elif self._on_written is not None:
                self._on_written(index)
        self._pending.clear()


def run_profile(config: Config, *, progress: bool = True) -> str:
    """Profile every field of the config's plates; returns the ``profiles.zarr`` URI.

    A rerun resumes (done wells are not read again); ``profile.overwrite`` starts afresh.
    """
    from ..models import weights_fingerprint
    from .image_qc import qc_metric_names
    from .predictor import ProfilePredictor

    cfg = config.profile
    plan = plan_profile(config)
    channels, n_fields = plan["channels"], plan["n_fields"]
    # read before the normalisers: a refit in between then reopens wells made with the old
    # ones on the next run, where read after it would record the new version against them
    versions = corrections_versions(plan["plate_uris"], config.storage_options,
                                    illumination=config.stream.illumination, normalize=config.stream.normalize)
    normalizers = None
    if config.stream.normalize != "none":
        # checked before any work (a missing normaliser fails in a second, not after the
        # backbone loads); the stream reads raw pixels (QC sees the detector's counts) and
        # the actors normalise after QC with the plates' stored scalers, as the stream would
        normalizers = plate_normalizers(config, plan["uris"], channels)
    probe = ProfilePredictor(cfg.backbone, cfg.weights, channels=channels, channel_mode=cfg.channel_mode,
                             rgb=cfg.rgb, input_size=cfg.input_size, tiles=cfg.tiles, device="cpu",
                             storage_options=config.storage_options)
    features = probe.features
    backbone_fingerprint = weights_fingerprint(probe.model)
    del probe
    from .classical import classical_feature_names

    classical = classical_feature_names(channels) if cfg.classical else None
    qc_names = qc_metric_names(len(channels))
    variables, sizes = _variables(n_fields, len(features), len(classical) if classical else None, len(qc_names))
    coords = {"field": list(range(n_fields)), "feature": features, "qc_metric": qc_names}
    if classical:
        coords["classical_feature"] = classical
    uri = profiles_uri(config)
    writer = create_results(uri, plan["wells"], sizes, variables, coords=coords, kind="profiles",
                            # the weights' URI as given may hold a password (https://user:pass@host/...)
                            attrs={"model": cfg.backbone,
                                   "checkpoint": mask_url_passwords(cfg.weights) if cfg.weights else cfg.weights,
                                   "config": config.to_record(),
                                   "channels": channels, "channel_mode": cfg.channel_mode},
                            settings=profile_settings(config, channels, backbone_fingerprint),
                            storage_options=config.storage_options, overwrite=cfg.overwrite)
    write_config(config)

    done_mask = writer.done_mask()  # listed once; the two reopen steps clear their wells in it
    # again: wells of plates whose stored corrections were refitted since they were profiled,
    writer.reopen_changed_plates(versions, done_mask)
    # wells with a read error (maybe transient), and wells of rayscreen's plates with no
    # field on disk last time (an ingest then unfinished; another tool's absent well is final)
    plate_uris = plan["wells"]["plate"].map(plan["plate_uris"]).to_numpy()
    retried = writer.reopen_wells("field_status", lambda st, at: wells_to_redo(
        st, STATUS_ERROR, STATUS_MISSING, plate_uris[at], config.storage_options), done_mask)
    n_done = int(done_mask.sum())
    wells = plan["wells"]
    empty = np.zeros(len(wells), bool)  # wells written this run without a profiled field
    todo = np.flatnonzero(~done_mask).tolist()
    log.info("profile: %d wells, %d done, %d to profile%s -> %s", len(wells), n_done, len(todo),
             f" ({len(retried)} of them again: they had read errors or no field on disk)" if retried else "", uri)
    if todo:
        ensure_ray()
        bar = Progress(len(todo), "profile", "well", enabled=progress)
        todo_keys = {(wells.at[i, "plate"], wells.at[i, "well"]): i for i in todo}
        # well index -> {field: row}: by field, since a task Ray runs again after losing its
        # actor sends again the rows it had sent (at least once); counted twice, a well was
        # written with a field missing and its last field dropped as "already done"
        pending: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        n_classical = len(classical) if classical else None

        plates: dict[str, Any] = {}

        def fields_on_disk(plate_name: str, well: str) -> list[str]:
            """The well's fields as the plate lists them (one metadata read; plates opened once)."""
            plate_uri = plan["plate_uris"][plate_name]
            if plate_uri not in plates:
                plates[plate_uri] = open_plate(plate_uri, config.storage_options)
            try:
                return [str(f) for f in plates[plate_uri].fields(well)]
            except MissingWellError:
                return []
            except RayscreenError:  # malformed well metadata: the stream left it out (on_error: skip)
                return []

        def flush(i: int, present: list[str] | None = None) -> None:
            key = (wells.at[i, "plate"], wells.at[i, "well"])
            values = well_values(list(pending.pop(i, {}).values()), plan["fields"][key], n_fields, len(features),
                                 n_classical, len(qc_names), present, where=f"plate {key[0]!r} well {key[1]}")
            empty[i] = not (values["field_status"] == STATUS_OK).any()
            retry = bool(wells_to_retry(values["field_status"], STATUS_ERROR, STATUS_MISSING)[0])
            writes.submit(i, values, retry=retry)  # the bar counts it once written

        def on_batch(batch: dict[str, np.ndarray]) -> None:
            for j in range(len(batch["well"])):
                i = todo_keys.get((str(batch["plate"][j]), str(batch["well"][j])))
                if i is None:
                    continue  # a well of the same name on a plate already done
                row = {"field": batch["field"][j], "profile": batch["profile"][j], "qc": batch["qc"][j]}
                if classical:
                    row["classical"] = batch["classical"][j]
                pending[i][str(row["field"])] = row
                key = (wells.at[i, "plate"], wells.at[i, "well"])
                if len(pending[i]) == len(plan["fields"][key]):
                    expected = set(plan["fields"][key])
                    # fields named otherwise than 0 .. field_count - 1 (another tool's plate): by the plate's list
                    odd = any(f not in expected for f in pending[i])
                    flush(i, fields_on_disk(*key) if odd else None)
                    todo_keys.pop(key)

        writes = WellWrites(writer, on_written=lambda i: bar.update())
        with bar, stage_data_context(), writes:
            # (plate, well) pairs: by well name alone every plate's done wells of those names
            # were read and profiled again, then dropped (a rerun at plate 99 of 100 redid 99)
            failure = _profile_fields(config, plan, sorted(todo_keys), normalizers, on_batch)
            if failure is not None:
                # wells written so far stay done (leaving the block waits for the writes in
                # flight); a rerun profiles the rest
                raise stream_failure(failure, RayscreenError)
            # wells with fields that never came: read errors (on_error: skip), or fields the
            # plan counted from the plate's field_count that this well does not have; only
            # these few wells' field lists are read, to tell the two apart
            for (plate_name, well), i in list(todo_keys.items()):
                flush(i, fields_on_disk(plate_name, well))
            writes.finish()  # every well written (or the first write error raised) before finalize
    # as infer's store: when it finished, and what this run computed and skipped
    writer.finalize(finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    last_run={"computed": len(todo), "skipped": n_done},
                    wells_to_retry=int(unfinished_wells(empty, wells["plate"].map(plan["plate_uris"]).to_numpy(),
                                                        config.storage_options).sum()))
    return uri


def network_value_range(raw_dtype: np.dtype, normalizers: dict[str, dict] | None) -> tuple[float, float]:
    """The range of the images the profile network gets, mapped to its [0, 1] input: (0, 1)
    after clipping scalers (percentile), :data:`~.predictor.Z_RANGE` after mean/std ones
    (z-scores), else the plate's raw range: (0, dtype max) for integer plates, whose
    illumination-corrected fields are float counts (clipped at 1 they were all white)."""
    from ..stream.normalize import IntensityScaler
    from .predictor import Z_RANGE

    if normalizers:
        clipped = {bool(IntensityScaler.from_dict(d).clip) for d in normalizers.values()}
        if clipped == {True}:
            return (0.0, 1.0)
        if clipped == {False}:
            return Z_RANGE
        raise RayscreenError("profile: the plates' stored normalisers mix clipping (percentile) and z-score "
                             "(meanstd) scalers; run `rayscreen illum` with one stream.normalize for all plates")
    if np.issubdtype(raw_dtype, np.integer):
        return (0.0, float(np.iinfo(raw_dtype).max))
    return (0.0, 1.0)


def _profile_fields(config: Config, plan: dict[str, Any], wells: list[tuple[str, str]], normalizers: dict | None,
                    on_batch: Callable[[dict[str, np.ndarray]], None]) -> Exception | None:
    """Stream ``wells`` ((plate, well) pairs) of the plan's plates through a pool of :class:`ProfilePredictor`
    actors, passing each batch of field rows to ``on_batch``; returns the error that stopped
    it (None when done), for the caller to raise once this frame and the pool are gone
    (:func:`~rayscreen.raylocal.drain`)."""
    import ray

    from ..stream import read_plates
    from .predictor import ProfilePredictor

    cfg, s = config.profile, config.stream
    todo_plates = {plate for plate, _ in wells}
    uris = [u for u in plan["uris"] if any(plan["plate_uris"][p] == u for p in todo_plates)]
    ds = read_plates(uris, storage_options=config.storage_options, platemap=config.platemap,
                     # illumination-corrected in the read tasks, not normalised (the actors do
                     # that after QC); saturation measured on the raw pixels before correcting
                     wells=wells, channels=s.channels, level=s.level, illumination=s.illumination,
                     saturation=True, normalize=False, on_error=s.on_error,
                     error_report=join(config.output, "profile", "errors") if s.on_error == "skip" else None,
                     override_num_blocks=s.override_num_blocks, read_threads=s.read_threads)
    use_gpu, why = resolve_use_gpu("profile.use_gpu", cfg.use_gpu)
    log.info(why)
    raw_dtype = np.dtype(open_plate(plan["uris"][0], config.storage_options).dtype)
    ds = ds.map_batches(
        # a fixed pool of cfg.concurrency actors (Ray 2.60: compute=, concurrency= is deprecated)
        ProfilePredictor, batch_format="numpy", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs=dict(backbone=cfg.backbone, weights=cfg.weights, channels=plan["channels"],
                                   channel_mode=cfg.channel_mode, rgb=cfg.rgb, input_size=cfg.input_size,
                                   tiles=cfg.tiles, classical=cfg.classical, qc=True,
                                   batch_size=cfg.batch_size, storage_options=config.storage_options,
                                   # the actor's device follows what it reserved: Ray leaves every
                                   # GPU of the node visible to an actor that reserved none
                                   device="cuda" if use_gpu else "cpu",
                                   normalizers=normalizers,
                                   # detector clipping level of an uncorrected stream (the
                                   # stream's saturation column replaces it)
                                   qc_max_value=(float(np.iinfo(raw_dtype).max)
                                                 if np.issubdtype(raw_dtype, np.integer) else None),
                                   value_range=network_value_range(raw_dtype, normalizers),
                                   # run_profile's probe checked input_size on the driver
                                   check_input_size=False))
    return drain(ds.iter_batches(batch_size=None, batch_format="numpy"), on_batch)
