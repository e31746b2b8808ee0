"""The local Ray that rayscreen starts: its settings reach the worker processes."""

import logging

import pytest

from rayscreen.raylocal import QUIET_LOGGERS, ensure_ray

pytestmark = pytest.mark.integration


def test_worker_processes_run_the_setup_hook(ray_local):
    """Every worker of the local Ray runs ``quiet_ray_loggers`` before any task: Ray Train's
    placement-group cleaner would otherwise log a warning a second without a dashboard."""

    @ray_local.remote
    def levels():
        # the per-epoch INFO loggers, looked up the way Ray Train names them
        import ray.train._internal.storage as v1_storage
        import ray.train.v2._internal.execution.context as context
        import ray.train.v2._internal.execution.storage as storage

        report = [logging.getLogger(context.__file__), logging.getLogger(storage.__name__),
                  logging.getLogger(v1_storage.__name__)]
        return [logging.getLogger(name).level for name in QUIET_LOGGERS], [lg.level for lg in report]

    quiet, report = ray_local.get(levels.remote())
    assert quiet == [logging.ERROR] * len(QUIET_LOGGERS)
    assert report == [logging.WARNING] * 3
    # and the driver's own loggers are left alone
    assert logging.getLogger(QUIET_LOGGERS[0]).level != logging.ERROR


def test_ensure_ray_leaves_a_running_ray_alone(ray_local):
    assert ensure_ray() is False and ray_local.is_initialized()
