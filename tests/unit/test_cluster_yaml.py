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


def test_nodes_run_an_image_that_can_install_the_package():
    """The host AMI's Python (Ubuntu 22.04: 3.10, no pip) cannot install rayscreen: every node
    runs Ray's image, whose Python satisfies requires-python, GPU nodes its -gpu variant."""
    import re
    import tomllib

    cfg = _load()
    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    minimum = tuple(int(p) for p in re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    images = {cfg["docker"]["image"]} | {n["docker"]["worker_image"] for n in cfg["available_node_types"].values()
                                         if "docker" in n}
    for image in images:
        major, minor = re.search(r"-py(\d)(\d+)-", image).groups()
        assert (int(major), int(minor)) >= minimum, image
    for name, node in cfg["available_node_types"].items():
        gpu = node["node_config"]["InstanceType"].startswith(("g", "p"))
        image = node.get("docker", {}).get("worker_image", cfg["docker"]["image"])
        assert image.endswith("-gpu") == gpu, (name, image)
    assert any("pip install -e ~/rayscreen" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]["~/rayscreen"] == "."
