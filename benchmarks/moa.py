"""MOA profiling on the synthetic screen: deep (transfer-learning) profiles vs the classical
baseline, NSC / NSCB / mAP, and the QC classifier's F1, measured in one run.

    python benchmarks/moa.py --preset small [--out DIR] [--weights PATH] [--qc-seeds 10] [--learned]
        [--analysis-set analysis.whiten=true] [--learned-checkpoint MODEL]

Both profile sets see the same stream: illumination-corrected (``rayscreen illum``, run
first) and percentile-normalised per plate.

``--learned`` adds weakly supervised profiles (Caicedo et al. 2018; the supervision that
WS-DINO builds on), with the settings of ``jobs/configs/learned-profiles.yaml``: a
Kraus-style class-map network (``milnet``, mean pooling) trained on random crops
through ``rayscreen train`` to tell the wells' **compounds** apart (the only label a screen
always has; MOA labels are never seen in training), then ``rayscreen infer`` writes its
pooled trunk features per field to ``results.zarr`` and ``aggregate`` / ``evaluate`` run
on that store (``analysis.source: results``) with the same settings as the other sets.

``--learned-checkpoint MODEL`` profiles the screen with a network trained elsewhere instead
(``benchmarks/reference_model.py``: a reference screen of made-up MOAs), the
transfer-learning setting of Pawlowski et al. with a reference screen in ImageNet's place.

QC is measured as a user would meet it: 50 annotated fields, F1 over the fields NOT
annotated (ground truth from ``load_moa_fields``), repeated over ``--qc-seeds`` annotation
draws on the image-QC metrics the profile stage stored, for two annotation protocols:

- ``balanced``: the annotator browses the screen and marks 20 artefacts and 30 normal
  fields (drawn at random from each class of the ground truth);
- ``outlier``: the 25 fields with the highest unsupervised outlier score
  (``rayscreen.analysis.qc.outlier_score``) + 25 random others, labels from the ground
  truth (no browsing; the held-out fields then hold only the artefacts the score missed).

``--weights``: a torchvision resnet18 state dict (e.g. ImageNet weights saved on a machine
with access: ``torch.save(torchvision.models.resnet18(weights="IMAGENET1K_V1").state_dict(), p)``).
Without it the backbone is randomly initialised (seeded), which is what these machines can do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

PRESETS = {"small": dict(n_plates=2, fields_per_well=3, field_shape=(128, 128), input_size=64),
           "medium": dict(n_plates=3, fields_per_well=4, field_shape=(192, 192), input_size=128)}


LEARNED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "configs",
                              "learned-profiles.yaml")


def learned_config(uris: list[str], output: str, qc: dict | None, seed: int = 0, settings: dict | None = None):
    """The shipped ``jobs/configs/learned-profiles.yaml`` on this screen: train a class-map
    network on the wells' compound labels, infer every well, aggregate the inference store
    (settings and their reasons are in the YAML); ``qc``: the analysis.qc section (None: the YAML's);
    ``settings``: further ``{"train.mixup": 0.2, ...}`` overrides (``--learned-set``,
    ``--learned-epochs``)."""
    from rayscreen.config import load_config

    overrides = {**(settings or {}), "plates": uris, "output": output, "train.seed": seed, "train.split.seed": seed}
    if qc is not None:
        overrides["analysis.qc"] = qc
    return load_config(LEARNED_CONFIG, overrides=overrides)


def qc_study(store: str, truth: pd.DataFrame, seeds: int = 10, method: str = "linear") -> list[str]:
    """Held-out F1 of the artefact classifier on the stored ``field_qc`` metrics over
    ``seeds`` annotation draws of 50 fields per protocol (see the module docstring)."""
    import xarray as xr

    from rayscreen.analysis.qc import classify_artefacts, outlier_score, qc_embedding, suggest_annotations
    from rayscreen.analysis.stages import field_table

    ds = xr.open_zarr(store)
    fields = field_table(ds, "field_qc", "qc_metric", statuses=(0, 3))
    feats = [c for c in fields.columns if not c.startswith("Metadata_")]
    emb = qc_embedding(fields, feats)
    table = pd.concat([fields[["Metadata_Plate", "Metadata_Well", "Metadata_Field"]], emb], axis=1)
    y = table[["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].merge(
        truth.assign(Metadata_Field=truth["field"].astype(int)).rename(
            columns={"plate": "Metadata_Plate", "well": "Metadata_Well"}), how="left")["is_artefact"].to_numpy(bool)
    score = outlier_score(emb, table["Metadata_Plate"])
    lines = [f"QC held-out study ({method} on {len(feats)} image-QC metrics, 50 labelled fields, F1 over the "
             f"{len(y) - 50} others; {int(y.sum())} artefacts of {len(y)} fields; the 25 top outlier scores hold "
             f"{int(y[np.argsort(-score)[:25]].sum())} artefacts)"]
    for protocol in ("balanced", "outlier"):
        f1s = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            if protocol == "balanced":
                idx = np.r_[rng.choice(np.flatnonzero(y), 20, replace=False),
                            rng.choice(np.flatnonzero(~y), 30, replace=False)]
            else:
                idx = suggest_annotations(score, 25, 25, seed=seed)
            ann = table.iloc[idx][["Metadata_Plate", "Metadata_Well", "Metadata_Field"]].assign(
                label=np.where(y[idx], "abnormal", "normal"))
            pred = classify_artefacts(table, ann, method=method, label="label",
                                      features=list(emb.columns)).predictions["Metadata_QC_Abnormal"].to_numpy()
            test = np.setdiff1d(np.arange(len(y)), idx)
            tp = int((pred[test] & y[test]).sum())
            f1s.append(2 * tp / max(int(pred[test].sum() + y[test].sum()), 1))
        f1s = np.array(f1s)
        lines.append(f"  {protocol:<9} F1 held-out over {seeds} seeds: mean {f1s.mean():.3f}, median "
                     f"{np.median(f1s):.3f}, min {f1s.min():.3f}, max {f1s.max():.3f}, >= 0.9 in "
                     f"{int((f1s >= 0.9).sum())}/{seeds}: {np.round(f1s, 3).tolist()}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--out", help="output directory (default: a temporary one)")
    p.add_argument("--weights", help="resnet18 state dict; default: random, seeded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--qc-method", default="linear", choices=["knn", "linear"])
    p.add_argument("--qc-features", default="qc", choices=["deep", "classical", "qc"])
    p.add_argument("--qc-seeds", type=int, default=10, help="annotation draws of the held-out QC study")
    p.add_argument("--learned", action="store_true", help="also train and evaluate weakly supervised profiles")
    p.add_argument("--learned-epochs", type=int, help="training epochs of --learned (default: the config's)")
    p.add_argument("--learned-seed", type=int, help="training (and well split) seed of --learned (default: --seed); "
                   "the run goes to <out>/run-learned-s<seed>")
    p.add_argument("--learned-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the learned config (YAML value), e.g. --learned-set train.mixup=0.2; "
                        "the run goes to <out>/run-learned-<name> with --learned-name")
    p.add_argument("--learned-name", help="suffix of the learned run's directory (default: from --learned-seed)")
    p.add_argument("--learned-checkpoint", metavar="MODEL",
                   help="profile with this trained model (e.g. benchmarks/reference_model.py's, trained on "
                        "another screen) instead of training one on this screen: --learned without its train stage")
    p.add_argument("--analysis-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an analysis.* key for every profile kind, e.g. --analysis-set analysis.whiten=true")
    args = p.parse_args(argv)
    from rayscreen.config import parse_overrides

    analysis_settings = parse_overrides(args.analysis_set)
    wrong = [k for k in analysis_settings if not k.startswith("analysis.")]
    if wrong:
        p.error(f"--analysis-set takes analysis.* keys only, not {wrong}")
    learned_settings = {**parse_overrides(args.learned_set), **analysis_settings}
    if args.learned_checkpoint:
        ignored = [k for k in learned_settings if k.startswith("train.")]
        ignored += [flag for flag, v in (("--learned-epochs", args.learned_epochs), ("--learned-seed", args.learned_seed))
                    if v is not None]
        if ignored:
            p.error(f"--learned-checkpoint trains nothing: {ignored} would be ignored")
        args.learned = True
        learned_settings["infer.checkpoint"] = os.path.abspath(args.learned_checkpoint)
    if args.learned_epochs:
        learned_settings["train.epochs"] = args.learned_epochs
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    import ray

    from rayscreen.analysis.stages import run_aggregate, run_evaluate
    from rayscreen.config import config_from_dict
    from rayscreen.models import save_backbone_weights
    from rayscreen.pipeline import run_pipeline
    from rayscreen.profile import run_profile
    from rayscreen.raylocal import local_init_kwargs
    from rayscreen.stream.fit import run_illum
    from rayscreen.synth import load_moa_fields, synth_moa

    preset = PRESETS[args.preset]
    out = args.out or tempfile.mkdtemp(prefix="moa-bench-")
    t0 = time.perf_counter()
    uris = synth_moa(f"{out}/plates", n_plates=preset["n_plates"], fields_per_well=preset["fields_per_well"],
                     field_shape=preset["field_shape"], seed=args.seed)
    weights = args.weights or save_backbone_weights("resnet18", f"{out}/resnet18-random.pt", seed=args.seed)
    truth = load_moa_fields(f"{out}/plates")
    ann = pd.concat([truth[truth["is_artefact"]].sample(20, random_state=args.seed),
                     truth[~truth["is_artefact"]].sample(30, random_state=args.seed)])
    pd.DataFrame({"Metadata_Plate": ann["plate"], "Metadata_Well": ann["well"], "field": ann["field"],
                  "label": np.where(ann["is_artefact"], "abnormal", "normal")}).to_csv(f"{out}/qc.csv", index=False)
    t_synth = time.perf_counter() - t0
    config = config_from_dict({
        "plates": uris, "output": f"{out}/run", "stream": {"illumination": True},
        "profile": {"backbone": "resnet18", "weights": weights, "input_size": preset["input_size"],
                    "batch_size": 32, "overwrite": True},
        "analysis": {"qc": {"annotations": f"{out}/qc.csv", "method": args.qc_method,
                            "features": args.qc_features}}}, overrides=analysis_settings)
    ray.init(**local_init_kwargs(include_dashboard=False))
    t0 = time.perf_counter()
    run_illum(config, progress=False)
    t_illum = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_profile(config, progress=False)
    t_profile = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_aggregate(config)
    result = run_evaluate(config, progress=False)
    t_analysis = time.perf_counter() - t0
    qc = json.loads(open(f"{out}/run/tables/qc.json").read())
    flags = pd.read_csv(f"{out}/run/tables/qc.csv").merge(
        truth.assign(Metadata_Field=truth["field"].astype(int)).rename(
            columns={"plate": "Metadata_Plate", "well": "Metadata_Well"}),
        on=["Metadata_Plate", "Metadata_Well", "Metadata_Field"])
    tp = int((flags["Metadata_QC_Abnormal"] & flags["is_artefact"]).sum())
    learned, t_learned = None, 0.0
    if args.learned:
        t0 = time.perf_counter()
        # the same 50 annotated fields; the results store has no image-QC metrics, so the
        # artefact probe runs on the learned embeddings
        lseed = args.seed if args.learned_seed is None else args.learned_seed
        lout = f"{out}/run-learned" if args.learned_seed is None else f"{out}/run-learned-s{lseed}"
        if args.learned_name or args.learned_checkpoint:
            lout = f"{out}/run-learned-{args.learned_name or 'transfer'}"
        lconfig = learned_config(uris, lout, {"annotations": f"{out}/qc.csv", "method": args.qc_method,
                                              "features": "deep"}, lseed, learned_settings)
        stages = ["train", "infer", "aggregate", "evaluate"]
        if args.learned_checkpoint:
            stages = stages[1:]
        learned = run_pipeline(lconfig, stages=stages, progress=False)["evaluate"]["feature_sets"]["deep"]
        t_learned = time.perf_counter() - t0
    f1_all = 2 * tp / (flags["Metadata_QC_Abnormal"].sum() + flags["is_artefact"].sum())

    print(f"preset {args.preset}: {len(uris)} plates, {len(truth)} fields, "
          f"weights {'given' if args.weights else 'random (seeded)'}")
    print(f"{'profiles':<12} {'NSC':>6} {'NSCB':>6} {'mAP':>6} {'queries':>8}")
    rows = {("transfer" if k == "deep" else k): r for k, r in result["feature_sets"].items()}
    if learned is not None:
        rows["learned-ref" if args.learned_checkpoint else "learned"] = learned
        lqc = json.loads(open(f"{lout}/tables/qc.json").read())
    for name, r in rows.items():
        print(f"{name:<12} {r['nsc']:>6.3f} {r['nscb']:>6.3f} {r['map']:>6.3f} {r['n_queries']:>8}")
    print(f"QC ({qc['method']} on {qc['features']}, {qc['n_annotated']} labelled fields): "
          f"CV F1 {qc['f1']:.3f}, ROC-AUC {qc['roc_auc']:.3f}; F1 over all {len(flags)} fields {f1_all:.3f} "
          f"({int(flags['Metadata_QC_Abnormal'].sum())} flagged, {int(flags['is_artefact'].sum())} artefacts)")
    if learned is not None:
        print(f"QC of the learned run ({lqc['method']} on its embeddings): CV F1 {lqc['f1']:.3f}, "
              f"ROC-AUC {lqc['roc_auc']:.3f}")
    for line in qc_study(f"{out}/run/profiles.zarr", truth, seeds=args.qc_seeds, method=args.qc_method):
        print(line)
    print(f"seconds: synth {t_synth:.1f}, illum {t_illum:.1f}, profile {t_profile:.1f}, aggregate+evaluate "
          f"{t_analysis:.1f}" + (f", learned ({'' if args.learned_checkpoint else 'train+'}infer+aggregate+evaluate) "
                               f"{t_learned:.1f}" if args.learned else ""))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
