"""Quality control of fields: image metrics, and an artefact classifier on embeddings.

Image metrics are pure numpy functions of one (Y, X) channel; :func:`field_qc` runs them
over a (C, Y, X) field and returns a flat dict (``qc_focus_lapvar_c0``, ...) that becomes
one row of a per-field QC table. They catch the artefacts a screen is full of: blur
(focus), saturation, empty fields.

The artefact classifier follows the HCS quality-control comparison (BBBC022/021): frozen
embeddings of fields, a small annotated set (normal / abnormal), and either a kNN (k=5)
or a linear probe (logistic regression); accuracy, F1 and ROC-AUC by stratified
cross-validation (grouped by well when the fields carry plate and well, so fields of one
well are never on both sides of a split), then a model fitted on all annotated fields
flags every field.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..store.annotations import as_identifier
from ._table import feature_columns, missing_values, require_columns

# -- per-channel image metrics: computed in the profile stage's stream, so they live in
# rayscreen.profile.image_qc (upstream of analysis) and are re-exported here.
from ..profile.image_qc import (field_qc, foreground, intensity_percentiles, laplacian_variance,  # noqa: E402,F401
                                power_spectrum_slope, saturation_fraction)


# -- artefact classifier on embeddings ------------------------------------------------

FIELD_KEY = ("Metadata_Plate", "Metadata_Well", "Metadata_Field")
# cross-validation groups: fields of one well share its treatment, plate position and
# often its artefact (a bubble, a smear), so they must not be split between train and test
WELL_KEY = ("Metadata_Plate", "Metadata_Well")

# how annotators and spreadsheets write the two classes (compared stripped, lower case);
# "1.0"/"0.0" are 1/0 that went through a float column (a CSV column with blanks)
ABNORMAL_WORDS = frozenset({"abnormal", "artefact", "artifact", "true", "1", "1.0"})
NORMAL_WORDS = frozenset({"normal", "false", "0", "0.0"})


@dataclass
class ArtefactClassification:
    """Result of :func:`classify_artefacts`.

    accuracy, f1 (of the abnormal class), f1_weighted (weighted over both classes, as the
    HCS-QC paper reports), roc_auc : cross-validated on the annotated fields; ``None`` when
    there are too few annotations per class (see ``warnings``).
    predictions : every field of the embeddings table: key columns, ``Metadata_QC_Score``
        (probability of abnormal) and ``Metadata_QC_Abnormal`` (bool), from a model fitted
        on all annotated fields; an annotated field's flag is its annotation.
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
    cv_groups: str | None = None  # "well" when folds keep each well's fields together, "field" when not
    # the classifier fitted on all annotated fields (a scikit-learn pipeline), None with one class
    model: Any = None

    def to_dict(self) -> dict:
        return {"method": self.method, "accuracy": self.accuracy, "f1": self.f1, "f1_weighted": self.f1_weighted,
                "roc_auc": self.roc_auc, "n_annotated": self.n_annotated, "n_splits": self.n_splits,
                "cv_groups": self.cv_groups,
                "n_flagged": int(self.predictions["Metadata_QC_Abnormal"].sum()), "warnings": list(self.warnings)}


def qc_embedding(table: pd.DataFrame, features: Sequence[str] | None = None) -> pd.DataFrame:
    """Image-QC metrics (:func:`~rayscreen.profile.image_qc.field_qc` columns of ``table``,
    one row per field) -> the embedding the artefact classifier sees, same shape minus the
    binary ``qc_empty*`` flags (rows, kept metrics).

    The variance of the Laplacian spans orders of magnitude (blur, gain): its log is
    linear enough for a linear probe. The 0/1 empty flags are thresholds of the contrast
    and foreground metrics that are kept. A metric undefined on a field (NaN: a constant
    channel; or infinite) takes the median of that metric over the fields (0 where all are
    NaN), so one bad field does not remove the metric from every other field.
    """
    out = qc_transform(table, features)
    return out.fillna(out.median()).fillna(0.0)


def qc_transform(table: pd.DataFrame, features: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`qc_embedding` before the missing values are filled: the log of the Laplacian
    variances, the ``qc_empty*`` flags dropped, infinities as NaN. A caller that embeds a
    screen in parts fills each part with medians taken over the whole (or a sample)."""
    cols = [c for c in feature_columns(table, features) if not str(c).startswith("qc_empty")]
    out = table[cols].astype(float).copy()
    for c in cols:
        if "lapvar" in str(c):
            out[c] = np.log(out[c].clip(lower=0) + 1e-12)
    return out.replace([np.inf, -np.inf], np.nan)  # undefined too (e.g. contrast over a noiseless background)


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


def _cv_folds(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int
              ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, str | None]:
    """``(folds, n_splits, note)``: stratified folds of ``y`` (n,), grouped by ``groups``
    (n,) when given and possible, ``note`` saying why not otherwise.

    Grouped folds (StratifiedGroupKFold) need each class in at least ``n_splits`` groups:
    the splits drop to what the groups allow (at least 2), and a split that leaves a
    training fold without one class or a test fold empty is retried with fewer splits.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    dummy = np.zeros((len(y), 1))
    note = None
    if groups is not None:
        codes = pd.factorize(pd.Series(groups))[0]
        per_class = {c: len(np.unique(codes[y == c])) for c in (0, 1)}
        for n in range(min(n_splits, *per_class.values()), 1, -1):
            cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
            folds = list(cv.split(dummy, y, codes))
            if all(len(test) and len(np.unique(y[train])) == 2 for train, test in folds):
                return folds, n, None
        note = (f"cross-validation over fields, not wells: the annotated fields lie in too few wells (groups) "
                f"for 2 grouped folds ({per_class[1]} with abnormal, {per_class[0]} with normal fields), "
                f"so fields of one well can be in both training and test folds and the metrics are optimistic")
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(dummy, y)), n_splits, note


def cross_validate_artefacts(X: np.ndarray, y: np.ndarray, *, method: str = "knn", k: int = 5,
                             n_splits: int = 5, seed: int = 0, groups: Sequence | None = None) -> dict:
    """Stratified ``n_splits``-fold cross-validated metrics of the artefact model on
    embeddings ``X`` (n, d) and labels ``y`` (n,) with 1 = abnormal.

    ``groups`` (n,), e.g. the well of each field: folds keep each group whole
    (StratifiedGroupKFold), so a model is never tested on fields of a well it was trained
    on (neighbouring fields look alike: kNN would find the same well's field and the
    metrics would be optimistic). Where the groups are too few for 2 folds per class the
    folds are over fields. Returns ``{"accuracy", "f1", "f1_weighted", "roc_auc",
    "n_splits", "score", "grouped", "note"}``: ``score`` the out-of-fold probabilities of
    abnormal (n,), ``grouped`` whether the folds kept the groups whole, ``note`` why they
    could not (None otherwise; the caller reports it).
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.model_selection import cross_val_predict

    X, y = np.asarray(X, dtype=float), np.asarray(y).astype(int)
    n_splits = int(min(n_splits, np.bincount(y, minlength=2).min()))
    if n_splits < 2:
        raise ValueError("cross-validation needs at least 2 annotated fields of each class")
    folds, n_splits, note = _cv_folds(y, None if groups is None else np.asarray(groups), n_splits, seed)
    # kNN needs k neighbours in each training fold (grouped folds differ in size).
    k = int(min(k, min(len(train) for train, _ in folds)))
    score = cross_val_predict(make_artefact_model(method, k, seed), X, y, cv=folds, method="predict_proba")[:, 1]
    pred = (score >= 0.5).astype(int)
    return {"accuracy": float(accuracy_score(y, pred)), "f1": float(f1_score(y, pred, zero_division=0)),
            "f1_weighted": float(f1_score(y, pred, average="weighted", zero_division=0)),
            "roc_auc": float(roc_auc_score(y, score)), "n_splits": n_splits, "score": score,
            "grouped": groups is not None and note is None, "note": note}


def artefact_labels(values: pd.Series, *, abnormal: str = "abnormal", source: str = "annotations",
                    column: str = "Metadata_QC") -> tuple[np.ndarray, np.ndarray]:
    """Read an annotation column: ``(y, missing)``, both (n,): ``y`` 1 = abnormal, 0 =
    normal (0 where missing), ``missing`` True where the label is blank (NaN, None, "").

    Abnormal: True, 1, "true", "1", "abnormal", "artefact", "artifact" and ``abnormal``;
    normal: False, 0, "false", "0", "normal" (words stripped, any case). A column read
    from a CSV can be any of bool, int, float (0/1 with blanks) or object (True/False with
    blanks), so the values are read one by one rather than by the column's dtype.
    Anything else is a ``ValueError`` naming ``source``, ``column`` and the values: a
    label that is neither is a typo or another vocabulary, not a normal field.
    """
    abnormal_words = ABNORMAL_WORDS | {str(abnormal).strip().lower()}
    missing = missing_values(values)
    y = np.zeros(len(values), dtype=int)
    unknown: dict[str, int] = {}
    for i, v in enumerate(values.to_numpy()):
        if missing[i]:
            continue
        if isinstance(v, (bool, np.bool_)):
            y[i] = int(v)
            continue
        if isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1):
            y[i] = int(v)
            continue
        word = str(v).strip().lower()
        if word in abnormal_words:
            y[i] = 1
        elif word not in NORMAL_WORDS:
            unknown[repr(v)] = unknown.get(repr(v), 0) + 1
    if unknown:
        shown = ", ".join(f"{v} ({n}x)" for v, n in list(unknown.items())[:10])
        raise ValueError(f"{source}: column {column!r} holds label(s) that are neither abnormal "
                         f"({sorted(abnormal_words)}, True, 1) nor normal ({sorted(NORMAL_WORDS)}, False, 0): "
                         f"{shown}{' ...' if len(unknown) > 10 else ''}")
    return y, missing


def _key_strings(values: pd.Series) -> pd.Series:
    """Key column -> str, the same whichever way it was read: a plate named 1001 is
    ``"1001"`` from the store (a string) and from a CSV (int64, or float64 1001.0 when the
    column has blanks), so merging the raw columns would fail or never match. The store's
    own identifier rule (:func:`~rayscreen.store.annotations.as_identifier`); a missing key
    becomes ``"<NA>"``, which matches nothing real."""
    return as_identifier(values).astype(str).str.strip()


def _note(notes: list[str], message: str) -> None:
    """A problem with the annotations: kept in the result (qc.json) and warned now."""
    notes.append(message)
    _warnings.warn(message, stacklevel=3)


def classify_artefacts(embeddings: pd.DataFrame, annotations: pd.DataFrame, *, method: str = "knn", k: int = 5,
                       key: Sequence[str] = FIELD_KEY, label: str = "Metadata_QC", abnormal: str = "abnormal",
                       features: Sequence[str] | None = None, n_splits: int = 5,
                       seed: int = 0, source: str = "annotations") -> ArtefactClassification:
    """Train and evaluate an artefact classifier; flag every field.

    Parameters
    ----------
    embeddings : one row per field: ``key`` columns (default plate, well, field) and
        embedding features (e.g. a CNN's pooled activations).
    annotations : the annotated fields: ``key`` columns and ``label``: abnormal (True, 1,
        ``"abnormal"``, ``"artefact"``, or the word ``abnormal``) or normal (False, 0,
        ``"normal"``), see :func:`artefact_labels`. Rows with a blank label are left out
        with a warning; any other value is a ``ValueError``. Keys are compared as strings
        (a numeric plate name read from a CSV matches the store's); annotated fields not
        in ``embeddings`` are named in a warning.
    method : ``"knn"`` (k=5 as in the HCS-QC paper) or ``"linear"`` (logistic regression).
    source : what the annotations are (e.g. the CSV's path), for messages.

    Cross-validation folds keep the fields of a well together when ``embeddings`` has
    ``Metadata_Plate`` and ``Metadata_Well`` (``cv_groups`` of the result says which).
    """
    key = list(key)
    require_columns(embeddings, key, "field key")
    require_columns(annotations, key + [label], "annotation")
    cols = [c for c in feature_columns(embeddings, features) if c not in key]
    notes: list[str] = []

    y_all, missing = artefact_labels(annotations[label], abnormal=abnormal, source=source, column=label)
    if missing.any():
        _note(notes, f"{source}: {int(missing.sum())} annotated field(s) without a {label!r} label left out")
    ann = pd.DataFrame({c: _key_strings(annotations[c]) for c in key}).loc[~missing]
    ann["_y"] = y_all[~missing]
    emb = pd.DataFrame({c: _key_strings(embeddings[c]) for c in key})
    emb["_row"] = np.arange(len(embeddings))
    labelled = emb.merge(ann, on=key, how="inner", validate="1:1")
    matched = pd.MultiIndex.from_frame(ann[key]).isin(pd.MultiIndex.from_frame(emb[key]))
    if not matched.all():
        names = ["/".join(r) for r in ann.loc[~matched, key].itertuples(index=False)]
        _note(notes, f"{source}: {len(names)} annotated field(s) not found in the embeddings were ignored "
                     f"({', '.join(key)}): {names[:10]}{' ...' if len(names) > 10 else ''}")
    rows = labelled["_row"].to_numpy()
    y = labelled["_y"].to_numpy().astype(int)
    X = embeddings[cols].to_numpy(dtype=float)[rows]
    groups = None
    if all(c in embeddings.columns for c in WELL_KEY):
        wells = embeddings.iloc[rows][list(WELL_KEY)].astype(str)
        groups = (wells[WELL_KEY[0]] + "/" + wells[WELL_KEY[1]]).to_numpy()

    metrics = dict(accuracy=None, f1=None, f1_weighted=None, roc_auc=None, n_splits=0)
    cv_groups = None
    try:
        cv = cross_validate_artefacts(X, y, method=method, k=k, n_splits=n_splits, seed=seed, groups=groups)
        metrics = {m: cv[m] for m in metrics}
        cv_groups = "well" if cv["grouped"] else "field"
        if cv["note"]:
            _note(notes, cv["note"])
    except ValueError as err:
        notes.append(f"no cross-validated metrics: {err} "
                     f"(found {int(y.sum())} abnormal, {int(len(y) - y.sum())} normal)")

    predictions = embeddings[key].copy()
    model = None
    if len(np.unique(y)) == 2:
        model = make_artefact_model(method, min(k, len(y)), seed).fit(X, y)
        score = model.predict_proba(embeddings[cols].to_numpy(dtype=float))[:, 1]
    else:
        notes.append("annotations hold a single class: no classifier trained, no field flagged")
        score = np.full(len(embeddings), np.nan)
    predictions["Metadata_QC_Score"] = score
    flagged = score >= 0.5
    # an annotated field is what the person said it is: the model fitted on it may still call
    # an abnormal field among normal neighbours normal, and it would join its well's profile
    flagged[rows] = y == 1
    predictions["Metadata_QC_Abnormal"] = flagged
    return ArtefactClassification(method=method, n_annotated=len(labelled), predictions=predictions,
                                  warnings=notes, cv_groups=cv_groups, model=model, **metrics)
