"""Profiles of several networks concatenated per field, evaluated like any other profiles.

    python benchmarks/ensemble_profiles.py --out DIR --config RUN/config.yaml STORE [STORE ...]
        [--analysis-set analysis.whiten=true]

Each ``STORE`` is a results store that ``rayscreen infer`` wrote for the same wells (e.g. the
``run-learned-*/results.zarr`` of ``benchmarks/moa.py --learned-checkpoint`` with different
reference models). ``DIR/results.zarr`` gets every field's ``field_profile`` of all stores
side by side (features ``m<i>_<name>``, in the order given) through the results writer;
QC flags are reset (status 3 -> 0) and QC runs again on the merged embeddings, with the
annotations of ``--config`` (the config of one of the runs: its analysis and QC settings are
used, its output replaced by ``DIR``). Then ``aggregate`` and ``evaluate`` run as for every
other store and NSC / NSCB / mAP are printed.

An ensemble of independently trained networks averages out what one draw learned by chance;
the price is one training and one inference per member.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings

import numpy as np

STATUS_QC, STATUS_OK = 3, 0


def merge_stores(stores: list[str], out_uri: str) -> str:
    """Write ``out_uri``: the wells of ``stores`` (which must list the same wells, fields and
    annotations) with ``field_profile`` (well, field, sum of features) concatenated across
    stores, ``field_status`` of the first store with QC flags reset (fields absent or
    unreadable in any store stay out), and ``n_fields``. Returns ``out_uri``."""
    from rayscreen.store.results import Variable, create_results, open_results

    sets = [open_results(s) for s in stores]
    first = sets[0]
    for uri, ds in zip(stores[1:], sets[1:]):
        if list(ds["well"].values) != list(first["well"].values) or ds.sizes["field"] != first.sizes["field"]:
            raise SystemExit(f"{uri}: other wells or fields than {stores[0]}")
    status = np.where(first["field_status"].values == STATUS_QC, STATUS_OK, first["field_status"].values)
    for uri, ds in zip(stores[1:], sets[1:]):
        other = np.where(ds["field_status"].values == STATUS_QC, STATUS_OK, ds["field_status"].values)
        status = np.where(other != STATUS_OK, other, status)  # out in one store: out of the ensemble
    profiles = np.concatenate([ds["field_profile"].values for ds in sets], axis=2)
    names = [f"m{i}_{f}" for i, ds in enumerate(sets) for f in ds["feature"].values]
    meta = [c for c in first.coords if c.startswith("Metadata_") and first[c].dims == ("well",)]
    wells = first[["plate"]].to_dataframe().reset_index(drop=True)[["plate"]]
    wells["well"] = [str(k).rpartition("/")[2] for k in first["well"].values]
    for c in meta:
        wells[c] = first[c].values
    n_fields = first.sizes["field"]
    sizes = {"field": n_fields, "feature": len(names)}
    variables = [Variable("field_status", ("well", "field"), "int8", 1),
                 Variable("field_profile", ("well", "field", "feature"), "float32"),
                 Variable("n_fields", ("well",), "int16", 0)]
    writer = create_results(out_uri, wells, sizes, variables, coords={"feature": names}, kind="results",
                            attrs={"model": "ensemble", "members": list(stores)}, overwrite=True)
    for i in range(len(wells)):
        writer.write_well(i, {"field_status": status[i].astype(np.int8), "field_profile": profiles[i],
                              "n_fields": np.int16((status[i] == STATUS_OK).sum())})
    writer.finalize()
    return out_uri


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="+", help="results stores of the same wells")
    p.add_argument("--out", required=True, help="output folder (its results.zarr, tables/, evaluation/)")
    p.add_argument("--config", required=True, help="config.yaml of one of the runs (analysis and QC settings)")
    p.add_argument("--analysis-set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    from rayscreen.analysis.stages import run_aggregate, run_evaluate
    from rayscreen.config import load_config, parse_overrides

    settings = parse_overrides(args.analysis_set)
    wrong = [k for k in settings if not k.startswith("analysis.")]
    if wrong:
        p.error(f"--analysis-set takes analysis.* keys only, not {wrong}")
    out = os.path.abspath(args.out)
    config = load_config(args.config, overrides={**settings, "output": out})
    merge_stores(args.stores, os.path.join(out, "results.zarr"))
    run_aggregate(config)
    result = run_evaluate(config, progress=False)["feature_sets"]["deep"]
    print(json.dumps({"members": len(args.stores), "nsc": result["nsc"], "nscb": result["nscb"],
                      "map": result["map"], "n_queries": result["n_queries"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
