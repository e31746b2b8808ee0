"""Analysis of profiles and scores, as pure functions on pandas / xarray / numpy (no Ray,
no zarr): one verb per module, in the pycytominer style.

- :mod:`.aggregate`: field → well → treatment profiles (mean, median; dask-backed xarray too)
- :mod:`.normalize`: Standardize / RobustMAD / Whiten fitted on control wells, per plate
- :mod:`.feature_select`: drop all-NaN, low-variance and correlated features
- :mod:`.evaluate`: MOA evaluation: NSC / NSCB 1-NN accuracy, confusion, mAP
- :mod:`.qc`: per-field image QC metrics; kNN / linear-probe artefact classifier
- :mod:`.hits`: per-plate z-scores, distance to controls, Z'-factor, hit tables
- :mod:`.profiles`: profile tables (``Metadata_*`` first) to and from CSV / Parquet
"""

from ._table import control_mask, feature_columns, metadata_columns
from .aggregate import aggregate
from .evaluate import (MOAEvaluation, average_precision, evaluate_moa, mean_average_precision, nsc_accuracy,
                       nscb_accuracy)
from .feature_select import all_nan_features, correlated_features, feature_select, low_variance_features
from .hits import call_hits, distance_to_controls, z_prime, zscore
from .normalize import Normalizer, RobustMAD, Standardize, Whiten, create_normalizer, normalize
from .profiles import read_table, to_table, write_table
from .qc import (ArtefactClassification, classify_artefacts, cross_validate_artefacts, field_qc, foreground,
                 intensity_percentiles, laplacian_variance, make_artefact_model, outlier_score,
                 power_spectrum_slope, qc_embedding, saturation_fraction, suggest_annotations)

__all__ = [
    "aggregate",
    "normalize", "Normalizer", "Standardize", "RobustMAD", "Whiten", "create_normalizer",
    "feature_select", "all_nan_features", "low_variance_features", "correlated_features",
    "evaluate_moa", "MOAEvaluation", "nsc_accuracy", "nscb_accuracy", "mean_average_precision", "average_precision",
    "field_qc", "laplacian_variance", "power_spectrum_slope", "saturation_fraction", "intensity_percentiles",
    "foreground", "classify_artefacts", "cross_validate_artefacts", "make_artefact_model", "ArtefactClassification",
    "qc_embedding", "outlier_score", "suggest_annotations",
    "zscore", "distance_to_controls", "z_prime", "call_hits",
    "to_table", "write_table", "read_table",
    "metadata_columns", "feature_columns", "control_mask",
]
