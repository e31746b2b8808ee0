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


def test_the_demo_replaces_only_its_own_output(tmp_path, monkeypatch):
    """`rayscreen demo --out DIR` deleted DIR whatever it held: `--out .` in a checkout took
    the checkout, .git and all."""
    import pytest

    from rayscreen.demo import MARKER, prepare_output
    from rayscreen.store.errors import RayscreenError

    data = tmp_path / "data"
    data.mkdir()
    (data / "results.csv").write_text("precious")
    with pytest.raises(RayscreenError, match="is not empty and is not a demo output"):
        prepare_output(str(data))
    assert (data / "results.csv").read_text() == "precious"

    monkeypatch.chdir(data)
    (data / MARKER).write_text("")  # even with a marker: never the working directory or above it
    for out in (".", str(tmp_path)):
        with pytest.raises(RayscreenError, match="working directory, home or a directory above"):
            prepare_output(out)
    assert (data / "results.csv").exists()

    demo = tmp_path / "demo_out"
    prepare_output(str(demo))  # new: created, marked
    (demo / "run").mkdir()
    prepare_output(str(demo))  # an earlier demo's output: replaced
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]
    mine = tmp_path / "myscreen"  # a user's screen with a config named demo.yaml: kept
    (mine / "plates" / "P1.zarr").mkdir(parents=True)
    (mine / "demo.yaml").write_text("plates: [plates/*.zarr]")
    with pytest.raises(RayscreenError, match="is not a demo output"):
        prepare_output(str(mine))
    assert (mine / "plates" / "P1.zarr").exists()
    old = tmp_path / "old_demo"  # written before the marker existed: recognised by its contents
    for name in ("synth", "raw", "plates", "run"):
        (old / name).mkdir(parents=True)
    (old / "demo.yaml").write_text("")
    prepare_output(str(old))
    assert sorted(p.name for p in old.iterdir()) == [MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_output(str(empty))
    assert (empty / MARKER).exists()


def test_the_demo_config_moves_its_paths_under_any_out():
    import yaml

    from rayscreen.demo import demo_config_text

    for out in ("demo_out", "/x/run,v2", "run #2"):
        config = yaml.safe_load(demo_config_text(out))
        assert config["plates"] == [f"{out}/plates/*.zarr"] and config["output"] == f"{out}/run"
        assert config["analysis"]["qc"]["annotations"] == f"{out}/qc_labels.csv"
