"""Predictor on plain arrays (no Ray): known answers from a hand-built class-map model."""

import numpy as np
import pytest
import torch
from torch import nn

from rayscreen.infer.predictor import (Predictor, PredictorSettings, aggregate_well, downsample_any, downsample_mean,
                                       map_peaks)


class ToyMaps(nn.Module):
    """Class map k = channel k average-pooled 2x2; logits = max of each map; features =
    per-channel means. Everything about it can be worked out by hand."""

    def __init__(self):
        super().__init__()
        self.pooling = lambda maps: maps.flatten(2).amax(dim=2)
        self.fc = None
        self.scale = nn.Parameter(torch.ones(()))  # one parameter so .parameters() is not empty

    def forward_maps(self, x):
        maps = nn.functional.avg_pool2d(x * self.scale, 2)
        return {"logits": self.pooling(maps), "class_maps": maps, "features": x.mean(dim=(2, 3))}


def _field(peak_yx, value=4.0):
    img = np.zeros((2, 8, 8), np.float32)
    y, x = peak_yx
    img[1, y:y + 2, x:x + 2] = value  # one 2x2 block on channel 1 -> class 1 map cell (y/2, x/2)
    return img


def test_known_answers_jacobian():
    images = np.stack([_field((2, 4)), _field((6, 0), value=0.0)])
    pred = Predictor(ToyMaps(), PredictorSettings(batch_size=1, saliency="jacobian", saliency_downsample=2,
                                                  saliency_sigma=0.0, mask_threshold=0.5))
    out = pred({"image": images, "well": np.array(["A01", "A01"], object), "field": np.array([0, 1])})
    # field 0: map maxima 0 (class 0) and 4 (class 1, at cell (1, 2) -> pixel centre (3, 5))
    l0 = np.array([0.0, 4.0])
    np.testing.assert_allclose(out["scores"][0], np.exp(l0) / np.exp(l0).sum(), rtol=1e-6)
    np.testing.assert_array_equal(out["map_max"][0], [0.0, 4.0])
    assert (out["map_y"][0, 1], out["map_x"][0, 1]) == (3, 5)
    # field 1: all zero -> probabilities 1/2, maxima at the first cell -> pixel (1, 1)
    np.testing.assert_allclose(out["scores"][1], [0.5, 0.5])
    assert (out["map_y"][1, 0], out["map_x"][1, 0]) == (1, 1)
    np.testing.assert_allclose(out["profile"][0], [0.0, 4.0 * 4 / 64])
    # Jacobian of the positive class's max: 1/4 on each of the 4 pixels of the peak block
    # (summed over channels); 2x2 block means -> 1/4 in that one cell, 0 elsewhere
    assert out["saliency"].shape == (2, 4, 4) and out["saliency"].dtype == np.float16
    expected = np.zeros((4, 4), np.float32)
    expected[1, 2] = 0.25
    np.testing.assert_array_equal(out["saliency"][0], expected.astype(np.float16))
    np.testing.assert_array_equal(out["mask"][0], (expected > 0).astype(np.uint8))
    assert list(out["well"]) == ["A01", "A01"] and list(out["field"]) == [0, 1]  # passed through


def test_batching_does_not_change_bytes():
    rng = np.random.default_rng(0)
    images = rng.random((5, 2, 8, 8), dtype=np.float32)
    a = Predictor(ToyMaps(), PredictorSettings(batch_size=2, saliency="cam"))({"image": images})
    b = Predictor(ToyMaps(), PredictorSettings(batch_size=5, saliency="cam"))({"image": images})
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_real_wscnn_shapes_and_relu_jacobian():
    from rayscreen.models import create_model

    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=2, num_classes=2, width=0.25)
    images = np.random.default_rng(1).random((3, 2, 64, 64), dtype=np.float32)
    for mode in ("jacobian", "jacobian_relu", "cam", "none"):
        out = Predictor(model, PredictorSettings(batch_size=2, saliency=mode, saliency_downsample=4))({"image": images})
        assert out["scores"].shape == (3, 2) and np.allclose(out["scores"].sum(1), 1, atol=1e-6)
        assert out["saliency"].shape == (3, 16, 16) and out["mask"].dtype == np.uint8
        assert out["profile"].shape == (3, model.feature_dim)
        assert ((out["map_y"] >= 0) & (out["map_y"] < 64)).all()
        assert np.isfinite(out["saliency"]).all()
    model_scores = aggregate_well(out["scores"], "model", out["class_maps"], model)
    # the saliency modes are what rayscreen.models.saliency computes for the positive class
    # (1, binary), block-averaged 4x4 by hand (no smoothing, sigma 0): Kraus' ReLU variant
    # (channel sum of the rectified gradient) for jacobian_relu, max |gradient| for jacobian
    from rayscreen.models.saliency import jacobian_saliency

    x = torch.from_numpy(images)
    got = {}
    for mode in ("jacobian", "jacobian_relu"):
        sal = Predictor(model, PredictorSettings(batch_size=2, saliency=mode, saliency_downsample=4,
                                                 saliency_sigma=0.0))({"image": images})["saliency"]
        ref = jacobian_saliency(model, x, class_index=1, relu=mode == "jacobian_relu").numpy()
        ref = ref.reshape(3, 16, 4, 16, 4).mean(axis=(2, 4))
        assert ref.max() > 0
        np.testing.assert_allclose(sal.astype(np.float32), ref, rtol=2e-3, atol=1e-3 * ref.max())
        got[mode] = sal.astype(np.float32)
    gap = np.abs(got["jacobian_relu"] - got["jacobian"]).max()
    assert gap > 0.1 * max(got["jacobian"].max(), got["jacobian_relu"].max())
    # wscnn's max pooling over all instances = the max of the per-field maxima
    logits = out["map_max"].max(axis=0)
    np.testing.assert_allclose(model_scores, np.exp(logits) / np.exp(logits).sum(), rtol=1e-5)


def test_pure_helpers():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(aggregate_well(scores, "max"), [0.9, 0.8])
    np.testing.assert_allclose(aggregate_well(scores, "mean"), [1.6 / 3, 1.4 / 3], rtol=1e-6)
    assert np.isnan(aggregate_well(np.zeros((0, 2), np.float32), "mean")).all()
    with pytest.raises(ValueError, match="median"):
        aggregate_well(scores, "median")
    np.testing.assert_array_equal(downsample_mean(np.arange(16.0).reshape(1, 4, 4), 2), [[[2.5, 4.5], [10.5, 12.5]]])
    block = np.zeros((1, 4, 4), bool)
    block[0, 3, 0] = True
    np.testing.assert_array_equal(downsample_any(block, 2), [[[0, 0], [1, 0]]])
    peak, y, x = map_peaks(np.array([[[[0, 1], [3, 2]]]], np.float32), (20, 40))
    assert peak[0, 0] == 3 and y[0, 0] == 15 and x[0, 0] == 10


def test_saliency_tiles_cover_the_remainder_of_fields_not_a_multiple_of_the_factor():
    """A 5 x 5 field at factor 2: 3 x 3 blocks, the last ones over the remaining row and
    column (an object there used to get no saliency, no mask and no label)."""
    from rayscreen.infer.predictor import downsampled_shape

    assert downsampled_shape((100, 100), 64) == (2, 2) and downsampled_shape((104, 140), 4) == (26, 35)
    image = np.arange(25.0).reshape(1, 5, 5)
    small = downsample_mean(image, 2)
    assert small.shape == (1, 3, 3)
    assert small[0, 0, 0] == np.mean([0, 1, 5, 6]) and small[0, 2, 2] == 24.0  # the corner block: one pixel
    assert small[0, 0, 2] == np.mean([4, 9])  # the last column's block: the pixels it has
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 4, 4] = True
    assert downsample_any(mask, 2)[0].tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_predictor_saliency_and_mask_of_an_odd_sized_field_cover_it_whole():
    from rayscreen.models import create_model

    model = create_model("wscnn", in_channels=1, num_classes=2, width=0.25).eval()
    out = Predictor(model, PredictorSettings(batch_size=2, saliency="cam", saliency_downsample=4))(
        {"image": np.random.default_rng(0).random((2, 1, 50, 61)).astype(np.float32)})
    assert out["saliency"].shape == (2, 13, 16) and out["mask"].shape == (2, 13, 16)
    assert np.isfinite(out["saliency"].astype(np.float32)).all()


@pytest.mark.parametrize("aggregate", ["max", "mean", "model"])
def test_a_field_with_non_finite_output_is_left_out_of_its_well(aggregate):
    from rayscreen.infer.run import NOT_FINITE, OK, results_variables, well_outputs
    from rayscreen.models.wscnn import milnet

    torch.manual_seed(0)
    model = milnet(in_channels=1, num_classes=2).eval()
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    x[2, 0, 5, 5] = np.nan  # one bad pixel in field 2 (a float plate of another tool)
    pred = Predictor(model, PredictorSettings(saliency="cam", saliency_downsample=4))({"image": x})
    sizes, variables = results_variables(4, 2, model.feature_dim, (8, 8))
    shapes = {v.name: tuple(sizes[d] for d in v.dims[1:]) for v in variables}
    out = well_outputs(["0", "1", "2"], {"0": 0, "1": 1, "2": 2}, pred, 4, aggregate, shapes, model)
    assert out["field_status"].tolist()[:3] == [OK, OK, NOT_FINITE] and int(out["n_fields"]) == 2
    assert np.isfinite(out["well_scores"]).all() and np.isfinite(out["well_profile"]).all()
    two = well_outputs(["0", "1"], {"0": 0, "1": 1}, pred, 4, aggregate, shapes, model)
    np.testing.assert_allclose(out["well_scores"], two["well_scores"], rtol=1e-6)  # as if it were not there


class _OffCPUModel(nn.Module):
    """A model whose parameters are not on the CPU (the "meta" device stands in for an
    inference actor's GPU, which this machine has not) and whose pooling records the
    device of the class maps it is given; its output is a CPU tensor, as .cpu() gives."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), device="meta"))
        self.fc = None
        self.seen: list[torch.device] = []

    def pooling(self, maps):
        self.seen.append(maps.device)
        return torch.zeros(maps.shape[:2])


def test_model_aggregation_pools_on_the_models_device():
    """aggregate_well("model") built the well's bag on the CPU whatever the model's device:
    a GPU model's noisy_and thresholds, attention or fc layers then met CPU maps."""
    model = _OffCPUModel()
    maps = np.random.default_rng(0).random((3, 2, 4, 4), dtype=np.float32)
    out = aggregate_well(np.zeros((3, 2), np.float32), "model", maps, model)
    assert model.seen == [torch.device("meta")]
    np.testing.assert_allclose(out, [0.5, 0.5])
