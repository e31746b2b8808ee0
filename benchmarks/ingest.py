"""Ingest and raw ``Plate.read`` throughput on local disk, with plain baselines from the same run.

    python benchmarks/ingest.py --preset small

Prints fields/s and MB/s (decompressed) for:
- ingest (TIFF -> OME-Zarr, in-process and on Ray tasks) against reading the same TIFFs
  with tifffile alone (the floor any ingest pays);
- ``Plate.read`` against plain ``zarr`` array reads of the same arrays (our overhead).
Machines here are noisy: compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pandas as pd
import tifffile
import zarr

PRESETS = {
    "tiny": dict(wells=4, fields=2, channels=3, size=256),
    "small": dict(wells=24, fields=4, channels=3, size=512),
    "large": dict(wells=96, fields=9, channels=5, size=1080),
}


def make_tiffs(root: str, wells: int, fields: int, channels: int, size: int) -> str:
    rng = np.random.default_rng(0)
    rows = []
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    names = [f"{r}{c:02d}" for r in "ABCDEFGH" for c in range(1, 13)][:wells]
    for well in names:
        for s in range(1, fields + 1):
            row = {"Metadata_Plate": "BENCH", "Metadata_Well": well, "Metadata_Site": s}
            for c in range(channels):
                # smooth-ish content compresses like microscopy, not like white noise
                img = (rng.normal(1000, 200, (size // 8, size // 8)).repeat(8, 0).repeat(8, 1)
                       + rng.normal(0, 20, (size, size))).clip(0, 65535).astype(np.uint16)
                name = f"{well}_s{s}_c{c}.tif"
                tifffile.imwrite(os.path.join(root, "img", name), img)
                row[f"FileName_ch{c}"] = name
                row[f"PathName_ch{c}"] = "img"
            rows.append(row)
    csv = os.path.join(root, "load_data.csv")
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="small")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    root = args.workdir or tempfile.mkdtemp(prefix="rs-bench-ingest-")
    csv = make_tiffs(root, **p)
    n_fields = p["wells"] * p["fields"]
    mb = n_fields * p["channels"] * p["size"] ** 2 * 2 / 1e6

    from rayscreen.ingest import ingest, read_loaddata
    from rayscreen.store import open_plate

    ld = read_loaddata(csv)

    def tiff_only():
        for _, row in ld.table.iterrows():
            for c in ld.channels:
                tifffile.imread(ld.image_path(row, c))

    t_tiff = timed(tiff_only)
    out = os.path.join(root, "plates")
    t_ingest = timed(lambda: ingest(csv, out, use_ray=False, progress=False))
    results = [("tifffile read only (baseline)", t_tiff), ("ingest in-process", t_ingest)]
    if not args.no_ray:
        import ray

        from rayscreen.raylocal import local_init_kwargs

        ray.init(**local_init_kwargs(include_dashboard=False))
        ingest(csv, os.path.join(root, "warm"), use_ray=True, progress=False)  # warm the workers
        shutil.rmtree(os.path.join(root, "warm"))
        t_ray = timed(lambda: ingest(csv, os.path.join(root, "plates_ray"), use_ray=True, progress=False))
        results.append(("ingest on Ray tasks", t_ray))
        ray.shutdown()

    plate = open_plate(os.path.join(out, "BENCH.zarr"))
    keys = [(w, f) for w in plate.wells for f in plate.fields(w)]
    root_group = zarr.open_group(os.path.join(out, "BENCH.zarr"), mode="r")
    arrays = [root_group[f"{plate.well_path(w)}/{f}/0"] for w, f in keys]

    def plain_zarr():
        for a in arrays:
            a[...]

    def plate_read():
        for w, f in keys:
            plate.read(w, f)

    plate_read()  # warm the metadata caches, as a streaming reader would be after its first field
    t_zarr = timed(plain_zarr)
    t_read = timed(plate_read)

    print(f"preset {args.preset}: {n_fields} fields of {p['channels']}x{p['size']}x{p['size']} uint16, {mb:.0f} MB")
    for name, t in results:
        print(f"  {name:34s} {n_fields / t:8.1f} fields/s {mb / t:8.1f} MB/s  ratio vs tifffile {t_tiff / t:5.2f}x")
    print(f"  {'plain zarr reads (baseline)':34s} {n_fields / t_zarr:8.1f} fields/s {mb / t_zarr:8.1f} MB/s")
    print(f"  {'Plate.read':34s} {n_fields / t_read:8.1f} fields/s {mb / t_read:8.1f} MB/s  "
          f"ratio vs plain zarr {t_zarr / t_read:5.2f}x")
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
