"""Labels and splits of wells: pure functions on annotation tables, values worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from rayscreen.config import ConfigError, LabelConfig, SplitConfig
from rayscreen.train.labels import resolve_labels
from rayscreen.train.splits import assign_splits, check_split


def wells(n=12, plates=("P1",)):
    rows = []
    for p in plates:
        for i in range(n):
            rows.append({"Metadata_Plate": p, "Metadata_Well": f"A{i + 1:02d}",
                         "Metadata_Label": "pos" if i % 4 == 0 else "neg",
                         "Metadata_Compound": f"c{i % 6}", "Metadata_Dose": [0, 1, 10][i % 3],
                         "Metadata_MOA": ["a", "b", "c", None][i % 4]})
    return pd.DataFrame(rows)


def test_binary_positive_only_makes_every_other_value_negative():
    labels, classes = resolve_labels(wells(), LabelConfig(column="Metadata_Label", positive=["pos"]))
    assert classes == ["neg", "pos"]
    assert labels.tolist() == [1, 0, 0, 0] * 3


def test_binary_with_negative_list_leaves_other_values_unlabelled():
    labels, classes = resolve_labels(wells(), LabelConfig(column="Metadata_Dose", positive=[10], negative=[0]))
    # doses cycle 0, 1, 10: value 1 is in neither list
    assert labels.tolist()[:6] == [0, -1, 1, 0, -1, 1]
    assert classes == ["0", "10"]


def test_values_match_by_text_so_yaml_ints_match_string_annotations():
    df = wells()
    df["Metadata_Dose"] = df["Metadata_Dose"].astype(str)
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_Dose", positive=[10], negative=[0]))
    assert labels.tolist()[:3] == [0, -1, 1]


def test_multiclass_every_value_sorted_and_missing_unlabelled():
    labels, classes = resolve_labels(wells(), LabelConfig(column="Metadata_MOA"))
    assert classes == ["a", "b", "c"]
    assert labels.tolist()[:4] == [0, 1, 2, -1]


def test_multiclass_explicit_classes_keep_their_order():
    labels, classes = resolve_labels(wells(), LabelConfig(column="Metadata_MOA", classes=["c", "a"]))
    assert classes == ["c", "a"]
    assert labels.tolist()[:4] == [1, -1, 0, -1]


@pytest.mark.parametrize("label, match", [
    (LabelConfig(), "label.column: required"),
    (LabelConfig(column="Metadata_Nope"), "'Metadata_Nope' is not an annotation column"),
    (LabelConfig(column="Metadata_Label", positive=["positive"]), "label.positive: value 'positive' matches no well"),
    (LabelConfig(column="Metadata_Label", positive=["pos"], negative=["pos"]), "both list"),
    (LabelConfig(column="Metadata_MOA", classes=["a", "zz"]), "label.classes: value 'zz' matches no well"),
    (LabelConfig(column="Metadata_MOA", classes=["a"]), "at least two"),
    (LabelConfig(column="Metadata_Label", negative=["neg"]), "needs label.positive"),
])
def test_bad_label_configs_name_the_key(label, match):
    with pytest.raises(ConfigError, match=match):
        resolve_labels(wells(), label)


def test_split_by_well_is_stratified_disjoint_and_seeded():
    df = wells(40)
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_Label", positive=["pos"]))
    s = assign_splits(df, labels, SplitConfig(val=0.2, test=0.2, seed=3))
    # 10 positives -> 2 val, 2 test, 6 train; 30 negatives -> 6, 6, 18
    for k, expected in ((1, (6, 2, 2)), (0, (18, 6, 6))):
        got = tuple(int(((labels == k) & (s == name)).sum()) for name in ("train", "val", "test"))
        assert got == expected
    assert (assign_splits(df, labels, SplitConfig(val=0.2, test=0.2, seed=3)) == s).all()
    assert not (assign_splits(df, labels, SplitConfig(val=0.2, test=0.2, seed=4)) == s).all()


def test_split_by_plate_keeps_each_plate_whole():
    df = wells(8, plates=("P1", "P2", "P3", "P4", "P5"))
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_Label", positive=["pos"]))
    s = assign_splits(df, labels, SplitConfig(by="plate", val=0.2, test=0.2))
    per_plate = pd.Series(s).groupby(df["Metadata_Plate"]).agg(lambda x: sorted(set(x)))
    assert all(len(v) == 1 for v in per_plate)  # one split per plate
    assert sorted(v[0] for v in per_plate) == ["test", "train", "train", "train", "val"]


def test_split_by_column_holds_out_compounds():
    df = wells(24)
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_Label", positive=["pos"]))
    s = assign_splits(df, labels, SplitConfig(by="column", column="Metadata_Compound", val=0.2, test=0.2, seed=1))
    by_compound = pd.Series(s).groupby(df["Metadata_Compound"]).agg(lambda x: set(x))
    assert all(len(v) == 1 for v in by_compound)
    assert sorted(next(iter(v)) for v in by_compound).count("train") == 4  # 6 compounds: 1 val, 1 test


def test_split_column_values_explicit_and_unlisted_left_out():
    df = wells(12)
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_Label", positive=["pos"]))
    cfg = SplitConfig(by="column", column="Metadata_Compound",
                      column_values={"train": ["c0", "c1", "c2", "c3"], "val": ["c4"]})
    s = assign_splits(df, labels, cfg)
    assert s.tolist()[:6] == ["train", "train", "train", "train", "val", "none"]
    cfg = SplitConfig(by="column", column="Metadata_Compound", column_values={"val": ["c4"]})
    assert assign_splits(df, labels, cfg).tolist()[:6] == ["train"] * 4 + ["val", "train"]
    with pytest.raises(ConfigError, match="column_values.val: 'c9' matches no well"):
        assign_splits(df, labels, SplitConfig(by="column", column="Metadata_Compound", column_values={"val": ["c9"]}))


def test_unlabelled_wells_are_never_in_a_split():
    df = wells(12)
    labels, _ = resolve_labels(df, LabelConfig(column="Metadata_MOA"))
    s = assign_splits(df, labels, SplitConfig())
    assert set(s[labels == -1]) == {"none"}


def test_check_split_refuses_empty_val_and_single_class_training():
    table = pd.DataFrame({"split": ["train", "train", "test"], "label_index": [0, 1, 0]})
    with pytest.raises(ConfigError, match="the val split is empty"):
        check_split(table, ["a", "b"])
    table = pd.DataFrame({"split": ["train", "train", "val"], "label_index": [0, 0, 1]})
    with pytest.raises(ConfigError, match=r"training split has 1 class\(es\) \['a'\]"):
        check_split(table, ["a", "b"])
    with pytest.raises(ConfigError, match="val=0.6, test=0.5"):
        assign_splits(wells(), np.zeros(12, int), SplitConfig(val=0.6, test=0.5))
