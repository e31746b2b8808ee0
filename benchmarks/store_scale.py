"""Results-store costs that grow with the number of wells, each beside its plain baseline in
the same run (local disk; the S3 request counts of a stage's start are benchmarks/resume_scan.py):

1. creating a store's skeleton: ``create_results`` (one dask chunk per variable, metadata only)
   against the same ``to_zarr(compute=False)`` with a dask chunk per well (what it built before);
2. field -> well means over a whole store (aggregate's ``well_profiles``): dask chunks of
   ``READ_WELLS_PER_CHUNK`` wells against xarray's default of one zarr chunk (one well) each.

    python benchmarks/store_scale.py [--wells 20000] [--features 128]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import warnings

import numpy as np
import pandas as pd


def wells_table(n: int) -> pd.DataFrame:
    rows = "ABCDEFGHIJKLMNOP"
    return pd.DataFrame({"plate": [f"P{i // 384:04d}" for i in range(n)],
                         "well": [f"{rows[(i % 384) // 24]}{i % 24 + 1:02d}" for i in range(n)],
                         "Metadata_Compound": ["c"] * n})


def per_well_skeleton(uri: str, n: int, fields: int, features: int) -> None:
    """The baseline: the same arrays written with ``to_zarr(compute=False)`` from dask arrays
    chunked one well per chunk, as ``create_results`` did before."""
    import dask.array as da
    import xarray as xr

    shapes = {"field_status": ((n, fields), "int8", 1), "field_profile": ((n, fields, features), "float32", np.nan)}
    data = {name: (("well", "field", "feature")[:len(shape)],
                   da.full(shape, fill, dtype=dtype, chunks=(1, *shape[1:])))
            for name, (shape, dtype, fill) in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.Dataset(data).to_zarr(uri, mode="w", compute=False, zarr_format=3, consolidated=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wells", type=int, default=20000)
    p.add_argument("--fields", type=int, default=9)
    p.add_argument("--features", type=int, default=128)
    args = p.parse_args(argv)
    import zarr

    from rayscreen.analysis.stages import well_profiles
    from rayscreen.store.results import READ_WELLS_PER_CHUNK, Variable, create_results, open_results

    n, root = args.wells, tempfile.mkdtemp(prefix="rs-store-")
    variables = [Variable("field_status", ("well", "field"), "int8", 1),
                 Variable("field_profile", ("well", "field", "feature"), "float32")]
    sizes = {"field": args.fields, "feature": args.features}

    t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_well_skeleton(f"{root}/baseline.zarr", n, args.fields, args.features)
    base_s = time.perf_counter() - t0
    base_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    t0 = time.perf_counter()
    writer = create_results(f"{root}/r.zarr", wells_table(n), sizes, variables)
    ours_s = time.perf_counter() - t0
    print(f"{n} wells: skeleton with a dask chunk per well (baseline) {base_s:.2f} s (+{base_mb:.0f} MB peak RSS); "
          f"create_results {ours_s:.2f} s; ratio {base_s / ours_s:.1f}x")

    rng = np.random.default_rng(0)
    zarr.open_array(store=writer._store, path="field_profile", mode="r+")[...] = \
        rng.normal(size=(n, args.fields, args.features)).astype("float32")
    zarr.open_array(store=writer._store, path="field_status", mode="r+")[...] = np.zeros((n, args.fields), "int8")
    times = {}
    for label, chunks in (("one well per dask chunk (baseline)", None),
                          (f"{READ_WELLS_PER_CHUNK} wells per dask chunk", {"well": READ_WELLS_PER_CHUNK})):
        t0 = time.perf_counter()
        table = well_profiles(open_results(writer.uri, chunks=chunks), "field_profile", "feature")
        times[label] = time.perf_counter() - t0
        assert len(table) == n
        print(f"well_profiles, {label}: {times[label]:.2f} s")
    (b, o) = times.values()
    print(f"ratio {b / o:.1f}x")


if __name__ == "__main__":
    main()
