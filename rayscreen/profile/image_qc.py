"""Per-field image quality metrics, pure numpy/scipy/skimage on (Y, X) channels and (C, Y, X)
fields: focus (variance of the Laplacian, power-spectrum log-log slope, the scale-free
log ratio of the two variances), saturation, intensity percentiles and peak ratios,
foreground fraction and contrast (empty fields), channel correlations (debris).

They run inside the profile stage's stream (one row of QC metrics per field, stored as
``field_qc`` in the profile store) and are re-exported by :mod:`rayscreen.analysis.qc`,
which adds the artefact classifier on embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ..stream.datasource import saturation_fraction  # the read task measures raw fields with it too


# -- per-channel image metrics ------------------------------------------------------


def _plane(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected one channel shaped (Y, X), got shape {image.shape}")
    return image.astype(float, copy=False)


def laplacian_variance(image) -> float:
    """Variance of the 4-neighbour Laplacian of a (Y, X) image (reflected borders).
    Sharp images have strong second derivatives; blur lowers the score."""
    return float(ndimage.laplace(_plane(image), mode="reflect").var())


def power_spectrum_slope(image) -> float:
    """Slope of log(power) against log(spatial frequency) of a (Y, X) image: CellProfiler's
    ``PowerLogLogSlope`` (MeasureImageQuality, centrosome's ``rps``): the power summed over
    rings of integer radius 2 .. min(Y, X) / 8 (in cycles per image), fitted by least squares.
    Blur removes high frequencies: the slope becomes more negative.

    The fit stops at 1/8 of the field, as CellProfiler's does: beyond it a field's spectrum is
    the flat floor of pixel noise, which holds most of the rings; fitted up to 1/2 (as here
    until 2026-11-27) the floor dominated, and a strongly blurred field, whose signal falls
    into the floor sooner, scored *sharper* than an in-focus one."""
    plane = _plane(image)
    plane = plane - plane.mean()
    power = np.abs(np.fft.fft2(plane)) ** 2
    h, w = plane.shape
    # distance from the zero frequency, in cycles per image (the FFT wraps around)
    fy, fx = np.abs(np.fft.fftfreq(h) * h), np.abs(np.fft.fftfreq(w) * w)
    ring = np.floor(np.hypot(fy[:, None], fx[None, :])).astype(int) + 1  # as rps: ring k holds [k-1, k)
    rings = np.arange(2, int(np.floor(min(h, w) / 8.0)))
    if len(rings) < 2:
        return float("nan")  # a field under 24 px has too few rings to fit
    sums = np.asarray(ndimage.sum(power, ring, rings), dtype=float)
    ok = sums > 0
    if ok.sum() < 2:
        return float("nan")  # a constant image has no spectrum to fit
    return float(np.polyfit(np.log(rings[ok]), np.log(sums[ok]), 1)[0])


def intensity_percentiles(image, q: Sequence[float] = (1, 50, 99)) -> dict[float, float]:
    """``{q: percentile}`` of a (Y, X) image's intensities."""
    values = np.percentile(_plane(image), q)
    return {float(p): float(v) for p, v in zip(q, values)}


def foreground(image, sigma: float = 2.0) -> tuple[float, float]:
    """Foreground fraction and contrast of a (Y, X) image.

    Otsu's threshold on the Gaussian-smoothed image (smoothing keeps pixel noise from
    deciding the split) separates foreground from background. The contrast is
    ``(mean_fg - mean_bg) / std_bg`` on the raw pixels: Otsu always splits an image in
    two, even pure noise, and the contrast says whether the split is real (cells several
    noise sigmas above background) or noise (well below 1). A constant image has no
    foreground: (0.0, 0.0); a noiseless background leaves the contrast undefined (NaN).
    """
    from skimage.filters import threshold_otsu

    plane = _plane(image)
    smooth = ndimage.gaussian_filter(plane, sigma) if sigma > 0 else plane
    if smooth.max() <= smooth.min():
        return 0.0, 0.0
    mask = smooth > threshold_otsu(smooth)
    if not mask.any() or mask.all():
        return float(mask.mean()), 0.0
    fg, bg = plane[mask], plane[~mask]
    noise = bg.std()
    contrast = (fg.mean() - bg.mean()) / noise if noise > 0 else float("nan")  # noiseless background: undefined
    return float(mask.mean()), float(contrast)


def focus_ratio(image) -> float:
    """Scale-free focus of a (Y, X) image: ``log(var(Laplacian) / var(image))``.

    The variance of the Laplacian grows with the square of the intensity (gain, exposure,
    stain), so across plates and channels it measures brightness as much as focus; divided
    by the image's own variance it does not, and the log makes the heavy tail of the ratio
    linear enough for a linear probe. Blur lowers it. A constant image: NaN."""
    plane = _plane(image)
    var = plane.var()
    if var <= 0:
        return float("nan")
    return float(np.log(max(ndimage.laplace(plane, mode="reflect").var(), 1e-300) / var))


def peak_ratios(image) -> tuple[float, float]:
    """``(log((max + e) / (p50 + e)), log((p99 + e) / (p50 + e)))`` of a (Y, X) image, ``e``
    1 count for integer images and 1e-3 for float ones: how far the brightest pixels (bright
    debris, overexposure) stand above the typical pixel, independent of the gain."""
    image = np.asarray(image)
    eps = 1.0 if np.issubdtype(image.dtype, np.integer) else 1e-3
    plane = _plane(image)
    p50, p99 = np.percentile(plane, (50, 99))
    if p50 + eps <= 0:
        return float("nan"), float("nan")
    return float(np.log((plane.max() + eps) / (p50 + eps))), float(np.log((p99 + eps) / (p50 + eps)))


def channel_correlations(image) -> dict[tuple[int, int], float]:
    """Pearson correlation of each pair of channels ``(i, j)``, i < j, of a (C, Y, X) field
    (0.0 where a channel is constant). Stains of different compartments correlate weakly;
    debris that glows in every channel and an empty field's shared background do not."""
    flat = np.asarray(image, dtype=float).reshape(len(image), -1)
    std = flat.std(axis=1)
    out = {}
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            out[(i, j)] = float(np.corrcoef(flat[i], flat[j])[0, 1]) if std[i] > 0 and std[j] > 0 else 0.0
    return out


def field_qc(image, *, max_value: float | None = None, percentiles: Sequence[float] = (1, 50, 99),
             sigma: float = 2.0, min_contrast: float = 3.0, min_foreground: float = 0.001) -> dict[str, float]:
    """Flat QC metrics of one field ``image`` shaped (C, Y, X), per channel ``c``:

    ``qc_focus_lapvar_c{c}``, ``qc_focus_pslope_c{c}``, ``qc_focus_ratio_c{c}``
    (:func:`focus_ratio`), ``qc_saturation_c{c}``, ``qc_p{q}_c{c}`` (e.g. ``qc_p99_c0``),
    ``qc_max_ratio_c{c}`` / ``qc_p99_ratio_c{c}`` (:func:`peak_ratios`),
    ``qc_foreground_c{c}``, ``qc_contrast_c{c}``, ``qc_empty_c{c}`` (1.0 when the Otsu
    contrast is below ``min_contrast`` or the foreground fraction below
    ``min_foreground``); per pair of channels ``qc_corr_c{i}{j}``
    (:func:`channel_correlations`); and ``qc_empty`` (1.0 if every channel is empty).
    ``max_value`` is the saturation level (default: dtype maximum): give raw detector
    images (the profile stage does) so that saturation means clipped at the detector.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a field shaped (C, Y, X), got shape {image.shape}")
    out: dict[str, float] = {}
    empty = []
    for c, plane in enumerate(image):
        out[f"qc_focus_lapvar_c{c}"] = laplacian_variance(plane)
        out[f"qc_focus_pslope_c{c}"] = power_spectrum_slope(plane)
        out[f"qc_focus_ratio_c{c}"] = focus_ratio(plane)
        out[f"qc_saturation_c{c}"] = saturation_fraction(plane, max_value)
        for q, v in intensity_percentiles(plane, percentiles).items():
            out[f"qc_p{q:g}_c{c}"] = v
        out[f"qc_max_ratio_c{c}"], out[f"qc_p99_ratio_c{c}"] = peak_ratios(plane)
        frac, contrast = foreground(plane, sigma)
        out[f"qc_foreground_c{c}"] = frac
        out[f"qc_contrast_c{c}"] = contrast
        empty.append(contrast < min_contrast or frac < min_foreground)
        out[f"qc_empty_c{c}"] = float(empty[-1])
    for (i, j), r in channel_correlations(image).items():
        out[f"qc_corr_c{i}{j}"] = r
    out["qc_empty"] = float(all(empty))
    return out


def qc_metric_names(n_channels: int, percentiles: Sequence[float] = (1, 50, 99)) -> list[str]:
    """Names of :func:`field_qc`'s metrics, in its order, for fields of ``n_channels`` channels."""
    names: list[str] = []
    for c in range(n_channels):
        names += [f"qc_focus_lapvar_c{c}", f"qc_focus_pslope_c{c}", f"qc_focus_ratio_c{c}", f"qc_saturation_c{c}"]
        names += [f"qc_p{q:g}_c{c}" for q in percentiles]
        names += [f"qc_max_ratio_c{c}", f"qc_p99_ratio_c{c}"]
        names += [f"qc_foreground_c{c}", f"qc_contrast_c{c}", f"qc_empty_c{c}"]
    names += [f"qc_corr_c{i}{j}" for i in range(n_channels) for j in range(i + 1, n_channels)]
    return names + ["qc_empty"]
