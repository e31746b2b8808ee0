"""The pipeline's completion markers: what makes a stage stale, and the cascade after a rerun."""

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


def test_a_stage_that_runs_again_reruns_every_later_one(tmp_path, monkeypatch):
    calls = []

    def fake(stage):
        def run(config, progress=True):
            calls.append(stage)
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
