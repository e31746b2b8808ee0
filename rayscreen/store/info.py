"""``rayscreen info URI``: what a plate holds, without reading pixels."""

from __future__ import annotations

from typing import Any

from .plate import open_plate
from .uri import filesystem


def plate_info(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Wells, fields, channels, shape, dtype, chunks, NGFF version, annotations, bytes on disk.

    Reads every well's metadata (one request per well) to report missing wells and
    field counts; pixels are not read. A plate whose write has not finished a well yet (an
    ingest under way or stopped) has no field to tell channels, shape, dtype, chunks, axes
    and levels from: those are None.
    """
    plate = open_plate(uri, storage_options)
    present, missing = plate.present_wells()
    fields = {w: len(plate.fields(w, acquisition="all")) for w in present}
    fs, path = filesystem(uri, storage_options)
    image = {"channels": plate.channels, "shape": plate.shape, "dtype": str(plate.dtype), "chunks": plate.chunks,
             "levels": plate.levels, "axes": plate.axes, "planes": plate.planes} if sum(fields.values()) else dict.fromkeys(
        ("channels", "shape", "dtype", "chunks", "levels", "axes", "planes"))
    return {
        "uri": uri,
        "name": plate.name,
        "ngff_version": plate.ngff_version,
        "zarr_format": plate.zarr_format,
        "wells_listed": len(plate.wells),
        "wells_present": len(present),
        "wells_missing": missing,
        # in a plate rayscreen wrote, a listed well without metadata is an ingest not finished
        "wells_incomplete": bool(missing) and plate.written_by_rayscreen,
        "fields": sum(fields.values()),
        "fields_per_well": sorted(set(fields.values())),
        **image,
        "annotation_columns": [c for c in plate.annotations.columns],
        "bytes_on_disk": int(fs.du(path)),
    }


def format_info(info: dict[str, Any]) -> str:
    missing = info["wells_missing"]
    known = info["shape"] is not None  # None: no field written yet, nothing to tell the image by
    if not known:
        wells = ", no field written yet (channels, shape and dtype unknown)"
    elif missing:
        what = "not completed by the writer (ingest unfinished?)" if info.get("wells_incomplete") else "missing"
        wells = f"; {what}: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}"
    else:
        wells = ""
    lines = [
        f"plate {info['name']}  ({info['uri']})",
        f"  NGFF {info['ngff_version']} on Zarr v{info['zarr_format']}"
        + (f", axes {info['axes']}, {info['levels']} level(s)" if known else ""),
        f"  wells: {info['wells_present']} present of {info['wells_listed']} listed{wells}",
    ]
    if known:
        lines += [
            f"  fields: {info['fields']} (per well: {info['fields_per_well']})",
            f"  channels: {', '.join(info['channels'])}",
            f"  field shape (C, Y, X): {tuple(info['shape'])}  dtype {info['dtype']}  chunks {tuple(info['chunks'])}",
        ]
        t, z = info["planes"]["t"], info["planes"]["z"]
        if t > 1 or z > 1:
            lines.append(f"  planes: {t} timepoint(s), {z} z-plane(s); fields stream as t=0"
                         + (", z max-projected" if z > 1 else ""))
    lines += [
        f"  annotations: {', '.join(info['annotation_columns'])}",
        f"  bytes on disk: {info['bytes_on_disk'] / 1e6:.2f} MB",
    ]
    return "\n".join(lines)
