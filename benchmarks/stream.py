"""Streaming throughput and memory of ``read_plates`` against plain baselines, in one run.

    python benchmarks/stream.py --preset small            # throughput (+ memory with --memory)
    python benchmarks/stream.py --preset small --memory   # also: peak RSS, 1 plate vs 4 plates

Throughput: fields/s and decompressed MB/s of reading every field of a plate, correcting
its illumination and normalising it (the plate's stored functions), through

- (loop) one Python process: ``open_plate().read`` + ``correct`` + ``transform``;
- (dataloader) a torch ``DataLoader`` with ``num_workers`` = cores doing the same per field;
- (ray) ``read_plates(..., illumination=True, normalize=True).iter_torch_batches`` on a
  local Ray with all cores.

Each path gets one untimed warm-up pass (imports, worker start-up), then ``--repeats``
timed passes, interleaved across paths; the best pass of each path is reported.

Memory (``--memory``): a fresh Python process starts its own local Ray, streams 1 plate,
then 4 plates of the same size through ``read_plates(...).iter_batches`` and samples, every
50 ms, the memory of its whole process tree: the driver, GCS, raylet and every Ray worker.
The figure is the summed PSS (/proc/PID/smaps_rollup): each shared page (Ray's object
store lives in shared memory mapped by several processes) split among the processes
mapping it, so the sum is the job's physical memory; RSS, which counts a shared page once
per process, is printed too. Private (Pss_Anon) and object-store (Pss_Shmem) parts show
where memory goes.
The 4 plates are hard-linked copies of one plate's files (same bytes, read and decoded 4
times, as 4 different plates would be), which keeps the setup cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PRESETS = {
    # wells, fields per well, channels, field side; "tiny" is what the tests run
    "tiny": dict(wells=4, fields=2, channels=2, size=256),
    "small": dict(wells=24, fields=4, channels=3, size=512),
    "large": dict(wells=96, fields=9, channels=5, size=1080),
}
MEMORY_PRESETS = {
    # one plate's decompressed size must dwarf the 25% margin over a bare local Ray
    # (~1.8 GB of process RSS here), so that holding plates would show
    "tiny": dict(wells=8, fields=8, channels=2, size=1024),  # 268 MB per plate
    "small": dict(wells=12, fields=8, channels=2, size=1024),  # 403 MB per plate
    "large": dict(wells=24, fields=9, channels=4, size=1080),
}
WELL_NAMES = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]


def make_plate(uri: str, wells: int, fields: int, channels: int, size: int, seed: int = 0) -> str:
    """A plate of smooth-ish uint16 content (compresses like microscopy, not like noise)
    under a radial vignetting, so illumination correction has something to do."""
    from rayscreen.store import create_plate

    rng = np.random.default_rng(seed)
    names = WELL_NAMES[:wells]
    writer = create_plate(uri, "BENCH", names, [f"ch{c}" for c in range(channels)], (size, size), "uint16", fields)
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    vignette = (1 - 0.8 * (y**2 + x**2)).astype(np.float32)
    # the fine noise is drawn once per plate (drawing it per field took most of the setup);
    # the coarse pattern, different in every field, keeps fields distinct
    noise = rng.standard_normal((channels, size, size), dtype=np.float32) * 20
    for well in names:
        for f in range(fields):
            coarse = rng.normal(1000, 200, (channels, size // 8, size // 8)).astype(np.float32)
            image = (coarse.repeat(8, 1).repeat(8, 2) * vignette + noise).clip(0, 65535)
            writer.write_field(well, f, image.astype(np.uint16))
        writer.complete_well(well, fields)
    return uri


def fit_corrections(uri: str) -> None:
    from rayscreen.stream.fit import compute_illumination, fit_normalization

    compute_illumination(uri, use_ray=False, progress=False)
    fit_normalization(uri, "percentile", illumination=True, use_ray=False, progress=False)


# -- the three paths


def loop_pass(uri: str) -> int:
    """Single process: read, correct, normalise every field."""
    from rayscreen.store import open_plate
    from rayscreen.stream.illumination import correct, load_illumination
    from rayscreen.stream.normalize import load_normalization

    plate = open_plate(uri)
    illum, norm = load_illumination(uri), load_normalization(uri)
    n = 0
    for well in plate.wells:
        for field in plate.fields(well):
            norm.transform(correct(plate.read(well, field), illum))
            n += 1
    return n


class FieldDataset:
    """Map-style torch dataset: item i is field i, read, corrected and normalised.
    The plate and its corrections are opened lazily once per DataLoader worker."""

    def __init__(self, uri: str):
        from rayscreen.store import open_plate

        self.uri = uri
        plate = open_plate(uri)
        self.pairs = [(w, f) for w in plate.wells for f in plate.fields(w)]
        self._state = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        import torch

        from rayscreen.store import open_plate
        from rayscreen.stream.illumination import correct, load_illumination
        from rayscreen.stream.normalize import load_normalization

        if self._state is None:
            self._state = (open_plate(self.uri), load_illumination(self.uri), load_normalization(self.uri))
        plate, illum, norm = self._state
        well, field = self.pairs[i]
        return torch.from_numpy(norm.transform(correct(plate.read(well, field), illum)))


def dataloader_pass(uri: str, workers: int, batch_size: int) -> int:
    from torch.utils.data import DataLoader

    n = 0
    for batch in DataLoader(FieldDataset(uri), batch_size=batch_size, num_workers=workers):
        n += batch.shape[0]
    return n


def ray_pass(uri: str, batch_size: int) -> int:
    from rayscreen.stream import read_plates

    n = 0
    # string columns (plate, well, annotations) have no tensor form: a training loop
    # turns them into labels; here the images alone go to torch
    ds = read_plates(uri, illumination=True, normalize=True).select_columns(["image"])
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        n += batch["image"].shape[0]
    return n


def throughput(preset: str, root: str, batch_size: int = 8, repeats: int = 3) -> dict:
    import ray

    cores = os.cpu_count() or 1
    p = PRESETS[preset]
    uri = make_plate(os.path.join(root, "bench.zarr"), **p)
    fit_corrections(uri)
    fields = p["wells"] * p["fields"]
    mb = fields * p["channels"] * p["size"] ** 2 * 2 / 1e6  # decompressed uint16
    if not ray.is_initialized():
        ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    paths = {
        "loop": lambda: loop_pass(uri),
        "dataloader": lambda: dataloader_pass(uri, cores, batch_size),
        "ray": lambda: ray_pass(uri, batch_size),
    }
    out = {"preset": preset, "fields": fields, "mb": round(mb, 1), "cores": cores, "repeats": repeats, "paths": {}}
    for name, run in paths.items():
        assert run() == fields, name  # warm-up, and every field arrives
    best = {name: float("inf") for name in paths}
    # rounds interleave the paths, so a burst of load from elsewhere hits all of them;
    # the best of the rounds is each path's figure
    for _ in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            n = run()
            best[name] = min(best[name], time.perf_counter() - start)
            assert n == fields, name
    for name, seconds in best.items():
        out["paths"][name] = {"seconds": round(seconds, 3), "fields_per_s": round(fields / seconds, 1),
                              "mb_per_s": round(mb / seconds, 1)}
    base = out["paths"]
    out["ray_vs_loop"] = round(base["ray"]["fields_per_s"] / base["loop"]["fields_per_s"], 2)
    out["ray_vs_dataloader"] = round(base["ray"]["fields_per_s"] / base["dataloader"]["fields_per_s"], 2)
    return out


# -- memory


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


KEYS = ("rss", "pss", "pss_anon", "pss_shmem")


def _status(pid: int) -> tuple[int, ...]:
    """(Rss, Pss, Pss_Anon, Pss_Shmem) of a process in bytes, from /proc/PID/smaps_rollup;
    zeros if it is gone. PSS splits each shared page among the processes mapping it, so
    summed over processes it counts the object store's shared memory once."""
    wanted = {"Rss:": 0, "Pss:": 1, "Pss_Anon:": 2, "Pss_Shmem:": 3}
    out = [0, 0, 0, 0]
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(None, 1)[0]
                if key in wanted:
                    out[wanted[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return tuple(out)


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            words = f.read().split("\0")
    except OSError:
        return "?"
    if words[0].startswith("ray::"):
        return words[0].split(" ")[0].split("->")[0]
    return " ".join(os.path.basename(w) for w in words[:2])


def tree_memory(root: int | None = None) -> dict[str, int]:
    """Summed Rss, Pss, Pss_Anon (private heaps) and Pss_Shmem (Ray's object store) in bytes
    over a process and all its descendants (Linux /proc)."""
    totals = dict.fromkeys(KEYS, 0)
    for pid in _process_tree(root or os.getpid()):
        for key, value in zip(KEYS, _status(pid)):
            totals[key] += value
    return totals


class PeakSampler(threading.Thread):
    """Samples :func:`tree_memory` every ``interval`` s; keeps the peak of each figure
    and, at the peak of the total PSS, the PSS of each kind of process."""

    def __init__(self, root: int | None = None, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root, self.interval, self._stop_event = root or os.getpid(), interval, threading.Event()
        self.peak = dict.fromkeys(KEYS, 0)
        self.at_peak: dict[str, int] = {}

    def sample(self) -> None:
        status = {pid: _status(pid) for pid in _process_tree(self.root)}
        totals = [sum(s[i] for s in status.values()) for i in range(len(KEYS))]
        if totals[1] > self.peak["pss"]:
            self.at_peak = {}
            for pid, s in status.items():
                self.at_peak[_name(pid)] = self.at_peak.get(_name(pid), 0) + s[1]
        for key, value in zip(KEYS, totals):
            self.peak[key] = max(self.peak[key], value)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        self.sample()
        return self.peak


def stream_peak(uris: list[str], storage_options=None) -> dict:
    """Stream every field of ``uris`` through ``read_plates(...).iter_batches`` on the
    current Ray and measure the peak memory of this process's tree meanwhile."""
    from rayscreen.stream import read_plates

    idle = tree_memory()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    n = 0
    try:
        for batch in read_plates(uris, storage_options=storage_options).iter_batches(batch_size=None):
            n += len(batch["image"])
            float(batch["image"][:, :, ::64, ::64].mean())  # touch the data, as a consumer would
    finally:
        peak = sampler.stop()
    return {"plates": len(uris), "fields": n, "seconds": round(time.perf_counter() - start, 2),
            "idle": idle, "peak": peak,
            "at_peak_mb": {k: round(v / 1e6) for k, v in sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])}}


def memory_child(uri_sets: list[list[str]]) -> list[dict]:
    """Runs in a fresh process: its own local Ray, then each set of plates streamed in turn
    (1 plate first: whatever a run leaves behind in the workers counts against the next,
    the larger one, so the order only makes the comparison harder)."""
    import ray

    # A fixed object store (512 MB, as the tests' Ray): Ray Data bounds a stream's buffered
    # blocks by a fraction of the store, so the store's size - a cluster setting - is what
    # bounds memory; with the default (30% of RAM) a small screen never reaches the bound and
    # 1 vs 4 plates would measure how much idle store a longer stream gets to use.
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=False, object_store_memory=512 * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(4).take_all()  # start the workers Ray Data uses before measuring
    time.sleep(1.0)
    out = [stream_peak(uris) for uris in uri_sets]
    ray.shutdown()
    return out


def memory_plates(preset: str, root: str) -> tuple[list[str], int]:
    """Four plates of the memory preset (hard-linked copies of one) and one's decompressed bytes."""
    p = MEMORY_PRESETS[preset]
    first = make_plate(os.path.join(root, "m0.zarr"), **p)
    plates = [first]
    for i in range(1, 4):
        # hard links: the same bytes, read and decoded again as another plate
        plates.append(shutil.copytree(first, os.path.join(root, f"m{i}.zarr"), copy_function=os.link))
    return plates, p["wells"] * p["fields"] * p["channels"] * p["size"] ** 2 * 2


def compare(one: dict, four: dict, plate_bytes: int) -> dict:
    """Peak(4 plates) / peak(1 plate) for each figure; ``ratio`` is the one the target is on:
    summed PSS, the physical memory of the job's processes."""
    ratios = {key: round(four["peak"][key] / max(one["peak"][key], 1), 3) for key in KEYS}
    return {"plate_mb": round(plate_bytes / 1e6, 1), "one": one, "four": four, "ratio": ratios["pss"],
            "ratios": ratios}


def memory(preset: str, root: str) -> dict:
    plates, plate_bytes = memory_plates(preset, root)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(
        [plates[:1], plates])], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-4000:]}")
    one, four = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"preset": preset, **compare(one, four, plate_bytes)}


def _print_throughput(r: dict) -> None:
    print(f"throughput, preset {r['preset']}: {r['fields']} fields, {r['mb']} MB decompressed, {r['cores']} cores")
    print(f"{'path':<12}{'seconds':>10}{'fields/s':>12}{'MB/s':>10}")
    for name, v in r["paths"].items():
        print(f"{name:<12}{v['seconds']:>10}{v['fields_per_s']:>12}{v['mb_per_s']:>10}")
    print(f"ray / loop = {r['ray_vs_loop']}x   ray / dataloader = {r['ray_vs_dataloader']}x")


def _print_memory(r: dict) -> None:
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    print(f"memory, preset {r['preset']}: plates of {r['plate_mb']} MB decompressed each; summed over the "
          "driver and every Ray process (PSS: shared pages counted once; RSS: as ps shows them)")
    for key in ("one", "four"):
        c, p = r[key], r[key]["peak"]
        print(f"  {c['plates']} plate(s): {c['fields']} fields in {c['seconds']} s; idle PSS {mb(c['idle']['pss'])}; "
              f"peak PSS {mb(p['pss'])} (private {mb(p['pss_anon'])}, object store {mb(p['pss_shmem'])}), "
              f"peak RSS {mb(p['rss'])}")
        print(f"    PSS at the peak: {c['at_peak_mb']}")
    print(f"  peak(4) / peak(1): PSS {r['ratio']} (target <= 1.25); private {r['ratios']['pss_anon']}, "
          f"object store {r['ratios']['pss_shmem']}, RSS {r['ratios']['rss']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, 1 vs 4 plates")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    parser.add_argument("--memory-child", metavar="JSON", help=argparse.SUPPRESS)  # [[uri, ...], ...]
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path (best is reported)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    root = tempfile.mkdtemp(prefix="rayscreen-bench-stream-")
    results = {}
    try:
        if not args.memory_only:
            results["throughput"] = throughput(args.preset, root, repeats=args.repeats)
            if not args.json:
                _print_throughput(results["throughput"])
        if args.memory or args.memory_only:
            results["memory"] = memory(args.preset, root)
            if not args.json:
                _print_memory(results["memory"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
