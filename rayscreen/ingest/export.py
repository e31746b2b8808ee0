"""Export plates as TIFF files + a LoadData CSV: the input CellProfiler (and ``rayscreen
ingest``) expects. Used by the demo to exercise ingest end to end, and by users who
want to run CellProfiler on a synthetic or converted screen."""

from __future__ import annotations

import os

import pandas as pd
import tifffile

from ..store import open_plate


def export_loaddata(plate_uris: list[str], out_dir: str, *, with_annotations: bool = True) -> str:
    """Write ``out_dir/images/<plate>/<well>_s<site>_<channel>.tif`` and ``out_dir/load_data.csv``.

    Returns the CSV path. Folders in the CSV are relative to it, so the export can move.
    """
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for uri in plate_uris:
        plate = open_plate(uri)
        folder = os.path.join("images", plate.name)
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
        annotations = plate.annotations.set_index("Metadata_Well") if with_annotations else None
        present, _ = plate.present_wells()
        for well in present:
            for site, field in enumerate(plate.fields(well)):
                image = plate.read(well, field)
                row = {"Metadata_Plate": plate.name, "Metadata_Well": well, "Metadata_Site": site + 1}
                for c, channel in enumerate(plate.channels):
                    name = f"{well}_s{site + 1}_{channel}.tif"
                    tifffile.imwrite(os.path.join(out_dir, folder, name), image[c])
                    row[f"FileName_{channel}"] = name
                    row[f"PathName_{channel}"] = folder
                if annotations is not None:
                    row.update({k: v for k, v in annotations.loc[well].items() if k != "Metadata_Plate"})
                rows.append(row)
    path = os.path.join(out_dir, "load_data.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return path
