"""Evaluate treatment profiles by mechanism of action (MOA): 1-NN accuracy and mAP.

The protocol of Ljosa et al. 2013, Pawlowski et al. 2016 and WS-DINO (BBBC021): each
treatment profile (a compound at one concentration) is a query; its nearest neighbour
by cosine similarity among the other treatments predicts its MOA.

- NSC ("not same compound"): treatments of the query's own compound (other doses) are
  left out of the references, so a profile cannot win by recognising its compound.
- NSCB ("not same compound or batch"): references from the query's batch are left out
  too, so batch (plate) effects cannot help either. A query whose MOA has no other
  compound in another batch has no right answer under NSCB and is left out of it (named
  in ``warnings``), as Ando et al. 2017 leave out BBBC021's MOAs that sit in one batch.
- mAP: for each query, the references of other compounds ranked by similarity; those of
  the same MOA are relevant; the average precision of that ranking, averaged over queries.
  This is copairs' ``average_precision`` with ``pos_sameby=[MOA]``, ``pos_diffby=[compound]``,
  ``neg_diffby=[MOA]`` (ties ranked positives first, as copairs does); we compute it here
  because copairs is an optional dependency, and the tests check the two agree.

Control treatments (DMSO) are neither queries nor references. A MOA with a single
compound cannot be predicted under NSC (its only same-MOA references are its own
doses), so its treatments are not queries (they stay references); the result says so
in ``warnings`` instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ._table import control_mask, feature_columns, metadata_columns, missing_values, require_columns

METRICS = ("cosine", "correlation")


@dataclass
class MOAEvaluation:
    """Result of :func:`evaluate_moa`.

    nsc, nscb, map : accuracies in [0, 1] over the queries (micro-averaged) and the mean
        average precision; ``None`` where undefined (see ``warnings``).
    per_moa : DataFrame indexed by MOA: ``n_compounds``, ``n_queries``, ``nsc``, ``nscb``, ``map``.
    confusion, confusion_nscb : DataFrames of counts, rows = true MOA, columns = predicted MOA.
    predictions : one row per query: its ``Metadata_*`` columns, ``nsc_neighbor`` (index
        label of the nearest reference), ``nsc_prediction``, ``nsc_correct``, the same for
        ``nscb_*``, and ``average_precision``.
    """

    nsc: float | None
    nscb: float | None
    map: float | None
    n_queries: int
    n_queries_nscb: int
    per_moa: pd.DataFrame
    confusion: pd.DataFrame
    confusion_nscb: pd.DataFrame
    predictions: pd.DataFrame
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able summary (no predictions table)."""
        def clean(v):
            return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else v

        # astype(object): iterrows on mixed int/float columns would turn the counts into floats
        per_moa = {str(m): {k: clean(float(v)) if isinstance(v, (float, np.floating)) else int(v)
                            for k, v in row.items()} for m, row in self.per_moa.astype(object).iterrows()}
        return {"nsc": clean(self.nsc), "nscb": clean(self.nscb), "map": clean(self.map),
                "n_queries": self.n_queries, "n_queries_nscb": self.n_queries_nscb, "per_moa": per_moa,
                "confusion": {str(k): {str(c): int(n) for c, n in row.items()}
                              for k, row in self.confusion.iterrows()},
                "warnings": list(self.warnings)}


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of ranking items by ``scores`` (descending), ``relevant`` the
    (n,) bools marking the positives: the mean over positives of the precision at their
    rank. Ties put positives first (as copairs). NaN when there is no positive."""
    scores, relevant = np.asarray(scores, dtype=float), np.asarray(relevant, dtype=bool)
    if not relevant.any():
        return float("nan")
    order = np.lexsort((~relevant, -scores))  # last key is primary: score, then positives first
    rel = relevant[order]
    ranks = np.flatnonzero(rel) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def _unit_rows(X: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit norm, (n,) mask of the rows of norm 0, which cannot be scaled)."""
    if metric == "correlation":
        X = X - X.mean(axis=1, keepdims=True)  # Pearson = cosine of centred profiles
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms == 0, 1.0, norms), norms[:, 0] == 0


def evaluate_moa(profiles: pd.DataFrame, *, moa: str = "Metadata_MOA", compound: str = "Metadata_Compound",
                 batch: str | None = "Metadata_Batch", controls=None,
                 features: Sequence[str] | None = None, metric: str = "cosine",
                 with_map: bool = True, block_size: int = 1024) -> MOAEvaluation:
    """NSC / NSCB 1-NN accuracy, per-MOA accuracy, confusion matrices and mAP.

    Parameters
    ----------
    profiles : DataFrame, one row per treatment (compound, concentration), with ``moa``
        and ``compound`` columns, ``batch`` for NSCB (often ``Metadata_Plate`` or
        ``Metadata_Batch``), and feature columns.
    controls : control rows to leave out: ``None`` = rows marked in ``Metadata_Control``
        (bool, "negative" or "positive"; none if the column is absent), a query, or a mask.
    metric : ``"cosine"`` or ``"correlation"`` (Pearson) similarity.

    A missing ``moa``/``compound`` column is a ``ValueError`` naming it. A missing
    ``batch`` column, fewer than two MOAs, single-compound MOAs and rows with non-finite
    features are reported in ``warnings``.
    """
    require_columns(profiles, [moa, compound], "MOA evaluation")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    cols = feature_columns(profiles, features)
    notes: list[str] = []

    keep = ~control_mask(profiles, controls, kind="any", required=False)
    for column in (moa, compound):  # blank annotations are missing, not one class named ""
        missing = keep & missing_values(profiles[column])
        if missing.any():
            notes.append(f"{int(missing.sum())} non-control row(s) without a {column} were left out")
        keep &= ~missing
    finite = np.isfinite(profiles[cols].to_numpy(dtype=float)).all(axis=1)
    if (keep & ~finite).any():
        notes.append(f"{int((keep & ~finite).sum())} row(s) with non-finite features were left out")
    keep &= finite
    X, zero = _unit_rows(profiles.loc[keep, cols].to_numpy(dtype=float), metric)
    if zero.any():
        # similarity 0 to everything: every reference ties, so the "nearest" one is the first in
        # table order and the ranking puts the positives first (AP 1): neither means anything
        what = "constant" if metric == "correlation" else "0"
        notes.append(f"{int(zero.sum())} profile(s) of zero norm (every feature {what}) were left out")
        rows = np.flatnonzero(keep)
        keep[rows[zero]] = False
        X = X[~zero]
    table = profiles.loc[keep]
    moas = table[moa].astype(str).to_numpy()
    compounds = table[compound].astype(str).to_numpy()
    has_batch = batch is not None and batch in table.columns
    if batch is not None and not has_batch:
        notes.append(f"no batch column {batch!r}: NSCB not computed")
    batches = pd.factorize(table[batch], use_na_sentinel=False)[0] if has_batch else None

    n_compounds = pd.Series(compounds).groupby(moas).nunique()
    single = sorted(n_compounds.index[n_compounds < 2])
    if single:
        notes.append(f"MOA(s) with a single compound, not scored as queries (NSC undefined): {single}")
    labels = sorted(n_compounds.index)
    queries = np.flatnonzero(np.isin(moas, n_compounds.index[n_compounds >= 2]))
    if len(n_compounds) < 2:
        notes.append(f"fewer than two MOAs ({labels}): MOA accuracy is undefined")
        queries = queries[:0]

    nsc_nn = np.full(len(queries), -1)
    nscb_nn = np.full(len(queries), -1)
    # NSCB has no right answer for a query whose MOA has no other compound in another batch
    # (BBBC021's kinase inhibitors and cholesterol-lowering compounds sit in one batch each):
    # such queries are left out of NSCB, as Ando et al. 2017 do, rather than counted wrong
    nscb_unanswerable = np.zeros(len(queries), bool)
    ap = np.full(len(queries), np.nan)
    for start in range(0, len(queries), block_size):
        q = queries[start:start + block_size]
        sims = X[q] @ X.T  # (block, n_refs)
        other_compound = compounds[q][:, None] != compounds[None, :]
        same_moa = moas[q][:, None] == moas[None, :]
        nsc_nn[start:start + len(q)] = _argmax_where(sims, other_compound)
        if has_batch:
            other_batch = batches[q][:, None] != batches[None, :]
            allowed = other_compound & other_batch
            answerable = (allowed & same_moa).any(axis=1)
            nscb_nn[start:start + len(q)] = np.where(answerable, _argmax_where(sims, allowed), -1)
            nscb_unanswerable[start:start + len(q)] = allowed.any(axis=1) & ~answerable
        if with_map:
            for i in range(len(q)):
                refs = other_compound[i]
                ap[start + i] = average_precision(sims[i, refs], same_moa[i, refs])

    pred = table.iloc[queries][metadata_columns(table) or [moa, compound]].copy()
    index = table.index.to_numpy()
    true = moas[queries]
    _add_predictions(pred, "nsc", nsc_nn, index, moas, true)
    if has_batch:
        _add_predictions(pred, "nscb", nscb_nn, index, moas, true)
        if nscb_unanswerable.any():
            notes.append(f"{int(nscb_unanswerable.sum())} query(ies) of MOA(s) "
                         f"{sorted(set(true[nscb_unanswerable]))} have no compound of their MOA in another "
                         f"batch; left out of NSCB (no right answer)")
        no_reference = (nscb_nn < 0) & ~nscb_unanswerable
        if len(queries) and no_reference.any():
            notes.append(f"{int(no_reference.sum())} query(ies) have no reference of another compound "
                         f"and batch; left out of NSCB")
    pred["average_precision"] = ap

    def score(column):
        values = pred[column].dropna() if column in pred else pd.Series(dtype=float)
        return (float(values.astype(float).mean()) if len(values) else None), int(len(values))

    nsc, n_q = score("nsc_correct")
    nscb, n_qb = score("nscb_correct")
    mean_ap = float(np.nanmean(ap)) if with_map and np.isfinite(ap).any() else None

    per = pd.DataFrame(index=pd.Index(labels, name=moa))
    per["n_compounds"] = n_compounds.reindex(labels).astype(int)
    by_moa = pred.assign(_moa=true).groupby("_moa")
    per["n_queries"] = by_moa.size().reindex(labels).fillna(0).astype(int)
    for name, column in (("nsc", "nsc_correct"), ("nscb", "nscb_correct"), ("map", "average_precision")):
        per[name] = by_moa[column].apply(lambda s: s.dropna().astype(float).mean()).reindex(labels) \
            if column in pred else np.nan

    return MOAEvaluation(
        nsc=nsc, nscb=nscb if has_batch else None, map=mean_ap, n_queries=n_q, n_queries_nscb=n_qb,
        per_moa=per, confusion=_confusion(pred, "nsc", true, labels),
        confusion_nscb=_confusion(pred, "nscb", true, labels), predictions=pred, warnings=notes)


def _argmax_where(sims: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per row, the column of the largest similarity among ``allowed``; -1 if none."""
    masked = np.where(allowed, sims, -np.inf)
    best = masked.argmax(axis=1)  # first of ties: deterministic
    return np.where(allowed.any(axis=1), best, -1)


def _add_predictions(pred, prefix, nn, index, moas, true):
    found = nn >= 0
    pred[f"{prefix}_neighbor"] = pd.Series(np.where(found, index[np.maximum(nn, 0)], None),
                                           index=pred.index, dtype=object)
    predicted = np.where(found, moas[np.maximum(nn, 0)], None)
    pred[f"{prefix}_prediction"] = pd.Series(predicted, index=pred.index, dtype=object)
    pred[f"{prefix}_correct"] = pd.Series(np.where(found, predicted == true, None), index=pred.index, dtype=object)


def _confusion(pred, prefix, true, labels) -> pd.DataFrame:
    column = f"{prefix}_prediction"
    if column not in pred or not len(pred):
        return pd.DataFrame(0, index=pd.Index(labels, name="true"), columns=pd.Index(labels, name="predicted"))
    found = pred[column].notna().to_numpy()
    table = pd.crosstab(pd.Series(true[found], name="true"),
                        pd.Series(pred[column].to_numpy()[found], name="predicted"))
    return table.reindex(index=labels, columns=labels, fill_value=0).astype(int) \
        .rename_axis(index="true", columns="predicted")


def nsc_accuracy(profiles: pd.DataFrame, **kwargs) -> float | None:
    """1-NN MOA accuracy, not same compound. Keywords as :func:`evaluate_moa`."""
    return evaluate_moa(profiles, with_map=False, **kwargs).nsc


def nscb_accuracy(profiles: pd.DataFrame, batch: str = "Metadata_Batch", **kwargs) -> float | None:
    """1-NN MOA accuracy, not same compound and not same batch. ``batch`` must exist."""
    require_columns(profiles, [batch], "batch")
    return evaluate_moa(profiles, batch=batch, with_map=False, **kwargs).nscb


def mean_average_precision(profiles: pd.DataFrame, **kwargs) -> float | None:
    """Mean over queries of the average precision of MOA retrieval (other compounds only)."""
    return evaluate_moa(profiles, with_map=True, **kwargs).map
