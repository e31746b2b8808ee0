"""What infer works out on the driver before reading pixels."""


def test_the_most_fields_of_a_plate_without_field_count(tmp_path):
    """Plates of other tools need not record field_count: infer sizes its store by the most
    fields of any well present, not by the first listed well (which a sparse plate may lack)."""
    from rayscreen.infer.run import _max_fields
    from rayscreen.store import create_plate, open_plate
    from rayscreen.testing.plates import random_field

    uri = str(tmp_path / "F.zarr")
    writer = create_plate(uri, "F", ["A01", "A02", "A03"], ["DNA"], (8, 8), "uint16", None)
    for well, n in (("A02", 1), ("A03", 3)):  # A01 listed, never written
        for f in range(n):
            writer.write_field(well, f, random_field(0, well, f, (1, 8, 8)))
        writer.complete_well(well, n)
    plate = open_plate(uri)
    assert plate.meta.field_count is None
    assert _max_fields(plate) == 3
