"""The cytomining convention holds: our profile tables load and run through pycytominer,
and our aggregation / normalisers agree with pycytominer's."""

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rayscreen.analysis import aggregate, feature_columns, normalize, read_table, to_table, write_table

pycytominer = pytest.importorskip("pycytominer")


def field_profiles(seed=0):
    """Per-field profiles as the results store holds them: dims (field, feature), the
    field's plate, well and annotations as coordinates along ``field``."""
    rng = np.random.default_rng(seed)
    n_wells, n_fields, n_features = 12, 3, 5
    wells = np.repeat([f"B{w + 1:02d}" for w in range(n_wells)], n_fields)
    control = np.repeat(np.arange(n_wells) < 6, n_fields)
    values = rng.normal(size=(n_wells * n_fields, n_features)) + np.where(control, 0.0, 1.5)[:, None]
    return xr.DataArray(values, dims=("field", "feature"), coords={
        "plate": ("field", ["P1"] * len(wells)), "well": ("field", wells),
        "field_name": ("field", np.tile(["0", "1", "2"], n_wells)),
        "Metadata_Control": ("field", control),
        "feature": [f"emb_{i:03d}" for i in range(n_features)]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_exported_table_runs_through_pycytominer(tmp_path, suffix):
    table = to_table(field_profiles())
    assert list(table.columns[:4]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Field_name", "Metadata_Control"]
    path = write_table(table, str(tmp_path / f"fields{suffix}"))
    loaded = read_table(path)
    features = feature_columns(loaded)
    assert features == [f"emb_{i:03d}" for i in range(5)]

    theirs = pycytominer.aggregate(loaded, strata=["Metadata_Plate", "Metadata_Well"], features=features,
                                   operation="mean")
    ours = aggregate(loaded, by=["Metadata_Plate", "Metadata_Well"], method="mean")
    theirs = theirs.sort_values("Metadata_Well").reset_index(drop=True)
    np.testing.assert_allclose(ours[features].to_numpy(), theirs[features].to_numpy())

    normalized = pycytominer.normalize(ours, features=features, meta_features=["Metadata_Plate", "Metadata_Well",
                                                                                "Metadata_Control"],
                                       samples="Metadata_Control == True", method="standardize")
    assert list(normalized.columns[:3]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Control"]
    np.testing.assert_allclose(normalized[features].to_numpy(), normalize(ours)[features].to_numpy(), atol=1e-9)


@pytest.mark.parametrize("ours_method, theirs_method, extra", [
    ("standardize", "standardize", {}),
    ("robust_mad", "mad_robustize", {}),
    ("whiten", "spherize", {"spherize_method": "ZCA", "spherize_epsilon": 1e-12}),
])
def test_normalisers_match_pycytominer(ours_method, theirs_method, extra):
    rng = np.random.default_rng(1)
    n, d = 60, 4
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5
    table = pd.DataFrame(X, columns=[f"emb_{i}" for i in range(d)])
    table.insert(0, "Metadata_Plate", "P1")
    table.insert(1, "Metadata_Control", np.arange(n) < 40)
    features = feature_columns(table)
    theirs = pycytominer.normalize(table, features=features, meta_features=["Metadata_Plate", "Metadata_Control"],
                                   samples="Metadata_Control == True", method=theirs_method, **extra)
    kwargs = {"epsilon": 1e-12, "shrinkage": "none"} if ours_method == "whiten" else {}
    ours = normalize(table, method=ours_method, **kwargs)
    np.testing.assert_allclose(ours[features].to_numpy(), theirs[features].to_numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_identifiers_that_look_like_numbers_read_back_as_written(tmp_path, suffix):
    table = pd.DataFrame({"Metadata_Plate": ["001", "002"], "Metadata_Well": ["A01", "B02"],
                          "Metadata_Compound": ["0123", "DMSO"], "Metadata_Concentration": [0.1, 1.0],
                          "f1": [1.0, 2.0]})
    loaded = read_table(write_table(table, str(tmp_path / f"wells{suffix}")))
    pd.testing.assert_frame_equal(loaded, table)  # plate "001" stays "001"; concentration stays a number
