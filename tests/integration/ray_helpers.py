"""Checks on the local Ray shared by the integration tests."""

import time


def assert_cpus_come_back(ray, within: float = 20.0) -> None:
    """Wait until every CPU of the local Ray is free again (an actor pool has gone), failing
    after ``within`` seconds with what is still taken."""
    deadline = time.time() + within
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, f"CPUs still held after {within:.0f} s: {ray.available_resources()}"
        time.sleep(0.2)
