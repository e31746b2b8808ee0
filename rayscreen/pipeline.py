"""Run the stages of one config in order: ``rayscreen run CONFIG`` / ``jobs/pipeline.py``.

Each stage is a function ``run_<stage>(config, *, progress) -> result`` that is itself
resumable (it skips work whose outputs are complete). The pipeline adds one more
level: when a stage finishes it writes ``<output>/stages/<stage>.json`` holding a
fingerprint of what that stage reads: the config sections, the plates the ``plates``
globs match now, and the size and modification stamp of the files the config names
(platemap, QC annotations, model artefact, backbone weights). A later run skips the
stage when the marker's fingerprint matches and its output is still there, and reruns
it when any of that changed.

A stage, and ``run`` across all its stages, holds ``<output>/.rayscreen.lock``
(:mod:`.store.lock`): a second run on the same output fails naming the first instead of
overwriting its stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Callable

from .config import Config, ConfigError, write_config
from .store.lock import describe, live_holder, output_lock
from .store.uri import expand_uris, filesystem, join, remove

log = logging.getLogger(__name__)

STAGES = ("illum", "train", "infer", "profile", "aggregate", "evaluate", "report")

# which config sections (or dotted keys) each stage's outputs depend on, for the completion
# fingerprint; a stage also depends on what the stages before it read (the control wells of
# illum's normaliser come from the platemap and analysis.control_*; aggregate and evaluate
# may read infer's results store, so the model and its training count too)
_TRAINED = ("label", "model", "train")
_READS = {
    "illum": ("plates", "platemap", "stream", "analysis.control_column", "analysis.control_value"),
    "train": ("plates", "platemap", "stream", *_TRAINED),
    "infer": ("plates", "platemap", "stream", *_TRAINED, "infer"),
    "profile": ("plates", "platemap", "stream", "profile"),
    "aggregate": ("plates", "platemap", "stream", *_TRAINED, "infer", "profile", "analysis"),
    "evaluate": ("plates", "platemap", "stream", *_TRAINED, "infer", "profile", "analysis"),
    "report": (),  # cheap: always rerun
}
# how the plates are read, not what is computed: a rerun with on_error: skip (the way past a
# bad field), more read tasks or fewer fields read at once must not invalidate finished stages
# (train would refuse to resume a finished run for it), nor must a key new to an upgrade
_HOW = ("on_error", "override_num_blocks", "read_threads")
# stream keys only training reads (infer scores whole fields, profile has profile.tiles); a
# change retrains, and every later stage runs again after a stage that ran
_TRAIN_ONLY = ("tile", "stride")
# config keys naming files whose contents a stage reads; each counts where its section does
_FILES = ("platemap", "analysis.qc.annotations", "infer.checkpoint", "profile.weights")


def stage_function(stage: str) -> Callable[..., Any]:
    """The function behind ``rayscreen <stage> CONFIG`` (imported lazily: stages pull in torch/Ray)."""
    if stage == "illum":
        from .stream.fit import run_illum as fn
    elif stage == "train":
        from .train import run_train as fn
    elif stage == "infer":
        from .infer import run_infer as fn
    elif stage == "profile":
        from .profile import run_profile as fn
    elif stage == "aggregate":
        from .analysis.stages import run_aggregate as fn
    elif stage == "evaluate":
        from .analysis.stages import run_evaluate as fn
    elif stage == "report":
        from .report import run_report as fn
    else:
        raise ConfigError(f"unknown stage {stage!r}; expected one of: {', '.join(STAGES)}")
    return fn


def applicable_stages(config: Config) -> list[str]:
    """The stages this config asks for: ``stages:`` when given, else those its sections make sense for."""
    if config.stages is not None:
        for s in config.stages:
            if s not in STAGES:
                hint = f" (a list is written [{s}]: e.g. --set 'stages=[{s}]')" if "," in s else ""
                raise ConfigError(f"stages: unknown stage {s!r}; expected some of: {', '.join(STAGES)}{hint}")
        return [s for s in STAGES if s in config.stages]
    out = []
    if config.stream.illumination or config.stream.normalize != "none":
        out.append("illum")
    if config.label.column:
        out += ["train", "infer"]
    elif config.infer.checkpoint:
        out.append("infer")
    out += ["profile", "aggregate", "evaluate", "report"]
    return out


def fingerprint(config: Config, stage: str) -> str:
    """A digest of what ``stage`` reads: its config sections (without :data:`_HOW`), the plate
    URIs the ``plates`` globs match now (a plate added to ``screen/*.zarr`` is new work), and
    a stamp of each file of :data:`_FILES` in those sections (an edited platemap relabels wells)."""
    d = dataclasses.asdict(config)
    d["stream"] = {k: v for k, v in d["stream"].items()
                   if k not in _HOW and (stage == "train" or k not in _TRAIN_ONLY)}
    relevant: dict[str, Any] = {}
    for key in _READS[stage]:
        if key.startswith("analysis.control_") and config.stream.normalize != "control":
            continue  # only the control normaliser reads which wells are controls
        relevant[key] = _value(d, key)
    if "plates" in relevant:
        relevant["plates (matched)"] = expand_uris(config.plates, config.storage_options)
    if stage in ("infer", "profile"):
        # the plates' stored corrections, which `rayscreen illum` may have refitted since (an
        # ingest finished): the stage then scores those plates' wells again. Not train's: a
        # model trained before a refit is still a model, and retraining is not a rerun's to start
        relevant["plate corrections"] = _corrections(config, relevant["plates (matched)"])
    for key in _FILES:
        if key.split(".")[0] in relevant and _value(d, key):
            relevant[f"{key} (file)"] = _stamp(_value(d, key), config.storage_options)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _corrections(config: Config, uris: list[str]) -> dict[str, str | None]:
    """``{plate URI: corrections_version}``; a plate that cannot be read counts as such (the
    stage itself says why, naming it)."""
    from .store.errors import RayscreenError
    from .stream.normalize import corrections_versions

    try:
        return corrections_versions({u: u for u in uris}, config.storage_options,
                                    illumination=config.stream.illumination, normalize=config.stream.normalize)
    except RayscreenError as e:
        return {"unreadable": type(e).__name__}


def _value(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d


def _stamp(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """Size and modification stamp of a file, or of every file under a directory (a model
    artefact); "missing" when absent. Cheap on S3 (listings, no reads): an ETag or mtime
    that changes without the contents is a needless rerun, which resumes quickly."""
    fs, path = filesystem(uri, storage_options)
    try:
        infos = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        return "missing"
    keys = ("size", "ETag", "mtime", "LastModified", "last_modified")
    return sorted((name.rsplit("/", 1)[-1] if name == path else name[len(path):],
                   [str(info.get(k)) for k in keys if info.get(k) is not None]) for name, info in infos.items())


def _marker(config: Config, stage: str) -> str:
    return join(config.output, "stages", f"{stage}.json")


def is_complete(config: Config, stage: str) -> bool:
    """Whether ``stage`` finished on what it reads now, and its output is still there
    (a deleted results store is work to redo, not a stage to skip)."""
    from .report.run import STAGE_OUTPUTS

    if not _READS[stage]:
        return False
    fs, path = filesystem(_marker(config, stage), config.storage_options)
    if not fs.exists(path):
        return False
    try:
        marker = json.loads(fs.cat(path))
    except ValueError:
        return False
    # partial: it left out wells an ingest had not written yet, which a later run must do
    if marker.get("fingerprint") != fingerprint(config, stage) or marker.get("partial"):
        return False
    if stage in ("infer", "profile"):
        # a store that a later forced or cascaded rerun left unfinished is not complete
        # whatever the marker says (the marker is withdrawn at the start of a run; this
        # covers stores changed by hand or by the stage run outside `rayscreen run`)
        from .store.errors import RayscreenError
        from .store.results import results_attrs

        try:
            attrs = results_attrs(join(config.output, STAGE_OUTPUTS[stage][0]), config.storage_options)
        except RayscreenError:
            return False
        return bool(attrs and attrs.get("complete"))
    outputs = STAGE_OUTPUTS.get(stage)
    return not outputs or any(fs.exists(filesystem(join(config.output, rel), config.storage_options)[1])
                              for rel in outputs)


def _mark_complete(config: Config, stage: str, seconds: float, result: Any, print_: str) -> None:
    """``print_``: the fingerprint taken when the stage started (a plate that arrives while it
    runs was not processed: the next run must see it as new)."""
    fs, path = filesystem(_marker(config, stage), config.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps({"stage": stage, "fingerprint": print_, "partial": _partial(config, stage, result),
                            "seconds": round(seconds, 1), "result": _summary(result)}, default=str))


def _partial(config: Config, stage: str, result: Any) -> bool:
    """Whether ``stage`` left out wells that a later run must do: wells of plates rayscreen
    wrote that had no field yet (an ingest still running, under ``stream.on_error: skip``) or
    none readable. Nothing about the config or the plates' listing changes when the ingest
    finishes, so without this ``rayscreen run`` would skip the stage for good."""
    if isinstance(result, dict) and result.get("wells_to_retry"):
        return True  # illum
    if stage in ("infer", "profile"):
        from .store.errors import RayscreenError
        from .store.results import results_attrs

        store = join(config.output, "results.zarr" if stage == "infer" else "profiles.zarr")
        try:
            return bool((results_attrs(store, config.storage_options) or {}).get("wells_to_retry"))
        except RayscreenError:  # no store of ours there (a stage run elsewhere): nothing to retry
            return False
    return False


def _summary(result: Any) -> Any:
    """A stage's result for its marker: scalars as they are, dicts and dataclasses (train's
    TrainResult) by their scalar entries; tables and arrays left out."""
    if isinstance(result, (str, int, float, type(None))):
        return result
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return repr(result)[:200]


def run_stage(config: Config, stage: str, *, progress: bool = True) -> Any:
    """One stage, with its completion marker, holding the output's lock (one run per output).

    ``report`` only reads the run and writes ``<output>/report/``: while another run holds
    the output it still runs (a look at a long run's progress), without the lock and
    without touching the run's ``config.yaml`` or stage markers."""
    fn = stage_function(stage)
    if stage == "report":
        holder = live_holder(config.output, config.storage_options)
        if holder is not None:
            _say(progress, f"report: {config.output} is in use by {describe(holder, time.time())}; "
                           "reporting the run so far")
            return fn(config, progress=progress)
    with output_lock(config.output, f"rayscreen {stage}", config.storage_options):
        start = time.perf_counter()
        print_ = fingerprint(config, stage) if _READS[stage] else ""
        before = _read_text(join(config.output, "config.yaml"), config.storage_options)
        marker = _read_text(_marker(config, stage), config.storage_options)
        # withdrawn first: a rerun (forced, or after an earlier stage ran again) that dies half
        # way must not leave the last run's marker saying the half-rewritten output is complete
        remove(_marker(config, stage), config.storage_options)
        write_config(config)  # first: a stage that crashes half-way still says what it ran with
        try:
            result = fn(config, progress=progress)
        except ConfigError:
            # refused by the stage's own checks before it did anything: the output's record of
            # how it was made stays the one of the run that made it
            _restore_text(join(config.output, "config.yaml"), before, config.storage_options)
            if marker is not None:  # nothing was touched: the last run's record stands
                _restore_text(_marker(config, stage), marker, config.storage_options)
            raise
        _mark_complete(config, stage, time.perf_counter() - start, result, print_)
    return result


def _read_text(uri: str, storage_options) -> str | None:
    fs, path = filesystem(uri, storage_options)
    return fs.cat(path).decode() if fs.exists(path) else None


def _restore_text(uri: str, text: str | None, storage_options) -> None:
    if text is None:
        remove(uri, storage_options)
    else:
        fs, path = filesystem(uri, storage_options)
        fs.pipe(path, text.encode())


def planned_stages(config: Config, stages: list[str] | None = None) -> list[str]:
    """``stages`` in pipeline order (default: :func:`applicable_stages`); unknown names raise."""
    unknown = [s for s in (stages or []) if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; expected some of: {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages] if stages else applicable_stages(config)


def run_pipeline(config: Config, *, stages: list[str] | None = None, progress: bool = True,
                 force: bool = False) -> dict[str, Any]:
    """Run ``stages`` (default: :func:`applicable_stages`) in order; skip complete ones unless ``force``."""
    todo = planned_stages(config, stages)
    check_settings(config, todo)
    with output_lock(config.output, "rayscreen run", config.storage_options):
        return _run_stages(config, todo, progress, force)


def check_settings(config: Config, todo: list[str]) -> None:
    """The settings of later stages that need no plate, checked before the first stage runs:
    a bad ``train.epochs`` or ``model.name`` otherwise fails after ``illum`` has fitted every
    plate (minutes to hours on a large screen)."""
    if "train" in todo:
        from .train.plan import check_train_values

        check_train_values(config)
    if "profile" in todo:
        from .models import list_models

        if config.profile.backbone not in list_models("backbone"):  # the registry profile builds from
            raise ConfigError(f"profile.backbone: unknown backbone {config.profile.backbone!r}; expected one of: "
                              f"{', '.join(list_models('backbone'))}")
    if "aggregate" in todo:
        from .analysis.feature_select import check_operations

        try:
            check_operations(config.analysis.feature_select)
        except ValueError as e:
            raise ConfigError(f"analysis.feature_select: {e}") from None


def _run_stages(config: Config, todo: list[str], progress: bool, force: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for i, stage in enumerate(todo, 1):
        if not force and is_complete(config, stage):
            _say(progress, f"[{i}/{len(todo)}] {stage}: complete, skipped")
            results[stage] = "skipped"
            continue
        # a stage that runs may change what every later stage reads: they run too (each
        # stage resumes its own work, so a later stage with nothing new to do is quick)
        force = True
        _say(progress, f"[{i}/{len(todo)}] {stage} ...")
        start = time.perf_counter()
        results[stage] = run_stage(config, stage, progress=progress)
        _say(progress, f"[{i}/{len(todo)}] {stage}: done in {time.perf_counter() - start:.1f} s")
    return results


def _say(progress: bool, message: str) -> None:
    # pipeline stage lines are the job log's backbone: printed (flushed) unless --quiet
    if progress:
        print(f"[rayscreen] {message}", flush=True)
    log.debug(message)
