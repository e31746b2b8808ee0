"""Ingest: folders of TIFF/PNG images described by a CellProfiler LoadData CSV -> OME-Zarr plates."""

from .loaddata import LoadData, read_loaddata
from .run import ingest

__all__ = ["ingest", "read_loaddata", "LoadData"]
