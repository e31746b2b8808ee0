"""Per-plate corrections as distributed Ray jobs: illumination functions and normalisers.

Both jobs have the same shape. The driver lists each plate's fields (well metadata only)
and cuts them into groups of ``fields_per_task``; a Ray task reads one group of one plate
and returns a small mergeable accumulator (:class:`~.illumination.IlluminationAccumulator`:
a float64 (C, Y, X) sum; :class:`~.normalize.ChannelStats`: moments and a bounded pixel
sample). The driver merges a plate's partials as they arrive (``ray.wait``, at most
``max_in_flight`` tasks outstanding - by default as many as a fixed budget of partials
holds, at least 2 per CPU: :func:`tasks_in_flight` - tasks queued plate after plate), so
it holds one accumulator per plate in progress, never fields; when a plate's last partial is in, it
turns the merged accumulator into the illumination function (or fitted scaler) and stores
it with the plate (:func:`~.illumination.save_illumination`,
:func:`~.normalize.save_normalization`).

Resume: the parameters that determine the result are stored with it
(:func:`~.illumination.illumination_params`, the scaler's ``to_dict()`` + ``fit``). A plate
already holding a result made with the same parameters is skipped; different parameters
(another method, filter size, field subsample, or - for a normaliser - another
illumination function) recompute it and replace the stored one; ``overwrite=True``
recomputes regardless. How the work was split (``fields_per_task``, ``use_ray``) is not a
parameter: the merged sums are the same up to float64 rounding.

:func:`run_illum` is the stage behind ``rayscreen illum CONFIG`` and ``jobs/illum.py``.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from ..store import BadImageError, RayscreenError, open_plate
from ..store.extras import plate_array_complete
from ..store.uri import expand_uris
from .illumination import ARRAY_NAME as ILLUMINATION_ARRAY
from .illumination import (IlluminationAccumulator, illumination_entry, illumination_function,
                           illumination_params, load_illumination, save_illumination, select_fields)
from ..progress import Progress
from .normalize import (ChannelStats, IntensityScaler, fit_params, fit_wells, make_normalizer,
                        normalization_entry, save_normalization)

DEFAULT_FIELDS_PER_TASK = 32


# -- task bodies (pure Python: run in a Ray task or in this process)


def illumination_partial(plate_uri: str, pairs: list[tuple[str, str]], storage_options: dict[str, Any] | None,
                         clip_percentile: float | None) -> IlluminationAccumulator:
    """Robust partial sum over the (well, field) ``pairs`` of one plate (level 0 fields)."""
    plate = open_plate(plate_uri, storage_options)
    acc = IlluminationAccumulator(clip_percentile)
    for well, field in pairs:
        with _naming(plate, well, field):
            acc.add(plate.read(well, field))
    return acc


def stats_partial(plate_uri: str, pairs: list[tuple[str, str]], storage_options: dict[str, Any] | None,
                  seed: list[int], illumination: bool, level: int = 0) -> ChannelStats:
    """Channel statistics over ``pairs`` of one plate at pyramid ``level``, each field
    illumination-corrected first when ``illumination`` (with the function stored on the plate,
    resampled to the level, as the stream does)."""
    from .illumination import correct, illumination_at

    plate = open_plate(plate_uri, storage_options)
    illum = load_illumination(plate_uri, storage_options) if illumination else None
    stats = ChannelStats(seed=seed)
    resampled: dict[tuple[int, ...], Any] = {}  # once per field shape, as the stream does per plate
    for well, field in pairs:
        with _naming(plate, well, field):
            image = plate.read(well, field, level)
            if illum is not None:
                shape = tuple(image.shape[-2:])
                if shape not in resampled:
                    resampled[shape] = illumination_at(illum, shape)
                image = correct(image, resampled[shape])
            stats.add(image)
    return stats


@contextmanager
def _naming(plate, well: str, field: str) -> Iterator[None]:
    """A field the accumulators cannot take (another shape than the plate's first fields)
    raises naming it, as the stream does; errors that name it already pass through."""
    try:
        yield
    except RayscreenError:
        raise
    except ValueError as e:
        raise BadImageError(f"plate {plate.name!r} well {well} field {field}: {e}") from None


# -- the driver's loop


def _groups(pairs: list, size: int) -> list[list]:
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


def _merge(uri: str, merged: Any, part: Any) -> Any:
    try:
        return merged.merge(part)
    except ValueError as e:  # tasks of one plate saw fields of different shapes
        raise BadImageError(f"plate {uri}: {e}; expected every field of a plate to have one shape") from None


# What the partials of the tasks in flight may take together. Each finished task's partial
# waits in the object store until the driver merges it, and the driver holds one merged
# accumulator per plate in progress (at most one per task in flight), so this bounds the
# driver's memory for them at about twice the budget.
DRIVER_BUDGET_BYTES = 2 * 1024**3


def illumination_partial_bytes(shape: Sequence[int]) -> int:
    """Bytes of an :class:`~.illumination.IlluminationAccumulator` of fields of ``shape``
    (C, Y, X): its float64 sum."""
    c, y, x = (int(n) for n in shape)
    return 8 * c * y * x


def stats_partial_bytes(channels: int, fields_per_task: int) -> int:
    """Bytes of the :class:`~.normalize.ChannelStats` of one task over ``fields_per_task``
    fields of ``channels`` channels: its pixel sample (C, K) float32 and keys (K,) float64,
    K at most ``max_samples`` (the moments are a few numbers per channel)."""
    defaults = ChannelStats()
    k = min(defaults.max_samples, defaults.pixels_per_field * max(1, int(fields_per_task)))
    return (4 * int(channels) + 8) * k + 1024


def tasks_in_flight(partial_bytes: int | None, cpus: float, budget: int = DRIVER_BUDGET_BYTES) -> int:
    """How many tasks the driver keeps submitted: as many as ``budget`` holds partials of
    ``partial_bytes`` each, and at least 2 per CPU of the cluster now (every CPU busy while the
    driver merges) even past the budget. Without a size, 2 per CPU.

    Not 2 per CPU alone: an autoscaling cluster may start with no worker CPU, and Ray's
    autoscaler adds nodes for the tasks it sees waiting, so demand counted from the CPUs at
    the start stayed at 2 tasks and the cluster never grew. Tasks submitted past the running
    ones cost nothing until they run; what they return is what is bounded."""
    floor = 2 * max(1, int(cpus))
    if not partial_bytes:
        return floor
    return max(floor, int(budget // max(1, int(partial_bytes))))


def _reduce_per_plate(jobs: list[tuple[str, list[tuple]]], fn: Callable, finish: Callable[[str, Any], None], *,
                      use_ray: bool, max_in_flight: int | None, progress: bool, what: str,
                      partial_bytes: int | None = None, cluster_cpus: Callable[[], float] | None = None) -> None:
    """Run ``fn(*args)`` for every task of every plate and ``finish(plate_uri, merged)`` once
    per plate, as soon as all its partials are merged. ``jobs``: [(plate_uri, [args, ...])].
    ``partial_bytes``: the largest partial a task returns, which bounds the tasks in flight
    (:func:`tasks_in_flight`) unless ``max_in_flight`` fixes it. ``cluster_cpus``: the
    cluster's CPUs now (default: Ray's count), asked again after every result."""
    total = sum(len(tasks) for _, tasks in jobs)
    bar = Progress(total, what, "task", enabled=progress)
    if not use_ray:
        for uri, tasks in jobs:
            merged = None
            for args in tasks:
                part = fn(*args)
                merged = part if merged is None else _merge(uri, merged, part)
                bar.update()
            finish(uri, merged)
        bar.close()
        return

    import ray

    if not ray.is_initialized():
        raise RayscreenError(f"{what}: use_ray=True but Ray is not initialised; call ray.init() "
                             "(or pass use_ray=False)")
    fixed = max_in_flight is not None

    def limit() -> int:
        # read again as the loop goes: the cluster's CPUs grow as the autoscaler adds nodes,
        # and the floor of 2 per CPU with them
        if fixed:
            return max(1, max_in_flight)
        return tasks_in_flight(partial_bytes, cluster_cpus() if cluster_cpus else
                               ray.cluster_resources().get("CPU", 0))

    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    queue = iter([(uri, args) for uri, tasks in jobs for args in tasks])
    remaining = {uri: len(tasks) for uri, tasks in jobs}
    merged: dict[str, Any] = {}
    pending: dict[Any, str] = {}

    def submit() -> bool:
        item = next(queue, None)
        if item is not None:
            pending[remote.remote(*item[1])] = item[0]
        return item is not None

    def top_up() -> None:
        n = limit()
        while len(pending) < n and submit():
            pass

    top_up()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            uri = pending.pop(ready[0])
            try:
                part = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                if isinstance(cause, RayscreenError):
                    raise cause from None  # the message names plate/well/field
                raise
            del ready
            top_up()
            merged[uri] = part if uri not in merged else _merge(uri, merged[uri], part)
            remaining[uri] -= 1
            bar.update()
            if remaining[uri] == 0:
                finish(uri, merged.pop(uri))
    finally:
        for ref in pending:
            ray.cancel(ref)
        bar.close()


def _same(stored: Any, wanted: Any) -> bool:
    # compare as JSON, as stored (tuples become lists, ints and floats compare equal)
    return json.loads(json.dumps(stored)) == json.loads(json.dumps(wanted))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# -- illumination


def compute_illumination(
    uris: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    method: str = "gaussian",
    size: float | None = None,
    clip_percentile: float | None = 99.5,
    max_fields: int | None = None,
    seed: int = 0,
    use_ray: bool = True,
    fields_per_task: int = DEFAULT_FIELDS_PER_TASK,
    max_in_flight: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skip_incomplete: bool = False,
) -> dict[str, str]:
    """Compute and store every plate's illumination function (C, Y, X), in Ray tasks.

    Each task accumulates the robust average of up to ``fields_per_task`` fields of one
    plate; the driver merges them per plate, smooths and normalises the average
    (:func:`~.illumination.illumination_function` with ``method``/``size``) and stores it
    with the plate. ``max_fields`` averages a seeded random subsample of each plate's
    fields instead of all. Returns ``{plate_uri: "computed" | "skipped"}`` (skipped: the
    plate already holds a function with the same parameters; see the module's resume rule).
    A well the writer has not completed is an error, or with ``skip_incomplete`` left out
    and recorded in the stored parameters (so the next run computes the function again).
    """
    if fields_per_task < 1:
        raise RayscreenError(f"fields_per_task={fields_per_task}: expected >= 1")
    params = illumination_params(method, size, clip_percentile, max_fields, seed)
    status: dict[str, str] = {}
    jobs: list[tuple[str, list[tuple]]] = []
    partial_bytes = 0
    channels: dict[str, list[str]] = {}
    plate_params: dict[str, dict[str, Any]] = {}
    for uri in expand_uris(uris, storage_options):
        plate = open_plate(uri, storage_options)
        entry = illumination_entry(uri, storage_options)
        # the array is checked too (a listing of its chunks): a plate copied in part, or a
        # chunk lost, must be recomputed, not skipped and then fail in every stream
        if (not overwrite and entry and entry.get("version") == 1 and _same(entry.get("params"), params)
                and plate_array_complete(uri, ILLUMINATION_ARRAY, storage_options)):
            status[uri] = "skipped"
            _log(progress, f"illum {plate.name}: up to date ({uri})")
            continue
        incomplete: list[str] | None = [] if skip_incomplete else None
        pairs = select_fields(plate, max_fields, seed, incomplete=incomplete)
        if not pairs:
            raise RayscreenError(f"plate {plate.name!r} ({uri}): no field to compute an illumination function from")
        if incomplete:
            # recorded with the function: its parameters then differ from a complete plate's,
            # so the next run, after the ingest, computes it again
            plate_params[uri] = {**params, "incomplete_wells": sorted(incomplete)}
            _log(progress, f"illum {plate.name}: {len(incomplete)} well(s) not written yet left out")
        channels[uri] = plate.channels
        partial_bytes = max(partial_bytes, illumination_partial_bytes(plate.shape))  # cached by .channels
        jobs.append((uri, [(uri, group, storage_options, clip_percentile) for group in _groups(pairs, fields_per_task)]))

    def finish(uri: str, acc: IlluminationAccumulator) -> None:
        illum = illumination_function(acc.result(), size=size, method=method)
        save_illumination(uri, illum, storage_options, params=plate_params.get(uri, params), channels=channels[uri],
                          fields=acc.count)
        status[uri] = "computed"
        _log(progress, f"illum {uri}: {acc.count} fields averaged, stored")

    _reduce_per_plate(jobs, illumination_partial, finish, use_ray=use_ray, max_in_flight=max_in_flight,
                      progress=progress, what="illumination", partial_bytes=partial_bytes)
    return status


# -- normalisation


def _task_seed(seed: int, plate: str, task: int) -> list[int]:
    # every task draws its own pixel sample; the seed depends on the plate's name, not on
    # its position in the list, so a resumed job with fewer plates draws the same samples
    return [int(seed), zlib.crc32(plate.encode()), int(task)]


def fit_normalization(
    uris: str | Sequence[str],
    method: str = "percentile",
    storage_options: dict[str, Any] | None = None,
    *,
    illumination: bool = False,
    level: int = 0,
    max_fields: int | None = None,
    seed: int = 0,
    platemap=None,
    use_ray: bool = True,
    fields_per_task: int = DEFAULT_FIELDS_PER_TASK,
    max_in_flight: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skip_incomplete: bool = False,
    **normalizer_kwargs: Any,
) -> dict[str, str]:
    """Fit and store a per-plate, per-channel scaler (``method``: ``percentile``,
    ``meanstd``, ``control``; ``normalizer_kwargs`` go to its constructor), in Ray tasks.

    Each task accumulates :class:`~.normalize.ChannelStats` over a group of one plate's
    fields - the control wells only for ``control`` (``Metadata_Control`` or
    ``controls="<pandas query>"``, annotations overridden by ``platemap``) - corrected by
    the plate's stored illumination function first when ``illumination`` (so the scaler
    sees what the stream will feed it), read at pyramid ``level`` (the stream's). The driver merges them per plate, fits a fresh
    scaler and stores it with the plate. Returns ``{plate_uri: "fitted" | "skipped"}``.
    ``skip_incomplete``: as :func:`compute_illumination`'s.
    """
    if fields_per_task < 1:
        raise RayscreenError(f"fields_per_task={fields_per_task}: expected >= 1")
    try:
        template = make_normalizer(method, **normalizer_kwargs)
    except (TypeError, ValueError) as e:
        raise RayscreenError(f"normaliser {method!r} {normalizer_kwargs}: {e}") from None
    status: dict[str, str] = {}
    jobs: list[tuple[str, list[tuple]]] = []
    partial_bytes = 0
    fits: dict[str, dict[str, Any]] = {}
    for uri in expand_uris(uris, storage_options):
        plate = open_plate(uri, storage_options, platemap=platemap)
        illum_entry = illumination_entry(uri, storage_options) if illumination else None
        if illumination and not illum_entry:
            raise RayscreenError(f"plate {plate.name!r} ({uri}): no illumination function stored to correct the "
                                 "fields with before fitting; compute it first (compute_illumination)")
        wells = fit_wells(plate, template)
        fit = fit_params(max_fields, seed, illum_entry["params"] if illum_entry else None, wells, level)
        wanted = {**{k: v for k, v in template.to_dict().items() if k not in ("offset", "scale")}, "fit": fit}
        entry = normalization_entry(uri, storage_options)
        if not overwrite and entry and _same({k: v for k, v in entry.items() if k in wanted}, wanted):
            status[uri] = "skipped"
            _log(progress, f"normalize {plate.name}: up to date ({uri})")
            continue
        incomplete: list[str] | None = [] if skip_incomplete else None
        pairs = select_fields(plate, max_fields, seed, wells, incomplete=incomplete)
        if not pairs:
            raise RayscreenError(f"plate {plate.name!r} ({uri}): no field to fit {template!r} on")
        if incomplete:  # as for the illumination function: refitted once the ingest finished
            fit = {**fit, "incomplete_wells": sorted(incomplete)}
            _log(progress, f"normalize {plate.name}: {len(incomplete)} well(s) not written yet left out")
        fits[uri] = fit
        partial_bytes = max(partial_bytes, stats_partial_bytes(plate.shape[0], fields_per_task))
        jobs.append((uri, [(uri, group, storage_options, _task_seed(seed, plate.name, i), illumination, level)
                           for i, group in enumerate(_groups(pairs, fields_per_task))]))

    def finish(uri: str, stats: ChannelStats) -> None:
        scaler = IntensityScaler.from_dict(template.to_dict()).fit_stats(stats)
        save_normalization(uri, scaler, storage_options, fit=fits[uri], fields=stats.fields)
        status[uri] = "fitted"
        _log(progress, f"normalize {uri}: {scaler!r} fitted on {stats.fields} fields, stored")

    _reduce_per_plate(jobs, stats_partial, finish, use_ray=use_ray, max_in_flight=max_in_flight,
                      progress=progress, what=f"normalisation {method}", partial_bytes=partial_bytes)
    return status


# -- the stage


def _control_query(config) -> str | None:
    """The control wells the config's analysis section names, as a query for ControlScaler
    (``None``: ControlScaler's own default, negatives of ``Metadata_Control``)."""
    column, value = config.analysis.control_column, config.analysis.control_value
    if column == "Metadata_Control" and value in ("negative", True):
        return None
    return f"`{column}` == {value!r}"


def run_illum(config, *, progress: bool = True) -> dict[str, Any]:
    """The ``illum`` stage: for every plate of ``config.plates`` (globs expanded), compute
    the illumination function when ``config.stream.illumination`` (on level 0 fields: it is
    smooth, and the stream resamples it to ``stream.level``) and fit the normaliser
    ``config.stream.normalize`` at ``stream.level`` (unless ``"none"``; fitted on illumination-corrected fields
    when illumination is on, control wells from ``config.analysis.control_column`` /
    ``control_value`` for ``control``). Plates already up to date are skipped. Uses Ray when
    it is initialised (the caller's ``ray.init``), else runs in this process.

    Returns ``{"plates": [...], "illumination": {uri: status}, "normalization": {uri: status},
    "seconds": float}``.
    """
    import ray

    start = time.perf_counter()
    uris = expand_uris(config.plates, config.storage_options)
    use_ray = ray.is_initialized()
    out: dict[str, Any] = {"plates": uris, "illumination": {}, "normalization": {}}
    skip = config.stream.on_error == "skip"  # wells an ingest has not written yet: left out, not an error
    if config.stream.illumination:
        out["illumination"] = compute_illumination(uris, config.storage_options, use_ray=use_ray, progress=progress,
                                                   skip_incomplete=skip)
    if config.stream.normalize != "none":
        kwargs = {"controls": _control_query(config)} if config.stream.normalize == "control" else {}
        out["normalization"] = fit_normalization(uris, config.stream.normalize, config.storage_options,
                                                 illumination=config.stream.illumination, level=config.stream.level,
                                                 platemap=config.platemap, skip_incomplete=skip,
                                                 use_ray=use_ray, progress=progress, **kwargs)
    # wells left out as not written yet (stream.on_error: skip): a later run must fit again
    retry = 0
    for u in uris if skip else []:
        if config.stream.illumination:
            retry += len((illumination_entry(u, config.storage_options) or {}).get("params", {})
                         .get("incomplete_wells", []))
        if config.stream.normalize != "none":
            retry += len((normalization_entry(u, config.storage_options) or {}).get("fit", {})
                         .get("incomplete_wells", []))
    out["wells_to_retry"] = retry
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out
