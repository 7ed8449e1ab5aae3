"""cluster.yaml passes Ray's own cluster-launcher validation and installs the project."""

import copy

import pytest
import yaml

from conftest import REPO


def load():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def validate(cfg):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_is_valid_for_the_launcher():
    cfg = load()
    validate(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("GPU" in str(t) or "g6" in str(t.get("node_config")) for t in cfg["available_node_types"].values())
    assert any("pip install -e /home/ubuntu/saeforge" in c for c in cfg["setup_commands"])


def test_validation_rejects_unknown_keys():
    cfg = load()
    cfg["not_a_ray_key"] = 1
    from jsonschema.exceptions import ValidationError

    with pytest.raises(ValidationError, match="not_a_ray_key"):
        validate(cfg)


def test_the_dashboard_listens_on_localhost_and_versions_are_pinned():
    """The Jobs API runs whatever it is sent: it must not listen on the head's public address.
    Every package the setup installs is pinned, so every node runs the versions tested."""
    import re

    cfg = load()
    (start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in str(cfg)
    for command in cfg["setup_commands"]:
        for spec in re.findall(r"install (.+)", command.split("#")[0]):
            for package in spec.split():
                assert package.startswith(("-e", "/")) or "==" in package, (package, command)
