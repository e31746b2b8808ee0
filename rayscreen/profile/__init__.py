"""The profile stage: transfer-learning profiles, a classical baseline and image QC per field.

- :mod:`.predictor`: :class:`ProfilePredictor`, a callable class on a dict of arrays
  (``image`` (B, C, Y, X) + keys) that a Ray Data actor pool maps over the stream, and
  that runs without Ray in a unit test.
- :mod:`.classical`: per-field intensity, texture (GLCM / Haralick) and shape statistics,
  pure numpy / scikit-image; the baseline the deep profiles are compared with.
- :mod:`.image_qc`: per-field image quality metrics (focus, saturation, percentiles,
  foreground / empty fields).
- :mod:`.run`: :func:`run_profile`, the stage: stream -> actors -> profile store.

Names are resolved lazily: ``rayscreen.analysis`` imports :mod:`.image_qc` without
pulling in torch or Ray.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ProfilePredictor": ".predictor",
    "imagenet_normalize": ".predictor",
    "feature_names": ".predictor",
    "classical_features": ".classical",
    "classical_feature_names": ".classical",
    "field_qc": ".image_qc",
    "run_profile": ".run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
