"""cluster.yaml against the schema that ships inside the installed `ray` (what `ray up` checks), plus the
EC2 request shape for node_config (which Ray's schema leaves free-form)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching AWS: the raw file against ray-schema.json, then defaults filled in
    (prepare_config) and ray's own validate_config (schema again + head/worker consistency)."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray_up():
    prepared = ray_validate(load())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def rename(tree: dict, path: tuple[str, ...], new_key: str) -> dict:
    """A copy of `tree` with the key at `path` renamed (a misspelling)."""
    out = copy.deepcopy(tree)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[new_key] = node.pop(path[-1])
    return out


def _gpu_type(cfg: dict) -> str:
    return next(k for k in cfg["available_node_types"] if k != cfg["head_node_type"])


GPU = "<gpu worker type>"


@pytest.mark.parametrize(
    "path, typo",
    [
        (("available_node_types",), "available_node_type"),
        (("max_workers",), "max_worker"),
        (("setup_commands",), "setup_command"),
        (("available_node_types", GPU, "min_workers"), "min_worker"),
        (("available_node_types", GPU, "resources"), "resource"),
    ],
)
def test_misspelled_key_is_rejected(path, typo):
    cfg = load()
    path = tuple(_gpu_type(cfg) if k == GPU else k for k in path)
    import jsonschema

    # Either the typo is an unknown key or the real key is now missing; both name the key.
    with pytest.raises(jsonschema.ValidationError, match=f"'({typo}|{path[-1]})'"):
        ray_validate(rename(cfg, path, typo))


def test_head_node_type_must_name_a_node_type():
    cfg = load()
    cfg["head_node_type"] = "haed"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(cfg)


def _validate_node_config(node_config: dict) -> None:
    """node_config is passed to EC2 RunInstances; Ray adds MinCount/MaxCount itself."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape)
    if report.has_errors():
        raise ValueError(report.generate_report())


def test_node_configs_are_valid_ec2_run_instances_requests():
    for name, node_type in load()["available_node_types"].items():
        try:
            _validate_node_config(node_type["node_config"])
        except ValueError as e:
            pytest.fail(f"available_node_types.{name}.node_config: {e}")


def test_misspelled_node_config_key_is_rejected():
    cfg = load()
    gpu = _gpu_type(cfg)
    mutated = rename(cfg, ("available_node_types", gpu, "node_config", "InstanceType"), "InstanceTyp")
    with pytest.raises(ValueError, match="InstanceTyp"):
        _validate_node_config(mutated["available_node_types"][gpu]["node_config"])


def test_gpu_workers_autoscale_and_project_is_installed():
    cfg = load()
    gpu = cfg["available_node_types"][_gpu_type(cfg)]
    assert gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    # The project is mounted, and installed after torch (so pip keeps the CUDA build it just installed).
    mount = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    cmds = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(cmds) if "pip install" in c and "torch" in c)
    project_at = next(i for i, c in enumerate(cmds) if f"pip install -e {mount}" in c)
    assert torch_at < project_at


# Network cards with EFA per instance type (AWS): NCCL between nodes should use every one.
EFA_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}


def test_gpu_nodes_use_efa_on_every_network_card_and_share_the_heads_security_group():
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    cfg = load()
    node = cfg["available_node_types"][_gpu_type(cfg)]["node_config"]
    cards = EFA_CARDS.get(node["InstanceType"])
    if cards is None:
        pytest.skip(f"{node['InstanceType']} has no EFA")
    nics = node["NetworkInterfaces"]
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(cards))
    assert all(n["InterfaceType"] == "efa" for n in nics)
    assert [n["DeviceIndex"] for n in nics if n["NetworkCardIndex"] == 0] == [0]
    # Ray's own rule for interfaces (subnet and groups inside each one, none beside them) as `ray up` applies it
    ray_node = _configure_subnets_and_groups_from_network_interfaces(node)
    head_groups = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["SecurityGroupIds"]
    assert set(ray_node["SecurityGroupIds"]) == set(head_groups) and len(set(ray_node["SubnetIds"])) == 1
    # libfabric is told to use EFA on the workers
    assert any("FI_PROVIDER=efa" in c for c in cfg["worker_start_ray_commands"])
