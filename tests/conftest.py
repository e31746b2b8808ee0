import os
import socket
import subprocess
import sys
import time

import pytest

from rayscreen.raylocal import free_port

# Tests never reach the network; AWS credentials for the local S3 server come from the
# environment, the standard place, and are dummies.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Set before any Ray worker starts, so that workers inherit them like a driver's environment.
S3_SECRET = "rs-dummy-secret-must-never-appear"
os.environ["AWS_ACCESS_KEY_ID"] = "rs-dummy-key"
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


# The longest modules first (their times: docs/benchmarks.md, "Test suite"). With two workers
# (`make test TEST_WORKERS=2`), pytest-xdist's --dist loadscope hands whole modules to the
# workers in collection order, and a long module collected late ran alone at the end while
# the other worker had nothing left.
LONGEST_FIRST = ("integration/test_demo.py", "integration/test_job_submit.py", "integration/test_infer.py",
                 "integration/test_train.py", "integration/test_train_deterministic.py",
                 "integration/test_profile_moa.py", "integration/test_learned_profiles.py",
                 "integration/test_train_options.py", "integration/test_stream.py")


def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(os.path.abspath(__file__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a stable sort: the other modules, and the tests within each, keep their order
    items.sort(key=lambda item: rank.get(os.path.relpath(str(item.path), tests), len(rank)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 2 CPUs, shared by the integration tests."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from rayscreen.raylocal import local_init_kwargs

        # the local Ray rayscreen starts (kept idle workers, quiet internals), with a small
        # object store: several test sessions may share this machine
        ray.init(**local_init_kwargs(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_log(tmp_path_factory):
    """Path of the request log of :func:`s3_server` (one werkzeug line per request answered)."""
    return str(tmp_path_factory.mktemp("moto") / "requests.log")


@pytest.fixture(scope="session")
def s3_server(s3_log):
    """moto's S3 server on 127.0.0.1 in its own process; yields storage_options for s3fs."""
    port = free_port()
    env = dict(os.environ)
    log = open(s3_log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start on 127.0.0.1")
    yield {"endpoint_url": endpoint}
    proc.terminate()
    proc.wait(10)
    log.close()


@pytest.fixture
def s3_bucket(s3_server, request):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"])
    name = "rs-" + request.node.name.lower().replace("_", "-")[:40]
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}", s3_server
