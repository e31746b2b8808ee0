"""The README's main job, end to end on the local Ray (what `make demo` runs)."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from rayscreen.analysis._table import control_mask
from rayscreen.demo import run_demo
from rayscreen.store import open_plate
from rayscreen.synth import load_moa_fields

pytestmark = pytest.mark.integration


def test_demo_runs_the_whole_pipeline(tmp_path, ray_local, capsys, monkeypatch):
    import xarray as xr

    out = tmp_path / "demo"
    # a relative output, as `make demo` gives it (Ray Train runs its workers in a directory of
    # its own); fewer epochs than the demo's default: the test checks the wiring, the demo
    # shows the figures
    monkeypatch.chdir(tmp_path)
    summary = run_demo("demo", quiet=True, overrides=["train.epochs=2"])
    assert len(summary["plates"]) == 2 and summary["fields"] == 288
    # ingest: the ingested plates hold the synthetic screen's pixels and annotations
    synth = open_plate(str(out / "synth" / "moa-p01.zarr"))
    ingested = open_plate(summary["plates"][0])
    assert ingested.channels == synth.channels == ["DNA", "Actin", "Tubulin"]
    for well in ingested.wells[::16]:
        assert (ingested.read(well, 2) == synth.read(well, 2)).all()
    assert len(load_moa_fields(str(out / "synth"))) == 288

    run = out / "run"
    # every stage left its completion marker, and the outputs are there
    for stage in ("illum", "train", "infer", "profile", "aggregate", "evaluate", "report"):
        assert (run / "stages" / f"{stage}.json").exists(), stage
    results = xr.open_zarr(str(run / "results.zarr"))
    assert results.sizes["well"] == 96 and bool((results["done"] == 1).all())
    assert int(results["n_fields"].sum()) == 288
    # infer.labels: the masks are in the plates as NGFF label images, at full resolution
    from rayscreen.store.labels import read_label

    plate, well = str(results["well"].values[5]).split("/")
    uri = next(u for u in summary["plates"] if open_plate(u).name == plate)
    mask = results["mask"].values[5, 1]
    np.testing.assert_array_equal(read_label(uri, well, 1, "saliency"), np.kron(mask, np.ones((2, 2), np.uint8)))
    profiles = xr.open_zarr(str(run / "profiles.zarr"))
    assert profiles.sizes["well"] == 96
    with open(run / "evaluation" / "evaluation.json") as f:
        ev = json.load(f)
    # the classical baseline retrieves MOAs far above chance (1/6) on this screen
    assert ev["feature_sets"]["classical"]["nsc"] > 0.4
    # treated wells differ from DMSO on this screen: hits are called (controls never are)
    assert ev["n_hits"] > 0
    # and wells the model scores above their plate's DMSO wells for some MOA (aggregate tabled
    # infer's well scores); never a control
    score_hits = pd.read_csv(run / "evaluation" / "hits_score.csv")
    assert ev["n_hits_score"] == len(score_hits) > 0
    assert not control_mask(score_hits, kind="any", required=False).any()
    assert 0 <= summary["test_well_accuracy"] <= 1 and summary["test_wells"] > 0
    assert os.path.exists(summary["report"])
    printed = capsys.readouterr().out
    assert "NSC" in printed and "report" in printed and str(summary["report"]) in printed
    assert "labels/saliency" in printed  # demo.yaml sets infer.labels: saliency

    # a rerun of the pipeline skips every complete stage
    from rayscreen.config import load_config
    from rayscreen.pipeline import run_pipeline

    config = load_config(str(out / "demo.yaml"), overrides={"train.epochs": 2})
    results_done = run_pipeline(config, progress=False)
    assert all(v == "skipped" for k, v in results_done.items() if k != "report")
