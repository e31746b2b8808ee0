"""Inference throughput and memory of ``run_infer`` against the model's raw forward pass, in one run.

    python benchmarks/infer.py --preset small               # throughput, ratio printed
    python benchmarks/infer.py --preset small --memory      # also: peak RSS, 1 plate vs 4 plates
    python benchmarks/infer.py --preset small --concurrency 2 --num-cpus 1   # pool shape
    python benchmarks/infer.py --preset small --labels      # also: the cost of infer.labels
    python benchmarks/infer.py --preset gpu --gpu           # one actor on the GPU vs the Predictor there

Throughput: fields/s of

- (forward) the baseline: :class:`rayscreen.infer.Predictor` -- forward pass, Jacobian
  saliency, map peaks, profile, mask: everything the model computes per field -- on the
  same fields already in memory (float32), in batches of one well's fields: the batches
  ``run_infer`` makes (it never batches across wells, so that a well's bytes do not depend
  on which wells shared its actor call). Measured two ways on all cores -- one process
  with ``torch.set_num_threads(cores)``, and ``cores`` processes with one thread each, each
  over its share of the fields -- and the faster one is the baseline (on a loaded 2-core
  machine two threads in one process often lose to two single-thread processes);
- (run_infer) the real path: plates read from Zarr, channels selected, converted,
  scored by the actor pool, aggregated and written to ``results.zarr``, on a local Ray
  with all cores.

Both get an untimed warm-up (the Predictor on one batch; one whole ``run_infer`` over the
first plate, which starts Ray's worker processes). Then ``--repeats`` rounds (default 3),
each: the baseline both ways, then ``run_infer`` over all plates into a new store. Per
round, ``total`` is the wall time of the whole call (creating the store, starting the
actor pool -- a process that imports torch and loads the model --, scoring,
finalising); ``steady`` is the rate between the done flags (their mtimes: each well's
flag is written last, by the actor) of well k and of the last well, k = one round of
actor calls (concurrency x wells per call): (wells after k) x fields per well / (time
of the last - time of well k). Steady is the rate a long screen runs at (the pool's
start-up amortised away), every per-well cost included: read, preprocess, model,
aggregate, write, Ray's per-call overhead. The machines here are shared and their load
swings by 3x within a minute, so the best of the rounds of each path is compared
(steady / forward, target >= 0.85 on 2 cores), with each round's own ratio printed too.

Memory (``--memory``): one fresh Python process starts its own local Ray and runs
``run_infer`` over 1 plate, then over 4 plates (1 first: whatever the first run leaves
behind counts against the larger one; each run starts once the last one's actors are
gone), sampling every 20 ms the resident memory (RSS, from /proc, by
:class:`rayscreen.testing.MemorySampler`) of every process in its tree: the driver, Ray's
own processes (GCS, raylet -- which maps the object store -- and agents) and every Ray
worker (the actor pool). Reported: the peak of the sum over all processes, and of the
driver + worker processes only. Shared pages count once per process that maps them (as
``ps`` shows them); the ratio between the cases is what matters. ``tests/integration/test_infer_memory.py`` runs the same measurement
(:func:`measure_runs`, ``tiny`` memory preset) on the test session's Ray.
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
    # plates, wells per plate, fields per well, field side; 2 channels (uint16)
    "tiny": dict(plates=2, wells=4, fields=4, size=64),
    "small": dict(plates=3, wells=8, fields=8, size=128),
    "large": dict(plates=3, wells=16, fields=8, size=256),
    # --gpu: fields large enough that the GPU has work per batch (the CPU presets' 64-256 px
    # fields leave a GPU waiting on Python and the stream)
    "gpu": dict(plates=3, wells=16, fields=8, size=512),
}
MEMORY_PRESETS = {
    # per plate; the memory case runs 1 plate, then 4 plates of this shape
    "tiny": dict(wells=6, fields=4, size=64),
    "small": dict(wells=12, fields=8, size=128),
    "large": dict(wells=24, fields=8, size=256),
}
WELL_NAMES = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)]


def make_artefact(root: str, width: float = 0.25) -> str:
    """An untrained, seeded wscnn artefact (2 channels, 2 classes): inference costs the same."""
    import torch

    from rayscreen.models import create_model
    from rayscreen.models.artefact import ArtefactMeta, save_artefact

    torch.manual_seed(0)
    kwargs = {"in_channels": 2, "num_classes": 2, "width": width}
    model = create_model("wscnn", **kwargs)
    ckpt = os.path.join(root, "model")
    save_artefact(ckpt, model.state_dict(), ArtefactMeta(model={"name": "wscnn", "kwargs": kwargs},
                                                         channels=["DNA", "Actin"], classes=["neg", "pos"],
                                                         input={"level": 0}))
    return ckpt


def make_plates(root: str, plates: int, wells: int, fields: int, size: int, prefix: str = "P") -> list[str]:
    from rayscreen.testing.plates import make_plate

    return [make_plate(os.path.join(root, f"{prefix}{i + 1}.zarr"), name=f"{prefix}{i + 1}",
                       wells=tuple(WELL_NAMES[:wells]), fields=fields, field_shape=(size, size), seed=i)
            for i in range(plates)]


def infer_config(uris: list[str], ckpt: str, output: str, **infer):
    from rayscreen.config import config_from_dict

    return config_from_dict({"plates": list(uris), "output": output, "stream": {"normalize": "none"},
                             "infer": {"checkpoint": ckpt, "saliency_downsample": 4, **infer}})


def _init_ray(cores: int, object_store_mb: int = 512) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
                 configure_logging=False, object_store_memory=object_store_mb * 1024**2)
    ray.data.DataContext.get_current().enable_progress_bars = False


# -- throughput


def _predictor(ckpt: str, per_batch: int, threads: int, device: str = "cpu"):
    import torch

    from rayscreen.infer.predictor import Predictor, PredictorSettings
    from rayscreen.models.artefact import build_model

    torch.set_num_threads(threads)
    model, _ = build_model(ckpt)
    return Predictor(model, PredictorSettings(batch_size=per_batch, saliency_downsample=4), device=device)


def forward_pass(fields: np.ndarray, ckpt: str, per_batch: int, threads: int, device: str = "cpu") -> float:
    """Seconds for the Predictor over ``fields`` (N, C, Y, X) float32, in batches of
    ``per_batch``, in this process with ``threads`` torch threads (after a warm-up batch),
    on ``device`` (its outputs come back as NumPy arrays, so each batch ends synchronised)."""
    predictor = _predictor(ckpt, per_batch, threads, device)
    predictor({"image": fields[:per_batch]})  # warm-up
    start = time.perf_counter()
    for i in range(0, len(fields), per_batch):
        predictor({"image": fields[i:i + per_batch]})
    return time.perf_counter() - start


def _forward_worker(path: str, ckpt: str, per_batch: int, share: slice, barrier, result) -> None:
    fields = np.load(path)[share]  # in memory before the clock starts
    predictor = _predictor(ckpt, per_batch, 1)
    predictor({"image": fields[:per_batch]})  # warm-up
    barrier.wait()
    start = time.time()
    for i in range(0, len(fields), per_batch):
        predictor({"image": fields[i:i + per_batch]})
    result.put((start, time.time()))


def forward_processes(fields: np.ndarray, ckpt: str, per_batch: int, processes: int, root: str) -> float:
    """Seconds for ``processes`` processes (1 torch thread each, like the actor pool) to run
    the Predictor over their shares of ``fields`` (whole batches each), all in memory:
    from the common start to the last one's end."""
    import multiprocessing as mp

    path = os.path.join(root, "fields.npy")
    np.save(path, fields)
    n_batches = -(-len(fields) // per_batch)
    bounds = [round(i * n_batches / processes) * per_batch for i in range(processes + 1)]
    ctx = mp.get_context("spawn")
    barrier, result = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_forward_worker, args=(path, ckpt, per_batch, slice(a, b), barrier, result))
             for a, b in zip(bounds, bounds[1:])]
    for proc in procs:
        proc.start()
    times = [result.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return max(t[1] for t in times) - min(t[0] for t in times)


def infer_pass(cfg) -> dict:
    """Run ``run_infer``; its wall time and, per well, when its done flag was written
    (the mtime of its ``done`` chunk, seconds from the start; sorted): the actors' own
    clock of when each well was finished, unaffected by how Ray Data batches the
    summaries it sends back to the driver."""
    from rayscreen.infer.run import run_infer

    wall0, start = time.time(), time.perf_counter()
    uri = run_infer(cfg, progress=False, overwrite=True)
    total = time.perf_counter() - start
    done = os.path.join(uri, "done", "c")
    stamps = sorted(os.stat(os.path.join(done, f)).st_mtime - wall0 for f in os.listdir(done))
    return {"total_s": total, "stamps": stamps}


def throughput(preset: str, root: str, concurrency: int, num_cpus: float, batch_size: int | None,
               repeats: int = 3, labels: bool = False, gpu: bool = False) -> dict:
    """``gpu``: the baseline is the Predictor on the GPU (one process), and run_infer's pool
    reserves the GPU (``infer.use_gpu``; ``concurrency`` 1 for one GPU)."""
    from rayscreen.infer.run import plan_infer
    from rayscreen.stream.datasource import plan_wells, read_wells

    cores = os.cpu_count() or 1
    p = PRESETS[preset]
    batch = batch_size or p["fields"]
    uris = make_plates(root, p["plates"], p["wells"], p["fields"], p["size"])
    ckpt = make_artefact(root)
    per_plate = p["wells"] * p["fields"]
    n_fields = p["plates"] * per_plate
    cfg = lambda plates, out, **extra: infer_config(plates, ckpt, os.path.join(root, out),  # noqa: E731
                                                    batch_size=batch, concurrency=concurrency, num_cpus=num_cpus,
                                                    use_gpu=gpu, **extra)
    # the same fields, in memory, exactly as run_infer's actors hand them to the model
    options = plan_infer(cfg(uris, "plan")).options
    fields = np.concatenate([b["image"] for b in read_wells(plan_wells(uris), options)])
    assert len(fields) == n_fields
    _init_ray(cores)
    infer_pass(cfg(uris[:1], "warmup"))  # Ray's worker processes, imports, page cache
    per_call = max(1, -(-4 * batch // p["fields"]))  # wells per actor call, as run_infer sizes them
    skip = min(concurrency * per_call, p["plates"] * p["wells"] - 2)  # the first round of calls

    def steady_rate(stamps: list[float]) -> float:  # fields/s between the done flags of well `skip` and the last
        return (len(stamps) - 1 - skip) * p["fields"] / (stamps[-1] - stamps[skip])

    rounds = []
    for r in range(repeats):
        if gpu:
            forwards = {"1 process on the GPU": n_fields / forward_pass(fields, ckpt, batch, cores, "cuda")}
        else:
            forwards = {f"1 process x {cores} threads": n_fields / forward_pass(fields, ckpt, batch, cores)}
        if cores > 1 and not gpu:
            forwards[f"{cores} processes x 1 thread"] = n_fields / forward_processes(fields, ckpt, batch, cores, root)
        run = infer_pass(cfg(uris, f"all{r}"))
        stamps = run["stamps"]
        steady = steady_rate(stamps)
        best = max(forwards, key=forwards.get)
        rounds.append({"forward": forwards, "forward_best": best, "run_infer_total": n_fields / run["total_s"],
                       "run_infer_steady": steady, "first_well_s": stamps[0],
                       "steady_vs_forward": steady / forwards[best]})
        if labels:  # the same run, also writing every field's mask into the plates (infer.labels)
            rounds[-1]["labels_steady"] = steady_rate(infer_pass(cfg(uris, f"labels{r}", labels="saliency"))["stamps"])
            rounds[-1]["labels_vs_plain"] = rounds[-1]["labels_steady"] / steady
    rnd = lambda x: round(x, 2)  # noqa: E731
    best_forward = max(max(r["forward"].values()) for r in rounds)
    best_steady = max(r["run_infer_steady"] for r in rounds)
    best_total = max(r["run_infer_total"] for r in rounds)
    return {"preset": preset, "device": _device_name() if gpu else "cpu", "plates": p["plates"], "fields": n_fields,
            "field_shape": [2, p["size"], p["size"]],
            "cores": cores, "batch_size": batch, "concurrency": concurrency, "num_cpus": num_cpus,
            "wells_per_call": per_call, "steady_skips_wells": skip, "repeats": repeats,
            "rounds": [{k: ({kk: rnd(vv) for kk, vv in v.items()} if isinstance(v, dict) else
                            rnd(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rounds],
            "forward_fields_per_s": rnd(best_forward), "steady_fields_per_s": rnd(best_steady),
            "total_fields_per_s": rnd(best_total),
            "steady_vs_forward": round(best_steady / best_forward, 3),
            "steady_vs_forward_median_round": round(float(np.median([r["steady_vs_forward"] for r in rounds])), 3),
            "total_vs_forward": round(best_total / best_forward, 3),
            **({"labels_steady_fields_per_s": rnd(max(r["labels_steady"] for r in rounds)),
                "labels_vs_plain": round(max(r["labels_steady"] for r in rounds) / best_steady, 3),
                "labels_vs_plain_median_round": round(float(np.median([r["labels_vs_plain"] for r in rounds])), 3)}
               if labels else {})}


# -- memory


def _wait_pool_gone(cpus: float | None = None, timeout: float = 60.0) -> None:
    """Wait until the last run's actor processes are gone and ``cpus`` CPUs are free again
    (Ray kills a finished pool asynchronously), so no run is charged for the last one's.
    ``cpus`` None: the cluster's total. Not every CPU need come back: on a shared Ray (the
    tests') an earlier user may still hold some, which is no concern of this measurement."""
    import warnings

    import ray

    from rayscreen.testing.memory import cmdline, process_tree

    wanted = ray.cluster_resources().get("CPU", 0) if cpus is None else cpus
    deadline = time.time() + timeout
    while True:
        free = ray.available_resources().get("CPU", 0)
        alive = any("InferWells" in " ".join(cmdline(pid)) for pid in process_tree(os.getpid())[1:])
        if free >= wanted and not alive:
            return
        if time.time() > deadline:
            warnings.warn(f"after {timeout:.0f} s: {free} of {wanted} CPUs free, inference actor alive: {alive}")
            return
        time.sleep(0.1)


def measure_runs(sets: list[list[str]], ckpt: str, root: str, **infer) -> list[dict]:
    """On the current Ray: ``run_infer`` over each set of plate URIs in turn, the process
    tree's peak RSS sampled meanwhile every 20 ms (:class:`rayscreen.testing.MemorySampler`,
    RSS only): ``all`` summed over the tree, ``driver_workers`` over the driver and Ray's
    workers only."""
    from rayscreen.testing import MemorySampler

    import ray

    _wait_pool_gone(cpus=0)  # no actor process of an earlier run; the CPUs an earlier user of a
    # shared Ray (the tests') still holds are measured, not waited for
    free = ray.available_resources().get("CPU", 0)
    out = []
    for i, uris in enumerate(sets):
        _wait_pool_gone(free)
        cfg = infer_config(uris, ckpt, os.path.join(root, f"mem{i}"), **infer)
        with MemorySampler(interval=0.02, pss=False) as sampler:
            run = infer_pass(cfg)
        peak = {"all": sampler.peak["rss"], "driver_workers": sampler.peak["rss_driver_workers"]}
        out.append({"plates": len(uris), "wells": len(run["stamps"]), "seconds": round(run["total_s"], 2),
                    "peak": peak, "at_peak_mb": {k: round(v / 1e6) for k, v in
                                                  sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])}})
    return out


def memory_child(args: dict) -> list[dict]:
    """In a fresh process: its own local Ray, then :func:`measure_runs`."""
    import ray

    _init_ray(os.cpu_count() or 1, object_store_mb=256)
    ray.data.range(4).take_all()  # start the workers Ray Data uses before measuring
    out = measure_runs(args["sets"], args["ckpt"], args["root"], **args.get("infer", {}))
    ray.shutdown()
    return out


def memory_plates(preset: str, root: str) -> tuple[list[str], str, float]:
    """Four plates of the memory preset, an artefact, and one plate's size in MB as float32 fields."""
    p = MEMORY_PRESETS[preset]
    os.makedirs(root, exist_ok=True)
    uris = make_plates(root, 4, p["wells"], p["fields"], p["size"], prefix="M")
    return uris, make_artefact(root), p["wells"] * p["fields"] * 2 * p["size"] ** 2 * 4 / 1e6


def compare(preset: str, plate_mb: float, one: dict, four: dict) -> dict:
    return {"preset": preset, "plate_mb_float32": round(plate_mb, 2), "one": one, "four": four,
            "ratio": round(four["peak"]["all"] / one["peak"]["all"], 3),
            "ratio_driver_workers": round(four["peak"]["driver_workers"] / one["peak"]["driver_workers"], 3)}


def memory(preset: str, root: str, **infer) -> dict:
    """Peak RSS of ``run_infer`` over 1 plate and over 4 plates (same shape), in a fresh
    process with its own local Ray; ``ratio`` = peak(4) / peak(1) of the whole tree."""
    uris, ckpt, plate_mb = memory_plates(preset, root)
    child = {"sets": [uris[:1], uris], "ckpt": ckpt, "root": root, "infer": infer}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, never a shared one
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", json.dumps(child)],
                          capture_output=True, text=True, timeout=600, env=env, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{proc.stderr[-4000:]}")
    one, four = json.loads(proc.stdout.strip().splitlines()[-1])
    return compare(preset, plate_mb, one, four)


# -- output


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def _print_throughput(r: dict) -> None:
    print(f"inference throughput, preset {r['preset']} on {r['device']}: {r['plates']} plates, {r['fields']} "
          f"fields of {r['field_shape']}, {r['cores']} cores, batch {r['batch_size']} fields (one well), pool "
          f"{r['concurrency']} actor(s) x {r['num_cpus']} CPU")
    print(f"{r['wells_per_call']} wells per actor call; steady rate from the done flags after the first "
          f"{r['steady_skips_wells']} wells")
    for i, x in enumerate(r["rounds"]):
        print(f"  round {i + 1}: forward {x['forward']} fields/s; run_infer steady {x['run_infer_steady']}, "
              f"total {x['run_infer_total']} fields/s (first well after {x['first_well_s']} s); "
              f"steady / best forward = {x['steady_vs_forward']}")
    print(f"best of {r['repeats']}: forward {r['forward_fields_per_s']}, run_infer steady {r['steady_fields_per_s']}, "
          f"total {r['total_fields_per_s']} fields/s")
    print(f"run_infer steady / forward = {r['steady_vs_forward']}x (target >= 0.85; median of rounds "
          f"{r['steady_vs_forward_median_round']}x)   total (start-up included) / forward = {r['total_vs_forward']}x")
    if "labels_vs_plain" in r:
        print(f"with infer.labels (masks also written into the plates): steady {r['labels_steady_fields_per_s']} "
              f"fields/s = {r['labels_vs_plain']}x of run_infer without (median of rounds "
              f"{r['labels_vs_plain_median_round']}x)")


def _print_memory(r: dict) -> None:
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    print(f"inference memory, preset {r['preset']}: plates of {r['plate_mb_float32']} MB (float32 fields)")
    for key in ("one", "four"):
        c = r[key]
        print(f"  {c['plates']} plate(s): {c['wells']} wells in {c['seconds']} s; peak RSS all processes "
              f"{mb(c['peak']['all'])}, driver + workers {mb(c['peak']['driver_workers'])}")
        print(f"    at the peak: {c['at_peak_mb']}")
    print(f"  peak(4) / peak(1) = {r['ratio']} (target <= 1.25); driver + workers: {r['ratio_driver_workers']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--concurrency", type=int, default=None, help="actors in the pool (default: cores)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (torch threads) per actor")
    parser.add_argument("--batch-size", type=int, default=None, help="default: fields per well")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (forward, run_infer); best of each")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, 1 vs 4 plates")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    parser.add_argument("--memory-child", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--labels", action="store_true",
                        help="each round also runs run_infer with infer.labels (masks into the plates) and compares")
    parser.add_argument("--gpu", action="store_true",
                        help="throughput on the GPU: the Predictor there vs run_infer with infer.use_gpu (1 actor)")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu: no CUDA GPU visible to PyTorch here")
        if args.memory or args.memory_only:
            parser.error("--gpu measures throughput only (drop --memory / --memory-only)")
    if (args.memory or args.memory_only) and args.preset not in MEMORY_PRESETS:
        parser.error(f"--memory: no memory preset {args.preset!r}; choose from {sorted(MEMORY_PRESETS)}")
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return
    cores = os.cpu_count() or 1
    concurrency = args.concurrency or (1 if args.gpu else max(1, int(cores // args.num_cpus)))
    root = tempfile.mkdtemp(prefix="rayscreen-bench-infer-")
    results = {}
    try:
        if not args.memory_only:
            results["throughput"] = throughput(args.preset, root, concurrency, args.num_cpus, args.batch_size,
                                               args.repeats, args.labels, args.gpu)
            if not args.json:
                _print_throughput(results["throughput"])
        if args.memory or args.memory_only:
            results["memory"] = memory(args.preset, os.path.join(root, "memory"),
                                       concurrency=concurrency, num_cpus=args.num_cpus)
            if not args.json:
                _print_memory(results["memory"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
