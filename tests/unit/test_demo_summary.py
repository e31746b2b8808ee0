"""The demo's printed summary says only what the run did."""

from rayscreen.demo import format_summary


def _summary(**extra):
    return {"plates": ["/tmp/d/plates/P1.zarr"], "fields": 12, "seconds": 3.0, "val_accuracy": 0.5,
            "val_balanced_accuracy": 0.5, "test_well_accuracy": 0.25, "test_wells": 8, "chance": 1 / 6,
            "report": "/tmp/d/run/report/index.html", "evaluation": {"nsc": 0.5, "nscb": 0.4, "map": 0.3},
            **extra}


def test_masks_line_follows_infer_labels():
    assert "labels/" not in format_summary(_summary(labels=None))
    assert "masks" not in format_summary(_summary())
    line = next(x for x in format_summary(_summary(labels="wscnn")).splitlines() if "masks" in x)
    assert "/tmp/d/plates/*.zarr/<row>/<column>/<field>/labels/wscnn" in line
