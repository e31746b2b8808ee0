"""``rayscreen report CONFIG``: read whatever a run left under ``<output>`` and write
``<output>/report/index.html`` with its PNG figures in ``<output>/report/figures/``.

Thin glue: each section reads one stage's outputs (the layout of ``docs/outputs.md``),
calls the pure functions of :mod:`.figures` and returns a :class:`~.html.Section`.
A stage that has not run gives a section that says so; a section whose inputs cannot
be read says why on the page (and in the log) instead of failing the whole report, so a
half-finished screen still gets a report.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..config import Config, ConfigError
from ..store import RayscreenError
from ..store.annotations import read_csv_table
from ..store.uri import expand_uris, filesystem, is_remote, join, mask_url_passwords
from . import figures as F
from .html import FigureRef, Section, render_page

log = logging.getLogger(__name__)

FIGURE_DIR = "figures"

# Outputs that show a stage ran (relative to <output>); the first that exists counts.
STAGE_OUTPUTS = {
    "train": ["train/metrics.csv"],
    "infer": ["results.zarr"],
    "profile": ["profiles.zarr"],
    "aggregate": ["tables/well.parquet", "tables/well.csv", "tables/treatment.parquet", "tables/treatment.csv"],
    "evaluate": ["evaluation/evaluation.json"],
}

# Columns of tables/qc.csv that flag a field (the artefact classifier's, then generic names).
QC_FLAG_COLUMNS = ("Metadata_QC_Abnormal", "flagged", "Metadata_QC_Flagged", "qc_flagged")


class ReportError(RayscreenError):
    """The report cannot be written (e.g. the output URI is not writable)."""


class RunOutputs:
    """Read access to one run directory (local or any fsspec URI)."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None):
        self.output = str(output).rstrip("/")
        self.storage_options = storage_options
        self.fs, self.root = filesystem(self.output, storage_options)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if is_remote(self.output) else os.path.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        if rel.endswith(".zarr"):  # a store exists once its root metadata does
            return self.fs.exists(self.path(rel + "/zarr.json")) or self.fs.exists(self.path(rel + "/.zgroup"))
        return self.fs.exists(self.path(rel))

    def first(self, *rels: str) -> str | None:
        return next((r for r in rels if self.exists(r)), None)

    def table(self, rel: str) -> pd.DataFrame:
        with self.fs.open(self.path(rel), "rb") as f:
            if rel.endswith(".parquet"):
                return pd.read_parquet(f)
            return read_csv_table(f, index_col=0 if rel.endswith("confusion.csv") else None)

    def json(self, rel: str) -> dict:
        with self.fs.open(self.path(rel), "rb") as f:
            return json.load(f)

    def store(self, rel: str):
        """The xarray Dataset of a results/profiles store, restricted to finished wells
        (``done == 1``): a well still being written must not show half its variables."""
        import xarray as xr

        from ..store.results import READ_WELLS_PER_CHUNK, done_wells_mask

        uri = join(self.output, rel)
        kwargs = {"storage_options": self.storage_options} if is_remote(uri) else {}
        ds = xr.open_zarr(uri if is_remote(uri) else self.path(rel), consolidated=None,
                          chunks={"well": READ_WELLS_PER_CHUNK}, **kwargs)
        if "done" in ds:  # listed where the store keeps its flags by presence, not read chunk by chunk
            ds = ds.isel(well=np.flatnonzero(done_wells_mask(uri, self.storage_options)))
        return ds


class ReportWriter:
    """Writes PNGs and the page under ``<output>/report`` (fsspec; S3 works the same)."""

    def __init__(self, outputs: RunOutputs):
        self.outputs = outputs
        self.fs = outputs.fs
        self.dir = outputs.path("report")
        self.names: set[str] = set()

    def reset(self) -> None:
        # Figures of an earlier report must not linger beside the new page.
        if self.fs.exists(self.dir):
            self.fs.rm(self.dir, recursive=True)
        self.fs.makedirs(self._join(self.dir, FIGURE_DIR), exist_ok=True)

    def _join(self, *parts: str) -> str:
        return posixpath.join(*parts) if is_remote(self.outputs.output) else os.path.join(*parts)

    def figure(self, name: str, fig, caption: str = "") -> FigureRef:
        """Save ``fig`` as ``figures/<name>.png`` (name made unique and file-safe)."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "figure"
        stem, i = safe, 1
        while safe in self.names:
            i += 1
            safe = f"{stem}_{i}"
        self.names.add(safe)
        data = F.to_png(fig)
        self.fs.pipe_file(self._join(self.dir, FIGURE_DIR, safe + ".png"), data)
        return FigureRef(src=f"{FIGURE_DIR}/{safe}.png", caption=caption)

    def page(self, text: str) -> str:
        path = self._join(self.dir, "index.html")
        self.fs.pipe_file(path, text.encode("utf-8"))
        return path


def run_report(config: Config, *, progress: bool = True) -> str:
    """Write the report of the run under ``config.output``; returns the page's path (local
    runs) or URI (remote runs): ``<output>/report/index.html``."""
    # the plates are opened only when a figure needs them (and a plate that cannot be opened
    # costs only those figures), but a glob matching nothing is a mistake in the config, an
    # error in every stage: expand the globs before anything is written
    try:
        expand_uris(config.plates, config.storage_options)
    except RayscreenError as e:
        raise ConfigError(f"plates: {e}") from None
    except OSError:  # storage unreachable: not the config's fault; the figures that need plates say so
        pass
    outputs = RunOutputs(config.output, config.storage_options)
    writer = ReportWriter(outputs)
    try:
        writer.reset()
    except OSError as e:
        raise ReportError(f"cannot write the report under {join(config.output, 'report')}: {e}") from None
    plates = _PlateCache(config)
    builders: list[tuple[str, Callable[[], Section]]] = [
        ("Stages", lambda: stage_section(outputs)),
        ("Training", lambda: training_section(outputs, writer)),
        ("Plate maps", lambda: plate_map_section(outputs, writer)),
        ("Top-scoring fields", lambda: top_fields_section(outputs, writer, plates, config.report.top_fields)),
        ("Profiles", lambda: profiles_section(outputs, writer, config)),
        ("MOA evaluation", lambda: evaluation_section(outputs, writer)),
        ("QC", lambda: qc_section(outputs, writer, plates)),
    ]
    sections = []
    for title, build in builders:
        if progress:
            print(f"[rayscreen report] {title.lower()}", flush=True)
        try:
            sections.append(build())
        except (RayscreenError, ValueError, KeyError, OSError, TypeError, IndexError) as e:
            # One unreadable output must not cost the user the rest of the report.
            log.warning("report section %r failed: %s: %s", title, type(e).__name__, e)
            sections.append(Section(title, error=f"{type(e).__name__}: {e}"))
    title = config.report.title or "rayscreen report"
    page = render_page(title, sections, subtitle=f"output: {mask_url_passwords(config.output)}")
    path = writer.page(page)
    result = path if not is_remote(config.output) else join(config.output, "report", "index.html")
    if progress:
        print(f"[rayscreen report] wrote {result}", flush=True)
    return result


# --------------------------------------------------------------------------- sections


def stage_section(outputs: RunOutputs) -> Section:
    rows, missing = [], []
    for stage, rels in STAGE_OUTPUTS.items():
        found = outputs.first(*rels)
        rows.append({"stage": stage, "status": "done" if found else "not run",
                     "output": found or " or ".join(rels)})
        if not found:
            missing.append(stage)
    s = Section("Stages", tables=[("", pd.DataFrame(rows))])
    if missing:
        s.notes.append(f"Stages that have not run (their sections are empty): {', '.join(missing)}.")
    return s


def training_section(outputs: RunOutputs, writer: ReportWriter) -> Section:
    s = Section("Training")
    if not outputs.exists("train/metrics.csv"):
        s.missing = "train has not run: no train/metrics.csv."
        return s
    metrics = outputs.table("train/metrics.csv")
    s.figures.append(writer.figure("training_curves", F.training_curves(metrics),
                                   "Loss and validation metrics per epoch (train/metrics.csv)."))
    s.tables.append(("last epoch", metrics.tail(1)))
    if outputs.exists("train/split.csv"):
        split = outputs.table("train/split.csv")
        if "split" in split:
            counts = split.groupby("split").size().rename("wells").reset_index()
            s.tables.append(("wells per split (train/split.csv)", counts))
    return s


def plate_map_section(outputs: RunOutputs, writer: ReportWriter) -> Section:
    s = Section("Plate maps")
    if not outputs.exists("results.zarr"):
        s.missing = "infer has not run: no results.zarr."
        return s
    ds = outputs.store("results.zarr")
    if "well_scores" not in ds or ds.sizes.get("well", 0) == 0:
        s.missing = "results.zarr holds no finished well scores yet."
        return s
    scores, what = _class_score(ds["well_scores"].values, _classes(ds))
    keys = _well_keys(ds)
    for plate, idx in keys.groupby("plate", sort=True).indices.items():
        sub = keys.iloc[idx]
        grid, rl, cl = F.well_grid(sub["row"].tolist(), sub["column"].tolist(), scores[idx])
        s.figures.append(writer.figure(f"plate_{plate}", F.plate_heatmap(grid, rl, cl, title=f"{plate}: {what}",
                                                                           label=what),
                                       f"Plate {plate}: well scores ({what}); grey = no scored well."))
    return s


def top_fields_section(outputs: RunOutputs, writer: ReportWriter, plates: "_PlateCache", k: int) -> Section:
    s = Section("Top-scoring fields")
    if not outputs.exists("results.zarr"):
        s.missing = "infer has not run: no results.zarr."
        return s
    ds = outputs.store("results.zarr")
    if "field_scores" not in ds or ds.sizes.get("well", 0) == 0:
        s.missing = "results.zarr holds no finished field scores yet."
        return s
    scores, what = _class_score(ds["field_scores"].values, _classes(ds))
    status = ds["field_status"].values if "field_status" in ds else None
    keys = _well_keys(ds)
    best = F.top_fields(scores, k, status)
    # the saliency tiles' block size, as infer recorded it (older stores: spread evenly)
    factor = (ds.attrs.get("rayscreen", {}).get("settings") or {}).get("infer.saliency_downsample")
    rows = []
    for rank, (w, f, score) in enumerate(best, 1):
        plate, well = keys["plate"].iat[w], keys["well"].iat[w]
        saliency = ds["saliency"][w, f].values.astype(np.float32) if "saliency" in ds else None
        mask = ds["mask"][w, f].values if "mask" in ds else None
        image, channels, note = plates.read(plate, well, f)
        title = f"#{rank} {plate} {well} field {f}: {what} {score:.3f}"
        if image is None:
            s.notes.append(f"{title}: {note}")
            if saliency is None:
                continue
            image = np.zeros((1, *F.upsample_nearest(saliency, saliency.shape).shape))
        s.figures.append(writer.figure(f"top_{rank:02d}_{plate}_{well}_{f}",
                                       F.saliency_figure(image, saliency, mask, title=title, channels=channels,
                                                         factor=factor),
                                       title))
        rows.append({"rank": rank, "plate": plate, "well": well, "field": f, what: score})
    if rows:
        s.tables.append(("", pd.DataFrame(rows)))
    else:
        s.notes.append("no scored fields.")
    return s


def profiles_section(outputs: RunOutputs, writer: ReportWriter, config: Config) -> Section:
    s = Section("Profiles")
    rel = outputs.first("tables/well.parquet", "tables/well.csv", "tables/treatment.parquet", "tables/treatment.csv")
    if rel is not None:
        table = outputs.table(rel)
    elif outputs.exists("profiles.zarr"):
        from ..analysis.profiles import to_table

        ds = outputs.store("profiles.zarr")
        if "well_profile" not in ds:
            s.missing = "profiles.zarr has no well_profile."
            return s
        table, rel = to_table(ds["well_profile"]), "profiles.zarr well_profile"
    else:
        s.missing = "aggregate and profile have not run: no tables/well.parquet, no profiles.zarr."
        return s
    meta = [c for c in table.columns if str(c).startswith("Metadata_")]
    feats = [c for c in table.columns if c not in meta and pd.api.types.is_numeric_dtype(table[c])]
    if len(table) < 2 or not feats:
        s.missing = f"{rel}: too few profiles ({len(table)}) or no feature columns to plot."
        return s
    X = table[feats].to_numpy(dtype=float)
    methods = ["pca"] + (["umap"] if F.umap_available() and len(table) >= 5 else [])
    colour_by = [c for c in (config.analysis.moa, config.analysis.compound) if c in table.columns]
    if not colour_by:
        s.notes.append(f"{rel} has neither {config.analysis.moa} nor {config.analysis.compound}: "
                       "points coloured by plate.")
        colour_by = [c for c in ("Metadata_Plate",) if c in table.columns] or [meta[0]] if meta else []
    for method in methods:
        coords = F.embed_2d(X, method)
        axes = ("PC1", "PC2") if method == "pca" else ("UMAP1", "UMAP2")
        for col in colour_by:
            label = col.removeprefix("Metadata_")
            s.figures.append(writer.figure(
                f"profiles_{method}_{label}",
                F.scatter_by(coords, table[col].tolist(), title=f"{method.upper()} of {rel}, by {label}", axes=axes),
                f"{len(table)} profiles from {rel} ({len(feats)} features), {method.upper()}, coloured by {label}."))
    if "umap" not in methods:
        s.notes.append("UMAP is not installed (or too few profiles): PCA only.")
    return s


def evaluation_section(outputs: RunOutputs, writer: ReportWriter) -> Section:
    s = Section("MOA evaluation")
    if not outputs.exists("evaluation/evaluation.json"):
        s.missing = "evaluate has not run: no evaluation/evaluation.json."
        return s
    ev = outputs.json("evaluation/evaluation.json")
    summary = {k: ev.get(k) for k in ("nsc", "nscb", "map", "n_queries", "n_queries_nscb") if k in ev}
    if summary:
        s.tables.append(("summary (evaluation.json)", pd.DataFrame([summary])))
    if isinstance(ev.get("baseline"), dict):
        base = {k: v for k, v in ev["baseline"].items() if not isinstance(v, (dict, list))}
        if base:
            s.tables.append(("baseline", pd.DataFrame([base])))
    if isinstance(ev.get("per_moa"), dict) and ev["per_moa"]:
        s.tables.append(("per MOA", pd.DataFrame.from_dict(ev["per_moa"], orient="index")
                         .rename_axis("MOA").reset_index()))
    for w in ev.get("warnings", []) or []:
        s.notes.append(f"warning: {w}")
    if outputs.exists("evaluation/confusion.csv"):
        conf = outputs.table("evaluation/confusion.csv")
        s.figures.append(writer.figure("nsc_confusion", F.confusion_figure(conf),
                                       "NSC 1-NN confusion matrix (evaluation/confusion.csv): counts, "
                                       "coloured by fraction of the true MOA's queries."))
    for name, what in (("hits", "wells far from their plate's controls in profile space"),
                       ("hits_score", "(well, class) scores above their plate's controls'")):
        if outputs.exists(f"evaluation/{name}.csv"):
            hits = outputs.table(f"evaluation/{name}.csv")
            s.tables.append((f"{name}: {len(hits)} {what} (evaluation/{name}.csv; top 20)", hits.head(20)))
    for name in ("z_prime", "z_prime_score"):
        if outputs.exists(f"evaluation/{name}.csv"):
            zp = outputs.table(f"evaluation/{name}.csv")
            s.tables.append((f"Z'-factor per plate (evaluation/{name}.csv; {len(zp)} rows, first 20)", zp.head(20)))
    return s


def qc_section(outputs: RunOutputs, writer: ReportWriter, plates: "_PlateCache", n_examples: int = 8) -> Section:
    s = Section("QC")
    fields = None
    if outputs.exists("tables/qc.csv"):
        qc = outputs.table("tables/qc.csv")
        flag = next((c for c in QC_FLAG_COLUMNS if c in qc.columns), None)
        if flag is None:
            s.notes.append(f"tables/qc.csv has none of the flag columns {', '.join(QC_FLAG_COLUMNS)}.")
        else:
            fields = pd.DataFrame({"plate": qc["Metadata_Plate"].astype(str), "well": qc["Metadata_Well"].astype(str),
                                   "field": qc["Metadata_Field"] if "Metadata_Field" in qc else 0,
                                   "flagged": qc[flag].astype(str).str.lower().isin(["true", "1", "1.0", "yes"])})
            source = f"tables/qc.csv ({flag})"
    if fields is None:
        for rel in ("results.zarr", "profiles.zarr"):
            if outputs.exists(rel):
                ds = outputs.store(rel)
                if "field_status" in ds:
                    fields, source = _fields_from_status(ds), f"{rel} field_status == 3"
                    break
    if fields is None or fields.empty:
        s.missing = "QC has not run: no tables/qc.csv and no field_status in a store."
        return s
    summary = F.qc_per_plate(fields, plate="plate", flagged="flagged")
    s.tables.append((f"flagged fields per plate ({source})", summary))
    s.figures.append(writer.figure("qc_per_plate", F.qc_figure(summary), f"Flagged fields per plate ({source})."))
    flagged = fields[fields["flagged"]].head(n_examples)
    images, titles = [], []
    for row in flagged.itertuples():
        image, _, note = plates.read(row.plate, row.well, int(row.field))
        if image is None:
            s.notes.append(f"example {row.plate} {row.well} field {row.field}: {note}")
            continue
        images.append(image)
        titles.append(f"{row.plate} {row.well} f{row.field}")
    if images:
        s.figures.append(writer.figure("qc_examples", F.thumbnails(images, titles),
                                       f"Examples of flagged fields (first {len(images)})."))
    return s


# --------------------------------------------------------------------------- helpers


def _classes(ds) -> list[str]:
    return [str(c) for c in ds["class"].values] if "class" in ds.coords else []


def _class_score(scores: np.ndarray, classes: list[str]) -> tuple[np.ndarray, str]:
    """(..., class) probabilities -> (...) score shown: P(positive) for two classes (the
    second, as the label config orders them), else the largest class probability."""
    scores = np.asarray(scores, dtype=float)
    if scores.shape[-1] == 2:
        return scores[..., 1], f"P({classes[1] if len(classes) == 2 else 'class 1'})"
    with np.errstate(all="ignore"):
        best = np.where(np.isnan(scores).all(axis=-1), np.nan, np.nanmax(np.nan_to_num(scores, nan=-np.inf), axis=-1))
    return best, "max class probability"


def _well_keys(ds) -> pd.DataFrame:
    """plate, well ("A01"), row ("A"), column (int) per ``well`` entry of a store."""
    ids = [str(w) for w in ds["well"].values]
    plate = _coord(ds, "plate", [i.split("/", 1)[0] if "/" in i else "" for i in ids])
    well = _coord(ds, "Metadata_Well", [i.split("/", 1)[-1] for i in ids])
    row = _coord(ds, "row", ["".join(ch for ch in w if ch.isalpha()) for w in well])
    column = [int(c) for c in _coord(ds, "column", ["".join(ch for ch in w if ch.isdigit()) for w in well])]
    return pd.DataFrame({"plate": plate, "well": well, "row": row, "column": column})


def _coord(ds, name: str, default: list) -> list:
    if name in ds.coords and ds[name].dims == ("well",):
        return [str(v) if not isinstance(v, (int, np.integer)) else int(v) for v in ds[name].values]
    return default


def _fields_from_status(ds) -> pd.DataFrame:
    keys = _well_keys(ds)
    status = np.asarray(ds["field_status"].values)
    w, f = np.nonzero(status != 1)  # 1: no such field in this well
    return pd.DataFrame({"plate": keys["plate"].to_numpy()[w], "well": keys["well"].to_numpy()[w], "field": f,
                         "flagged": status[w, f] == 3})


class _PlateCache:
    """Raw fields for figures, read from the config's plates (opened on first use)."""

    def __init__(self, config: Config):
        self.config = config
        self._plates: dict[str, Any] | None = None
        self._error: str | None = None

    def _open(self) -> dict[str, Any]:
        if self._plates is None:
            from ..store import open_plate

            self._plates = {}
            try:
                for uri in expand_uris(self.config.plates, self.config.storage_options):
                    plate = open_plate(uri, self.config.storage_options)
                    self._plates[plate.name] = plate
            except (RayscreenError, OSError) as e:
                self._error = f"cannot open the config's plates: {e}"
        return self._plates

    def read(self, plate: str, well: str, field: int) -> tuple[np.ndarray | None, list[str] | None, str]:
        """(C, Y, X) field (or None), channel names, and why not when None."""
        plates = self._open()
        p = plates.get(plate)
        if p is None:
            return None, None, self._error or f"plate {plate!r} is not among the config's plates"
        try:
            names = p.fields(well)
            return p.read(well, names[field]), list(p.channels), ""
        except (RayscreenError, IndexError, KeyError) as e:
            return None, None, f"cannot read plate {plate!r} well {well} field {field}: {e}"
