"""Hit calling: z-scores, Z' and distance to controls on hand numbers."""

import numpy as np
import pandas as pd
import pytest

from rayscreen.analysis import call_hits, distance_to_controls, z_prime, zscore


def scores():
    # Per plate: negatives 1, 2, 3 (mean 2, sd 1), positives 10, 12, 14 (mean 12, sd 2),
    # treated wells 5 and 2. Plate P2 is P1 shifted by +100.
    rows = []
    for plate, offset in (("P1", 0.0), ("P2", 100.0)):
        for kind, values in (("negative", [1, 2, 3]), ("positive", [10, 12, 14]), ("", [5, 2])):
            for v in values:
                rows.append({"Metadata_Plate": plate, "Metadata_Well": f"W{len(rows):02d}",
                             "Metadata_Control": kind, "score": v + offset})
    return pd.DataFrame(rows)


def test_z_prime_by_hand():
    zp = z_prime(scores(), "score")
    # 1 - 3 (2 + 1) / |12 - 2| = 0.1
    assert zp["Metadata_Plate"].tolist() == ["P1", "P2"]
    np.testing.assert_allclose(zp["z_prime"], [0.1, 0.1])
    assert zp[["n_pos", "n_neg"]].to_numpy().tolist() == [[3, 3], [3, 3]]
    no_pos = scores().query("Metadata_Control != 'positive'")
    assert np.isnan(z_prime(no_pos, "score")["z_prime"]).all()


def test_zscore_against_negative_controls_per_plate():
    table = scores()
    z = zscore(table, "score")
    treated = table["Metadata_Control"] == ""
    assert z[treated].tolist() == [3.0, 0.0, 3.0, 0.0]  # (5 - 2) / 1, per plate
    assert z.name == "score_z"


def test_robust_zscore_ignores_an_outlier_control():
    table = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Control": [True] * 4 + [False],
                          "score": [1.0, 2.0, 3.0, 100.0, 5.0]})
    # median 2.5; |x - 2.5| = 1.5, .5, .5, 97.5 -> MAD 1 -> scale 1.4826
    z = zscore(table, "score", robust=True)
    assert z.iloc[-1] == pytest.approx(2.5 / 1.4826)
    # without controls marked all wells are the reference: median 3; |x - 3| = 2, 1, 0, 97, 2 -> MAD 2
    assert zscore(table.drop(columns="Metadata_Control"), "score", robust=True).iloc[-1] == pytest.approx(
        (5 - 3) / (1.4826 * 2))


def test_zero_spread_gives_nan_and_missing_controls_raise():
    table = pd.DataFrame({"Metadata_Plate": ["P1"] * 3, "Metadata_Control": [True, True, False],
                          "score": [1.0, 1.0, 4.0]})
    assert zscore(table, "score").isna().all()  # two controls: the caller's warning, not this one
    # three or more controls that agree (a discrete score): no z-score on the plate, named
    flat = pd.DataFrame({"Metadata_Plate": ["P1"] * 5 + ["P2"] * 4,
                         "Metadata_Control": [True, True, True, False, False, True, True, True, False],
                         "score": [1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 2.0, 3.0, 9.0]})
    with pytest.warns(UserWarning, match=r"plate\(s\) \['P1'\] do not spread \(MAD 0\).*cannot be hits"):
        z = zscore(flat, "score", robust=True)
    assert z[:5].isna().all() and z[5:].notna().all()
    table["Metadata_Plate"] = ["P1", "P1", "P2"]
    with pytest.raises(ValueError, match="plate 'P2'"):
        zscore(table, "score")


def test_call_hits_threshold_and_direction():
    table = scores()
    table.loc[len(table)] = {"Metadata_Plate": "P1", "Metadata_Well": "W99", "Metadata_Control": "", "score": -4.0}
    hits = call_hits(table, "score", threshold=3.0)
    # P1: 5 -> z 3, -4 -> z -6; P2: 105 -> z 3; positives are controls, never hits
    assert hits["Metadata_Well"].tolist() == ["W99", "W06", "W14"]
    assert hits["score_z"].tolist() == [-6.0, 3.0, 3.0]
    assert call_hits(table, "score", direction="up")["Metadata_Well"].tolist() == ["W06", "W14"]
    assert call_hits(table, "score", direction="down")["Metadata_Well"].tolist() == ["W99"]


def test_distance_to_controls():
    table = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": ["A", "B", "C", "D"],
                          "Metadata_Control": [True, True, True, False],
                          "f0": [1.0, 1.0, 1.0, 0.0], "f1": [0.1, 0.0, -0.1, 2.0]})
    out = distance_to_controls(table)
    # control mean (1, 0): cosine distance of D = 1 - 0 = 1
    assert out["distance"].iloc[-1] == pytest.approx(1.0)
    assert out["distance_z"].iloc[-1] > 10
    euclid = distance_to_controls(table, metric="euclidean")
    # a control against the mean of the other two: A to (1, -0.05), B to (1, 0), C to (1, 0.05);
    # D against all three, (1, 0)
    assert euclid["distance"].tolist() == pytest.approx([0.15, 0.0, 0.15, np.sqrt(5)])
    assert list(out.columns[:3]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Control"]


def _null_plate(seed, n_controls=8, n_wells=300, n_features=100):
    """One plate whose wells are all drawn like its controls: nothing is a hit."""
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(rng.normal(size=(n_controls + n_wells, n_features)),
                         columns=[f"f{i}" for i in range(n_features)])
    table.insert(0, "Metadata_Control", [True] * n_controls + [False] * n_wells)
    table.insert(0, "Metadata_Well", [f"W{i:03d}" for i in range(len(table))])
    table.insert(0, "Metadata_Plate", "P1")
    return table


def test_distance_z_of_wells_like_the_controls_is_centred_on_zero():
    """Measured against a mean that includes it, a control looks closer than a new well: the
    z-scores of inactive wells were biased upwards (median z 1.1-6.7 on these plates, which
    made hits of 0-82% of them). Leave-one-out control distances remove the bias."""
    medians = []
    for seed in range(5):
        table = _null_plate(seed)
        out = distance_to_controls(table, robust=True, metric="euclidean")
        medians.append(np.median(out["distance_z"][~table["Metadata_Control"]]))
    assert abs(np.mean(medians)) < 0.75, medians


def test_call_hits_never_reports_the_controls_it_was_given():
    table = pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Compound": ["DMSO"] * 4 + ["a", "b"],
                          "score": [0.0, 1.0, -1.0, 50.0, 0.5, 40.0]})
    hits = call_hits(table, "score", controls="Metadata_Compound == 'DMSO'", direction="up", robust=True)
    assert hits["Metadata_Compound"].tolist() == ["b"]  # the DMSO well at 50 is a control, not a hit


def test_distance_to_controls_keeps_a_plate_column_outside_metadata():
    table = pd.DataFrame({"plate": ["P1"] * 4, "Metadata_Control": [True, True, True, False],
                          "f0": [1.0, 1.1, 0.9, 3.0]})
    out = distance_to_controls(table, plate_column="plate", metric="euclidean")
    assert out["plate"].tolist() == ["P1"] * 4 and np.isfinite(out["distance_z"]).all()


def test_a_well_missing_a_feature_keeps_its_distance_and_its_hit():
    rng = np.random.default_rng(0)
    n, f = 12, 20
    table = pd.DataFrame(rng.normal(size=(n, f)), columns=[f"f{i}" for i in range(f)])
    table.insert(0, "Metadata_Plate", "P1")
    table.insert(1, "Metadata_Well", [f"A{i + 1:02d}" for i in range(n)])
    table.insert(2, "Metadata_Control", ["negative"] * 8 + [""] * 4)
    table.loc[10, "f0":"f19"] += 8.0  # a strong phenotype
    complete = distance_to_controls(table, metric="euclidean")
    table.loc[10, "f3"] = np.nan  # one of its 20 features missing
    missing = distance_to_controls(table, metric="euclidean")
    assert np.isfinite(missing["distance"]).all()
    assert missing.loc[10, "distance"] == pytest.approx(complete.loc[10, "distance"], rel=0.1)
    assert "A11" in set(call_hits(missing, "distance", threshold=3.0, direction="up")["Metadata_Well"])
    table.loc[10, "f0":"f19"] = np.nan  # nothing to measure: no distance
    assert np.isnan(distance_to_controls(table, metric="euclidean").loc[10, "distance"])


@pytest.mark.parametrize("method", ["standardize", "robust_mad"])
def test_wells_like_the_controls_are_not_hits_once_each_control_is_normalised_without_itself(method):
    """A normaliser fitted on a plate's controls makes those controls look closer to their
    centre than any new well, so wells drawn exactly like the controls got z >= 3 (8 controls
    per plate, 100 features: 15-40% of them). Each control normalised by a
    normaliser fitted on the other controls gives a null like a new well's: few hits."""
    import warnings

    from rayscreen.analysis.normalize import normalize

    rng = np.random.default_rng(1)
    n_controls, n_wells, n_features = 8, 300, 100
    plates = []
    for plate in range(4):
        X = rng.normal(size=(n_controls + n_wells, n_features)) * rng.uniform(0.5, 3, n_features) \
            + rng.normal(size=n_features)  # features of different scales and offsets, as raw profiles
        table = pd.DataFrame(X, columns=[f"f{i}" for i in range(n_features)])
        table.insert(0, "Metadata_Plate", f"P{plate}")
        table.insert(1, "Metadata_Control", ["negative"] * n_controls + [""] * n_wells)
        plates.append(table)
    table = pd.concat(plates, ignore_index=True)
    controls = (table["Metadata_Control"] == "negative").to_numpy()

    def hit_rate(distances):
        hits = call_hits(distances, "distance", threshold=3, direction="up", controls=controls, robust=True)
        return len(hits) / (~controls).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted_on_all = distance_to_controls(normalize(table, method, controls=controls), controls=controls,
                                             robust=True, metric="euclidean")
        refitted = distance_to_controls(table, controls=controls, robust=True, metric="euclidean", normalize=method)
    assert hit_rate(fitted_on_all) > 0.1  # z >= 3 of a normal null: 0.1%
    assert hit_rate(refitted) < 0.05
    # the wells' own distances are the same either way: only the controls' null changed
    wells = ~controls
    np.testing.assert_allclose(refitted["distance"].to_numpy()[wells], fitted_on_all["distance"].to_numpy()[wells])


def test_control_words_of_the_usual_annotations_are_read():
    """Controls as platemaps write them: a bool, 1/0, 'negative'/'positive', 'neg'/'pos', and
    JUMP-CP's control_type 'negcon'/'poscon'; 'trt', blanks and NaN are treatments."""
    from rayscreen.analysis._table import control_mask

    table = pd.DataFrame({"Metadata_Control": [True, 1.0, "negative", "NEG", "negcon", "poscon", "Positive",
                                               "trt", "", np.nan, False, 0]})
    assert control_mask(table, kind="negative").tolist() == [True] * 5 + [False] * 7
    assert control_mask(table, kind="positive").tolist() == [False] * 5 + [True, True] + [False] * 5
