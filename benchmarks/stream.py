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
50 ms, the memory of its whole process tree (:class:`rayscreen.testing.MemorySampler`): the
driver, GCS, raylet and every Ray worker.
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
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=False)
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


def stream_peak(uris: list[str], storage_options=None) -> dict:
    """Stream every field of ``uris`` through ``read_plates(...).iter_batches`` on the
    current Ray and measure the peak memory of this process's tree meanwhile
    (:class:`rayscreen.testing.MemorySampler`, every 50 ms)."""
    from rayscreen.stream import read_plates
    from rayscreen.testing.memory import FIGURES, MemorySampler, tree_memory

    idle = tree_memory()
    start = time.perf_counter()
    n = 0
    with MemorySampler(interval=0.05) as sampler:
        for batch in read_plates(uris, storage_options=storage_options).iter_batches(batch_size=None):
            n += len(batch["image"])
            float(batch["image"][:, :, ::64, ::64].mean())  # touch the data, as a consumer would
    peak = {key: sampler.peak[key] for key in FIGURES}  # rss, pss, pss_anon, pss_shmem (bytes)
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
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING,
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
        copy = shutil.copytree(first, os.path.join(root, f"m{i}.zarr"), copy_function=os.link)
        # under a name of its own (a stream refuses two plates of one name); the root document
        # is replaced, not written through, which would rename the first plate via the link
        meta = os.path.join(copy, "zarr.json")
        with open(meta) as f:
            doc = json.load(f)
        doc["attributes"]["ome"]["plate"]["name"] = f"{doc['attributes']['ome']['plate']['name']}{i}"
        os.remove(meta)
        with open(meta, "w") as f:
            json.dump(doc, f)
        plates.append(copy)
    return plates, p["wells"] * p["fields"] * p["channels"] * p["size"] ** 2 * 2


def compare(one: dict, four: dict, plate_bytes: int) -> dict:
    """Peak(4 plates) / peak(1 plate) for each figure; ``ratio`` is the one the target is on:
    summed PSS, the physical memory of the job's processes."""
    from rayscreen.testing.memory import FIGURES

    ratios = {key: round(four["peak"][key] / max(one["peak"][key], 1), 3) for key in FIGURES}
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
