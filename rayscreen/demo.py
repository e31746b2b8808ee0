"""``rayscreen demo``: the main job on a local embedded Ray, on a small synthetic screen.

synth (a BBBC021-like MOA screen: 2 plates x 48 wells x 3 fields) -> export as TIFF
files + a LoadData CSV (the input users bring) -> ingest on Ray into OME-Zarr plates ->
then ``jobs/configs/demo.yaml`` through the pipeline: illum -> train (WSCNN on the wells'
MOA labels, Ray Train) -> infer (scores, saliency, profiles to results.zarr) -> profile
(transfer-learning + classical profiles) -> aggregate -> evaluate (NSC/NSCB/mAP, QC, hits)
-> report. Ends with a short summary and the path of the report.

The QC classifier needs a few fields annotated normal/abnormal, as a user would label
them by eye: the demo takes those labels for 50 fields from the synthetic screen's ground
truth (``qc_labels.csv``) and scores the classifier on all the other fields.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import numpy as np
import pandas as pd

from .config import load_config, parse_overrides
from .ingest import ingest
from .store.annotations import read_csv_table
from .ingest.export import export_loaddata
from .raylocal import ensure_ray
from .store.info import plate_info

log = logging.getLogger(__name__)

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "demo.yaml")
QC_LABELLED_FIELDS = 50
# written first into every demo output: the demo replaces a directory only if it holds this
MARKER = ".rayscreen-demo"
DEMO_ENTRIES = {MARKER, "synth", "raw", "plates", "run", "demo.yaml", "qc_labels.csv"}


def prepare_output(out: str) -> None:
    """Empty ``out`` for a fresh demo run, or refuse. A demo starts afresh, so it replaces an
    earlier demo's output, which it knows by :data:`MARKER`; any other existing, non-empty
    directory is the user's (``--out .`` in a checkout, ``--out ~/data``) and is never deleted,
    nor the working directory, home or a directory above them."""
    from .store.errors import RayscreenError

    path = os.path.realpath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RayscreenError(f"demo --out {out}: a file, not a directory")
    if os.path.isdir(path) and os.listdir(path):
        cwd, home = os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))
        protected = [p for p in (cwd, home) if p == path or p.startswith(path.rstrip(os.sep) + os.sep)]
        if protected or path == os.sep:
            raise RayscreenError(f"demo --out {out}: {path} is the working directory, home or a directory above "
                                 "them; give the demo a directory of its own (default demo_out)")
        # a demo output from before the marker: exactly what a demo writes, synth/ and raw/ (the
        # synthetic screen and its TIFF export) included, which a user's own screen would not hold
        entries = set(os.listdir(path))
        earlier = entries <= DEMO_ENTRIES and {"synth", "raw", "plates", "demo.yaml"} <= entries
        if not (os.path.exists(os.path.join(path, MARKER)) or earlier):
            raise RayscreenError(f"demo --out {out}: {path} exists, is not empty and is not a demo output (no "
                                 f"{MARKER}); the demo replaces only its own outputs. Choose another directory "
                                 "or delete this one yourself")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("output of `rayscreen demo`: a new demo run replaces this directory\n")


def demo_config_text(out: str) -> str:
    """The demo config (``jobs/configs/demo.yaml``) with its paths moved under ``out``."""
    with open(_config_path(), encoding="utf-8") as f:
        text = f.read()
    # as a quoted YAML string: a path with ',', '#' or ']' would otherwise break the flow
    # sequences of the config (plates: [demo_out/plates/*.zarr]) or be cut at a comment
    import json
    import re

    prefix = out.rstrip("/") + "/"
    return re.sub(r"demo_out/([^\s,\]\}\"']*)", lambda m: json.dumps(prefix + m.group(1)), text)


def _config_path() -> str:
    path = os.path.abspath(DEMO_CONFIG)
    if not os.path.exists(path):  # installed without the repo: the packaged copy
        path = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")
    return path


def write_qc_labels(fields: pd.DataFrame, path: str, n: int = QC_LABELLED_FIELDS, seed: int = 0) -> pd.DataFrame:
    """Annotate ``n`` fields normal/abnormal, like a user labelling by eye.

    ``fields``: the synthetic ground truth (plate, well, field, is_artefact). Half the
    labels go to artefacts when there are enough (users label the odd fields they
    notice), the rest are drawn at random.
    """
    rng = np.random.default_rng(seed)
    bad = fields.index[fields["is_artefact"].astype(bool)].to_numpy()
    good = fields.index[~fields["is_artefact"].astype(bool)].to_numpy()
    n_bad = min(len(bad), n // 2)
    pick = np.concatenate([rng.choice(bad, n_bad, replace=False), rng.choice(good, n - n_bad, replace=False)])
    chosen = fields.loc[np.sort(pick)]
    table = pd.DataFrame({"Metadata_Plate": chosen["plate"].to_numpy(), "Metadata_Well": chosen["well"].to_numpy(),
                          "field": chosen["field"].astype(int).to_numpy(),
                          "label": np.where(chosen["is_artefact"].astype(bool), "abnormal", "normal")})
    table.to_csv(path, index=False)
    return table


def run_demo(out: str = "demo_out", *, quiet: bool = False, seed: int = 0, overrides: list[str] | None = None) -> dict:
    from .pipeline import run_pipeline
    from .synth import load_moa_fields, synth_moa

    start = time.perf_counter()
    config_text = demo_config_text(out)  # before any work: a missing config fails now, not after ingest
    prepare_output(out)
    step = _stepper(quiet)
    step("synth: a small MOA screen (2 plates x 48 wells x 3 fields, 3 channels)")
    synth_dir = os.path.join(out, "synth")
    synth_uris = synth_moa(synth_dir, seed=seed)
    step("export: TIFF files + LoadData CSV")
    csv = export_loaddata(synth_uris, os.path.join(out, "raw"))
    step(f"ingest: {csv} -> OME-Zarr plates on a local Ray")
    ensure_ray(include_dashboard=False)
    plates = ingest(csv, os.path.join(out, "plates"), progress=not quiet)
    n_fields = sum(plate_info(uri)["fields"] for uri in plates)
    write_qc_labels(load_moa_fields(synth_dir), os.path.join(out, "qc_labels.csv"), seed=seed)

    config_path = os.path.join(out, "demo.yaml")
    with open(config_path, "w") as f:
        f.write(config_text)
    config = load_config(config_path, overrides=parse_overrides(overrides))
    step(f"pipeline: {config_path}")
    run_pipeline(config, progress=not quiet)

    summary = summarise(config.output, synth_dir)
    summary.update(plates=plates, fields=n_fields, labels=config.infer.labels,
                   seconds=round(time.perf_counter() - start, 1))
    print(format_summary(summary))
    return summary


def summarise(output: str, synth_dir: str) -> dict:
    """Headline figures from a finished demo run's outputs."""
    from .store.results import open_results

    s: dict = {"report": os.path.abspath(os.path.join(output, "report", "index.html"))}
    metrics = pd.read_csv(os.path.join(output, "train", "metrics.csv"))
    best = metrics.loc[metrics["val_balanced_accuracy"].idxmax()]
    s["val_accuracy"] = float(best["val_accuracy"])
    s["val_balanced_accuracy"] = float(best["val_balanced_accuracy"])
    split = read_csv_table(os.path.join(output, "train", "split.csv"))
    ds = open_results(os.path.join(output, "results.zarr"))
    classes = [str(c) for c in ds["class"].values]
    predicted = np.asarray(classes, dtype=object)[ds["well_scores"].argmax("class").values]
    truth = pd.Series([str(v) for v in ds["Metadata_MOA"].values], index=[str(k) for k in ds["well"].values])
    test_keys = set((split.loc[split["split"] == "test", "Metadata_Plate"] + "/"
                     + split.loc[split["split"] == "test", "Metadata_Well"]).tolist())
    is_test = np.array([k in test_keys for k in truth.index])
    s["test_wells"] = int(is_test.sum())
    s["test_well_accuracy"] = float((predicted[is_test] == truth.values[is_test]).mean()) if is_test.any() else None
    s["chance"] = 1.0 / len(classes)
    with open(os.path.join(output, "evaluation", "evaluation.json")) as f:
        ev = json.load(f)
    s["evaluation"] = ev
    qc_path = os.path.join(output, "tables", "qc.json")
    if os.path.exists(qc_path):
        with open(qc_path) as f:
            s["qc"] = json.load(f)
    return s


def format_summary(s: dict) -> str:
    ev = s.get("evaluation", {})
    lines = [f"demo: {len(s['plates'])} plates, {s['fields']} fields, {s['seconds']} s",
             f"  training  best val accuracy {s['val_accuracy']:.2f} (balanced {s['val_balanced_accuracy']:.2f})",
             f"  inference test-well MOA accuracy {_fmt(s['test_well_accuracy'])} over {s['test_wells']} held-out "
             f"wells (chance {s['chance']:.2f})",
             "  localisation: needs object-level ground truth; see benchmarks/wscnn_sim.py (docs/results.md)"]
    for name, block in _feature_sets(ev):
        lines.append(f"  MOA ({name:9s}) NSC {_fmt(block.get('nsc'))}  NSCB {_fmt(block.get('nscb'))}  "
                     f"mAP {_fmt(block.get('map'))}")
    if "n_hits" in ev:
        lines.append(f"  hits      {ev['n_hits']} wells far from their plate's DMSO controls")
    if "n_hits_score" in ev:
        lines.append(f"  hits      {ev['n_hits_score']} (well, MOA) scores above those of their plate's DMSO controls")
    qc = s.get("qc") or {}
    if qc:
        lines.append("  QC        " + ", ".join(f"{k} {_fmt(v)}" for k, v in qc.items() if isinstance(v, (int, float))))
    if s.get("plates") and s.get("labels"):  # infer.labels: the masks went into the plates
        lines.append(f"  masks     NGFF label images in the plates ({os.path.dirname(s['plates'][0])}/*.zarr/<row>/<column>/"
                     f"<field>/labels/{s['labels']}): napari overlays them")
    lines.append(f"  report    {s['report']}")
    return "\n".join(lines)


def _feature_sets(ev: dict):
    sets = ev.get("feature_sets")
    if isinstance(sets, dict):
        return list(sets.items())
    return [("deep", ev)] + ([("classical", ev["baseline"])] if isinstance(ev.get("baseline"), dict) else [])


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _stepper(quiet: bool):
    def step(message: str) -> None:
        if not quiet:
            print(f"[rayscreen demo] {message}", flush=True)

    return step
