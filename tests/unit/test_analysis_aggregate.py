"""aggregate: field → well → treatment, on tables and on dask-backed xarray."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rayscreen.analysis import aggregate


def field_table():
    # Two wells of one plate, two fields each; hand-checkable numbers.
    return pd.DataFrame({
        "Metadata_Plate": ["P1"] * 4,
        "Metadata_Well": ["A01", "A01", "A02", "A02"],
        "Metadata_Field": ["0", "1", "0", "1"],
        "Metadata_Compound": ["taxol", "taxol", "DMSO", "DMSO"],
        "f0": [1.0, 3.0, 10.0, np.nan],
        "f1": [2.0, 2.0, 0.0, 4.0],
    })


def test_field_to_well_mean_keeps_constant_metadata():
    out = aggregate(field_table(), by=["Metadata_Plate", "Metadata_Well"], method="mean", count_column="Metadata_Count")
    assert list(out.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Count", "Metadata_Compound", "f0", "f1"]
    assert out["Metadata_Well"].tolist() == ["A01", "A02"]
    assert out["f0"].tolist() == [2.0, 10.0]  # NaN skipped
    assert out["f1"].tolist() == [2.0, 2.0]
    assert out["Metadata_Compound"].tolist() == ["taxol", "DMSO"]
    assert out["Metadata_Count"].tolist() == [2, 2]
    assert "Metadata_Field" not in out  # varies within a well


def test_median_and_bad_method():
    table = pd.DataFrame({"Metadata_Well": ["A01"] * 3, "f": [1.0, 2.0, 30.0]})
    assert aggregate(table, by="Metadata_Well", method="median")["f"].tolist() == [2.0]
    with pytest.raises(ValueError, match="method"):
        aggregate(table, by="Metadata_Well", method="max")
    with pytest.raises(ValueError, match="Metadata_Plate"):
        aggregate(table, by=["Metadata_Plate"])


def test_well_to_treatment_keeps_moa():
    wells = pd.DataFrame({
        "Metadata_Plate": ["P1", "P2", "P1", "P2"],
        "Metadata_Compound": ["a", "a", "b", "b"],
        "Metadata_Concentration": [1.0, 1.0, 1.0, 1.0],
        "Metadata_MOA": ["m1", "m1", "m2", "m2"],
        "f": [1.0, 3.0, 5.0, 7.0],
    })
    out = aggregate(wells, by=["Metadata_Compound", "Metadata_Concentration"])
    assert out["Metadata_MOA"].tolist() == ["m1", "m2"]
    assert out["f"].tolist() == [2.0, 6.0]
    assert "Metadata_Plate" not in out


@pytest.mark.parametrize("method", ["mean", "median"])
def test_xarray_dask_stays_lazy_and_matches_pandas(method):
    rng = np.random.default_rng(0)
    n_fields, n_features = 60, 5
    values = rng.normal(size=(n_fields, n_features))
    plates = np.repeat(["P1", "P2"], 30)
    wells = np.tile(np.repeat(["A01", "A02", "B01"], 10), 2)
    profiles = xr.DataArray(
        da.from_array(values, chunks=(16, n_features)), dims=("field", "feature"),
        coords={"plate": ("field", plates), "well": ("field", wells),
                "field_name": ("field", np.arange(n_fields).astype(str)),
                "feature": [f"f{i}" for i in range(n_features)]})
    out = aggregate(profiles, by=["plate", "well"], method=method, count_column="count")
    assert isinstance(out.data, da.Array)  # nothing computed yet
    assert out.dims == ("group", "feature")
    assert "field_name" not in out.coords
    table = pd.DataFrame(values, columns=[f"f{i}" for i in range(n_features)])
    table.insert(0, "Metadata_Plate", plates)
    table.insert(1, "Metadata_Well", wells)
    expected = aggregate(table, by=["Metadata_Plate", "Metadata_Well"], method=method)
    assert out["plate"].values.tolist() == expected["Metadata_Plate"].tolist()
    assert out["well"].values.tolist() == expected["Metadata_Well"].tolist()
    assert out["count"].values.tolist() == [10] * 6
    np.testing.assert_allclose(out.values, expected[[f"f{i}" for i in range(n_features)]].to_numpy())


def test_xarray_single_key_names_the_dimension():
    profiles = xr.DataArray(np.arange(8.0).reshape(4, 2), dims=("field", "feature"),
                            coords={"well": ("field", ["A01", "A01", "A02", "A02"])})
    out = aggregate(profiles, by="well")
    assert out.dims == ("well", "feature")
    assert out.sel(well="A02").values.tolist() == [5.0, 6.0]
    with pytest.raises(ValueError, match="compound"):
        aggregate(profiles, by="compound")


def test_xarray_dataset_with_per_field_scores():
    # A results-store-like Dataset: profiles (field, feature) and a 1-D score per field.
    ds = xr.Dataset({"profile": (("field", "feature"), da.from_array(np.arange(12.0).reshape(6, 2), chunks=2)),
                     "score": (("field",), da.from_array(np.array([1.0, 5.0, 2.0, 2.0, 0.0, 9.0]), chunks=2))},
                    coords={"well": ("field", ["A01", "A01", "A02", "A02", "A03", "A03"]),
                            "feature": ["f0", "f1"]})
    out = aggregate(ds, by="well", method="median")
    assert isinstance(out["score"].data, da.Array)
    assert out["score"].values.tolist() == [3.0, 2.0, 4.5]
    assert out["profile"].sel(feature="f1").values.tolist() == [2.0, 6.0, 10.0]


def test_an_annotation_dropped_for_a_few_groups_is_named_in_a_warning():
    """One well with a blank MOA used to drop Metadata_MOA for the whole table silently."""
    import warnings

    wells = pd.DataFrame({
        "Metadata_Plate": ["P1", "P2"] * 3,
        "Metadata_Well": ["A01", "A02", "B01", "B02", "C01", "C02"],
        "Metadata_Compound": ["a", "a", "b", "b", "c", "c"],
        "Metadata_MOA": ["m1", "m1", "m2", np.nan, "m3", "m3"],
        "f": np.arange(6.0),
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = aggregate(wells, by="Metadata_Compound")
    assert "Metadata_MOA" not in out
    # Metadata_Plate / Metadata_Well differ within every group: per-well metadata, no warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "'Metadata_MOA'" in messages[0] and "1 of 3 group(s)" in messages[0]
    assert "{'Metadata_Compound': 'b'} has ['m2', nan]" in messages[0]


def test_a_treatment_on_one_plate_beside_controls_on_every_plate_is_not_called_an_annotation_error():
    """Compounds replicated on one plate and DMSO on both: Metadata_Plate differs only within
    the DMSO group. That is where the wells were imaged, not a wrong annotation; the advice
    "Fix the annotation" would send the user after nothing."""
    import warnings

    wells = pd.DataFrame({
        "Metadata_Plate": ["P1", "P1", "P2", "P2", "P1", "P2"],
        "Metadata_Compound": ["a", "a", "b", "b", "DMSO", "DMSO"],
        "Metadata_MOA": ["m1", "m1", "m2", "m2", "", ""],
        "f": np.arange(6.0),
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = aggregate(wells, by="Metadata_Compound")
    assert [str(w.message) for w in caught] == []
    assert "Metadata_Plate" not in out and out["Metadata_MOA"].tolist() == ["", "m1", "m2"]
