"""The WSCNN simulation benchmark (benchmarks/wscnn_sim.py) end to end on its ``smoke``
preset: data -> run_train on the local Ray -> artefact -> test/Sim Data 2 scoring ->
saliency masks chosen on validation -> localisation -> table. One model (max pooling,
the one that also scores Sim Data 2 and draws the figure) to stay within the time budget;
accuracy is not asserted (one epoch on 16 images): for the accuracies this is a smoke test
(they are produced, k/16 of the test images); the localisation counts are checked against
the objects the synth planted.
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
    # the smoke preset: 48 images in 12 wells of 4 fields, thirds per label -> 2 + 2 test wells
    assert summary["n_test_images"] == 16 and summary["n_simdata2_test_images"] == 16
    assert summary["n_test_positive_images"] == 8
    for key in ("test_accuracy", "simdata2_accuracy"):  # k of the 16 test images right
        k = r[key] * 16 / 100
        assert k == pytest.approx(round(k), abs=1e-9) and 0 <= round(k) <= 16, (key, r[key])

    # localisation is scored on the objects the synth planted in the positive test images:
    # 4-6 objects each, of which max(1, round(0.1 * n)) = 1 circle (the rare object)
    from rayscreen.synth.wscnn import load_wscnn_objects, wscnn_layout

    preset = bench.PRESETS["smoke"]
    layout = wscnn_layout(preset["n_images"], preset["fields_per_well"], seed=0, name_prefix="simdata1")
    test_pos = layout[(layout["Metadata_Split"] == "test") & (layout["Metadata_Label"] == "positive")]
    assert len(test_pos) == 2
    planted = load_wscnn_objects(os.path.join(out, "data", "simdata1")).merge(test_pos[["plate", "well"]])
    assert planted.groupby(["well", "field"]).ngroups == 8
    assert int(planted["rare"].sum()) == 8 and planted.groupby(["well", "field"])["rare"].sum().eq(1).all()
    c = r["loc_counts"]
    assert c["tp"] + c["fn"] == 8  # every planted circle is scored, once
    assert c["fp"] + c["tn"] == int((~planted["rare"]).sum())  # and every planted ellipse
    assert r["loc_recall"] == pytest.approx(100 * c["tp"] / 8)
    assert r["loc_accuracy"] == pytest.approx(100 * (c["tp"] + c["tn"]) / len(planted))
    assert np.isnan(r["loc_precision"]) == (c["tp"] + c["fp"] == 0)  # undefined only when nothing is covered
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
