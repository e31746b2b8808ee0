"""feature_select: all-NaN (warned), constant / low-variance, correlated pairs."""

import warnings

import numpy as np
import pandas as pd
import pytest

from rayscreen.analysis import correlated_features, feature_select, low_variance_features


def table():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    return pd.DataFrame({
        "Metadata_Well": [f"A{i:02d}" for i in range(50)],
        "a": a,
        "empty": np.nan,
        "const": 0.1,  # float mean of 0.1s is not exactly 0.1: variance ~1e-34, not 0
        "tiny": 1e-4 * rng.normal(size=50),
        "b": rng.normal(size=50),
        "a_twice": -2 * a + 1e-3 * rng.normal(size=50),  # |r| ~ 1 with a
    })


def test_feature_select_drops_and_warns():
    with pytest.warns(UserWarning, match=r"all-NaN feature\(s\): \['empty'\]"):
        out = feature_select(table())
    assert list(out.columns) == ["Metadata_Well", "a", "tiny", "b"]


def test_min_variance_and_operation_subset():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN warning when drop_na is not asked for
        assert low_variance_features(table(), ["a", "const", "tiny", "b"], min_variance=1e-6) == ["const", "tiny"]
    out = feature_select(table(), operations=["correlation"])
    assert "a_twice" not in out and "a" in out and "empty" in out
    with pytest.raises(ValueError, match="unknown operation"):
        feature_select(table(), operations=["pca"])


def test_correlated_keeps_the_first_of_each_pair():
    x = np.arange(10.0)
    df = pd.DataFrame({"y": x ** 2, "x": x, "x2": 3 * x + 1, "z": np.sin(x)})
    # corr(y, x) = 0.963 > 0.9: x goes; x2 is a copy of x, hence of y too: goes
    assert correlated_features(df, threshold=0.9) == ["x", "x2"]
    assert correlated_features(df, threshold=0.99) == ["x2"]
    with pytest.raises(ValueError, match="threshold"):
        correlated_features(df, threshold=1.5)


def test_a_feature_seen_in_two_wells_does_not_drop_the_features_after_it():
    """Two points lie on a line: a feature measured in only two wells correlated +-1 with
    every other feature over those two wells, and, kept first, dropped them all."""
    x = np.arange(10.0)
    rng = np.random.default_rng(1)
    sparse = np.full(10, np.nan)
    sparse[[2, 7]] = [1.0, 5.0]
    df = pd.DataFrame({"sparse": sparse, "x": x, "z": rng.normal(size=10), "x2": 3 * x + 1})
    assert correlated_features(df, threshold=0.9) == ["x2"]  # only the real copy of x
    # a pair seen together in half the rows still counts
    half = np.where(x < 5, np.nan, -x)
    assert correlated_features(pd.DataFrame({"x": x, "half": half}), threshold=0.9) == ["half"]


def test_samples_decide_but_drop_applies_to_all_rows():
    df = pd.DataFrame({"Metadata_Control": [True, True, False, False],
                       "f": [1.0, 1.0, 5.0, 9.0], "g": [1.0, 2.0, 3.0, 1.0]})
    out = feature_select(df, operations=["variance"], samples="Metadata_Control")
    assert list(out.columns) == ["Metadata_Control", "g"]  # f is constant in the controls
    assert len(out) == 4
