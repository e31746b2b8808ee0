"""A trained model as a self-describing artefact: weights + everything inference needs.

Layout under a directory URI (local or ``s3://``)::

    weights.pt       torch.save(state_dict) -- tensors only, read with weights_only=True
    artefact.json    {"format": "rayscreen.model/v1", "model": {"name", "kwargs"},
                      "channels": [...], "classes": [...], "normalization": {...} | null,
                      "input": {"level", "tile", "crop"}, "epoch", "metrics", "config"}

Loading never unpickles arbitrary objects: the state dict is read with
``torch.load(weights_only=True)`` and the rest is JSON. An artefact is self-contained:
``weights.pt`` holds every parameter, so builder kwargs that only name an initialisation
file (:data:`INIT_ONLY_KWARGS`) stay in ``artefact.json`` as a record but are not passed
to the builder when the model is loaded.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..store.errors import RayscreenError
from ..store.uri import filesystem

FORMAT = "rayscreen.model/v1"
WEIGHTS = "weights.pt"
META = "artefact.json"
# builder kwargs that only say where the initial weights came from (milnet's torchvision
# trunk: an ImageNet state dict), superseded by weights.pt. Passed on at load time they
# made the builder read that file again, so an artefact failed to load wherever the file
# was not (an inference machine, a moved or deleted download). Backbones' ``weights`` is
# not here: inception_v3 also switches on its input transform when given weights.
INIT_ONLY_KWARGS = frozenset({"trunk_weights"})


@dataclass(frozen=True)
class ArtefactMeta:
    model: dict[str, Any]  # {"name": str, "kwargs": dict} for create_model
    channels: list[str]
    classes: list[str]
    normalization: dict[str, Any] | None = None  # stream normaliser spec/statistics used in training
    input: dict[str, Any] = field(default_factory=dict)  # level, tile, crop the model was trained on
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # resolved training config

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "channels": list(self.channels),
                "classes": [str(c) for c in self.classes], "normalization": self.normalization,
                "input": self.input, "epoch": self.epoch, "metrics": self.metrics, "config": self.config}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "artefact") -> "ArtefactMeta":
        if d.get("format") != FORMAT:
            raise RayscreenError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
        for key in ("model", "channels", "classes"):
            if key not in d:
                raise RayscreenError(f"{where}: missing {key!r}")
        if "name" not in d["model"]:
            raise RayscreenError(f"{where}: model.name missing")
        return cls(model=d["model"], channels=list(d["channels"]), classes=list(d["classes"]),
                   normalization=d.get("normalization"), input=d.get("input") or {}, epoch=d.get("epoch"),
                   metrics=d.get("metrics") or {}, config=d.get("config") or {})


def save_artefact(uri: str, state_dict: dict[str, torch.Tensor], meta: ArtefactMeta,
                  storage_options: dict[str, Any] | None = None) -> str:
    """Write weights then metadata (metadata last: a half-written artefact has no artefact.json).

    The directory may hold an earlier artefact (``<output>/train/model`` is rewritten by
    every run): its artefact.json goes first, so a crash while writing leaves no metadata
    beside the new weights, not the old model's. (Not a temporary directory and a rename:
    on S3 a rename is a copy, and a crash during it would mix files the same way.)"""
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    if fs.exists(f"{path}/{META}"):
        fs.rm(f"{path}/{META}")
    with fs.open(f"{path}/{WEIGHTS}", "wb") as f:
        f.write(buf.getvalue())
    with fs.open(f"{path}/{META}", "w") as f:
        f.write(json.dumps(meta.to_dict(), indent=1, default=str))
    return uri


def read_meta(uri: str, storage_options: dict[str, Any] | None = None) -> ArtefactMeta:
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(f"{path}/{META}"):
        raise RayscreenError(f"{uri}: not a rayscreen model artefact (no {META}); "
                             "train one with `rayscreen train` or point infer.checkpoint at its model/ directory")
    try:
        d = json.loads(fs.cat(f"{path}/{META}"))
    except ValueError as e:
        raise RayscreenError(f"{uri}/{META}: not valid JSON ({e})") from None
    return ArtefactMeta.from_dict(d, where=f"{uri}/{META}")


def load_artefact(uri: str, storage_options: dict[str, Any] | None = None,
                  map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], ArtefactMeta]:
    """(state_dict, meta); the weights are read with ``weights_only=True``."""
    meta = read_meta(uri, storage_options)
    fs, path = filesystem(uri, storage_options)
    try:
        blob = fs.cat(f"{path}/{WEIGHTS}")
    except FileNotFoundError:
        raise RayscreenError(f"{uri}: artefact has metadata but no {WEIGHTS}") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except Exception as e:  # refused unpickling (not tensors only) or a garbled file
        raise RayscreenError(f"{uri}/{WEIGHTS}: not a tensors-only state dict ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return state, meta


def build_model(uri: str, storage_options: dict[str, Any] | None = None,
                map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, ArtefactMeta]:
    """The model of an artefact, weights loaded, in eval mode."""
    from . import create_model

    state, meta = load_artefact(uri, storage_options, map_location)
    kwargs = {k: v for k, v in meta.model.get("kwargs", {}).items() if k not in INIT_ONLY_KWARGS}
    model = create_model(meta.model["name"], **kwargs)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(e).splitlines()[1:4]]
        raise RayscreenError(f"{uri}: weights do not fit model {meta.model['name']!r} "
                             f"with kwargs {meta.model.get('kwargs', {})} ({'; '.join(lines)})") from None
    if missing or unexpected:
        raise RayscreenError(f"{uri}: weights do not fit model {meta.model['name']!r} "
                             f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    return model.eval(), meta
