"""Streaming whole screens through Ray Data: datasource, illumination, normalisation, tiles, augmentation.

``read_plates`` is the front door; the array maths lives in pure modules
(:mod:`.datasource` read loop, :mod:`.illumination`, :mod:`.normalize`, :mod:`.tiling`,
:mod:`.augment`) that are tested without Ray. :mod:`.fit` computes the per-plate
corrections that ``read_plates(..., illumination=True, normalize=True)`` applies.
"""

from .datasource import load_error_report, read_wells
from .plates import expand_uris, read_plates

# the fitting jobs pull in scipy/scikit-image: imported on first use, not with the stream
_LAZY = {"compute_illumination": "fit", "fit_normalization": "fit", "run_illum": "fit",
         "load_illumination": "illumination", "load_normalization": "normalize"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["read_plates", "read_wells", "load_error_report", "expand_uris", *_LAZY]
