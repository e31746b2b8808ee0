"""The command line's own logic: flags reach the config, user errors exit 2 with a message.
The stage functions and Ray are replaced by recorders (the stages have their own tests)."""

import os

import pytest

import rayscreen.cli as cli
import rayscreen.pipeline as pipeline
from rayscreen.cli import build_parser, main

CONFIG = "plates: [{plate}]\noutput: {out}\nstorage_options: {{endpoint_url: 'http://127.0.0.1:9000'}}\n"


@pytest.fixture
def config_path(tmp_path):
    path = tmp_path / "screen.yaml"
    (tmp_path / "p.zarr").mkdir()  # there (its contents are the stages' business, replaced here)
    path.write_text(CONFIG.format(plate=tmp_path / "p.zarr", out=tmp_path / "out")
                    + "stream: {illumination: true, normalize: meanstd}\n")
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


def test_bad_storage_options_and_set_values_are_not_echoed(tmp_path, capsys, config_path):
    """They may hold credentials: the errors say where the text is wrong, not what it was."""
    assert main(["info", str(tmp_path / "P.zarr"), "--storage-options",
                 '{"key": "AKIAEXAMPLE", "secret": "wJalrSECRET",}']) == 2
    err = capsys.readouterr().err
    assert "not JSON" in err and "column" in err and "wJalrSECRET" not in err and "AKIAEXAMPLE" not in err
    assert main(["config", config_path, "--set", "storage_options={key: AKIAEXAMPLE, secret: wJalrSECRET"]) == 2
    err = capsys.readouterr().err
    assert "--set storage_options: the value is not valid YAML" in err and "Traceback" not in err
    assert "wJalrSECRET" not in err and "AKIAEXAMPLE" not in err


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
    (tmp_path / "P.zarr").mkdir()
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


@pytest.mark.parametrize("argv", [
    ["synth", "moa", "out"], ["ingest", "load_data.csv", "out"], ["info", "P.zarr"], ["demo"],
    ["config", "screen.yaml"], ["illum", "P.zarr"], ["train", "screen.yaml"], ["run", "screen.yaml"],
])
def test_every_command_takes_quiet_after_its_name_and_the_top_level_flag_still_works(argv):
    parser = build_parser()
    assert parser.parse_args([*argv, "--quiet"]).quiet is True
    assert parser.parse_args(["--quiet", *argv]).quiet is True
    assert parser.parse_args(argv).quiet is False


def test_jobs_ingest_passes_a_trailing_quiet_on(monkeypatch, tmp_path):
    # jobs/ingest.py hands its arguments to `rayscreen ingest`: --quiet comes after the command
    import os
    import runpy
    import sys

    import rayscreen.ingest

    calls = {}
    monkeypatch.setattr(rayscreen.ingest, "ingest", lambda csv, out, **kw: calls.update(kw) or [])
    monkeypatch.setattr(sys, "argv", ["jobs/ingest.py", "load_data.csv", str(tmp_path), "--no-ray", "--quiet"])
    script = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "ingest.py")
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(script, run_name="__main__")
    assert exit_.value.code == 0 and calls["progress"] is False and calls["use_ray"] is False


@pytest.mark.parametrize("argv, expected", [
    (["moa", "--n-plates", "0"], "argument --n-plates: 0: expected an integer >= 1"),
    (["wscnn", "--n-images", "0"], "argument --n-images: 0: expected an integer >= 1"),
    (["wscnn", "--n-images", "-3"], "argument --n-images: -3: expected an integer >= 1"),
    (["wscnn", "--rare-fraction", "2"], "argument --rare-fraction: 2: expected a fraction in [0, 1]"),
    (["wscnn", "--rare-fraction", "-0.1"], "argument --rare-fraction: -0.1: expected a fraction in [0, 1]"),
    (["wscnn", "--rare-fraction", "nan"], "argument --rare-fraction: nan: expected a fraction in [0, 1]"),
    (["moa", "--seed", "-1"], "argument --seed: -1: expected an integer >= 0"),
])
def test_synth_out_of_range_arguments_exit_2_naming_the_flag_and_write_nothing(tmp_path, capsys, argv, expected):
    out = tmp_path / "screen"
    with pytest.raises(SystemExit) as exit_:
        main(["synth", argv[0], str(out), *argv[1:]])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("levels", ["0", "-1"])
def test_ingest_levels_below_1_exit_2(tmp_path, capsys, levels):
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", str(tmp_path / "load_data.csv"), str(tmp_path / "out"), "--levels", levels])
    assert exit_.value.code == 2
    assert f"argument --levels: {levels}: expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_plate_glob_matching_nothing_fails_before_ray_starts(tmp_path, capsys, recorded):
    nothing = str(tmp_path / "nope" / "*.zarr")
    assert main(["--quiet", "illum", nothing]) == 2
    assert f"rayscreen illum: error: plate glob '{nothing}' matches nothing" in capsys.readouterr().err
    config = tmp_path / "glob.yaml"
    config.write_text(f"plates: ['{nothing}']\noutput: {tmp_path / 'out'}\n"
                      "stream: {illumination: true, normalize: meanstd}\n")
    for command in ["illum", "run"]:
        assert main(["--quiet", command, str(config)]) == 2
        assert f"rayscreen {command}: error: plate glob '{nothing}' matches nothing" in capsys.readouterr().err
    assert recorded["init_ray"] == 0 and "config" not in recorded


def test_train_prints_a_short_summary_not_the_result_repr(config_path, capsys, monkeypatch):
    import pandas as pd

    from rayscreen.train.loop import TrainResult

    metrics = pd.DataFrame({"epoch": [1, 2, 3], "val_balanced_accuracy": [0.5, 0.875, 0.75]})
    result = TrainResult(run_dir="/o/train", artefact="/o/train/model", metrics=metrics, epochs_completed=3,
                         best_epoch=2)
    monkeypatch.setattr(pipeline, "run_stage", lambda config, stage, progress=True: result)
    assert main(["train", config_path]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "train: 3 epoch(s); best epoch 2 (val_balanced_accuracy 0.875)",
        "model: /o/train/model",
        "run: /o/train",
    ]
    assert main(["train", config_path, "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_storage_without_credentials_is_a_message_not_a_traceback(monkeypatch, capsys):
    """A common first mistake on a cluster or laptop: no AWS credentials anywhere. The real
    botocore lookup fails (no server is contacted); the CLI says what to do and exits 2."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    code = main(["info", "s3://no-bucket/p.zarr", "--storage-options", '{"endpoint_url": "http://127.0.0.1:9"}'])
    err = capsys.readouterr().err
    assert code == 2 and "no credentials found" in err and '{"anon": true}' in err
    assert "Traceback" not in err


def test_an_endpoint_that_does_not_answer_is_a_message(monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
    code = main(["info", "s3://no-bucket/p.zarr", "--storage-options",
                 '{"endpoint_url": "http://127.0.0.1:%d", "config_kwargs": {"retries": {"max_attempts": 1}}}' % port])
    err = capsys.readouterr().err
    assert code == 2 and f"Could not connect to the endpoint URL: \"http://127.0.0.1:{port}" in err, err
    assert "Traceback" not in err and "Found credentials" not in err


def test_a_stage_on_an_output_another_run_holds_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from .test_lock import hold_in_another_process

    calls = []
    monkeypatch.setattr(cli, "_init_ray", lambda: None)
    monkeypatch.setattr(pipeline, "stage_function", lambda stage: (lambda config, progress=True: calls.append(stage)))
    output = tmp_path / "out"
    config = tmp_path / "screen.yaml"
    (tmp_path / "p.zarr").mkdir()
    config.write_text(f"plates: [{tmp_path / 'p.zarr'}]\noutput: {output}\n")
    proc = hold_in_another_process(str(output))
    try:
        for command in ["aggregate", "run"]:
            assert main(["--quiet", command, str(config)]) == 2
            err = capsys.readouterr().err
            assert f"output {output} is in use by rayscreen train (pid {proc.pid}" in err, err
    finally:
        proc.kill()
        proc.wait()
    assert calls == [] and sorted(p.name for p in output.iterdir()) == [".rayscreen.lock"]


def test_warnings_print_as_one_line_naming_the_command(config_path, capsys, monkeypatch):
    import warnings

    def stage(config, progress=True):
        warnings.warn("2 feature(s) have MAD 0 in the controls", UserWarning)

    monkeypatch.setattr(pipeline, "stage_function", lambda name: stage)
    before = warnings.showwarning
    assert main(["aggregate", config_path]) == 0
    err = capsys.readouterr().err
    assert "rayscreen aggregate: warning: 2 feature(s) have MAD 0 in the controls\n" in err
    assert "test_cli.py" not in err  # no source location and line
    assert warnings.showwarning is before  # restored for the caller


def test_quiet_and_verbose_go_before_or_after_the_command():
    from rayscreen.cli import build_parser

    parse = build_parser().parse_args
    for argv in (["-v", "info", "p.zarr"], ["info", "p.zarr", "-v"], ["info", "p.zarr", "--verbose"]):
        assert parse(argv).verbose is True, argv
    assert parse(["info", "p.zarr"]).verbose is False and parse(["info", "p.zarr", "--quiet"]).quiet is True


def test_a_job_script_help_shows_the_stage_options(capsys):
    from rayscreen.cli import job_main

    assert job_main("train", ["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config CONFIG.yaml" in out and "--set" in out


def test_help_lists_every_stage_and_command(capsys):
    from rayscreen.pipeline import STAGES

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in (*STAGES, "synth", "ingest", "info", "illum", "config", "run", "demo"):
        assert f"\n    {command} " in out, command
    assert "``" not in out  # no reStructuredText markup in what users read


def test_illum_refuses_a_config_mixed_with_plates_and_reads_any_case(config_path, recorded, capsys, tmp_path):
    """`illum screen.yaml extra.zarr` took the YAML file for a plate (after Ray had started)."""
    assert main(["--quiet", "illum", config_path, str(tmp_path / "P.zarr")]) == 2
    assert "illum takes one CONFIG.yaml or plates, not both" in capsys.readouterr().err
    assert recorded["init_ray"] == 0
    upper = tmp_path / "SCREEN.YAML"
    upper.write_text(open(config_path).read())
    assert main(["--quiet", "illum", str(upper)]) == 0
    assert recorded["config"].stream.normalize == "meanstd"  # read as the config, not as a plate


def test_output_piped_into_a_reader_that_exits_is_not_a_storage_error(tmp_path):
    """`rayscreen info P | head -1` reported 'error: storage: [Errno 32] Broken pipe' (exit 2)."""
    import subprocess
    import sys

    from rayscreen.testing import make_plate

    uri = make_plate(str(tmp_path / "P.zarr"), "P", wells=("A01", "A02"), fields=1, field_shape=(8, 8))
    proc = subprocess.Popen([sys.executable, "-m", "rayscreen.cli", "info", uri, uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1
    assert "storage" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_plate_that_is_not_there_fails_before_ray_starts(tmp_path, capsys, recorded, config_path):
    """A plate named without a glob was kept unchecked: the user waited for Ray to start (or
    for a cluster address that never answered) before hearing of it."""
    (tmp_path / "P.zarr").mkdir()
    assert main(["--quiet", "illum", str(tmp_path / "P.zarr"), str(tmp_path / "Q.zarr")]) == 2
    assert f"plates: 1 plate(s) not found: ['{tmp_path / 'Q.zarr'}']" in capsys.readouterr().err
    os.rmdir(tmp_path / "p.zarr")
    assert main(["--quiet", "run", config_path]) == 2  # the config's plate is gone too
    assert "plate(s) not found" in capsys.readouterr().err
    assert recorded["init_ray"] == 0


def test_info_names_a_plate_that_is_not_there_and_expands_globs(tmp_path, capsys):
    from rayscreen.testing import make_plate

    for name in ("A", "B"):
        make_plate(str(tmp_path / f"{name}.zarr"), name, wells=("A01",), fields=1, field_shape=(8, 8))
    assert main(["info", str(tmp_path / "*.zarr")]) == 0
    out = capsys.readouterr().out
    assert "plate A " in out and "plate B " in out
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    assert f"{tmp_path / 'nope.zarr'}: no such plate (nothing there)" in capsys.readouterr().err
    (tmp_path / "empty.zarr").mkdir()  # something there, not a plate: said as such
    assert main(["info", str(tmp_path / "empty.zarr")]) == 2
    assert "is not an OME-Zarr HCS plate: no Zarr group there" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["wscnn", "--n-plates", "3"], "synth wscnn: --n-plates is for the other kind of screen (moa)"),
    (["moa", "--n-images", "5", "--rare-fraction", "0.2"],
     "synth moa: --n-images, --rare-fraction is for the other kind of screen (wscnn)"),
])
def test_synth_refuses_the_other_kinds_flags_instead_of_ignoring_them(tmp_path, capsys, argv, expected):
    out = tmp_path / "screen"
    assert main(["synth", argv[0], str(out), *argv[1:]]) == 2
    assert expected in capsys.readouterr().err and not out.exists()
