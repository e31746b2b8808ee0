"""Reading fields from an S3-protocol store, three ways in the same run on the same store:
as every read task did before (one field after another, s3fs's default ``max_concurrency``
10, under which s3fs sends a HEAD before each GET), one field after another without the HEAD
(rayscreen's Zarr stores now set ``max_concurrency`` 1 on S3), and ``stream.read_threads``
fields at once without the HEAD (the shipped path).

    python benchmarks/s3_read.py [--wells 16] [--fields 9] [--size 512] [--latency-ms 0 20]

Writes one plate (``--wells`` x ``--fields`` fields of 2 x ``--size`` x ``--size`` uint16) to
moto's S3 server on 127.0.0.1, then streams every field with
:func:`rayscreen.stream.read_wells` (the body of a Ray Data read task, here in one process)
each way, interleaved, ``--repeats`` times each. moto answers a
request in about a millisecond; an S3 GET from a cloud VM takes tens. ``--latency-ms`` puts a
TCP proxy between the reader and moto that holds each response back by that many
milliseconds (one round trip added per request), so the figures show what waiting does to
each path. Prints fields/s and the ratio to the one-at-a-time loop at each latency, and the
requests moto answered per field. Then the same plate on local disk, one field after another
against ``read_threads`` at once (no requests to wait on there: what threads cost or give).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resume_scan import free_port, moto_bucket, requests_logged  # noqa: E402 -- a sibling benchmark


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``upstream`` (host, port) and delays the
    first bytes of each response by ``delay`` seconds: a request/response protocol (HTTP/1.1,
    one request at a time per connection, as aiohttp sends them) gains one round trip of
    ``delay`` per request. Runs its own event loop in a daemon thread."""

    def __init__(self, upstream: tuple[str, int], delay: float):
        self.upstream, self.delay = upstream, delay
        self.port = free_port()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(10):
            raise SystemExit("latency proxy did not start")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        loop.run_forever()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.upstream)
        waiting = {"request": False}

        async def requests() -> None:
            while data := await client_r.read(1 << 16):
                waiting["request"] = True
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def responses() -> None:
            while data := await up_r.read(1 << 16):
                if waiting["request"]:  # the first bytes of a response: the round trip
                    waiting["request"] = False
                    await asyncio.sleep(self.delay)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(requests(), responses())
        except (ConnectionError, OSError):
            client_w.close()
            up_w.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def stream_all(uri: str, storage_options: dict, threads: int) -> tuple[float, int]:
    """Seconds to read every field of the plate through ``read_wells``, and the fields read."""
    from rayscreen.stream.datasource import StreamOptions, plan_wells, read_wells

    t0 = time.perf_counter()
    options = StreamOptions(storage_options=storage_options, read_threads=threads, fields_per_block=4)
    n = sum(len(b["field"]) for b in read_wells(plan_wells([uri], storage_options), options))
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wells", type=int, default=16)
    p.add_argument("--fields", type=int, default=9)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None, help="read_threads of the concurrent path "
                                                               "(default: the stream's default)")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from rayscreen.stream.datasource import READ_THREADS
    from rayscreen.testing.plates import make_plate

    threads = args.threads or READ_THREADS
    with moto_bucket("reads", "rs-s3read-") as (direct, log_path):
        endpoint = direct["endpoint_url"]
        rows = "ABCDEFGHIJKLMNOP"
        wells = [f"{rows[i // 24]}{i % 24 + 1:02d}" for i in range(args.wells)]
        uri = make_plate("s3://reads/P1.zarr", wells=wells, fields=args.fields,
                         field_shape=(args.size, args.size), storage_options=direct)
        n_fields = args.wells * args.fields
        print(f"plate: {args.wells} wells x {args.fields} fields of 2 x {args.size} x {args.size} uint16 "
              f"on moto ({endpoint}); concurrent path: read_threads={threads}")
        local = make_plate(os.path.join(tempfile.mkdtemp(prefix="rs-local-"), "P1.zarr"), wells=wells,
                           fields=args.fields, field_shape=(args.size, args.size))
        host, port = endpoint.removeprefix("http://").split(":")
        ways = {"before: one field after another, HEAD + GET": (1, {"max_concurrency": 10}),
                "one field after another, GET only": (1, {}),
                f"read_threads={threads}, GET only (shipped)": (threads, {})}
        for latency in args.latency_ms:
            url = endpoint if latency == 0 else DelayProxy((host, int(port)), latency / 1000).endpoint
            times: dict[str, list[float]] = {w: [] for w in ways}
            requests: dict[str, int] = {}
            for k, extra in ways.values():  # warm-up: s3fs connections, imports
                stream_all(uri, {"endpoint_url": url, **extra}, k)
            for _ in range(args.repeats):
                for way, (k, extra) in ways.items():
                    before = requests_logged(log_path)
                    seconds, n = stream_all(uri, {"endpoint_url": url, **extra}, k)
                    requests[way] = requests_logged(log_path) - before
                    if n != n_fields:
                        raise SystemExit(f"read {n} fields, expected {n_fields}")
                    times[way].append(seconds)
            base = statistics.median(times[next(iter(ways))])
            print(f"\nadded latency {latency:g} ms per request (median of {args.repeats}):")
            for way in ways:
                t = statistics.median(times[way])
                print(f"  {way:<46s} {t:7.2f} s  {n_fields / t:7.1f} fields/s  "
                      f"{requests[way] / n_fields:5.2f} requests/field  {base / t:5.2f}x")
        times = {1: [], threads: []}
        for k in times:
            stream_all(local, {}, k)
        for _ in range(args.repeats):
            for k in times:
                times[k].append(stream_all(local, {}, k)[0])
        base = statistics.median(times[1])
        print(f"\nlocal disk (median of {args.repeats}):")
        for k in times:
            t = statistics.median(times[k])
            print(f"  {'one field after another' if k == 1 else f'read_threads={k}':<46s} {t:7.2f} s  "
                  f"{n_fields / t:7.1f} fields/s  {base / t:5.2f}x")


if __name__ == "__main__":
    main()
