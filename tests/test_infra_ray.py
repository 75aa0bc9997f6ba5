"""edsr_ray.infra.ray: a local instance that the processes it starts can find, Ray's driver messages routed through
this process's logging, and the project's own worker messages relayed to the driver."""

from __future__ import annotations

import logging
import os

import pytest

from edsr_ray.infra.ray import ADDRESS_ENV, QUIET_ENV, ensure_ray, forward_logs, relayed_logs, stop_ray


@pytest.fixture(scope="module")
def local_ray():
    import ray

    assert not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(ADDRESS_ENV, raising=False)
        ensure_ray(num_cpus=2, object_store_memory=100 * 1024**2)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            stop_ray()
    assert ADDRESS_ENV not in os.environ, "the address of a stopped instance is taken out of the environment"


def _worker_env(names):
    import ray

    @ray.remote(num_cpus=0)
    def read(keys):
        return {k: os.environ.get(k) for k in keys}

    return ray.get(read.remote(list(names)))


@pytest.mark.slow
def test_processes_of_a_local_instance_find_it_by_its_address(local_ray):
    # Ray's own helpers that look for "the" cluster (Train's placement-group cleaner) read RAY_ADDRESS: with it set,
    # another Ray instance on the machine cannot make them fail.
    assert os.environ[ADDRESS_ENV] == local_ray
    seen = _worker_env([ADDRESS_ENV, *QUIET_ENV])
    assert seen[ADDRESS_ENV] == local_ray
    assert "RAY_GCS_SERVER_PORT" not in os.environ, "the port setting is for the start only"
    assert all(seen[k] == v for k, v in QUIET_ENV.items())


@pytest.mark.slow
def test_ray_driver_messages_go_through_this_process_logging(local_ray, caplog):
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        terminal = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        assert not terminal and logger.propagate, name
    with caplog.at_level(logging.INFO):
        logging.getLogger("ray.data._internal.demo").warning("progress bars disabled")
    assert [r.name for r in caplog.records] == ["ray.data._internal.demo"]


@pytest.mark.slow
def test_project_messages_of_workers_reach_the_driver(local_ray, caplog):
    import ray

    @ray.remote(num_cpus=0)
    def work(mailbox):
        forward_logs(mailbox, "rank 0")
        logging.getLogger("edsr_ray.demo").info("step 10/60 loss 1.5")
        logging.getLogger("ray.demo").warning("an internal note")  # Ray's own: stays in the worker's log file
        logging.getLogger("edsr_ray.demo").debug("below the relayed level")
        return True

    with caplog.at_level(logging.INFO, logger="edsr_ray"), relayed_logs() as mailbox:
        assert ray.get(work.remote(mailbox))
    relayed = [r for r in caplog.records if r.name.startswith("edsr_ray.demo")]
    assert [(r.name, r.levelno, r.getMessage()) for r in relayed] == [
        ("edsr_ray.demo", logging.INFO, "(rank 0) step 10/60 loss 1.5")
    ]
    # Stamped with the worker's time, seconds and milliseconds alike.
    assert relayed[0].msecs == pytest.approx((relayed[0].created % 1) * 1000, abs=1)
