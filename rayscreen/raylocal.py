"""Starting or joining Ray the same way in every stage, the CLI, the demo and the tests.

``ensure_ray()`` joins the cluster named by ``RAY_ADDRESS`` (what ``ray job submit`` sets)
or starts a local Ray on a laptop; one function so that a pipeline run, whose first stage
starts Ray, gets the same local settings that each stage would have chosen alone:

- idle worker processes are kept for a minute (``LOCAL_RAY_SYSTEM_CONFIG``; see
  ``IDLE_WORKER_KEEP_MS``), which training needs to be fast on small nodes;
- a worker set-up hook quiets internal Ray Train loggers that flood the console
  (``quiet_ray_loggers``): one when the Ray dashboard (and with it the state API) is not
  running, and the per-epoch INFO lines that repeat what rayscreen's own progress says
  (Ray Train's reports, Ray Data's "execution finished" lines);
- it is a Ray of its own even beside other Rays on the machine (a ``ray start`` cluster,
  another rayscreen run): ``address="local"``, and its workers' state API pinned to it
  (``pin_state_api_to_own_cluster``), which Ray Train's placement-group cleaner relies on.

This module imports nothing from rayscreen (every layer may use it) and nothing heavy at
import time: Ray imports it in every worker process of a local Ray.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

# Ray kills a worker process idle for 1 s once a node runs more worker processes than it
# has CPUs (`num_workers_soft_limit`), and Ray Train's own actors (controller, workers,
# split coordinator, ...) already exceed that on small nodes: every epoch's read tasks
# then start fresh Python processes (import Ray Data, zarr, pandas: seconds each under
# load; measured 3-9 s per epoch on 2 CPUs vs 0.6 s with the workers kept). A local Ray
# started here keeps idle workers for this long; for a cluster set
# RAY_idle_worker_killing_time_threshold_ms on its nodes (docs/benchmarks.md, Training).
IDLE_WORKER_KEEP_MS = 60_000
LOCAL_RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS}

# Ray Train 2.60's placement-group cleaner asks the state API once a second whether the
# training controller is alive and logs a warning every time the API is unavailable, which
# it always is on a Ray started without its dashboard (our demo, tests and benchmarks):
# ~60 lines a minute of training. Errors of that logger still show.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)
# Ray Train logs at INFO, from every worker and every epoch, "Reporting training result N:
# TrainingReport(...)" (the whole metrics dict) and "Checkpoint successfully created at
# ...": two long lines per epoch beside rayscreen's own epoch line, which says the same.
# Warnings and errors of these loggers still show.
REPORT_LOGGERS = ("ray.train.v2._internal.execution.storage", "ray.train._internal.storage")
# ... and the first one's logger is named after its file, not its module. Ray Train v2 resets
# the ray.train.* levels when it configures a training worker's logging, so for its runs
# rayscreen also sets RunConfig(logging_config=LoggingConfig("WARNING")) (train/loop.py).
REPORT_LOGGER_FILE = ("train", "v2", "_internal", "execution", "context.py")
SETUP_HOOK = f"{__name__}.quiet_ray_loggers"
# Ray Data logs "Dataset <id> execution finished in N seconds" at INFO when a dataset is
# done: in a training run once per epoch per split coordinator, beside the epoch line that
# says more; and, at WARNING once per process, that progress bars are disabled, which the
# stages do on purpose (they show their own). Dropped by a filter on those two loggers;
# their other lines, and every other warning of Ray Data, still show.
DATA_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor"
DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


class _DropRayDataChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if record.levelno < logging.WARNING and "execution finished in" in message:
            return False
        return not message.startswith("Progress bars disabled.")


DROP_DATA_CHATTER = _DropRayDataChatter()
CHATTY_DATA_LOGGERS = (DATA_EXECUTOR_LOGGER, DATA_PROGRESS_LOGGER)


def report_loggers() -> list[str]:
    """Names of the per-epoch INFO loggers of Ray Train (:data:`REPORT_LOGGERS` and the one
    named by its file path, found without importing Ray Train)."""
    import ray

    return [*REPORT_LOGGERS, os.path.join(os.path.dirname(ray.__file__), *REPORT_LOGGER_FILE)]


def quiet_ray_loggers() -> None:
    """Worker set-up hook of a local Ray (``runtime_env={"worker_process_setup_hook":
    SETUP_HOOK}``): raise :data:`QUIET_LOGGERS` to ERROR and Ray Train's per-epoch INFO
    loggers to WARNING in this process, and pin its state API to its own cluster
    (:func:`pin_state_api_to_own_cluster`)."""
    pin_state_api_to_own_cluster()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in report_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in CHATTY_DATA_LOGGERS:
        logging.getLogger(name).addFilter(DROP_DATA_CHATTER)  # added once: addFilter skips a filter it has


def pin_state_api_to_own_cluster() -> None:
    """Set ``RAY_ADDRESS`` in this worker process to its own cluster's GCS address.

    Ray's state API, which Ray Train's placement-group cleaner asks every second whether
    the training controller is alive, finds "the" cluster of a process without
    ``RAY_ADDRESS`` by looking on the machine: the cluster that ``ray start`` began if one
    runs, else the one GCS process it finds, else it fails. A local Ray started beside a
    ``ray start`` cluster then asks that other cluster and does not find its controller
    there. Measured: "Found multiple active Ray instances ... Connecting to latest cluster at
    <the ray start cluster>", then the cleaner exited while the controller ran. Had the run's
    placement group been registered with it by then, it would have removed that too (Ray
    Train's placement_group_cleaner.py).

    Set even when the worker inherited a ``RAY_ADDRESS`` (from a driver that started a local
    Ray with ``address="local"`` while one was set): the hook runs only in workers of a Ray
    that rayscreen started, so their own cluster is always the right answer.
    ``RAY_API_SERVER_ADDRESS``, which the state API reads first, is dropped for the same
    reason. Worker processes only: the driver's own ``RAY_ADDRESS`` decides whether
    :func:`ensure_ray` starts or joins a Ray. A side effect: a process a worker starts
    inherits the address (nothing in rayscreen starts one)."""
    import ray

    if ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def quiet_report_logger() -> None:
    """Raise to WARNING the one per-epoch Ray Train INFO logger that its ``LoggingConfig``
    does not reach (named by its file path: "Reporting training result ..."). For training
    workers on any cluster; the ray.train.* loggers are left to ``LoggingConfig``, which keeps
    their INFO lines in Ray's system log."""
    logging.getLogger(report_loggers()[-1]).setLevel(logging.WARNING)


# ray.init arguments that describe a node Ray starts; refused when joining a running cluster
NODE_SETTINGS = frozenset({"num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config",
                           "_node_name", "_enable_object_reconstruction"})


def local_init_kwargs(**overrides: Any) -> dict[str, Any]:
    """``ray.init`` keyword arguments of a local Ray started by rayscreen (``overrides`` win).

    ``address="local"``: a new Ray of this process's own, even where a cluster started with
    ``ray start`` runs on the machine. Without it ``ray.init`` joins that cluster, and then
    refuses the local settings (``_system_config``, ``num_cpus``) with a ValueError; a run
    that means to use that cluster sets ``RAY_ADDRESS`` (``auto`` for the machine's own)."""
    kwargs: dict[str, Any] = {"address": "local", "logging_level": logging.WARNING, "configure_logging": False,
                              "_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG),
                              "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}
    kwargs.update(overrides)
    if kwargs.get("include_dashboard") is False and "dashboard_port" not in kwargs:
        # a Ray without a dashboard still records one at the default port (8265); the state
        # API of its workers (pin_state_api_to_own_cluster) would then ask whatever other
        # cluster's dashboard listens there. A free port of its own, where nothing answers,
        # makes that API merely unavailable, as it is on a machine with one Ray. (Without a
        # dashboard Ray only records the port, never binds it: no race if it is taken later.)
        kwargs["dashboard_port"] = free_port()
    return kwargs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_ray(**overrides: Any) -> bool:
    """Join or start Ray unless this process already did; returns True when it did now.

    With ``RAY_ADDRESS`` set (``ray job submit``, a cluster; ``auto``: the one ``ray start``
    began on this machine) it joins that cluster with the cluster's own settings; otherwise
    it starts a local Ray of its own with :func:`local_init_kwargs`, beside any other Ray
    on the machine.
    ``overrides`` go to ``ray.init`` (e.g. ``num_cpus``, ``include_dashboard``,
    ``log_to_driver``); those that size a new node (:data:`NODE_SETTINGS`) only when it
    starts one, since a cluster keeps its own (``ray.init`` refuses them when joining).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": Ray's own word for "start one here"
        dropped = sorted(k for k in overrides if k in NODE_SETTINGS)
        if dropped:
            log.info("joining the Ray cluster at RAY_ADDRESS: its own %s apply, not these", dropped)
        join = {k: v for k, v in overrides.items() if k not in NODE_SETTINGS}
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False, **join)
    else:
        ray.init(**local_init_kwargs(**overrides))
    return True


@contextlib.contextmanager
def stage_data_context() -> Iterator[None]:
    """Ray Data settings for the datasets that train, infer and profile build and run inside:

    - Ray Data's own progress off: no bars, no logged progress blocks (Ray Data logs them
      every few seconds when stdout is not a terminal, as in ``ray job submit`` logs) and
      no "Starting execution" lines; the stages show their own progress (epoch lines,
      :class:`rayscreen.progress.Progress`);
    - a failed map raises the worker's own exception instead of Ray Data's
      ``UserCodeException``, whose cause does not survive the trip to the driver, so
      :func:`cause_of` can find the error naming the plate, well and field.

    Ray Trainers copy the driver's DataContext when they are built, so build them inside too.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False, "raise_original_map_exception": True}
    saved = {name: getattr(ctx, name) for name in wanted}
    for name, value in wanted.items():
        setattr(ctx, name, value)
    # the driver's own datasets (infer, profile); a filter the hook added stays
    added = [lg for lg in map(logging.getLogger, CHATTY_DATA_LOGGERS) if DROP_DATA_CHATTER not in lg.filters]
    for lg in added:
        lg.addFilter(DROP_DATA_CHATTER)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        for lg in added:
            lg.removeFilter(DROP_DATA_CHATTER)


def cause_of(error: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException:
    """The exception of type ``kind`` (a type or a tuple of them) that ``error`` wraps, else
    ``error`` itself.

    Ray wraps what a task or actor raised in ``RayTaskError`` (its ``cause``), and Ray Data
    wraps it once more (``UserCodeException``); the caller wants the error a worker raised
    (e.g. a ``RayscreenError`` naming the plate, well and field), which the CLI prints as a
    message instead of a traceback through Ray's internals."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "cause", None)  # a Ray wrapper; it also subclasses its cause's type
        if isinstance(inner, BaseException):
            current = inner
            continue
        if isinstance(current, kind):
            return current
        # an explicit cause, or the error being handled when this one was raised, unless
        # `raise ... from None` hid it (a worker that caught ours and failed otherwise)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return error


def drain(rows: Iterable[Any], handle: Callable[[Any], None]) -> Exception | None:
    """Pass every item of ``rows`` (a Ray Data iterator) to ``handle``; returns the error that
    stopped it, or None when all went through.

    Returned, not raised, and without tracebacks (its own and those of the errors it chains):
    the frames of a traceback through a Ray Data iterator hold its executor and with it an
    actor pool, whose CPUs (and GPUs) then stay taken for as long as anyone holds the error
    (a notebook, a test, a retrying caller). Build the dataset in a function that calls this
    and returns its result, and raise it in the caller once that frame is gone; a worker's
    error keeps its remote traceback in its text.
    """
    iterator = iter(rows)
    try:
        for row in iterator:
            handle(row)
    except Exception as e:
        # shut the iterator down now: Ray Data's generator stops its executor in its finally,
        # which an error in `handle` leaves suspended until the generator is collected
        close = getattr(iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception as closing:  # the error that stopped the stream is the one to report
                log.debug("closing the stream after %r: %r", e, closing)
        # every exception reachable from e: Ray's wrappers hold the worker's error in .cause
        seen, todo = set(), [e]
        while todo:
            chained = todo.pop()
            if chained is None or id(chained) in seen:
                continue
            seen.add(id(chained))
            chained.with_traceback(None)
            inner = getattr(chained, "cause", None)
            todo += [inner if isinstance(inner, BaseException) else None, chained.__cause__, chained.__context__]
        return e
    return None


def stream_failure(failure: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException:
    """The error to raise for a stream :func:`drain` returned ``failure`` from, called once the
    frame that built the dataset is gone: :func:`cause_of` it, after a full garbage collection.
    The executor and its actor handles can sit in reference cycles, and with torch and Ray
    loaded CPython postpones full collections (until a quarter of the long-lived objects are
    new): the pool's CPUs stayed taken for over a minute in some runs without it."""
    gc.collect()
    return cause_of(failure, kind)


def resolve_use_gpu(key: str, setting: bool | None, cluster_gpus: float | None = None) -> tuple[bool, str]:
    """(whether each worker or actor of a stage reserves one GPU, one line saying which and why)
    for the config key ``key`` (``train.use_gpu``, ``infer.use_gpu``, ``profile.use_gpu``) set
    to ``setting``, on a cluster with ``cluster_gpus`` GPUs up now (default: Ray's count, asked
    only when ``setting`` is None).

    true: a GPU each even when none is up (an autoscaler starts GPU nodes for the pending
    workers; without one they wait). false: CPU. None: GPUs when the cluster has some now --
    the cluster's, not the driver's: a CPU-only head submitting to GPU workers (the usual
    `ray job submit`) must still reserve them. An autoscaling cluster whose GPU nodes start
    at 0 has none when the stage starts, so None means CPU there: the line says what to set.
    """
    stage = key.split(".")[0]
    if setting is not None:
        if not setting:
            return False, f"{stage}: on CPU ({key}: false)"
        if cluster_gpus is None:
            import ray

            cluster_gpus = ray.cluster_resources().get("GPU", 0)
        wait = "" if cluster_gpus > 0 else "; the cluster has no GPU now: waiting for GPU nodes (an autoscaler starts them)"
        return True, f"{stage}: one GPU each ({key}: true){wait}"
    if cluster_gpus is None:
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if cluster_gpus > 0:
        return True, f"{stage}: one GPU each: the cluster has {cluster_gpus:g} GPU(s) now ({key}: null)"
    return False, (f"{stage}: on CPU: the cluster has no GPU now ({key}: null); on an autoscaling cluster whose "
                   f"GPU nodes start at 0, set {key}: true to have them started")
