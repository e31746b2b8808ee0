"""What a stage's start costs on S3 before any work: finding the done wells and the wells to
retry of a results store, by listing the flags' keys (stores with ``flags_by_presence``)
against reading one chunk per well (the baseline: what every store did before).

    python benchmarks/resume_scan.py [--wells 20000] [--retry-fraction 0.01]

Builds a results store of ``--wells`` done wells (1% flagged retry) on moto's S3 server on
127.0.0.1, then runs the stage start (``done_mask`` + ``reopen_wells`` of the retry wells'
``field_status``, selecting none) three ways on the same store: reading every flag chunk
(twice, once per call), listing the flags in each call, and listing once (the stage's mask
handed to ``reopen_wells``, as the stages do now), and prints seconds and the
S3 requests the server answered (counted from its request log). A local moto answers in
about a millisecond; a real S3 request takes tens, so the request count is the figure that
carries over to a cloud bucket, and seconds there scale with it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto S3 server did not start on 127.0.0.1")


def requests_logged(log_path: str) -> int:
    """Requests moto's server has answered so far (one werkzeug log line each)."""
    with open(log_path) as f:
        return sum(1 for line in f if '" 20' in line or '" 40' in line)


@contextlib.contextmanager
def moto_bucket(bucket: str, prefix: str):
    """moto's S3 server on 127.0.0.1 (dummy credentials in the environment, never a real key)
    with ``bucket`` created; yields (storage_options, request log path) and stops the server."""
    import s3fs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    log_path = os.path.join(tempfile.mkdtemp(prefix=prefix), "moto.log")
    proc, endpoint = start_moto(log_path)
    try:
        options = {"endpoint_url": endpoint}
        s3fs.S3FileSystem(**options).mkdir(bucket)
        yield options, log_path
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wells", type=int, default=20000)
    p.add_argument("--retry-fraction", type=float, default=0.01)
    p.add_argument("--fields", type=int, default=9)
    args = p.parse_args(argv)

    import zarr

    from rayscreen.store.results import DONE, RETRY, ResultsWriter, Variable, create_results

    with moto_bucket("scan", "rs-scan-") as (options, log_path):
        uri = "s3://scan/results.zarr"
        n = args.wells
        wells = pd.DataFrame({"plate": [f"P{i // 384:04d}" for i in range(n)],
                              "well": [f"{'ABCDEFGHIJKLMNOP'[(i % 384) // 24]}{i % 24 + 1:02d}" for i in range(n)]})
        writer = create_results(uri, wells, {"field": args.fields},
                                [Variable("field_status", ("well", "field"), "int8", 1)], storage_options=options)
        # the store's chunks written in bulk (zarr writes them concurrently): as after a run
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        retry = rng.random(n) < args.retry_fraction
        status = np.zeros((n, args.fields), np.int8)
        status[retry, 0] = 2  # a read error
        for name, values in (("field_status", status), (RETRY, retry.astype(np.uint8)),
                             (DONE, np.ones(n, np.uint8))):
            arr = zarr.open_array(store=writer._store, path=name, mode="r+").with_config(
                {"write_empty_chunks": name == "field_status"})
            arr[...] = values
        print(f"store: {n} wells on moto S3 ({int(retry.sum())} flagged retry), written in "
              f"{time.perf_counter() - t0:.1f} s")

        results = {}
        for label, listing, one_mask in (("read every chunk (baseline)", False, False),
                                         ("list the flags, twice", True, False),
                                         ("list the flags once", True, True)):
            scan = ResultsWriter(uri, options)
            scan.flags_by_presence = listing
            scan.done_mask()  # arrays opened (metadata) outside the timing
            before, t0 = requests_logged(log_path), time.perf_counter()
            done = scan.done_mask()
            # the stage start: reopen_wells given the stage's mask (now), or listing its own (before)
            picked = scan.reopen_wells("field_status", lambda values, at: np.zeros(len(at), bool),
                                       *([done] if one_mask else []))
            seconds = time.perf_counter() - t0
            time.sleep(0.5)  # the server's log lines flushed
            results[label] = (seconds, requests_logged(log_path) - before)
            assert int(done.sum()) == n and picked == []
            print(f"{label:28s} {seconds:7.2f} s  {results[label][1]:7d} S3 requests")
        ts, rs = results["read every chunk (baseline)"]
        for label, (t, r) in list(results.items())[1:]:
            print(f"ratio baseline / {label}: {ts / t:.1f}x time, {rs / max(r, 1):.0f}x requests")


if __name__ == "__main__":
    main()
