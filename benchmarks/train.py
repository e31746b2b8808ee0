"""Ray Train throughput vs a plain PyTorch loop, same fields, model, batch size and threads.

    python benchmarks/train.py --preset small|medium [--epochs N] [--repeats R] [--cpus C] [--cache-mb N]
                               [--one-cpu-worker]

Writes a synthetic WSCNN screen, fits its normalisation, then measures training
samples/s (training batches only: validation and checkpoints excluded in both paths;
epoch 1 is warm-up and dropped):

- plain: one process, every training field already in memory (normalised float32), the
  same :func:`rayscreen.train.step.train_step`, model, batch size and augmentation, torch
  at its normal settings (intra-op threads = torch's default for this machine) unless
  ``--cpus C`` sets C threads;
- ray-1: :func:`rayscreen.train.run_train`, 1 worker reserving the ``C`` CPUs (so it
  runs as many torch threads as the plain loop; the local Ray gets ``READ_FREE_CPUS``
  more logical CPUs for the read tasks, which share the cores), streaming the same
  fields from the plate (Ray Data read -> ``iter_torch_batches``); its time includes
  waiting for every batch, the first included;
- ray-2: the same with 2 workers (DDP) sharing those CPUs;
- ray-1-cached (with ``--cache-mb N``): ray-1 with ``train.cache_mb: N``: epoch 1 streams,
  epochs 2.. train on the fields held in the worker, reshuffled (the plain loop's setting).
- with ``--one-cpu-worker`` (and ``--cache-mb``): a cached worker that reserves 1 CPU (as
  on a 2-CPU Ray whose other CPU the reads need, ``READ_FREE_CPUS``; with ``--cpus 2`` the
  cores are those of that case), once at its default torch threads (1) and once with
  ``train.torch_threads: C`` (the cores the reads leave idle once the fields are held).

With ``--repeats R`` the paths run R times alternately (plain, ray-1, ray-2, ..., plain,
...) and the medians are printed, with ratios taken within each repeat. The local Ray is
started as ``run_train`` starts one (``rayscreen.raylocal.LOCAL_RAY_SYSTEM_CONFIG``: idle read workers kept
between epochs); ``--ray-defaults`` starts it with Ray's defaults instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

PRESETS = {
    # n_images (2 fields each), fields (Y, X), width, batch size, epochs
    "small": dict(n_images=320, shape=(96, 128), grid=(3, 4), n_objects=(8, 12), width=0.25, batch_size=16, epochs=4),
    # 4x the fields of small: the per-epoch start of the stream is amortised over ~4x the work
    "medium": dict(n_images=1280, shape=(96, 128), grid=(3, 4), n_objects=(8, 12), width=0.25, batch_size=16,
                   epochs=3),
    "paper": dict(n_images=4000, shape=(210, 280), grid=(6, 8), n_objects=(30, 48), width=1.0, batch_size=32, epochs=3),
}


def make_screen(out: str, p: dict) -> list[str]:
    from rayscreen.stream.normalize import PercentileScaler, fit_plate_normalizer
    from rayscreen.synth import synth_wscnn

    uris = synth_wscnn(os.path.join(out, "plates"), n_images=p["n_images"], rare_fraction=0.5, fields_per_well=2,
                       seed=1, shape=p["shape"], grid=p["grid"], n_objects=p["n_objects"])
    for uri in uris:
        fit_plate_normalizer(uri, PercentileScaler(), save=True, max_fields=64)
    return uris


def config(uris, output, p, workers, cpus_per_worker, cache_mb=0, torch_threads=0):
    from rayscreen.config import config_from_dict

    return config_from_dict({
        "plates": uris, "output": output, "stream": {"normalize": "percentile"},
        "label": {"column": "Metadata_Label", "positive": ["positive"]},
        "model": {"name": "wscnn", "kwargs": {"width": p["width"]}},
        "train": {"num_workers": workers, "cpus_per_worker": cpus_per_worker, "epochs": p["epochs"],
                  "batch_size": p["batch_size"], "optimizer": "sgd", "lr": 0.01, "schedule": "none",
                  "cache_mb": cache_mb, "torch_threads": torch_threads,
                  "augment": {"enabled": True, "rotate": False, "translate": 0.0},
                  "split": {"by": "column", "column": "Metadata_Split",
                            "column_values": {"train": ["train", "test"], "val": ["val"]}}},
    })


def training_fields(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's training fields (N, C, Y, X), normalised float32, and labels (N,), in memory."""
    from rayscreen.store import open_plate
    from rayscreen.stream.normalize import load_normalization
    from rayscreen.train.plan import plan_run

    plan = plan_run(cfg)
    images, labels = [], []
    for uri in plan.uris:
        plate, norm = open_plate(uri), load_normalization(uri)
        rows = plan.wells[(plan.wells["split"] == "train") & (plan.wells["Metadata_Plate"] == plate.name)]
        for row in rows.itertuples():
            for f in plate.fields(row.Metadata_Well):
                images.append(norm.transform(plate.read(row.Metadata_Well, f)))
                labels.append(row.label_index)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def plain_loop(cfg, x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Samples/s of a single-process loop over fields held in memory (epochs 2.. averaged)."""
    from rayscreen.models import create_model
    from rayscreen.train.loop import make_transform
    from rayscreen.train.step import make_optimizer, train_step

    torch.manual_seed(0)
    t = cfg.train
    model = create_model(cfg.model.name, in_channels=x.shape[1], num_classes=n_classes, **cfg.model.kwargs)
    opt = make_optimizer(model.parameters(), t)
    rates = []
    for epoch in range(1, t.epochs + 1):
        transform = make_transform(cfg, 0, epoch)
        order = torch.randperm(len(x))
        start = time.perf_counter()
        for i in range(0, len(x), t.batch_size):
            idx = order[i:i + t.batch_size]
            train_step(model, opt, x[idx], y[idx], transform=transform)
        rates.append(len(x) / (time.perf_counter() - start))
    return float(np.mean(rates[1:]))


def ray_rate(result) -> tuple[float, float]:
    """(samples/s over epochs 2.., mean seconds per epoch waiting for batches)."""
    m = result.metrics.iloc[1:]  # epoch 1: warm-up (worker start, first reads)
    return float((m["train_samples"] / m["train_seconds"]).mean()), float(m["data_wait_seconds"].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--out", help="working directory (default: a temporary one; an existing screen is reused)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of the paths; medians printed")
    ap.add_argument("--cpus", type=int, default=None,
                    help="torch threads of the plain loop and CPUs the Ray workers reserve together "
                         "(default: torch's default threads, the plain loop left at its normal setting)")
    ap.add_argument("--cache-mb", type=int, default=0,
                    help="also run 1 worker with train.cache_mb set to this (epochs 2.. from memory)")
    ap.add_argument("--one-cpu-worker", action="store_true",
                    help="with --cache-mb: also a cached worker reserving 1 CPU, at 1 torch thread and at --cpus")
    ap.add_argument("--ray-defaults", action="store_true",
                    help="start the local Ray with Ray's defaults (idle read workers killed after 1 s)")
    args = ap.parse_args(argv)
    if args.one_cpu_worker and not args.cache_mb:
        ap.error("--one-cpu-worker: needs --cache-mb N (its worker trains on the held fields from epoch 2)")
    p = dict(PRESETS[args.preset])
    if args.epochs:
        p["epochs"] = args.epochs
    import ray

    from rayscreen.train import run_train
    from rayscreen.raylocal import local_init_kwargs
    from rayscreen.train.loop import READ_FREE_CPUS, worker_threads

    out = args.out or tempfile.mkdtemp(prefix="rayscreen-bench-train-")
    plates = os.path.join(out, "plates")
    if os.path.isdir(plates):
        uris = sorted(os.path.join(plates, d) for d in os.listdir(plates) if d.endswith(".zarr"))
    else:
        uris = make_screen(out, p)
    if args.cpus is None:
        args.cpus = torch.get_num_threads()  # the plain loop's normal setting, left as it is
    else:
        torch.set_num_threads(args.cpus)
    threads = torch.get_num_threads()
    ray.init(**local_init_kwargs(num_cpus=args.cpus + READ_FREE_CPUS, include_dashboard=False, logging_level="error",
                                 log_to_driver=False, **({"_system_config": {}} if args.ray_defaults else {})))
    # the workers reserve all the machine's CPUs (same torch threads as the plain loop);
    # the Ray gets READ_FREE_CPUS more logical CPUs for the read tasks, which therefore
    # compete with the training threads for the same cores: the price of streaming
    per = {1: args.cpus, 2: args.cpus / 2}
    cfg = config(uris, os.path.join(out, "plain"), p, 1, per[1])
    x, y = training_fields(cfg)
    # (name, workers, CPUs each, train.cache_mb, train.torch_threads (0: ceil of the CPUs))
    paths = [("ray-1", 1, per[1], 0, 0), ("ray-2", 2, per[2], 0, 0)]
    if args.cache_mb:
        paths.append(("ray-1-cached", 1, per[1], args.cache_mb, 0))
    if args.cache_mb and args.one_cpu_worker:
        paths += [("ray-1-cached-1cpu", 1, 1, args.cache_mb, 0),
                  ("ray-1-cached-1cpu-threads", 1, 1, args.cache_mb, args.cpus)]
    rows: dict[str, list[float]] = {"plain": [], **{k: [] for name, *_ in paths for k in (name, f"wait-{name}")}}
    loads = []
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        rows["plain"].append(plain_loop(cfg, x, y, 2))
        for name, workers, cpus, cache_mb, torch_threads in paths:
            run_out = os.path.join(out, f"{name}-{time.time_ns()}")
            result = run_train(config(uris, run_out, p, workers, cpus, cache_mb, torch_threads), progress=False)
            rate, wait = ray_rate(result)
            rows[name].append(rate)
            rows[f"wait-{name}"].append(wait)
        print(f"repeat {r + 1}/{args.repeats} (load {loads[-1]:.1f}): plain {rows['plain'][-1]:.1f}  "
              + "  ".join(f"{name} {rows[name][-1]:.1f}" for name, *_ in paths) + " samples/s", flush=True)
    loads.append(os.getloadavg()[0])
    med = statistics.median
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"preset {args.preset}: {len(x)} training fields {p['shape']}, wscnn width {p['width']}, "
          f"batch {p['batch_size']}, {p['epochs']} epochs (first dropped), "
          f"{args.cpus} CPUs (+{READ_FREE_CPUS:g} for reads), device {dev}, "
          f"{args.repeats} repeat(s), load average {min(loads):.1f}-{max(loads):.1f}, "
          f"{'Ray defaults' if args.ray_defaults else 'idle workers kept'}")
    print(f"plain PyTorch loop (in memory, {threads} threads):   {med(rows['plain']):8.1f} samples/s (median)")
    for name, workers, cpus, cache_mb, torch_threads in paths:
        ratios = [a / b for a, b in zip(rows[name], rows["plain"])]
        how = f"cache_mb {cache_mb}: epochs 2.. from memory" if cache_mb else "streamed"
        print(f"Ray Train {workers} worker(s) x {cpus:g} CPU, {worker_threads(cpus, torch_threads)} thread(s) each "
              f"({how}): {med(rows[name]):8.1f} samples/s   ratio to plain {med(ratios):.2f}x "
              f"(per repeat {', '.join(f'{v:.2f}' for v in ratios)}; waiting for data "
              f"{med(rows[f'wait-{name}']):.2f} s/epoch)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
