"""ProfilePredictor on plain dicts of arrays (no Ray): channel handling worked out by hand."""

import numpy as np
import pytest
import torch

from rayscreen.profile.image_qc import qc_metric_names
from rayscreen.profile.predictor import IMAGENET_MEAN, IMAGENET_STD, ProfilePredictor, feature_names
from rayscreen.store.errors import RayscreenError


class ColourMeans(torch.nn.Module):
    """A stand-in extractor whose features are known: the mean of each input colour (D = 3)."""

    feature_dim = 3
    input_size = 8

    def forward(self, x):
        self.last_shape = tuple(x.shape)
        return x.mean(dim=(2, 3))


def expected_colour(v):
    """Feature vector of a constant grey field of value v (in [0, 1]) after ImageNet normalisation."""
    return (v - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def constant_batch(values, shape=(16, 16), dtype=np.float32):
    """(B, C, Y, X) fields, channel c of field b constant = values[b][c]."""
    v = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(v[:, :, None, None], v.shape + shape).astype(dtype).copy()


def test_concat_mode_features_per_channel_in_order():
    model = ColourMeans()
    pred = ProfilePredictor(channels=["DNA", "Actin"], model=model, input_size=8)
    images = constant_batch([[0.2, 0.8], [0.5, 0.0]])
    out = pred({"image": images, "plate": np.array(["P", "P"]), "well": np.array(["A01", "A02"]),
                "field": np.array(["0", "1"])})
    assert out["profile"].shape == (2, 6) and out["profile"].dtype == np.float32
    np.testing.assert_allclose(out["profile"][0], np.r_[expected_colour(0.2), expected_colour(0.8)], atol=1e-5)
    np.testing.assert_allclose(out["profile"][1], np.r_[expected_colour(0.5), expected_colour(0.0)], atol=1e-5)
    assert list(out["well"]) == ["A01", "A02"] and list(out["field"]) == ["0", "1"]
    assert model.last_shape[1:] == (3, 8, 8)  # resized to the input, grey replicated to RGB
    assert pred.features[:4] == ["DNA_resnet18_0", "DNA_resnet18_1", "DNA_resnet18_2", "Actin_resnet18_0"]


def test_rgb_mode_maps_named_channels_and_black_for_none():
    pred = ProfilePredictor(channels=["DNA", "Actin", "Tubulin"], channel_mode="rgb", rgb=["Tubulin", None, "DNA"],
                            model=ColourMeans(), input_size=8)
    out = pred({"image": constant_batch([[0.1, 0.6, 0.9]])})
    want = (np.array([0.9, 0.0, 0.1]) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out["profile"][0], want, atol=1e-5)
    assert pred.features == feature_names("resnet18", 3, [], "rgb")


def test_rgb_mode_rejects_unknown_channel():
    with pytest.raises(RayscreenError, match="Nucleus"):
        ProfilePredictor(channels=["DNA"], channel_mode="rgb", rgb=["Nucleus", None, None], model=ColourMeans())


def test_uint16_scaled_by_dtype_maximum():
    pred = ProfilePredictor(channels=["DNA"], model=ColourMeans(), input_size=8)
    images = np.full((1, 1, 8, 8), 65535 // 5, dtype=np.uint16)
    np.testing.assert_allclose(pred.embed(images)[0], expected_colour((65535 // 5) / 65535), atol=1e-5)


def test_flat_field_corrected_counts_and_z_scores_keep_their_contrast():
    """A float stream that is not percentile-normalised (illumination only: float counts;
    mean/std: z-scores) was clipped to [0, 1]: every count field became white."""
    from rayscreen.profile.run import network_value_range
    from rayscreen.stream.normalize import MeanStdScaler, PercentileScaler

    counts = np.full((1, 1, 8, 8), 65535 // 5, dtype=np.uint16)
    raw = ProfilePredictor(channels=["DNA"], model=ColourMeans(), input_size=8)
    corrected = ProfilePredictor(channels=["DNA"], model=ColourMeans(), input_size=8,
                                 value_range=network_value_range(np.dtype("uint16"), None))
    np.testing.assert_allclose(corrected.embed(counts.astype(np.float32))[0], raw.embed(counts)[0], atol=1e-5)
    z = ProfilePredictor(channels=["DNA"], model=ColourMeans(), input_size=8, value_range=(-3.0, 3.0))
    np.testing.assert_allclose(z.embed(np.full((1, 1, 8, 8), 1.5, np.float32))[0], expected_colour(0.75), atol=1e-5)
    fitted = {"P1": PercentileScaler().fit([np.arange(64.0).reshape(1, 8, 8)]).to_dict()}
    assert network_value_range(np.dtype("uint16"), fitted) == (0.0, 1.0)
    fitted_z = {"P1": MeanStdScaler().fit([np.arange(64.0).reshape(1, 8, 8)]).to_dict()}
    assert network_value_range(np.dtype("uint16"), fitted_z) == (-3.0, 3.0)
    with pytest.raises(RayscreenError, match="mix clipping"):
        network_value_range(np.dtype("uint16"), {**fitted, "P2": fitted_z["P1"]})
    assert network_value_range(np.dtype("float32"), None) == (0.0, 1.0)


def test_tiles_average_full_resolution_tiles():
    # Left half 0, right half 1: 2 x 2 tiles of 8 px of a 16 x 16 field -> tile means 0, 1, 0, 1,
    # averaged 0.5; a resize to 8 px would give 0.5 too, so check the model saw 8 px tiles, 4 per field.
    model = ColourMeans()
    pred = ProfilePredictor(channels=["DNA"], model=model, input_size=8, tiles=True)
    images = np.zeros((1, 1, 16, 16), np.float32)
    images[..., 8:] = 1.0
    np.testing.assert_allclose(pred.embed(images)[0], expected_colour(0.5), atol=1e-5)
    assert model.last_shape == (4, 3, 8, 8)
    # a non-dividing field: tiles at 0 and 12 (flush with the edge) of a 20 px field
    images = np.zeros((1, 1, 8, 20), np.float32)
    images[..., 12:] = 1.0  # the edge tile [12, 20) is all ones, the first [0, 8) zeros
    np.testing.assert_allclose(pred.embed(images)[0], expected_colour(0.5), atol=1e-5)


def test_tiles_larger_than_field_fail_clearly():
    pred = ProfilePredictor(channels=["DNA"], model=ColourMeans(), input_size=32, tiles=True)
    with pytest.raises(RayscreenError, match="input_size"):
        pred.embed(np.zeros((1, 1, 16, 16), np.float32))


def test_wrong_channel_count_names_channels():
    pred = ProfilePredictor(channels=["DNA", "Actin"], model=ColourMeans())
    with pytest.raises(RayscreenError, match="DNA"):
        pred.embed(np.zeros((1, 3, 8, 8), np.float32))


def test_classical_and_qc_columns():
    pred = ProfilePredictor(channels=["DNA", "Actin"], model=ColourMeans(), input_size=8, classical=True, qc=True)
    rng = np.random.default_rng(0)
    images = rng.random((2, 2, 32, 32)).astype(np.float32)
    out = pred({"image": images})
    assert out["classical"].shape[0] == 2 and np.isfinite(out["classical"][:, :20]).all()
    assert out["qc"].shape == (2, len(qc_metric_names(2)))


def test_normalizers_apply_per_plate_after_qc_on_raw_pixels():
    from rayscreen.stream.normalize import PercentileScaler

    def scaler(offset, scale):
        s = PercentileScaler()
        s.offset, s.scale = np.array(offset, float), np.array(scale, float)
        return s.to_dict()

    # plate P1 maps 100 -> 0 and 1100 -> 1; plate P2 maps 0 -> 0 and 4000 -> 1 (both channels)
    pred = ProfilePredictor(channels=["DNA", "Actin"], model=ColourMeans(), input_size=8, qc=True,
                            normalizers={"P1": scaler([100, 100], [1000, 1000]), "P2": scaler([0, 0], [4000, 4000])},
                            qc_max_value=65535.0)
    images = np.full((2, 2, 16, 16), 600, np.uint16)
    images[1, :, :4] = 65535  # a quarter of plate P2's field clipped at the detector
    out = pred({"image": images, "plate": np.array(["P1", "P2"]), "well": np.array(["A01", "A01"]),
                "field": np.array(["0", "0"])})
    names = qc_metric_names(2)
    sat = out["qc"][:, names.index("qc_saturation_c0")]
    np.testing.assert_allclose(sat, [0.0, 0.25])  # QC saw the raw counts, not the clipped [0, 1] stream
    # P1: (600 - 100) / 1000 = 0.5 everywhere; P2: 600 / 4000 = 0.15, clipped rows at 1 -> mean 0.3625
    np.testing.assert_allclose(out["profile"][0], np.tile(expected_colour(0.5), 2), rtol=1e-5)
    np.testing.assert_allclose(out["profile"][1], np.tile(expected_colour(0.75 * 0.15 + 0.25), 2), rtol=1e-4)
    with pytest.raises(RayscreenError, match="P3"):
        pred({"image": images[:1], "plate": np.array(["P3"])})


def test_saturation_is_measured_before_illumination_correction(tmp_path):
    """The stream divided fields by the illumination function (>= 1) before QC: a clipped blob
    in the bright centre fell below the detector's maximum and the field read 0% saturated.
    The stream now measures saturation on the raw pixels (a column), and QC takes it."""
    from rayscreen.store import create_plate
    from rayscreen.stream.datasource import StreamOptions, plan_wells, read_wells
    from rayscreen.stream.illumination import save_illumination

    uri = str(tmp_path / "P.zarr")
    writer = create_plate(uri, "P", ["A01"], ["DNA", "Actin"], (16, 16), "uint16", 1)
    field = np.full((2, 16, 16), 1000, np.uint16)
    field[0, 6:10, 6:10] = 65535  # 16 of 256 pixels clipped, where the illumination is brightest
    writer.write_field("A01", 0, field)
    writer.complete_well("A01", 1)
    illum = np.ones((2, 16, 16), np.float32)
    illum[:, 4:12, 4:12] = 1.8
    save_illumination(uri, illum)
    (batch,) = list(read_wells(plan_wells([uri]), StreamOptions(illumination=True, saturation=True)))
    np.testing.assert_allclose(batch["saturation"], [[16 / 256, 0.0]])
    assert batch["image"].max() < 65535  # corrected: the clipped pixels no longer look clipped
    pred = ProfilePredictor(channels=["DNA", "Actin"], model=ColourMeans(), input_size=8, qc=True,
                            qc_max_value=65535.0)
    names = qc_metric_names(2)
    out = pred(batch)
    assert out["qc"][0, names.index("qc_saturation_c0")] == pytest.approx(16 / 256)
    without = pred({k: v for k, v in batch.items() if k != "saturation"})
    assert without["qc"][0, names.index("qc_saturation_c0")] == 0.0  # what QC saw before


def test_a_field_name_outside_field_count_names_the_plate_and_well():
    from rayscreen.profile.run import well_values

    rows = [{"field": "2", "profile": np.zeros(2), "qc": np.zeros(1)}]
    with pytest.raises(RayscreenError, match=r"plate 'P1' well B03: field '2' is not one of the well's fields "
                                             r"\['0', '1'\]"):
        well_values(rows, ["0", "1"], 2, 2, None, 1, where="plate 'P1' well B03")


def test_profile_slots_are_the_wells_fields_in_order_as_infer_places_them():
    """A well with fields "0" and "2" of a plate whose field_count is 3: infer puts field "2"
    in slot 1 (the i-th field of the well); so does profile now (it put it in slot 2)."""
    from rayscreen.profile.run import STATUS_ERROR, STATUS_MISSING, STATUS_OK, well_values

    rows = [{"field": "0", "profile": np.zeros(2), "qc": np.zeros(1)},
            {"field": "2", "profile": np.ones(2), "qc": np.zeros(1)}]
    out = well_values(rows, ["0", "1", "2"], 3, 2, None, 1, present=["0", "2"])
    assert out["field_status"].tolist() == [STATUS_OK, STATUS_OK, STATUS_MISSING]
    np.testing.assert_array_equal(out["field_profile"][1], [1, 1])
    # a read error keeps its slot among the well's fields
    out = well_values(rows[1:], ["0", "1", "2"], 3, 2, None, 1, present=["0", "2"])
    assert out["field_status"].tolist() == [STATUS_ERROR, STATUS_OK, STATUS_MISSING]
    with pytest.raises(RayscreenError, match="4 fields .* more than the 3 the store was sized for"):
        well_values(rows, ["0", "1", "2"], 3, 2, None, 1, present=["0", "1", "2", "3"])


def test_an_input_size_the_backbone_cannot_take_is_named_before_any_work():
    # inception_v3's stem and pooling need at least 75 px; the error comes from the probe in
    # the constructor (the driver builds one before starting actors), not from the actors
    with pytest.raises(RayscreenError, match=r"profile.input_size 64: too small for backbone 'inception_v3'.*299"):
        ProfilePredictor("inception_v3", channels=["DNA"], input_size=64, device="cpu")
    assert ProfilePredictor("inception_v3", channels=["DNA"], input_size=80, device="cpu").input_size == 80


def test_only_the_drivers_predictor_probes_the_network():
    class Counting(ColourMeans):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    ProfilePredictor(channels=["DNA"], model=Counting(), input_size=8)
    assert Counting.calls == 1  # the driver's probe: one blank input
    # the actors' predictors (check_input_size=False) start without a forward pass
    ProfilePredictor(channels=["DNA"], model=Counting(), input_size=8, check_input_size=False)
    assert Counting.calls == 1
