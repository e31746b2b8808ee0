"""Quality control of fields: image metrics, and an artefact classifier on embeddings.

Image metrics are pure numpy functions of one (Y, X) channel; :func:`field_qc` runs them
over a (C, Y, X) field and returns a flat dict (``qc_focus_lapvar_c0``, ...) that becomes
one row of a per-field QC table. They catch the artefacts a screen is full of: blur
(focus), saturation, empty fields.

The artefact classifier follows the HCS quality-control comparison (BBBC022/021): frozen
embeddings of fields, a small annotated set (normal / abnormal), and either a kNN (k=5)
or a linear probe (logistic regression); accuracy, F1 and ROC-AUC by stratified
cross-validation, then a model fitted on all annotated fields flags every field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from ._table import feature_columns, require_columns

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
    """Slope of log(power) against log(spatial frequency) of a (Y, X) image, the radially
    averaged power spectrum fitted over frequencies 1 .. min(Y, X) / 2 (CellProfiler's
    ``PowerLogLogSlope``). Blur removes high frequencies: the slope becomes more negative."""
    plane = _plane(image)
    plane = plane - plane.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(plane))) ** 2
    h, w = plane.shape
    y, x = np.indices(plane.shape)
    radius = np.hypot(y - h // 2, x - w // 2).round().astype(int)
    r_max = min(h, w) // 2
    sums = np.bincount(radius.ravel(), weights=power.ravel(), minlength=r_max + 1)[1:r_max + 1]
    counts = np.bincount(radius.ravel(), minlength=r_max + 1)[1:r_max + 1]
    radial = sums / np.maximum(counts, 1)
    ok = radial > 0
    if ok.sum() < 2:
        return float("nan")  # a constant image has no spectrum to fit
    freqs = np.arange(1, r_max + 1)[ok]
    return float(np.polyfit(np.log(freqs), np.log(radial[ok]), 1)[0])


def saturation_fraction(image, max_value: float | None = None) -> float:
    """Fraction of pixels at or above ``max_value``. Default: the dtype's maximum for
    integer images; for float images (no natural ceiling) the image's own maximum, as
    CellProfiler's ``PercentMaximal``."""
    image = np.asarray(image)
    if max_value is None:
        max_value = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else image.max()
    return float(np.mean(image >= max_value))


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
    foreground: (0.0, 0.0).
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
    contrast = (fg.mean() - bg.mean()) / noise if noise > 0 else float("inf")
    return float(mask.mean()), float(contrast)


def field_qc(image, *, max_value: float | None = None, percentiles: Sequence[float] = (1, 50, 99),
             sigma: float = 2.0, min_contrast: float = 3.0, min_foreground: float = 0.001) -> dict[str, float]:
    """Flat QC metrics of one field ``image`` shaped (C, Y, X), per channel ``c``:

    ``qc_focus_lapvar_c{c}``, ``qc_focus_pslope_c{c}``, ``qc_saturation_c{c}``,
    ``qc_p{q}_c{c}`` (e.g. ``qc_p99_c0``), ``qc_foreground_c{c}``, ``qc_contrast_c{c}``,
    ``qc_empty_c{c}`` (1.0 when the Otsu contrast is below ``min_contrast`` or the
    foreground fraction below ``min_foreground``), and ``qc_empty`` (1.0 if every channel
    is empty). ``max_value`` is the saturation level (default: dtype maximum).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected a field shaped (C, Y, X), got shape {image.shape}")
    out: dict[str, float] = {}
    empty = []
    for c, plane in enumerate(image):
        out[f"qc_focus_lapvar_c{c}"] = laplacian_variance(plane)
        out[f"qc_focus_pslope_c{c}"] = power_spectrum_slope(plane)
        out[f"qc_saturation_c{c}"] = saturation_fraction(plane, max_value)
        for q, v in intensity_percentiles(plane, percentiles).items():
            out[f"qc_p{q:g}_c{c}"] = v
        frac, contrast = foreground(plane, sigma)
        out[f"qc_foreground_c{c}"] = frac
        out[f"qc_contrast_c{c}"] = contrast
        empty.append(contrast < min_contrast or frac < min_foreground)
        out[f"qc_empty_c{c}"] = float(empty[-1])
    out["qc_empty"] = float(all(empty))
    return out


# -- artefact classifier on embeddings ------------------------------------------------

FIELD_KEY = ("Metadata_Plate", "Metadata_Well", "Metadata_Field")


@dataclass
class ArtefactClassification:
    """Result of :func:`classify_artefacts`.

    accuracy, f1 (of the abnormal class), f1_weighted (weighted over both classes, as the
    HCS-QC paper reports), roc_auc : cross-validated on the annotated fields; ``None`` when
    there are too few annotations per class (see ``warnings``).
    predictions : every field of the embeddings table: key columns, ``Metadata_QC_Score``
        (probability of abnormal) and ``Metadata_QC_Abnormal`` (bool), from a model fitted
        on all annotated fields.
    """

    method: str
    accuracy: float | None
    f1: float | None
    f1_weighted: float | None
    roc_auc: float | None
    n_annotated: int
    n_splits: int
    predictions: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "accuracy": self.accuracy, "f1": self.f1, "f1_weighted": self.f1_weighted,
                "roc_auc": self.roc_auc, "n_annotated": self.n_annotated, "n_splits": self.n_splits,
                "n_flagged": int(self.predictions["Metadata_QC_Abnormal"].sum()), "warnings": list(self.warnings)}


def make_artefact_model(method: str = "knn", k: int = 5, seed: int = 0):
    """An unfitted scikit-learn pipeline: standardisation, then a kNN (``k`` neighbours)
    or a logistic-regression linear probe. Standardising first keeps one large-scale
    embedding dimension from dominating distances and the regularisation."""
    # scikit-learn is imported here, not at the top: image QC and the rest of
    # rayscreen.analysis do not need it, and it is slow to import in Ray workers.
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if method == "knn":
        return make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k))
    if method in ("linear", "logistic"):
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    raise ValueError(f"method must be 'knn' or 'linear', got {method!r}")


def cross_validate_artefacts(X: np.ndarray, y: np.ndarray, *, method: str = "knn", k: int = 5,
                             n_splits: int = 5, seed: int = 0) -> dict:
    """Stratified ``n_splits``-fold cross-validated metrics of the artefact model on
    embeddings ``X`` (n, d) and labels ``y`` (n,) with 1 = abnormal. Returns
    ``{"accuracy", "f1", "f1_weighted", "roc_auc", "n_splits", "score"}``, ``score``
    the out-of-fold probabilities of abnormal (n,)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X, y = np.asarray(X, dtype=float), np.asarray(y).astype(int)
    n_splits = int(min(n_splits, np.bincount(y, minlength=2).min()))
    if n_splits < 2:
        raise ValueError("cross-validation needs at least 2 annotated fields of each class")
    # kNN needs k neighbours in each training fold.
    k = int(min(k, len(y) - int(np.ceil(len(y) / n_splits))))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    score = cross_val_predict(make_artefact_model(method, k, seed), X, y, cv=cv, method="predict_proba")[:, 1]
    pred = (score >= 0.5).astype(int)
    return {"accuracy": float(accuracy_score(y, pred)), "f1": float(f1_score(y, pred, zero_division=0)),
            "f1_weighted": float(f1_score(y, pred, average="weighted", zero_division=0)),
            "roc_auc": float(roc_auc_score(y, score)), "n_splits": n_splits, "score": score}


def classify_artefacts(embeddings: pd.DataFrame, annotations: pd.DataFrame, *, method: str = "knn", k: int = 5,
                       key: Sequence[str] = FIELD_KEY, label: str = "Metadata_QC", abnormal: str = "abnormal",
                       features: Sequence[str] | None = None, n_splits: int = 5,
                       seed: int = 0) -> ArtefactClassification:
    """Train and evaluate an artefact classifier; flag every field.

    Parameters
    ----------
    embeddings : one row per field: ``key`` columns (default plate, well, field) and
        embedding features (e.g. a CNN's pooled activations).
    annotations : the annotated fields: ``key`` columns and ``label`` (``abnormal`` vs
        anything else, e.g. ``"normal"``; bools work too, True = abnormal).
    method : ``"knn"`` (k=5 as in the HCS-QC paper) or ``"linear"`` (logistic regression).
    """
    key = list(key)
    require_columns(embeddings, key, "field key")
    require_columns(annotations, key + [label], "annotation")
    cols = [c for c in feature_columns(embeddings, features) if c not in key]
    notes: list[str] = []

    labelled = embeddings[key + cols].merge(annotations[key + [label]], on=key, how="inner", validate="1:1")
    unmatched = len(annotations) - len(labelled)
    if unmatched:
        notes.append(f"{unmatched} annotated field(s) not found in the embeddings were ignored")
    raw = labelled[label]
    y = (raw.astype(bool) if pd.api.types.is_bool_dtype(raw) else raw.astype(str) == abnormal).to_numpy().astype(int)
    X = labelled[cols].to_numpy(dtype=float)

    metrics = dict(accuracy=None, f1=None, f1_weighted=None, roc_auc=None, n_splits=0)
    try:
        cv = cross_validate_artefacts(X, y, method=method, k=k, n_splits=n_splits, seed=seed)
        metrics = {m: cv[m] for m in metrics}
    except ValueError as err:
        notes.append(f"no cross-validated metrics: {err} "
                     f"(found {int(y.sum())} abnormal, {int(len(y) - y.sum())} normal)")

    predictions = embeddings[key].copy()
    if len(np.unique(y)) == 2:
        model = make_artefact_model(method, min(k, len(y)), seed).fit(X, y)
        score = model.predict_proba(embeddings[cols].to_numpy(dtype=float))[:, 1]
    else:
        notes.append("annotations hold a single class: no classifier trained, no field flagged")
        score = np.full(len(embeddings), np.nan)
    predictions["Metadata_QC_Score"] = score
    predictions["Metadata_QC_Abnormal"] = score >= 0.5
    return ArtefactClassification(method=method, n_annotated=len(labelled), predictions=predictions,
                                  warnings=notes, **metrics)
