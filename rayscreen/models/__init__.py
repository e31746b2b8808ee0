"""Models (torch only, no Ray): WSCNN and MIL nets, MIL pooling, torchvision backbones,
saliency and the localisation metric.

Front doors (timm/torchvision style):

- ``create_model(name, **kwargs)`` / ``list_models(kind=None)``. Classifiers
  (``kind="classifier"``: ``wscnn``, ``wscnn6``, ``wscnn_cell``, ``milnet``) take
  ``in_channels``, ``num_classes``, ``width``, ``pooling``..., and return a
  :class:`~rayscreen.models.wscnn.ClassMapNet` with ``forward(x) -> logits (B, K)``,
  ``forward_maps(x) -> {logits, class_maps, features, mil_logits}`` and
  ``aux_loss(out, target)``. Backbones (``kind="backbone"``: ``resnet18``,
  ``resnet50``, ``vgg16``, ``inception_v3``, ``convnext_tiny``, ``vit_b_16``) take
  ``weights`` (path/URI of a torchvision state dict) and return a feature extractor
  (B, 3, H, W) -> (B, D) with ``feature_dim`` and ``input_size``.
- ``create_pooling(name, num_classes=K, **kwargs)`` / ``list_poolings()``: maps
  (B, K, h, w) -> logits (B, K); see :mod:`rayscreen.models.pooling`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from . import pooling as _pooling
from .backbones import SPECS as _BACKBONE_SPECS, Backbone, create_backbone, save_backbone_weights
from .pooling import MILPooling
from .wscnn import ClassMapNet, create_pooling, milnet, wscnn, wscnn6, wscnn_cell

MODELS: Registry[nn.Module] = Registry("model")
POOLINGS: Registry[MILPooling] = Registry("MIL pooling")
_KINDS: dict[str, str] = {}

for _name, _cls in _pooling.POOLING_CLASSES.items():
    POOLINGS.register(_name)(_cls)

for _name, _builder in (("wscnn", wscnn), ("wscnn6", wscnn6), ("wscnn_cell", wscnn_cell), ("milnet", milnet)):
    MODELS.register(_name)(_builder)
    _KINDS[_name] = "classifier"


def _backbone_builder(name: str):
    def build(weights: str | None = None, storage_options: dict[str, Any] | None = None) -> Backbone:
        return create_backbone(name, weights=weights, storage_options=storage_options)

    build.__doc__ = f"torchvision {name} cut before its classifier; see rayscreen.models.backbones."
    return build


for _name in _BACKBONE_SPECS:
    MODELS.register(_name)(_backbone_builder(_name))
    _KINDS[_name] = "backbone"


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model ``name`` (see :func:`list_models`) with builder ``kwargs``."""
    return MODELS.create(name, **kwargs)


def list_models(kind: str | None = None) -> list[str]:
    """Registered model names, sorted; ``kind`` "classifier" or "backbone" filters."""
    if kind is not None and kind not in ("classifier", "backbone"):
        raise ValueError(f"model kind {kind!r}: expected 'classifier' or 'backbone'")
    return [n for n in MODELS.names() if kind is None or _KINDS.get(n) == kind]


def weights_fingerprint(model: nn.Module, extra: dict[str, Any] | None = None) -> str:
    """sha256 (16 hex digits) of ``model``'s tensors, in key order, and of ``extra`` (JSON):
    two models give the same one only if they compute the same function. A copied or
    touched weights file keeps it; other weights, or another seeded initialisation, do not."""
    import hashlib
    import json

    import torch

    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # as raw bytes: numpy has no bfloat16
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def list_poolings() -> list[str]:
    """Registered MIL pooling names, sorted."""
    return POOLINGS.names()


__all__ = ["create_model", "list_models", "create_pooling", "list_poolings", "MODELS", "POOLINGS",
           "ClassMapNet", "MILPooling", "Backbone", "save_backbone_weights", "weights_fingerprint"]
