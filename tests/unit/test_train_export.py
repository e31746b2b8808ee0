"""The training run's export, <output>/train/model, is rewritten in place by every run: an
export that dies half-way must not leave a directory that loads as a complete artefact."""

import pytest
import torch

import rayscreen.models.artefact as artefact
from rayscreen.models.artefact import ArtefactMeta, load_artefact, read_meta, save_artefact
from rayscreen.store.errors import RayscreenError


def _meta(epoch, classes):
    return ArtefactMeta(model={"name": "wscnn", "kwargs": {}}, channels=["DNA"], classes=classes, epoch=epoch)


class Killed(BaseException):
    """The process dying (not an Exception: nothing may catch it and go on)."""


@pytest.mark.parametrize("dies_at", [artefact.WEIGHTS, artefact.META])
def test_an_export_that_dies_leaves_no_artefact_mixing_two_runs(tmp_path, monkeypatch, dies_at):
    uri = str(tmp_path / "train" / "model")
    save_artefact(uri, {"w": torch.zeros(3)}, _meta(7, ["neg", "pos"]))
    fs, _ = artefact.filesystem(uri)  # fsspec's cached instance: the one save_artefact gets
    real_open = fs.open

    def open_(p, mode="rb", **kw):  # the next run's export dies as it opens `dies_at` for writing
        if p.endswith(dies_at) and "w" in mode:
            raise Killed
        return real_open(p, mode, **kw)

    with monkeypatch.context() as m:
        m.setattr(fs, "open", open_)
        with pytest.raises(Killed):
            save_artefact(uri, {"w": torch.ones(3)}, _meta(2, ["ctrl", "hit"]))
    with pytest.raises(RayscreenError, match="not a rayscreen model artefact"):
        load_artefact(uri)
    save_artefact(uri, {"w": torch.ones(3)}, _meta(2, ["ctrl", "hit"]))  # the rerun's export completes it
    state, meta = load_artefact(uri)
    assert state["w"].tolist() == [1, 1, 1] and meta.epoch == 2 and read_meta(uri).classes == ["ctrl", "hit"]
