"""A small, complete run directory in the layout of ``docs/outputs.md``, with known values.

Used by the report's tests (unit and browser) and handy to preview the page without
running a screen: ``write_example_run(out)`` writes two tiny plates and every stage's
outputs (or only ``stages``), and returns the :class:`~rayscreen.config.Config` of the run.

Known answers the tests rely on: the well scores P(positive) are
``0.1 * (well index + 1)`` over wells in order (P1/A01 .. P2/B02: 0.1 .. 0.8); field
scores are ``well score - 0.05 * field``; field 1 of P2/B01 has status 3 (QC-flagged,
NaN scores); the saliency of every field peaks at pixel (y, x) = (2, 3) of the map.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import pandas as pd

from ..config import Config, config_from_dict

PLATES = ("P1", "P2")
WELLS = ("A01", "A02", "B01", "B02")
FIELDS = 2
FIELD_SHAPE = (32, 40)
DOWNSAMPLE = 4
CLASSES = ("negative", "positive")
MOAS = {"A01": "DMSO", "A02": "tubulin", "B01": "actin", "B02": "tubulin"}
COMPOUNDS = {"A01": "DMSO", "A02": "cpdA", "B01": "cpdB", "B02": "cpdC"}
ALL_STAGES = ("train", "infer", "profile", "aggregate", "evaluate", "qc")


def write_example_run(output: str, plates_dir: str | None = None, *, stages: Sequence[str] = ALL_STAGES,
                      n_features: int = 6, seed: int = 0) -> Config:
    """Write plates under ``plates_dir`` (default ``<output>/../plates``) and the outputs of
    ``stages`` under ``output`` (local paths). Returns the run's Config."""
    import xarray as xr

    from ..testing.plates import make_plate

    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {ALL_STAGES}")
    plates_dir = plates_dir or os.path.join(os.path.dirname(os.path.abspath(output)), "plates")
    os.makedirs(output, exist_ok=True)
    uris = []
    for i, plate in enumerate(PLATES):
        uri = os.path.join(plates_dir, f"{plate}.zarr")
        if not os.path.exists(uri):
            ann = pd.DataFrame({"Metadata_Well": list(WELLS), "Metadata_Compound": [COMPOUNDS[w] for w in WELLS],
                                "Metadata_MOA": [MOAS[w] for w in WELLS]})
            make_plate(uri, plate, wells=WELLS, fields=FIELDS, field_shape=FIELD_SHAPE, seed=seed + i,
                       annotations=ann)
        uris.append(uri)
    config = config_from_dict({"plates": uris, "output": output, "report": {"top_fields": 3}})
    rng = np.random.default_rng(seed)
    keys = [(p, w) for p in PLATES for w in WELLS]
    n_wells = len(keys)

    if "train" in stages:
        os.makedirs(os.path.join(output, "train"), exist_ok=True)
        epochs = np.arange(1, 5)
        pd.DataFrame({"epoch": epochs, "train_loss": 1.0 / epochs, "val_loss": 1.2 / epochs,
                      "val_accuracy": 0.5 + 0.1 * epochs, "val_balanced_accuracy": 0.5 + 0.1 * epochs,
                      "val_precision": 0.6 + 0.05 * epochs, "val_recall": 0.55 + 0.1 * epochs,
                      "val_f1": 0.55 + 0.08 * epochs, "val_roc_auc": 0.6 + 0.09 * epochs,
                      "seconds": 1.5}).to_csv(os.path.join(output, "train", "metrics.csv"), index=False)
        pd.DataFrame({"Metadata_Plate": [p for p, _ in keys], "Metadata_Well": [w for _, w in keys],
                      "split": ["train", "train", "val", "test"] * len(PLATES),
                      "label": [int(MOAS[w] != "DMSO") for _, w in keys]}
                     ).to_csv(os.path.join(output, "train", "split.csv"), index=False)

    y, x = FIELD_SHAPE[0] // DOWNSAMPLE, FIELD_SHAPE[1] // DOWNSAMPLE
    well_score = 0.1 * (np.arange(n_wells) + 1)
    status = np.zeros((n_wells, FIELDS), np.int8)
    status[keys.index(("P2", "B01")), 1] = 3
    field_pos = well_score[:, None] - 0.05 * np.arange(FIELDS)[None, :]
    field_pos = np.where(status == 0, field_pos, np.nan)
    saliency = rng.random((n_wells, FIELDS, y, x)) * 0.5
    saliency[:, :, 2, 3] = 1.0
    coords = {
        "well": [f"{p}/{w}" for p, w in keys], "field": np.arange(FIELDS),
        "plate": ("well", [p for p, _ in keys]), "row": ("well", [w[0] for _, w in keys]),
        "column": ("well", [int(w[1:]) for _, w in keys]),
        "Metadata_Plate": ("well", [p for p, _ in keys]), "Metadata_Well": ("well", [w for _, w in keys]),
        "Metadata_Compound": ("well", [COMPOUNDS[w] for _, w in keys]),
        "Metadata_MOA": ("well", [MOAS[w] for _, w in keys]),
    }
    features = [f"f{i}" for i in range(n_features)]
    well_profile = rng.normal(size=(n_wells, n_features)).astype(np.float32)
    field_profile = (well_profile[:, None, :] + 0.1 * rng.normal(size=(n_wells, FIELDS, n_features))).astype(np.float32)

    def store(kind: str, data_vars: dict, extra_coords: dict) -> None:
        ds = xr.Dataset(data_vars, coords={**coords, **extra_coords})
        ds.attrs["rayscreen"] = {"kind": kind, "version": "example", "created": "2026-01-01T00:00:00",
                                 "model": "wscnn" if kind == "results" else None, "checkpoint": None, "config": {}}
        ds.chunk({"well": 1}).to_zarr(os.path.join(output, f"{kind}.zarr"), mode="w", zarr_format=3,
                                      consolidated=True)

    common = {
        "field_status": (("well", "field"), status),
        "field_profile": (("well", "field", "feature"), field_profile),
        "well_profile": (("well", "feature"), well_profile),
        "n_fields": (("well",), (status == 0).sum(axis=1).astype(np.int16)),
        "done": (("well",), np.ones(n_wells, np.uint8)),
    }
    if "infer" in stages:
        fs = np.stack([1 - field_pos, field_pos], axis=-1).astype(np.float32)
        store("results", {
            **common,
            "field_scores": (("well", "field", "class"), fs),
            "saliency": (("well", "field", "y", "x"), saliency.astype(np.float16)),
            "mask": (("well", "field", "y", "x"), (saliency >= 0.5).astype(np.uint8)),
            "well_scores": (("well", "class"), np.stack([1 - well_score, well_score], -1).astype(np.float32)),
        }, {"class": list(CLASSES), "feature": features})
    if "profile" in stages:
        store("profiles", common, {"feature": features})

    if "aggregate" in stages:
        tables = os.path.join(output, "tables")
        os.makedirs(tables, exist_ok=True)
        well = pd.DataFrame({"Metadata_Plate": [p for p, _ in keys], "Metadata_Well": [w for _, w in keys],
                             "Metadata_Compound": [COMPOUNDS[w] for _, w in keys],
                             "Metadata_MOA": [MOAS[w] for _, w in keys]})
        well = pd.concat([well, pd.DataFrame(well_profile, columns=features)], axis=1)
        well.to_parquet(os.path.join(tables, "well.parquet"), index=False)
        well.to_csv(os.path.join(tables, "well.csv"), index=False)
        treat = well.drop(columns=["Metadata_Plate", "Metadata_Well"]).groupby(
            ["Metadata_Compound", "Metadata_MOA"], as_index=False).mean()
        treat.to_parquet(os.path.join(tables, "treatment.parquet"), index=False)
    if "qc" in stages:
        tables = os.path.join(output, "tables")
        os.makedirs(tables, exist_ok=True)
        rows = [{"Metadata_Plate": p, "Metadata_Well": w, "Metadata_Field": f,
                 "Metadata_QC_Score": float(status[i, f] == 3), "Metadata_QC_Abnormal": bool(status[i, f] == 3)}
                for i, (p, w) in enumerate(keys) for f in range(FIELDS)]
        pd.DataFrame(rows).to_csv(os.path.join(tables, "qc.csv"), index=False)
    if "evaluate" in stages:
        ev = os.path.join(output, "evaluation")
        os.makedirs(ev, exist_ok=True)
        moas = ["actin", "tubulin"]
        with open(os.path.join(ev, "evaluation.json"), "w") as f:
            json.dump({"nsc": 0.75, "nscb": 0.5, "map": 0.6, "n_queries": 4, "n_queries_nscb": 4,
                       "per_moa": {m: {"n_compounds": 2, "n_queries": 2, "nsc": 0.5, "nscb": 0.5, "map": 0.6}
                                   for m in moas},
                       "baseline": {"nsc": 0.5}, "warnings": []}, f)
        pd.DataFrame([[2, 0], [1, 1]], index=pd.Index(moas, name="true"), columns=moas).to_csv(
            os.path.join(ev, "confusion.csv"))
        pd.DataFrame({"Metadata_Plate": ["P1", "P2"], "Metadata_Well": ["B02", "B02"], "score": [0.4, 0.8],
                      "score_z": [3.2, 4.1]}).to_csv(os.path.join(ev, "hits.csv"), index=False)
        pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["C07"], "class": ["tubulin"], "score": [0.93],
                      "z": [5.5]}).to_csv(os.path.join(ev, "hits_score.csv"), index=False)
        pd.DataFrame({"Metadata_Plate": ["P1", "P2"], "z_prime": [0.61, -0.2]}).to_csv(
            os.path.join(ev, "z_prime.csv"), index=False)
        pd.DataFrame({"Metadata_Plate": ["P1"], "class": ["tubulin"], "z_prime": [0.47]}).to_csv(
            os.path.join(ev, "z_prime_score.csv"), index=False)
    return config
