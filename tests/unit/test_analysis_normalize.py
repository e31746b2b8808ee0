"""Normalisers fitted on controls: hand values, per-plate fitting, JSON round trips."""

import json

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rayscreen.analysis import Normalizer, RobustMAD, Standardize, Whiten, normalize


def test_robust_mad_hand_values():
    controls = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    # median 3; |x - 3| = 2, 1, 0, 1, 97 -> MAD 1 -> scale 1.4826 (the outlier does not matter)
    norm = RobustMAD().fit(controls)
    assert norm.median_.tolist() == [3.0]
    assert norm.mad_ == pytest.approx([1.4826])
    assert norm.transform(np.array([[6.0]]))[0, 0] == pytest.approx(3 / 1.4826)


def test_standardize_hand_values_and_constant_feature():
    controls = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    with pytest.warns(UserWarning, match=r"1 feature\(s\) have standard deviation 0 in the controls and are only "
                                         r"centred: \[1\]"):
        norm = Standardize().fit(controls)
    out = norm.transform(np.array([[4.0, 7.0]]))
    # mean 2, std (ddof=0) sqrt(2/3); the constant feature is only centred
    assert out[0, 0] == pytest.approx(2 / np.sqrt(2 / 3))
    assert out[0, 1] == pytest.approx(2.0)


def test_standardize_on_one_control_row_says_it_cannot_scale():
    """One control well on a plate: every feature's spread is 0, so that plate stays in raw
    units beside the other plates' standard deviations; RobustMAD warned of this, Standardize
    did not."""
    table = pd.DataFrame({"Metadata_Plate": ["P1", "P1", "P2", "P2", "P2"],
                          "Metadata_Control": ["negative", "", "negative", "negative", ""],
                          "f": [1.0, 3.0, 1.0, 2.0, 5.0]})
    with pytest.warns(UserWarning, match=r"plate 'P1': 1 feature\(s\) have standard deviation 0 in the controls "
                                         r"\(one control row\)"):
        normalize(table, "standardize")


def test_robust_mad_warns_on_zero_mad():
    with pytest.warns(UserWarning, match="MAD 0.*flat"):
        norm = RobustMAD().fit(pd.DataFrame({"ok": [1.0, 2.0, 3.0], "flat": [4.0, 4.0, 4.0]}))
    out = norm.transform(pd.DataFrame({"ok": [2.0], "flat": [6.0]}))
    assert out["flat"].iloc[0] == pytest.approx(2.0)


def test_zero_mad_warning_names_the_plate_and_shows_the_first_ten_features():
    flat = {f"f{i}": [4.0, 4.0, 4.0] for i in range(13)}
    table = pd.DataFrame({"Metadata_Plate": ["P1"] * 3, "Metadata_Control": ["negative"] * 3,
                          "ok": [1.0, 2.0, 3.0], **flat})
    with pytest.warns(UserWarning) as record:
        normalize(table, "robust_mad")
    (message,) = [str(w.message) for w in record]
    assert message.startswith("plate 'P1': 13 feature(s) have MAD 0 in the controls and are only centred: ")
    assert message.endswith(f"{[f'f{i}' for i in range(10)]} and 3 more")


@pytest.mark.parametrize("kind", ["ZCA", "PCA"])
def test_whiten_gives_identity_covariance_on_controls(kind):
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(4, 4))
    controls = rng.normal(size=(500, 4)) @ mixing + 3.0
    norm = Whiten(epsilon=1e-9, kind=kind, shrinkage="none").fit(controls)
    white = norm.transform(controls)
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(4), atol=1e-6)
    if kind == "ZCA":
        np.testing.assert_allclose(norm.W_, norm.W_.T, atol=1e-10)  # ZCA is the symmetric whitener
    else:
        assert np.var(controls @ norm.W_[0]) >= np.var(controls @ norm.W_[-1])  # PC1 carries most variance


def test_whiten_with_fewer_controls_than_features_is_finite():
    rng = np.random.default_rng(2)
    norm = Whiten(epsilon=1e-3, shrinkage="none").fit(rng.normal(size=(5, 20)))
    assert np.isfinite(norm.transform(rng.normal(size=(3, 20)))).all()
    with pytest.raises(ValueError, match="singular"):
        Whiten(epsilon=0, shrinkage="none").fit(rng.normal(size=(5, 20)))
    # shrunk, the covariance has full rank without any ridge
    assert np.isfinite(Whiten(epsilon=0).fit(rng.normal(size=(5, 20))).W_).all()


def test_whiten_shrinkage_takes_scikit_learns_amount_and_tames_the_noise_directions():
    """Ledoit-Wolf / OAS: the amount is scikit-learn's; with 12 controls of 40 features the
    unshrunk sphering multiplies some direction by ~1/sqrt(epsilon), the shrunk one does not."""
    from sklearn.covariance import OAS, LedoitWolf

    rng = np.random.default_rng(5)
    controls = rng.normal(size=(12, 40)) * np.linspace(0.5, 2.0, 40)
    for name, cls in (("ledoit_wolf", LedoitWolf), ("oas", OAS)):
        norm = Whiten(shrinkage=name).fit(controls)
        assert norm.shrinkage_ == pytest.approx(cls().fit(controls).shrinkage_)
        assert 0 < norm.shrinkage_ <= 1
    gain = lambda w: np.linalg.norm(w.W_, 2)  # noqa: E731 - the largest factor the transform applies
    assert gain(Whiten(shrinkage="none").fit(controls)) > 100
    shrunk = Whiten().fit(controls)
    mean_var = np.trace(np.cov(controls, rowvar=False)) / 40
    assert gain(shrunk) <= 1 / np.sqrt(shrunk.shrinkage_ * mean_var) + 1e-9
    # full shrinkage: one scale for every feature, 1 / sqrt(mean variance)
    full = Whiten(shrinkage=1.0, epsilon=0).fit(controls)
    np.testing.assert_allclose(full.W_, np.eye(40) / np.sqrt(mean_var), atol=1e-9)
    for bad in ("lw", 1.5, -0.1):
        with pytest.raises(ValueError, match="shrinkage must be one of"):
            Whiten(shrinkage=bad)


@pytest.mark.parametrize("norm", [Standardize(), RobustMAD(), Whiten(epsilon=1e-4), Whiten(kind="PCA"),
                                  Whiten(shrinkage=0.3), Whiten(shrinkage="none")])
def test_to_dict_round_trips_through_json(norm):
    rng = np.random.default_rng(3)
    controls = pd.DataFrame(rng.normal(size=(30, 3)), columns=["a", "b", "c"])
    rows = pd.DataFrame(rng.normal(size=(7, 3)), columns=["a", "b", "c"])
    norm.fit(controls)
    again = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict(), allow_nan=False)))
    assert type(again) is type(norm)
    pd.testing.assert_frame_equal(again.transform(rows), norm.transform(rows))


def test_nan_parameters_survive_json():
    norm = Standardize().fit(np.array([[1.0, np.nan], [3.0, np.nan]]))
    d = json.loads(json.dumps(norm.to_dict(), allow_nan=False))
    assert d["mean"] == [2.0, None]
    assert np.isnan(Normalizer.from_dict(d).mean_[1])


def test_transform_checks_feature_names_and_fitting():
    norm = Standardize()
    with pytest.raises(RuntimeError, match="not fitted"):
        norm.transform(np.zeros((1, 2)))
    norm.fit(pd.DataFrame({"a": [1.0, 2.0], "b": [1.0, 3.0]}))
    with pytest.raises(ValueError, match="feature columns differ"):
        norm.transform(pd.DataFrame({"b": [1.0], "a": [2.0]}))


def test_dask_dataarray_transform_stays_lazy():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(40, 3))
    norm = Whiten(epsilon=1e-6).fit(values[:20])
    arr = xr.DataArray(da.from_array(values, chunks=(10, 3)), dims=("well", "feature"),
                       coords={"feature": ["a", "b", "c"]})
    out = norm.transform(arr)
    assert isinstance(out.data, da.Array)
    np.testing.assert_allclose(out.values, norm.transform(values))
    assert out["feature"].values.tolist() == ["a", "b", "c"]


def plate_table(seed=5):
    rng = np.random.default_rng(seed)
    rows = []
    for plate, offset in (("P1", 0.0), ("P2", 10.0)):
        for w in range(12):
            control = w < 6
            shift = 0.0 if control else 2.0
            rows.append({"Metadata_Plate": plate, "Metadata_Well": f"A{w + 1:02d}", "Metadata_Control": control,
                         "f0": offset + shift + rng.normal(), "f1": 2 * offset + rng.normal()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("method", ["standardize", "robust_mad", "whiten"])
def test_normalize_per_plate_removes_plate_offsets(method):
    table = plate_table()
    out, fitted = normalize(table, method=method, return_normalizers=True)
    assert list(out.columns) == list(table.columns)
    assert out.index.equals(table.index)
    assert set(fitted) == {"P1", "P2"}
    controls = out[out["Metadata_Control"]]
    center = controls.groupby("Metadata_Plate")[["f0", "f1"]].median() if method == "robust_mad" else \
        controls.groupby("Metadata_Plate")[["f0", "f1"]].mean()
    np.testing.assert_allclose(center.to_numpy(), 0, atol=1e-9)
    treated = out[~out["Metadata_Control"]]
    assert (treated.groupby("Metadata_Plate")["f0"].mean() > 1).all()  # the effect survives


def test_normalize_bad_inputs():
    table = plate_table().drop(columns="Metadata_Control")
    with pytest.raises(ValueError, match="Metadata_Control"):
        normalize(table)
    out = normalize(table, controls="all", by_plate=False)
    np.testing.assert_allclose(out[["f0", "f1"]].mean().to_numpy(), 0, atol=1e-9)
    with pytest.raises(ValueError, match="no control rows in plate 'P2'"):
        normalize(table, controls=(table["Metadata_Plate"] == "P1").to_numpy())
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(table, method="zscore", controls="all")


def test_whiten_errors_name_the_plate_and_the_features():
    table = pd.DataFrame({"Metadata_Plate": ["P1", "P1", "P1", "P7", "P7"],
                          "Metadata_Control": ["negative"] * 5,
                          "f1": [1.0, 2.0, 3.0, 1.0, 2.0], "f2": [1.0, 0.0, 2.0, np.nan, 1.0]})
    with pytest.raises(ValueError, match=r"plate 'P7': Whiten needs finite control profiles; feature\(s\) \['f2'\]"):
        normalize(table, "whiten")
    with pytest.raises(ValueError, match="plate 'P7': Whiten needs at least 2 control rows"):
        normalize(table.drop(index=4).fillna(0.0), "whiten")


def test_pca_whitening_per_plate_is_refused_zca_is_not():
    """PCA axes fitted per plate differ (and flip sign) from plate to plate under the same
    names PC1..: the same treatment on two plates came out near-orthogonal. Refused per plate
    over several plates; ZCA (feature space) and a single fit are fine."""
    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P1", "P2"):
        t = pd.DataFrame(rng.normal(size=(30, 3)), columns=["f0", "f1", "f2"])
        t.insert(0, "Metadata_Plate", plate)
        t.insert(1, "Metadata_Control", ["negative"] * 20 + [""] * 10)
        rows.append(t)
    table = pd.concat(rows, ignore_index=True)
    with pytest.raises(ValueError, match="kind='PCA' per plate.*not be comparable"):
        normalize(table, "whiten", kind="PCA")
    assert normalize(table, "whiten", kind="ZCA").shape == table.shape
    assert list(normalize(table, "whiten", kind="PCA", by_plate=False).columns[-3:]) == ["PC1", "PC2", "PC3"]
