"""The classical baseline: hand-crafted features per field, pure numpy / scipy / scikit-image.

What CellProfiler-style pipelines measure, reduced to field-level statistics (no per-cell
tables), so the baseline sees the same fields as the CNN profiles and is aggregated,
normalised and evaluated the same way. Per field shaped (C, Y, X), per channel ``ch``:

- intensity: ``{ch}_int_mean``, ``_std``, ``_p{1,5,25,50,75,95,99}``, ``_skew``, ``_kurt``,
  ``_gradmag`` (mean gradient magnitude: edge content), ``_lapvar`` (fine texture);
- foreground (Otsu on the Gaussian-smoothed channel): ``{ch}_fg_fraction``,
  ``{ch}_fg_mean``, ``{ch}_bg_mean``, ``{ch}_fg_ratio``;
- texture: Haralick features of the grey-level co-occurrence matrix (GLCM) of the channel
  quantised to ``levels`` grey levels between its 0.5th and 99.5th percentiles, averaged
  over 4 angles, at each distance ``d``: ``{ch}_glcm_d{d}_{contrast, dissimilarity,
  homogeneity, ASM, correlation}``;
- objects of the channel (every channel here; channel 0 is the nuclear stain of most
  screens): ``{ch}_obj_count``, ``_density`` (per 10^4 px), ``_area_mean``, ``_area_std``,
  ``_eccentricity``, ``_solidity``, ``_formfactor`` (4 pi area / perimeter^2),
  ``_major``, ``_minor`` (axis lengths), ``_intensity`` (mean of objects' mean
  intensities); per-object means are NaN when a field has no object (aggregation skips NaN);
- co-localisation: ``{a}_{b}_corr``, the Pearson correlation of each pair of channels.

All features are float64 and finite except the per-object means of object-less fields.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, stats

from ..stream.cells import otsu_mask

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "ASM", "correlation")
OBJECT_STATS = ("count", "density", "area_mean", "area_std", "eccentricity", "solidity", "formfactor",
                "major", "minor", "intensity")


def classical_feature_names(channels: Sequence[str], distances: Sequence[int] = (1, 3)) -> list[str]:
    """Names of :func:`classical_features`' output for these channel names, in order."""
    names: list[str] = []
    for ch in channels:
        names += [f"{ch}_int_mean", f"{ch}_int_std", *[f"{ch}_int_p{q}" for q in PERCENTILES],
                  f"{ch}_int_skew", f"{ch}_int_kurt", f"{ch}_int_gradmag", f"{ch}_int_lapvar"]
        names += [f"{ch}_fg_fraction", f"{ch}_fg_mean", f"{ch}_bg_mean", f"{ch}_fg_ratio"]
        names += [f"{ch}_glcm_d{d}_{p}" for d in distances for p in GLCM_PROPS]
        names += [f"{ch}_obj_{s}" for s in OBJECT_STATS]
    names += [f"{a}_{b}_corr" for i, a in enumerate(channels) for b in channels[i + 1:]]
    return names


def _glcm(plane: np.ndarray, distances: Sequence[int], levels: int) -> list[float]:
    from skimage.feature import graycomatrix, graycoprops

    lo, hi = np.percentile(plane, (0.5, 99.5))
    if hi <= lo:  # a flat channel has no texture: constant GLCM (all pixels one level)
        q = np.zeros(plane.shape, dtype=np.uint8)
    else:
        q = np.clip((plane - lo) / (hi - lo) * (levels - 1) + 0.5, 0, levels - 1).astype(np.uint8)
    glcm = graycomatrix(q, distances=list(distances), angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
                        levels=levels, symmetric=True, normed=True)
    out = []
    for i, _ in enumerate(distances):
        for p in GLCM_PROPS:
            values = graycoprops(glcm[:, :, i:i + 1, :], p)  # (1, n_angles)
            # correlation is undefined (NaN) on a constant image; 1.0 is its limit there
            out.append(float(np.nan_to_num(values.mean(), nan=1.0)))
    return out


def _objects(plane: np.ndarray, mask: np.ndarray, min_area: int) -> list[float]:
    from skimage.measure import label, regionprops

    labels = label(ndimage.binary_opening(mask, iterations=1))
    props = [r for r in regionprops(labels, intensity_image=plane) if r.area >= min_area]
    n = len(props)
    density = n / (plane.size / 1e4)
    if n == 0:
        return [0.0, 0.0] + [float("nan")] * (len(OBJECT_STATS) - 2)
    area = np.array([r.area for r in props], dtype=float)
    perim = np.array([r.perimeter for r in props], dtype=float)
    form = 4 * np.pi * area / np.maximum(perim, 1.0) ** 2
    return [float(n), float(density), float(area.mean()), float(area.std()),
            float(np.mean([r.eccentricity for r in props])), float(np.mean([r.solidity for r in props])),
            float(form.mean()), float(np.mean([r.axis_major_length for r in props])),
            float(np.mean([r.axis_minor_length for r in props])),
            float(np.mean([r.intensity_mean for r in props]))]


def classical_features(image, *, distances: Sequence[int] = (1, 3), levels: int = 32, sigma: float = 1.5,
                       min_area: int = 10, min_contrast: float = 3.0) -> np.ndarray:
    """Classical features of one field ``image`` shaped (C, Y, X) -> float64 (K,), in the
    order of :func:`classical_feature_names` (see the module docstring). ``sigma`` smooths
    before Otsu thresholding; objects smaller than ``min_area`` px are noise; a channel whose
    Otsu foreground is less than ``min_contrast`` background standard deviations above its
    background has no foreground and no objects (an empty field, not noise blobs)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a field shaped (C, Y, X), got shape {image.shape}")
    planes = image.astype(np.float64, copy=False)
    out: list[float] = []
    for plane in planes:
        std = plane.std()
        out += [float(plane.mean()), float(std), *np.percentile(plane, PERCENTILES).tolist()]
        out += ([float(stats.skew(plane, axis=None)), float(stats.kurtosis(plane, axis=None))] if std > 0
                else [0.0, 0.0])
        gy, gx = np.gradient(plane)
        out += [float(np.hypot(gy, gx).mean()), float(ndimage.laplace(plane, mode="reflect").var())]
        mask = otsu_mask(plane, sigma)
        if mask.any() and (~mask).any():
            # Otsu splits any image in two, pure noise too: a split whose foreground is not
            # min_contrast background sigmas above the background (as image_qc.foreground
            # judges it) is no foreground, else a field without cells counted hundreds of
            # noise blobs as nuclei, the highest count on the plate
            noise = plane[~mask].std()
            if noise > 0 and (plane[mask].mean() - plane[~mask].mean()) / noise < min_contrast:
                mask = np.zeros_like(mask)
        fg = plane[mask].mean() if mask.any() else plane.mean()
        bg = plane[~mask].mean() if (~mask).any() else plane.mean()
        out += [float(mask.mean()), float(fg), float(bg), float(fg / bg) if bg > 0 else 0.0]
        out += _glcm(plane, distances, levels)
        out += _objects(plane, mask, min_area)
    flat = planes.reshape(len(planes), -1)
    for i in range(len(planes)):
        for j in range(i + 1, len(planes)):
            a, b = flat[i], flat[j]
            ok = a.std() > 0 and b.std() > 0
            out.append(float(np.corrcoef(a, b)[0, 1]) if ok else 0.0)
    return np.asarray(out, dtype=np.float64)
