"""The stream's read loop without Ray: columns of mixed plates, plate lists, tiles that do not fit."""

import pandas as pd
import pytest

from rayscreen.store import BadImageError, RayscreenError
from rayscreen.store.uri import expand_uris
from rayscreen.stream.datasource import StreamOptions, WellTask, plan_wells, read_wells
from rayscreen.testing import make_plate


def _two_plates(tmp_path):
    """Plate A annotates the compound, plate B the gene: no column in common but the well."""
    a = make_plate(str(tmp_path / "A.zarr"), "A", wells=("A01",), fields=1,
                   annotations=pd.DataFrame({"Metadata_Well": ["A01"], "Metadata_Compound": ["DMSO"]}))
    b = make_plate(str(tmp_path / "B.zarr"), "B", wells=("A01",), fields=1,
                   annotations=pd.DataFrame({"Metadata_Well": ["A01"], "Metadata_Gene": ["TP53"]}))
    return a, b


def test_a_block_of_several_plates_keeps_every_plates_annotation_columns(tmp_path):
    a, b = _two_plates(tmp_path)
    # tasks as a caller may build them: each with its own plate's columns only
    tasks = [WellTask(a, "A", "A01", {"Metadata_Compound": "DMSO"}), WellTask(b, "B", "A01", {"Metadata_Gene": "TP53"})]
    (batch,) = read_wells(tasks, StreamOptions(fields_per_block=4))
    assert batch["Metadata_Compound"].tolist() == ["DMSO", None]
    assert batch["Metadata_Gene"].tolist() == [None, "TP53"]


def test_planned_wells_all_carry_the_union_of_the_plates_columns(tmp_path):
    """So blocks holding one plate only have the same columns as mixed blocks."""
    a, b = _two_plates(tmp_path)
    tasks = plan_wells([a, b])
    assert [t.annotations for t in tasks] == [
        {"Metadata_Well": "A01", "Metadata_Compound": "DMSO", "Metadata_Gene": None},
        {"Metadata_Well": "A01", "Metadata_Compound": None, "Metadata_Gene": "TP53"},
    ]
    (batch_a,) = read_wells(tasks[:1], StreamOptions())
    (batch_b,) = read_wells(tasks[1:], StreamOptions())
    assert set(batch_a) == set(batch_b)


def test_overlapping_globs_list_each_plate_once_in_first_order(tmp_path):
    for name in ("A", "B"):
        make_plate(str(tmp_path / "screen" / f"{name}.zarr"), name, wells=("A01",), fields=1)
    a, b = str(tmp_path / "screen" / "A.zarr"), str(tmp_path / "screen" / "B.zarr")
    assert expand_uris([str(tmp_path / "screen" / "*.zarr"), a]) == [a, b]
    assert expand_uris([b + "/", str(tmp_path / "screen" / "*.zarr/"), b]) == [b, a]


def test_a_tile_larger_than_a_field_fails_naming_the_key_and_field_even_when_skipping(tmp_path):
    """A settings/data mismatch, not a bad field: skipping it would skip every field."""
    uri = make_plate(str(tmp_path / "p.zarr"), "P", wells=("A01",), fields=1, field_shape=(32, 40))
    report = str(tmp_path / "errors")
    for on_error in ("raise", "skip"):
        with pytest.raises(RayscreenError, match=r"stream.tile \(64, 64\).*plate 'P' well A01 field 0.*32 x 40"):
            list(read_wells(plan_wells([uri]), StreamOptions(tile=(64, 64), on_error=on_error, error_report=report)))


def test_fields_of_different_shapes_in_one_block_name_both_fields(tmp_path):
    """read_plates rejects such plates up front; read_wells called directly says which fields differ."""
    a = make_plate(str(tmp_path / "A.zarr"), "A", wells=("A01",), fields=1, field_shape=(32, 40))
    b = make_plate(str(tmp_path / "B.zarr"), "B", wells=("A01",), fields=1, field_shape=(48, 40))
    with pytest.raises(BadImageError, match=r"plate 'B' well A01 field 0 .*\(2, 48, 40\).*plate 'A' well A01 field 0"):
        list(read_wells(plan_wells([a, b]), StreamOptions(fields_per_block=4)))
    # in blocks of one field each, nothing is stacked together
    assert [batch["image"].shape for batch in read_wells(plan_wells([a, b]), StreamOptions(fields_per_block=1))] == [
        (1, 2, 32, 40), (1, 2, 48, 40)]
