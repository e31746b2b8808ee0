"""The command line's own logic: flags reach the config, user errors exit 2 with a message.
The stage functions and Ray are replaced by recorders (the stages have their own tests)."""

import pytest

import rayscreen.cli as cli
import rayscreen.pipeline as pipeline
from rayscreen.cli import build_parser, main

CONFIG = "plates: [p.zarr]\noutput: {out}\nstorage_options: {{endpoint_url: 'http://127.0.0.1:9000'}}\n"


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "screen.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "out") + "stream: {illumination: true, normalize: meanstd}\n")
    return str(path)


@pytest.fixture
def recorded(monkeypatch):
    """Replaces Ray's start and the stage runners; returns what they were called with."""
    calls = {"init_ray": 0}
    monkeypatch.setattr(cli, "_init_ray", lambda: calls.__setitem__("init_ray", calls["init_ray"] + 1))
    monkeypatch.setattr(pipeline, "run_stage", lambda config, stage, progress=True: calls.update(config=config))
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config, **kw: calls.update(config=config, **kw))
    monkeypatch.setattr(pipeline, "stage_function",
                        lambda stage: (lambda config, progress=True: calls.update(config=config, stage=stage)))
    return calls


@pytest.mark.parametrize("text, expected", [
    ("{endpoint_url: x}", "--storage-options: expected a JSON object"),
    ('["http://x"]', "--storage-options: expected a JSON object, e.g. '{\"endpoint_url\""),
])
def test_bad_storage_options_are_a_user_error_not_a_traceback(tmp_path, capsys, text, expected):
    assert main(["info", str(tmp_path / "P.zarr"), "--storage-options", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rayscreen info: error: ") and expected in err and "Traceback" not in err


def test_every_command_that_touches_storage_takes_storage_options(config_path):
    parser = build_parser()
    for command in ["train", "infer", "profile", "aggregate", "evaluate", "report", "run", "illum", "config"]:
        args = parser.parse_args([command, config_path, "--storage-options", '{"anon": true}'])
        assert args.storage_options == '{"anon": true}', command


def test_storage_options_are_merged_over_the_configs(config_path, recorded):
    assert main(["--quiet", "train", config_path, "--storage-options", '{"anon": true}']) == 0
    assert recorded["config"].storage_options == {"endpoint_url": "http://127.0.0.1:9000", "anon": True}


def test_illum_with_a_config_honours_its_flags(config_path, recorded):
    assert main(["--quiet", "illum", config_path, "--normalize", "percentile", "--set", "stream.level=1",
                 "--storage-options", '{"endpoint_url": "http://127.0.0.1:5000"}']) == 0
    config = recorded["config"]
    assert config.stream.normalize == "percentile" and config.stream.level == 1
    assert config.storage_options == {"endpoint_url": "http://127.0.0.1:5000"}
    assert main(["--quiet", "illum", config_path]) == 0
    assert recorded["config"].stream.normalize == "meanstd"  # no flag: the config's


def test_illum_with_plates_applies_set_and_rejects_bad_keys(tmp_path, capsys, recorded):
    plate = str(tmp_path / "P.zarr")
    assert main(["--quiet", "illum", plate, "--set", "stream.level=1", "--set", "stream.channels=[DNA]"]) == 0
    config = recorded["config"]
    assert config.plates == [plate] and config.stream.level == 1 and config.stream.channels == ["DNA"]
    assert config.stream.illumination and config.stream.normalize == "percentile"
    assert main(["--quiet", "illum", plate, "--normalize", "none", "--storage-options", '{"anon": true}']) == 0
    assert recorded["config"].stream.normalize == "none" and recorded["config"].storage_options == {"anon": True}
    assert recorded["init_ray"] == 2

    assert main(["--quiet", "illum", plate, "--set", "no.such.key=1"]) == 2
    assert "rayscreen illum: error: --set no.such.key: no: unknown key" in capsys.readouterr().err
    assert main(["--quiet", "illum", plate, "--set", "stream.normalize=bogus"]) == 2
    assert "--set stream.normalize: expected one of" in capsys.readouterr().err
    assert recorded["init_ray"] == 2  # bad overrides fail before Ray starts


def test_run_starts_ray_when_illum_will_run(config_path, recorded, monkeypatch):
    # illum fits on Ray only when Ray is already up: run must start it, as `rayscreen illum` does
    assert main(["--quiet", "run", config_path]) == 0
    assert recorded["init_ray"] == 1 and recorded["stages"] is None
    assert main(["--quiet", "run", config_path, "--stages", "aggregate,evaluate"]) == 0
    assert recorded["init_ray"] == 1  # no illum: nothing to start Ray for here
    monkeypatch.setattr(pipeline, "is_complete", lambda config, stage: True)
    assert main(["--quiet", "run", config_path]) == 0
    assert recorded["init_ray"] == 1  # illum complete: skipped
    assert main(["--quiet", "run", config_path, "--force"]) == 0
    assert recorded["init_ray"] == 2  # --force reruns it
