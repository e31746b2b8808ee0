"""Cells in a field: a foreground mask and nucleus centres, for single-cell crops.

Single-cell crops (Caicedo et al. 2017; DeepProfiler, Moshkov et al. 2024) centre each
training view on a nucleus, so that a weakly supervised network sees cells rather than
the background a random crop often holds. Nuclei are found the classical way: Gaussian
smoothing, Otsu's threshold, connected components (scipy / scikit-image).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_mask(plane: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """(Y, X) bool foreground of one channel: Otsu's threshold on the Gaussian-smoothed
    plane (``sigma`` px; 0: unsmoothed). A flat plane has no foreground."""
    from skimage.filters import threshold_otsu

    plane = np.asarray(plane)  # float expected: an integer plane would be smoothed in its own type
    smooth = ndimage.gaussian_filter(plane, sigma) if sigma > 0 else plane
    if smooth.max() <= smooth.min():
        return np.zeros(plane.shape, dtype=bool)
    return smooth > threshold_otsu(smooth)


def nucleus_centres(dna: np.ndarray, sigma: float = 1.5, min_area: int = 20) -> np.ndarray:
    """(N, 2) int (y, x) centroids of the nuclei of a (Y, X) DNA plane: the connected
    components of :func:`otsu_mask` of at least ``min_area`` pixels, in label order.
    (0, 2) when there is none (an empty or flat field)."""
    labels, n = ndimage.label(otsu_mask(dna, sigma))
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    index = np.flatnonzero(area >= min_area) + 1
    if len(index) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    centres = ndimage.center_of_mass(np.ones_like(labels, dtype=np.float32), labels, index)
    return np.rint(np.asarray(centres, dtype=np.float64).reshape(-1, 2)).astype(np.int64)


def crops_at(image: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """(N, C, size, size) crops of a (C, Y, X) image centred on (N, 2) ``centres``; a crop
    reaching over the border is reflected (no black margins for cells at the edge)."""
    r = size // 2
    padded = np.pad(image, ((0, 0), (r, size - r), (r, size - r)), mode="reflect")
    return np.stack([padded[:, y:y + size, x:x + size] for y, x in np.asarray(centres)])
