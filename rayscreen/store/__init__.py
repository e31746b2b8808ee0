"""The plate store: the only package that imports zarr. Plates, platemaps, URIs.

Public API: :func:`open_plate` (read any NGFF 0.4/0.5 HCS plate), :func:`create_plate`
(write one), :func:`read_platemap`, :func:`well_name`, and the errors.
"""

from .annotations import read_platemap
from .errors import (BadImageError, CorruptDataError, IncompleteWellError, MissingChunkError, MissingWellError,
                     NotAPlateError, RayscreenError)
from .plate import Plate, open_plate
from .uri import redact
from .wells import well_name
from .writer import PlateWriter, create_plate

__all__ = ["open_plate", "Plate", "create_plate", "PlateWriter", "read_platemap", "well_name", "redact",
           "RayscreenError", "NotAPlateError", "MissingWellError", "IncompleteWellError", "MissingChunkError",
           "CorruptDataError", "BadImageError"]
