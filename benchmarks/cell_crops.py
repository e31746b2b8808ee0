"""Probe: the learned profiles of a finished ``benchmarks/moa.py --learned`` run, computed three
ways from its exported model, then aggregated and evaluated as the product does:

- ``field``: the pooled trunk features of the whole field (what ``rayscreen infer`` writes;
  reproduces the run's own figures);
- ``cells``: the mean over 48 px crops centred on the nuclei (Otsu on the smoothed DNA
  channel; single-cell crops as in Caicedo et al. / DeepProfiler);
- ``random``: the mean over 16 random 48 px crops (the training views);
- ``layers``: the whole field's output of every trunk block, each mean-pooled, concatenated
  (early blocks keep intensity and fine texture that the last block's mean pools away;
  ``--views`` adds it);
- ``meanstd``: the last block's map pooled by mean and standard deviation over locations
  (the spread of a phenotype across the field, not only its mean: the model's own
  ``feature_pool: meanstd``; ``--views`` adds it).

    python benchmarks/cell_crops.py /tmp/exp5/s1-i0.4/run-learned-int0.4 [...] [--views field,layers,meanstd]

Fields the run's QC flagged are left out, as in the run. One CPU, no Ray Train.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import numpy as np
import pandas as pd

from rayscreen.stream.cells import crops_at, nucleus_centres

CROP = 48  # the learned config's train.crop


def block_means(trunk, field) -> np.ndarray:
    """field (1, C, H, W) -> each block's output (after its max pooling) mean-pooled and
    concatenated, (sum of block widths,). ``trunk`` is the milnet's small trunk (an
    nn.Sequential of blocks)."""
    import torch

    outs, x = [], field
    for layer in trunk:
        x = layer(x)
        if isinstance(layer, torch.nn.MaxPool2d):
            outs.append(x.mean(dim=(2, 3)))
    return torch.cat(outs, 1)[0].numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="learned run directories (with config.yaml, train/model, tables/qc.csv)")
    p.add_argument("--views", default="field,cells,random",
                   help="comma-separated, of field, cells, random, layers, meanstd (default: %(default)s)")
    args = p.parse_args(argv)
    views_wanted = args.views.split(",")
    unknown = set(views_wanted) - {"field", "cells", "random", "layers", "meanstd"}
    if unknown:
        p.error(f"--views: unknown {sorted(unknown)}")
    warnings.simplefilter("ignore")
    import ray
    import torch

    from rayscreen.analysis.evaluate import evaluate_moa
    from rayscreen.analysis.stages import process_wells, treatment_profiles
    from rayscreen.config import load_config
    from rayscreen.models.artefact import build_model
    from rayscreen.stream import read_plates

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    scores: dict[str, list] = {}
    for run in args.runs:
        rng = np.random.default_rng(0)
        config = load_config(f"{run}/config.yaml")
        model = build_model(f"{run}/train/model")[0].eval()
        spread = copy.copy(model)  # the same network, its profile pooled by mean and spread
        spread.feature_pool = "meanstd"
        qc = pd.read_csv(f"{run}/tables/qc.csv")
        flagged = set(map(tuple, qc.loc[qc["Metadata_QC_Abnormal"], ["Metadata_Plate", "Metadata_Well",
                                                                       "Metadata_Field"]].astype(str).values))
        features: dict[str, list] = {name: [] for name in views_wanted}
        meta = []
        with torch.no_grad():
            for row in read_plates(config.plates, illumination=True, normalize=True).iter_rows():
                if (row["plate"], row["well"], str(row["field"])) in flagged:
                    continue
                image = np.asarray(row["image"], np.float32)
                centres = nucleus_centres(image[0])
                if not len(centres):
                    centres = np.array([[image.shape[1] // 2, image.shape[2] // 2]])
                ys = rng.integers(0, image.shape[1] - CROP + 1, 16)
                xs = rng.integers(0, image.shape[2] - CROP + 1, 16)
                views = {"field": image[None], "cells": crops_at(image, centres, CROP),
                         "random": np.stack([image[:, y:y + CROP, x:x + CROP] for y, x in zip(ys, xs)])}
                views["meanstd"] = image[None]
                for name in views_wanted:
                    if name == "layers":
                        features[name].append(block_means(model.trunk, torch.from_numpy(image[None])))
                    else:
                        net = spread if name == "meanstd" else model
                        features[name].append(net.features(torch.from_numpy(views[name])).mean(0).numpy())
                meta.append({k: v for k, v in row.items() if k.startswith("Metadata_")}
                            | {"Metadata_Plate": row["plate"], "Metadata_Well": row["well"]})
        meta = pd.DataFrame(meta)
        for name, rows in features.items():
            table = pd.concat([meta, pd.DataFrame(np.stack(rows)).add_prefix("f")], axis=1)
            feats = [c for c in table.columns if not c.startswith("Metadata_")]
            wells = table.groupby(list(meta.columns), as_index=False, dropna=False)[feats].mean()
            e = evaluate_moa(treatment_profiles(process_wells(wells.assign(Metadata_Fields=1), config), config))
            scores.setdefault(name, []).append((e.nsc, e.nscb, e.map))
            print(f"{run}  {name:<7} NSC {e.nsc:.3f}  NSCB {e.nscb:.3f}  mAP {e.map:.3f}", flush=True)
    for name, rows in scores.items():
        print(f"mean of {len(rows)} runs  {name:<7} NSC / NSCB / mAP {np.round(np.mean(rows, axis=0), 3).tolist()}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
