"""The README's main job, end to end on the local Ray (what `make demo` runs)."""

import pytest

from rayscreen.demo import run_demo
from rayscreen.store import open_plate
from rayscreen.synth import load_moa_fields

pytestmark = pytest.mark.integration


def test_demo_synth_export_ingest(tmp_path, ray_local, capsys):
    out = tmp_path / "demo"
    summary = run_demo(str(out), quiet=True)
    assert len(summary["plates"]) == 2 and summary["fields"] == 288
    # the ingested plates hold the synthetic screen's pixels and annotations
    synth = open_plate(str(out / "synth" / "moa-p01.zarr"))
    ingested = open_plate(summary["plates"][0])
    assert ingested.channels == synth.channels == ["DNA", "Actin", "Tubulin"]
    for well in ingested.wells[::16]:
        assert (ingested.read(well, 2) == synth.read(well, 2)).all()
    a, b = ingested.annotations.set_index("Metadata_Well"), synth.annotations.set_index("Metadata_Well")
    assert (a["Metadata_MOA"] == b["Metadata_MOA"]).all()
    assert len(load_moa_fields(str(out / "synth"))) == 288
    assert "moa-p02" in capsys.readouterr().out
