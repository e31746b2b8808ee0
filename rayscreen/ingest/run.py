"""``rayscreen ingest``: LoadData CSV -> one OME-Zarr plate per ``Metadata_Plate``.

Wells are written by Ray tasks (a task per group of wells), each opening its own
``PlateWriter`` on the plate's URI; writers of different wells never share an object.
A well is marked complete only after all its fields are written, so a rerun skips
complete wells and finishes the rest. The first image of each plate fixes its shape
and dtype; any other image that differs is an error naming plate, well, site and file.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from ..store import BadImageError, RayscreenError, create_plate, well_name
from ..store.annotations import PLATE_COL, WELL_COL, platemap_by_plate
from ..store.plate import check_finite
from ..store.uri import absolute, exists, join
from ..progress import Progress, iter_progress
from ..raylocal import ensure_ray
from ..store.writer import PlateWriter
from ..stream.datasource import in_threads
from .loaddata import SITE_COL, LoadData, read_image, read_loaddata

log = logging.getLogger(__name__)
DESC = "ingest"


def _files(files: dict[str, str]) -> str:
    return ", ".join(f"channel {c} file {path}" for c, path in files.items())


def _site_image(
    loaddata: LoadData,
    row: pd.Series,
    where: str,
    expected: tuple[tuple[int, int, int], np.dtype, str] | None = None,
) -> np.ndarray:
    """The (C, Y, X) image of one LoadData row, channels in LoadData order.

    ``where`` names the plate, well and site; ``expected`` is the plate's (C, Y, X) shape,
    its dtype and the site that fixed them. Errors name the site and its file(s): the
    writer would know only the 0-based field index, not which files made the image.
    """
    files = loaddata.site_files(row)
    planes = {c: read_image(path, f"{where} channel {c}", loaddata.storage_options) for c, path in files.items()}
    for c, plane in planes.items():
        check_finite(plane, f"{where} channel {c} file {files[c]}")
    if len({p.shape for p in planes.values()}) > 1 or len({p.dtype for p in planes.values()}) > 1:
        found = "; ".join(f"channel {c} file {files[c]}: shape {p.shape} dtype {p.dtype}" for c, p in planes.items())
        raise BadImageError(f"{where}: channels differ in shape or dtype ({found}); "
                            "expected one (Y, X) shape and dtype for all channels of a site")
    image = np.stack(list(planes.values()))
    if expected is not None:
        shape, dtype, reference = expected
        if image.shape != tuple(shape) or image.dtype != dtype:
            raise BadImageError(f"{where}: image shape {image.shape[1:]} (Y, X) dtype {image.dtype} "
                                f"in {_files(files)}; expected shape {tuple(shape[1:])} dtype {np.dtype(dtype)} "
                                f"like the rest of the plate (fixed by its first site, {reference})")
    return image


def _reference(table: pd.DataFrame) -> str:
    """The site whose image fixes a plate's shape and dtype: its first row."""
    first = table.iloc[0]
    return f"well {first[WELL_COL]} site {first[SITE_COL]}"


def write_wells(loaddata: LoadData, writer: PlateWriter, wells: list[str]) -> list[str]:
    """Write the given wells of one plate (skipping complete ones). Returns the wells written."""
    done = []
    table = loaddata.table[loaddata.table[PLATE_COL] == writer.name]
    expected = ((len(writer.channels), *writer.field_shape), writer.dtype, _reference(table))
    for well in wells:
        if writer.is_complete(well):
            continue
        sites = table[table[WELL_COL] == well]
        # an interrupted write may have left more fields than the LoadData now lists
        writer.drop_fields_from(well, len(sites))
        for field, (_, row) in enumerate(sites.iterrows()):
            where = f"plate {writer.name!r} well {well} site {row[SITE_COL]}"
            image = _site_image(loaddata, row, where, expected)
            writer.write_field(well, field, image,
                               source=f"site {row[SITE_COL]}, {_files(loaddata.site_files(row))}")
        writer.complete_well(well, n_fields=len(sites))
        done.append(well)
    return done


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _check_complete_wells(writer, uri: str, sites: dict[str, int], written: dict[str, int | None]) -> None:
    """A rerun skips complete wells (``written``: each well's field count, ``None`` while
    incomplete); one whose LoadData now lists another number of sites (images added or
    dropped since it was written) would keep the old fields silently."""
    changed = [(w, n, sites[w]) for w, n in written.items() if n is not None and n != sites[w]]
    if changed:
        listed = ", ".join(f"{w} ({old} written, {new} in the LoadData)" for w, old, new in changed[:5])
        raise RayscreenError(f"plate {writer.name!r} ({uri}): {len(changed)} complete well(s) have another number of "
                             f"sites in the LoadData than they were written with: {listed}; ingest into a new "
                             "OUT_DIR, or delete the plate to write it again")


def _is_int(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= low


def _check_arguments(ngff: str, levels: Any, chunks: Any, wells_per_task: Any) -> None:
    """Errors naming the argument, before anything is read or written: a bad value would
    otherwise write a plate that cannot be read (``levels=0``: no level 0), write nothing
    (``wells_per_task < 0``) or fail deep in a Ray task."""
    if ngff not in ("0.4", "0.5"):
        raise RayscreenError(f"ngff={ngff!r}: expected '0.4' or '0.5'")
    if not _is_int(levels, 1):
        raise RayscreenError(f"levels={levels!r}: expected an integer >= 1 (1: level 0 only, no pyramid)")
    if chunks is not None and not (isinstance(chunks, (tuple, list)) and len(chunks) == 3
                                   and all(_is_int(c, 1) for c in chunks)):
        raise RayscreenError(f"chunks={chunks!r}: expected None or a (c, y, x) triple of integers >= 1")
    if not _is_int(wells_per_task, 1):
        raise RayscreenError(f"wells_per_task={wells_per_task!r}: expected an integer >= 1")


def _check_levels(levels: int, shape: tuple[int, ...], plate: str, reference: str) -> None:
    """Each pyramid level halves Y and X: the last must keep at least one pixel."""
    y, x = shape[-2:]
    if min(y, x) >> (levels - 1) < 1:
        most = min(y, x).bit_length()
        raise RayscreenError(f"levels={levels}: plate {plate!r} has {y} x {x} images ({reference}), which halve "
                             f"to nothing; expected at most {most} level(s)")


def ingest(
    loaddata_csv: str,
    out_dir: str,
    *,
    platemap: str | None = None,
    ngff: str = "0.5",
    levels: int = 1,
    chunks: tuple[int, int, int] | None = None,
    wells_per_task: int = 4,
    use_ray: bool = True,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Ingest a LoadData CSV into ``out_dir/<plate>.zarr`` plates; returns their URIs.

    ``use_ray=False`` writes in this process (small inputs, unit tests). Errors name the
    plate, well, site and file; wells written before the error stay complete, the failing
    well stays incomplete, and a rerun resumes. ``loaddata_csv`` and its ``PathName``s may be
    URIs (``s3://...``); ``storage_options`` serve them as well as ``out_dir``.
    """
    _check_arguments(ngff, levels, chunks, wells_per_task)
    # one storage_options for the CSV, its images and the plates: remote inputs and outputs
    # usually live on the same object store
    loaddata = read_loaddata(loaddata_csv, storage_options)
    out_dir = absolute(out_dir)  # the plates' URIs travel to Ray workers, which may run elsewhere
    platemap_df = platemap_by_plate(platemap, storage_options) if platemap else None  # split by plate once
    uris, jobs = [], []
    for plate, plate_data in loaddata.by_plate().items():
        table = plate_data.table
        first = table.iloc[0]
        probe = _site_image(plate_data, first, f"plate {plate!r} {_reference(table)}")
        _check_levels(levels, probe.shape, plate, _reference(table))
        sites_per_well = table.groupby(WELL_COL).size()
        annotations = plate_data.annotations(plate)
        if platemap_df is not None:
            from ..store.annotations import override
            annotations = override(annotations.assign(**{PLATE_COL: plate})[[PLATE_COL, *annotations.columns]],
                                   platemap_df, plate).drop(columns=PLATE_COL)
        uri = join(out_dir, f"{plate}.zarr")
        try:
            fresh = not exists(uri, storage_options)
        except PermissionError:  # no listing rights: ask each well, as for a resumed plate
            fresh = False
        writer = create_plate(uri, plate, list(sites_per_well.index), list(loaddata.channels), probe.shape[1:],
                              probe.dtype, int(sites_per_well.max()), annotations=annotations, ngff=ngff,
                              levels=levels, chunks=chunks, storage_options=storage_options)
        # a resumed plate: one metadata read per well, in the planning threads; a new one has none
        written = (dict.fromkeys(writer.wells) if fresh
                   else dict(zip(writer.wells, in_threads(writer.complete_fields, writer.wells))))
        todo = [w for w, n in written.items() if n is None]
        _check_complete_wells(writer, uri, {well_name(w): int(n) for w, n in sites_per_well.items()}, written)
        skipped = len(writer.wells) - len(todo)
        if skipped:
            log.info("plate %s: %d well(s) already complete, %d to write", plate, skipped, len(todo))
        jobs += [(plate_data, writer, group) for group in _chunks(todo, wells_per_task)]
        uris.append(uri)

    if not use_ray:
        for plate_data, writer, group in iter_progress(jobs, len(jobs), DESC, "well group", enabled=progress):
            write_wells(plate_data, writer, group)
        return uris

    import ray

    ensure_ray()
    remote = ray.remote(write_wells)
    plate_refs: dict[str, Any] = {}  # one object per plate's rows, shared by that plate's tasks
    pending = []
    for data, writer, group in jobs:
        if writer.name not in plate_refs:
            plate_refs[writer.name] = ray.put(data)
        pending.append(remote.remote(plate_refs[writer.name], writer, group))
    bar = Progress(len(pending), DESC, "well group", enabled=progress)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # raises the task's error (naming plate/well/site/file)
            bar.update(1)
    except Exception as e:
        for ref in pending:
            ray.cancel(ref)
        # show the user our error (naming plate/well/site/file), not Ray's wrapper
        cause = getattr(e, "cause", None)
        if isinstance(cause, RayscreenError):
            raise cause from None
        raise
    finally:
        bar.close()
    return uris
