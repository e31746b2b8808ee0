"""Illumination correction (Singh et al. 2014, "Pipeline for illumination correction of
images for high-throughput microscopy"), as pure functions plus a mergeable accumulator.

The retrospective multi-image method: uneven illumination (vignetting, a tilted lamp) is
the same in every field of a plate, while cells fall at random positions, so

1. average all fields of the plate per channel (:class:`IlluminationAccumulator`), each
   field first clipped at a high percentile so that a few bright artefacts (debris,
   saturated cells) do not print into the average;
2. smooth the average heavily (:func:`illumination_function`: a Gaussian or a median
   filter spanning about a quarter of the field's smaller side), which keeps the slowly varying
   illumination and removes the remaining cell texture (:func:`default_size`);
3. divide by its robust minimum (2nd percentile) and floor at 1, so ``image / illum``
   (:func:`correct`) brings the bright centre down to the level of the dim corners and
   never raises a pixel above its raw value: corrected fields stay in the raw range
   (below the dtype's maximum, or within [0, 1]), as in CellProfiler.

The accumulator keeps float64 sums, so partial averages from many Ray tasks merge exactly
(``add`` fields in each task, ``merge`` the results, ``result()`` once). The function is
stored with the plate (:func:`save_illumination`) as ``<plate>/rayscreen/illumination/v1``
plus a ``rayscreen.illumination`` attribute recording how it was made.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from ..store import IncompleteWellError, MissingWellError, RayscreenError, open_plate
from ..store.extras import read_plate_array, update_plate_attrs, write_plate_array
from ..store.plate import warn_of_timepoints

VERSION = 1
ARRAY_NAME = f"illumination/v{VERSION}"
ATTR_KEY = "illumination"
ROBUST_MIN_PERCENTILE = 2.0
# The filters run on the mean image shrunk so its smaller side is about this many pixels:
# the illumination is smooth by construction, and a 500-pixel median filter on a full
# 2160 x 2560 field would take minutes.
WORKING_SIZE = 256


class IlluminationAccumulator:
    """Running per-channel average of (C, Y, X) fields, robust to bright outliers.

    ``clip_percentile``: each field's channel is clipped at this percentile of its own
    pixels before it is added (``None``: no clipping).
    """

    def __init__(self, clip_percentile: float | None = 99.5):
        self.clip_percentile = clip_percentile
        self.sum: np.ndarray | None = None  # (C, Y, X) float64
        self.count = 0

    def add(self, image: np.ndarray) -> "IlluminationAccumulator":
        """Add one field (C, Y, X) of any numeric dtype."""
        image = np.asarray(image)
        if image.ndim != 3:
            raise ValueError(f"field shape {image.shape}: expected (C, Y, X)")
        if self.sum is None:
            self.sum = np.zeros(image.shape, dtype=np.float64)
        elif self.sum.shape != image.shape:
            raise ValueError(f"field shape {image.shape} differs from the fields added before {self.sum.shape}")
        # one channel at a time: float64 copies of the whole field (cast, percentile, clip)
        # peaked at 8x its size in every read task at once
        for c, plane in enumerate(image):
            plane = plane.astype(np.float64)
            if self.clip_percentile is not None:
                np.minimum(plane, np.percentile(plane, self.clip_percentile), out=plane)
            self.sum[c] += plane
        self.count += 1
        return self

    def merge(self, other: "IlluminationAccumulator") -> "IlluminationAccumulator":
        """Add another accumulator's fields into this one (for reducing parallel partial sums)."""
        if other.sum is None:
            return self
        if self.sum is None:
            self.sum = other.sum.copy()
        elif self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge averages of shapes {self.sum.shape} and {other.sum.shape}")
        else:
            if not self.sum.flags.writeable:  # a partial from Ray's object store is a read-only view
                self.sum = self.sum.copy()
            self.sum += other.sum
        self.count += other.count
        return self

    def result(self) -> np.ndarray:
        """The mean field (C, Y, X) float32."""
        if not self.count:
            raise ValueError("no field was added; cannot average")
        return (self.sum / self.count).astype(np.float32)


def accumulate(fields: Iterable[np.ndarray], clip_percentile: float | None = 99.5) -> np.ndarray:
    """Robust mean (C, Y, X) float32 of (C, Y, X) fields; see :class:`IlluminationAccumulator`."""
    acc = IlluminationAccumulator(clip_percentile)
    for f in fields:
        acc.add(f)
    return acc.result()


def default_size(shape: tuple[int, int], method: str) -> float:
    """Default filter size in full-resolution pixels for a (Y, X) field: a Gaussian sigma of
    1/16 of the smaller side (its +-2 sigma footprint spans a quarter of the side) or a
    median window of 1/8 of it. Wider filters leave less cell texture but flatten the
    illumination's own fall-off into the corners."""
    return min(shape) / (16 if method == "gaussian" else 8)


def illumination_function(mean_image: np.ndarray, size: float | None = None, method: str = "gaussian",
                          working_size: int = WORKING_SIZE) -> np.ndarray:
    """Smooth a mean field (C, Y, X) into an illumination function (C, Y, X) float32 >= 1.

    ``method``: ``"gaussian"`` (``size`` is the sigma) or ``"median"`` (``size`` is the
    window side), both in full-resolution pixels (default :func:`default_size`). Each
    channel is divided by its 2nd percentile and floored at 1, so that correcting with
    it never raises a pixel above its raw value. A channel with no positive pixel gives a
    flat function of 1.
    """
    if method not in ("gaussian", "median"):
        raise ValueError(f"method {method!r}: expected 'gaussian' or 'median'")
    mean_image = np.asarray(mean_image, dtype=np.float64)
    if mean_image.ndim != 3:
        raise ValueError(f"mean image shape {mean_image.shape}: expected (C, Y, X)")
    _, ny, nx = mean_image.shape
    size = float(size) if size is not None else default_size((ny, nx), method)
    if size <= 0:
        raise ValueError(f"filter size {size}: expected a positive number of pixels")
    factor = min(1.0, working_size / min(ny, nx))
    small_shape = (max(1, round(ny * factor)), max(1, round(nx * factor)))
    out = np.empty(mean_image.shape, dtype=np.float32)
    for c, channel in enumerate(mean_image):
        # anti-aliased shrink, filter at the scaled size, bilinear back to full size
        small = resize(channel, small_shape, order=1, anti_aliasing=factor < 1, preserve_range=True)
        if method == "gaussian":
            smooth = ndimage.gaussian_filter(small, sigma=size * factor, mode="reflect")
        else:
            window = max(1, int(round(size * factor)) | 1)  # odd, so the window is centred
            smooth = ndimage.median_filter(small, size=window, mode="reflect")
        if factor < 1:
            smooth = resize(smooth, (ny, nx), order=1, preserve_range=True)
        out[c] = _rescale(smooth)
    return out


def _rescale(smooth: np.ndarray) -> np.ndarray:
    positive = smooth[smooth > 0]
    if positive.size == 0:
        return np.ones(smooth.shape, dtype=np.float32)
    robust_min = max(np.percentile(smooth, ROBUST_MIN_PERCENTILE), positive.min())
    return np.maximum(smooth / robust_min, 1.0).astype(np.float32)


def correct(image: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """Illumination-corrected field: ``image / illum``, (C, Y, X) float32."""
    image = np.asarray(image)
    if image.shape != illum.shape:
        raise ValueError(f"field shape {image.shape} does not match the illumination function's {illum.shape} "
                         "(C, Y, X); was it computed on another plate, level or channel selection?")
    # one float32 pass (both operands cast to float32, then divided): the same numbers as
    # image.astype(float32) / illum without the intermediate copy, which matters in the stream
    return np.true_divide(image, illum, dtype=np.float32)


def illumination_at(illum: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An illumination function (C, Y, X) resampled to fields of (Y', X') = ``shape``
    (a coarser pyramid level); unchanged when the shape already matches. Bilinear is
    enough: the function is smooth by construction."""
    if tuple(illum.shape[-2:]) == tuple(shape):
        return illum
    out = np.stack([resize(c, tuple(shape), order=1, anti_aliasing=True, preserve_range=True) for c in illum])
    return np.maximum(out, 1.0).astype(np.float32)


# -- plates


def select_fields(plate, max_fields: int | None = None, seed: int = 0,
                  wells: Iterable[str] | None = None, *,
                  incomplete: list[str] | None = None) -> list[tuple[str, str]]:
    """(well, field) pairs of a plate (wells missing on disk skipped), optionally a seeded
    random subsample of ``max_fields`` (in plate order). Split this list across Ray tasks.

    A well the plate's writer has not completed (an ingest under way or stopped) raises
    :class:`IncompleteWellError`, unless ``incomplete`` is a list: the well is then skipped
    and appended to it, for the caller to record with the fit, so that the fit is not taken
    for the whole plate's once the ingest has finished (``stream.on_error: skip``)."""
    from .datasource import in_threads

    def fields_of(well: str) -> list[str] | IncompleteWellError:
        try:
            return plate.fields(well)
        except IncompleteWellError as e:
            return e
        except MissingWellError:
            return []

    pairs = []
    wells = list(wells) if wells is not None else plate.wells
    # one metadata read per well: in the planning threads (a plate of 384 wells on S3 was
    # 384 requests one after another, hours of a first illum over 1000 plates)
    for w, fields in zip(wells, in_threads(fields_of, wells)):
        if isinstance(fields, IncompleteWellError):
            if incomplete is None:
                raise fields
            incomplete.append(w)
            continue
        pairs.extend((w, f) for f in fields)
    if pairs:
        warn_of_timepoints(plate)
    if max_fields is not None and len(pairs) > max_fields:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=max_fields, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def compute_plate_illumination(plate_uri: str, storage_options: dict[str, Any] | None = None, *,
                               max_fields: int | None = None, seed: int = 0, method: str = "gaussian",
                               size: float | None = None, clip_percentile: float | None = 99.5,
                               save: bool = False) -> np.ndarray:
    """Illumination function (C, Y, X) float32 of a plate from its fields (level 0), read here
    one after another; ``save=True`` also stores it with the plate (:func:`save_illumination`).
    The distributed version, over many plates, is :func:`rayscreen.stream.fit.compute_illumination`."""
    params = illumination_params(method, size, clip_percentile, max_fields, seed)
    plate = open_plate(plate_uri, storage_options)
    pairs = select_fields(plate, max_fields, seed)
    if not pairs:
        raise RayscreenError(f"plate {plate_uri}: no field to compute an illumination function from")
    acc = IlluminationAccumulator(clip_percentile)
    for well, field in pairs:
        acc.add(plate.read(well, field))
    illum = illumination_function(acc.result(), size=size, method=method)
    if save:
        save_illumination(plate_uri, illum, storage_options, params=params, channels=plate.channels,
                          fields=acc.count)
    return illum


def save_illumination(plate_uri: str, illum: np.ndarray, storage_options: dict[str, Any] | None = None, *,
                      params: dict[str, Any] | None = None, channels: list[str] | None = None,
                      fields: int | None = None) -> None:
    """Store an illumination function (C, Y, X) with the plate: the array at
    ``rayscreen/illumination/v1`` and a ``rayscreen.illumination`` attribute (version, path,
    shape, channels, ``params``: how it was computed, see :func:`illumination_params`, which
    a resumed job compares to skip the plate; ``fields``: how many fields were averaged)."""
    illum = np.asarray(illum, dtype=np.float32)
    if illum.ndim != 3:
        raise ValueError(f"illumination function shape {illum.shape}: expected (C, Y, X)")
    entry = {"version": VERSION, "shape": list(illum.shape), "channels": list(channels) if channels else None,
             "robust_min_percentile": ROBUST_MIN_PERCENTILE, "params": dict(params or {}), "fields": fields,
             # the array's content: a refit with the same params on other fields (an ingest
             # finished since) changes it, and stores scored with the old one must notice
             "digest": hashlib.sha256(np.ascontiguousarray(illum).tobytes()).hexdigest()[:16]}
    if illumination_entry(plate_uri, storage_options) is not None:
        # replacing one: withdraw the old claim first, so a write cut short leaves a plate
        # without a function (recomputed on the next run), never the old parameters over a
        # new, partial or different array (skipped on the next run)
        update_plate_attrs(plate_uri, storage_options, **{ATTR_KEY: None})
    path = write_plate_array(plate_uri, ARRAY_NAME, illum, entry, storage_options)
    # the attribute is written last: it marks the array complete
    update_plate_attrs(plate_uri, storage_options, **{ATTR_KEY: {**entry, "path": path}})


def illumination_params(method: str = "gaussian", size: float | None = None, clip_percentile: float | None = 99.5,
                        max_fields: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The parameters that determine a plate's illumination function (JSON): what
    ``save_illumination`` records and what a resumed job compares. Not included: how the
    work was split into tasks (partial sums merge to the same average)."""
    if method not in ("gaussian", "median"):
        raise ValueError(f"method {method!r}: expected 'gaussian' or 'median'")
    return {"method": method, "size": None if size is None else float(size),
            "clip_percentile": None if clip_percentile is None else float(clip_percentile),
            "max_fields": None if max_fields is None else int(max_fields), "seed": int(seed), "level": 0}


def illumination_entry(plate_uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The plate's ``rayscreen.illumination`` attribute (version, shape, params, ...) or ``None``."""
    return open_plate(plate_uri, storage_options).rayscreen_attrs().get(ATTR_KEY) or None


def load_illumination(plate_uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray | None:
    """The plate's stored illumination function (C, Y, X) float32, or ``None`` if it has none."""
    entry = illumination_entry(plate_uri, storage_options)
    if not entry:
        return None
    if entry.get("version") != VERSION:
        raise RayscreenError(f"plate {plate_uri}: illumination function version {entry.get('version')}; "
                         f"this rayscreen reads version {VERSION}. Recompute it with `rayscreen illum`")
    found = read_plate_array(plate_uri, ARRAY_NAME, storage_options)
    if found is None:
        raise RayscreenError(f"plate {plate_uri}: attributes name an illumination function at {entry.get('path')} "
                         "but the array is missing")
    return np.asarray(found[0], dtype=np.float32)
