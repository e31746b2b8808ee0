"""Call hits: per-plate z-scores of well scores, profile distance to controls, Z'-factor.

Plates differ (staining, focus, cell density), so every statistic is taken per plate
against that plate's own reference wells: the negative controls when the table marks
them, all wells otherwise (most wells of a screen are inactive).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ._table import CONTROL_COLUMN, PLATE_COLUMN, control_mask, feature_columns, metadata_columns, require_columns
from .normalize import MAD_SCALE


def _reference_mask(table: pd.DataFrame, controls) -> np.ndarray:
    # "Against negative controls when given, else all wells": by default the negatives of
    # Metadata_Control if the table has that column, all wells if not.
    if controls is None and CONTROL_COLUMN not in table.columns:
        controls = "all"
    return control_mask(table, controls, kind="negative")


def _plates(table: pd.DataFrame, by_plate: bool, plate_column: str) -> dict:
    if not by_plate:
        return {None: np.ones(len(table), dtype=bool)}
    require_columns(table, [plate_column], "plate")
    codes, uniques = pd.factorize(table[plate_column], use_na_sentinel=False)
    return {p: codes == i for i, p in enumerate(uniques)}


def _center_spread(values: np.ndarray, robust: bool) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if robust:
        center = np.median(values)
        return float(center), float(MAD_SCALE * np.median(np.abs(values - center)))
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def zscore(table: pd.DataFrame, score: str, *, controls=None, robust: bool = False, by_plate: bool = True,
           plate_column: str = PLATE_COLUMN) -> pd.Series:
    """Per-plate z-score of column ``score``: ``(x - center) / spread`` of the plate's
    reference wells: mean and standard deviation (ddof=1), or with ``robust`` median and
    1.4826 * MAD. ``controls``: ``None`` (negatives of ``Metadata_Control`` if present,
    else all wells), ``"all"``, a query or a mask. A zero spread gives NaN, not inf.

    Returns a float Series aligned with ``table``. A plate whose three or more reference
    values do not spread (a discrete score whose controls mostly agree) is named in a warning:
    none of its wells can be a hit. (With fewer, callers say so themselves.)
    """
    require_columns(table, [score], "score")
    values = table[score].to_numpy(dtype=float)
    reference = _reference_mask(table, controls)
    z = np.full(len(table), np.nan)
    flat = []
    for plate, rows in _plates(table, by_plate, plate_column).items():
        ref = values[rows & reference]
        if not np.isfinite(ref).any():
            raise ValueError(f"no reference wells with a {score!r} value in plate {plate!r}")
        center, spread = _center_spread(ref, robust)
        z[rows] = (values[rows] - center) / spread if spread > 0 else np.nan
        if not spread > 0 and np.isfinite(ref).sum() >= 3:
            flat.append(plate)
    if flat:
        warnings.warn(f"{score}: the reference wells of plate(s) {flat[:10]}{' ...' if len(flat) > 10 else ''} "
                      f"do not spread ({'MAD' if robust else 'standard deviation'} 0): their wells get no "
                      "z-score and cannot be hits", stacklevel=2)
    return pd.Series(z, index=table.index, name=f"{score}_z")


def distance_to_controls(profiles: pd.DataFrame, *, controls=None, metric: str = "cosine", robust: bool = False,
                         by_plate: bool = True, plate_column: str = PLATE_COLUMN,
                         features: Sequence[str] | None = None, normalize: str | None = None) -> pd.DataFrame:
    """Distance of each well's profile to its plate's mean control profile, and its z-score.

    ``metric``: ``"cosine"`` (1 - cosine similarity) or ``"euclidean"``. The z-score is
    taken against the control wells' own distances (how far a control strays from the
    control mean), so ``distance_z`` reads "how many control spreads away". A control's own
    distance is to the mean of the *other* controls of its plate (leave one out): a control
    is part of the full mean, which pulls it in, so against it the controls would look
    closer than any new well and every well's z-score would be inflated (by ~3 with 8
    controls and 100 features). A plate with fewer than three controls gets NaN z-scores:
    one control has no others, and two controls' distances (each to the other) are equal,
    so their spread is 0.

    ``normalize`` (``"standardize"``, ``"robust_mad"``; None: ``profiles`` are used as they
    are): ``profiles`` are not normalised yet, and each plate is normalised here against its
    controls, as the aggregate stage does, but each control by a normaliser fitted on the
    *other* controls (leave one out). A normaliser fitted on the controls makes them look
    closer to their centre than any new well for the same reason as the mean does (measured
    on wells drawn like the controls, 100 features, 8 controls per plate: 29-38% called hits
    at z >= 3 after standardising against all controls, 0.2-0.7% with this), so the controls' spread, the null of
    the z-score, must come from fits that did not see them. Missing values after normalising
    are the control level, 0 (as the stage's tables). Whitening is not offered: refitting a
    sphering per control costs an eigendecomposition each, and one fitted on a plate's
    controls inflates every well's distance (a hit call on whitened tables called nearly
    every null well a hit).

    Returns ``profiles``' ``Metadata_*`` columns (and ``plate_column``) plus ``distance``
    and ``distance_z``.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    cols = feature_columns(profiles, features)
    X = profiles[cols].to_numpy(dtype=float)
    X = np.where(np.isinf(X), np.nan, X)  # a feature that overflowed: missing, as the aggregate stage takes it
    reference = _reference_mask(profiles, controls)
    distance = np.full(len(profiles), np.nan)
    for plate, rows in _plates(profiles, by_plate, plate_column).items():
        ref = rows & reference
        if not ref.any():
            raise ValueError(f"no control wells in plate {plate!r}")
        if normalize is not None:
            distance[rows], distance[ref] = _refitted_distances(X[rows], X[ref], normalize, metric)
            continue
        R = X[ref]
        known = np.isfinite(R)
        total, count = np.where(known, R, 0.0).sum(axis=0), known.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            center = total / count  # nanmean, without its all-NaN warning
            others = (total - np.where(known, R, 0.0)) / (count - known)  # (n_controls, F)
        distance[rows] = _distance(X[rows], center[None, :], metric)
        if len(R) > 1:  # one control has no others: its distance stays 0 and the plate's spread 0 (z NaN)
            distance[ref] = _distance(R, others, metric)
    keep = metadata_columns(profiles)
    if by_plate and plate_column not in keep:
        keep.append(plate_column)
    out = profiles[keep].copy()
    out["distance"] = distance
    out["distance_z"] = zscore(out, "distance", controls=reference, robust=robust, by_plate=by_plate,
                               plate_column=plate_column).to_numpy()
    return out


def _refitted_distances(X: np.ndarray, R: np.ndarray, method: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """One plate: distances of its wells X (n, F) to the centre of its controls R (c, F)
    after normalising with a ``method`` normaliser fitted on R, and of each control to the
    centre of the others after normalising with one fitted on the others. Returns ((n,), (c,));
    with fewer than two controls the controls' distances are 0 (their spread, and z, undefined)."""
    from .normalize import create_normalizer

    def normalised(fit_rows: np.ndarray, *rows: np.ndarray) -> list[np.ndarray]:
        norm = create_normalizer(method).fit(fit_rows)
        return [np.nan_to_num(norm.transform(r), nan=0.0, posinf=np.nan, neginf=np.nan) for r in (fit_rows, *rows)]

    def centre(values: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN feature: NaN, left out by _distance
            return np.nanmean(values, axis=0)[None, :]

    fitted, wells = normalised(R, X)
    at_wells = _distance(wells, centre(fitted), metric)
    at_controls = np.zeros(len(R))
    if len(R) > 1:
        with warnings.catch_warnings():
            # the features of zero spread were named when the plate was normalised for the tables
            warnings.simplefilter("ignore", UserWarning)
            for j in range(len(R)):
                others, held_out = normalised(np.delete(R, j, axis=0), R[j:j + 1])
                at_controls[j] = _distance(held_out, centre(others), metric)[0]
    return at_wells, at_controls


def _distance(X: np.ndarray, centers: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise distance of X (n, F) to centers (n, F) or (1, F): euclidean or 1 - cosine,
    over the features finite in both (n,). A well missing a few features keeps a distance
    (euclidean scaled by sqrt(F / n_finite), as if the missing ones differed like the rest)
    instead of NaN, which would drop it from hit calling; with no finite feature it is NaN."""
    X, centers = np.broadcast_arrays(np.asarray(X, dtype=float), np.asarray(centers, dtype=float))
    known = np.isfinite(X) & np.isfinite(centers)
    n_known = known.sum(axis=1)
    X, centers = np.where(known, X, 0.0), np.where(known, centers, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "euclidean":
            d = np.sqrt(((X - centers) ** 2).sum(axis=1) * X.shape[1] / n_known)
        else:
            norms = np.linalg.norm(X, axis=1) * np.linalg.norm(centers, axis=1)
            d = 1.0 - (X * centers).sum(axis=1) / np.where(norms > 0, norms, np.nan)
    return np.where(n_known > 0, d, np.nan)


def z_prime(table: pd.DataFrame, score: str, *, positive=None, negative=None, by_plate: bool = True,
            plate_column: str = PLATE_COLUMN) -> pd.DataFrame:
    """Z'-factor of ``score`` per plate: ``1 - 3 (sd_p + sd_n) / |mean_p - mean_n|``
    (Zhang et al. 1999; standard deviations with ddof=1).

    ``positive``/``negative`` select the control wells (query, mask, or ``None`` for
    ``Metadata_Control`` == "positive" / negative). A plate without two wells of each
    kind gets NaN. Returns one row per plate: ``n_pos``, ``n_neg``, ``mean_pos``,
    ``mean_neg``, ``sd_pos``, ``sd_neg``, ``z_prime``.
    """
    require_columns(table, [score], "score")
    values = table[score].to_numpy(dtype=float)
    pos = control_mask(table, positive, kind="positive")
    neg = control_mask(table, negative, kind="negative")
    rows_out = []
    for plate, rows in _plates(table, by_plate, plate_column).items():
        p, n = values[rows & pos], values[rows & neg]
        p, n = p[np.isfinite(p)], n[np.isfinite(n)]
        row = {"n_pos": len(p), "n_neg": len(n),
               "mean_pos": p.mean() if len(p) else np.nan, "mean_neg": n.mean() if len(n) else np.nan,
               "sd_pos": p.std(ddof=1) if len(p) > 1 else np.nan, "sd_neg": n.std(ddof=1) if len(n) > 1 else np.nan}
        gap = abs(row["mean_pos"] - row["mean_neg"])
        row["z_prime"] = 1 - 3 * (row["sd_pos"] + row["sd_neg"]) / gap if gap > 0 else np.nan
        rows_out.append({plate_column: plate, **row} if by_plate else row)
    return pd.DataFrame(rows_out)


def call_hits(table: pd.DataFrame, score: str, *, threshold: float = 3.0, direction: str = "both",
              controls=None, robust: bool = False, by_plate: bool = True,
              plate_column: str = PLATE_COLUMN) -> pd.DataFrame:
    """Wells whose per-plate z-score of ``score`` passes ``threshold``.

    ``direction``: ``"both"`` (|z| >= threshold), ``"up"`` (z >= threshold) or ``"down"``
    (z <= -threshold). Control wells (any kind in ``Metadata_Control``, and the rows
    ``controls`` selects) are never hits.
    Returns the hit rows: ``Metadata_*`` columns, ``score``, ``{score}_z``, sorted by |z|
    descending.
    """
    if direction not in ("both", "up", "down"):
        raise ValueError(f"direction must be 'both', 'up' or 'down', got {direction!r}")
    z = zscore(table, score, controls=controls, robust=robust, by_plate=by_plate, plate_column=plate_column)
    out = table[metadata_columns(table) + [score]].copy()
    out[z.name] = z.to_numpy()
    zv = z.to_numpy()
    hit = {"both": np.abs(zv) >= threshold, "up": zv >= threshold, "down": zv <= -threshold}[direction]
    hit &= ~control_mask(table, kind="any", required=False)
    if controls is not None and not (isinstance(controls, str) and controls == "all"):
        hit &= ~control_mask(table, controls)
    out = out.loc[hit]
    return out.iloc[np.argsort(-np.abs(out[z.name].to_numpy()), kind="stable")]
