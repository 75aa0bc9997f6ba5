"""Offline checks for the Ray cluster-launcher file (``cluster.yaml``).

``ray up`` needs AWS credentials before it reports most mistakes, and some it never reports: a head node that accepts
work, an image tag that moves, a tracking URI that points at a node's own disk. :func:`validate_cluster_config` runs,
without touching the network, the same steps ``ray up`` runs on the file before it calls AWS - Ray's JSON schema
(``ray/autoscaler/ray-schema.json``), ``prepare_config`` (merging the AWS defaults) and ``validate_config`` - and then
the rules this project relies on. The first problem found is raised as a :class:`~edsr_ray.errors.ConfigError` that
names the file and the key path.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from edsr_ray.config import read_config_text
from edsr_ray.errors import ConfigError

logger = logging.getLogger(__name__)

# Environment every container must carry: nothing on the cluster may report usage to outside services.
REQUIRED_ENV_VALUES = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
# Environment the jobs read: the region of the bucket, the bucket itself and the MLflow tracking server.
REQUIRED_ENV_NAMES = ("AWS_REGION", "EDSR_RAY_BUCKET", "MLFLOW_TRACKING_URI")
# Tracking URIs that live on one node's disk: runs logged there vanish with the node and each node sees its own.
_NODE_LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")
# Credentials belong to the instance profile, never to the file (it is copied to the head and often committed).
_CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_MOVING_TAGS = ("latest", "nightly")


def validate_cluster_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a cluster-launcher YAML file offline and return it as ``ray up`` would use it (Ray's defaults merged).

    Raises :class:`ConfigError` naming the file and the key path for an unreadable file, invalid YAML, a key Ray does
    not know (with the closest known key), a value Ray rejects, or a break of the project's rules: every node type
    has ``min_workers <= max_workers <= max_workers`` of the cluster; the head has ``resources: {CPU: 0}`` and no
    workers of its own type; images are ``rayproject/ray`` pinned to this Ray release (never ``ray-ml``, never a moving
    tag) with a GPU build on GPU node types; ``docker.run_options`` set the project's environment; both start
    commands export metrics; no credentials appear anywhere; on AWS every node type names an instance type, an AMI
    and an IAM instance profile.
    """
    source = str(path)
    raw = _load_yaml(Path(path), source)
    # Credentials first: later messages quote offending values, and a secret must never be one of them.
    _check_credentials(raw, source, ())
    _check_schema(raw, source)
    prepared = _ray_prepare_and_validate(raw, source)
    _check_node_types(raw, prepared, source)
    _check_images(prepared, source)
    _check_environment(prepared, source)
    _check_start_commands(prepared, source)
    if prepared["provider"].get("type") == "aws":
        _check_aws(prepared, source)
    return prepared


# ---------------------------------------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may override keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path, source: str) -> dict[str, Any]:
    text = read_config_text(path, "cluster config file")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_one_line(str(exc))}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of cluster settings, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------- Ray's own checks


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler  # the schema ships inside the installed Ray, so it always matches the Ray that runs `ray up`

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_schema(raw: dict[str, Any], source: str) -> None:
    """Validate the file as written (before defaults are merged, which would hide a misspelled top-level key)."""
    import jsonschema

    schema = _ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = list(validator.iter_errors(raw))
    if not errors:
        return
    # An unknown key is the likeliest root cause (a misspelling makes the intended key look missing), so report it
    # first; otherwise let jsonschema pick the most relevant error.
    unknown = sorted((e for e in errors if e.validator == "additionalProperties"), key=lambda e: len(e.absolute_path))
    error = unknown[0] if unknown else jsonschema.exceptions.best_match(errors)
    where = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        extra = [k for k in error.instance if k not in known and not any(re.search(p, str(k)) for p in patterns)]
        key = extra[0] if extra else "?"
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"
        raise ConfigError(f"{source}: {_key_path([*error.absolute_path, key])}: unknown key{hint}")
    raise ConfigError(f"{source}: {where}: {_one_line(error.message)}")


def _ray_prepare_and_validate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Run Ray's ``prepare_config`` and ``validate_config``, the offline part of ``ray up``'s bootstrap."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    # Ray's CLI logger prints warnings meant for the `ray` command's terminal; keep them out of our caller's stdout.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            prepared = prepare_config(copy.deepcopy(raw))
            validate_config(prepared)
    except jsonschema.ValidationError as exc:
        raise ConfigError(f"{source}: {_key_path(exc.absolute_path)}: {_one_line(exc.message)}") from None
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError, NotImplementedError) as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        raise ConfigError(f"{source}: Ray rejects the cluster config: {reason}") from None
    finally:
        if captured.getvalue().strip():
            logger.debug("ray config preparation said: %s", captured.getvalue().strip())
    return prepared


# --------------------------------------------------------------------------------------------------- project rules


def _check_credentials(node: Any, source: str, path: tuple[Any, ...]) -> None:
    """Reject access keys anywhere in the file, naming where they are and never echoing them."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if str(key).lower() == "aws_credentials" or str(key).upper() in _CREDENTIAL_NAMES:
                raise ConfigError(
                    f"{source}: {_key_path([*path, key])}: credentials must not be in the cluster file; "
                    "give the nodes an IAM instance profile (node_config.IamInstanceProfile) instead"
                )
            _check_credentials(value, source, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_credentials(value, source, (*path, i))
    elif isinstance(node, str) and (
        any(f"{name}=" in node for name in _CREDENTIAL_NAMES) or _ACCESS_KEY_ID.search(node)
    ):
        raise ConfigError(
            f"{source}: {_key_path(path)}: contains AWS credentials; they must not be in the cluster file - "
            "give the nodes an IAM instance profile (node_config.IamInstanceProfile) instead"
        )


def _check_node_types(raw: dict[str, Any], prepared: dict[str, Any], source: str) -> None:
    # Without these two keys Ray silently substitutes its own example node types (m5.large head and workers).
    for key in ("available_node_types", "head_node_type"):
        if key not in raw:
            raise ConfigError(f"{source}: {key}: must be set; otherwise Ray substitutes its example node types")
    node_types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    cluster_max = prepared["max_workers"]
    for name, spec in node_types.items():
        where = _key_path(["available_node_types", name])
        lo, hi = spec["min_workers"], spec["max_workers"]
        if lo < 0 or hi < 0:
            raise ConfigError(f"{source}: {where}: min_workers ({lo}) and max_workers ({hi}) must be >= 0")
        if lo > hi:
            raise ConfigError(f"{source}: {where}: min_workers ({lo}) is greater than max_workers ({hi})")
        if hi > cluster_max:
            raise ConfigError(
                f"{source}: {where}.max_workers: {hi} can never be reached because the cluster-wide max_workers is "
                f"{cluster_max}; raise max_workers or lower this one"
            )
    head_spec = node_types[head]
    where = _key_path(["available_node_types", head])
    # Read from the file as written: Ray's defaults must not stand in for an explicit CPU: 0.
    head_resources = raw["available_node_types"][head].get("resources") or {}
    if head_resources.get("CPU") != 0:
        got = "not set" if "CPU" not in head_resources else f"CPU: {head_resources['CPU']}"
        raise ConfigError(
            f"{source}: {where}.resources: the head node must have resources {{CPU: 0}} so that no task or actor "
            f"lands on it and starves the GCS, autoscaler and dashboard (got {got})"
        )
    if head_spec["max_workers"] != 0:
        raise ConfigError(
            f"{source}: {where}.max_workers: must be 0; extra nodes of the head's type would offer no CPU "
            f"(got {head_spec['max_workers']})"
        )
    if not any(spec["max_workers"] > 0 for name, spec in node_types.items() if name != head):
        raise ConfigError(
            f"{source}: available_node_types: no worker node type has max_workers > 0, so with a CPU: 0 head "
            "nothing could ever run"
        )


def _ray_series() -> str:
    """``major.minor`` of the installed Ray: the cluster image must run the same release."""
    major, minor = metadata.version("ray").split(".")[:2]
    return f"{major}.{minor}"


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry/repo:tag@sha256:...`` -> (repository, tag or None, digest or None)."""
    name, _, digest = image.partition("@")
    repo, tag = name, None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a colon before the last "/" is a registry port, not a tag
        repo, tag = name.rsplit(":", 1)
    return repo, tag, digest or None


def _check_image(image: Any, where: str, source: str, *, gpu_node_type: str | None) -> None:
    series = _ray_series()
    example = f"rayproject/ray:{series}.0-py311-gpu"
    if not isinstance(image, str) or not image.strip():
        raise ConfigError(f"{source}: {where}: must name a container image, e.g. {example}")
    repo, tag, digest = _split_image(image.strip())
    short_repo = repo.removeprefix("docker.io/").removeprefix("index.docker.io/")
    if short_repo == "rayproject/ray-ml":
        raise ConfigError(
            f"{source}: {where}: {image!r}: the rayproject/ray-ml images are no longer published; use {example} "
            "and install the project in setup_commands"
        )
    if short_repo == "rayproject/ray":
        if tag is None or not re.fullmatch(rf"{re.escape(series)}\.\d+(-.+)?", tag):
            raise ConfigError(
                f"{source}: {where}: {image!r} is not pinned to Ray {series}.x, the release this project runs; "
                f"use e.g. {example}"
            )
        if gpu_node_type and not re.search(r"-(gpu|cu\d+)", tag):
            raise ConfigError(
                f"{source}: {where}: {image!r} is a CPU image but node type {gpu_node_type!r} has GPUs; "
                "use a -gpu or -cuXXX tag"
            )
        return
    # Your own image (e.g. built FROM rayproject/ray with the project baked in): it must at least not move.
    if digest is None and (tag is None or tag.split("-")[0] in _MOVING_TAGS):
        raise ConfigError(
            f"{source}: {where}: {image!r} is not pinned; give it a fixed tag or a digest (@sha256:...) so every "
            "node runs the same build"
        )


def _check_images(prepared: dict[str, Any], source: str) -> None:
    docker = prepared.get("docker") or {}
    if not (docker.get("image") or (docker.get("head_image") and docker.get("worker_image"))):
        raise ConfigError(
            f"{source}: docker.image: must be set; the nodes run Ray, CUDA and Python from the container image "
            f"(e.g. rayproject/ray:{_ray_series()}.0-py311-gpu)"
        )
    head = prepared["head_node_type"]
    for name, spec in prepared["available_node_types"].items():
        per_type = (spec.get("docker") or {}).get("worker_image")
        if name == head and docker.get("head_image"):
            key, image = "docker.head_image", docker["head_image"]
        elif name != head and per_type:
            key, image = _key_path(["available_node_types", name, "docker", "worker_image"]), per_type
        elif name != head and docker.get("worker_image"):
            key, image = "docker.worker_image", docker["worker_image"]
        else:
            key, image = "docker.image", docker.get("image")
        has_gpu = (spec.get("resources") or {}).get("GPU", 0) > 0
        _check_image(image, key, source, gpu_node_type=name if has_gpu else None)


def container_env(config: Mapping[str, Any]) -> dict[str, str]:
    """Environment variables that ``docker.run_options`` (``--env``/``-e``) set in every node's container."""
    docker = config.get("docker") or {}
    # Ray joins the options with spaces into one shell command, so split them the way the shell will.
    try:
        tokens = shlex.split(" ".join(str(o) for o in docker.get("run_options") or []))
    except ValueError:
        return {}
    env: dict[str, str] = {}
    it = iter(tokens)
    for token in it:
        if token in ("-e", "--env"):
            assignment = next(it, "")
        elif token.startswith(("--env=", "-e=")):
            assignment = token.split("=", 1)[1]
        else:
            continue
        name, sep, value = assignment.partition("=")
        if sep:
            env[name] = value
    return env


def _check_environment(prepared: dict[str, Any], source: str) -> None:
    env = container_env(prepared)
    where = "docker.run_options"
    for name, value in REQUIRED_ENV_VALUES.items():
        if env.get(name) != value:
            got = "not set" if name not in env else f"got {env[name]!r}"
            raise ConfigError(
                f"{source}: {where}: must contain --env={name}={value} so nothing on the cluster reports usage "
                f"to outside services ({got})"
            )
    for name in REQUIRED_ENV_NAMES:
        if not env.get(name):
            raise ConfigError(
                f"{source}: {where}: must set {name} (--env={name}=...); every job on the cluster reads it"
            )
    uri = env["MLFLOW_TRACKING_URI"]
    scheme = urlsplit(uri).scheme.lower()
    # No scheme, file:, sqlite: or a drive letter (C:\...) all mean a file on the node that logs the run.
    if uri != "databricks" and (scheme in _NODE_LOCAL_TRACKING_SCHEMES or len(scheme) == 1):
        raise ConfigError(
            f"{source}: {where}: MLFLOW_TRACKING_URI={uri!r} is on one node's disk; runs logged there are lost with "
            "the node - point it at an MLflow server (http://... or https://...)"
        )
    if not env["EDSR_RAY_BUCKET"].startswith("s3://"):
        raise ConfigError(
            f"{source}: {where}: EDSR_RAY_BUCKET={env['EDSR_RAY_BUCKET']!r} must be an s3:// URI that every node "
            "can reach"
        )


def _check_start_commands(prepared: dict[str, Any], source: str) -> None:
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [c for c in prepared.get(key) or [] if re.search(r"\bray start\b", str(c))]
        if not starts:
            raise ConfigError(f"{source}: {key}: no `ray start` command")
        command = " ".join(str(c) for c in starts)
        if not re.search(r"--metrics-export-port[= ]\d+", command):
            raise ConfigError(
                f"{source}: {key}: `ray start` must pass --metrics-export-port=PORT so Prometheus can scrape the node"
            )
        if head and "--autoscaling-config" not in command:
            raise ConfigError(
                f"{source}: {key}: `ray start --head` must pass --autoscaling-config=~/ray_bootstrap_config.yaml, "
                "otherwise no autoscaler runs and workers are never started"
            )


def _check_aws(prepared: dict[str, Any], source: str) -> None:
    if not prepared["provider"].get("region"):
        raise ConfigError(f"{source}: provider.region: must be set for the aws provider")
    for name, spec in prepared["available_node_types"].items():
        node_config = spec["node_config"]
        where = _key_path(["available_node_types", name, "node_config"])
        if not node_config.get("InstanceType"):
            raise ConfigError(f"{source}: {where}.InstanceType: must be set")
        image_id = str(node_config.get("ImageId", "")).strip()
        if image_id.lower() in ("", "latest_dlami"):
            raise ConfigError(
                f"{source}: {where}.ImageId: must be set; Ray's fallback AMI is an Ubuntu 18.04 Deep Learning AMI "
                "whose NVIDIA driver is too old for current rayproject/ray GPU images (see the comment in "
                "cluster.yaml for a current one)"
            )
        profile = node_config.get("IamInstanceProfile")
        if not (isinstance(profile, Mapping) and (profile.get("Name") or profile.get("Arn"))):
            raise ConfigError(
                f"{source}: {where}.IamInstanceProfile: must name an instance profile ({{Name: ...}} or "
                "{Arn: ...}); it is how the node reaches S3 without keys"
            )


# ----------------------------------------------------------------------------------------------------------- helpers


def _key_path(parts: Iterable[Any]) -> str:
    """Dotted key path; keys that are not plain names are quoted: ``available_node_types["ray.head"].resources``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "(top level)"


def _one_line(text: str) -> str:
    return " ".join(text.split())
