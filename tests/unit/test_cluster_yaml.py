"""cluster.yaml passes Ray's own autoscaler schema validation and keeps its safety rules."""

import pathlib

import pytest
import yaml

CLUSTER = pathlib.Path(__file__).resolve().parents[2] / "cluster.yaml"


def _load():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_with_ray_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(_load()))


def test_schema_validation_catches_a_wrong_type():
    util = pytest.importorskip("ray.autoscaler._private.util")
    bad = _load()
    bad["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(Exception, match="not of type 'integer'"):
        util.validate_config(util.prepare_config(bad))


def test_no_keys_and_private_dashboard():
    text = CLUSTER.read_text()
    cfg = _load()
    assert "aws_access_key_id" not in text.lower() and "aws_secret_access_key" not in text.lower()
    for node in cfg["available_node_types"].values():
        assert node["node_config"]["IamInstanceProfile"]["Name"]  # S3 through an instance role
    assert all("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"] if "--head" in c)
    assert cfg["available_node_types"]["gpu"]["min_workers"] == 0 and cfg["idle_timeout_minutes"] > 0
