"""The config parser: strict, typed, errors name the dotted key and its line."""

import os
import re

import pytest

from rayscreen.config import Config, ConfigError, config_from_dict, dump_config, load_config, parse_overrides

MINIMAL = "plates: [plates/*.zarr]\noutput: out\n"


def test_defaults_and_sections():
    c = load_config(MINIMAL + "train:\n  epochs: 3\n  split:\n    by: plate\n")
    assert isinstance(c, Config)
    # local paths made absolute against the working directory: Ray's workers may run elsewhere
    assert c.plates == [os.path.abspath("plates/*.zarr")] and c.output == os.path.abspath("out")
    assert c.train.epochs == 3 and c.train.split.by == "plate"
    assert c.train.batch_size == 32  # default kept
    assert c.stream.normalize == "percentile"


def test_single_uri_becomes_a_list_and_ints_are_numbers():
    c = load_config("plates: s3://bucket/p1.zarr\noutput: s3://bucket/run\ntrain:\n  lr: 1\n")
    assert c.plates == ["s3://bucket/p1.zarr"]
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "train:\n  epoch: 3\n", "<config>:4: train.epoch: unknown key"),
    (MINIMAL + "trian:\n  epochs: 3\n", "<config>:3: trian: unknown key"),
    (MINIMAL + "train:\n  lr: fast\n", "<config>:4: train.lr: expected a number, found 'fast'"),
    (MINIMAL + "train:\n  epochs: 2.5\n", "train.epochs: expected an integer"),
    (MINIMAL + "train:\n  amp: 'yes'\n", "train.amp: expected true or false"),
    (MINIMAL + "train:\n  optimizer: adam\n", "train.optimizer: expected one of ['sgd', 'adamw'], found 'adam'"),
    (MINIMAL + "train:\n  split:\n    val: [0.2]\n", "<config>:5: train.split.val: expected a number"),
    (MINIMAL + "stream: 3\n", "stream: expected a mapping"),
    ("output: out\n", "plates: required key missing"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("plates: [a\n", "not valid YAML"),
])
def test_errors_name_the_key_and_line(text, expected):
    with pytest.raises(ConfigError) as e:
        load_config(text)
    assert expected in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "screen.yaml"
    p.write_text(MINIMAL + "infer:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"screen.yaml:4: infer.batch_sise: unknown key"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))


def test_yaml_is_loaded_safely():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(MINIMAL + "model:\n  kwargs: !!python/object/apply:os.system ['true']\n")


def test_overrides_and_round_trip():
    c = load_config(MINIMAL, overrides=parse_overrides(["train.epochs=2", "infer.aggregate=mean",
                                                        "stream.channels=[DNA, Actin]"]))
    assert c.train.epochs == 2 and c.infer.aggregate == "mean" and c.stream.channels == ["DNA", "Actin"]
    again = config_from_dict(__import__("yaml").safe_load(dump_config(c)))
    assert again == c
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.epochs"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(MINIMAL, overrides={"train.epochs": "two"})


def test_config_from_dict_applies_overrides_to_a_copy():
    data = {"plates": ["p.zarr"], "output": "out", "analysis": {"whiten": False}}
    c = config_from_dict(data, overrides={"analysis.whiten": True, "train.epochs": 3})
    assert c.analysis.whiten is True and c.train.epochs == 3
    assert data == {"plates": ["p.zarr"], "output": "out", "analysis": {"whiten": False}}  # caller's dict untouched
    with pytest.raises(ConfigError, match="override analysis.whiten.x: whiten is not a section"):
        config_from_dict(data, overrides={"analysis.whiten.x": 1})


@pytest.mark.parametrize("stream, expected", [
    ("tile: 0", "<config>:4: stream.tile: expected a positive tile size in pixels, or null for whole fields, found 0"),
    ("tile: -16", "<config>:4: stream.tile: expected a positive tile size"),
    ("level: -1", "<config>:4: stream.level: expected a pyramid level >= 0"),
    ("tile: 32\n  stride: 48", "<config>:5: stream.stride: expected at most stream.tile (32)"),
    ("tile: 32\n  stride: 0", "<config>:5: stream.stride: expected a positive step in pixels, found 0"),
    ("stride: 16", "<config>:4: stream.stride: 16 is the step between tiles, but stream.tile is not set"),
    ("read_threads: 0", "<config>:4: stream.read_threads: expected at least 1 field read at a time"),
])
def test_stream_values_the_tiling_cannot_use_fail_at_parse_time(stream, expected):
    with pytest.raises(ConfigError) as e:
        load_config(MINIMAL + f"stream:\n  {stream}\n")
    assert expected in str(e.value)


@pytest.mark.parametrize("analysis, expected", [
    ("corr_threshold: 0", "analysis.corr_threshold: expected |r| in (0, 1]"),
    ("corr_threshold: 1.5", "analysis.corr_threshold: expected |r| in (0, 1]"),
    ("min_variance: -1", "analysis.min_variance: expected a finite variance >= 0"),
])
def test_feature_selection_thresholds_out_of_range_fail_at_parse_time(analysis, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(MINIMAL + f"analysis:\n  {analysis}\n")


def test_stream_tiles_that_touch_or_overlap_are_accepted():
    # stride == tile: tiles touch; stride < tile: they overlap; both leave no pixel out (tiling.py)
    assert load_config(MINIMAL + "stream:\n  tile: 32\n  stride: 32\n").stream.stride == 32
    assert load_config(MINIMAL + "stream:\n  tile: 32\n  stride: 8\n  level: 1\n").stream.level == 1
    from rayscreen.config import StreamConfig

    with pytest.raises(ConfigError, match="stream.level: expected a pyramid level >= 0"):
        StreamConfig(level=-1)  # built in code, not parsed: the same check


def test_a_key_written_twice_names_both_lines():
    text = MINIMAL + "train:\n  epochs: 2\nstream:\n  tile: 64\ntrain:\n  lr: 0.1\n"
    with pytest.raises(ConfigError, match=r"<config>:7: train: written twice \(lines 3 and 7\)"):
        load_config(text)
    with pytest.raises(ConfigError, match=r"<config>:5: train.epochs: written twice \(lines 4 and 5\)"):
        load_config(MINIMAL + "train:\n  epochs: 2\n  epochs: 3\n")


def test_a_bad_override_is_blamed_on_the_set_not_the_file_line():
    text = MINIMAL + "train:\n  epochs: 3\n"
    with pytest.raises(ConfigError) as e:
        load_config(text, overrides=parse_overrides(["train.epochs=ten"]))
    assert str(e.value) == "--set train.epochs: expected an integer, found 'ten'"
    with pytest.raises(ConfigError, match=r"^--set no.such.key: no: unknown key"):
        load_config(text, overrides=parse_overrides(["no.such.key=1"]))
    with pytest.raises(ConfigError, match=r"^--set stream.stride: 8 is the step between tiles"):
        load_config(text, overrides=parse_overrides(["stream.stride=8"]))
    # the file's own errors still name their line
    with pytest.raises(ConfigError, match=r"^<config>:4: train.epochs: expected an integer"):
        load_config(MINIMAL + "train:\n  epochs: ten\n", overrides=parse_overrides(["train.lr=0.1"]))


def test_an_override_fills_a_section_written_empty():
    c = load_config(MINIMAL + "stream:\n", overrides=parse_overrides(["stream.tile=64"]))
    assert c.stream.tile == 64


def test_exponent_floats_that_yaml_1_1_reads_as_strings_are_numbers():
    # PyYAML (YAML 1.1) reads 1e-3 without a dot as the string '1e-3'
    c = load_config(MINIMAL + "train:\n  lr: 1e-3\n  grad_clip: 5E+1\n")
    assert c.train.lr == 0.001 and isinstance(c.train.lr, float) and c.train.grad_clip == 50.0
    assert load_config(MINIMAL, overrides=parse_overrides(["train.lr=1e-4"])).train.lr == 1e-4
    with pytest.raises(ConfigError, match=r"train.lr: expected a number, found 'nan'"):
        load_config(MINIMAL + "train:\n  lr: nan\n")
    with pytest.raises(ConfigError, match=r"--set train.lr: expected a number, found '1e-3x'"):
        load_config(MINIMAL, overrides=parse_overrides(["train.lr=1e-3x"]))


def test_written_configs_never_hold_credentials(tmp_path):
    """storage_options may carry keys (a --storage-options flag, a config); what rayscreen
    writes beside its outputs masks them, and the config itself keeps them for the stages."""
    from rayscreen.config import config_from_dict, dump_config, write_config

    options = {"key": "AKIAFAKEKEY123", "secret": "not-a-real-secret", "endpoint_url": "http://127.0.0.1:9",
               "client_kwargs": {"aws_session_token": "tok-xyz"}}
    config = config_from_dict({"plates": ["P.zarr"], "output": str(tmp_path / "out"), "storage_options": options})
    record = config.to_record()
    assert record["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://127.0.0.1:9",
                                         "client_kwargs": {"aws_session_token": "***"}}
    assert config.storage_options == options  # the stages still get them
    uri = write_config(config)
    text = open(uri).read()
    assert text == dump_config(config) and "endpoint_url" in text
    for secret in ("AKIAFAKEKEY123", "not-a-real-secret", "tok-xyz"):
        assert secret not in text


def test_a_recorded_config_loads_without_its_masked_secrets(tmp_path, caplog):
    """<output>/config.yaml used again (`rayscreen aggregate out/config.yaml`): the masked
    values are left out, with a warning naming them, instead of reaching s3fs as '***'."""
    from rayscreen.config import config_from_dict, write_config

    options = {"key": "AKIAFAKEKEY123", "secret": "not-a-real-secret", "endpoint_url": "http://127.0.0.1:9",
               "client_kwargs": {"aws_session_token": "tok-xyz", "region_name": "eu-west-1"}}
    uri = write_config(config_from_dict({"plates": ["P.zarr"], "output": str(tmp_path / "out"),
                                         "storage_options": options}))
    with caplog.at_level("WARNING", logger="rayscreen.config"):
        again = load_config(uri)
    assert again.storage_options == {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "eu-west-1"}}
    assert ("storage_options.key, storage_options.secret, storage_options.client_kwargs.aws_session_token masked"
            in caplog.text)


def test_local_paths_are_absolute_remote_ones_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = config_from_dict({"plates": ["p/*.zarr", "s3://b/q.zarr"], "output": "run", "platemap": "file://pm.csv",
                          "infer": {"checkpoint": "s3://b/model"}, "profile": {"weights": "w/r18.pth"},
                          "model": {"name": "milnet", "kwargs": {"trunk": "resnet18", "trunk_weights": "w/r18.pth"}},
                          "analysis": {"qc": {"annotations": "qc.csv"}}})
    assert c.output == str(tmp_path / "run") and c.platemap == str(tmp_path / "pm.csv")
    assert c.plates == [str(tmp_path / "p" / "*.zarr"), "s3://b/q.zarr"]  # a glob stays a glob
    assert c.infer.checkpoint == "s3://b/model" and c.profile.weights == str(tmp_path / "w" / "r18.pth")
    assert c.analysis.qc.annotations == str(tmp_path / "qc.csv")
    assert c.model.kwargs == {"trunk": "resnet18", "trunk_weights": str(tmp_path / "w" / "r18.pth")}
    assert config_from_dict(c.to_dict()) == c  # round trip unchanged


def test_redact_masks_the_credentials_of_every_fsspec_backend():
    from rayscreen.store.uri import redact

    options = {"key": "K", "secret": "S", "client_kwargs": {"aws_session_token": "T"},
               "account_key": "AK", "sas_token": "SAS", "connection_string": "AccountKey=abc;", "credential": "C",
               "tenant_id": "tenant", "client_secret": "CS", "headers": {"Authorization": "Bearer xyz"},
               "endpoint_url": "http://127.0.0.1:9", "anon": False, "token": "google_default",
               "profiles": [{"password": "P", "name": "n"}]}
    masked = redact(options)
    assert masked["endpoint_url"] == "http://127.0.0.1:9" and masked["anon"] is False
    assert masked["token"] == "google_default"  # gcsfs: a way to find credentials, not one
    assert masked["tenant_id"] == "tenant" and masked["profiles"][0]["name"] == "n"
    text = repr(masked)
    for secret in ("'K'", "'S'", "'T'", "AK", "SAS", "AccountKey", "'C'", "CS", "Bearer", "'P'"):
        assert secret not in text, secret
    assert redact({"token": "ya29.secret"})["token"] == "***"


def test_a_config_that_is_not_utf8_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9sum\xe9 of the screen\nplates: [p.zarr]\noutput: out\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 3: .*save it as UTF-8"):
        load_config(str(path))


def test_a_set_value_that_is_not_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"--set train.epochs: the value is not valid YAML \(.*column \d+\)"):
        parse_overrides(["train.epochs=[1"])


@pytest.mark.parametrize("section, values, message", [
    ("profile", {"concurrency": 0}, "profile.concurrency: expected a number above 0, found 0"),
    ("profile", {"input_size": -8}, "profile.input_size: expected a number above 0"),
    ("infer", {"mask_nms_size": -3}, "infer.mask_nms_size: expected a number above 0"),
    ("infer", {"mask_threshold": 2.0}, "infer.mask_threshold: expected a fraction"),
    ("infer", {"saliency_sigma": -1.0}, "infer.saliency_sigma: expected a smoothing width"),
    ("analysis", {"qc": {"method": "knn", "k": 0}}, "analysis.qc.k: expected a number above 0"),
])
def test_sizes_a_stage_cannot_use_fail_when_the_config_is_read(section, values, message):
    """They failed inside Ray actors (a bare ValueError from ActorPoolStrategy, torch's pad
    error), after the store had been created."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({"plates": ["p.zarr"], "output": "out", section: values})


def test_a_wrong_storage_options_value_is_not_repeated_in_the_error():
    for bad in ("key=AKIAEXAMPLE secret=wJalrSECRET", ["wJalrSECRET"]):
        with pytest.raises(ConfigError, match="storage_options: expected a mapping") as e:
            config_from_dict({"plates": ["p.zarr"], "output": "out", "storage_options": bad})
        assert "wJalrSECRET" not in str(e.value)


def test_the_record_masks_passwords_in_every_uri():
    config = config_from_dict({"plates": ["https://alice:S3cr3t@host/p.zarr"], "output": "s3://b/out",
                               "platemap": "https://bob:PW2@host/map.csv",
                               "profile": {"weights": "https://c:pw3@h/w.pt"}})
    text = str(config.to_record())
    assert "S3cr3t" not in text and "PW2" not in text and "pw3" not in text
    assert config.to_record()["plates"] == ["https://alice:***@host/p.zarr"]
    assert config.plates == ["https://alice:S3cr3t@host/p.zarr"]  # the config itself still reads them


def test_values_that_were_valid_stay_valid():
    """0 CPUs per infer actor is Ray's "reserve none"; k is read by the kNN probe only."""
    config = config_from_dict({"plates": ["p.zarr"], "output": "out", "infer": {"num_cpus": 0},
                               "analysis": {"qc": {"method": "linear", "k": 0}}})
    assert config.infer.num_cpus == 0 and config.analysis.qc.k == 0


@pytest.mark.parametrize("override, shown", [
    ("train.run_name=123", "found int 123"),
    ("report.title=2026-11-27", "found date datetime.date(2026, 11, 27)"),
])
def test_a_value_yaml_reads_as_a_number_or_date_where_text_is_expected_says_to_quote_it(override, shown):
    from rayscreen.config import parse_overrides

    with pytest.raises(ConfigError, match=re.escape(f"expected a string, {shown}; quote it to keep it text")):
        config_from_dict({"plates": ["p.zarr"], "output": "o"}, overrides=parse_overrides([override]))


def test_stages_written_with_commas_point_at_the_list_form():
    from rayscreen import pipeline
    from rayscreen.config import parse_overrides

    config = config_from_dict({"plates": ["p.zarr"], "output": "o"},
                              overrides=parse_overrides(["stages=aggregate,evaluate"]))
    with pytest.raises(ConfigError, match=re.escape("unknown stage 'aggregate,evaluate'; expected some of: ")
                       + ".*" + re.escape("(a list is written [aggregate,evaluate]")):
        pipeline.applicable_stages(config)
