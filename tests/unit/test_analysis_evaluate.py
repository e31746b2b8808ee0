"""MOA evaluation: NSC / NSCB / mAP on a toy worked out by hand, copairs agreement, bad input."""

import numpy as np
import pandas as pd
import pytest

from rayscreen.analysis import average_precision, evaluate_moa, mean_average_precision, nsc_accuracy, nscb_accuracy


def toy():
    """Five treatments of four compounds, two MOAs, plus a DMSO control row.

    Cosine similarities (by hand, 3 decimals) between the treatments p1..p5:
        p1 (1, 0)     A c1 batch1     p1-p3 .981  p1-p5 .874  p1-p4 0
        p2 (1, .1)    A c1 batch2     p2-p3 .995  p2-p5 .918  p2-p4 .100
        p3 (1, .2)    A c2 batch2     p3-p5 .952  p3-p4 .196
        p4 (0, 1)     B c3 batch1     p4-p5 .486
        p5 (.9, .5)   B c4 batch2
    NSC (other compounds only): p1->p3 A ok, p2->p3 A ok, p3->p2 A ok, p4->p5 B ok,
        p5->p3 A wrong: 4/5. (p1's closest overall is p2, its own compound: left out.)
    NSCB (other compound and batch): p1->p3 ok, p3->p1 ok, p4->p5 ok, p5->p1 wrong: 3/4.
        p2 (c1, b2) is left out: the only other-compound reference in b1 is p4, of MOA B,
        so it has no right answer (it was counted as a miss, p2->p4, before 2026-11-27).
    AP over other compounds: p1..p4 rank a same-MOA reference first (AP 1); p5 ranks
        p3, p2, p1 (all A) before p4: AP 1/4. mAP = 4.25 / 5 = 0.85.
    The DMSO row (.1, 1) would be p4's nearest neighbour if it were a reference.
    """
    return pd.DataFrame({
        "Metadata_Compound": ["c1", "c1", "c2", "c3", "c4", "DMSO"],
        "Metadata_Concentration": [1.0, 10.0, 1.0, 1.0, 1.0, 0.0],
        "Metadata_MOA": ["A", "A", "A", "B", "B", "DMSO"],
        "Metadata_Batch": ["b1", "b2", "b2", "b1", "b2", "b1"],
        "Metadata_Control": [False, False, False, False, False, True],
        "f0": [1.0, 1.0, 1.0, 0.0, 0.9, 0.1],
        "f1": [0.0, 0.1, 0.2, 1.0, 0.5, 1.0],
    })


def test_toy_by_hand():
    result = evaluate_moa(toy())
    assert result.nsc == pytest.approx(4 / 5)
    assert result.nscb == pytest.approx(3 / 4)
    assert result.map == pytest.approx(0.85)
    assert result.n_queries == 5 and result.n_queries_nscb == 4
    assert result.warnings == ["1 query(ies) of MOA(s) ['A'] have no compound of their MOA in another batch; "
                               "left out of NSCB (no right answer)"]
    assert result.per_moa.loc["A", "nsc"] == 1.0 and result.per_moa.loc["B", "nsc"] == 0.5
    assert result.per_moa.loc["B", "map"] == pytest.approx((1 + 0.25) / 2)
    assert result.per_moa["n_compounds"].tolist() == [2, 2]
    assert result.confusion.loc["A"].tolist() == [3, 0]
    assert result.confusion.loc["B"].tolist() == [1, 1]  # p5 taken for A
    # NSCB by MOA (from the docstring): A p1 ok, p3 ok (p2 left out): 2/2; B p4 ok, p5 -> p1 wrong: 1/2
    assert result.per_moa.loc["A", "nscb"] == 1.0 and result.per_moa.loc["B", "nscb"] == 0.5
    assert result.per_moa["n_queries"].tolist() == [3, 2]
    # its confusion counts the 4 NSCB queries, not NSC's 5: A row p1, p3 -> A; B row p5 -> A, p4 -> B
    assert result.confusion_nscb.loc["A"].tolist() == [2, 0]
    assert result.confusion_nscb.loc["B"].tolist() == [1, 1]
    assert result.predictions["nscb_prediction"].tolist() == ["A", None, "A", "B", "A"]
    assert result.predictions["nsc_neighbor"].tolist() == [2, 2, 1, 4, 2]  # index labels
    assert result.predictions["nscb_neighbor"].tolist() == [2, None, 0, 4, 0]
    d = result.to_dict()
    assert d["nsc"] == pytest.approx(0.8) and d["confusion"]["B"] == {"A": 1, "B": 1}
    assert d["per_moa"]["A"]["n_compounds"] == 2 and isinstance(d["per_moa"]["A"]["n_compounds"], int)


@pytest.mark.parametrize("blank", ["", " ", "nan", "None", np.nan])
def test_treatments_without_a_moa_or_compound_are_left_out_not_made_a_class(blank):
    """The results store writes a missing annotation as ""; a screen's unannotated compounds
    must not become one large MOA named "" that every query can match."""
    table = toy()
    extra = pd.DataFrame({"Metadata_Compound": ["u1", "u2", "u3", blank], "Metadata_Concentration": 1.0,
                          "Metadata_MOA": [blank, blank, blank, "A"], "Metadata_Batch": "b1",
                          "Metadata_Control": False, "f0": [0.9, 0.95, 1.0, 1.0], "f1": [0.55, 0.45, 0.0, 0.05]})
    result = evaluate_moa(pd.concat([table, extra], ignore_index=True))
    assert result.nsc == pytest.approx(4 / 5) and result.map == pytest.approx(0.85)  # the toy's own figures
    assert sorted(result.per_moa.index) == ["A", "B"]
    assert any("3 non-control row(s) without a Metadata_MOA" in w for w in result.warnings)
    assert any("1 non-control row(s) without a Metadata_Compound" in w for w in result.warnings)


def test_nscb_leaves_out_queries_whose_moa_has_no_compound_in_another_batch():
    """The toy with p5 (c4) moved to batch b1: MOA B's two compounds now sit in b1 only, and
    p2 (c1, b2) finds no other A compound in b1. Under NSCB these three queries have no right
    answer (their nearest allowed neighbours are all of the other MOA), so, as Ando et al.
    do for BBBC021's one-batch MOAs, they are left out rather than counted wrong: p1 -> p3 and
    p3 -> p1 are right, NSCB 2/2 (it would read 2/5 with them counted)."""
    table = toy()
    table.loc[4, "Metadata_Batch"] = "b1"
    result = evaluate_moa(table)
    assert result.nscb == pytest.approx(1.0) and result.n_queries_nscb == 2
    assert result.predictions["nscb_neighbor"].tolist()[0] == 2 and result.predictions["nscb_neighbor"].tolist()[2] == 0
    assert result.predictions["nscb_correct"].isna().tolist() == [False, True, False, True, True]
    assert any("3 query(ies) of MOA(s) ['A', 'B'] have no compound of their MOA in another batch" in w
               for w in result.warnings)
    assert result.nsc == pytest.approx(evaluate_moa(toy()).nsc)  # batches do not enter NSC
    # by MOA: NSCB A 2/2, B no query scored (NaN), while NSC's B is 1/2 (p4 ok, p5 wrong)
    assert result.per_moa.loc["A", "nscb"] == 1.0 and np.isnan(result.per_moa.loc["B", "nscb"])
    assert result.per_moa.loc["B", "nsc"] == 0.5
    assert result.confusion_nscb.loc["A"].tolist() == [2, 0] and result.confusion_nscb.loc["B"].tolist() == [0, 0]


def test_shortcuts_and_metric():
    assert nsc_accuracy(toy()) == pytest.approx(0.8)
    assert nscb_accuracy(toy()) == pytest.approx(0.75)
    assert mean_average_precision(toy()) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="Metadata_Plate"):
        nscb_accuracy(toy(), batch="Metadata_Plate")
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate_moa(toy(), metric="euclidean")


def toy3():
    """The toy's treatments and batches with three features, for metric="correlation" (the
    2-D toy's Pearson correlations are all +-1 in exact arithmetic: its rankings are ties
    broken by rounding, nothing to derive by hand).

    Centred rows (row minus its mean; Pearson r = cosine of these), squared norms:
        p1 (2, 5, 5) -> (-2, 1, 1)  6    A c1 b1
        p2 (1, 3, 5) -> (-2, 0, 2)  8    A c1 b2
        p3 (2, 6, 1) -> (-1, 3, -2) 14   A c2 b2
        p4 (5, 6, 1) -> (1, 2, -3)  14   B c3 b1
        p5 (6, 3, 6) -> (1, -2, 1)  6    B c4 b2
    r: p1p3 3/sqrt(84) .327, p1p4 -.327, p1p5 -3/6 -.5, p2p3 -2/sqrt(112) -.189, p2p4 -8/sqrt(112) -.756,
       p2p5 0, p3p4 11/14 .786, p3p5 -9/sqrt(84) -.982, p4p5 -6/sqrt(84) -.655 (p1p2 same compound).
    NSC: p1->p3 A ok, p2->p5 B no, p3->p4 B no, p4->p3 A no, p5->p2 A no: 1/5.
    NSCB (other batch too): p1->p3 ok, p2 left out (as in the toy), p3->p4 no, p4->p3 no,
        p5->p1 no: 1/4.
    AP: p1 1 (p3 first); p2 1/2 (p5, then p3); p3 (1/2 + 2/3)/2 = 7/12 (p4, p1, p2, p5);
        p4 1/3 (p3, p1, p5); p5 1/3 (p2, p1, p4): mAP = (12 + 6 + 7 + 4 + 4) / 12 / 5 = 0.55.
    Cosine of the uncentred rows answers otherwise: cos p1p3 39/sqrt(54*41) .829, p1p4 .778,
        p1p5 57/sqrt(54*81) .862, p2p3 .660, p2p4 .601, p2p5 .845, p3p4 47/sqrt(41*62) .932, p3p5 .625,
        p4p5 .762. NSC p1->p5, p2->p5, p3->p4, p4->p3, p5->p1: 0/5; NSCB p1->p5, p3->p4, p4->p3,
        p5->p1: 0/4; AP 1/2, 1/2, 7/12, 1/3, 1/3: mAP 27/60 = 0.45.
    """
    table = toy().drop(columns=["f0", "f1"])
    features = [[2, 5, 5], [1, 3, 5], [2, 6, 1], [5, 6, 1], [6, 3, 6], [1, 2, 3]]
    for j in range(3):
        table[f"f{j}"] = [float(row[j]) for row in features]
    return table


def test_correlation_metric_by_hand():
    result = evaluate_moa(toy3(), metric="correlation")
    assert result.nsc == pytest.approx(1 / 5)
    assert result.nscb == pytest.approx(1 / 4)
    assert result.map == pytest.approx(0.55)
    assert result.predictions["nsc_neighbor"].tolist() == [2, 4, 3, 2, 1]
    assert result.predictions["nscb_neighbor"].tolist() == [2, None, 3, 2, 0]
    assert result.predictions["average_precision"].tolist() == pytest.approx([1, 1 / 2, 7 / 12, 1 / 3, 1 / 3])
    # by MOA: NSC A 1/3, B 0; NSCB A 1/2 (p1 ok, p3 no), B 0
    assert result.per_moa["nsc"].tolist() == pytest.approx([1 / 3, 0])
    assert result.per_moa["nscb"].tolist() == pytest.approx([1 / 2, 0])
    assert result.confusion.loc["A"].tolist() == [1, 2] and result.confusion.loc["B"].tolist() == [2, 0]
    assert result.confusion_nscb.loc["A"].tolist() == [1, 1] and result.confusion_nscb.loc["B"].tolist() == [2, 0]
    cosine = evaluate_moa(toy3())
    assert (cosine.nsc, cosine.nscb) == (0.0, 0.0) and cosine.map == pytest.approx(0.45)


def test_average_precision_by_hand():
    # relevant at ranks 2 and 4: (1/2 + 2/4) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.6], [False, True, False, True]) == pytest.approx(0.5)
    assert average_precision([0.1, 0.5], [True, False]) == pytest.approx(0.5)
    assert average_precision([0.5, 0.5], [False, True]) == 1.0  # ties: positives first, as copairs
    assert np.isnan(average_precision([0.5], [False]))


def test_missing_columns_name_them():
    with pytest.raises(ValueError, match=r"\['Metadata_MOA'\]"):
        evaluate_moa(toy().drop(columns="Metadata_MOA"))
    with pytest.raises(ValueError, match="Metadata_Compound"):
        evaluate_moa(toy().drop(columns=["Metadata_Compound"]))
    result = evaluate_moa(toy().drop(columns="Metadata_Batch"))
    assert result.nsc == pytest.approx(0.8) and result.nscb is None
    assert any("NSCB not computed" in w for w in result.warnings)


def test_single_moa_and_single_compound_moa_are_reported():
    one = toy()
    one.loc[one["Metadata_MOA"] == "B", "Metadata_MOA"] = "A"
    result = evaluate_moa(one)
    assert result.nsc is None and result.map is None and result.n_queries == 0
    assert any("fewer than two MOAs" in w for w in result.warnings)

    single = toy()
    single.loc[4, ["Metadata_Compound", "Metadata_MOA"]] = ["c4", "C"]  # C has one compound
    single.loc[3, "Metadata_MOA"] = "C"
    single.loc[3, "Metadata_Compound"] = "c4"
    result = evaluate_moa(single)
    assert any("single compound" in w and "'C'" in w for w in result.warnings)
    assert result.n_queries == 3  # the A treatments; C's stay references
    assert result.per_moa.loc["C", "n_queries"] == 0 and np.isnan(result.per_moa.loc["C", "nsc"])


def test_nonfinite_rows_are_left_out_with_a_warning():
    bad = toy()
    bad.loc[0, "f0"] = np.nan
    result = evaluate_moa(bad)
    assert result.n_queries == 4
    assert any("non-finite" in w for w in result.warnings)


def random_treatments(seed=0):
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for m in range(4):
        center = rng.normal(size=8)
        for c in range(3):
            for dose in range(int(rng.integers(1, 4))):
                rows.append({"Metadata_MOA": f"moa{m}", "Metadata_Compound": f"moa{m}_c{c}",
                             "Metadata_Concentration": float(dose), "Metadata_Batch": f"b{(c + dose) % 2}"})
                feats.append(center + rng.normal(scale=1.5, size=8))
    table = pd.DataFrame(rows)
    return pd.concat([table, pd.DataFrame(np.array(feats), columns=[f"f{i}" for i in range(8)])], axis=1)


def test_average_precision_matches_copairs():
    copairs_ap = pytest.importorskip("copairs.map").average_precision
    table = random_treatments()
    ours = evaluate_moa(table).predictions["average_precision"]
    meta = table.filter(like="Metadata_")
    feats = table.filter(like="f").to_numpy()
    theirs = copairs_ap(meta, feats, pos_sameby=["Metadata_MOA"], pos_diffby=["Metadata_Compound"],
                        neg_sameby=[], neg_diffby=["Metadata_MOA"], progress_bar=False)
    np.testing.assert_allclose(ours.to_numpy(dtype=float), theirs["average_precision"].to_numpy(), atol=1e-6)


def test_separated_moas_score_perfectly_and_blocks_do_not_matter():
    table = random_treatments(1)
    for i in range(4):  # shrink the noise: MOAs become separable
        cols = [f"f{j}" for j in range(8)]
        rows = table["Metadata_MOA"] == f"moa{i}"
        table.loc[rows, cols] = table.loc[rows, cols].mean().to_numpy() + 0.01 * table.loc[rows, cols].to_numpy()
    full, blocked = evaluate_moa(table), evaluate_moa(table, block_size=3)
    assert full.nsc == 1.0 and full.map == pytest.approx(1.0)
    pd.testing.assert_frame_equal(full.predictions, blocked.predictions)


def test_zero_norm_profiles_are_left_out_not_scored_as_perfect():
    """A zero profile ties with every reference: its 'nearest neighbour' was the first row in
    table order and its AP 1 whatever the labels."""
    t = pd.DataFrame({"Metadata_MOA": ["A", "A", "A", "B", "B", "C", "C"],
                      "Metadata_Compound": ["a1", "a2", "a3", "b1", "b2", "c1", "c2"],
                      "f0": [0.0, 1.0, 0.9, -1.0, -0.9, 0.1, 0.2],
                      "f1": [0.0, 0.1, 0.2, 0.0, 0.1, 1.0, 0.9]})
    ev = evaluate_moa(t, batch=None)
    assert "a1" not in set(ev.predictions["Metadata_Compound"]) and ev.n_queries == 6
    assert any("1 profile(s) of zero norm" in w for w in ev.warnings)
    assert ev.nsc == 1.0 and ev.map == 1.0  # the rest are cleanly separated
