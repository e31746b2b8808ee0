"""Ray Train glue: the driver side (:func:`run_train`) and the per-worker loop.

The maths is in :mod:`.step` (pure torch), the run's decisions in :mod:`.plan`
(driver, before any worker), checkpoints in :mod:`.checkpoint`. This module only
moves things between them and Ray.

Resuming: Ray Train V2 restores a run from ``storage_path/name`` when that run exists,
so rerunning with the same ``train.run_name`` resumes from its latest checkpoint;
a new name starts fresh. :func:`.plan.check_resume` refuses to resume a run whose
stored config differs (other than ``plan.RESUMABLE`` keys such as ``train.epochs``), or
whose plates and labels now give other classes or another split of the wells.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import Config, ConfigError, config_from_dict
from ..raylocal import ensure_ray, quiet_report_logger, resolve_use_gpu, stage_data_context
from ..store import RayscreenError
from ..store.uri import filesystem, is_remote, join
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .labels import LABEL_COL
from .plan import METRICS, SPLIT_COL, TrainPlan, model_kwargs, plan_run, write_run_config
from .distill import collapse, distill_step
from .step import (augment_config, average_batchnorm, broadcast_buffers, classification_metrics, every_rank,
                   has_batchnorm, make_optimizer, make_scheduler, metric_mode, mixup, nucleus_crops, predict,
                   random_crops, recompute_batchnorm, repeat_rows, restore_scheduler, step_scheduler, trainable_batch,
                   train_step, unwrap)

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", *METRICS, "seconds"]
EVENTS = "events.jsonl"  # one JSON line per event: "start" (a worker group), "nonfinite" (a run ended by one)
NONFINITE = "nonfinite"  # <run_dir>/nonfinite/<run_name>-rank-<r>.json: a non-finite loss of this run_train call
WORKERS = "workers"  # <run_dir>/workers/rank-<r>.json: pid, host, epoch, batch (where each worker is)


# CPUs each read task of the training data reserves: a fraction, so that two reads (one
# decoding while the other waits on storage) share each CPU the training workers leave over.
READ_CPUS = 0.5
# CPUs the workers must leave free on a fixed cluster: Ray Data holds part of its budget
# back per operator, and with 0.5 CPU left over (Ray 2.60) it starts no read at all.
READ_FREE_CPUS = 1.0
# A rank's validation batches are kept in its memory after the first epoch up to this size
# (and read again every epoch when larger): see BatchCache.
VAL_CACHE_BYTES = 512 * 1024**2


class TrainingError(RayscreenError):
    """Training failed on the workers (after Ray's retries); the message carries the cause."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: str  # <output>/train
    artefact: str  # <output>/train/model: the best epoch as a model artefact
    metrics: pd.DataFrame  # one row per epoch (METRIC_COLUMNS)
    epochs_completed: int
    best_epoch: int | None = None


# --------------------------------------------------------------------------- driver


def build_datasets(plan: TrainPlan) -> dict[str, Any]:
    """``{"train": ds, "val_0": ds, ...}``: Ray Datasets of (image, label) rows, one read each.

    Splits select wells by the ``SPLIT_COL`` the plan adds through a platemap, so no
    validation or test field is ever read into the training dataset.
    """
    from ..stream import read_plates

    config, s = plan.config, plan.config.stream
    platemap = plan.wells[["Metadata_Plate", "Metadata_Well", SPLIT_COL, LABEL_COL]].copy()
    # object dtype: store.annotations.override cannot fill an int64 column with missing values
    platemap[LABEL_COL] = pd.Series([int(v) for v in platemap[LABEL_COL]], index=platemap.index, dtype=object)

    def read(name: str):
        ds = read_plates(plan.uris, storage_options=config.storage_options, channels=s.channels,
                         where={SPLIT_COL: name}, platemap=platemap, level=s.level, tile=s.tile, stride=s.stride,
                         illumination=s.illumination, normalize=s.normalize != "none", dtype="float32",
                         on_error=s.on_error,
                         error_report=join(plan.run_dir, "errors") if s.on_error == "skip" else None,
                         override_num_blocks=read_tasks(s.override_num_blocks, config.train.deterministic,
                                                        int((plan.wells[SPLIT_COL] == name).sum())),
                         num_cpus=READ_CPUS, read_threads=s.read_threads)
        return ds.select_columns(["image", LABEL_COL])

    out = {"train": read("train")}
    if plan.repeats and any(v > 1 for v in plan.repeats.values()):
        out["train"] = out["train"].map_batches(repeat_rows, fn_kwargs={"label_col": LABEL_COL,
                                                                         "repeats": plan.repeats},
                                                batch_format="numpy")
    for name in plan.val_names:
        out[name] = read(name)
    return out


# wells per read task of a deterministic run (see read_tasks)
DETERMINISTIC_WELLS_PER_TASK = 8


def read_tasks(override: int | None, deterministic: bool, n_wells: int) -> int | None:
    """Read tasks of one split's stream: ``stream.override_num_blocks`` when set; else, for
    ``train.deterministic``, one per ``DETERMINISTIC_WELLS_PER_TASK`` wells; else ``None``
    (the stream's default, from the cluster's CPUs when the stage starts). The batches of an
    ordered stream follow where its blocks end, so a count taken from the cluster made a
    deterministic run repeat only on a cluster of the same size."""
    if override is not None or not deterministic:
        return override
    return max(1, -(-n_wells // DETERMINISTIC_WELLS_PER_TASK))


def check_cpus(num_workers: int, cpus_per_worker: float, cluster_cpus: float) -> None:
    """Refuse (before any worker starts) a run whose workers fit the cluster but leave
    less than ``READ_FREE_CPUS`` for the reads: the read tasks would wait forever."""
    workers = num_workers * cpus_per_worker
    need = workers + READ_FREE_CPUS
    # only when the workers fit today: a cluster too small for them may be autoscaling
    if workers <= cluster_cpus + 1e-9 < need:
        raise ConfigError(f"train.cpus_per_worker: {num_workers} worker(s) x {cpus_per_worker:g} CPU + "
                          f"{READ_FREE_CPUS:g} CPU for the reads = {need:g} > the cluster's {cluster_cpus:g} CPUs; "
                          "lower train.cpus_per_worker or train.num_workers")


def _storage(plan: TrainPlan) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: remote URIs go through our fsspec
    filesystem (same storage_options as the plates: an S3 endpoint, credentials from the env)."""
    if not is_remote(plan.storage_path):
        return plan.storage_path, None
    import pyarrow.fs

    fs, path = filesystem(plan.storage_path, plan.config.storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def write_split(plan: TrainPlan) -> str:
    """``<run_dir>/split.csv``: Metadata_Plate, Metadata_Well, split, label, label_index."""
    uri = join(plan.run_dir, "split.csv")
    fs, path = filesystem(uri, plan.config.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        plan.wells[["Metadata_Plate", "Metadata_Well", "split", "label", "label_index"]].to_csv(f, index=False)
    return uri


def write_metrics(history: list[dict[str, Any]], run_dir: str, storage_options=None) -> pd.DataFrame:
    """``<run_dir>/metrics.csv`` from the metric history (one dict per epoch)."""
    df = metrics_frame(history)
    fs, path = filesystem(join(run_dir, "metrics.csv"), storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        df.to_csv(f, index=False)
    return df


def metrics_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(history)
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[METRIC_COLUMNS + [c for c in df.columns if c not in METRIC_COLUMNS]].astype(
        {c: float for c in METRIC_COLUMNS if c != "epoch"})


def read_events(run_dir: str, storage_options=None, event: str | None = "start") -> list[dict[str, Any]]:
    """The events of a run directory (``events.jsonl``), oldest first: by default the
    worker-group starts; ``event=None`` for every kind ("start": a worker group, written by
    rank 0; "nonfinite": a run ended by a non-finite loss, written by the driver)."""
    fs, path = filesystem(join(run_dir, EVENTS), storage_options)
    if not fs.exists(path):
        return []
    events = [json.loads(line) for line in fs.cat(path).decode().splitlines() if line.strip()]
    return [e for e in events if event is None or e.get("event") == event]


# A non-finite loss is recorded by each rank that meets it in a file of its own (ranks that
# share weights meet it at the same step, and events.jsonl is rewritten whole on every
# append: two ranks appending at once could truncate it), named by run so that runs in
# one output directory do not read each other's.
def _nonfinite_uri(run_dir: str, run_name: str, rank: int | str) -> str:
    return join(run_dir, NONFINITE, f"{run_name}-rank-{rank}.json")


def write_nonfinite(run_dir: str, run_name: str, record: dict[str, Any], storage_options=None) -> None:
    """Record rank ``record["rank"]``'s non-finite loss (epoch, step, message) for this call."""
    _write_record(_nonfinite_uri(run_dir, run_name, record["rank"]), record, storage_options)


def read_nonfinite(run_dir: str, run_name: str, storage_options=None) -> dict[str, Any] | None:
    """The earliest non-finite loss recorded for ``run_name`` since :func:`clear_nonfinite`
    (by time, then rank), or None. An unreadable record is skipped with a warning."""
    fs, pattern = filesystem(_nonfinite_uri(run_dir, run_name, "*"), storage_options)
    records = []
    for path in fs.glob(pattern):
        try:
            records.append(json.loads(fs.cat(path).decode()))
        except (OSError, ValueError) as e:
            log.warning("train: unreadable non-finite loss record %s (%s); ignored", path, e)
    return min(records, key=lambda r: (r.get("time", 0.0), r.get("rank", 0)), default=None)


def clear_nonfinite(run_dir: str, run_name: str, storage_options=None) -> None:
    """Forget ``run_name``'s non-finite loss records: a new run_train call trains again."""
    fs, pattern = filesystem(_nonfinite_uri(run_dir, run_name, "*"), storage_options)
    for path in fs.glob(pattern):
        fs.rm(path)


def nonfinite_message(record: dict[str, Any]) -> str:
    return (f"the training loss became non-finite at epoch {record['epoch']}, step {record['step']} (rank "
            f"{record['rank']}): {record['message']}. Not retried: Ray Train would restart from the last "
            f"checkpoint before it, where training would most likely diverge again")


def run_train(config: Config, *, progress: bool = True) -> TrainResult:
    """Train ``config.model`` on the plates with Ray Train; export the best epoch.

    Writes ``<output>/train/``: split.csv, metrics.csv, events.jsonl, checkpoints/
    (Ray Train run ``train.run_name``), model/ (the artefact of the best epoch by
    ``train.metric``). Every config problem raises :class:`~rayscreen.config.ConfigError`
    before any worker starts; a run that fails on the workers after
    ``train.max_failures`` retries raises :class:`TrainingError`.
    """
    import ray

    plan = plan_run(config)
    ensure_ray(log_to_driver=progress)
    t = config.train
    check_cpus(t.num_workers, t.cpus_per_worker, ray.cluster_resources().get("CPU", 0))
    write_split(plan)
    write_run_config(plan)
    storage_path, storage_fs = _storage(plan)
    use_gpu, note = resolve_use_gpu("train.use_gpu", t.use_gpu)
    if progress:
        print(note, file=sys.stderr, flush=True)
    else:
        log.debug(note)
    loop_config = {
        # by object reference: Ray Train records its train_loop_config in the run state that the
        # dashboard shows, and the config's storage_options may carry credentials
        "config": ray.put(config.to_dict()), "channels": plan.channels, "classes": plan.classes,
        "normalization": plan.normalization, "val_names": plan.val_names, "run_dir": plan.run_dir,
        "progress": progress, "plates": plan.plate_names,
    }
    # one line per epoch is the progress: no Ray Data bars on the workers
    with stage_data_context():
        trainer = _trainer(plan, loop_config, storage_path, storage_fs, use_gpu)
    # a non-finite loss met in this call ends it without spending train.max_failures
    # restarts on it (train_loop_per_worker); one met in an earlier call does not count
    clear_nonfinite(plan.run_dir, t.run_name, config.storage_options)
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the cause readable
        try:
            nonfinite = read_nonfinite(plan.run_dir, t.run_name, config.storage_options)
            if nonfinite is not None:
                _append(join(plan.run_dir, EVENTS), {"event": "nonfinite", **nonfinite}, config.storage_options)
        except Exception as lookup:  # the run's own error matters more than why its record is unreadable
            log.warning("train: could not read the run's non-finite loss records: %s", lookup)
            nonfinite = None
        if nonfinite is not None:
            raise TrainingError(f"training run {t.run_name!r}: {nonfinite_message(nonfinite)}") from None
        raise TrainingError(f"training run {t.run_name!r} failed: {e}") from e
    return _finish(plan, result)


def _trainer(plan: TrainPlan, loop_config: dict[str, Any], storage_path: str, storage_fs, use_gpu: bool):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    try:
        from ray.train import LoggingConfig
        quiet = {"logging_config": LoggingConfig(log_level="WARNING")}
    except ImportError:  # Ray Train without it (before v2's LoggingConfig): its INFO lines show
        quiet = {}
    from ray.train.torch import TorchTrainer

    t = plan.config.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        datasets=build_datasets(plan),
        # val_<rank> datasets are already one per rank: only the training data is split
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=_ingest_options(t.deterministic)),
        run_config=RunConfig(
            name=t.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute="score",
                                               checkpoint_score_order="max"),
            # Ray Train's own INFO lines ("Checkpoint successfully created at ..." every
            # epoch, from every worker) repeat rayscreen's epoch line; its warnings and errors
            # still show, and Ray's session logs (ray-train-sys-*.log) keep everything. The
            # worker set-up hook cannot do this: Ray Train's logging dictConfig resets the
            # levels of the ray.train.* loggers when a worker starts.
            **quiet,
        ),
    )


def _ingest_options(deterministic: bool):
    """Ray Data options of the training shards: Ray Train's defaults, plus ``preserve_order``
    when ``train.deterministic``. Without it, blocks reach the shuffle buffer in the order
    their read tasks finish, so two runs with the same seed see different batches from the
    first epoch on (measured: the same WSCNN config at 0.60 and 0.87 val accuracy after 10
    epochs); with it, a run is repeatable for a given number of workers."""
    if not deterministic:
        return None  # Ray Train's default_ingest_options
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _finish(plan: TrainPlan, result) -> TrainResult:
    """Metrics from the latest checkpoint, the best checkpoint exported as the artefact."""
    from ..models.artefact import ArtefactMeta, save_artefact

    config = plan.config
    if result.checkpoint is None:
        raise TrainingError(f"training run {config.train.run_name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        latest = load_checkpoint(d)["state"]
    # not result.get_best_checkpoint: among tied scores it returns the earliest kept, where
    # the loop's best_epoch (and Ray's deletion order) take the latest
    best = best_checkpoint(result.best_checkpoints or []) or result.checkpoint
    with best.as_directory() as d:
        loaded = load_checkpoint(d)
    state = loaded["state"]
    if no_finite_score(latest.history):
        log.warning("train: no epoch had a finite %s%s; exported epoch %d anyway", config.train.metric,
                    " with a teacher that had not collapsed" if config.train.distill.enabled else "", state.epoch)
    meta = state.meta
    artefact = join(plan.run_dir, "model")
    epoch_metrics = state.history[-1] if state.history else {}
    save_artefact(artefact, loaded["model"], ArtefactMeta(
        model={"name": config.model.name, "kwargs": {**config.model.kwargs, "in_channels": len(plan.channels),
                                                       "num_classes": len(plan.classes)}},
        channels=plan.channels, classes=plan.classes, normalization=meta.get("normalization"),
        input={"level": config.stream.level, "tile": config.stream.tile, "crop": config.train.crop,
               "mosaic": bool(config.train.augment.enabled and config.train.augment.mosaic),
               "dtype": "float32"},
        epoch=state.epoch, metrics={k: v for k, v in epoch_metrics.items() if v is None or isinstance(v, (int, float))},
        config=config.to_record()), config.storage_options)
    metrics = write_metrics(latest.history, plan.run_dir, config.storage_options)
    return TrainResult(run_dir=plan.run_dir, artefact=artefact, metrics=metrics, epochs_completed=latest.epoch,
                       best_epoch=state.epoch)


# --------------------------------------------------------------------------- worker


def _append(uri: str, line: dict[str, Any], storage_options=None) -> None:
    fs, path = filesystem(uri, storage_options)
    old = fs.cat(path).decode() if fs.exists(path) else ""
    with fs.open(path, "w") as f:  # rewrite: object stores have no append
        f.write(old + json.dumps(line) + "\n")


class BatchCache:
    """Keeps the (images, labels) batches of the first pass over a dataset while they total at
    most ``max_bytes``, so later passes replay them from memory instead of reading again.

    For validation: its batches are the same every epoch (no augmentation, fixed order), and
    each pass over a Ray Dataset is a new execution (planning, read tasks) that can cost more
    than scoring a small validation set. For training (``train.cache_mb``): later epochs take
    the held rows in a new order each (:meth:`shuffled`). A larger set streams every epoch as
    before, and is not held again.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.full = False  # a complete first pass is held
        self._too_large = max_bytes <= 0
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def fill(self, batches):
        """Yield ``batches`` through, keeping them while they fit; complete pass -> ``full``."""
        size, keep = 0, not self._too_large
        self._batches = []
        for images, labels in batches:
            if keep:
                size += images.element_size() * images.nelement() + labels.element_size() * labels.nelement()
                keep = size <= self.max_bytes
                if keep:
                    self._batches.append((images, labels))
                else:  # too large: stream every pass, hold nothing
                    self._batches, self._too_large = [], True
            yield images, labels
        self.full = keep and bool(self._batches)  # an empty pass holds nothing to replay

    def drop(self) -> None:
        """Hold nothing, now and on later passes (another rank's pass did not fit)."""
        self._batches, self._rows, self.full, self._too_large = [], None, False, True

    def batches(self):
        return iter(self._batches)

    def shuffled(self, batch_size: int, generator: torch.Generator):
        """The held rows in the order of a permutation drawn from ``generator``, in batches of
        ``batch_size`` (the last one shorter): images (B, C, H, W), labels (B,). Copies of a
        row (``train.balanced``) land in different batches, where a streaming shuffle buffer
        kept them side by side."""
        images, labels = self._columns()
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield images[idx], labels[idx]

    def sample(self, n: int, batch_size: int, generator: torch.Generator):
        """Images of ``n`` held rows drawn without replacement (all when fewer), in batches of
        ``batch_size``, each gathered when it is asked for (no copy of the sample at once)."""
        images, _ = self._columns()
        order = torch.randperm(len(images), generator=generator)[:n].to(images.device)
        for i in range(0, len(order), batch_size):
            yield images[order[i:i + batch_size]]

    def _columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        # one tensor per column from the first replay on; the batches are let go after the
        # copy, so memory peaks at twice the held bytes once, at the start of epoch 2
        if self._rows is None:
            self._rows = (torch.cat([b[0] for b in self._batches]), torch.cat([b[1] for b in self._batches]))
            self._batches = []
        return self._rows


class BatchReservoir:
    """A uniform sample of ``k`` of the batches offered, kept as they stream past (reservoir
    sampling, Vitter's algorithm R, with a seeded generator of its own): the fields a
    streamed epoch gives :func:`~rayscreen.train.step.recompute_batchnorm`. Its first batches
    would do, but wells stream in plate order, and statistics from the first plates alone
    would be exported for all."""

    def __init__(self, k: int, seed: int):
        self.k = k
        self.generator = torch.Generator().manual_seed(seed)
        self.kept: list[torch.Tensor] = []
        self.seen = 0

    def offer(self, images: torch.Tensor) -> None:
        self.seen += 1
        if len(self.kept) < self.k:
            self.kept.append(images)
            return
        j = int(torch.randint(self.seen, (1,), generator=self.generator))
        if j < self.k:
            self.kept[j] = images


class EarlyStart:
    """An iterator whose first item is fetched at once by a background thread.

    ``next()`` on a Ray Data iterator starts the dataset's execution and blocks until the
    first batch; creating this starts that wait early so it overlaps other work.
    """

    def __init__(self, iterable):
        import threading

        self._it = iter(iterable)
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, daemon=True, name="rayscreen-early-start")
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = [next(self._it)]
        except StopIteration:
            pass
        except BaseException as e:  # re-raised in the consumer
            self._error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            if self._first:
                return self._first.pop()
            raise StopIteration
        return next(self._it)


def _where(run_dir: str, rank: int, epoch: int, batch: int, storage_options=None) -> None:
    """Record which process runs rank ``rank`` and how far it is (operators; the fault test)."""
    _write_record(join(run_dir, WORKERS, f"rank-{rank}.json"), {"pid": os.getpid(), "host": socket.gethostname(),
                                                              "epoch": epoch, "batch": batch, "time": time.time()},
                  storage_options)


def _write_record(uri: str, record: dict[str, Any], storage_options=None) -> None:
    """Write one JSON record to ``uri``, its folder made first (a rank's own file: no other writer)."""
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(record))


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, float) and math.isfinite(v)


def epoch_score(value: float | None, mode: str, collapsed: str | None = None) -> float:
    """The score Ray keeps checkpoints by (higher is better): the metric, negated for a
    loss; -inf for a metric that is not finite, or an epoch whose WS-DINO teacher collapsed
    (its loss can be the run's lowest: one prototype for every field is trivially predicted)."""
    if collapsed or not _finite(value):
        return -math.inf
    return value if mode == "max" else -value


def is_new_best(score: float, value: float | None, best_value: float | None, mode: str) -> bool:
    """Whether an epoch of metric ``value`` (and :func:`epoch_score` ``score``) becomes the
    best epoch. A tie goes to the later epoch, as in :func:`best_checkpoint`: Ray deletes the
    earliest of tied checkpoints first, so the latest tie is the one still kept."""
    if score == -math.inf:
        return False
    return best_value is None or (value >= best_value if mode == "max" else value <= best_value)


def _score_key(metrics: dict[str, Any]) -> tuple[float, int]:
    s = metrics.get("score")
    s = s if isinstance(s, (int, float)) and not math.isnan(s) else -math.inf
    return s, int(metrics.get("epoch") or 0)


def best_checkpoint(kept: list[tuple[Any, dict[str, Any]]]):
    """The checkpoint to export of Ray's kept ``(checkpoint, metrics)`` pairs: the highest
    score, the latest epoch among ties (the rule of :func:`is_new_best`); None when empty."""
    return max(kept, key=lambda pair: _score_key(pair[1]))[0] if kept else None


def no_finite_score(history: list[dict[str, Any]]) -> bool:
    """True when every epoch of a (checkpointed) history scored -inf: ``train.metric`` was
    never finite (or every WS-DINO teacher collapsed). The checkpoint's JSON stores -inf as
    null, so both count."""
    return bool(history) and all(_score_key(h)[0] == -math.inf for h in history)


def epoch_line(epoch: int, epochs: int, metrics: dict[str, Any], fields: int, collapsed: str | None = None,
               distill: bool = False) -> str:
    """The progress line of one epoch (rank 0 writes it; ``fields``: training fields seen)."""
    m = metrics
    return (f"[rayscreen train] epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  "
            + (f"distill_loss {m['train_distill_loss']:.4f}  teacher_entropy "
               f"{m['train_teacher_entropy']:.2f}/{m['train_teacher_batch_entropy']:.2f}  " if distill else "")
            + (f"TEACHER COLLAPSED ({collapsed}: this epoch is never kept)  " if collapsed else "")
            + f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.3f}  "
            f"val_bacc {m['val_balanced_accuracy']:.3f}  val_auc {m['val_roc_auc']:.3f}  "
            f"({m['seconds']:.1f} s, {fields / max(m['seconds'], 1e-9):.1f} fields/s)")


def worker_threads(cpus_per_worker: float, torch_threads: int = 0) -> int:
    """Torch intra-op threads for a CPU worker that reserved ``cpus_per_worker`` CPUs (at
    least 1), or ``torch_threads`` (``train.torch_threads``) when that is set (> 0)."""
    return torch_threads if torch_threads > 0 else max(1, math.ceil(cpus_per_worker - 1e-9))


def _epoch_random(config: Config, rank: int, epoch: int):
    """(generator, augmenter or None) of an epoch, seeded by (train.seed, rank, epoch) so a
    resumed epoch draws what it drew before."""
    from ..stream.augment import Augmenter

    t = config.train
    seed = epoch_seed(t.seed, rank, epoch)
    aug_cfg = augment_config(t.augment)
    return torch.Generator().manual_seed(seed), Augmenter(aug_cfg, seed=seed + 1) if aug_cfg is not None else None


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch crops and mixup (``+ 1``: its augmentation); a pure
    function, so nothing random needs checkpointing for a resumed epoch to repeat.
    (Consecutive epochs' seeds differ by 1, so epoch e's augmentation seed is epoch e + 1's
    crop seed; the two streams drive different draws. Kept as it is: the deterministic runs
    recorded in docs/results.md depend on it.)"""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


def _stream_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    """A seed of its own for one random stream of one rank's epoch: numpy's SeedSequence of
    (seed, rank, epoch, stream), so streams never share a seed with each other or with the
    epoch's crop and augmentation seeds (:func:`epoch_seed`)."""
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def global_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's global generator (dropout) in one rank's epoch."""
    return _stream_seed(seed, rank, epoch, 2)


def order_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's batch order in an epoch replayed from ``train.cache_mb``."""
    return _stream_seed(seed, rank, epoch, 3)


def sample_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of the fields one rank's epoch gives ``train.precise_bn``."""
    return _stream_seed(seed, rank, epoch, 4)


def make_transform(config: Config, rank: int, epoch: int, num_classes: int | None = None,
                   channels: list[str] | None = None):
    """(images, labels) -> (images, labels) for training: mosaics, crops, augmentation,
    mixup (labels become (B, num_classes) soft targets), seeded by (train.seed, rank,
    epoch) so a resumed epoch draws what it drew before. ``channels``: the images' channel
    names (which one is train.nucleus_channel)."""
    from ..stream.augment import class_mosaics

    t = config.train
    generator, augmenter = _epoch_random(config, rank, epoch)
    dna = channels.index(t.nucleus_channel) if t.nucleus_channel and channels else 0

    def transform(images: torch.Tensor, labels: torch.Tensor):
        if t.augment.enabled and t.augment.mosaic:
            images, labels = class_mosaics(images, labels, generator)
        if t.crop and t.crop_centre == "nuclei":
            images = nucleus_crops(images, t.crop, generator, channel=dna)
        elif t.crop:
            images = random_crops(images, t.crop, generator)
        if augmenter is not None:
            images = augmenter(images)
        if t.mixup > 0:
            images, labels = mixup(images, labels, num_classes, t.mixup, generator)
        return images, labels

    return transform


def make_view_fn(config: Config, rank: int, epoch: int):
    """(images, labels) -> WS-DINO views (:func:`.distill.make_views`), seeded like
    :func:`make_transform`."""
    from .distill import make_views

    generator, augmenter = _epoch_random(config, rank, epoch)
    t = config.train
    return lambda images, labels, bank=None: make_views(images, labels, t.distill, t.crop, generator, augmenter, bank)


def deterministic_cuda() -> None:
    """Make this process's CUDA kernels repeatable (``train.deterministic`` on a GPU): the
    data order alone (:func:`_ingest_options`) is enough on CPU, but cuDNN picks convolution
    algorithms by timing and several CUDA kernels accumulate with atomics in any order.
    Kernels without a deterministic version warn instead of failing the run."""
    import os

    import torch

    # cuBLAS needs a fixed workspace to be deterministic; read when CUDA initialises
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: restore, train epochs, report + checkpoint each."""
    import ray.train
    import ray.train.torch

    from ..models import create_model

    # here as well as in the local Ray's worker set-up hook: on a cluster joined through
    # RAY_ADDRESS (ray job submit) there is no hook, and Ray Train's per-epoch
    # "Reporting training result ..." lines would repeat the epoch line below
    quiet_report_logger()
    config = config_from_dict(ray.get(cfg["config"]) if isinstance(cfg["config"], ray.ObjectRef) else cfg["config"])
    t = config.train
    so = config.storage_options
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = cfg["run_dir"]
    # a non-finite loss in an earlier worker group of this run_train call: this restart
    # would resume from the last checkpoint before it and most likely diverge again (a
    # too-high lr is not transient), so it ends here, before building anything, instead of
    # training up to it max_failures times more
    nonfinite = read_nonfinite(run_dir, t.run_name, so)
    if nonfinite is not None:
        raise FloatingPointError(nonfinite_message(nonfinite))
    device = ray.train.torch.get_device()
    amp = t.amp and device.type == "cuda"
    if device.type == "cpu":
        # intra-op threads = the CPUs this worker reserved (rounded up): more would contend with the
        # read tasks and the other workers on the same node, fewer would idle its cores; unless
        # train.torch_threads says otherwise (a cached training set leaves the reads' cores idle)
        torch.set_num_threads(worker_threads(t.cpus_per_worker, t.torch_threads))

    if t.deterministic and device.type == "cuda":
        deterministic_cuda()
    torch.manual_seed(t.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = create_model(config.model.name, in_channels=len(cfg["channels"]), num_classes=len(cfg["classes"]),
                         **model_kwargs(config))
    meta = {"channels": cfg["channels"], "classes": cfg["classes"], "normalization": cfg["normalization"],
            "plates": cfg["plates"], "model": {"name": config.model.name, "kwargs": config.model.kwargs},
            "config": config.to_record()}
    state = TrainState(meta=meta)
    loaded = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            loaded = load_checkpoint(d)
        state = loaded["state"]
        state.meta = meta
    distiller = None
    if t.distill.enabled:
        # WS-DINO: the optimiser trains the net and its projection head together (one DDP
        # module); the checkpoint's model is the network train.distill.export names
        from .distill import DistillNet, Distiller, ProjectionHead, sync_batchnorm

        dc = t.distill
        model = DistillNet(model, ProjectionHead(model.feature_dim, dc.out_dim, dc.hidden, dc.bottleneck))
        if loaded is not None:
            model.load_state_dict(loaded["extra"]["student"])
        if dc.sync_batchnorm:  # before the teacher is copied from it, so both synchronise
            model = sync_batchnorm(model, ray.train.torch.get_device(), world)
        # classify 0 leaves the class head out of the loss: DDP must be told, or the second
        # step fails ("Expected to have finished reduction in the prior iteration"); finding
        # unused parameters costs a graph walk per step
        model = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": True} if dc.classify == 0 else None)
        distiller = Distiller(model, dc)
        if loaded is not None:
            distiller.load_state_dict(loaded["extra"])
    else:
        if loaded is not None:
            model.load_state_dict(loaded["model"])
        model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model.parameters(), t)
    scheduler = make_scheduler(optimizer, t)
    if loaded is not None:
        if loaded["optimizer"] is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        if scheduler is not None and loaded["scheduler"] is not None:
            restore_scheduler(scheduler, loaded["scheduler"], t)
    if rank == 0:
        _append(join(run_dir, EVENTS), {"event": "start", "from_epoch": state.epoch, "world_size": world,
                                        "torch_threads": torch.get_num_threads(), "time": time.time()}, so)
    from_epoch = state.epoch

    train_shard = ray.train.get_dataset_shard("train")
    val_name = f"val_{rank}"
    val_shard = ray.train.get_dataset_shard(val_name) if val_name in cfg["val_names"] else None
    dtypes = {"image": torch.float32, LABEL_COL: torch.int64}
    mode = metric_mode(t.metric)
    val_cache = BatchCache(VAL_CACHE_BYTES)
    train_cache = BatchCache(t.cache_mb * 1024**2)

    def epoch_batches(epoch: int):
        """This epoch's training (images, labels) batches: streamed (the first epoch, or a
        training set larger than train.cache_mb), or replayed from memory in a new order."""
        if train_cache.full:
            return train_cache.shuffled(t.batch_size, torch.Generator().manual_seed(order_seed(t.seed, rank, epoch)))
        stream = EarlyStart(train_shard.iter_torch_batches(
            batch_size=t.batch_size, dtypes=dtypes, device=device, prefetch_batches=2,
            # a streaming shuffle: wells arrive in plate order, batches should not
            local_shuffle_buffer_size=t.shuffle_buffer or max(4 * t.batch_size, 64),
            local_shuffle_seed=t.seed * 7919 + epoch * 31 + rank))
        return train_cache.fill((b["image"], b[LABEL_COL]) for b in stream)

    def exported() -> torch.nn.Module:
        """The network that is validated, checkpointed and exported."""
        if distiller is None:
            return model
        return distiller.teacher.net if t.distill.export == "teacher" else unwrap(model).net

    upcoming = None
    batchnorm, warned_single = has_batchnorm(model), False
    for epoch in range(state.epoch + 1, t.epochs + 1):
        start = time.time()
        # torch's global generator (dropout; CPU and CUDA) restarts per epoch like the
        # epoch's own generators, so a resumed epoch is the epoch an uninterrupted run trains
        # (with train.cache_mb the resumed run streams its first epoch, so its later batches differ)
        torch.manual_seed(global_seed(t.seed, rank, epoch))
        if distiller is None:
            transform = make_transform(config, rank, epoch, len(cfg["classes"]), cfg["channels"])
        else:
            views = make_view_fn(config, rank, epoch)
        loss_sum, n = 0.0, 0
        distill_sums = np.zeros(3)  # self-distillation loss, teacher entropies (x fields)
        cached = train_cache.full
        batches = upcoming if upcoming is not None else epoch_batches(epoch)
        upcoming = None
        # train.precise_bn: a sample of the epoch's fields, as streamed (un-augmented)
        bn_reservoir = (BatchReservoir(max(1, math.ceil(t.precise_bn / t.batch_size)), sample_seed(t.seed, rank, epoch))
                        if t.precise_bn and batchnorm and not cached else None)
        wait, first_wait, i = 0.0, None, 0
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - t0
            if batch is None:
                break
            wait += waited
            first_wait = waited if first_wait is None else first_wait
            images, labels = batch
            if not trainable_batch(len(labels), batchnorm):
                if rank == 0 and not warned_single:
                    log.warning("train: epoch %d ends in a batch of one field, left out (BatchNorm needs two; "
                                "said once): a train.batch_size that leaves no single field over avoids it", epoch)
                warned_single = True
                continue
            if bn_reservoir is not None:
                bn_reservoir.offer(images)
            try:
                if distiller is None:
                    loss = train_step(model, optimizer, images, labels, transform=transform, grad_clip=t.grad_clip,
                                      amp=amp, label_smoothing=t.label_smoothing)
                else:
                    stats = distill_step(model, distiller, optimizer, images, labels, views=views,
                                         grad_clip=t.grad_clip, amp=amp, label_smoothing=t.label_smoothing)
                    loss = stats.loss
                    distill_sums += np.array(stats[1:]) * len(labels)
            except FloatingPointError as e:  # optimizer_step's non-finite loss
                try:
                    write_nonfinite(run_dir, t.run_name, {"rank": rank, "epoch": epoch, "step": i + 1,
                                                          "from_epoch": from_epoch, "message": str(e),
                                                          "time": time.time()}, so)
                except Exception as record:  # the loss is the error to report, not the record's
                    log.warning("train: could not record the non-finite loss: %s", record)
                raise
            loss_sum += loss * len(labels)
            n += len(labels)
            if i == 0:
                _where(run_dir, rank, epoch, i + 1, so)
            i += 1
        train_seconds = time.time() - start
        if t.cache_mb and not cached and every_rank(train_cache.full, device) != train_cache.full:
            train_cache.drop()  # replay on every rank or on none: DDP needs the same steps everywhere
        # start the next epoch's stream early: its read tasks run while this epoch validates
        # and checkpoints, instead of after (the first batch otherwise waits ~0.5 s and more);
        # but not while validation still reads, whose reads it would hold up
        if epoch < t.epochs and (val_shard is None or val_cache.full):
            upcoming = epoch_batches(epoch + 1)
        if t.precise_bn and batchnorm:  # un-augmented whole fields, as validation and inference see them
            sample = (train_cache.sample(t.precise_bn, t.batch_size,
                                         torch.Generator().manual_seed(sample_seed(t.seed, rank, epoch)))
                      if cached else bn_reservoir.kept)
            recompute_batchnorm(unwrap(exported()), sample, amp=amp)
            bn_reservoir = None
            average_batchnorm(exported())  # every rank's sample, not rank 0's alone
        # every rank, with validation wells or not (a collective): validate rank 0's statistics,
        # the ones checkpointed and exported
        broadcast_buffers(exported())
        if val_shard is not None:
            val_batches = val_cache.batches() if val_cache.full else val_cache.fill(
                (b["image"], b[LABEL_COL]) for b in val_shard.iter_torch_batches(
                    batch_size=t.batch_size, dtypes=dtypes, device=device, prefetch_batches=2))
            probs, ys, vloss, vn = predict(exported(), val_batches, amp=amp)
            if epoch < t.epochs and upcoming is None:
                upcoming = epoch_batches(epoch + 1)
        else:
            probs, ys, vloss, vn = np.zeros((0, len(cfg["classes"])), np.float32), np.zeros(0, np.int64), 0.0, 0
        parts = _gather((loss_sum, n, probs, ys, vloss, vn, train_seconds, wait, first_wait or 0.0, distill_sums,
                         cached))
        total = sum(p[1] for p in parts)
        all_probs = np.concatenate([p[2] for p in parts if len(p[2])] or [np.zeros((0, len(cfg["classes"])))])
        all_ys = np.concatenate([p[3] for p in parts])
        metrics = {"epoch": epoch, "train_loss": sum(p[0] for p in parts) / total if total else float("nan"),
                   **classification_metrics(all_ys, all_probs, sum(p[4] for p in parts)),
                   "seconds": time.time() - start, "lr": optimizer.param_groups[0]["lr"],
                   "train_samples": total, "val_samples": len(all_ys),
                   # the slowest rank's training time: what the epoch waited for
                   "train_seconds": max(p[6] for p in parts),
                   # time blocked waiting for training batches (the first includes starting the read)
                   "data_wait_seconds": max(p[7] for p in parts), "first_batch_seconds": max(p[8] for p in parts),
                   # 1: the training fields came from memory (train.cache_mb), not the stream
                   "train_cached": int(all(p[10] for p in parts))}
        collapsed = None
        if distiller is not None:
            means = sum(p[9] for p in parts) / total if total else np.full(3, np.nan)
            metrics.update(train_distill_loss=float(means[0]), train_teacher_entropy=float(means[1]),
                           train_teacher_batch_entropy=float(means[2]))
            collapsed = collapse(means[1], means[2], t.distill.out_dim)
        value = metrics[t.metric]
        metrics["score"] = epoch_score(value, mode, collapsed)
        step_scheduler(scheduler, value)
        if is_new_best(metrics["score"], value, state.best_value, mode):
            state.best_value, state.best_epoch = value, epoch
        state.epoch = epoch
        state.history.append(metrics)
        if rank == 0:
            write_metrics(state.history, run_dir, so)
            if cfg.get("progress", True):
                # sys.stdout.write, not print: Ray Train patches print in its workers to log the
                # line as well as print it, and every epoch line reached the console twice
                sys.stdout.write(epoch_line(epoch, t.epochs, metrics, total, collapsed, distiller is not None) + "\n")
                sys.stdout.flush()
            with tempfile.TemporaryDirectory() as d:
                extra = None if distiller is None else {"student": unwrap(model).state_dict(),
                                                        **distiller.state_dict()}
                save_checkpoint(d, state, unwrap(exported()).state_dict(), optimizer.state_dict(),
                                scheduler.state_dict() if scheduler is not None else None, extra=extra)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics, checkpoint=None)
