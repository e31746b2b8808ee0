"""Ray Train throughput vs a plain PyTorch loop, same fields, model and batch size.

    python benchmarks/train.py --preset small [--out DIR] [--epochs N]

Writes a synthetic WSCNN screen, fits its normalisation, then measures training
samples/s (training batches only, validation excluded; epoch 1 is warm-up and dropped):

- plain: one process, every training field already in memory (normalised float32),
  the same :func:`rayscreen.train.step.train_step`, same model, batch size, augmentation;
- ray-1 / ray-2: :func:`rayscreen.train.run_train` with 1 and 2 workers, streaming the
  same fields from the plate (Ray Data read -> iter_torch_batches -> DDP).

Ratios (ray / plain) are printed from this one run. On CPU each Ray worker reserves
``--cpus-per-worker`` CPUs; the Ray Data read uses what remains.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

PRESETS = {
    # n_images, fields (Y, X), width, batch size, epochs
    "small": dict(n_images=320, shape=(96, 128), grid=(3, 4), n_objects=(8, 12), width=0.25, batch_size=16, epochs=4),
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


def config(uris, output, p, workers, cpus_per_worker):
    from rayscreen.config import config_from_dict

    return config_from_dict({
        "plates": uris, "output": output, "stream": {"normalize": "percentile"},
        "label": {"column": "Metadata_Label", "positive": ["positive"]},
        "model": {"name": "wscnn", "kwargs": {"width": p["width"]}},
        "train": {"num_workers": workers, "cpus_per_worker": cpus_per_worker, "epochs": p["epochs"],
                  "batch_size": p["batch_size"], "optimizer": "sgd", "lr": 0.01, "schedule": "none",
                  "augment": {"enabled": True, "rotate": False, "translate": 0.0},
                  "split": {"by": "column", "column": "Metadata_Split",
                            "column_values": {"train": ["train", "test"], "val": ["val"]}}},
    })


def plain_loop(cfg, threads: int) -> float:
    """Samples/s of a single-process loop over the training fields held in memory."""
    from rayscreen.models import create_model
    from rayscreen.store import open_plate
    from rayscreen.stream.normalize import load_normalization
    from rayscreen.train.loop import make_transform
    from rayscreen.train.plan import plan_run
    from rayscreen.train.step import make_optimizer, train_step

    plan = plan_run(cfg)
    images, labels = [], []
    for uri in plan.uris:
        plate, norm = open_plate(uri), load_normalization(uri)
        rows = plan.wells[(plan.wells["split"] == "train") & (plan.wells["Metadata_Plate"] == plate.name)]
        for row in rows.itertuples():
            for f in plate.fields(row.Metadata_Well):
                images.append(norm.transform(plate.read(row.Metadata_Well, f)))
                labels.append(row.label_index)
    x, y = torch.from_numpy(np.stack(images)), torch.tensor(labels)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = cfg.train
    model = create_model(cfg.model.name, in_channels=x.shape[1], num_classes=len(plan.classes), **cfg.model.kwargs)
    opt = make_optimizer(model.parameters(), t)
    rates = []
    for epoch in range(1, t.epochs + 1):
        transform = make_transform(cfg, 0, epoch)
        order = torch.randperm(len(x))
        start = time.time()
        for i in range(0, len(x), t.batch_size):
            idx = order[i:i + t.batch_size]
            train_step(model, opt, x[idx], y[idx], transform=transform)
        rates.append(len(x) / (time.time() - start))
    return float(np.mean(rates[1:])), len(x)


def ray_rate(result) -> float:
    m = result.metrics.iloc[1:]  # epoch 1: warm-up (worker start, first reads)
    return float((m["train_samples"] / m["train_seconds"]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--out", help="working directory (default: a temporary one)")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    ap.add_argument("--cpus-per-worker", type=float, default=None,
                    help="CPUs per Ray Train worker (default: cpus / 2 / workers, the rest for the read)")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.epochs:
        p["epochs"] = args.epochs
    import ray

    out = args.out or tempfile.mkdtemp(prefix="rayscreen-bench-train-")
    uris = make_screen(out, p)
    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="error", configure_logging=False,
             log_to_driver=False)
    from rayscreen.train import run_train

    per1 = args.cpus_per_worker or max(0.5, args.cpus / 2)
    plain, n = plain_loop(config(uris, os.path.join(out, "plain"), p, 1, per1), threads=max(1, int(per1)))
    rates = {}
    for workers in (1, 2):
        per = args.cpus_per_worker or max(0.5, args.cpus / 2 / workers)
        result = run_train(config(uris, os.path.join(out, f"ray{workers}"), p, workers, per), progress=False)
        rates[workers] = (ray_rate(result), per)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"preset {args.preset}: {n} training fields {p['shape']}, wscnn width {p['width']}, batch {p['batch_size']}, "
          f"{p['epochs']} epochs (first dropped), {args.cpus} CPUs, device {dev}")
    print(f"plain PyTorch loop (in memory, {max(1, int(per1))} threads): {plain:8.1f} samples/s")
    for workers, (rate, per) in rates.items():
        print(f"Ray Train {workers} worker(s) x {per:g} CPU (streamed):  {rate:8.1f} samples/s   "
              f"ratio to plain {rate / plain:.2f}x")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
