"""``ray job submit`` for real: a Ray head on 127.0.0.1 with token authentication on, the
repo uploaded as the job's working directory, the job's outputs checked from here.

The head: ``ray start --head --block`` in its own process group, every port chosen free
(other test sessions may run Ray on this machine), its own ``--temp-dir``. Teardown
never runs ``ray stop``: that kills every Ray process of the machine, other people's
clusters included. It sends SIGTERM to our ``ray start --block`` process (which shuts
down the processes it started), then kills whatever is left of our process group and any
process whose command line names our temp dir, by pid.

Authentication (Ray 2.60, ``ray/_private/authentication``): with ``RAY_AUTH_MODE=token``
the head, the dashboard's job API and the job's driver all require the token; it is read
from ``RAY_AUTH_TOKEN`` (else ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``). The
test puts a fresh random token in the environment of ``ray start`` and ``ray job
submit`` only, so it never touches ``~/.ray``; the job inherits it from the head. A
request without the token is refused (401), and the test checks that.

The job runs ``python`` from the head's ``PATH``, where this venv's ``bin`` comes first, so
it uses the same interpreter and packages; the uploaded copy of the repo comes first on
its ``sys.path``. Inputs and outputs are absolute paths under the test's tmp dir.

The pipeline: :func:`test_pipeline_job` runs ``jobs/pipeline.py`` on a tiny synthetic
screen when ``RUN_PIPELINE`` below is True (until then it skips, saying so);
``PIPELINE_CONFIG`` is the config it submits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from rayscreen.raylocal import free_port

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
RAY = os.path.join(VENV_BIN, "ray")
# Never uploaded with --working-dir: the venv, outputs, caches (Ray also skips .git/.venv itself).
EXCLUDES = [".venv", ".git", "demo_out", "bench_out", "out", "*.egg-info", "**/__pycache__", ".pytest_cache",
            ".ruff_cache", "*.zarr"]


@dataclass
class RayHead:
    address: str  # http://127.0.0.1:<dashboard port>: the job API
    env: dict  # environment for `ray job ...` commands (holds the token; never printed)
    temp_dir: str
    proc: subprocess.Popen


@dataclass
class JobResult:
    submission_id: str
    status: str  # SUCCEEDED, FAILED, STOPPED, ...
    logs: str
    submit_output: str


def start_head(timeout: float = 120) -> RayHead:
    """A Ray head on 127.0.0.1 with 2 CPUs and token auth; returns once its job API answers."""
    # short: Ray's socket paths have a length limit. Named <root>/ray, Ray's default layout under
    # RAY_TMPDIR=<root>, so that a process given that RAY_TMPDIR sees this head as "the cluster
    # `ray start` began on this machine" (test_local_run_beside_a_ray_start_cluster)
    temp_dir = os.path.join(tempfile.mkdtemp(prefix="rsjob", dir="/tmp"), "ray")
    os.makedirs(temp_dir)
    token = secrets.token_hex(32)
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM, `ray start --block` first drains the node for
    # Ray Serve (30 s by default, Ray 2.60); nothing here serves, so teardown skips that wait.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "ray_start.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp_dir)
    head = RayHead(f"http://127.0.0.1:{dashboard}", env, temp_dir, proc)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            stop_head(head)
            pytest.fail(f"ray start exited with {proc.returncode}: {_tail(os.path.join(temp_dir, 'ray_start.log'))}")
        try:
            req = urllib.request.Request(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return head
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_head(head)
    pytest.fail(f"the Ray head's job API did not answer within {timeout} s: "
                f"{_tail(os.path.join(temp_dir, 'ray_start.log'))}")


def stop_head(head: RayHead, grace: float = 45) -> None:
    """Stop only what this test started (see the module docstring: no `ray stop`)."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)  # ray start --block drains, then stops its processes
        try:
            head.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.proc.pid, signal.SIGKILL)  # the group is ours: start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass
    head.proc.wait(10)
    for pid in _pids_mentioning(head.temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    shutil.rmtree(os.path.dirname(head.temp_dir), ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


def submit_job(head: RayHead, entrypoint_args: list[str], *, working_dir: str = REPO, timeout: float = 300,
               env_vars: dict | None = None) -> JobResult:
    """``ray job submit --address <head> --working-dir <repo> -- python <entrypoint_args...>``;
    waits for the job to end (the CLI tails its logs) and returns its final status and logs."""
    sid = f"rayscreen-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"excludes": EXCLUDES, "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **(env_vars or {})}}
    cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", sid, "--working-dir", working_dir,
           "--runtime-env-json", json.dumps(runtime_env), "--log-style", "record", "--", "python", *entrypoint_args]
    try:
        proc = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=timeout)
        submit_output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        subprocess.run([RAY, "job", "stop", "--address", head.address, sid], env=head.env, capture_output=True,
                       timeout=60)
        pytest.fail(f"job {sid} did not finish within {timeout} s: {(e.stdout or b'')[-3000:]!r}")
    info = job_info(head, sid)
    return JobResult(sid, info.get("status", "UNKNOWN"), _job_cli(head, "logs", sid), submit_output)


def job_info(head: RayHead, sid: str) -> dict:
    """The job API's record of a job (``status``, ``message``, ...), fetched with the token."""
    req = urllib.request.Request(f"{head.address}/api/jobs/{sid}",
                                 headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _job_cli(head: RayHead, verb: str, sid: str) -> str:
    proc = subprocess.run([RAY, "job", verb, "--address", head.address, "--log-style", "record", sid], env=head.env,
                          capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def ray_head():
    if not os.path.exists(RAY):
        pytest.skip(f"{RAY} not found: the test submits jobs with this venv's ray CLI")
    head = start_head()
    try:
        yield head
    finally:
        stop_head(head)


# What every stage does first (argv[2] "ensure": join RAY_ADDRESS's cluster or start a local
# Ray), or what the test fixture and the benchmarks do ("direct": always a local Ray). Then,
# unless argv[3] is "no-probe", an actor asks the state API about itself, as Ray Train's
# placement-group cleaner asks about the training controller every second: "None" (not
# found) means it asked another cluster, and the cleaner would remove a live run's
# placement group. Prints the GCS address, the answer and the dashboard port the Ray recorded.
ENSURE_RAY = """
import sys, json, ray
from ray._private import ray_constants
from ray.experimental.internal_kv import _internal_kv_get
from rayscreen.raylocal import ensure_ray, local_init_kwargs
kwargs, mode, probe = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
ensure_ray(**kwargs) if mode == "ensure" else ray.init(**local_init_kwargs(**kwargs))

@ray.remote(num_cpus=0)
class Probe:
    def state(self):
        from ray.util.state import get_actor
        from ray.util.state.exception import RayStateApiException
        try:
            found = get_actor(ray.get_runtime_context().get_actor_id(), timeout=10)
        except RayStateApiException:
            return "unavailable"  # no dashboard: the cleaner keeps waiting, harmless
        except ConnectionError:
            return "ambiguous"  # several Rays on the machine and no RAY_ADDRESS to choose one
        return found.state if found else "None"

state = ray.get(Probe.remote().state.remote()) if probe == "probe" else "-"
dashboard = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
print("gcs", ray.get_runtime_context().gcs_address, state, (dashboard or b"-:0").decode().rsplit(":", 1)[1])
ray.shutdown()
"""


def test_local_run_beside_a_ray_start_cluster(ray_head):
    """A laptop run while a cluster started with ``ray start`` runs on the machine. Without
    RAY_ADDRESS rayscreen starts a Ray of its own: ``ray.init()`` alone would join that
    cluster and then refuse rayscreen's local settings (ValueError: "When connecting to an
    existing cluster, _system_config must not be provided"). Its workers' state API must ask
    their own cluster, not the ``ray start`` one (nor this test session's Ray), also when
    the driver has a RAY_ADDRESS but starts a local Ray anyway. With RAY_ADDRESS=auto it
    joins the cluster.

    The subprocesses carry the head's token (``ray_head.env``): that is what lets a state
    API that wrongly asks the head get an answer ("None") rather than a 401, so the test
    sees the wrong cluster instead of a harmless "unavailable"."""
    address_file = os.path.join(ray_head.temp_dir, "ray_current_cluster")
    deadline = time.time() + 60  # `ray start` writes it just after its job API answers
    while not os.path.exists(address_file) and time.time() < deadline:
        time.sleep(0.5)
    with open(address_file) as f:
        head_gcs = f.read().strip()
    head_port = head_gcs.rsplit(":", 1)[1]
    root = os.path.dirname(ray_head.temp_dir)
    env = dict(ray_head.env, RAY_TMPDIR=root)  # where ray.init looks for "the latest ray start cluster"
    env.pop("RAY_ADDRESS", None)

    def run(env: dict, mode: str = "ensure", probe: str = "probe", **kwargs) -> tuple[str, str, int]:
        proc = subprocess.run([os.path.join(VENV_BIN, "python"), "-c", ENSURE_RAY, json.dumps(kwargs), mode, probe],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        gcs, state, dashboard = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("gcs ")][0]
        return gcs.rsplit(":", 1)[1], state, int(dashboard)

    cases = [  # (driver's RAY_ADDRESS, how Ray is started, kwargs)
        (None, "ensure", {"num_cpus": 1, "include_dashboard": False}),  # the demo's local Ray
        (None, "ensure", {"num_cpus": 1}),  # the CLI's, with a dashboard
        ("local", "ensure", {"num_cpus": 1, "include_dashboard": False}),
        (head_gcs, "direct", {"num_cpus": 1, "include_dashboard": False}),  # fixture/benchmarks under a RAY_ADDRESS
    ]
    for address, mode, kwargs in cases:
        port, state, dashboard = run(dict(env, RAY_ADDRESS=address) if address else env, mode, **kwargs)
        assert port != head_port, (address, kwargs)
        assert state in ("ALIVE", "unavailable"), (address, kwargs, state)
        if kwargs.get("include_dashboard") is False:
            # not the default 8265, which another cluster's dashboard may hold
            assert dashboard != 8265, (address, kwargs, dashboard)
    # joining: node settings (num_cpus) are dropped, not refused. The head's own workers' state
    # API is the head's business (with other Rays on the machine it may guess), so no probe.
    port, _, _ = run(dict(env, RAY_ADDRESS="auto"), "ensure", "no-probe", num_cpus=1)
    assert port == head_port


def test_job_api_requires_the_token(ray_head):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=5)
    assert err.value.code == 401
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"}
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a wrong token
    proc = subprocess.run([RAY, "job", "list", "--address", ray_head.address], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0


def test_ingest_job(ray_head, tmp_path):
    """jobs/ingest.py through ray job submit: a LoadData CSV of TIFFs in, OME-Zarr plates out,
    pixels identical to the source plates."""
    from rayscreen.ingest.export import export_loaddata
    from rayscreen.store import open_plate
    from rayscreen.testing.plates import make_plate

    src = make_plate(str(tmp_path / "src" / "P1.zarr"), "P1", wells=("A01", "B02"), fields=2,
                     channels=("DNA", "Actin"), field_shape=(24, 32))
    csv = export_loaddata([src], str(tmp_path / "raw"))
    out = str(tmp_path / "plates")
    result = submit_job(ray_head, ["jobs/ingest.py", csv, out], timeout=240)
    assert result.status == "SUCCEEDED", f"{result.status}\n{result.logs[-4000:]}\n{result.submit_output[-2000:]}"
    assert os.path.join(out, "P1.zarr") in result.logs  # the job printed the plate it wrote
    plate, source = open_plate(os.path.join(out, "P1.zarr")), open_plate(src)
    assert plate.wells == ["A01", "B02"] and plate.channels == ["DNA", "Actin"]
    for well in plate.wells:
        for field in plate.fields(well):
            np.testing.assert_array_equal(plate.read(well, field), source.read(well, field))
    assert "RAY_AUTH_TOKEN" not in result.logs and ray_head.env["RAY_AUTH_TOKEN"] not in result.logs


# Switch: the pipeline job runs when this is True (or RAYSCREEN_TEST_PIPELINE=1 is set).
RUN_PIPELINE = True

# The tiny screen of the pipeline job; the lead adjusts keys as the stages settle.
PIPELINE_CONFIG = """\
plates: [{plates}/*.zarr]
output: {output}
stages: [illum, train, infer, report]
label:
  column: Metadata_Label
  positive: [positive]
  negative: [negative]
model:
  name: wscnn
train:
  epochs: 1
  batch_size: 8
  num_workers: 1
  use_gpu: false
  split: {{by: well, val: 0.25, test: 0.0}}
infer:
  batch_size: 8
  concurrency: 1
"""


def test_pipeline_job(ray_head, tmp_path):
    """jobs/pipeline.py on a tiny synthetic screen; outputs read back with xarray.open_zarr."""
    if not (RUN_PIPELINE or os.environ.get("RAYSCREEN_TEST_PIPELINE") == "1"):
        pytest.skip("the pipeline job is switched off (RUN_PIPELINE in this module, or RAYSCREEN_TEST_PIPELINE=1)")
    if not os.path.exists(os.path.join(REPO, "jobs", "pipeline.py")):
        pytest.fail("jobs/pipeline.py does not exist")
    import xarray as xr

    from rayscreen.synth import synth_wscnn

    synth_wscnn(str(tmp_path / "plates"), n_images=32, seed=0)
    config = tmp_path / "screen.yaml"
    config.write_text(PIPELINE_CONFIG.format(plates=tmp_path / "plates", output=tmp_path / "run"))
    result = submit_job(ray_head, ["jobs/pipeline.py", "--config", str(config)], timeout=420)
    assert result.status == "SUCCEEDED", f"{result.status}\n{result.logs[-6000:]}"
    ds = xr.open_zarr(str(tmp_path / "run" / "results.zarr"))
    assert ds.sizes["well"] > 0 and "well_scores" in ds
    assert bool((ds["done"] == 1).all())
    scores = ds["well_scores"].values
    # well scores: per-class maximum over the well's fields (infer.aggregate: max)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert (scores.max(axis=-1) >= 0.5).all()  # two classes: some field's top class has p >= 0.5
    fields = ds["field_scores"].values[ds["field_status"].values == 0]
    assert len(fields) and np.allclose(fields.sum(axis=-1), 1, atol=1e-4)
    # the job log shows the pipeline's stage lines, the training epoch line and inference progress
    for line in ("[1/4] illum", "[2/4] train", "[3/4] infer", "[4/4] report: done"):
        assert line in result.logs, result.logs[-3000:]
    # once: Ray Train's patched print in the workers had logged every epoch line a second time
    assert result.logs.count("[rayscreen train] epoch 1/1 ") == 1, result.logs[-3000:]
    # ... and no Ray Train INFO line repeating it (no worker set-up hook on a joined cluster)
    assert "Reporting training result" not in result.logs, result.logs[-3000:]
    # rayscreen's own progress lines, not Ray Data's logged progress blocks (stdout is not a terminal)
    assert "infer: 8/8 wells (100%" in result.logs and "Running Dataset" not in result.logs, result.logs[-3000:]
    assert os.path.exists(tmp_path / "run" / "report" / "index.html")
