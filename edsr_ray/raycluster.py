"""Connecting a command to Ray: the job's cluster when there is one, else a private local instance."""

from __future__ import annotations

import os

# Settings every process the project starts must have: nothing calls outside the machine.
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def quiet_environment() -> None:
    """Put the telemetry switches of :data:`QUIET_ENV` into this process's environment (values already set stay), so
    that it and every process it starts keep their usage data on the machine."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def ensure_ray(*, log_to_driver: bool = False, include_dashboard: bool = False) -> None:
    """Use the current Ray connection, else the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``; ``auto``
    joins the cluster started on this machine with ``ray start``), else start a private local Ray.

    A cluster that merely runs on this machine is not joined unasked: it may be someone else's. The telemetry
    settings reach the workers through the runtime env, except those the job's own runtime env already sets (Ray
    refuses to merge two runtime envs that name the same variable, even with the same value).
    """
    import ray

    if ray.is_initialized():
        return
    missing = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    quiet_environment()
    runtime_env = {"env_vars": missing} if missing else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local", include_dashboard=include_dashboard, log_to_driver=log_to_driver, runtime_env=runtime_env
        )
