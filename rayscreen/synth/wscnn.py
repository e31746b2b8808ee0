"""The simulated data of the WSCNN paper: ellipses with a rare subpopulation of circles.

From the paper (section 3.1, "Simulated data set"): greyscale images of 210 x 280 pixels;
an equally spaced grid of 48 positions (6 rows x 8 columns); a random number of objects
between 30 and 48 drawn at grid positions, each shifted by a random 1-20 pixels; object
dimensions random between 15 and 20 pixels; a random rotation per ellipse; in positive
images 10% (Sim. Data 1) or 20% (Sim. Data 2) of the ellipses replaced by circles.

Where the paper is silent we chose (all are keyword arguments of
:func:`render_wscnn_image`):

- **Object size** is the full length of the major axis (the diameter of a circle),
  uniform in [15, 20] px. An ellipse's minor axis is ``size * aspect`` with ``aspect``
  uniform in [0.55, 0.8], so every ellipse is visibly non-circular (both axes drawn
  independently from [15, 20] would make some ellipses indistinguishable from circles
  and put "circles" into negative images).
- **Shift**: a random direction and a distance uniform in [1, 20] px. Shifts that would
  push an object over the image border or within 2 px of an already placed object are
  redrawn (up to 100 times), so objects never touch and every ground-truth box holds
  exactly one object.
- **Number of circles** in a positive image: ``max(1, round(rare_fraction * n_objects))``
  (3-5 circles for 10% of 30-48 objects; the paper mentions 2-5); negative images have none.
- **Intensity and noise**: dark background 0.1; each object filled with one intensity
  uniform in [0.6, 0.9] (same distribution for circles and ellipses, so only shape tells
  them apart); Gaussian blur sigma 0.7 px (soft optical edges); additive Gaussian noise
  sigma 0.03; clipped to [0, 1]. Plates store it as uint8 (``round(255 * value)``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from skimage.draw import ellipse as draw_ellipse
from skimage.filters import gaussian

from .common import (check_fraction, check_int, check_shape, field_rng, import_create_plate, plate_uri,
                     read_tables, stream_rng, STREAM_LAYOUT, well_at, join, write_table)

OBJECT_COLUMNS = ["object", "kind", "rare", "slot", "cy", "cx", "major_axis", "minor_axis", "orientation",
                  "intensity", "y0", "x0", "y1", "x1"]
GROUND_TRUTH_COLUMNS = ["plate", "well", "field", "label"] + OBJECT_COLUMNS
OBJECTS_SUFFIX = "_objects.parquet"


def grid_positions(shape: tuple[int, int] = (210, 280), grid: tuple[int, int] = (6, 8)) -> np.ndarray:
    """Centres of an equally spaced grid of ``rows x cols`` cells: (rows * cols, 2) as (y, x)."""
    (h, w), (rows, cols) = shape, grid
    ys = (np.arange(rows) + 0.5) * h / rows
    xs = (np.arange(cols) + 0.5) * w / cols
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2)


def _place(rng: np.random.Generator, anchor: np.ndarray, radius: float, placed: list[tuple[float, float, float]],
           shape: tuple[int, int], shift: tuple[float, float], gap: float, tries: int = 100) -> tuple[float, float]:
    """Shift ``anchor`` by a random 1-20 px so the object stays inside and apart from the others."""
    best, best_clearance = None, -math.inf
    for _ in range(tries):
        angle = rng.uniform(0.0, 2 * math.pi)
        dist = rng.uniform(*shift)
        cy, cx = anchor[0] + dist * math.sin(angle), anchor[1] + dist * math.cos(angle)
        # clearance: how far the object's bounding circle stays from the border and the others
        clearance = min(cy - radius, cx - radius, shape[0] - 1 - cy - radius, shape[1] - 1 - cx - radius)
        for py, px, pr in placed:
            clearance = min(clearance, math.hypot(cy - py, cx - px) - radius - pr - gap)
        if clearance >= 0:
            return cy, cx
        if clearance > best_clearance:
            best, best_clearance = (cy, cx), clearance
    return best  # crowded beyond hope (not seen with the paper's settings): the least bad spot


def render_wscnn_image(
    rng: np.random.Generator,
    positive: bool,
    rare_fraction: float = 0.1,
    shape: tuple[int, int] = (210, 280),
    *,
    grid: tuple[int, int] = (6, 8),
    n_objects: tuple[int, int] = (30, 48),
    shift: tuple[float, float] = (1.0, 20.0),
    size: tuple[float, float] = (15.0, 20.0),
    ellipse_aspect: tuple[float, float] = (0.55, 0.8),
    background: float = 0.1,
    intensity: tuple[float, float] = (0.6, 0.9),
    blur_sigma: float = 0.7,
    noise_sigma: float = 0.03,
    gap: float = 2.0,
    return_labels: bool = False,
) -> tuple[np.ndarray, pd.DataFrame] | tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """One simulated image of the WSCNN paper.

    Parameters
    ----------
    rng : the generator of this image (see :func:`rayscreen.synth.common.field_rng`).
    positive : positive images have ``max(1, round(rare_fraction * n))`` circles among
        their ``n`` objects; negative images only ellipses.
    rare_fraction : fraction of objects that are circles in a positive image (0.1 for
        "Sim Data 1", 0.2 for "Sim Data 2").
    shape : (Y, X) of the image.
    n_objects : inclusive range of the number of objects (at most ``grid[0] * grid[1]``).

    Returns
    -------
    image : float32 (Y, X) in [0, 1].
    objects : DataFrame, one row per object: ``object`` (index), ``kind`` ("ellipse" or
        "circle"), ``rare`` (bool, circle), ``slot`` (index into :func:`grid_positions`),
        ``cy``, ``cx`` (centre), ``major_axis``,
        ``minor_axis`` (full axis lengths, px), ``orientation`` (radians), ``intensity``,
        and the tight box of its drawn pixels ``y0, x0, y1, x1`` (half-open, pixels).
    labels : int32 (Y, X), 0 background and ``object + 1`` on each object's drawn
        pixels; only when ``return_labels``.
    """
    # numpy's choice of circles would fail, unhelpfully, on a fraction above 1
    check_fraction("rare_fraction", rare_fraction)
    positions = grid_positions(shape, grid)
    lo, hi = n_objects
    n = int(rng.integers(lo, min(hi, len(positions)), endpoint=True))
    slots = np.sort(rng.choice(len(positions), size=n, replace=False))
    n_circles = max(1, int(round(rare_fraction * n))) if positive and rare_fraction > 0 else 0
    is_circle = np.zeros(n, dtype=bool)
    is_circle[rng.choice(n, size=n_circles, replace=False)] = True

    image = np.full(shape, background, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.int32)
    placed: list[tuple[float, float, float]] = []
    rows: list[dict[str, Any]] = []
    for i, slot in enumerate(slots):
        major = rng.uniform(*size)
        minor = major if is_circle[i] else major * rng.uniform(*ellipse_aspect)
        orientation = 0.0 if is_circle[i] else rng.uniform(-math.pi, math.pi)
        value = rng.uniform(*intensity)
        cy, cx = _place(rng, positions[slot], major / 2, placed, shape, shift, gap)
        placed.append((cy, cx, major / 2))
        # skimage's rotation turns the r (row) axis counter-clockwise: the major axis on rows
        rr, cc = draw_ellipse(cy, cx, major / 2, minor / 2, shape=shape, rotation=orientation)
        image[rr, cc] = value
        labels[rr, cc] = i + 1
        rows.append(dict(object=i, kind="circle" if is_circle[i] else "ellipse", rare=bool(is_circle[i]),
                         slot=int(slot), cy=cy, cx=cx, major_axis=major, minor_axis=minor, orientation=orientation,
                         intensity=value, y0=int(rr.min()), x0=int(cc.min()), y1=int(rr.max()) + 1,
                         x1=int(cc.max()) + 1))
    if blur_sigma > 0:
        image = gaussian(image, sigma=blur_sigma, preserve_range=True).astype(np.float32)
    if noise_sigma > 0:
        image += rng.normal(0.0, noise_sigma, size=shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    objects = pd.DataFrame(rows, columns=OBJECT_COLUMNS)
    return (image, objects, labels) if return_labels else (image, objects)


def to_dtype(image: np.ndarray, dtype: str | np.dtype = "uint8") -> np.ndarray:
    """A [0, 1] float image as ``dtype`` (integers span the type's full range)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return np.rint(np.clip(image, 0, 1) * np.iinfo(dtype).max).astype(dtype)
    return image.astype(dtype)


def wscnn_layout(n_images: int, fields_per_well: int = 4, positive_fraction: float = 0.5, seed: int = 0,
                 name_prefix: str = "simdata1", plate_format: int = 384) -> pd.DataFrame:
    """Which image goes where: one row per well, pure (no I/O).

    ``ceil(n_images / fields_per_well)`` wells fill ``plate_format``-well plates row-major
    (``A01, A02, ...``), as many plates as needed. Exactly
    ``round(positive_fraction * n_wells)`` wells are positive (a seeded choice); within
    each label, wells are split into thirds train/val/test as in the paper.

    Returns columns ``plate`` (name ``<name_prefix>-p01``...), ``plate_idx``, ``well``,
    ``well_idx`` (row-major position in the plate), ``Metadata_Label`` ("positive" or
    "negative"), ``Metadata_Split`` ("train", "val", "test").
    """
    check_int("n_images", n_images)
    check_int("fields_per_well", fields_per_well)
    check_fraction("positive_fraction", positive_fraction)
    check_int("seed", seed, 0)  # numpy seeds are non-negative
    n_wells = -(-n_images // fields_per_well)
    rng = stream_rng(seed, STREAM_LAYOUT)
    order = rng.permutation(n_wells)
    n_pos = int(round(positive_fraction * n_wells))
    positive = np.zeros(n_wells, dtype=bool)
    positive[order[:n_pos]] = True
    split = np.empty(n_wells, dtype=object)
    for members in (order[:n_pos], order[n_pos:]):  # a seeded order within each label
        for part, name in zip(np.array_split(members, 3), ("train", "val", "test")):
            split[part] = name
    g = np.arange(n_wells)
    plate_idx, well_idx = g // plate_format, g % plate_format
    return pd.DataFrame({
        "plate": [f"{name_prefix}-p{p + 1:02d}" for p in plate_idx],
        "plate_idx": plate_idx,
        "well": [well_at(int(w), plate_format) for w in well_idx],
        "well_idx": well_idx,
        "Metadata_Label": np.where(positive, "positive", "negative"),
        "Metadata_Split": split.astype(str),
    })


def synth_wscnn(
    out_dir: str,
    n_images: int = 96,
    rare_fraction: float = 0.1,
    positive_fraction: float = 0.5,
    fields_per_well: int = 4,
    seed: int = 0,
    name_prefix: str = "simdata1",
    storage_options: dict[str, Any] | None = None,
    *,
    shape: tuple[int, int] = (210, 280),
    dtype: str = "uint8",
    channel: str = "Grey",
    ngff: str = "0.5",
    overwrite: bool = False,
    **render_kwargs: Any,
) -> list[str]:
    """Write the WSCNN simulation as 384-well plates; returns the plate URIs.

    Each image is one field (1 channel, ``shape``, ``dtype``) of a well; all fields of a
    well share its label. Well annotations: ``Metadata_Label``, ``Metadata_RareFraction``
    (the circle fraction of positive images), ``Metadata_Split`` and ``Metadata_Dataset``
    (``name_prefix``). Ground truth per object goes to ``<out_dir>/<plate>_objects.parquet``
    (read it back with :func:`load_wscnn_objects`). Paper-sized data:
    ``n_images=4000, rare_fraction=0.1`` ("Sim Data 1") or ``0.2`` ("Sim Data 2").

    Images are pure functions of ``(seed, plate, well, field)``; a rerun on an existing
    output resumes (complete wells are skipped) unless ``overwrite``.
    """
    # every argument checked before the first plate is created: a bad one leaves no partial output
    check_fraction("rare_fraction", rare_fraction)
    check_shape("shape", shape)
    layout = wscnn_layout(n_images, fields_per_well, positive_fraction, seed, name_prefix)
    create_plate = import_create_plate()
    uris = []
    for plate, wells in layout.groupby("plate", sort=True):
        annotations = pd.DataFrame({
            "Metadata_Plate": plate,
            "Metadata_Well": wells["well"].to_list(),
            "Metadata_Label": wells["Metadata_Label"].to_list(),
            "Metadata_RareFraction": float(rare_fraction),
            "Metadata_Split": wells["Metadata_Split"].to_list(),
            "Metadata_Dataset": name_prefix,
        })
        uri = plate_uri(out_dir, plate)
        writer = create_plate(uri, name=plate, wells=wells["well"].to_list(), channels=[channel],
                              field_shape=tuple(shape), dtype=dtype, field_count=fields_per_well,
                              annotations=annotations, ngff=ngff, storage_options=storage_options,
                              overwrite=overwrite)
        frames = []
        for row in wells.itertuples(index=False):
            done = writer.is_complete(row.well)
            positive = row.Metadata_Label == "positive"
            for f in range(fields_per_well):
                rng = field_rng(seed, row.plate_idx, row.well_idx, f)
                image, objects = render_wscnn_image(rng, positive, rare_fraction, tuple(shape), **render_kwargs)
                if not done:
                    writer.write_field(row.well, f, to_dtype(image, dtype)[None])
                objects.insert(0, "label", row.Metadata_Label)
                objects.insert(0, "field", str(f))
                objects.insert(0, "well", row.well)
                objects.insert(0, "plate", plate)
                frames.append(objects)
            if not done:
                writer.complete_well(row.well, fields_per_well)
        write_table(pd.concat(frames, ignore_index=True)[GROUND_TRUTH_COLUMNS],
                    join(out_dir, f"{plate}{OBJECTS_SUFFIX}"), storage_options)
        uris.append(uri)
    return uris


def load_wscnn_objects(out_dir: str, plates: Sequence[str] | None = None,
                       storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The per-object ground truth written by :func:`synth_wscnn` (all plates, or ``plates``).

    Columns: ``plate, well, field`` (field name as in ``Plate.fields``, a string),
    ``label``, ``object, kind, rare, slot, cy, cx, major_axis, minor_axis, orientation,
    intensity, y0, x0, y1, x1`` (half-open pixel box).
    """
    return read_tables(out_dir, OBJECTS_SUFFIX, plates, storage_options)
