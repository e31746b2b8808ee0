"""What infer works out on the driver before reading pixels."""


def test_the_most_fields_of_a_plate_without_field_count(tmp_path):
    """Plates of other tools need not record field_count: infer sizes its store by the most
    fields of any well present, not by the first listed well (which a sparse plate may lack)."""
    from rayscreen.infer.run import _max_fields
    from rayscreen.store import create_plate, open_plate
    from rayscreen.testing.plates import random_field

    uri = str(tmp_path / "F.zarr")
    writer = create_plate(uri, "F", ["A01", "A02", "A03"], ["DNA"], (8, 8), "uint16", None)
    for well, n in (("A02", 1), ("A03", 3)):  # A01 listed, never written
        for f in range(n):
            writer.write_field(well, f, random_field(0, well, f, (1, 8, 8)))
        writer.complete_well(well, n)
    plate = open_plate(uri)
    assert plate.meta.field_count is None
    assert _max_fields(plate) == 3


def test_the_model_fingerprint_follows_scoring_not_the_training_record():
    """A finished run exported again (a resumed `rayscreen run`) records another config,
    epoch or metrics: the same model, so an infer store made with it resumes. Other classes
    or weights score differently and must not."""
    import torch

    from rayscreen.infer.run import model_fingerprint
    from rayscreen.models import create_model
    from rayscreen.models.artefact import ArtefactMeta

    torch.manual_seed(0)
    model = create_model("wscnn", in_channels=2, num_classes=2, width=0.25)
    meta = ArtefactMeta(model={"name": "wscnn", "kwargs": {"width": 0.25}}, channels=["DNA", "Actin"],
                        classes=["neg", "pos"], epoch=3, metrics={"val_accuracy": 0.9}, config={"output": "/a"})
    first = model_fingerprint(model, meta)
    again = ArtefactMeta(**{**meta.__dict__, "epoch": 5, "metrics": {}, "config": {"output": "/b"}})
    assert model_fingerprint(model, again) == first
    assert model_fingerprint(model, ArtefactMeta(**{**meta.__dict__, "classes": ["pos", "neg"]})) != first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_fingerprint(model, meta) != first


def test_infer_split_matches_plates_whose_names_look_like_numbers(tmp_path):
    import pandas as pd

    from rayscreen.config import config_from_dict
    from rayscreen.infer.run import _filter_split
    from rayscreen.stream.datasource import WellTask

    (tmp_path / "out" / "train").mkdir(parents=True)
    pd.DataFrame({"Metadata_Plate": ["001", "001"], "Metadata_Well": ["A01", "A02"],
                  "split": ["test", "train"]}).to_csv(tmp_path / "out" / "train" / "split.csv", index=False)
    config = config_from_dict({"plates": ["p.zarr"], "output": str(tmp_path / "out"), "infer": {"split": "test"}})
    tasks = [WellTask("p.zarr", "001", "A01"), WellTask("p.zarr", "001", "A02")]
    assert [t.well for t in _filter_split(config, tasks)] == ["A01"]


def _artefact(tmp_path, classes, normalization, **model_kwargs):
    import os

    from rayscreen.models import create_model
    from rayscreen.models.artefact import ArtefactMeta, save_artefact

    path = os.path.join(tmp_path, "model")
    kwargs = {"width": 0.25, "in_channels": 2, "num_classes": len(classes), **model_kwargs}
    save_artefact(path, create_model("wscnn", **kwargs).state_dict(),
                  ArtefactMeta(model={"name": "wscnn", "kwargs": kwargs}, channels=["DNA", "Actin"], classes=classes,
                               normalization=normalization, input={"level": 0, "tile": None, "crop": None,
                                                                   "dtype": "float32"}))
    return path


def test_infer_accepts_the_decimal_classes_training_named_and_refuses_other_intensities(tmp_path):
    """label.classes [0.5, 1.0, 2.0] train classes '0.5', '1', '2': infer compared '1.0' and
    refused its own config. A model trained on normalised, corrected fields was scored on raw
    ones without a word."""
    import pytest

    from rayscreen.config import ConfigError, config_from_dict
    from rayscreen.infer.run import plan_infer
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "P.zarr"), "P", fields=1, field_shape=(64, 64))
    base = {"plates": [uri], "output": str(tmp_path / "out"), "stream": {"normalize": "none"}}
    art = _artefact(tmp_path, ["0.5", "1", "2"], {"method": "none", "illumination": False, "plates": {}})
    config = config_from_dict({**base, "label": {"column": "Metadata_Concentration", "classes": [0.5, 1.0, 2.0]},
                               "infer": {"checkpoint": art}})
    assert plan_infer(config).classes == ["0.5", "1", "2"]
    art = _artefact(tmp_path, ["neg", "pos"], {"method": "meanstd", "illumination": True, "plates": {}})
    with pytest.raises(ConfigError, match=r"stream.normalize: 'none', but the model was trained on fields streamed "
                                          r"with stream.normalize: 'meanstd'"):
        plan_infer(config_from_dict({**base, "infer": {"checkpoint": art}}))


def test_model_aggregation_is_refused_for_a_pooling_that_depends_on_position(tmp_path):
    """infer.aggregate: model lays a well's fields side by side as one bag: sound for max,
    mean, noisy_and, ..., meaningless for WSCNN-FC, whose FC layer weighs each map position
    (the fields would be squeezed onto its grid)."""
    import pytest

    from rayscreen.config import ConfigError, config_from_dict
    from rayscreen.infer.run import plan_infer
    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "P.zarr"), "P", fields=1, field_shape=(64, 64))
    none = {"method": "none", "illumination": False, "plates": {}}
    base = {"plates": [uri], "output": str(tmp_path / "out"), "stream": {"normalize": "none"}}
    art = _artefact(tmp_path, ["neg", "pos"], none, pooling="fc", pooling_kwargs={"grid": [3, 4]})
    with pytest.raises(ConfigError, match="infer.aggregate: 'model' .*FCPooling depends on where evidence lies"):
        plan_infer(config_from_dict({**base, "infer": {"checkpoint": art, "aggregate": "model"}}))
    assert plan_infer(config_from_dict({**base, "infer": {"checkpoint": art, "aggregate": "max"}})).classes == [
        "neg", "pos"]
    art = _artefact(tmp_path, ["neg", "pos"], none, pooling="noisy_and")
    assert plan_infer(config_from_dict({**base, "infer": {"checkpoint": art, "aggregate": "model"}}))


def test_a_bag_size_dependent_pooling_trained_on_crops_is_warned_of(caplog):
    """Noisy-OR, ISR and the FC head score a whole field on another scale than the crops, tiles
    or mosaics they were trained on (noisy-OR's logit grows with the instances); infer scores
    whole fields, so it says so. Size-invariant poolings, and models trained on whole fields,
    are not warned of."""
    import logging

    import torch

    from rayscreen.infer.run import warn_of_other_geometry
    from rayscreen.models import create_model

    def model(pooling, **kw):
        return create_model("wscnn", in_channels=1, num_classes=2, width=0.25, pooling=pooling, **kw)

    noisy_or = model("noisy_or")
    with torch.no_grad():  # what the warning is about: the same evidence in a 4x larger field
        crop = noisy_or(torch.rand(1, 1, 96, 96))
        field = noisy_or(torch.rand(1, 1, 192, 192))
    assert (field[0] - crop[0]).abs().max() > 1.0  # logits shift with the number of instances
    with caplog.at_level(logging.WARNING, logger="rayscreen.infer.run"):
        message = warn_of_other_geometry(noisy_or, {"crop": 96, "tile": None}, "ckpt")
        assert "NoisyOrPooling" in message and "crop 96" in message and "ckpt" in message
        assert "2x2 mosaics" in warn_of_other_geometry(model("isr"), {"mosaic": True}, "ckpt")
        assert "tile 128" in warn_of_other_geometry(model("fc"), {"tile": 128}, "ckpt")
    assert len(caplog.records) == 3
    assert warn_of_other_geometry(noisy_or, {"crop": None, "tile": None, "mosaic": False}, "ckpt") is None
    for pooling in ("max", "mean", "lse", "gm", "noisy_and", "attention"):
        assert warn_of_other_geometry(model(pooling), {"crop": 96, "mosaic": True}, "ckpt") is None
