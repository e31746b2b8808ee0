"""Everything about a training run that can be decided on the driver, before any worker.

:func:`plan_run` opens the plates' metadata, resolves labels and splits, and makes every
bad-config check (issue 6, item 7) so that a mistake fails in a second, naming the
key, instead of after a cluster has started workers.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..config import Config, ConfigError, config_from_dict, mask_record
from ..store import RayscreenError, open_plate
from ..store.uri import filesystem, join
from ..stream.datasource import check_plate_set, in_threads, open_plates
from .labels import LABEL_COL, UNLABELLED, resolve_labels
from .splits import assign_splits, check_split, check_split_config

log = logging.getLogger(__name__)

SPLIT_COL = "Metadata_TrainSplit"  # "train", "val/<rank>", "test", "none": which dataset a well feeds
CONFIG_FILE = "rayscreen_config.json"  # the config a run was started with, beside Ray's run state
SPLIT_FILE = "rayscreen_split.json"  # its classes and each well's split (plan.split_record), beside it
METRICS = ("train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_precision", "val_recall",
           "val_f1", "val_roc_auc")
# keys that may change when a run resumes: they change how, not what, is trained
RESUMABLE = ("train.epochs", "train.max_failures", "train.num_workers", "train.use_gpu",
             "train.cpus_per_worker", "train.torch_threads", "train.keep_checkpoints", "train.cache_mb",
             # how the plates are read, not what is trained: on_error: skip is the way past a bad field
             "stream.on_error", "stream.override_num_blocks", "stream.read_threads")
# sections that do not affect training (a later stage's settings)
# storage_options and output say how the data and the run are reached (credentials rotate; a
# relative and an absolute output name one run), not what is trained; platemap is a path too
# (made absolute since): what it changes, each well's label and split, the split record checks.
# plates likewise (made absolute in session 18; a screen moved to S3 keeps its plates): which
# plates and wells a run trains on, with their labels and splits, is the split record's
UNRELATED = ("infer", "profile", "analysis", "report", "stages", "storage_options", "output", "platemap",
             "plates")


@dataclass
class TrainPlan:
    config: Config
    uris: list[str]
    plate_names: list[str]
    channels: list[str]  # channel names the model sees, in order
    classes: list[str]
    wells: pd.DataFrame  # Metadata_Plate, Metadata_Well, split, label, label_index (+ SPLIT_COL, LABEL_COL)
    normalization: dict[str, Any] | None  # what the stream applies: method + per-plate fitted statistics
    run_dir: str  # <output>/train
    storage_path: str  # <output>/train/checkpoints
    resume: bool  # a run of this name exists (Ray Train restores its latest checkpoint)
    repeats: dict[int, int] | None  # class-balanced repetition factors, or None
    val_names: list[str]  # val datasets, one per rank that has validation wells


def annotations_of(config: Config, uris: list[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """All plates' well annotations (platemap applied), plate names and the common channels.

    Raises naming the plates when channel sets differ or two plates share a name, and naming
    the channel when ``stream.channels`` asks for one the plates lack (``check_plate_set``).
    """
    plates = list(zip(uris, open_plates(uris, config.storage_options, platemap=config.platemap)))
    channels = check_plate_set(plates, config.stream.channels, error=ConfigError)
    return pd.concat([p.annotations for _, p in plates], ignore_index=True), [p.name for _, p in plates], channels


def _normalization(config: Config, uris: list[str]) -> dict[str, Any] | None:
    """What the stream will apply: ``{"method", "illumination", "plates": {plate name:
    scaler dict}}``. Each plate's scaler is loaded and checked once, by the stream's own
    checker (:func:`stream_normalizer`: missing, stale or another method's); any failure
    is a :class:`ConfigError` naming the plate."""
    method = config.stream.normalize
    if method == "none":
        return {"method": "none", "illumination": config.stream.illumination, "plates": {}}
    from ..stream.normalize import stream_normalizer

    def scaler_of(uri: str) -> tuple[str, dict[str, Any]]:
        try:
            scaler = stream_normalizer(uri, config.storage_options, illumination=config.stream.illumination,
                                       method=method, level=config.stream.level)
        except RayscreenError as e:
            raise ConfigError(f"stream.normalize: {method!r}: {e}") from None
        return open_plate(uri, config.storage_options).name, scaler.to_dict()

    plates = dict(in_threads(scaler_of, uris))  # a few requests per plate: in the planning threads
    return {"method": method, "illumination": config.stream.illumination, "plates": plates}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("kwargs", "storage_options", "column_values"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``Config.to_dict()``s, ignoring the
    resumable keys and later stages' sections. A key the stored record lacks (a run started
    by a rayscreen from before the key existed) counts as its default, the behaviour that
    rayscreen had then: otherwise no run could be resumed across an upgrade."""
    a, b = _flatten(stored), _flatten(current)
    defaults = _flatten(_default_record())
    keys = sorted(set(a) | set(b))
    return [k for k in keys if not k.startswith(UNRELATED) and k not in RESUMABLE
            and a.get(k, defaults.get(k)) != b.get(k)]


def _default_record() -> dict[str, Any]:
    """Every key's default, as a ``Config.to_record()`` (placeholder plates and output)."""
    return config_from_dict({"plates": ["-"], "output": "-"}).to_record()


def split_record(wells: pd.DataFrame, classes: list[str]) -> dict[str, Any]:
    """What a run trains and validates on, as JSON: the classes in label-index order and
    ``[plate, well, split, label_index]`` per well (the split, not the val rank it is dealt
    to: that follows ``train.num_workers``, which may change on resume)."""
    rows = wells[["Metadata_Plate", "Metadata_Well", "split", "label_index"]].itertuples(index=False)
    return {"classes": [str(c) for c in classes],
            "wells": [[str(p), str(w), str(s), int(i)] for p, w, s, i in rows]}


def split_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How two :func:`split_record` s differ, one phrase per class list or well
    (``"PA/A01: train -> val"``, ``"PA/A02: label 0 -> 1"``, ``"PC/A01: new"``,
    ``"PB/B02: gone"``); empty when they are the same. Changed classes come first, then
    wells trained on that would now be validated or tested on (the worst), then the rest."""
    first, leaks, rest = [], [], []
    if stored["classes"] != current["classes"]:
        first.append(f"classes {stored['classes']} -> {current['classes']}")
    old = {(p, w): (s, i) for p, w, s, i in stored["wells"]}
    new = {(p, w): (s, i) for p, w, s, i in current["wells"]}
    for key in sorted(set(old) | set(new)):
        name = "/".join(key)
        if key not in new:
            rest.append(f"{name}: gone")
        elif key not in old:
            rest.append(f"{name}: new")
        elif old[key][0] != new[key][0]:
            (leaks if old[key][0] == "train" and new[key][0] in ("val", "test") else rest).append(
                f"{name}: {old[key][0]} -> {new[key][0]}")
        elif old[key][1] != new[key][1]:
            rest.append(f"{name}: label {old[key][1]} -> {new[key][1]}")
    return first + leaks + rest


def check_resume(config: Config, storage_path: str, run_name: str, split: dict[str, Any] | None = None) -> bool:
    """True when run ``run_name`` exists and was started with an equivalent config and, when
    ``split`` (:func:`split_record`) is given, the same classes and split of wells; raises
    :class:`ConfigError` listing the keys, classes or wells that differ."""
    fs, path = filesystem(join(storage_path, run_name), config.storage_options)
    if not fs.exists(path):
        return False
    stored_file = f"{path}/{CONFIG_FILE}"
    if not fs.exists(stored_file):
        raise ConfigError(f"train.run_name: {run_name!r} exists under {storage_path} but holds no {CONFIG_FILE}; "
                          "choose another train.run_name")
    stored = json.loads(fs.cat(stored_file))
    # a record written before rayscreen masked URL passwords in every URI: masked the same way
    diff = config_differences(mask_record(stored), config.to_record())
    if diff:
        raise ConfigError(f"train.run_name: run {run_name!r} exists and was started with a different config "
                          f"({', '.join(diff[:8])} differ); refusing to resume it. Use a new train.run_name "
                          "to start fresh, or restore those keys to resume")
    # the split is recomputed from the data, which a same config can still change (a plate the
    # plates: glob now matches, an edited platemap): wells the model trained on could become
    # validation or test wells, and label indices could shift under the checkpoint
    split_file = f"{path}/{SPLIT_FILE}"
    if split is not None and fs.exists(split_file):  # absent: a run started before the split was kept
        changes = split_differences(json.loads(fs.cat(split_file)), split)
        if changes:
            raise ConfigError(f"train.run_name: run {run_name!r} exists but the plates and labels now give another "
                              f"split or classes than it was started with ({len(changes)} change(s), e.g. "
                              f"{'; '.join(changes[:5])}); refusing to resume it, as wells it trained on could be "
                              "validated or tested on. Use a new train.run_name to start fresh, or restore the "
                              "plates and platemap it was started with")
    return True


def exported_run(run_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """``train.run_name`` of the run whose model is exported at ``<run_dir>/model`` (from the
    config its artefact.json records), or None when there is none. ``model/``, metrics.csv and
    split.csv are one per output, whatever the run's name: a run under a new name replaces them."""
    from ..models.artefact import read_meta  # torch: only when a run is planned

    try:
        meta = read_meta(join(run_dir, "model"), storage_options)
    except (RayscreenError, OSError):  # none, or unreadable: the run's own export will say so if it matters
        return None
    return str((meta.config.get("train") or {}).get("run_name", "train"))


def write_run_config(plan: TrainPlan) -> None:
    """The run's config and split (:func:`split_record`) beside Ray's run state, which
    :func:`check_resume` compares on the next start. The split is written once, when the
    run starts (or on the first resume of a run from before it was kept), and never
    replaced; the config goes last, as the marker of a complete run directory."""
    fs, path = filesystem(join(plan.storage_path, plan.config.train.run_name), plan.config.storage_options)
    fs.makedirs(path, exist_ok=True)
    split_file = f"{path}/{SPLIT_FILE}"
    if not fs.exists(split_file):
        with fs.open(split_file, "w") as f:
            f.write(json.dumps(split_record(plan.wells, plan.classes)))
    with fs.open(f"{path}/{CONFIG_FILE}", "w") as f:
        f.write(json.dumps(plan.config.to_record(), default=str))


def check_train_values(config: Config) -> None:
    """The ``train`` and ``model`` settings that need no plate: values of the right type that
    training cannot use, and the model's name (its registry). Raises :class:`ConfigError`
    naming the key. :func:`plan_run` calls it; ``rayscreen run`` calls it before its first
    stage, so a typo fails in seconds, not after ``illum`` has fitted every plate."""
    from ..models import list_models

    t = config.train
    if t.num_workers < 1:
        raise ConfigError(f"train.num_workers: {t.num_workers}; expected >= 1")
    if t.epochs < 1 or t.batch_size < 1:
        raise ConfigError(f"train.epochs={t.epochs}, train.batch_size={t.batch_size}: both must be >= 1")
    # math.isfinite first: NaN passes every comparison, and an inf lr or CPU count fails only on the workers
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"train.lr: {t.lr}; expected a finite number > 0")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay: {t.weight_decay}; expected a finite number >= 0")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum: {t.momentum}; expected 0 <= value < 1")
    # a negative norm would flip every gradient (the optimiser would climb the loss), 0 zero them
    if t.grad_clip is not None and not (math.isfinite(t.grad_clip) and t.grad_clip > 0):
        raise ConfigError(f"train.grad_clip: {t.grad_clip}; expected the largest gradient norm, a finite "
                          "number > 0, or null for no clipping")
    if t.max_failures < 0:
        raise ConfigError(f"train.max_failures: {t.max_failures}; expected >= 0 (Ray's retries after a failure)")
    if t.keep_checkpoints is not None and t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: {t.keep_checkpoints}; expected >= 1, or null to keep every "
                          "epoch's checkpoint")
    if t.metric not in METRICS:
        raise ConfigError(f"train.metric: {t.metric!r}; expected one of {list(METRICS)}")
    if not (math.isfinite(t.cpus_per_worker) and t.cpus_per_worker > 0):
        raise ConfigError(f"train.cpus_per_worker: {t.cpus_per_worker}; expected a finite number > 0")
    if t.crop is not None and t.crop < 8:
        raise ConfigError(f"train.crop: {t.crop}; expected a size of at least 8 pixels or null")
    if t.mixup < 0:
        raise ConfigError(f"train.mixup: {t.mixup}; expected the Beta parameter alpha > 0 (e.g. 0.2), or 0 for off")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: {t.label_smoothing}; expected 0 <= value < 1")
    if t.torch_threads < 0:
        raise ConfigError(f"train.torch_threads: {t.torch_threads}; expected torch threads per CPU worker >= 0 "
                          "(0: its train.cpus_per_worker, rounded up)")
    if t.cache_mb < 0:
        raise ConfigError(f"train.cache_mb: {t.cache_mb}; expected MB of training fields to hold >= 0 (0: off)")
    if t.precise_bn < 0:
        raise ConfigError(f"train.precise_bn: {t.precise_bn}; expected a number of training fields >= 0 (0: off)")
    from .step import augment_config  # torch: imported only when a run is planned

    try:  # the stream's AugmentConfig holds the bounds; its messages start with the key
        augment_config(t.augment, always=True)
    except ValueError as e:
        raise ConfigError(f"train.augment.{e}") from None
    if t.shuffle_buffer is not None and t.shuffle_buffer < t.batch_size:
        raise ConfigError(f"train.shuffle_buffer: {t.shuffle_buffer}; expected at least train.batch_size "
                          f"({t.batch_size}) rows, or null for the default")
    _check_distill(t)
    check_split_config(t.split)
    if config.model.name not in list_models():
        raise ConfigError(f"model.name: unknown model {config.model.name!r}; expected one of: "
                          f"{', '.join(list_models())}")


def plan_run(config: Config) -> TrainPlan:
    """Resolve and check a training run; raises :class:`ConfigError` (or
    :class:`RayscreenError` for unreadable plates) before anything starts."""
    from ..stream import expand_uris

    t = config.train
    check_train_values(config)
    if not config.plates:
        raise ConfigError("plates: no plate given")
    try:
        uris = expand_uris(config.plates, config.storage_options)
    except RayscreenError as e:
        raise ConfigError(f"plates: {e}") from None
    annotations, names, channels = annotations_of(config, uris)
    if t.crop_centre == "nuclei":
        if t.crop is None:
            raise ConfigError("train.crop_centre: nuclei centres crops on nuclei: set train.crop (their size, px)")
        if t.distill.enabled:
            raise ConfigError("train.crop_centre: nuclei is not supported with train.distill (its views are "
                              "random crops); use crop_centre: random")
        if t.nucleus_channel is not None and t.nucleus_channel not in channels:
            raise ConfigError(f"train.nucleus_channel: {t.nucleus_channel!r} is not a streamed channel; expected "
                              f"one of {list(channels)}")
    h, w = streamed_field_size(config, uris[0])  # what each training step gets (one metadata read)
    if t.crop is not None and t.crop > min(h, w):
        raise ConfigError(f"train.crop: {t.crop} is larger than the {'tiles' if config.stream.tile else 'fields'} "
                          f"({h} x {w})")
    labels, classes = resolve_labels(annotations, config.label)
    if t.distill.enabled:
        _check_distill_fields(config, (h, w), len(channels), len(classes))
    splits = assign_splits(annotations, labels, t.split)
    wells = annotations[["Metadata_Plate", "Metadata_Well"]].copy()
    wells["split"] = splits
    wells["label_index"] = labels
    wells["label"] = [classes[i] if i != UNLABELLED else None for i in labels]
    check_split(wells, classes)

    # validation wells dealt round-robin to the ranks: each rank reads only its own, no row is dropped
    dataset = wells["split"].astype(object).to_numpy().copy()
    val_idx = np.flatnonzero(dataset == "val")
    val_names = []
    for r in range(min(t.num_workers, len(val_idx))):
        dataset[val_idx[r::t.num_workers]] = f"val_{r}"
        val_names.append(f"val_{r}")
    wells[SPLIT_COL] = dataset
    wells[LABEL_COL] = labels

    _check_model(config, len(channels), len(classes), (h, w))
    normalization = _normalization(config, uris)
    repeats = None
    if t.balanced:
        from .step import balance_repeats

        counts = wells.loc[wells["split"] == "train", "label_index"].value_counts()
        repeats = balance_repeats({int(k): int(v) for k, v in counts.items()})
    run_dir = join(config.output, "train")  # absolute when local (config_from_dict): see store.uri.absolute
    storage_path = join(run_dir, "checkpoints")
    resume = check_resume(config, storage_path, t.run_name, split_record(wells, classes))
    previous = exported_run(run_dir, config.storage_options)
    if previous is not None and previous != t.run_name:
        log.warning("train: %s/model holds the model exported by run %r; run %r replaces it (and metrics.csv, "
                    "split.csv) when it finishes. To keep both, give this run another output", run_dir, previous,
                    t.run_name)
    return TrainPlan(config=config, uris=uris, plate_names=names, channels=channels, classes=classes, wells=wells,
                     normalization=normalization, run_dir=run_dir, storage_path=storage_path, resume=resume,
                     repeats=repeats, val_names=val_names)


def _check_distill(t) -> None:
    """``train.distill`` (WS-DINO) settings that cannot work, named by key."""
    d = t.distill
    if not d.enabled:
        return
    if t.mixup > 0 or t.augment.mosaic:
        raise ConfigError("train.distill: WS-DINO draws its own views of each field; turn train.mixup (0) and "
                          "train.augment.mosaic (false) off")
    if t.precise_bn:
        # the exported network is the teacher, an average of the student's weights whose own
        # statistics are averaged alike; with SyncBN a recomputation would be a collective
        raise ConfigError("train.precise_bn: not with train.distill (WS-DINO's teacher averages its statistics "
                          "with its weights); set it to 0")
    numbers = ("weight", "classify", "student_temp", "teacher_temp", "momentum", "center_momentum")
    for key in numbers:  # NaN passes every comparison below
        if not math.isfinite(getattr(d, key)):
            raise ConfigError(f"train.distill.{key}: {getattr(d, key)}; expected a finite number")
    if d.pair_by == "image" and t.crop is None and not t.augment.enabled:
        raise ConfigError("train.distill.pair_by: 'image' with train.crop null and train.augment off makes both "
                          "views of a field the same image (nothing to learn); set train.crop or turn "
                          "train.augment on, or pair_by: label")
    if d.weight < 0 or d.classify < 0 or d.weight + d.classify == 0:
        raise ConfigError(f"train.distill.weight {d.weight}, train.distill.classify {d.classify}: expected "
                          "weights >= 0, not both 0")
    if d.student_temp <= 0 or d.teacher_temp <= 0:
        raise ConfigError(f"train.distill.student_temp {d.student_temp}, teacher_temp {d.teacher_temp}: "
                          "expected > 0 (DINO: 0.1 and 0.04)")
    for key in ("momentum", "center_momentum"):
        if not 0 <= getattr(d, key) < 1:
            raise ConfigError(f"train.distill.{key}: {getattr(d, key)}; expected 0 <= value < 1")
    if min(d.out_dim, d.hidden, d.bottleneck) < 2:
        raise ConfigError(f"train.distill: out_dim {d.out_dim}, hidden {d.hidden}, bottleneck {d.bottleneck}; "
                          "expected sizes >= 2")
    if d.bank < 0:
        raise ConfigError(f"train.distill.bank: {d.bank}; expected >= 0 fields per label")
    if d.local_crops < 0:
        raise ConfigError(f"train.distill.local_crops: {d.local_crops}; expected >= 0")
    if d.local_crops and (d.local_crop < 8 or (t.crop is not None and d.local_crop > t.crop)):
        raise ConfigError(f"train.distill.local_crop: {d.local_crop}; expected at least 8 px and at most "
                          f"train.crop ({t.crop})")
    if d.classify == 0 and t.metric != "train_loss":
        raise ConfigError(f"train.metric: {t.metric!r} with train.distill.classify 0: the class head is not "
                          "trained, so its validation metrics cannot pick an epoch; set train.metric: train_loss")


# the most memory WS-DINO's field bank may hold per training worker
BANK_BYTES = 2 * 1024**3


def streamed_field_size(config: Config, uri: str) -> tuple[int, int]:
    """(height, width) of the images the stream gives a model: ``stream.tile`` when it
    tiles, else the fields of the plate at ``uri`` at ``stream.level`` (plates of one run
    share a field shape)."""
    s = config.stream
    if s.tile:
        return s.tile, s.tile
    _, y, x = open_plate(uri, config.storage_options).shape
    return y >> s.level, x >> s.level


def _check_distill_fields(config: Config, field_size: tuple[int, int], channels: int, classes: int) -> None:
    """``train.distill`` against the (height, width) of the streamed fields: local views must
    fit in them, and the field bank must hold at most BANK_BYTES."""
    d = config.train.distill
    h, w = field_size
    if d.local_crops and d.local_crop > min(h, w):
        raise ConfigError(f"train.distill.local_crop: {d.local_crop} px is larger than the fields ({h} x {w})")
    nbytes = classes * d.bank * channels * h * w * 4
    if d.pair_by == "label" and nbytes > BANK_BYTES:
        raise ConfigError(f"train.distill.bank: {d.bank} fields x {classes} classes of {channels} x {h} x {w} "
                          f"float32 = {nbytes / 1024**3:.1f} GiB per worker (at most {BANK_BYTES / 1024**3:g} GiB); "
                          "lower it, or stream tiles (stream.tile)")


def model_kwargs(config: Config) -> dict[str, Any]:
    """The builder kwargs of ``model``: the config's, plus its ``storage_options`` when a
    milnet trunk's ``trunk_weights`` are read from a URI (an S3 endpoint of the user's own; the
    options are not put into the recorded kwargs, which keep the config's)."""
    kwargs = dict(config.model.kwargs)
    if kwargs.get("trunk_weights") and config.storage_options:
        kwargs["storage_options"] = config.storage_options
    return kwargs


def _check_model(config: Config, in_channels: int, num_classes: int, field_size: tuple[int, int]) -> None:
    """Build the model once on the driver (CPU, cheap) so a bad name or kwarg fails here, and
    check that what the workers will feed it (crops, tiles or fields at the stream's level,
    ``field_size`` (height, width)) is not below its smallest input: every step would fail
    there, after the cluster started and retried."""
    from ..models import create_model

    try:
        model = create_model(config.model.name, in_channels=in_channels, num_classes=num_classes,
                             **model_kwargs(config))
    except KeyError as e:
        raise ConfigError(f"model.name: {e.args[0] if e.args else e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.kwargs: {e}") from None
    min_size = int(getattr(model, "min_size", 1))
    t, s = config.train, config.stream
    fed, key = ((t.crop, t.crop), "train.crop") if t.crop is not None else (
        (field_size, "stream.tile") if s.tile else (field_size, f"stream.level ({s.level}: fields of that level)"))
    if min(fed) < min_size:
        raise ConfigError(f"{key}: the network gets {fed[0]} x {fed[1]} px, smaller than the smallest input of "
                          f"{config.model.name} ({min_size} x {min_size} px); use larger crops or tiles, a finer "
                          "level, or a model with less down-sampling")
    d = config.train.distill
    if not d.enabled:
        return
    if not (hasattr(model, "features") and hasattr(model, "feature_dim")):
        raise ConfigError(f"train.distill: model {config.model.name!r} has no profile features "
                          "(a class-map net such as milnet or wscnn is needed)")
    if d.local_crops and d.local_crop < getattr(model, "min_size", 1):
        raise ConfigError(f"train.distill.local_crop: {d.local_crop} px is smaller than the smallest input of "
                          f"{config.model.name} ({model.min_size} px)")
