"""Every preset of benchmarks/wscnn_sim.py builds a valid training config for every
pooling, without Ray or data: the ``paper`` preset is meant for a GPU and its settings
(full width, 210 x 280 fields, rotation / translation / scaling augmentation) are not run
by the CPU tests, so a config error would otherwise show only after its 4000 images
were written."""

import pytest
import torch

from rayscreen.models import create_model

from ..bench_loader import load_benchmark

bench = load_benchmark("wscnn_sim")


@pytest.mark.parametrize("preset_name", sorted(bench.PRESETS))
@pytest.mark.parametrize("pooling", bench.POOLINGS)
def test_preset_train_config_is_valid(preset_name, pooling, tmp_path):
    preset = bench.PRESETS[preset_name]
    config = bench.train_config([str(tmp_path / "plate.zarr")], str(tmp_path / "run"), pooling, preset)
    t = config.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr) == (preset["epochs"], preset["batch_size"],
                                                        preset["optimizer"], preset["lr"])
    assert config.model.kwargs["pooling"] == pooling
    assert t.augment.enabled == preset["augment"]["enabled"]
    # the model training would build from this config takes the preset's fields (the FC
    # head only if it was sized for the preset's final class maps)
    model = create_model(config.model.name, in_channels=1, num_classes=2, **config.model.kwargs).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, *preset["shape"]))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_paper_preset_keeps_the_papers_settings():
    p = bench.PRESETS["paper"]
    assert (p["n_images"], p["shape"], p["grid"], p["n_objects"]) == (4000, (210, 280), (6, 8), (30, 48))
    assert (p["optimizer"], p["lr"], p["momentum"], p["weight_decay"], p["batch_size"]) == ("sgd", 1e-4, 0.9, 5e-4, 50)
    assert p["width"] is None  # 50 / 100 / 100 filters
    aug = p["augment"]
    assert aug["flips"] and aug["rotate"] and aug["translate"] == 40.0 and aug["scale"] == [0.8, 1.2]


def test_fc_grid_matches_the_papers_maps():
    # 210 x 280 through conv 11 / pool / conv 3 / pool / conv 5 pad 1 / pool / conv 5 pad 1:
    # the paper's FC layer sees 21 x 30 maps; small's 105 x 140 fields give 8 x 12
    assert bench.class_map_grid(bench.PRESETS["paper"]) == [21, 30]
    assert bench.class_map_grid(bench.PRESETS["small"]) == [8, 12]


def _two_objects_per_image(n: int = 4):
    """n 40 x 60 images, each with a circle box at the left and an ellipse box at the right."""
    import pandas as pd

    rows = []
    for i in range(n):
        rows.append(dict(image=i, y0=10, x0=5, y1=26, x1=21, rare=True))
        rows.append(dict(image=i, y0=10, x0=35, y1=26, x1=51, rare=False))
    return pd.DataFrame(rows)


def test_mask_params_choose_the_saliency_method_that_localises_on_validation():
    import numpy as np

    objects = _two_objects_per_image()
    on_circle = np.zeros((4, 40, 60), np.float32)
    on_circle[:, 8:28, 3:23] = 1.0  # evidence over each circle's box
    on_ellipse = np.zeros_like(on_circle)
    on_ellipse[:, 8:28, 33:53] = 1.0
    grid = dict(saliency=["jacobian", "cam"], sigma=[2.0], threshold=[0.1], nms_size=[25])
    chosen = bench.choose_mask_params({"jacobian": on_ellipse, "cam": on_circle}, objects, grid)
    assert chosen["saliency"] == "cam" and chosen["val_recall"] == 1.0 and chosen["val_precision"] == 1.0
    chosen = bench.choose_mask_params({"jacobian": on_circle, "cam": on_ellipse}, objects, grid)
    assert chosen["saliency"] == "jacobian" and chosen["val_f1"] == 1.0
    # a grid without the key keeps the plain Jacobian (older presets, --set loc_grid=...)
    assert bench.grid_methods(dict(sigma=[2.0])) == ["jacobian"]


@pytest.mark.parametrize("method", bench.SALIENCY_METHODS)
def test_saliency_of_each_method_has_the_fields_shape(method):
    import numpy as np

    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=1, num_classes=2, width=0.25).eval()
    images = np.random.default_rng(0).random((3, 1, 64, 96), dtype=np.float32)
    sal = bench.saliency_of(model, images, method, batch=2)
    assert sal.shape == (3, 64, 96) and np.isfinite(sal).all() and (sal >= 0).all() and sal.max() > 0
    with pytest.raises(ValueError, match="saliency method"):
        bench.saliency_of(model, images, "gradcam")


def test_the_grid_search_scores_the_masks_that_localise_makes():
    """choose_mask_params smooths once per (method, sigma); its figures must be those of
    localise (the path the test split takes) at the chosen parameters."""
    import numpy as np

    rng = np.random.default_rng(0)
    objects = _two_objects_per_image(6)
    maps = rng.random((6, 40, 60), dtype=np.float32)
    maps[:, 8:28, 3:23] += rng.random((6, 1, 1), dtype=np.float32) * 3  # evidence of varying strength
    grid = dict(saliency=["jacobian"], sigma=[1.0, 3.0], threshold=[0.2, 0.5, 0.8], nms_size=[11, 25])
    chosen = bench.choose_mask_params({"jacobian": maps}, objects, grid)
    direct, _ = bench.localise(maps, objects, chosen["sigma"], chosen["threshold"], chosen["nms_size"])
    assert (chosen["val_precision"], chosen["val_recall"]) == (direct["precision"], direct["recall"])
    assert chosen["val_f1"] == max(bench.f1(bench.localise(maps, objects, s, t, n)[0])
                                   for s in grid["sigma"] for t in grid["threshold"] for n in grid["nms_size"])
