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
        return [logging.getLogger(name).level for name in QUIET_LOGGERS]

    assert ray_local.get(levels.remote()) == [logging.ERROR] * len(QUIET_LOGGERS)
    # and the driver's own loggers are left alone
    assert logging.getLogger(QUIET_LOGGERS[0]).level != logging.ERROR


def test_ensure_ray_leaves_a_running_ray_alone(ray_local):
    assert ensure_ray() is False and ray_local.is_initialized()
