"""The config parser: strict, typed, errors name the dotted key and its line."""

import pytest

from rayscreen.config import Config, ConfigError, config_from_dict, dump_config, load_config, parse_overrides

MINIMAL = "plates: [plates/*.zarr]\noutput: out\n"


def test_defaults_and_sections():
    c = load_config(MINIMAL + "train:\n  epochs: 3\n  split:\n    by: plate\n")
    assert isinstance(c, Config)
    assert c.plates == ["plates/*.zarr"] and c.output == "out"
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
