"""Batch inference: :class:`~rayscreen.infer.predictor.Predictor` (a plain callable on arrays)
and :func:`~rayscreen.infer.run.run_infer` (Ray Data actor pool -> ``<output>/results.zarr``)."""

from .predictor import Predictor, PredictorSettings, aggregate_well

__all__ = ["Predictor", "PredictorSettings", "aggregate_well", "run_infer"]


def run_infer(*args, **kwargs):
    """See :func:`rayscreen.infer.run.run_infer` (imported lazily: it pulls in Ray)."""
    from .run import run_infer as _run

    return _run(*args, **kwargs)
