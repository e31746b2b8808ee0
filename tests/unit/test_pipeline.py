"""The pipeline's completion markers: what makes a stage stale, and the cascade after a rerun."""

import shutil

import pytest

from rayscreen import pipeline
from rayscreen.config import config_from_dict


def _config(tmp_path, **sections):
    return config_from_dict({"plates": ["P.zarr"], "output": str(tmp_path / "out"), **sections})


@pytest.mark.parametrize("stage, key, value, stale", [
    ("illum", "platemap", "other.csv", True),
    # which wells are controls: only the control normaliser reads it (test below)
    ("illum", "analysis", {"control_value": "cpd1"}, False),
    ("illum", "analysis", {"whiten": True}, False),  # not read by illum
    # aggregate / evaluate may read infer's results store: the model and its training count
    ("aggregate", "train", {"epochs": 7}, True),
    ("evaluate", "infer", {"batch_size": 3}, True),
    ("evaluate", "model", {"kwargs": {"width": 0.5}}, True),
    ("train", "analysis", {"whiten": True}, False),
])
def test_fingerprint_follows_what_a_stage_reads(tmp_path, stage, key, value, stale):
    base = _config(tmp_path)
    changed = _config(tmp_path, **{key: value})
    assert (pipeline.fingerprint(base, stage) != pipeline.fingerprint(changed, stage)) is stale


def test_the_control_normaliser_makes_illum_depend_on_the_control_wells(tmp_path):
    base = _config(tmp_path, stream={"normalize": "control"})
    changed = _config(tmp_path, stream={"normalize": "control"}, analysis={"control_value": "cpd1"})
    assert pipeline.fingerprint(base, "illum") != pipeline.fingerprint(changed, "illum")


def write_output_of(config, stage):
    """What shows that a stage ran (the report's STAGE_OUTPUTS), written by a stand-in stage."""
    from pathlib import Path

    from rayscreen.report.run import STAGE_OUTPUTS

    for rel in STAGE_OUTPUTS.get(stage, [])[:1]:
        path = Path(config.output) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if stage in ("infer", "profile"):  # a real (one-well) store, finished
            import pandas as pd

            from rayscreen.store.results import Variable, create_results

            writer = create_results(str(path), pd.DataFrame({"plate": ["P"], "well": ["A01"]}), {},
                                    [Variable("score", ("well",), "float32")], kind="results", overwrite=True)
            writer.write_well(0, {"score": 1.0})
            writer.finalize()
        else:
            path.write_text("x")


def test_a_stage_that_runs_again_reruns_every_later_one(tmp_path, monkeypatch):
    calls = []

    def fake(stage):
        def run(config, progress=True):
            calls.append(stage)
            write_output_of(config, stage)
            return stage
        return run

    # the stages' own work is tested elsewhere; here only the pipeline's bookkeeping
    monkeypatch.setattr(pipeline, "stage_function", fake)
    config = _config(tmp_path)
    stages = ["illum", "profile", "aggregate", "evaluate"]
    pipeline.run_pipeline(config, stages=stages, progress=False)
    assert calls == stages
    calls.clear()
    assert set(pipeline.run_pipeline(config, stages=stages, progress=False).values()) == {"skipped"}
    assert calls == []
    # profile runs again (its marker is gone: an interrupted rerun, a store deleted by hand):
    # everything after it runs too, though aggregate's and evaluate's own markers still match
    (tmp_path / "out" / "stages" / "profile.json").unlink()
    results = pipeline.run_pipeline(config, stages=stages, progress=False)
    assert results["illum"] == "skipped" and calls == ["profile", "aggregate", "evaluate"]


def test_a_stage_marker_summarises_a_dataclass_result_by_its_scalars(tmp_path, monkeypatch):
    """train returns a TrainResult (a dataclass holding a metrics table): its marker keeps the
    run directory and epochs, not a truncated repr of the table."""
    import dataclasses
    import json

    import pandas as pd

    @dataclasses.dataclass
    class Result:
        run_dir: str
        epochs_completed: int
        metrics: pd.DataFrame

    monkeypatch.setattr(pipeline, "stage_function",
                        lambda stage: lambda config, progress=True: Result("/r", 3, pd.DataFrame({"a": [1]})))
    config = _config(tmp_path)
    pipeline.run_pipeline(config, stages=["train"], progress=False)
    marker = json.loads((tmp_path / "out" / "stages" / "train.json").read_text())
    assert marker["result"] == {"run_dir": "/r", "epochs_completed": 3}


def test_how_plates_are_read_leaves_every_stage_complete(tmp_path):
    """on_error: skip is the way past a bad field; it used to invalidate illum (and so every
    stage) and make train refuse to resume its finished run."""
    base = _config(tmp_path)
    changed = _config(tmp_path, stream={"on_error": "skip", "override_num_blocks": 8, "read_threads": 2})
    for stage in ("illum", "train", "infer", "profile", "aggregate", "evaluate"):
        assert pipeline.fingerprint(base, stage) == pipeline.fingerprint(changed, stage)
    assert pipeline.fingerprint(base, "profile") != pipeline.fingerprint(
        _config(tmp_path, stream={"level": 1}), "profile")  # what is read still counts
    tiled = _config(tmp_path, stream={"tile": 16, "stride": 8})  # read by training only
    assert pipeline.fingerprint(base, "train") != pipeline.fingerprint(tiled, "train")
    for stage in ("illum", "infer", "profile", "aggregate", "evaluate"):
        assert pipeline.fingerprint(base, stage) == pipeline.fingerprint(tiled, stage), stage


def test_a_plate_new_to_the_glob_or_an_edited_platemap_makes_stages_stale(tmp_path):
    import os

    from rayscreen.testing import make_plate

    make_plate(str(tmp_path / "screen" / "A.zarr"), "A", wells=("A01",), fields=1)
    platemap = tmp_path / "platemap.csv"
    platemap.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound\nA,A01,DMSO\n")
    config = config_from_dict({"plates": [str(tmp_path / "screen" / "*.zarr")], "platemap": str(platemap),
                               "output": str(tmp_path / "out")})
    before = {s: pipeline.fingerprint(config, s) for s in ("illum", "train", "profile", "evaluate")}
    assert before == {s: pipeline.fingerprint(config, s) for s in before}  # stable while nothing changes
    make_plate(str(tmp_path / "screen" / "B.zarr"), "B", wells=("A01",), fields=1)
    after_plate = {s: pipeline.fingerprint(config, s) for s in before}
    assert all(after_plate[s] != before[s] for s in before)
    platemap.write_text("Metadata_Plate,Metadata_Well,Metadata_Compound\nA,A01,taxol\n")  # a well relabelled
    os.utime(platemap, (1, 1))  # and however the clock stands, the size changed
    assert all(pipeline.fingerprint(config, s) != after_plate[s] for s in before)


def test_a_stage_whose_output_was_deleted_is_not_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "stage_function",
                        lambda stage: lambda config, progress=True: write_output_of(config, stage))
    config = _config(tmp_path)
    pipeline.run_pipeline(config, stages=["profile", "aggregate"], progress=False)
    assert pipeline.is_complete(config, "profile") and pipeline.is_complete(config, "aggregate")
    shutil.rmtree(tmp_path / "out" / "profiles.zarr")
    assert not pipeline.is_complete(config, "profile") and pipeline.is_complete(config, "aggregate")


def test_a_plate_that_arrives_while_a_stage_runs_is_new_work_for_the_next_run(tmp_path, monkeypatch):
    from rayscreen.testing import make_plate

    make_plate(str(tmp_path / "screen" / "A.zarr"), "A", wells=("A01",), fields=1)

    def stage(config, progress=True):
        write_output_of(config, "profile")  # processed A; then B lands in the folder
        make_plate(str(tmp_path / "screen" / "B.zarr"), "B", wells=("A01",), fields=1)

    monkeypatch.setattr(pipeline, "stage_function", lambda name: stage)
    config = config_from_dict({"plates": [str(tmp_path / "screen" / "*.zarr")], "output": str(tmp_path / "out")})
    pipeline.run_stage(config, "profile", progress=False)
    assert not pipeline.is_complete(config, "profile")


def test_a_config_the_stage_refuses_does_not_replace_the_outputs_record(tmp_path, monkeypatch):
    """`rayscreen train C --set train.lr=0` is refused by the stage's own checks, after the
    config was recorded: <output>/config.yaml then said lr 0 for an output made with another.
    A stage that fails after starting keeps the new record (it says what ran)."""
    import yaml

    from rayscreen.config import ConfigError

    def stage_fn(config, progress=True):
        if config.train.epochs == 99:
            raise ConfigError("train.epochs: refused by the stage")
        if config.train.epochs == 98:
            raise RuntimeError("crashed half-way")

    monkeypatch.setattr(pipeline, "stage_function", lambda stage: stage_fn)
    record = tmp_path / "out" / "config.yaml"
    pipeline.run_stage(_config(tmp_path, train={"epochs": 3}), "train", progress=False)
    assert yaml.safe_load(record.read_text())["train"]["epochs"] == 3
    with pytest.raises(ConfigError):
        pipeline.run_stage(_config(tmp_path, train={"epochs": 99}), "train", progress=False)
    assert yaml.safe_load(record.read_text())["train"]["epochs"] == 3
    with pytest.raises(RuntimeError):
        pipeline.run_stage(_config(tmp_path, train={"epochs": 98}), "train", progress=False)
    assert yaml.safe_load(record.read_text())["train"]["epochs"] == 98
    record.unlink()  # a first run refused: no record left behind
    fresh = _config(tmp_path / "new", train={"epochs": 99})
    with pytest.raises(ConfigError):
        pipeline.run_stage(fresh, "train", progress=False)
    assert not (tmp_path / "new" / "out" / "config.yaml").exists()


def test_a_stage_that_left_wells_for_later_is_not_complete(tmp_path, monkeypatch):
    """illum/infer/profile under on_error: skip leave out the wells an ingest has not written
    yet; nothing in the config or the plates' listing changes when it finishes, so the marker
    must say the stage is not done, or `rayscreen run` would skip it for good."""
    returned = {}
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: lambda config, progress=True: dict(returned))
    config = _config(tmp_path)
    returned.update(wells_to_retry=2)
    pipeline.run_stage(config, "illum", progress=False)
    assert not pipeline.is_complete(config, "illum")
    returned.update(wells_to_retry=0)
    pipeline.run_stage(config, "illum", progress=False)
    assert pipeline.is_complete(config, "illum")


def test_a_refit_of_a_plates_corrections_makes_infer_and_profile_stale(tmp_path):
    """`rayscreen illum` refitted a plate's normaliser (run on its own, or after an ingest
    finished): infer and profile must run again to score that plate's wells again."""
    from rayscreen.stream.normalize import MeanStdScaler, fit_plate_normalizer, save_normalization
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "A.zarr"), "A", wells=("A01", "A02"), fields=1)
    save_normalization(uri, fit_plate_normalizer(uri, MeanStdScaler()))
    config = config_from_dict({"plates": [uri], "output": str(tmp_path / "out"), "stream": {"normalize": "meanstd"}})
    stages = ("train", "infer", "profile")
    before = {s: pipeline.fingerprint(config, s) for s in stages}
    assert before == {s: pipeline.fingerprint(config, s) for s in stages}
    scaler = fit_plate_normalizer(uri, MeanStdScaler())
    scaler.scale = scaler.scale * 2
    save_normalization(uri, scaler)
    after = {s: pipeline.fingerprint(config, s) for s in stages}
    assert after["infer"] != before["infer"] and after["profile"] != before["profile"]
    assert after["train"] == before["train"]


def test_a_rerun_that_dies_half_way_leaves_the_stage_not_complete(tmp_path, monkeypatch):
    """A forced (or cascaded) rerun rewrites a finished stage's output and crashes: the last
    run's marker must not keep saying the half-rewritten output is complete. And a results
    store that says it is unfinished is not complete whatever the marker says."""
    from rayscreen.store.results import ResultsWriter

    crash = {"on": False}

    def stage(config, progress=True):
        write_output_of(config, "aggregate")
        if crash["on"]:
            raise RuntimeError("died half way")

    monkeypatch.setattr(pipeline, "stage_function", lambda name: stage)
    config = _config(tmp_path)
    pipeline.run_stage(config, "aggregate", progress=False)
    assert pipeline.is_complete(config, "aggregate")
    crash["on"] = True
    with pytest.raises(RuntimeError):
        pipeline.run_stage(config, "aggregate", progress=False)
    assert not pipeline.is_complete(config, "aggregate")

    monkeypatch.setattr(pipeline, "stage_function",
                        lambda name: lambda config, progress=True: write_output_of(config, name))
    pipeline.run_stage(config, "infer", progress=False)
    assert pipeline.is_complete(config, "infer")
    ResultsWriter(str(tmp_path / "out" / "results.zarr")).update_attrs(complete=False)
    assert not pipeline.is_complete(config, "infer")


@pytest.mark.parametrize("section, value, message", [
    ("train", {"epochs": 0}, r"train.epochs=0, train.batch_size=32: both must be >= 1"),
    ("train", {"split": {"val": 0.6, "test": 0.6}}, r"train.split: val=0.6, test=0.6"),
    ("train", {"split": {"by": "column"}}, r"train.split.column: required for by: column"),
    ("model", {"name": "resnet"}, r"model.name: unknown model 'resnet'; expected one of: .*wscnn"),
    ("profile", {"backbone": "resnet19"}, r"profile.backbone: unknown backbone 'resnet19'; expected one of: "),
    ("analysis", {"feature_select": ["varience"]}, r"analysis.feature_select: unknown operation\(s\) \['varience'\]"),
])
def test_run_checks_later_stages_settings_before_its_first_stage(tmp_path, monkeypatch, section, value, message):
    """A bad train value, model, backbone or feature selection failed only when its stage
    ran: after illum had fitted every plate. Nothing runs, and no stage is recorded."""
    from rayscreen.config import ConfigError

    calls = []
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: lambda config, progress=True: calls.append(stage))
    config = _config(tmp_path, **{section: value})
    with pytest.raises(ConfigError, match=message):
        pipeline.run_pipeline(config, stages=["illum", "train", "infer", "profile", "aggregate"], progress=False)
    assert calls == [] and not (tmp_path / "out" / "stages").exists()
    pipeline.run_pipeline(config, stages=["illum"], progress=False)  # without train: not its business
    assert calls == ["illum"]
