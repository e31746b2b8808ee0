"""Model artefacts: save/load round trip through build_model, and the errors."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from rayscreen.models import create_model
from rayscreen.models.artefact import ArtefactMeta, build_model, load_artefact, read_meta, save_artefact
from rayscreen.store.errors import RayscreenError

KW = {"in_channels": 2, "num_classes": 3, "width": 0.1, "pooling": "noisy_and"}


def _trained_model():
    torch.manual_seed(0)
    model = create_model("wscnn", **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 2, 50, 52)
    for _ in range(2):  # moves weights, BN running stats and noisy_and's thresholds off their init
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 1])).backward()
        opt.step()
    return model.eval()


def _meta():
    return ArtefactMeta(model={"name": "wscnn", "kwargs": KW}, channels=["DNA", "Actin"], classes=["a", "b", "c"],
                        normalization={"kind": "zscore", "mean": [0.1, 0.2]}, input={"level": 0, "tile": None},
                        epoch=2, metrics={"val_accuracy": 0.5})


def test_round_trip_local(tmp_path):
    model = _trained_model()
    assert not torch.allclose(model.pooling.b, torch.full((3,), 0.5))
    uri = save_artefact(str(tmp_path / "model"), model.state_dict(), _meta())
    loaded, meta = build_model(uri)
    assert not loaded.training
    assert meta == _meta()
    x = torch.randn(3, 2, 64, 70)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded.forward_maps(x)["features"], model.forward_maps(x)["features"])
    state, meta2 = load_artefact(uri)
    assert set(state) == set(model.state_dict()) and meta2 == meta
    on_disk = json.loads((tmp_path / "model" / "artefact.json").read_text())
    assert on_disk["format"] == "rayscreen.model/v1" and on_disk["model"]["kwargs"]["pooling"] == "noisy_and"


def test_errors(tmp_path):
    with pytest.raises(RayscreenError, match="not a rayscreen model artefact"):
        read_meta(str(tmp_path / "nothing"))
    model = _trained_model()
    uri = save_artefact(str(tmp_path / "m"), model.state_dict(), _meta())
    # weights that do not fit the recorded model
    other = ArtefactMeta(model={"name": "wscnn", "kwargs": {**KW, "width": 0.2}}, channels=["DNA", "Actin"],
                         classes=["a", "b", "c"])
    (tmp_path / "m" / "artefact.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(RayscreenError, match="weights do not fit model 'wscnn'"):
        build_model(uri)
    # a wrong format tag
    bad = other.to_dict() | {"format": "something/v0"}
    (tmp_path / "m" / "artefact.json").write_text(json.dumps(bad))
    with pytest.raises(RayscreenError, match="format 'something/v0'"):
        read_meta(uri)
    # pickled objects are refused (weights_only=True), with a clear message
    (tmp_path / "m" / "artefact.json").write_text(json.dumps(_meta().to_dict()))
    torch.save({"w": torch.zeros(1), "obj": pickle.PickleError("x")}, tmp_path / "m" / "weights.pt")
    with pytest.raises(RayscreenError, match="not a tensors-only state dict"):
        load_artefact(uri)
    (tmp_path / "m" / "weights.pt").unlink()
    with pytest.raises(RayscreenError, match="no weights.pt"):
        load_artefact(uri)


def test_an_artefact_trained_from_trunk_weights_loads_without_that_file(tmp_path):
    """milnet with a torchvision trunk initialised from a weights file (``trunk_weights``):
    weights.pt holds every parameter, but build_model passed trunk_weights on to the builder,
    which read the file again and failed wherever it was not (an inference machine)."""
    import torchvision

    torch.manual_seed(0)
    init = torchvision.models.resnet18(weights=None).state_dict()  # our own weights, nothing downloaded
    init = {k: v + 0.01 if v.is_floating_point() else v for k, v in init.items()}  # not the seeded default
    weights = tmp_path / "r18.pth"
    torch.save(init, weights)
    kwargs = {"trunk": "resnet18", "trunk_weights": str(weights), "pooling": "noisy_and", "fc_head": True}
    model = create_model("milnet", in_channels=2, num_classes=3, **kwargs)
    assert torch.equal(model.trunk[1].weight, init["conv1.weight"])  # the file was used
    with torch.no_grad():  # "training": every parameter moves off the file's values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    # exported as rayscreen.train.loop._finish does: the config's kwargs plus channels and classes
    meta = ArtefactMeta(model={"name": "milnet", "kwargs": {**kwargs, "in_channels": 2, "num_classes": 3}},
                        channels=["DNA", "Actin"], classes=["a", "b", "c"])
    uri = save_artefact(str(tmp_path / "model"), model.state_dict(), meta)
    weights.unlink()
    loaded, meta2 = build_model(uri)
    assert meta2.model["kwargs"]["trunk_weights"] == str(weights)  # kept as a record
    x = torch.randn(2, 2, 40, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.forward_maps(x)["features"], model.forward_maps(x)["features"])
