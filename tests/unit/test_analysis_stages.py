"""The pure parts of rayscreen.analysis.stages on hand-built profile stores (xarray
Datasets laid out as docs/outputs.md describes) and hand-written tables: values worked out
by hand, no Ray."""

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rayscreen.analysis.stages import (AnalysisError, check_annotations, controls_of, hit_distances, process_wells,
                                       run_evaluate, treatment_profiles, well_profiles)
from rayscreen.config import config_from_dict

NAN = np.nan


def store() -> xr.Dataset:
    """2 plates x 3 wells (A01 DMSO control, A02 compound X, A03 compound Y), 3 field slots,
    2 features. Field values are chosen so every mean and median is a small integer."""
    wells = ["P1/A01", "P1/A02", "P1/A03", "P2/A01", "P2/A02", "P2/A03"]
    f = np.full((6, 3, 2), NAN, np.float32)
    status = np.zeros((6, 3), np.int8)
    f[0] = [[1, 10], [3, 10], [2, 10]]
    f[1] = [[4, 20], [6, 22], [100, 900]]   # field 2 QC-flagged: excluded by default
    status[1, 2] = 3
    f[2] = [[7, 30], [9, 34], [NAN, NAN]]   # field 2 does not exist in this well
    status[2, 2] = 1
    f[3] = [[10, 40], [12, 40], [14, 40]]
    f[4] = [[20, 50], [NAN, NAN], [22, 54]]  # field 1 a read error
    status[4, 1] = 2
    f[5] = [[NAN, NAN]] * 3                  # no usable field: the well is left out
    status[5] = [2, 3, 1]
    f[5, 1] = [99, 99]
    plate = [w.split("/")[0] for w in wells]
    return xr.Dataset(
        {"field_profile": (("well", "field", "feature"), f), "field_status": (("well", "field"), status)},
        coords={"well": wells, "field": [0, 1, 2], "feature": ["f0", "f1"], "plate": ("well", plate),
                "Metadata_Plate": ("well", plate), "Metadata_Well": ("well", [w.split("/")[1] for w in wells]),
                "Metadata_Compound": ("well", ["DMSO", "X", "Y"] * 2),
                "Metadata_Concentration": ("well", [0.0, 1.0, 1.0] * 2),
                "Metadata_Control": ("well", ["negative", "", ""] * 2),
                "Metadata_Batch": ("well", plate)})


def config(tmp_path, **analysis):
    return config_from_dict({"plates": [str(tmp_path / "p.zarr")], "output": str(tmp_path / "run"),
                             "analysis": analysis})


def test_well_profiles_mean_skips_flagged_missing_and_error_fields():
    t = well_profiles(store(), "field_profile", "feature")
    assert list(t["Metadata_Well"]) == ["A01", "A02", "A03", "A01", "A02"]  # P2/A03: no usable field
    assert list(t["Metadata_Fields"]) == [3, 2, 2, 3, 2]
    np.testing.assert_allclose(t[["f0", "f1"]].to_numpy(), [[2, 10], [5, 21], [8, 32], [12, 40], [21, 52]])
    assert list(t.columns[:2]) == ["Metadata_Plate", "Metadata_Well"] and t.columns[-2:].tolist() == ["f0", "f1"]


def test_well_profiles_keeps_flagged_fields_when_asked_and_median():
    t = well_profiles(store(), "field_profile", "feature", exclude_qc=False)
    # P1/A02 now averages 4, 6, 100; P2/A03 gains its flagged field 1 (99, 99)
    assert list(t["Metadata_Fields"]) == [3, 3, 2, 3, 2, 1]
    np.testing.assert_allclose(t[["f0", "f1"]].to_numpy()[[1, 5]], [[110 / 3, 942 / 3], [99, 99]], rtol=1e-6)
    med = well_profiles(store(), "field_profile", "feature", method="median", exclude_qc=False)
    np.testing.assert_allclose(med[["f0", "f1"]].to_numpy()[1], [6, 22])


def test_process_wells_normalises_each_plate_against_its_own_controls(tmp_path):
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * 4 + ["P2"] * 4,
                          "Metadata_Control": ["negative", "negative", "negative", ""] * 2,
                          "Metadata_Fields": 3,
                          "f0": [1.0, 2.0, 4.0, 10.0, 101.0, 102.0, 104.0, 110.0],
                          "f1": [0.0, 1.0, 5.0, 3.0, 0.0, 2.0, 10.0, 6.0]})
    out = process_wells(wells, config(tmp_path, normalize="mad", feature_select=[]))
    # P1 f0: controls 1, 2, 4 -> median 2, MAD 1 -> (x - 2) / 1.4826; P2 the same after +100
    np.testing.assert_allclose(out["f0"], np.tile([-1, 0, 2, 8], 2) / 1.4826)
    # f1: P1 controls 0, 1, 5 -> median 1, MAD 1; P2 controls 0, 2, 10 -> median 2, MAD 2
    np.testing.assert_allclose(out["f1"], np.r_[[-1, 0, 4, 2], [-1, 0, 4, 2]] / 1.4826)
    std = process_wells(wells, config(tmp_path, normalize="standardize", feature_select=[]))
    p1 = std["Metadata_Plate"] == "P1"
    ctrl = std["Metadata_Control"] == "negative"
    np.testing.assert_allclose(std.loc[p1 & ctrl, "f0"].mean(), 0, atol=1e-12)
    np.testing.assert_allclose(std.loc[~p1 & ctrl, "f1"].mean(), 0, atol=1e-12)
    # the treated well relative to its own plate's controls: identical on both plates for f0
    np.testing.assert_allclose(std.loc[p1 & ~ctrl, "f0"].to_numpy(), std.loc[~p1 & ~ctrl, "f0"].to_numpy())


def test_process_wells_whitens_each_plate_with_the_shrinkage_asked_for(tmp_path):
    """6 control wells of 20 features per plate: the sample covariance is singular; the
    shrunk sphering (default) stays bounded where the unshrunk one blows a noise direction up."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    n, feats = 8, [f"f{i}" for i in range(20)]
    wells = pd.concat([pd.DataFrame({"Metadata_Plate": p, "Metadata_Control": ["negative"] * 6 + [""] * 2,
                                     "Metadata_Fields": 3, **dict(zip(feats, rng.normal(size=(20, n)) * 2 + k))})
                       for k, p in enumerate(["P1", "P2"])], ignore_index=True)
    cfg = dict(normalize="none", feature_select=[], whiten=True)
    shrunk = process_wells(wells, config(tmp_path, **cfg))
    plain = process_wells(wells, config(tmp_path, **cfg, whiten_shrinkage="none"))
    treated = wells["Metadata_Control"] == ""
    assert np.abs(plain.loc[treated, feats].to_numpy()).max() > 100  # ~1/sqrt(1e-6) along a noise direction
    assert np.abs(shrunk.loc[treated, feats].to_numpy()).max() < 20
    # each plate on its own controls: their mean is 0 and, with Ledoit-Wolf's amount s, the
    # controls' covariance has eigenvalues lam / ((1 - s) lam + s mean(lam)) <= 1 / (1 - s)
    for p in ("P1", "P2"):
        ctrl = (wells["Metadata_Plate"] == p) & ~treated
        np.testing.assert_allclose(shrunk.loc[ctrl, feats].mean(), 0, atol=1e-9)
        lam = np.linalg.eigvalsh(np.cov(shrunk.loc[ctrl, feats].to_numpy(), rowvar=False))
        s = LedoitWolf().fit(wells.loc[ctrl, feats]).shrinkage_
        assert 0 < s < 1 and 1 < lam.max() <= 1 / (1 - s) + 1e-9
    with pytest.raises(Exception, match="analysis.whiten_shrinkage"):
        config(tmp_path, whiten=True, whiten_shrinkage="lw")


def test_features_are_selected_before_whitening(tmp_path):
    """The cytomining order (pycytominer, the JUMP recipe): normalise, select, then sphere.
    A feature that duplicates another (r = 0.99) is dropped by the correlation filter before
    the sphering is fitted, so the result is the sphering of the other four alone (had the
    sphering come first, its transform would mix the duplicate into them)."""
    rng = np.random.default_rng(1)
    n = 16
    base = {f"f{i}": rng.normal(size=n) for i in range(4)}
    base["f0_copy"] = base["f0"] * 2 + rng.normal(size=n) * 0.05
    wells = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Control": ["negative"] * 10 + [""] * 6,
                          "Metadata_Fields": 3, **base})
    out = process_wells(wells, config(tmp_path, normalize="none", feature_select=["correlation"], whiten=True))
    assert sorted(c for c in out.columns if not c.startswith("Metadata_")) == ["f0", "f1", "f2", "f3"]
    alone = process_wells(wells.drop(columns=["f0_copy"]), config(tmp_path, normalize="none", feature_select=[],
                                                                    whiten=True))
    np.testing.assert_allclose(out[["f0", "f1", "f2", "f3"]], alone[["f0", "f1", "f2", "f3"]], atol=1e-9)


def test_process_wells_drops_all_nan_features_naming_them(tmp_path):
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * 3, "Metadata_Control": ["negative", "negative", ""],
                          "Metadata_Fields": 1, "f0": [1.0, 3.0, 5.0], "gone": [NAN, NAN, NAN]})
    with pytest.warns(UserWarning, match="gone"):
        out = process_wells(wells, config(tmp_path, normalize="none", feature_select=[]))
    assert "gone" not in out.columns and list(out["f0"]) == [1.0, 3.0, 5.0]


def test_treatment_profiles_mean_over_wells_per_batch(tmp_path):
    wells = well_profiles(store(), "field_profile", "feature")
    t = treatment_profiles(wells, config(tmp_path))
    # one treatment per (compound, concentration, batch); single wells keep their values
    assert len(t) == 5 and list(t["Metadata_Wells"]) == [1] * 5
    x1 = t[(t["Metadata_Compound"] == "X") & (t["Metadata_Batch"] == "P1")]
    np.testing.assert_allclose(x1[["f0", "f1"]].to_numpy(), [[5, 21]])
    pooled = treatment_profiles(wells, config(tmp_path, by_batch=False))
    dmso = pooled[pooled["Metadata_Compound"] == "DMSO"]
    assert int(dmso["Metadata_Wells"].iloc[0]) == 2
    np.testing.assert_allclose(dmso[["f0", "f1"]].to_numpy(), [[7, 25]])  # (2 + 12) / 2, (10 + 40) / 2


def test_missing_annotation_columns_are_named(tmp_path):
    wells = well_profiles(store(), "field_profile", "feature").drop(columns=["Metadata_Concentration"])
    with pytest.raises(AnalysisError, match="Metadata_Concentration"):
        treatment_profiles(wells, config(tmp_path))
    table = pd.DataFrame({"Metadata_Compound": ["X"], "f0": [1.0]})
    with pytest.raises(AnalysisError, match=r"\['Metadata_MOA', 'Metadata_Control'\]"):
        check_annotations(table, config(tmp_path), "treatment")
    with pytest.raises(AnalysisError, match="Metadata_Control.*analysis.control_column"):
        controls_of(table, config(tmp_path))


def test_controls_of_by_value(tmp_path):
    t = pd.DataFrame({"Metadata_Compound": ["DMSO", "X", "DMSO"]})
    cfg = config(tmp_path, control_column="Metadata_Compound", control_value="DMSO")
    assert controls_of(t, cfg).tolist() == [True, False, True]


@pytest.mark.parametrize("value", [True, 1])
def test_controls_of_true_matches_a_bool_column_stored_as_text(tmp_path, value):
    # a bool annotation with one blank well is kept by the store as text: "True", "False", ""
    t = pd.DataFrame({"Metadata_IsControl": ["True", "False", "", "True"]})
    cfg = config(tmp_path, control_column="Metadata_IsControl", control_value=value)
    assert controls_of(t, cfg).tolist() == [True, False, False, True]


def test_controls_of_by_a_number_matches_its_text(tmp_path):
    t = pd.DataFrame({"Metadata_Dose": ["0", "5", ""]})
    assert controls_of(t, config(tmp_path, control_column="Metadata_Dose", control_value=0)).tolist() == [
        True, False, False]


def _write_tables(tmp_path, treatment: pd.DataFrame, wells: pd.DataFrame, distances: bool = True) -> None:
    tables = tmp_path / "run" / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    treatment.to_parquet(tables / "treatment.parquet")
    wells.to_parquet(tables / "well.parquet")
    if distances:  # as aggregate writes them for hit calling
        hit_distances(wells, wells, config(tmp_path)).to_parquet(tables / "distance.parquet")


def _tables(moas: list[str], compounds: list[str]):
    rng = np.random.default_rng(0)
    n = len(moas)
    feats = {f"f{i}": rng.normal(size=n + 2) for i in range(4)}
    meta = {"Metadata_Compound": compounds + ["DMSO", "DMSO"], "Metadata_MOA": moas + ["", ""],
            "Metadata_Control": [""] * n + ["negative", "negative"], "Metadata_Batch": ["P1"] * (n + 2),
            "Metadata_Plate": ["P1"] * (n + 2)}
    table = pd.DataFrame({**meta, **feats})
    return table.assign(Metadata_Wells=1), table.assign(Metadata_Fields=1)


def test_evaluate_reports_a_single_moa_instead_of_crashing(tmp_path, caplog):
    treatment, wells = _tables(["A", "A", "A"], ["a1", "a2", "a3"])
    _write_tables(tmp_path, treatment, wells)
    result = run_evaluate(config(tmp_path), progress=False)
    assert any("fewer than two MOAs" in w for w in result["warnings"])
    saved = json.loads((tmp_path / "run" / "evaluation" / "evaluation.json").read_text())
    assert saved["warnings"] == result["warnings"]


def test_evaluate_reports_single_compound_moas(tmp_path):
    # MOA C has one compound: NSC leaves the compound out, so C queries have no valid neighbour
    treatment, wells = _tables(["A", "A", "B", "B", "C"], ["a1", "a2", "b1", "b2", "c1"])
    _write_tables(tmp_path, treatment, wells)
    result = run_evaluate(config(tmp_path), progress=False)
    assert any("single compound" in w and "C" in w for w in result["warnings"])
    assert result["n_queries"] == 4 and result["nsc"] is not None


def test_the_evaluate_command_prints_the_table_and_where_the_result_is(tmp_path, capsys):
    import yaml

    from rayscreen.cli import main

    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    _write_tables(tmp_path, treatment, wells)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path).to_dict()))
    assert main(["evaluate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NSC" in out and f"evaluation: {tmp_path / 'run' / 'evaluation' / 'evaluation.json'}" in out
    assert "per_moa" not in out  # not the whole result as JSON


def test_evaluate_leaves_positive_controls_out_of_the_moa_retrieval(tmp_path):
    treatment, wells = _tables(["A", "A", "B", "B", "kinase inhibitor"], ["a1", "a2", "b1", "b2", "stauro"])
    treatment.loc[treatment["Metadata_Compound"] == "stauro", "Metadata_Control"] = "positive"
    _write_tables(tmp_path, treatment, wells)
    result = run_evaluate(config(tmp_path), progress=False)
    assert result["n_queries"] == 4 and set(result["per_moa"]) == {"A", "B"}
    # never a neighbour either: no column of the confusion matrix
    assert all(set(row) <= {"A", "B"} for row in result["confusion"].values())


def test_evaluate_counts_every_feature(tmp_path):
    # feature_columns leaves the Metadata_Wells count out already; "- 1" reported 3 of 4
    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    _write_tables(tmp_path, treatment, wells)
    result = run_evaluate(config(tmp_path), progress=False)
    assert result["n_features"] == 4 and result["feature_sets"]["deep"]["n_features"] == 4


def test_qc_annotations_read_with_the_store_key_types(tmp_path):
    """Plates named by numbers read as int64 could not be merged with the store's str plates."""
    from rayscreen.analysis.stages import read_qc_annotations

    path = tmp_path / "qc.csv"
    path.write_text("plate,Metadata_Well,field,label\n0001,A01,0,abnormal\n1002, B02 ,1,\n1002,B03,2.0,0\n")
    ann = read_qc_annotations(config(tmp_path, qc={"annotations": str(path)}))
    assert list(ann.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Field", "label"]
    assert ann["Metadata_Plate"].tolist() == ["0001", "1002", "1002"]  # leading zeros kept
    assert ann["Metadata_Well"].tolist() == ["A01", "B02", "B03"]
    assert ann["Metadata_Field"].tolist() == [0, 1, 2] and ann["Metadata_Field"].dtype == np.int64
    # the store's fields table (str plate, int field) merges with it, as run_qc does
    store_fields = pd.DataFrame({"Metadata_Plate": ["0001", "1002"], "Metadata_Well": ["A01", "B03"],
                                 "Metadata_Field": np.array([0, 2])})
    assert len(store_fields.merge(ann, on=["Metadata_Plate", "Metadata_Well", "Metadata_Field"])) == 2
    path.write_text("plate,well,field,label\nP1,A01,0,normal\nP1,A02,,abnormal\n")
    with pytest.raises(AnalysisError, match=r"qc\.csv: data row\(s\) \[2\]"):
        read_qc_annotations(config(tmp_path, qc={"annotations": str(path)}))


class StandInWriter:
    """Stands in for the store's writer in the QC tests below: they are about reading and
    matching annotation keys, not about what is written."""
    variables = ["field_profile", "field_status"]

    def __init__(self, *args, **kwargs):
        pass

    write_well = write_variable = update_attrs = finalize = lambda self, *args, **kwargs: None


def test_run_qc_on_numeric_plate_names(tmp_path, monkeypatch):
    """A store whose plates are named 1001/1002 and an annotation CSV read by pandas: the
    plates used to come out int64 and the merge with the store's str plates raised."""
    import rayscreen.store.results
    from rayscreen.analysis.stages import run_qc

    monkeypatch.setattr(rayscreen.store.results, "ResultsWriter", StandInWriter)
    ds = store()
    wells = [w.replace("P1", "1001").replace("P2", "1002") for w in ds["well"].values]
    plates = [w.split("/")[0] for w in wells]
    ds = ds.assign_coords(well=wells, plate=("well", plates), Metadata_Plate=("well", plates))
    csv = tmp_path / "qc.csv"
    csv.write_text("plate,well,field,label\n1001,A01,0,abnormal\n1001,A01,1,normal\n1001,A02,0,1\n1001,A02,1,0\n"
                   "1001,A03,0,true\n1002,A01,0,normal\n1002,A01,1,artefact\n1002,A02,0,False\n1001,H12,0,normal\n")
    cfg = config(tmp_path, qc={"annotations": str(csv), "features": "deep", "method": "linear"})
    with pytest.warns(UserWarning, match=r"qc\.csv: 1 annotated field\(s\) not found.*\['1001/H12/0'\]"):
        table, summary = run_qc(ds, cfg, "unused")
    assert summary["n_annotated"] == 8 and summary["cv_groups"] == "well"
    assert table["Metadata_Plate"].tolist()[:2] == ["1001", "1001"]
    assert table["Metadata_QC_Annotation"].notna().sum() == 8
    csv.write_text("plate,well,field,label\n1001,A01,0,blurry\n")
    with pytest.raises(AnalysisError, match=r"qc\.csv: column 'label'.*'blurry'"):
        run_qc(ds, cfg, "unused")


def test_qc_annotation_wells_are_read_as_the_platemap_reads_them(tmp_path, monkeypatch):
    """'A1' or 'a/1' in the annotation CSV name the store's well A01 (they matched nothing:
    no classifier, a warning, and the run went on as if the file were empty); a file of
    which no field is in the store is an error naming it."""
    import rayscreen.store.results
    from rayscreen.analysis.stages import run_qc

    monkeypatch.setattr(rayscreen.store.results, "ResultsWriter", StandInWriter)
    ds = store()
    csv = tmp_path / "qc.csv"
    csv.write_text("plate,well,field,label\nP1,A1,0,abnormal\nP1,a01,1,normal\nP1,A/2,0,1\nP1,A2,1,0\n"
                   "P1,A3,0,true\nP2,A1,0,normal\nP2,A1,1,artefact\nP2,A2,0,False\n")
    cfg = config(tmp_path, qc={"annotations": str(csv), "features": "deep", "method": "linear"})
    table, summary = run_qc(ds, cfg, "unused")
    assert summary["n_annotated"] == 8
    csv.write_text("plate,well,field,label\nQ9,A01,0,abnormal\nQ9,A02,0,normal\n")
    with pytest.raises(AnalysisError, match=r"qc\.csv: none of its 2 fields is in unused \(e\.g\. Q9/A01/0; "
                                            r"the store has e\.g\. P1/A01/0\)"):
        run_qc(ds, cfg, "unused")


def test_a_plate_without_controls_is_named_before_anything_is_fitted(tmp_path):
    """Per-plate normalisation, whitening and hit calling are fitted on each plate's controls;
    a plate without them used to stop `aggregate` with a bare ValueError about the first such
    plate only (not a RayscreenError, so the CLI printed a traceback)."""
    wells = pd.DataFrame({"Metadata_Plate": ["P1"] * 3 + ["P2"] * 2 + ["P3"] * 2,
                          "Metadata_Control": ["negative", "negative", "", "", "", "", ""],
                          "Metadata_Fields": 1, "f0": np.arange(7.0), "f1": np.arange(7.0) ** 2})
    for kwargs in ({"normalize": "mad"}, {"normalize": "none", "whiten": True}):
        with pytest.raises(AnalysisError, match=r"plate\(s\) \['P2', 'P3'\] have none .*analysis.control_column "
                                                r"'Metadata_Control' = analysis.control_value 'negative'.*1 of 3"):
            process_wells(wells, config(tmp_path, feature_select=[], **kwargs))
    # nothing is fitted on controls without normalisation or whitening: no controls needed
    assert len(process_wells(wells, config(tmp_path, normalize="none", feature_select=[]))) == 7

    treatment, table = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    table.loc[[0, 1], "Metadata_Plate"] = "P2"  # compounds a1, a2 on a plate of their own
    with pytest.raises(AnalysisError, match=r"hit calling .*plate\(s\) \['P2'\] have none"):
        hit_distances(table, table, config(tmp_path))  # in aggregate, which then writes no distances
    _write_tables(tmp_path, treatment, table, distances=False)
    with pytest.raises(AnalysisError, match=r"hit calling .*plate\(s\) \['P2'\] have none"):
        run_evaluate(config(tmp_path), progress=False)
    treatment, table = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    _write_tables(tmp_path, treatment, table, distances=False)  # tables of an older rayscreen
    with pytest.raises(AnalysisError, match=r"distance.parquet: the tables were written by an older rayscreen.*"
                                            r"`rayscreen aggregate` again"):
        run_evaluate(config(tmp_path), progress=False)


def test_hits_warn_of_plates_with_too_few_controls_to_score(tmp_path, caplog):
    """Two controls' leave-one-out distances are equal (each to the other): spread 0, so no
    well of that plate gets a z-score. Said, rather than a plate silently without hits."""
    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])  # 2 DMSO wells on P1
    with caplog.at_level("WARNING", logger="rayscreen"):
        _write_tables(tmp_path, treatment, wells)  # aggregate's distances
        run_evaluate(config(tmp_path), progress=False)
    assert "fewer than 3 control wells" in caplog.text and "P1 (2 control)" in caplog.text
    hits = pd.read_csv(tmp_path / "run" / "evaluation" / "hits.csv")
    assert hits.empty

    caplog.clear()
    extra = wells.iloc[[-1]].assign(Metadata_Well="Z99")
    _write_tables(tmp_path, treatment, pd.concat([wells, extra], ignore_index=True))  # a third control
    with caplog.at_level("WARNING", logger="rayscreen"):
        run_evaluate(config(tmp_path), progress=False)
    assert "fewer than 3 control wells" not in caplog.text


def test_aggregate_without_a_profiles_store_says_which_stage_makes_it(tmp_path, capsys):
    """Was '<output>/profiles.zarr: no results store there', naming neither the profiles store
    nor the command that writes it."""
    import yaml

    from rayscreen.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path).to_dict()))
    assert main(["aggregate", str(path)]) == 2
    assert (f"{tmp_path / 'run' / 'profiles.zarr'}: no profiles store there (analysis.source: profiles); "
            "run `rayscreen profile` with this config first") in capsys.readouterr().err
    assert main(["aggregate", str(path), "--set", "analysis.source=results"]) == 2
    assert "no results store there (analysis.source: results); run `rayscreen infer`" in capsys.readouterr().err


def test_an_overflowed_feature_of_a_field_is_missing_not_the_wells_value():
    """inf in one field's feature (an overflow) is left out of the well's mean, as a missing
    value is; it made the well inf, and after normalising the whole plate's feature +-inf."""
    ds = store()
    ds["field_profile"][0, 0, 0] = np.inf  # P1/A01, field 0, f0 (was 1; fields 3 and 2 remain)
    t = well_profiles(ds, "field_profile", "feature")
    assert t.loc[0, "f0"] == 2.5 and t.loc[0, "f1"] == 10
    assert np.isfinite(t[["f0", "f1"]].to_numpy()).all()


def test_a_treatment_table_without_control_rows_is_said_before_hits_fail(tmp_path, caplog):
    """analysis.control_value matching no row (e.g. 'negative' where the platemap says
    'vehicle'): the control compound would be evaluated as a treatment with an MOA of its own;
    the MOA evaluation says so, and hit calling, which needs controls, fails naming them."""
    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    treatment["Metadata_Control"] = treatment["Metadata_Control"].replace("negative", "vehicle")
    wells["Metadata_Control"] = wells["Metadata_Control"].replace("negative", "vehicle")
    _write_tables(tmp_path, treatment, wells, distances=False)
    with caplog.at_level("WARNING", logger="rayscreen"), pytest.raises(AnalysisError, match="hit calling"):
        run_evaluate(config(tmp_path), progress=False)
    assert "no control rows (Metadata_Control = 'negative'" in caplog.text


def test_the_wells_left_out_are_listed_with_why():
    """A well without a usable field leaves the tables (and its treatment the evaluation);
    aggregate lists it with its fields counted by status, reading only those wells."""
    from rayscreen.analysis.stages import wells_left_out

    ds = store()
    ds["field_status"][1] = [3, 3, 3]  # P1/A02: every field QC-flagged
    kept = well_profiles(ds, "field_profile", "feature")
    gone = wells_left_out(ds, kept)
    assert gone[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["P1", "A02"], ["P2", "A03"]]
    assert gone[["fields_qc_flagged", "fields_read_error", "fields_missing", "fields_not_finite"]].values.tolist() \
        == [[3, 0, 0, 0], [1, 1, 1, 0]]
    # QC-flagged fields used (analysis.qc.exclude: false): every well has a usable field
    assert len(wells_left_out(ds, well_profiles(ds, "field_profile", "feature", exclude_qc=False))) == 0


def _scores_store() -> xr.Dataset:
    """Infer's well scores (well x class) on 2 plates: P1 A01-A03 and P2 A01-A03 negative
    controls, P2 B01/B02 positive controls, P1 A05 never scored (NaN)."""
    wells = ["P1/A01", "P1/A02", "P1/A03", "P1/A04", "P1/A05", "P1/A06",
             "P2/A01", "P2/A02", "P2/A03", "P2/A04", "P2/B01", "P2/B02"]
    positive = np.array([0.1, 0.2, 0.3, 0.9, NAN, 0.25, 0.5, 0.6, 0.7, 0.85, 0.95, 0.97])
    control = ["negative"] * 3 + [""] * 3 + ["negative"] * 3 + ["", "positive", "positive"]
    plate = [w.split("/")[0] for w in wells]
    return xr.Dataset(
        {"well_scores": (("well", "class"), np.stack([1 - positive, positive], axis=1).astype(np.float32))},
        coords={"well": wells, "class": ["negative", "positive"], "plate": ("well", plate),
                "Metadata_Plate": ("well", plate), "Metadata_Well": ("well", [w.split("/")[1] for w in wells]),
                "Metadata_Control": ("well", control)})


def test_well_scores_are_called_per_plate_against_that_plates_controls(tmp_path):
    from rayscreen.analysis.stages import score_hits, score_table

    table = score_table(_scores_store())
    assert "P1/A05" not in set(table["Metadata_Plate"] + "/" + table["Metadata_Well"])  # never scored
    assert [c for c in table.columns if c.startswith("score_")] == ["score_negative", "score_positive"]
    hits, zp = score_hits(table, config(tmp_path))
    # z of the logits: P1's controls 0.1/0.2/0.3 -> logits -2.197/-1.386/-0.847, median
    # -1.386, MAD 0.539; A04 at 0.9 (logit 2.197) is z = 3.584 / (1.4826 * 0.539) = 4.48, A06
    # (0.25) 0.36. P2's A04 at 0.85 against controls at 0.5-0.7 (median logit 0.405, MAD 0.405):
    # z = 2.21, no hit. Positive controls are never hits; the controls' own class ("negative",
    # median 0.8 over them) is not called.
    assert hits[["Metadata_Plate", "Metadata_Well", "class"]].values.tolist() == [["P1", "A04", "positive"]]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert hits["z"].iloc[0] == pytest.approx((logit(0.9) - logit(0.2)) / (1.4826 * (logit(0.3) - logit(0.2))),
                                              rel=1e-4)
    assert hits["score"].iloc[0] == pytest.approx(0.9, abs=1e-6)
    # Z' of P2 (of the probabilities): 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg| = 1 - 3 (0.01414 + 0.1) / 0.36
    p2 = zp.set_index("Metadata_Plate").loc["P2"]
    assert p2["z_prime"] == pytest.approx(1 - 3 * (np.std([0.95, 0.97], ddof=1) + 0.1) / 0.36, rel=1e-3)
    assert np.isnan(zp.set_index("Metadata_Plate").loc["P1", "z_prime"])  # no positive controls


def test_evaluate_writes_hits_of_the_well_scores_when_aggregate_tabled_them(tmp_path, capsys):
    from rayscreen.analysis.stages import score_table

    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    _write_tables(tmp_path, treatment, wells)
    result = run_evaluate(config(tmp_path), progress=True)
    assert "n_hits_score" not in result and not (tmp_path / "run" / "evaluation" / "hits_score.csv").exists()
    score_table(_scores_store()).to_parquet(tmp_path / "run" / "tables" / "well_scores.parquet")
    result = run_evaluate(config(tmp_path), progress=True)
    assert result["n_hits_score"] == 1
    saved = pd.read_csv(tmp_path / "run" / "evaluation" / "hits_score.csv")
    assert saved[["Metadata_Well", "class"]].values.tolist() == [["A04", "positive"]]
    assert (tmp_path / "run" / "evaluation" / "z_prime_score.csv").exists()
    assert "of infer's well scores against the controls): 1" in capsys.readouterr().out


def test_aggregate_names_every_annotation_column_the_store_lacks_before_any_work(tmp_path, caplog):
    from rayscreen.analysis.stages import _well_metadata, aggregate_annotations

    wells = _well_metadata(store().drop_vars(["Metadata_Control", "Metadata_Concentration"]))
    with pytest.raises(AnalysisError) as e:
        aggregate_annotations(wells, config(tmp_path), "profiles.zarr")
    assert ("Metadata_Control (analysis.control_column), Metadata_Concentration (analysis.treatment)"
            in str(e.value)) and "profiles.zarr" in str(e.value)
    # the MOA only evaluate needs: a warning, the tables can still be made
    with caplog.at_level("WARNING", logger="rayscreen"):
        aggregate_annotations(_well_metadata(store()), config(tmp_path), "profiles.zarr")
    assert "Metadata_MOA (analysis.moa)" in caplog.text and "evaluate" in caplog.text


def test_the_feature_selection_thresholds_come_from_the_config(tmp_path):
    """f1 = 2 f0 + a little noise (|r| ~ 0.97), f2 independent; f3 nearly constant."""
    rng = np.random.default_rng(0)
    n = 40
    f0 = rng.normal(size=n)
    table = pd.DataFrame({"Metadata_Plate": ["P1"] * n, "Metadata_Control": ["negative"] * 10 + [""] * 30,
                          "f0": f0, "f1": 2 * f0 + 0.5 * rng.normal(size=n), "f2": rng.normal(size=n),
                          "f3": 1 + 1e-3 * rng.normal(size=n)})
    r = abs(np.corrcoef(table["f0"], table["f1"])[0, 1])
    kept = lambda **a: [c for c in process_wells(table, config(tmp_path, normalize="none", **a)).columns  # noqa: E731
                        if c.startswith("f")]
    assert kept() == ["f0", "f2", "f3"]  # default |r| > 0.9 drops f1
    assert kept(corr_threshold=round(r + 0.01, 2)) == ["f0", "f1", "f2", "f3"]
    assert kept(min_variance=1e-4) == ["f0", "f2"]  # f3's variance is ~1e-6


def test_aggregate_and_evaluate_call_hits_and_z_prime_on_an_infer_store_with_positive_controls(tmp_path):
    """A results store as infer writes it (create_results + write_well; analysis.source:
    results): aggregate tables the well scores beside the profiles, evaluate calls hits and
    Z' on both the profile distance and the scores, and writes the files outputs.md lists."""
    from rayscreen.analysis.stages import run_aggregate
    from rayscreen.infer.run import results_variables
    from rayscreen.store.results import create_results

    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P1", "P2"):
        for i in range(12):
            kind = "negative" if i < 6 else "positive" if i < 8 else ""
            compound = "DMSO" if i < 6 else "stauro" if i < 8 else f"c{i % 2}"
            rows.append({"plate": plate, "well": f"A{i + 1:02d}", "Metadata_Plate": plate,
                         "Metadata_Well": f"A{i + 1:02d}", "Metadata_Control": kind, "Metadata_Compound": compound,
                         "Metadata_Concentration": 0.0 if i < 6 else 1.0, "Metadata_MOA": {"DMSO": "", "stauro": "kinase"}.get(compound, f"m{i % 2}"),
                         "Metadata_Batch": plate})
    wells = pd.DataFrame(rows)
    sizes, variables = results_variables(n_fields=2, n_classes=2, n_features=4, saliency_shape=None)
    uri = str(tmp_path / "run" / "results.zarr")
    writer = create_results(uri, wells, sizes, variables, coords={"class": ["negative", "positive"]})
    for index, row in wells.iterrows():
        # positives: profiles far from the controls and a high phenotype score; c1 wells in
        # between; controls and c0 wells like the controls
        shift = {"positive": 6.0}.get(row["Metadata_Control"], 3.0 if row["Metadata_Compound"] == "c1" else 0.0)
        p = 0.9 if row["Metadata_Control"] == "positive" else 0.7 if row["Metadata_Compound"] == "c1" else 0.1
        p += 0.02 * rng.normal()
        profile = (shift + rng.normal(size=(2, 4))).astype(np.float32)
        values = {v.name: np.zeros([sizes[d] for d in v.dims[1:]], v.dtype) for v in variables}
        values.update(field_status=np.zeros(2, np.int8), field_profile=profile, well_profile=profile.mean(0),
                      well_scores=np.array([1 - p, p], np.float32), n_fields=np.int16(2))
        writer.write_well(index, values)
    writer.finalize()

    cfg = config(tmp_path, source="results", feature_select=[])
    tables = run_aggregate(cfg, progress=False)
    scores = pd.read_parquet(tables["well_scores"])
    assert len(scores) == 24 and {"score_negative", "score_positive", "Metadata_Control"} <= set(scores.columns)
    result = run_evaluate(cfg, progress=False)
    out = tmp_path / "run" / "evaluation"
    hits = pd.read_csv(out / "hits_score.csv")
    # the c1 wells (score 0.7 against controls at 0.1 +- 0.02) and no control
    assert sorted(set(hits["Metadata_Compound"])) == ["c1"] and len(hits) == result["n_hits_score"] == 4
    zp = pd.read_csv(out / "z_prime_score.csv")
    assert list(zp["Metadata_Plate"]) == ["P1", "P2"] and (zp["z_prime"] > 0.5).all()  # 0.8 apart, sd ~0.02
    assert (out / "z_prime.csv").exists() and len(result["z_prime"]) == 2  # of the profile distance


@pytest.mark.parametrize("fill_fields", [10_000, 7])
def test_qc_scores_the_screen_in_blocks_of_wells_as_one_classifier_over_all_fields(tmp_path, monkeypatch,
                                                                                    fill_fields):
    """run_qc fits on the annotated fields only and scores the others a block of wells at a
    time (here 2 wells): the flags and scores equal classify_artefacts over the whole field
    table, as run_qc computed them before, when the fill medians come from every field; with
    a sample of 7 fields for the medians only the fields with a missing value can differ."""
    import rayscreen.analysis.stages as stages
    import rayscreen.store.results
    from rayscreen.analysis.qc import classify_artefacts

    monkeypatch.setattr(rayscreen.store.results, "ResultsWriter", StandInWriter)
    monkeypatch.setattr(rayscreen.store.results, "READ_WELLS_PER_CHUNK", 2)
    monkeypatch.setattr(stages, "QC_FILL_FIELDS", fill_fields)
    rng = np.random.default_rng(1)
    wells = [f"P{p}/A{i + 1:02d}" for p in (1, 2) for i in range(7)]
    plates = [w.split("/")[0] for w in wells]
    features = rng.normal(size=(14, 3, 5)).astype(np.float32)
    bad = rng.random((14, 3)) < 0.3  # artefacts: shifted
    features[bad] += 2.5
    features[3, 1, 2] = features[9, 0, 4] = np.nan
    status = np.zeros((14, 3), np.int8)
    status[5, 2] = 1  # no such field
    ds = xr.Dataset({"field_profile": (("well", "field", "feature"), features),
                     "field_status": (("well", "field"), status)},
                    coords={"well": wells, "field": [0, 1, 2], "feature": [f"f{i}" for i in range(5)],
                            "plate": ("well", plates), "Metadata_Plate": ("well", plates),
                            "Metadata_Well": ("well", [w.split("/")[1] for w in wells])})
    wi, fi = np.nonzero(status == 0)
    missing = np.isnan(features[wi, fi]).any(axis=1)  # never annotated: the model is the same either way
    chosen = rng.choice(np.flatnonzero(~missing), 16, replace=False)
    csv = tmp_path / "qc.csv"
    csv.write_text("plate,well,field,label\n" + "".join(
        f"{wells[wi[i]].split('/')[0]},{wells[wi[i]].split('/')[1]},{fi[i]},{'abnormal' if bad[wi[i], fi[i]] else 'normal'}\n"
        for i in chosen))
    cfg = config(tmp_path, qc={"annotations": str(csv), "features": "deep", "method": "linear"})
    table, summary = stages.run_qc(ds, cfg, "unused")

    fields = stages.field_table(ds, "field_profile", "feature")  # every field in memory: the old path
    feats = [f"f{i}" for i in range(5)]
    fields[feats] = fields[feats].fillna(fields[feats].median()).fillna(0.0)
    expected = classify_artefacts(fields, stages.read_qc_annotations(cfg), method="linear", features=feats,
                                  label="label")
    assert summary["n_flagged"] == int(table["Metadata_QC_Abnormal"].sum()) > 0
    same = ~missing if fill_fields < len(wi) else np.ones(len(wi), bool)
    np.testing.assert_array_equal(table["Metadata_QC_Abnormal"].to_numpy()[same],
                                  expected.predictions["Metadata_QC_Abnormal"].to_numpy()[same])
    np.testing.assert_allclose(table["Metadata_QC_Score"].to_numpy()[same],
                               expected.predictions["Metadata_QC_Score"].to_numpy()[same], rtol=1e-6)
    assert summary["f1"] == expected.f1


def test_the_qc_fill_sample_takes_whole_blocks_of_wells_spread_over_the_screen(monkeypatch):
    import rayscreen.analysis.stages as stages

    wi = np.repeat(np.arange(100), 3)  # 100 wells x 3 usable fields
    assert len(stages._fill_sample(wi, 100, 10)) == 300  # under QC_FILL_FIELDS: every field
    monkeypatch.setattr(stages, "QC_FILL_FIELDS", 61)
    picked = stages._fill_sample(wi, 100, 10)
    blocks = sorted(set(wi[picked] // 10))
    assert blocks == [0, 4, 9] and len(picked) == 90  # first, last, middle block: 3 x 30 >= 61
    assert stages._spread(5) == [0, 4, 2, 1, 3]


def test_positive_controls_are_never_score_hits_whichever_column_marks_them(tmp_path):
    from rayscreen.analysis.stages import score_hits, score_table

    table = score_table(_scores_store()).rename(columns={"Metadata_Control": "Metadata_pert_type"})
    table["Metadata_pert_type"] = table["Metadata_pert_type"].replace({"negative": "negcon", "positive": "poscon"})
    # P2's positive controls (0.95, 0.97) are far above P2's controls: hits, if not excluded
    hits, zp = score_hits(table, config(tmp_path, control_column="Metadata_pert_type"))
    assert hits[["Metadata_Plate", "Metadata_Well"]].values.tolist() == [["P1", "A04"]]
    assert zp is not None and list(zp["class"]) == ["positive", "positive"]


def test_score_hits_that_cannot_be_called_leave_the_evaluation_and_stale_files_go(tmp_path, caplog):
    from rayscreen.analysis.stages import score_table

    treatment, wells = _tables(["A", "A", "B", "B"], ["a1", "a2", "b1", "b2"])
    _write_tables(tmp_path, treatment, wells)
    tables, out = tmp_path / "run" / "tables", tmp_path / "run" / "evaluation"
    score_table(_scores_store()).to_parquet(tables / "well_scores.parquet")
    assert run_evaluate(config(tmp_path), progress=False)["n_hits_score"] == 1
    assert (out / "hits_score.csv").exists()
    # the scores' plates without control wells (e.g. infer has not scored them yet)
    score_table(_scores_store()).assign(Metadata_Control="").to_parquet(tables / "well_scores.parquet")
    with caplog.at_level("WARNING", logger="rayscreen"):
        result = run_evaluate(config(tmp_path), progress=True)  # prints, without a score hit count
    assert "control" in result["score_hits_error"] and "no hits of the well scores" in caplog.text
    assert result["nsc"] is not None and json.loads((out / "evaluation.json").read_text())["score_hits_error"]
    assert not (out / "hits_score.csv").exists()  # the earlier run's, not shown as this one's
