"""Normalise profiles against control wells, per plate.

Normalisers are fit/transform objects (as in pycytominer and scikit-learn) fitted on the
control rows of one plate and applied to all its rows:

- :class:`Standardize`: ``(x - mean) / std`` of the controls,
- :class:`RobustMAD`: ``(x - median) / (1.4826 * MAD)`` of the controls,
- :class:`Whiten`: ZCA (or PCA) sphering fitted on the controls, its covariance shrunk
  towards a scaled identity (Ledoit-Wolf by default) and regularised by ``epsilon``.

Their fitted state is a few plain lists of numbers (``to_dict``/``from_dict``), so a
normaliser travels in checkpoints and results stores as JSON.

We hand-write the three transforms instead of wrapping scikit-learn's ``StandardScaler``
or pycytominer's ``RobustMAD``/``Spherize`` because (1) their fitted state lives in
private or pandas attributes that are not JSON-able, (2) pycytominer is an optional (test)
dependency of rayscreen, and (3) ``Spherize`` rejects rank-deficient control sets, the
common case with a handful of control wells and hundreds of CNN features, where ridge-
regularised ZCA is well defined. The tests check our outputs against pycytominer's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from scipy.stats import median_abs_deviation

from ..store.errors import preview
from ._table import PLATE_COLUMN, control_mask, feature_columns, require_columns

MAD_SCALE = 1.4826  # MAD of a normal distribution is 0.6745 sigma: 1 / 0.6745 = 1.4826


def _to_list(values: np.ndarray) -> list:
    # JSON has no NaN: a feature with no finite control value is stored as None.
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=float).ravel()]


def _from_list(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


class Normalizer:
    """Base class: ``fit(X)`` on control profiles, ``transform(X)`` any profiles.

    ``X`` is an array (n_rows, n_features), a DataFrame of feature columns (names are
    remembered and checked), or an ``xarray.DataArray`` with the feature dimension last
    (numpy- or dask-backed; dask stays lazy). ``transform`` returns the same kind.
    """

    method: str = ""

    def __init__(self):
        self.features: list[str] | None = None

    # -- subclasses implement these two on float arrays (n_rows, n_features)
    def _fit_array(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _warn_unscaled(self, flat: np.ndarray, what: str, note: str = "") -> None:
        """Warn naming the features (``flat``: (F,) bool) that are only centred, their spread
        in the controls being 0. A random-weight backbone has dozens of such features: the
        first few tell the user enough."""
        zero = np.flatnonzero(flat)
        if len(zero):
            names = [self.features[i] for i in zero] if self.features else zero.tolist()
            warnings.warn(f"{len(zero)} feature(s) have {what} in the controls{note} and are only centred: "
                          f"{preview(names)}", stacklevel=4)

    def _transform_array(self, X):
        raise NotImplementedError

    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def fit(self, X, y=None) -> Normalizer:
        """Fit on control profiles ``X`` (n_controls, n_features)."""
        if isinstance(X, pd.DataFrame):
            self.features = [str(c) for c in X.columns]
        elif isinstance(X, xr.DataArray) and X.ndim == 2 and X.dims[-1] in X.coords:
            self.features = [str(c) for c in X[X.dims[-1]].to_numpy()]
        else:
            self.features = None
        values = np.asarray(X, dtype=float)
        if values.ndim != 2:
            raise ValueError(f"expected profiles shaped (n_rows, n_features), got shape {values.shape}")
        if len(values) == 0:
            raise ValueError("cannot fit a normaliser on zero control rows")
        self._fit_array(values)
        return self

    def transform(self, X):
        """Normalise ``X`` (n_rows, n_features) with the fitted parameters."""
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")
        if isinstance(X, pd.DataFrame):
            if self.features is not None and [str(c) for c in X.columns] != self.features:
                raise ValueError(f"feature columns differ from those fitted: expected {self.features[:5]}..., "
                                 f"got {list(X.columns)[:5]}...")
            out = self._transform_array(X.to_numpy(dtype=float))
            return pd.DataFrame(out, index=X.index, columns=self._output_names(list(X.columns)))
        if isinstance(X, xr.DataArray):
            # Arithmetic and @ keep dask arrays lazy.
            out = self._transform_array(X.data.astype(float))
            names = self._output_names(None)
            result = X.copy(data=out)
            if names is not None:
                result = result.assign_coords({X.dims[-1]: names})
            return result
        return self._transform_array(np.asarray(X, dtype=float))

    def fit_transform(self, X, y=None):
        return self.fit(X).transform(X)

    def _output_names(self, columns):
        return columns

    def to_dict(self) -> dict:
        """Plain JSON-able parameters; ``Normalizer.from_dict`` rebuilds the object."""
        raise NotImplementedError

    @staticmethod
    def from_dict(d: dict) -> Normalizer:
        """Rebuild any normaliser from ``to_dict()`` output (dispatches on ``d["method"]``)."""
        cls = NORMALIZERS.get(d.get("method"))
        if cls is None:
            raise ValueError(f"unknown normaliser method {d.get('method')!r}; expected one of {sorted(NORMALIZERS)}")
        return cls._from_dict(d)

    def __repr__(self):
        state = "fitted" if self.fitted else "not fitted"
        return f"{type(self).__name__}({state})"


class Standardize(Normalizer):
    """``(x - mean) / std`` with mean and std (ddof=0) of the controls, as scikit-learn's
    ``StandardScaler`` and pycytominer's ``standardize``. A feature that does not vary in
    the controls is only centred (scale 1), as in scikit-learn."""

    method = "standardize"

    def __init__(self):
        super().__init__()
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    @property
    def fitted(self):
        return self.mean_ is not None

    def _fit_array(self, X):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features give NaN, by design
            self.mean_ = np.nanmean(X, axis=0)
            std = np.nanstd(X, axis=0)
        # one control row (or constant controls) leaves these features in raw units beside
        # other plates' standard deviations
        self._warn_unscaled(std == 0, "standard deviation 0", " (one control row)" if len(X) == 1 else "")
        self.scale_ = np.where(std > 0, std, 1.0)

    def _transform_array(self, X):
        return (X - self.mean_) / self.scale_

    def to_dict(self):
        return {"method": self.method, "features": self.features,
                "mean": _to_list(self.mean_), "scale": _to_list(self.scale_)}

    @classmethod
    def _from_dict(cls, d):
        obj = cls()
        obj.features, obj.mean_, obj.scale_ = d.get("features"), _from_list(d["mean"]), _from_list(d["scale"])
        return obj


class RobustMAD(Normalizer):
    """``(x - median) / (1.4826 * MAD + epsilon)`` of the controls (pycytominer's
    ``mad_robustize``). 1.4826 makes the MAD of normal data equal its standard deviation.
    A feature whose MAD is 0 in the controls would be blown up by ``1 / epsilon``; it is
    only centred (scale 1) and named in a warning."""

    method = "robust_mad"

    def __init__(self, epsilon: float = 1e-18):
        super().__init__()
        self.epsilon = float(epsilon)
        self.median_: np.ndarray | None = None
        self.mad_: np.ndarray | None = None

    @property
    def fitted(self):
        return self.median_ is not None

    def _fit_array(self, X):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.median_ = np.nanmedian(X, axis=0)
            mad = median_abs_deviation(X, axis=0, nan_policy="omit", scale=1 / MAD_SCALE)
        mad = np.asarray(mad, dtype=float)
        self._warn_unscaled(mad == 0, "MAD 0")
        self.mad_ = np.where(mad == 0, 1.0, mad)

    def _transform_array(self, X):
        return (X - self.median_) / (self.mad_ + self.epsilon)

    def to_dict(self):
        return {"method": self.method, "features": self.features, "epsilon": self.epsilon,
                "median": _to_list(self.median_), "mad": _to_list(self.mad_)}

    @classmethod
    def _from_dict(cls, d):
        obj = cls(epsilon=d.get("epsilon", 1e-18))
        obj.features, obj.median_, obj.mad_ = d.get("features"), _from_list(d["median"]), _from_list(d["mad"])
        return obj


SHRINKAGE = ("none", "ledoit_wolf", "oas")


class Whiten(Normalizer):
    """Sphering fitted on the controls: ``(x - mean) @ W.T`` with, from the controls'
    covariance ``C = E diag(lam) E^T``,

    - ZCA: ``W = E diag(1 / sqrt(lam + epsilon)) E^T`` (stays in feature space, keeps names),
    - PCA: ``W = diag(1 / sqrt(lam + epsilon)) E^T`` (principal axes, named PC1, PC2, ...).

    ``shrinkage`` estimates ``C``: ``"none"`` is the sample covariance (ddof=1; pycytominer's
    ``Spherize``); ``"ledoit_wolf"`` (default) and ``"oas"`` shrink it towards
    ``mean(lam) * I`` by the amount scikit-learn's ``LedoitWolf`` / ``OAS`` estimate from the
    data; a number ``s`` in [0, 1] shrinks by ``s``. Why shrink: a plate has a dozen control
    wells and a profile 50-500 features, so the sample covariance is singular, its small
    eigenvalues are noise, and sphering by them multiplies that noise by up to
    ``1 / sqrt(epsilon)`` (on the synthetic MOA screens it sank NSCB; docs/results.md).
    ``epsilon`` is a further ridge on the eigenvalues (variance units), which keeps the
    unshrunk transform finite. Control rows must be free of NaN.
    """

    method = "whiten"

    def __init__(self, epsilon: float = 1e-6, kind: str = "ZCA", shrinkage: str | float = "ledoit_wolf"):
        super().__init__()
        if kind not in ("ZCA", "PCA"):
            raise ValueError(f"kind must be 'ZCA' or 'PCA', got {kind!r}")
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if not (shrinkage in SHRINKAGE if isinstance(shrinkage, str) else 0 <= shrinkage <= 1):
            raise ValueError(f"shrinkage must be one of {list(SHRINKAGE)} or a number in [0, 1], got {shrinkage!r}")
        self.epsilon, self.kind = float(epsilon), kind
        self.shrinkage = shrinkage if isinstance(shrinkage, str) else float(shrinkage)
        self.shrinkage_: float | None = None  # the amount used (estimated or given)
        self.mean_: np.ndarray | None = None
        self.W_: np.ndarray | None = None

    @property
    def fitted(self):
        return self.W_ is not None

    def _fit_array(self, X):
        bad = np.flatnonzero(~np.isfinite(X).all(axis=0))
        if len(bad):
            names = [self.features[i] for i in bad] if self.features else bad.tolist()
            raise ValueError(f"Whiten needs finite control profiles; feature(s) {preview(names)} hold NaN or inf in the "
                             "controls: drop or impute them first")
        if len(X) < 2:
            raise ValueError("Whiten needs at least 2 control rows to estimate a covariance")
        self.mean_ = X.mean(axis=0)
        cov = np.cov(X - self.mean_, rowvar=False, ddof=1).reshape(X.shape[1], X.shape[1])
        if self.shrinkage in ("ledoit_wolf", "oas"):
            from sklearn.covariance import OAS, LedoitWolf

            estimator = (LedoitWolf if self.shrinkage == "ledoit_wolf" else OAS)().fit(X)
            self.shrinkage_ = float(estimator.shrinkage_)
        else:
            self.shrinkage_ = 0.0 if self.shrinkage == "none" else float(self.shrinkage)
        # (1 - s) C + s mean(lam) I, on the ddof=1 covariance (scikit-learn shrinks the
        # ddof=0 one; the amount is what we take from it)
        cov = (1 - self.shrinkage_) * cov + self.shrinkage_ * np.trace(cov) / len(cov) * np.eye(len(cov))
        lam, E = np.linalg.eigh(cov)
        lam = np.clip(lam, 0.0, None)  # round-off can make null directions slightly negative
        if self.epsilon == 0 and (lam <= 0).any():
            raise ValueError("the control covariance is singular; use epsilon > 0")
        inv_sqrt = 1.0 / np.sqrt(lam + self.epsilon)
        W = inv_sqrt[:, None] * E.T
        if self.kind == "ZCA":
            W = E @ W
        else:
            W = W[::-1]  # eigh sorts ascending; PC1 is the largest-variance axis
        self.W_ = W

    def _transform_array(self, X):
        return (X - self.mean_) @ self.W_.T

    def _output_names(self, columns):
        if self.kind == "PCA":
            return [f"PC{i + 1}" for i in range(self.W_.shape[0])]
        return columns

    def to_dict(self):
        return {"method": self.method, "features": self.features, "kind": self.kind, "epsilon": self.epsilon,
                "shrinkage": self.shrinkage, "shrinkage_": self.shrinkage_,
                "mean": _to_list(self.mean_), "W": [_to_list(row) for row in self.W_]}

    @classmethod
    def _from_dict(cls, d):
        # stores written before shrinkage existed used the sample covariance
        obj = cls(epsilon=d.get("epsilon", 1e-6), kind=d.get("kind", "ZCA"), shrinkage=d.get("shrinkage", "none"))
        obj.shrinkage_ = d.get("shrinkage_")
        obj.features, obj.mean_ = d.get("features"), _from_list(d["mean"])
        obj.W_ = np.array([_from_list(row) for row in d["W"]], dtype=float)
        return obj


NORMALIZERS: dict[str, type[Normalizer]] = {
    "standardize": Standardize,
    "robust_mad": RobustMAD,
    "mad_robustize": RobustMAD,  # pycytominer's name
    "whiten": Whiten,
    "spherize": Whiten,  # pycytominer's name
}


def create_normalizer(method: str, **kwargs) -> Normalizer:
    """A new, unfitted normaliser by name (``standardize``, ``robust_mad``, ``whiten``;
    pycytominer's ``mad_robustize`` and ``spherize`` are accepted too)."""
    cls = NORMALIZERS.get(method)
    if cls is None:
        raise ValueError(f"unknown normalisation method {method!r}; expected one of {sorted(NORMALIZERS)}")
    return cls(**kwargs)


def normalize(profiles: pd.DataFrame, method: str = "standardize", *, controls=None,
              by_plate: bool = True, plate_column: str = PLATE_COLUMN,
              features: Sequence[str] | None = None, return_normalizers: bool = False, **kwargs):
    """Normalise a profile table against its control rows, plate by plate.

    Parameters
    ----------
    profiles : DataFrame with ``Metadata_*`` columns and feature columns (one row per well,
        field or treatment).
    method : ``"standardize"``, ``"robust_mad"`` or ``"whiten"`` (kwargs go to the class).
    controls : which rows to fit on: ``None`` (negative controls of ``Metadata_Control``),
        ``"all"``, a pandas query string, or a boolean mask (n_rows,).
    by_plate : fit one normaliser per value of ``plate_column`` (removes plate effects);
        else one for the whole table.

    Returns
    -------
    The table with features replaced by normalised values (same rows, same order; with
    ``kind="PCA"`` whitening the feature columns become PC1..PCk). With
    ``return_normalizers``, also ``{plate: fitted normaliser}`` (key ``None`` if not by plate).
    """
    cols = feature_columns(profiles, features)
    mask = control_mask(profiles, controls)
    if by_plate:
        require_columns(profiles, [plate_column], "plate")
        codes, uniques = pd.factorize(profiles[plate_column], use_na_sentinel=False)
        if len(uniques) > 1 and str(kwargs.get("kind", "ZCA")).upper() == "PCA" and method in ("whiten", "spherize"):
            # each plate would get its own principal axes (and signs) under the same names PC1..
            raise ValueError("whiten with kind='PCA' per plate gives each plate its own axes under the same "
                             "names PC1, PC2, ...: profiles of different plates would not be comparable; use "
                             "kind='ZCA' (stays in feature space), or by_plate=False")
        groups = {p: codes == i for i, p in enumerate(uniques)}
    else:
        groups = {None: np.ones(len(profiles), dtype=bool)}

    meta = profiles.drop(columns=cols)
    parts, fitted = [], {}
    for plate, rows in groups.items():
        fit_rows = rows & mask
        if not fit_rows.any():
            where = f"plate {plate!r}" if plate is not None else "the table"
            raise ValueError(f"no control rows in {where} to fit {method!r} on")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                norm = create_normalizer(method, **kwargs).fit(profiles.loc[fit_rows, cols])
            except ValueError as e:
                if plate is None:
                    raise
                raise ValueError(f"plate {plate!r}: {e}") from e
        for w in caught:  # the fit's warnings, told which plate's controls they are about
            warnings.warn_explicit(f"plate {plate!r}: {w.message}" if plate is not None else w.message,
                                   w.category, w.filename, w.lineno)
        fitted[plate] = norm
        parts.append(norm.transform(profiles.loc[rows, cols]))
    # Put rows back in table order (by position: the index need not be unique).
    order = np.concatenate([np.flatnonzero(rows) for rows in groups.values()])
    normalized = pd.concat(parts).iloc[np.argsort(order)].reset_index(drop=True)
    out = pd.concat([meta.reset_index(drop=True), normalized], axis=1)
    out.index = profiles.index
    return (out, fitted) if return_normalizers else out

