"""Streaming whole screens through Ray Data: datasource, illumination, normalisation, tiles, augmentation.

``read_plates`` is the front door; the array maths lives in pure modules
(:mod:`.datasource` read loop, :mod:`.illumination`, :mod:`.normalize`, :mod:`.tiling`,
:mod:`.augment`) that are tested without Ray.
"""

from .datasource import load_error_report, read_wells
from .plates import expand_uris, read_plates

__all__ = ["read_plates", "read_wells", "load_error_report", "expand_uris"]
