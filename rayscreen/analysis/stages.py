"""The analysis stages: ``rayscreen aggregate CONFIG`` and ``rayscreen evaluate CONFIG``.

Thin glue around the pure verbs of this package, reading the profile store with xarray +
dask and writing tables under ``<output>/tables`` and ``<output>/evaluation``.

``run_aggregate``: for every feature set of the store (``deep``: ``field_profile``;
``classical``: ``field_classical``):

1. QC (when ``analysis.qc.annotations`` names a CSV of annotated fields): an artefact
   classifier (kNN, k=5, or a linear probe) on field embeddings, cross-validated on the
   annotated fields, then applied to every field; flagged fields get ``field_status`` 3
   in the store and are listed in ``tables/qc.csv``; ``qc.exclude`` leaves them out.
2. field -> well: NaN-skipping mean or median over each well's usable fields, lazily
   (dask, one well per chunk): only the (wells x features) result is loaded.
3. per-plate normalisation against the control wells (robust MAD or standardise), then
   optional whitening fitted on the controls; feature selection (all-NaN features are
   always dropped, with a warning listing them; then ``analysis.feature_select``).
4. well -> treatment (``analysis.treatment`` columns, plus ``analysis.batch`` when
   ``by_batch``, so NSCB can leave a query's batch out).

Tables (``Metadata_*`` first, parquet + CSV): ``well.*`` / ``treatment.*`` for
``analysis.features``, ``well_<set>.*`` / ``treatment_<set>.*`` for the other set;
``distance.*``: each well's distance to its plate's controls (:func:`hit_distances`).

``run_evaluate``: NSC, NSCB, mAP (+ per MOA, confusion) of each treatment table,
deep and classical side by side; hits and Z' from the profile distance of wells to
their plate's controls (aggregate's ``distance`` table).
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd

from ..config import Config
from ..store.annotations import parse_input_table, read_input_text
from ..store.errors import RayscreenError, preview
from ..store.uri import filesystem, join, remove
from ..store.wells import well_name
from ._table import control_mask, feature_columns, metadata_columns, order_columns
from .aggregate import aggregate
from .evaluate import evaluate_moa
from .feature_select import feature_select
from .hits import call_hits, distance_to_controls, z_prime
from .normalize import normalize

log = logging.getLogger(__name__)

FEATURE_SETS = {"deep": ("field_profile", "feature"), "classical": ("field_classical", "classical_feature")}
QC_EMBEDDINGS = {"deep": ("field_profile", "feature"), "classical": ("field_classical", "classical_feature"),
                 "qc": ("field_qc", "qc_metric")}
NORMALIZE = {"standardize": "standardize", "mad": "robust_mad"}
STATUS_OK, STATUS_QC = 0, 3


class AnalysisError(RayscreenError):
    """An analysis stage cannot run on this store or table; the message names what is missing."""


# --------------------------------------------------------------------------- helpers


SCORE_PREFIX = "score_"  # well score columns of tables/well_scores.*, one per class


def _store_uri(config: Config) -> str:
    return join(config.output, "profiles.zarr" if config.analysis.source == "profiles" else "results.zarr")


def _write_table(table: pd.DataFrame, uri: str, storage_options) -> str:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    table = order_columns(table)
    if uri.endswith(".parquet"):
        buf = io.BytesIO()
        table.to_parquet(buf, index=False)
        fs.pipe(path, buf.getvalue())
    else:
        fs.pipe(path, table.to_csv(index=False).encode())
    return uri


def _read_table(uri: str, storage_options) -> pd.DataFrame:
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise AnalysisError(f"no table at {uri}; run `rayscreen aggregate` first")
    return pd.read_parquet(io.BytesIO(fs.cat(path)))


def _write_json(obj: Any, uri: str, storage_options) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe(path, json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def controls_of(table: pd.DataFrame, config: Config) -> np.ndarray:
    """Negative-control rows by ``analysis.control_column`` / ``control_value`` (n_rows,) bool.
    ``"negative"``/``"positive"`` accept the usual encodings (True, "neg", ...); any other
    value is compared as is (e.g. ``control_value: DMSO`` on ``Metadata_Compound``)."""
    a = config.analysis
    if a.control_column not in table.columns:
        raise AnalysisError(f"no control column {a.control_column!r} (analysis.control_column); "
                            f"columns are {[c for c in table.columns if str(c).startswith('Metadata_')]}")
    value = a.control_value
    if isinstance(value, str) and value.lower() in ("negative", "positive"):
        return control_mask(table, column=a.control_column, kind=value.lower())
    if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1):
        # True / 1: however the column holds it (bool, 1.0, or "True" text once a blank made it text)
        return control_mask(table, column=a.control_column, kind="negative")
    column = table[a.control_column]
    # compared as read and as text: the store keeps a column with blanks as text ("5" for 5)
    return ((column == value) | (column.astype(str).str.strip() == str(value))).to_numpy()


def controls_per_plate(table: pd.DataFrame, controls: np.ndarray) -> pd.Series:
    """Number of control rows per plate (``Metadata_Plate``), every plate listed (0 too)."""
    plates = table["Metadata_Plate"].astype(str) if "Metadata_Plate" in table.columns \
        else pd.Series("", index=table.index)
    return pd.Series(np.asarray(controls, bool), index=table.index).groupby(plates.to_numpy()).sum().astype(int)


def require_controls(table: pd.DataFrame, controls: np.ndarray, config: Config, what: str) -> None:
    """Raise naming every plate of ``table`` without a control row: ``what`` is fitted on a
    plate's controls, and one plate without them would otherwise stop the stage at that plate
    with a bare error (or, for hits, leave its wells unscored)."""
    a = config.analysis
    counts = controls_per_plate(table, controls)
    without = sorted(counts.index[counts == 0])
    if without:
        raise AnalysisError(
            f"{what} is fitted on each plate's control wells, and plate(s) {preview(without)} have none "
            f"(analysis.control_column {a.control_column!r} = analysis.control_value {a.control_value!r}; "
            f"{int((counts > 0).sum())} of {len(counts)} plates have them). Mark the controls of these plates "
            f"in the plate map, or change analysis.control_column / control_value")


def _well_metadata(ds) -> pd.DataFrame:
    """``Metadata_*`` coordinates along ``well`` as a table (one row per well, store order)."""
    meta = {name: ds[name].to_numpy() for name in ds.coords
            if str(name).startswith("Metadata_") and ds[name].dims == ("well",)}
    if "Metadata_Plate" not in meta:
        meta["Metadata_Plate"] = ds["plate"].to_numpy()
    out = pd.DataFrame(meta)
    for c in out.columns:  # zarr returns object arrays of str; bools and numbers stay typed
        if out[c].dtype == object:
            out[c] = out[c].astype(str)
    return out


def field_table(ds, variable: str, dim: str, *, statuses=(STATUS_OK, STATUS_QC)) -> pd.DataFrame:
    """Fields of the store with ``field_status`` in ``statuses`` as a table: ``Metadata_*``
    of the well, ``Metadata_Field`` (index along ``field``) and the features of ``variable``
    (well, field, ``dim``). Loads them: for QC (a classifier over all fields)."""
    status = ds["field_status"].to_numpy()
    wi, fi = np.nonzero(np.isin(status, statuses))
    values = ds[variable].to_numpy()[wi, fi]
    meta = _well_metadata(ds).iloc[wi].reset_index(drop=True)
    meta["Metadata_Field"] = fi
    feats = pd.DataFrame(values, columns=[str(f) for f in ds[dim].to_numpy()])
    return pd.concat([meta, feats], axis=1)


def well_profiles(ds, variable: str, dim: str, method: str = "mean", exclude_qc: bool = True) -> pd.DataFrame:
    """field -> well, out of core: the NaN-skipping ``method`` over each well's fields with
    status 0 (and 3 unless ``exclude_qc``). Returns ``Metadata_*``, ``Metadata_Fields`` (fields
    used) and one column per feature; wells without a usable field are dropped."""
    usable = ds["field_status"] == STATUS_OK
    if not exclude_qc:
        usable = usable | (ds["field_status"] == STATUS_QC)
    fields = ds[variable].where(usable)
    # a feature that overflowed in a field (inf) is missing there, as profile's own field means
    # take it: one inf would make the well's mean inf, and after normalising every well of the
    # plate +-inf in that feature
    fields = fields.where(np.isfinite(fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices of wells without fields
        well = (fields.mean("field") if method == "mean" else fields.median("field")).compute()
    n_used = usable.sum("field").compute().to_numpy()
    meta = _well_metadata(ds)
    meta["Metadata_Fields"] = n_used.astype(int)
    table = pd.concat([meta, pd.DataFrame(well.transpose("well", dim).to_numpy().astype(np.float64),
                                          columns=[str(f) for f in ds[dim].to_numpy()])], axis=1)
    empty = n_used == 0
    if empty.any():
        keys = [str(k) for k in ds["well"].to_numpy()[empty]]
        log.warning("aggregate: %d well(s) without a usable field left out: %s", int(empty.sum()), keys[:20])
    return table.loc[~empty].reset_index(drop=True)


def score_table(ds) -> pd.DataFrame:
    """Infer's well scores (``well_scores``, well x class) as a table: ``Metadata_*`` of the
    well, then ``score_<class>`` per class. Wells without finite scores (not scored yet, or
    no usable field) are left out. Small: a screen's wells x classes, read whole."""
    scores = ds["well_scores"].transpose("well", "class").to_numpy().astype(np.float64)
    columns = [f"{SCORE_PREFIX}{c}" for c in ds["class"].to_numpy()]
    table = pd.concat([_well_metadata(ds), pd.DataFrame(scores, columns=columns)], axis=1)
    return table.loc[np.isfinite(scores).all(axis=1)].reset_index(drop=True)


# probabilities are z-scored as logits, clipped here: a confident model puts its controls at
# p ~ 0.001 +- 0.0003, where a well at 0.003 (99.7% the controls' class) is 5 MADs away
SCORE_CLIP = 1e-6


def score_hits(scores: pd.DataFrame, config: Config) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Hits of the well scores: per plate, each class score's robust z-score (median, 1.4826
    MAD) of its logit against the plate's negative controls; a hit at ``z >=
    analysis.hits_threshold`` (one-sided: the model sees more of that class than in the
    controls). The controls' own class (the one the negative controls score highest on,
    median >= 0.5: "normal", "DMSO") is not called: with two classes its score is the
    complement of the other's. Positive controls are never hits. Returns (hits: ``Metadata_*``,
    ``class``, ``score`` (the probability), ``z``, by z descending; Z' per plate and class
    of the score when positive controls exist, else None)."""
    a = config.analysis
    columns = [c for c in scores.columns if c.startswith(SCORE_PREFIX)]
    reference = controls_of(scores, config)
    require_controls(scores, reference, config, "hit calling on the well scores")
    positive = control_mask(scores, column=a.control_column, kind="positive", required=False)
    medians = scores.loc[reference, columns].median()
    own = medians.idxmax() if len(columns) and medians.max() >= 0.5 else None
    logits = scores.copy()
    for column in columns:
        p = scores[column].to_numpy(dtype=float).clip(SCORE_CLIP, 1 - SCORE_CLIP)
        logits[column] = np.log(p) - np.log1p(-p)
    hits, z_primes = [], []
    for column in columns:
        name = column[len(SCORE_PREFIX):]
        if column == own:
            continue
        if positive.any():
            z_primes.append(z_prime(scores, column, positive=positive, negative=reference).assign(**{"class": name}))
        found = call_hits(logits, column, threshold=a.hits_threshold, direction="up", controls=reference,
                          robust=True).drop(index=scores.index[positive], errors="ignore")
        found[column] = scores.loc[found.index, column]  # reported as the probability
        hits.append(found.rename(columns={column: "score", f"{column}_z": "z"}).assign(**{"class": name}))
    table = pd.concat(hits, ignore_index=True) if hits else pd.DataFrame(columns=["class", "score", "z"])
    table = table[metadata_columns(table) + ["class", "score", "z"]]
    table = table.iloc[np.argsort(-table["z"].to_numpy(dtype=float), kind="stable")].reset_index(drop=True)
    return table, (pd.concat(z_primes, ignore_index=True) if z_primes else None)


def wells_left_out(ds, kept: pd.DataFrame) -> pd.DataFrame:
    """The wells of store ``ds`` that :func:`well_profiles` left out of ``kept`` (no usable
    field), with why: their fields counted by ``field_status`` (``Metadata_*`` columns, then
    ``fields_qc_flagged``, ``fields_read_error``, ``fields_missing``, ``fields_not_finite``).
    A well whose every field QC flagged would otherwise leave the tables, and its treatment the
    evaluation, unseen. Reads ``field_status`` of those wells only (one chunk per well)."""
    meta = _well_metadata(ds)
    key = ["Metadata_Plate", "Metadata_Well"]
    present = pd.MultiIndex.from_frame(meta[key].astype(str)).isin(pd.MultiIndex.from_frame(kept[key].astype(str)))
    gone = np.flatnonzero(~present)
    table = meta.iloc[gone].reset_index(drop=True)
    status = ds["field_status"].isel(well=gone).compute().to_numpy().reshape(len(gone), ds.sizes["field"])
    for name, code in (("fields_qc_flagged", STATUS_QC), ("fields_read_error", 2), ("fields_missing", 1),
                       ("fields_not_finite", 4)):
        table[name] = (status == code).sum(axis=1)
    return table


def process_wells(table: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Normalise per plate against controls, select features, whiten (pure, on a well table).

    The order of the cytomining pipelines (pycytominer, the JUMP profiling recipe):
    sphering comes after feature selection, so the control covariance it inverts is of the
    selected, fewer and less redundant, features; a correlation filter after sphering would
    see features already decorrelated on the controls."""
    a = config.analysis
    controls = controls_of(table, config)
    if a.normalize != "none" or a.whiten:
        require_controls(table, controls, config, f"analysis.normalize ({a.normalize})" if a.normalize != "none"
                         else "analysis.whiten")
    if a.normalize != "none":
        table = normalize(table, NORMALIZE[a.normalize], controls=controls)
    ops = ["drop_na"] + [op for op in a.feature_select if op != "drop_na"]
    table = feature_select(table, ops, min_variance=a.min_variance, corr_threshold=a.corr_threshold)
    # A feature still missing in some wells (no object found in any field of a well) is
    # the control level there after normalisation: 0.
    cols = feature_columns(table)
    table[cols] = table[cols].fillna(0.0) if a.normalize != "none" else table[cols]
    if a.whiten:
        # whitening needs finite inputs: without normalisation a missing value has no
        # control level to stand for it, so such features are left out
        finite = np.isfinite(table[cols].to_numpy()).all(axis=0)
        table = table.drop(columns=[c for c, ok in zip(cols, finite) if not ok])
        table = normalize(table, "whiten", controls=controls, shrinkage=a.whiten_shrinkage)
    return table


def hit_distances(raw: pd.DataFrame, processed: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Each well's distance to its plate's controls and its z-score against the controls'
    own (:func:`~rayscreen.analysis.hits.distance_to_controls`), the input of hit calling and
    Z'. From ``raw`` well profiles (before normalising) in the features ``processed`` kept,
    normalised per plate as ``analysis.normalize`` says, each control by a normaliser fitted
    without it: a normaliser fitted on all controls (``processed``) makes them look closer than
    any new well, and wells like the controls were called hits (29-38% of them at 8 controls
    per plate, 100 features). Not whitened, for the same reason at a larger scale (1188 of 1200
    at 16 controls)."""
    a = config.analysis
    reference = controls_of(raw, config)
    require_controls(raw, reference, config, "hit calling (the profile distance to controls)")
    few = controls_per_plate(raw, reference)
    few = few[few < 3]
    if len(few):
        # two controls' leave-one-out distances are equal (each to the other), so their spread is 0
        log.warning("hits: plate(s) with fewer than 3 control wells, whose wells get no z-score and cannot be "
                    "hits: %s", preview(f"{plate} ({n} control)" for plate, n in few.items()))
    feats = [c for c in feature_columns(processed) if c in raw.columns]
    # euclidean, not cosine: after control-based normalisation the control centroid is ~0,
    # so the cosine to it is noise; the euclidean distance is the phenotype's strength
    return distance_to_controls(raw, controls=reference, features=feats, robust=True, metric="euclidean",
                                normalize=NORMALIZE.get(a.normalize))


def treatment_profiles(wells: pd.DataFrame, config: Config) -> pd.DataFrame:
    """well -> treatment (+ batch when ``analysis.by_batch`` and the column exists)."""
    a = config.analysis
    by = list(a.treatment) + ([a.batch] if a.by_batch and a.batch in wells.columns and a.batch not in a.treatment
                              else [])
    missing = [c for c in by if c not in wells.columns]
    if missing:
        raise AnalysisError(f"treatment columns {missing} (analysis.treatment / analysis.batch) are not annotations "
                            f"of the wells; they have {[c for c in wells.columns if c.startswith('Metadata_')]}")
    # Metadata_Fields counts a well's fields, it does not describe the treatment: dropped
    # rather than kept where a treatment's wells agree (feature_columns leaves it out)
    return aggregate(wells.drop(columns=["Metadata_Fields"]), by=by, method=a.aggregate,
                     features=feature_columns(wells), count_column="Metadata_Wells")


# --------------------------------------------------------------------------- QC


QC_KEY = ["Metadata_Plate", "Metadata_Well", "Metadata_Field"]


def read_qc_annotations(config: Config) -> pd.DataFrame:
    """The CSV of ``analysis.qc.annotations``: plate, well, field, ``analysis.qc.label``
    (``plate``/``well``/``field`` or their ``Metadata_*`` names) -> a table with the
    ``Metadata_*`` names, plate and well as str and field as int, the store's types.

    Plate and well are read as text, not left to pandas: plate names are often numbers
    (1001, or 0001 whose zeros a number would lose), and an int64 plate column cannot be
    merged with the store's str plates. The label column is left as read (bool, 0/1,
    words): :func:`~rayscreen.analysis.qc.artefact_labels` reads it.
    """
    q = config.analysis.qc
    fs, path = filesystem(q.annotations, config.storage_options)
    if not fs.exists(path):
        raise AnalysisError(f"analysis.qc.annotations: no file at {q.annotations}")
    text = {c: str for c in ("Metadata_Plate", "plate", "Metadata_Well", "well")}
    source = f"analysis.qc.annotations {q.annotations}"
    ann = parse_input_table(read_input_text(fs, path, source), source, dtype=text)  # .csv.gz as well
    ann = ann.rename(columns={"field": "Metadata_Field", "plate": "Metadata_Plate", "well": "Metadata_Well"})
    need = QC_KEY + [q.label]
    missing = [c for c in need if c not in ann.columns]
    if missing:
        raise AnalysisError(f"analysis.qc.annotations {q.annotations}: missing column(s) {missing}; "
                            f"expected Metadata_Plate, Metadata_Well, field, {q.label} (analysis.qc.label)")
    blank = ann[QC_KEY[:2]].isna().any(axis=1).to_numpy()
    field = pd.to_numeric(ann["Metadata_Field"], errors="coerce")
    bad = field.isna().to_numpy() | (field != field.round()).to_numpy() | blank
    if bad.any():
        rows = (np.flatnonzero(bad) + 1).tolist()
        raise AnalysisError(f"analysis.qc.annotations {q.annotations}: data row(s) {rows[:10]} (1 = the first "
                            f"after the header) lack a plate or well "
                            f"or have a field that is not a whole number (the field's index in its well, from 0)")
    ann["Metadata_Field"] = field.astype(int)
    for c in QC_KEY[:2]:
        ann[c] = ann[c].str.strip()
    # as the platemap: 'A1', 'a01' and 'A/1' name the store's well A01 (else silently no match)
    ann["Metadata_Well"] = [well_name(w, context=f"analysis.qc.annotations {q.annotations} data row {i + 1}")
                            for i, w in enumerate(ann["Metadata_Well"])]
    return ann[need]


# fields whose embeddings give the QC embedding's fill values (each metric's median, for a
# field where it is undefined): all of a screen's up to this many, else the fields of whole
# blocks of wells spread over the screen (_fill_sample), so that QC never holds a screen's
# embeddings (with qc.features: deep, fields x 512-2048 floats) in memory
QC_FILL_FIELDS = 20_000


def _fill_sample(wi: np.ndarray, n_wells: int, wells_per_chunk: int) -> np.ndarray:
    """Indices into the usable fields (their wells ``wi``) whose medians fill the QC
    embedding: all of them up to :data:`QC_FILL_FIELDS`; beyond, the fields of whole blocks of
    ``wells_per_chunk`` wells (what a read loads at once), blocks spread evenly over the
    screen, until the sample holds that many (a sample of single fields spread evenly would
    read every block of the screen)."""
    if len(wi) <= QC_FILL_FIELDS:
        return np.arange(len(wi))
    block = wi // wells_per_chunk
    per_block = np.bincount(block, minlength=-(-n_wells // wells_per_chunk))
    chosen, total = [], 0
    for b in _spread(len(per_block)):
        chosen.append(b)
        total += per_block[b]
        if total >= QC_FILL_FIELDS:
            break
    return np.flatnonzero(np.isin(block, chosen))


def _spread(n: int) -> list[int]:
    """0..n-1 in an order that spreads over the range early: 0, n-1, the middle, the quarters..."""
    out, seen = [], set()
    k = 1
    while len(out) < n:
        for i in np.linspace(0, n - 1, k + 1).round().astype(int):
            if int(i) not in seen:
                seen.add(int(i))
                out.append(int(i))
        k *= 2
    return out


def _field_rows(ds, variable: str, dim: str, meta: pd.DataFrame, wi: np.ndarray, fi: np.ndarray) -> pd.DataFrame:
    """The fields (``wi``, ``fi``) (k,) as a table: ``Metadata_*`` of the well (``meta``: the
    store's well metadata), ``Metadata_Field`` and the features of ``variable`` (well, field,
    ``dim``). Reads only the chunks of those wells."""
    import xarray as xr

    picked = ds[variable].isel(well=xr.DataArray(wi, dims="k"), field=xr.DataArray(fi, dims="k"))
    table = meta.iloc[wi].reset_index(drop=True)
    table["Metadata_Field"] = fi
    feats = pd.DataFrame(picked.transpose("k", dim).to_numpy(), columns=[str(f) for f in ds[dim].to_numpy()])
    return pd.concat([table, feats], axis=1)


def run_qc(ds, config: Config, store_uri: str) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Train / evaluate the artefact classifier from ``analysis.qc.annotations`` and flag
    fields (status 3) in the store through its writer. None when no annotations.

    Out of core: the classifier is fitted on the annotated fields only, fills missing values
    with medians over (a sample of at most :data:`QC_FILL_FIELDS`) fields, and scores the
    screen ``READ_WELLS_PER_CHUNK`` wells at a time."""
    from ..store.results import READ_WELLS_PER_CHUNK, ResultsWriter
    from .qc import classify_artefacts, qc_transform

    q = config.analysis.qc
    if not q.annotations:
        return None
    ann = read_qc_annotations(config)
    variable, dim = QC_EMBEDDINGS[q.features]
    if variable not in ds:
        raise AnalysisError(f"analysis.qc.features: {q.features!r} needs {variable!r}, not in {store_uri}")
    meta = _well_metadata(ds)
    wi, fi = np.nonzero(np.isin(ds["field_status"].to_numpy(), (STATUS_OK, STATUS_QC)))
    keys = meta.iloc[wi][QC_KEY[:2]].reset_index(drop=True)
    keys["Metadata_Field"] = fi
    field_index = pd.MultiIndex.from_frame(keys[QC_KEY].astype(str))
    found = pd.MultiIndex.from_frame(ann[QC_KEY].astype(str)).isin(field_index)
    if not found.any():  # not one: a file of another screen, or plates named otherwise
        raise AnalysisError(
            f"analysis.qc.annotations {q.annotations}: none of its {len(ann)} fields is in {store_uri} "
            f"(e.g. {'/'.join(map(str, ann[QC_KEY].iloc[0]))}; the store has e.g. "
            f"{'/'.join(map(str, keys[QC_KEY].iloc[0]))}); expected Metadata_Plate names, wells and "
            "field indices (from 0) of this screen")
    feats = [str(f) for f in ds[dim].to_numpy()]

    def transform(table: pd.DataFrame) -> pd.DataFrame:
        if q.features == "qc":  # log focus, no 0/1 flags, inf -> NaN
            return qc_transform(table, feats)
        return table[feats].astype(float)

    sample = _fill_sample(wi, ds.sizes["well"], READ_WELLS_PER_CHUNK)
    # embeddings with NaN (a metric undefined on a flat field) -> the median field
    fill = transform(_field_rows(ds, variable, dim, meta, wi[sample], fi[sample])).median()

    def embedded(rows: np.ndarray) -> pd.DataFrame:
        table = _field_rows(ds, variable, dim, meta, wi[rows], fi[rows])
        values = transform(table).fillna(fill).fillna(0.0)
        return pd.concat([table[[c for c in table.columns if str(c).startswith("Metadata_")]], values], axis=1)

    annotated = np.flatnonzero(field_index.isin(pd.MultiIndex.from_frame(ann[QC_KEY].astype(str))))
    fitted = embedded(annotated)
    features = [c for c in fitted.columns if not str(c).startswith("Metadata_")]
    try:
        result = classify_artefacts(fitted, ann, method=q.method, k=q.k, label=q.label, features=features,
                                    source=f"analysis.qc.annotations {q.annotations}")
    except ValueError as err:  # labels that are neither class, a field annotated twice
        raise AnalysisError(str(err)) from err
    # every field scored by the model fitted on the annotated ones, a block of wells at a time;
    # an annotated field keeps what the person said it is (classify_artefacts' flags)
    score = np.full(len(wi), np.nan)
    if result.model is not None:
        for start in range(0, ds.sizes["well"], READ_WELLS_PER_CHUNK):
            rows = np.flatnonzero((wi >= start) & (wi < start + READ_WELLS_PER_CHUNK))
            if len(rows):
                score[rows] = result.model.predict_proba(embedded(rows)[features].to_numpy(dtype=float))[:, 1]
    predictions = keys.copy()
    predictions["Metadata_QC_Score"] = score
    abnormal = score >= 0.5
    abnormal[annotated] = result.predictions["Metadata_QC_Abnormal"].to_numpy()
    predictions["Metadata_QC_Abnormal"] = abnormal
    result.predictions = predictions
    # store: status 3 where flagged, back to 0 where a previous run flagged and this one does not
    writer = ResultsWriter(store_uri, config.storage_options)
    status = ds["field_status"].to_numpy()
    want = np.where(status == STATUS_QC, STATUS_OK, status).astype(np.int8)
    want[wi[abnormal], fi[abnormal]] = STATUS_QC
    changed = np.flatnonzero((want != status).any(axis=1))
    if len(changed):  # first: a crash part way must not leave the store saying it is complete
        writer.update_attrs(complete=False)
    # only the statuses change: one concurrent write of those wells' chunks (was every
    # variable of each well read and written again, one well after another)
    writer.write_variable("field_status", changed, want[changed])
    summary = result.to_dict()
    summary["features"] = q.features
    writer.update_attrs(qc=summary)
    writer.finalize()
    table = result.predictions.merge(ann.rename(columns={q.label: "Metadata_QC_Annotation"}), on=QC_KEY,
                                     how="left")
    return table, summary


# --------------------------------------------------------------------------- stages


def run_aggregate(config: Config, *, progress: bool = True) -> dict[str, str]:
    """field -> well -> treatment tables of every feature set; returns ``{name: uri}`` of
    the tables written under ``<output>/tables`` (parquet; a CSV beside each)."""
    from ..store.results import READ_WELLS_PER_CHUNK, open_results, results_attrs

    a = config.analysis
    so = config.storage_options
    uri = _store_uri(config)
    if a.features not in FEATURE_SETS:
        raise AnalysisError(f"analysis.features {a.features!r}: expected one of {sorted(FEATURE_SETS)}")
    if results_attrs(uri, so) is None:
        stage = "profile" if a.source == "profiles" else "infer"
        raise AnalysisError(f"{uri}: no {a.source} store there (analysis.source: {a.source}); run "
                            f"`rayscreen {stage}` with this config first")
    chunks = {"well": READ_WELLS_PER_CHUNK}
    ds = open_results(uri, so, chunks=chunks)
    if "field_status" not in ds:
        raise AnalysisError(f"{uri} has no field_status; not a profile store")
    sets = [s for s in FEATURE_SETS if FEATURE_SETS[s][0] in ds]
    if a.features not in sets:
        raise AnalysisError(f"analysis.features {a.features!r}: {uri} has no {FEATURE_SETS[a.features][0]} "
                            f"(feature sets present: {sets})")
    aggregate_annotations(_well_metadata(ds), config, uri)
    tables = join(config.output, "tables")
    out: dict[str, str] = {}
    qc = run_qc(ds, config, uri)
    if qc is not None:
        ds = open_results(uri, so, chunks=chunks)  # statuses changed
        qc_table, summary = qc
        out["qc"] = _write_table(qc_table, join(tables, "qc.csv"), so)
        _write_json(summary, join(tables, "qc.json"), so)
        f1 = summary["f1"]  # None: too few annotations to cross-validate
        log.info("aggregate: QC %s classifier on %d annotated fields: cross-validated F1 %s; %d field(s) flagged",
                 summary["method"], summary["n_annotated"], "n/a" if f1 is None else f"{f1:.3f}",
                 summary["n_flagged"])
    for name in [a.features] + [s for s in sets if s != a.features]:
        variable, dim = FEATURE_SETS[name]
        suffix = "" if name == a.features else f"_{name}"
        raw = well_profiles(ds, variable, dim, a.aggregate, exclude_qc=a.qc.exclude)
        wells = process_wells(raw, config)
        treatments = treatment_profiles(wells, config)
        if name == a.features:  # the wells left out, and the distances evaluate calls hits on
            left_out = wells_left_out(ds, raw)
            if len(left_out):  # why each well is missing from the tables (well_profiles logs the count)
                out["wells_left_out"] = _write_table(left_out, join(tables, "wells_left_out.csv"), so)
            try:
                distance = hit_distances(raw, wells, config)
            except AnalysisError as e:  # plates without controls: the tables stand, evaluate says it again
                log.warning("aggregate: no distances to controls for hit calling: %s", e)
            else:
                out["distance"] = _write_table(distance, join(tables, "distance.parquet"), so)
                _write_table(distance, join(tables, "distance.csv"), so)
        for kind, table in (("well", wells), ("treatment", treatments)):
            key = f"{kind}{suffix}"
            out[key] = _write_table(table, join(tables, f"{key}.parquet"), so)
            _write_table(table, join(tables, f"{key}.csv"), so)
        # feature_columns leaves the Metadata_Wells count out already: nothing to subtract
        log.info("aggregate: %s: %d wells, %d treatments, %d features", name, len(wells), len(treatments),
                 len(feature_columns(treatments)))
    # infer's well scores beside the profiles, for evaluate's hits on the scores
    scores_uri = join(config.output, "results.zarr")
    score_tables = [join(tables, "well_scores.parquet"), join(tables, "well_scores.csv")]
    results = None
    if results_attrs(scores_uri, so) is not None:
        results = ds if scores_uri == uri else open_results(scores_uri, so, chunks=chunks)
    if results is not None and "well_scores" in results:
        scores = score_table(results)
        out["well_scores"] = _write_table(scores, score_tables[0], so)
        _write_table(scores, score_tables[1], so)
        log.info("aggregate: well scores of %d wells (%s)", len(scores), scores_uri)
    else:
        for uri in score_tables:  # of a results store since deleted: evaluate must not call them
            remove(uri, so)
    return out


def _evaluation_table(path_key: str, config: Config) -> pd.DataFrame:
    return _read_table(join(config.output, "tables", f"{path_key}.parquet"), config.storage_options)


def aggregate_annotations(wells: pd.DataFrame, config: Config, where: str) -> None:
    """Before aggregate does any work: fail naming every annotation column it needs that the
    store's wells lack (the control column, the treatment columns), and warn of those only
    evaluate needs (compound, MOA: a screen without MOAs still gets tables and hits)."""
    a = config.analysis
    needed = {a.control_column: "analysis.control_column", **{c: "analysis.treatment" for c in a.treatment}}
    missing = [f"{c} ({key})" for c, key in needed.items() if c not in wells.columns]
    have = [c for c in wells.columns if str(c).startswith("Metadata_")]
    if missing:
        raise AnalysisError(f"aggregate: the wells of {where} lack annotation column(s) {', '.join(missing)}; "
                            f"they have {have}. The store took its annotations from the plates and the config's "
                            f"`platemap` when it was written: add the columns there and write it again "
                            f"(profile.overwrite / infer.overwrite), or point the keys at columns the wells have")
    later = [f"{c} ({key})" for c, key in ((a.compound, "analysis.compound"), (a.moa, "analysis.moa"))
             if c not in wells.columns]
    if later:
        log.warning("aggregate: the wells of %s lack %s, which `rayscreen evaluate` needs for MOA retrieval; "
                    "the tables and hits do not", where, ", ".join(later))


def check_annotations(table: pd.DataFrame, config: Config, what: str) -> None:
    """Fail naming every annotation column evaluation needs and ``table`` lacks."""
    a = config.analysis
    missing = [c for c in (a.compound, a.moa, a.control_column) if c not in table.columns]
    if missing:
        raise AnalysisError(f"evaluate: the {what} table lacks annotation column(s) {missing} "
                            f"(analysis.compound / analysis.moa / analysis.control_column); it has "
                            f"{[c for c in table.columns if str(c).startswith('Metadata_')]}")


def format_results(results: dict[str, dict[str, Any]]) -> str:
    """A small text table: one row per feature set, NSC / NSCB / mAP."""
    def f(v):
        return "  n/a" if v is None else f"{v:.3f}"

    lines = [f"{'profiles':<12} {'NSC':>6} {'NSCB':>6} {'mAP':>6} {'queries':>8}"]
    for name, r in results.items():
        lines.append(f"{name:<12} {f(r['nsc']):>6} {f(r['nscb']):>6} {f(r['map']):>6} {r['n_queries']:>8}")
    return "\n".join(lines)


def _confusion_figure(confusion: pd.DataFrame, uri: str, storage_options, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(confusion), 1.0 + 0.5 * len(confusion)))
    ax.imshow(confusion.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(confusion.columns)), [str(c) for c in confusion.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(confusion.index)), [str(c) for c in confusion.index], fontsize=7)
    for (i, j), n in np.ndenumerate(confusion.to_numpy()):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted MOA (NSC 1-NN)")
    ax.set_ylabel("true MOA")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fs, path = filesystem(uri, storage_options)
    fs.pipe(path, buf.getvalue())


def evaluation_dir(config: Config) -> str:
    """Where :func:`run_evaluate` writes (``<output>/evaluation``)."""
    return join(config.output, "evaluation")


def run_evaluate(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """MOA evaluation of the treatment tables (deep and classical side by side) and hits.

    Writes ``<output>/evaluation/evaluation.json`` (nsc, nscb, map, per_moa, ... of
    ``analysis.features``; ``baseline`` and ``feature_sets`` for all), ``confusion.csv``
    (+ ``confusion.png``, ``confusion_<set>.csv``), ``hits.csv`` and ``z_prime.csv``
    (when positive controls exist); prints the comparison unless ``progress`` is False.
    Returns the evaluation dict.
    """
    a = config.analysis
    so = config.storage_options
    out_dir = evaluation_dir(config)
    main = _evaluation_table("treatment", config)
    check_annotations(main, config, "treatment")
    sets = {a.features: main}
    for name in FEATURE_SETS:
        if name != a.features:
            fs, path = filesystem(join(config.output, "tables", f"treatment_{name}.parquet"), so)
            if fs.exists(path):
                sets[name] = _evaluation_table(f"treatment_{name}", config)
    results: dict[str, dict[str, Any]] = {}
    for name, table in sets.items():
        check_annotations(table, config, f"{name} treatment")
        batch = a.batch if a.batch in table.columns else None
        # feature_columns leaves Metadata_* (the Metadata_Wells count too) out
        feats = feature_columns(table)
        # both kinds of controls are left out: a positive control is a reference compound, not a
        # treatment of unknown mechanism (evaluate_moa's own default)
        negatives = controls_of(table, config)
        controls = negatives | control_mask(table, column=a.control_column, kind="positive", required=False)
        ev = evaluate_moa(table, moa=a.moa, compound=a.compound, batch=batch, controls=controls, features=feats)
        if not negatives.any():
            # the control compound (DMSO) is then a treatment with an MOA of its own that weak
            # compounds fall to; said, as the numbers are not the protocol's
            ev.warnings.insert(0, f"no control rows ({a.control_column} = {a.control_value!r}, "
                                  "analysis.control_column / control_value) in the treatment table: every "
                                  "compound, the control compound too, was evaluated as a treatment")
        results[name] = ev.to_dict()
        results[name]["n_features"] = len(feats)
        _write_table(ev.confusion.reset_index(), join(out_dir, f"confusion_{name}.csv"), so)
        if name == a.features:
            _write_table(ev.confusion.reset_index(), join(out_dir, "confusion.csv"), so)
            if len(ev.confusion):
                _confusion_figure(ev.confusion, join(out_dir, "confusion.png"), so, f"{name} profiles, NSC")
        for w in ev.warnings:
            log.warning("evaluate (%s): %s", name, w)

    # hits: wells far from their plate's controls in profile space (distances: aggregate's)
    try:
        distance = _evaluation_table("distance", config)
    except AnalysisError:
        wells = _evaluation_table("well", config)  # why not: plates without controls, or older tables
        require_controls(wells, controls_of(wells, config), config, "hit calling (the profile distance to controls)")
        raise AnalysisError(f"no table at {join(config.output, 'tables', 'distance.parquet')}: the tables were "
                            "written by an older rayscreen, which computed hit distances in evaluate; run "
                            "`rayscreen aggregate` again (or `rayscreen run CONFIG --stages aggregate,evaluate "
                            "--force`)") from None
    reference = controls_of(distance, config)
    positive = control_mask(distance, column=a.control_column, kind="positive", required=False)
    # positive controls never hits, whichever column marks them (call_hits knows Metadata_Control only)
    hits = call_hits(distance, "distance", threshold=a.hits_threshold, direction="up", controls=reference,
                     robust=True).drop(index=distance.index[positive], errors="ignore")
    _write_table(hits, join(out_dir, "hits.csv"), so)
    n_hits = int(len(hits))
    zp = None
    if positive.any():
        zp = z_prime(distance, "distance", positive=positive, negative=reference)
        _write_table(zp, join(out_dir, "z_prime.csv"), so)

    score = _evaluate_scores(config, out_dir)

    summary = dict(results[a.features])
    summary.update(features=a.features, feature_sets=results, n_hits=n_hits,
                   baseline=results.get("classical") if a.features != "classical" else results.get("deep"),
                   z_prime=None if zp is None else zp.to_dict("records"), **score)
    _write_json(summary, join(out_dir, "evaluation.json"), so)
    if progress:
        print(format_results(results))
        print(f"hits (z >= {a.hits_threshold:g}, one-sided, of profile distance to controls): {n_hits}")
        if "n_hits_score" in score:
            print(f"hits (z >= {a.hits_threshold:g}, one-sided, of infer's well scores against the controls): "
                  f"{score['n_hits_score']}")
    return summary


def _evaluate_scores(config: Config, out_dir: str) -> dict[str, Any]:
    """Hits (``hits_score.csv``) and Z' (``z_prime_score.csv``, with positive controls) of
    infer's well scores, when aggregate wrote them (``tables/well_scores.parquet``); the
    entries of evaluation.json they add (none without the table)."""
    so = config.storage_options
    written = [join(out_dir, "hits_score.csv"), join(out_dir, "z_prime_score.csv")]
    for uri in written:  # an earlier run's: never shown beside this run's results
        remove(uri, so)
    fs, path = filesystem(join(config.output, "tables", "well_scores.parquet"), so)
    if not fs.exists(path):
        return {}
    try:
        hits, zp = score_hits(_evaluation_table("well_scores", config), config)
    except AnalysisError as e:  # e.g. the plates' control wells not scored yet: the rest stands
        log.warning("evaluate: no hits of the well scores: %s", e)
        return {"score_hits_error": str(e)}
    _write_table(hits, written[0], so)
    if zp is not None:
        _write_table(zp, written[1], so)
    return {"n_hits_score": int(len(hits)), "z_prime_score": None if zp is None else zp.to_dict("records")}

