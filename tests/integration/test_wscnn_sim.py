"""The WSCNN simulation benchmark (benchmarks/wscnn_sim.py) end to end on its ``smoke``
preset: data -> run_train on the local Ray -> artefact -> test/Sim Data 2 scoring ->
saliency masks chosen on validation -> localisation -> table. One model (max pooling,
the one that also scores Sim Data 2 and draws the figure) to stay within the time budget;
accuracy is not asserted (one epoch on 16 images), only that every figure is produced,
in range and consistent with its counts.
"""

import json
import os

import numpy as np
import pytest

from ..bench_loader import load_benchmark

pytestmark = pytest.mark.integration

def test_smoke_preset_produces_the_table(ray_local, tmp_path):
    bench = load_benchmark("wscnn_sim")
    out, fig = str(tmp_path / "out"), str(tmp_path / "fig.png")
    summary = bench.run("smoke", out, ["max"], seed=0, figure_path=fig, progress=False)

    r = summary["results"]["max"]
    for key in ("test_accuracy", "simdata2_accuracy", "loc_accuracy"):
        assert 0.0 <= r[key] <= 100.0, (key, r[key])
    # the smoke preset: 48 images in 12 wells of 4 fields, thirds per label -> 2 + 2 test wells
    assert summary["n_test_images"] == 16 and summary["n_simdata2_test_images"] == 16
    assert summary["n_test_positive_images"] == 8
    # localisation figures agree with their counts (precision may be undefined: nothing covered)
    c = r["loc_counts"]
    assert c["tp"] + c["fn"] >= summary["n_test_positive_images"]  # >= 1 circle per positive image
    assert r["loc_recall"] == pytest.approx(100 * c["tp"] / (c["tp"] + c["fn"]))
    assert r["loc_accuracy"] == pytest.approx(100 * (c["tp"] + c["tn"]) / sum(c.values()))
    assert np.isnan(r["loc_precision"]) or 0.0 <= r["loc_precision"] <= 100.0
    assert r["epochs"] == 1 and len(r["val_accuracy_by_epoch"]) == 1
    # mask parameters come from the validation grid of the preset
    assert r["mask_params"]["sigma"] in bench.PRESETS["smoke"]["loc_grid"]["sigma"]

    lines = summary["table"].splitlines()
    assert lines[0].startswith("| model | Sim Data 1 test acc.") and len(lines) == 3
    assert lines[2].startswith("| WSCNN-Max |") and "(99.62)" in lines[2] and "(97.19)" in lines[2]
    with open(os.path.join(out, "wscnn_sim.json")) as f:
        assert json.load(f)["results"]["max"]["test_accuracy"] == pytest.approx(r["test_accuracy"])
    assert os.path.getsize(fig) > 1000
    # the model really came from the project's training path
    assert os.path.exists(os.path.join(out, "runs", "max", "train", "model", "artefact.json"))
