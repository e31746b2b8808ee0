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

from ._table import feature_columns, require_columns

# -- per-channel image metrics: computed in the profile stage's stream, so they live in
# rayscreen.profile.image_qc (upstream of analysis) and are re-exported here.
from ..profile.image_qc import (field_qc, foreground, intensity_percentiles, laplacian_variance,  # noqa: E402,F401
                                power_spectrum_slope, saturation_fraction)


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


def qc_embedding(table: pd.DataFrame, features: Sequence[str] | None = None) -> pd.DataFrame:
    """Image-QC metrics (:func:`~rayscreen.profile.image_qc.field_qc` columns of ``table``,
    one row per field) -> the embedding the artefact classifier sees, same shape minus the
    binary ``qc_empty*`` flags (rows, kept metrics).

    The variance of the Laplacian spans orders of magnitude (blur, gain): its log is
    linear enough for a linear probe. The 0/1 empty flags are thresholds of the contrast
    and foreground metrics that are kept. A metric undefined on a field (NaN: a constant
    channel) takes the median of that metric over the fields (0 where all are NaN), so
    one bad field does not remove the metric from every other field.
    """
    cols = [c for c in feature_columns(table, features) if not str(c).startswith("qc_empty")]
    out = table[cols].astype(float).copy()
    for c in cols:
        if "lapvar" in str(c):
            out[c] = np.log(out[c].clip(lower=0) + 1e-12)
    return out.fillna(out.median()).fillna(0.0)


def outlier_score(embedding: pd.DataFrame, groups: Sequence | None = None, clip: float = 10.0) -> np.ndarray:
    """Unsupervised artefact score of fields (n,) from a QC ``embedding`` (n, d), e.g.
    :func:`qc_embedding`: the root mean square over metrics of the robust z-score (median
    / 1.4826 MAD within the field's group, e.g. its plate, so plate gain and batch effects
    do not count), each |z| clipped at ``clip`` so one extreme metric cannot decide alone.

    What to show an annotator first: most fields of a screen are normal, so the fields
    that stand out on several image metrics at once are the likely artefacts. A metric
    constant within a group (MAD 0) falls back to its standard deviation, then is ignored.
    """
    X = embedding.to_numpy(dtype=float)
    groups = np.zeros(len(X)) if groups is None else np.asarray(groups)
    z = np.zeros_like(X)
    for g in pd.unique(groups):
        m = groups == g
        med = np.median(X[m], axis=0)
        scale = 1.4826 * np.median(np.abs(X[m] - med), axis=0)
        scale = np.where(scale > 1e-12, scale, X[m].std(axis=0))
        ok = scale > 1e-12
        z[np.ix_(m, ok)] = (X[m][:, ok] - med[ok]) / scale[ok]
    return np.sqrt(np.mean(np.clip(np.abs(z), 0, clip) ** 2, axis=1))


def suggest_annotations(score: np.ndarray, n_outliers: int = 25, n_random: int = 25, seed: int = 0) -> np.ndarray:
    """Indices of the fields to annotate (n_outliers + n_random,): the ``n_outliers`` with
    the highest :func:`outlier_score` (where the artefacts are) and ``n_random`` drawn at
    random from the rest (what normal looks like, and artefacts the score misses), so a
    small annotation round holds both classes without knowing the labels beforehand."""
    score = np.asarray(score, dtype=float)
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    top = order[:n_outliers]
    rest = order[n_outliers:]
    rng = np.random.default_rng(seed)
    pick = rng.choice(rest, size=min(n_random, len(rest)), replace=False) if len(rest) else rest
    return np.concatenate([top, np.sort(pick)]).astype(int)


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
