"""Tiny seeded plates: fields are deterministic functions of (seed, well, field)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..store import create_plate


def random_field(seed: int, well: str, field: int, shape: tuple[int, int, int], dtype="uint16") -> np.ndarray:
    """A reproducible (C, Y, X) field; different for every (seed, well, field)."""
    rng = np.random.default_rng([seed, sum(map(ord, well)) * 1000 + ord(well[0]), field])
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, min(np.iinfo(dtype).max, 4095), shape, dtype=dtype)
    return rng.random(shape, dtype=np.float32).astype(dtype)


def make_plate(uri: str, name: str = "P1", wells=("A01", "A02", "B01", "B02"), fields: int = 2,
               channels=("DNA", "Actin"), field_shape=(32, 40), dtype="uint16", seed: int = 0,
               annotations: pd.DataFrame | None = None, ngff: str = "0.5", levels: int = 1,
               complete: bool = True, storage_options: dict[str, Any] | None = None) -> str:
    """Write a small plate with :func:`random_field` pixels; returns its URI."""
    if annotations is None:
        annotations = pd.DataFrame({
            "Metadata_Well": list(wells),
            "Metadata_Compound": ["DMSO" if i % 2 == 0 else f"cpd{i}" for i in range(len(wells))],
            "Metadata_Concentration": [0.0 if i % 2 == 0 else float(i) for i in range(len(wells))],
        })
    writer = create_plate(uri, name, list(wells), list(channels), field_shape, dtype, fields,
                          annotations=annotations, ngff=ngff, levels=levels, storage_options=storage_options)
    for well in wells:
        for f in range(fields):
            writer.write_field(well, f, random_field(seed, well, f, (len(channels), *field_shape), dtype))
        if complete:
            writer.complete_well(well, fields)
    return uri


def make_two_acquisition_plate(uri: str) -> str:
    """An NGFF 0.4 plate as another tool writes it: one well (B03) imaged in two acquisitions,
    1 ("before": field 0, all pixels 1) and 2 ("after": field 1, all pixels 2), 4 x 4 uint8."""
    import zarr

    root = zarr.open_group(uri, mode="w", zarr_format=2)
    root.attrs["plate"] = {"version": "0.4", "name": "acq", "rows": [{"name": "B"}], "columns": [{"name": "3"}],
                           "wells": [{"path": "B/3", "rowIndex": 0, "columnIndex": 0}],
                           "acquisitions": [{"id": 1, "name": "before"}, {"id": 2, "name": "after"}]}
    well = root.create_group("B/3")
    well.attrs["well"] = {"version": "0.4", "images": [{"path": "0", "acquisition": 1}, {"path": "1", "acquisition": 2}]}
    for f in ("0", "1"):
        img = well.create_group(f)
        img.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}],
                                     "datasets": [{"path": "0"}]}]
        img.create_array("0", data=np.full((4, 4), int(f) + 1, np.uint8))
    return uri
