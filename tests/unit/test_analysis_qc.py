"""QC: image metrics on known images; artefact classifier on synthetic embeddings."""

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from rayscreen.analysis import (classify_artefacts, cross_validate_artefacts, field_qc, foreground,
                                intensity_percentiles, laplacian_variance, power_spectrum_slope,
                                saturation_fraction)


def test_laplacian_variance_of_a_point():
    image = np.zeros((5, 5))
    image[2, 2] = 1.0
    # Laplacian: -4 at the point, +1 at its 4 neighbours, 0 elsewhere (25 pixels):
    # mean 0, variance (16 + 4 * 1) / 25
    assert laplacian_variance(image) == pytest.approx(20 / 25)
    assert laplacian_variance(np.full((8, 8), 7.0)) == 0.0


def textured(seed=0, shape=(128, 128)):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 1.0)
    return image / image.max()


def test_blur_lowers_focus_scores():
    sharp = textured()
    blurred = ndimage.gaussian_filter(sharp, 3.0)
    assert laplacian_variance(blurred) < 0.1 * laplacian_variance(sharp)
    assert power_spectrum_slope(blurred) < power_spectrum_slope(sharp) - 1
    assert np.isnan(power_spectrum_slope(np.ones((16, 16))))


def test_blur_lowers_the_spectrum_slope_above_a_noise_floor():
    """Camera noise is flat in frequency: over the upper half of the spectrum it is all there
    is, so a slope fitted up to 1/2 of the field rose back towards 0 as blur grew (a badly
    blurred field scored sharper). Fitted to 1/8, as CellProfiler does, it keeps falling."""
    rng = np.random.default_rng(0)
    cells = np.zeros((256, 256))
    cells[tuple(rng.integers(8, 248, (2, 40)))] = 1.0
    cells = ndimage.gaussian_filter(cells, 3.0)
    cells *= 1000 / cells.max()
    noise = rng.normal(0, 10, cells.shape)
    slopes = [power_spectrum_slope(ndimage.gaussian_filter(cells, b) + noise) for b in (0, 2, 4, 8)]
    assert all(a > b for a, b in zip(slopes, slopes[1:])), slopes


def test_saturation_fraction_exact():
    image = np.zeros((10, 10), dtype=np.uint8)
    image.flat[:7] = 255
    assert saturation_fraction(image) == 0.07
    image16 = np.full((4, 5), 100, dtype=np.uint16)
    image16[0, :3] = 4095  # a 12-bit camera in a uint16 array
    assert saturation_fraction(image16) == 0.0
    assert saturation_fraction(image16, max_value=4095) == 3 / 20
    assert saturation_fraction(np.array([[0.5, 1.0], [1.0, 0.2]])) == 0.5  # float: the image maximum


def test_percentiles():
    image = np.arange(101, dtype=np.uint16).reshape(1, 101)
    assert intensity_percentiles(image) == {1.0: 1.0, 50.0: 50.0, 99.0: 99.0}


def cells(seed=0, shape=(96, 96), n=12, noise=5.0):
    """Bright discs (radius 5) on a noisy background of 100: a field with cells."""
    rng = np.random.default_rng(seed)
    image = 100 + noise * rng.normal(size=shape)
    yy, xx = np.indices(shape)
    for cy, cx in rng.integers(8, shape[0] - 8, size=(n, 2)):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] += 200
    return image


def test_foreground_tells_cells_from_empty_fields():
    frac, contrast = foreground(cells())
    assert 0.05 < frac < 0.4 and contrast > 20
    rng = np.random.default_rng(1)
    frac, contrast = foreground(100 + 5 * rng.normal(size=(96, 96)))  # empty: noise only
    assert contrast < 3
    assert foreground(np.full((8, 8), 3.0)) == (0.0, 0.0)


def test_field_qc_flat_dict():
    rng = np.random.default_rng(2)
    field = np.stack([cells(), 100 + 5 * rng.normal(size=(96, 96))]).astype(np.uint16)
    qc = field_qc(field)
    expected = {f"qc_{m}_c{c}" for c in (0, 1) for m in
                ("focus_lapvar", "focus_pslope", "focus_ratio", "saturation", "p1", "p50", "p99", "max_ratio",
                 "p99_ratio", "foreground", "contrast", "empty")}
    assert set(qc) == expected | {"qc_corr_c01", "qc_empty"}
    from rayscreen.profile.image_qc import qc_metric_names
    assert list(qc) == qc_metric_names(2)
    assert all(isinstance(v, float) for v in qc.values())
    assert qc["qc_empty_c0"] == 0.0 and qc["qc_empty_c1"] == 1.0 and qc["qc_empty"] == 0.0
    with pytest.raises(ValueError, match=r"\(C, Y, X\)"):
        field_qc(field[0])


def embeddings(n=120, d=16, shift=4.0, seed=0):
    rng = np.random.default_rng(seed)
    abnormal = np.arange(n) % 3 == 0
    X = rng.normal(size=(n, d))
    X[abnormal, :4] += shift
    table = pd.DataFrame(X, columns=[f"e{i}" for i in range(d)])
    table.insert(0, "Metadata_Plate", "P1")
    table.insert(1, "Metadata_Well", [f"W{i // 4:03d}" for i in range(n)])
    table.insert(2, "Metadata_Field", [str(i % 4) for i in range(n)])
    return table, abnormal


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_classifier_learns_separable_artefacts_and_flags_every_field(method):
    table, abnormal = embeddings()
    annotated = table.iloc[:60][["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].copy()
    annotated["Metadata_QC"] = np.where(abnormal[:60], "abnormal", "normal")
    result = classify_artefacts(table, annotated, method=method)
    assert result.warnings == [] and result.n_annotated == 60 and result.n_splits == 5
    assert result.f1 > 0.9 and result.accuracy > 0.9 and result.roc_auc > 0.95
    assert len(result.predictions) == 120
    # fields never annotated are flagged too, and mostly right
    assert (result.predictions["Metadata_QC_Abnormal"].to_numpy()[60:] == abnormal[60:]).mean() > 0.9
    # an annotated field is flagged as annotated, whatever the model says of it
    assert (result.predictions["Metadata_QC_Abnormal"].to_numpy()[:60] == abnormal[:60]).all()
    assert result.to_dict()["n_flagged"] == int(result.predictions["Metadata_QC_Abnormal"].sum())


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_random_labels_give_chance(method):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 16))
    y = rng.integers(0, 2, size=300)
    metrics = cross_validate_artefacts(X, y, method=method)
    assert 0.35 < metrics["roc_auc"] < 0.65
    assert 0.35 < metrics["accuracy"] < 0.65


def test_too_few_annotations_are_reported():
    table, abnormal = embeddings(n=20)
    annotated = table.iloc[:5][["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].copy()
    annotated["Metadata_QC"] = ["abnormal", "normal", "normal", "normal", "normal"]
    result = classify_artefacts(table, annotated)
    assert result.f1 is None and any("at least 2" in w for w in result.warnings)
    assert result.predictions["Metadata_QC_Score"].notna().all()  # still trained on what there is
    with pytest.raises(ValueError, match="Metadata_QC"):
        classify_artefacts(table, annotated.drop(columns="Metadata_QC"))


def test_focus_ratio_is_scale_free_and_drops_with_blur():
    from scipy import ndimage

    from rayscreen.profile.image_qc import focus_ratio

    sharp = cells()
    assert focus_ratio(sharp * 7.0) == pytest.approx(focus_ratio(sharp))  # gain does not count
    assert focus_ratio(ndimage.gaussian_filter(sharp, 3)) < focus_ratio(sharp) - 1.0
    assert np.isnan(focus_ratio(np.full((8, 8), 2.0)))


def test_peak_ratios_and_channel_correlations_by_hand():
    from rayscreen.profile.image_qc import channel_correlations, peak_ratios

    plane = np.full((10, 10), 9, np.uint16)
    plane[0, 0] = 99  # one bright pixel: max / p50 = 100 / 10; p99 is still 9 (+1) -> ratio 1
    mx, p99 = peak_ratios(plane)
    assert mx == pytest.approx(np.log(10.0)) and p99 == pytest.approx(np.log(10.0 / 10.0), abs=0.2)
    a = np.arange(16.0).reshape(4, 4)
    r = channel_correlations(np.stack([a, 2 * a + 1, -a, np.ones((4, 4))]))
    assert r[(0, 1)] == pytest.approx(1.0) and r[(0, 2)] == pytest.approx(-1.0) and r[(0, 3)] == 0.0


def test_qc_embedding_logs_focus_drops_flags_fills_nan():
    from rayscreen.analysis.qc import qc_embedding

    t = pd.DataFrame({"Metadata_Well": ["A", "B", "C"], "qc_focus_lapvar_c0": [1.0, np.e, np.e ** 2],
                      "qc_p50_c0": [1.0, np.nan, 3.0], "qc_empty_c0": [0.0, 1.0, 0.0], "qc_empty": [0.0, 1.0, 0.0]})
    e = qc_embedding(t)
    assert list(e.columns) == ["qc_focus_lapvar_c0", "qc_p50_c0"]
    np.testing.assert_allclose(e["qc_focus_lapvar_c0"], [0, 1, 2], atol=1e-9)
    np.testing.assert_allclose(e["qc_p50_c0"], [1, 2, 3])  # NaN -> the median of the others


def test_outlier_score_per_group_and_suggested_annotations():
    from rayscreen.analysis.qc import outlier_score, suggest_annotations

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    X[20:] = X[20:] * 5 + 100  # a second plate with another gain and offset: not outliers
    X[[3, 30]] += [0, 0, 60]   # one artefact per plate, far out on one metric
    score = outlier_score(pd.DataFrame(X), groups=[0] * 20 + [1] * 20)
    assert set(np.argsort(-score)[:2]) == {3, 30}
    assert outlier_score(pd.DataFrame(X)).argmax() != 3  # without groups the plate shift dominates
    idx = suggest_annotations(score, n_outliers=2, n_random=5, seed=1)
    assert list(idx[:2]) == list(np.argsort(-score)[:2]) and len(set(idx)) == 7
    assert not set(idx[2:]) & {3, 30}


def _annotated(labels):
    """The embeddings of :func:`embeddings` and its first len(labels) fields annotated with
    ``labels`` (a list or a Series: its dtype is kept, as read_csv would have typed it)."""
    table, abnormal = embeddings()
    annotated = table.iloc[:len(labels)][["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].copy()
    annotated["Metadata_QC"] = pd.Series(labels).to_numpy() if isinstance(labels, pd.Series) else \
        pd.Series(list(labels), index=annotated.index, dtype=object)
    return table, annotated, abnormal


@pytest.mark.parametrize("encode", [
    lambda a: pd.Series(a),                                              # True/False (bool)
    lambda a: pd.Series(a.astype(int)),                                  # 0/1 (int64)
    lambda a: pd.Series(np.where(a, "1", "0")),                          # "1"/"0"
    lambda a: pd.Series(np.where(a, " Artefact", "NORMAL ")),            # words, any case, padded
    lambda a: pd.Series(np.where(a, "artifact", "false")),
], ids=["bool", "int01", "str01", "words", "artifact"])
def test_labels_are_read_whatever_way_they_are_written(encode):
    """0/1 labels used to be compared with the string "abnormal": every field normal, no classifier."""
    table, annotated, abnormal = _annotated(encode(embeddings()[1][:60]))
    result = classify_artefacts(table, annotated)
    assert result.n_annotated == 60 and result.f1 > 0.9 and result.warnings == []


def test_blank_labels_are_left_out_with_a_warning_not_read_as_normal():
    # True/False with one blank (what read_csv gives for a column with an empty cell: object
    # dtype) used to be read as all normal; 1.0/0.0/NaN is the same column as numbers
    _, _, abnormal = _annotated([])
    labels = [bool(x) for x in abnormal[:60]]
    labels[0] = None  # field 0 is abnormal: read as "normal" before
    table, annotated, _ = _annotated(labels)
    with pytest.warns(UserWarning, match=r"1 annotated field\(s\) without a 'Metadata_QC' label"):
        result = classify_artefacts(table, annotated)
    assert result.n_annotated == 59 and result.f1 > 0.9
    assert any("without a 'Metadata_QC' label" in w for w in result.warnings)
    floats = annotated.assign(Metadata_QC=[np.nan] + [float(x) for x in abnormal[1:60]])
    with pytest.warns(UserWarning, match="1 annotated field"):
        assert classify_artefacts(table, floats).n_annotated == 59


def test_unknown_labels_are_an_error_naming_the_file_column_and_values():
    _, _, abnormal = _annotated([])
    labels = list(np.where(abnormal[:60], "abnormal", "normal"))
    labels[3], labels[4] = "abnormall", "blurry"  # a typo and another vocabulary: not "normal"
    table, annotated, _ = _annotated(labels)
    with pytest.raises(ValueError, match=r"column 'Metadata_QC'.*'abnormall' \(1x\), 'blurry' \(1x\)"):
        classify_artefacts(table, annotated)  # read as normal before
    with pytest.raises(ValueError, match=r"^qc\.csv: column 'Metadata_QC'"):
        classify_artefacts(table, annotated, source="qc.csv")
    from rayscreen.analysis.qc import artefact_labels

    y, missing = artefact_labels(pd.Series([True, "1", 1.0, " Abnormal", "bad", False, "0", 0, "Normal", "", None]),
                                 abnormal="bad")
    assert y.tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert missing.tolist() == [False] * 9 + [True, True]


def test_numeric_plate_names_match_whatever_their_dtype_and_unmatched_fields_are_named():
    # the store's plates are str; a CSV of plates named 1001 reads as int64 (float64 with a
    # blank), and the field as int where the table has str: merging used to raise
    n = 12
    emb = pd.DataFrame({"Metadata_Plate": ["1001"] * n, "Metadata_Well": [f"A{i:02d}" for i in range(n)],
                        "Metadata_Field": [str(i % 2) for i in range(n)],
                        "e": np.r_[np.full(4, 5.0), np.zeros(8)] + np.linspace(0, 0.1, n)})
    ann = pd.DataFrame({"Metadata_Plate": [1001] * (n + 1), "Metadata_Well": [f"A{i:02d}" for i in range(n)] + ["Z99"],
                        "Metadata_Field": [i % 2 for i in range(n)] + [0],
                        "Metadata_QC": ["abnormal"] * 4 + ["normal"] * 8 + ["normal"]})
    with pytest.warns(UserWarning, match=r"1 annotated field\(s\) not found.*\['1001/Z99/0'\]"):
        result = classify_artefacts(emb, ann)
    assert result.n_annotated == 12 and result.f1 == 1.0
    assert any("1001/Z99/0" in w for w in result.warnings)
    # float64 plates (a column with a blank elsewhere) match too: 1001.0 -> "1001"
    floats = ann.iloc[:n].assign(Metadata_Plate=1001.0)
    assert classify_artefacts(emb, floats).n_annotated == 12


def well_embeddings(n_wells=40, fields=4, seed=0):
    """Fields of a well are near copies of each other (the well's own look), labels are
    per well and unrelated to the look: nothing to learn, except which well a field is from."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(n_wells, 8))
    X = np.repeat(centre, fields, axis=0) + 0.05 * rng.normal(size=(n_wells * fields, 8))
    table = pd.DataFrame(X, columns=[f"e{i}" for i in range(8)])
    table.insert(0, "Metadata_Plate", "P1")
    table.insert(1, "Metadata_Well", np.repeat([f"W{i:02d}" for i in range(n_wells)], fields))
    table.insert(2, "Metadata_Field", np.tile(np.arange(fields), n_wells))
    abnormal = np.repeat(rng.permutation(n_wells) < n_wells // 2, fields)
    annotations = table[["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].assign(Metadata_QC=abnormal)
    return table, annotations, abnormal


def test_cross_validation_keeps_the_fields_of_a_well_together():
    table, annotations, abnormal = well_embeddings()
    X = table[[f"e{i}" for i in range(8)]].to_numpy()
    # folds over fields: kNN finds the query's own well in training and looks good
    leaky = cross_validate_artefacts(X, abnormal)
    assert leaky["roc_auc"] > 0.85  # 0.89
    result = classify_artefacts(table, annotations)
    assert result.roc_auc < 0.6  # 0.46: chance, as it should be
    assert result.cv_groups == "well" and result.n_splits == 5 and result.warnings == []
    assert result.to_dict()["cv_groups"] == "well" and not leaky["grouped"]
    grouped = cross_validate_artefacts(X, abnormal, groups=table["Metadata_Well"])
    assert grouped["grouped"] and grouped["roc_auc"] == pytest.approx(result.roc_auc)


def test_too_few_wells_for_grouped_folds_fall_back_to_fields_with_a_warning():
    table, annotations, _ = well_embeddings(n_wells=6)
    # every abnormal field in one well: no 2 grouped folds can both hold an abnormal field
    annotations["Metadata_QC"] = annotations["Metadata_Well"] == "W00"
    with pytest.warns(UserWarning, match=r"over fields, not wells.*1 with abnormal, 5 with normal"):
        result = classify_artefacts(table, annotations)
    assert result.cv_groups == "field" and result.n_splits == 4 and result.f1 is not None
    assert any("not wells" in w for w in result.warnings)
    # without plate and well columns the folds are over fields, as asked, without a warning
    no_wells = table.rename(columns={"Metadata_Well": "Metadata_Site"})
    result = classify_artefacts(no_wells, annotations.rename(columns={"Metadata_Well": "Metadata_Site"}),
                                key=["Metadata_Plate", "Metadata_Site", "Metadata_Field"])
    assert result.cv_groups == "field" and result.warnings == []


def test_a_noiseless_background_leaves_the_contrast_undefined_and_the_embedding_finite():
    from rayscreen.analysis import qc_embedding

    image = np.zeros((32, 32))
    image[8:16, 8:16] = 100.0  # a cell on a perfectly flat background
    fraction, contrast = foreground(image)
    assert fraction > 0 and np.isnan(contrast)
    table = pd.DataFrame({"Metadata_Field": ["0", "1", "2"], "qc_contrast": [contrast, 3.0, np.inf],
                          "qc_lapvar": [1.0, 2.0, 3.0]})
    embedded = qc_embedding(table)
    assert np.isfinite(embedded.to_numpy()).all() and embedded["qc_contrast"].tolist() == [3.0, 3.0, 3.0]


def test_a_field_annotated_abnormal_among_normal_neighbours_is_flagged():
    """A person marked a field abnormal that looks normal to the embedding (an artefact the
    features miss): the classifier calls it normal, but its annotation stands, so the field
    is kept out of its well's profile."""
    table, abnormal = embeddings()
    annotated = table.iloc[:60][["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].copy()
    labels = np.where(abnormal[:60], "abnormal", "normal")
    odd = int(np.flatnonzero(~abnormal[:60])[0])
    labels[odd] = "abnormal"
    annotated["Metadata_QC"] = labels
    result = classify_artefacts(table, annotated, method="knn")
    assert result.predictions["Metadata_QC_Score"].iloc[odd] < 0.5  # the model: normal
    assert bool(result.predictions["Metadata_QC_Abnormal"].iloc[odd])
