"""The shipped cluster.yaml passes Ray's own checks and the project's rules; broken variants fail with clear errors."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from edsr_ray.errors import ConfigError
from edsr_ray.infra.launcher import container_env, validate_cluster_config

ROOT = Path(__file__).parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY_SERIES = ".".join(ray.__version__.split(".")[:2])


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture
def variant(shipped, tmp_path) -> Callable[[Callable[[dict[str, Any]], Any]], Path]:
    """Write a copy of the shipped config changed by ``mutate`` and return its path."""

    def make(mutate: Callable[[dict[str, Any]], Any]) -> Path:
        config = copy.deepcopy(shipped)
        mutate(config)
        path = tmp_path / "variant.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return make


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        validate_cluster_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message  # every error names the file first
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------- the shipped file


def test_shipped_config_passes_rays_own_schema_and_validation(shipped):
    # Independent of edsr_ray.infra.launcher: call jsonschema and Ray's functions directly, as `ray up` does.
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(shipped, json.loads(schema_path.read_text()))
    validate_config(prepare_config(copy.deepcopy(shipped)))


def test_shipped_config_meets_project_rules(shipped):
    prepared = validate_cluster_config(CLUSTER_YAML)
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert shipped["available_node_types"][head]["resources"] == {"CPU": 0}
    assert types[head]["max_workers"] == 0

    image = prepared["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_SERIES)}\.\d+-py\d+-gpu", image), image
    gpu_types = {name for name, spec in types.items() if spec["resources"].get("GPU", 0) > 0}
    assert {"gpu_a10g", "gpu_l4", "gpu_a100x8", "gpu_h100x8"} <= gpu_types
    for name, spec in types.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= prepared["max_workers"], name
        node_config = spec["node_config"]
        assert node_config["IamInstanceProfile"].get("Name"), name
        assert node_config["ImageId"], name
        assert node_config["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100, name

    env = container_env(prepared)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["AWS_REGION"] == prepared["provider"]["region"]
    assert env["EDSR_RAY_BUCKET"].startswith("s3://")
    assert env["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("--metrics-export-port=8080" in c for c in prepared[key]), key
    # Ray's defaults must not slip in anywhere: the setup installs this project, nothing else.
    assert prepared["head_setup_commands"] == prepared["worker_setup_commands"] == shipped["setup_commands"]


def test_shipped_config_holds_no_credentials():
    text = CLUSTER_YAML.read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "aws_credentials"):
        assert name not in text
    assert not re.search(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", text)


# --------------------------------------------------------------------------------------------- Ray's schema and rules


@pytest.mark.parametrize(
    ("mutate", "wrong", "right", "where"),
    [
        (
            lambda c: c.__setitem__("availble_node_types", c.pop("available_node_types")),
            "availble_node_types",
            "available_node_types",
            "availble_node_types",
        ),
        (
            lambda c: c["available_node_types"]["gpu_a10g"].__setitem__(
                "min_worker", c["available_node_types"]["gpu_a10g"].pop("min_workers")
            ),
            "min_worker",
            "min_workers",
            "available_node_types.gpu_a10g.min_worker",
        ),
        (
            lambda c: c["docker"].__setitem__("run_option", c["docker"].pop("run_options")),
            "run_option",
            "run_options",
            "docker.run_option",
        ),
    ],
    ids=["top-level", "node-type", "docker"],
)
def test_misspelled_key_is_named_with_the_intended_one(variant, mutate, wrong, right, where):
    message = _error(variant(mutate))
    assert f"{where}: unknown key" in message
    assert f"did you mean {right!r}" in message
    assert wrong in message


def test_node_type_names_with_dots_are_quoted_in_key_paths(variant):
    def mutate(c):
        spec = c["available_node_types"].pop("gpu_l4")
        spec["maxworkers"] = spec.pop("max_workers")
        c["available_node_types"]["ray.worker.l4"] = spec

    assert 'available_node_types["ray.worker.l4"].maxworkers: unknown key' in _error(variant(mutate))


def test_wrong_type_names_the_key(variant):
    message = _error(variant(lambda c: c.update(max_workers="sixteen")))
    assert "max_workers: 'sixteen' is not of type 'integer'" in message


def test_rays_own_validation_runs(variant):
    # Ray (not the schema) rejects a cluster whose node types need more nodes than the global max_workers allows.
    def mutate(c):
        c["max_workers"] = 3
        for name in ("gpu_a10g", "gpu_l4"):
            c["available_node_types"][name].update(min_workers=2, max_workers=2)

    message = _error(variant(mutate))
    assert "Ray rejects the cluster config" in message
    assert "sum of `min_workers`" in message


# --------------------------------------------------------------------------------------------------- project rules


def test_min_workers_above_max_workers(variant):
    message = _error(variant(lambda c: c["available_node_types"]["gpu_l4"].update(min_workers=3, max_workers=1)))
    assert "available_node_types.gpu_l4: min_workers (3) is greater than max_workers (1)" in message


def test_node_type_max_workers_above_cluster_max_workers(variant):
    message = _error(variant(lambda c: c["available_node_types"]["gpu_a10g"].update(max_workers=40)))
    assert "available_node_types.gpu_a10g.max_workers: 40 can never be reached" in message
    assert "max_workers is 16" in message


@pytest.mark.parametrize(("resources", "got"), [({"CPU": 2}, "CPU: 2"), ({}, "not set"), ({"GPU": 0}, "not set")])
def test_head_must_offer_no_cpu(variant, resources, got):
    message = _error(variant(lambda c: c["available_node_types"]["head"].update(resources=resources)))
    assert "available_node_types.head.resources" in message
    assert "{CPU: 0}" in message
    assert f"(got {got})" in message


def test_head_type_must_not_scale(variant):
    message = _error(variant(lambda c: c["available_node_types"]["head"].update(max_workers=2)))
    assert "available_node_types.head.max_workers: must be 0" in message


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("rayproject/ray:latest-gpu", f"not pinned to Ray {RAY_SERIES}.x"),
        ("rayproject/ray", f"not pinned to Ray {RAY_SERIES}.x"),
        ("rayproject/ray:2.9.3-py311-gpu", f"not pinned to Ray {RAY_SERIES}.x"),
        (f"rayproject/ray-ml:{RAY_SERIES}.0-py311-gpu", "ray-ml images are no longer published"),
        (f"rayproject/ray:{RAY_SERIES}.0-py311-cpu", "is a CPU image but node type"),
        ("registry.example.com:5000/team/edsr-ray:latest", "is not pinned"),
        ("registry.example.com:5000/team/edsr-ray", "is not pinned"),
    ],
)
def test_image_must_be_a_pinned_ray_release(variant, image, problem):
    message = _error(variant(lambda c: c["docker"].update(image=image)))
    assert f"docker.image: {image!r}" in message
    assert problem in message


@pytest.mark.parametrize(
    "image",
    [
        f"rayproject/ray:{RAY_SERIES}.1-py311-cu128",
        "registry.example.com:5000/team/edsr-ray:0.1.0-ray2.60",
        "registry.example.com/edsr-ray@sha256:" + "0" * 64,
    ],
)
def test_pinned_images_are_accepted(variant, image):
    assert validate_cluster_config(variant(lambda c: c["docker"].update(image=image)))["docker"]["image"] == image


def test_per_node_type_worker_image_is_checked(variant):
    def mutate(c):
        c["available_node_types"]["gpu_h100x8"]["docker"] = {"worker_image": "rayproject/ray:nightly-gpu"}

    assert "available_node_types.gpu_h100x8.docker.worker_image: 'rayproject/ray:nightly-gpu'" in _error(
        variant(mutate)
    )


def test_docker_is_required(variant):
    assert "docker.image: must be set" in _error(variant(lambda c: c.pop("docker")))


def test_credentials_are_rejected_without_being_echoed(variant):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    message = _error(variant(lambda c: c["docker"]["run_options"].append(f"--env=AWS_SECRET_ACCESS_KEY={secret}")))
    assert "docker.run_options[" in message
    assert "IamInstanceProfile" in message
    assert secret not in message

    message = _error(variant(lambda c: c["provider"].update(aws_credentials={"aws_access_key_id": "AKIA..."})))
    assert "provider.aws_credentials: credentials must not be in the cluster file" in message


@pytest.mark.parametrize(
    ("option", "replacement", "problem"),
    [
        ("--env=RAY_USAGE_STATS_ENABLED=0", None, "--env=RAY_USAGE_STATS_ENABLED=0"),
        ("--env=RAY_USAGE_STATS_ENABLED=0", "--env=RAY_USAGE_STATS_ENABLED=1", "(got '1')"),
        ("--env=MLFLOW_DISABLE_TELEMETRY=true", None, "--env=MLFLOW_DISABLE_TELEMETRY=true"),
        ("--env=AWS_REGION=us-west-2", None, "must set AWS_REGION"),
        ("--env=EDSR_RAY_BUCKET=s3://your-edsr-ray-bucket", "--env=EDSR_RAY_BUCKET=/data", "must be an s3:// URI"),
        (
            "--env=MLFLOW_TRACKING_URI=http://mlflow.example.internal:5000",
            "--env=MLFLOW_TRACKING_URI=sqlite:///mlflow.db",
            "is on one node's disk",
        ),
        (
            "--env=MLFLOW_TRACKING_URI=http://mlflow.example.internal:5000",
            "--env=MLFLOW_TRACKING_URI=/home/ray/mlruns",
            "is on one node's disk",
        ),
    ],
)
def test_container_environment_rules(variant, option, replacement, problem):
    def mutate(c):
        options = c["docker"]["run_options"]
        i = options.index(option)
        if replacement is None:
            del options[i]
        else:
            options[i] = replacement

    message = _error(variant(mutate))
    assert "docker.run_options: " in message
    assert problem in message


def test_container_env_reads_every_docker_spelling():
    config = {"docker": {"run_options": ["--env=A=1", "-e B=two", "--env", "C=x=y", "-e=D=", "--ulimit nofile=1:1"]}}
    assert container_env(config) == {"A": "1", "B": "two", "C": "x=y", "D": ""}
    assert container_env({}) == {}


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_must_export_metrics(variant, key):
    def mutate(c):
        c[key] = [cmd.replace(" --metrics-export-port=8080", "") for cmd in c[key]]

    assert f"{key}: `ray start` must pass --metrics-export-port" in _error(variant(mutate))


def test_rays_default_start_commands_are_not_enough(variant):
    # Leaving the key out brings in Ray's defaults, which export no metrics.
    message = _error(variant(lambda c: c.pop("head_start_ray_commands")))
    assert "head_start_ray_commands: `ray start` must pass" in message


def test_head_start_needs_the_autoscaler(variant):
    def mutate(c):
        c["head_start_ray_commands"] = ["ray stop", "ray start --head --port=6379 --metrics-export-port=8080"]

    assert "--autoscaling-config" in _error(variant(mutate))


@pytest.mark.parametrize(
    ("field", "problem"),
    [("IamInstanceProfile", "must name an instance profile"), ("ImageId", "must be set"), ("InstanceType", "set")],
)
def test_aws_node_config_rules(variant, field, problem):
    message = _error(variant(lambda c: c["available_node_types"]["gpu_l4"]["node_config"].pop(field)))
    assert f"available_node_types.gpu_l4.node_config.{field}: " in message
    assert problem in message


def test_latest_dlami_is_rejected(variant):
    message = _error(variant(lambda c: c["available_node_types"]["head"]["node_config"].update(ImageId="latest_dlami")))
    assert "available_node_types.head.node_config.ImageId" in message


def test_missing_node_types_is_not_replaced_by_rays_examples(variant):
    assert "available_node_types: must be set" in _error(
        variant(lambda c: [c.pop("available_node_types"), c.pop("head_node_type")])
    )


# ------------------------------------------------------------------------------------------------ unreadable inputs


def test_unreadable_files(tmp_path, finishes):
    missing = tmp_path / "missing.yaml"
    assert "cluster config file not found" in _error(missing)

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file: a FIFO" in finishes(lambda: _error(fifo), 20)

    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster_name: a\nprovider: [unclosed\n")
    assert "not valid YAML" in _error(broken)

    twice = tmp_path / "twice.yaml"
    twice.write_text("cluster_name: a\nmax_workers: 2\nmax_workers: 3\n")
    message = _error(twice)
    assert "'max_workers' appears twice" in message
    assert "line 3" in message

    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "the top level must be a mapping" in _error(listing)


# ------------------------------------------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "validate_cluster.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_ok():
    proc = _cli("cluster.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"


def test_cli_error_is_one_line_and_exit_2(variant):
    path = variant(lambda c: c["available_node_types"]["gpu_a10g"].update(min_workers=9, max_workers=2))
    proc = _cli(str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == f"error: {path}: available_node_types.gpu_a10g: min_workers (9) is greater than max_workers (2)"
