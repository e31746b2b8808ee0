"""The WSCNN paper's localisation metric (pure numpy).

From the paper (section 4.2, Table 3): a rare object (circle) is a true positive when
its bounding box intersects the segmentation mask by at least 90%, otherwise a false
negative; a common object (ellipse) in a positive image whose box is covered by 90% or
more is a false positive. We count the remaining common objects (covered less) as
true negatives, so

    accuracy  = (TP + TN) / (TP + TN + FP + FN)   (over objects)
    precision = TP / (TP + FP)
    recall    = TP / (TP + FN)

By default only positive images count (images with at least one rare object: in the
simulation, exactly the positive class), as in the paper; ``positive_only=False`` also
scores the common objects of negative images (their covered ones are false positives).
The paper does not define its TN; its 99.995% accuracy is likely a pixel-level figure,
ours is object-level and therefore lower for the same masks.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..store.errors import RayscreenError

REQUIRED = ("image", "y0", "x0", "y1", "x1", "rare")


def box_coverage(masks: np.ndarray, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each box covered by its image's mask.

    masks (N, H, W) bool; image (M,) int indices into masks; boxes (M, 4) int
    ``(y0, x0, y1, x1)`` half-open pixel boxes. Returns (M,) float in [0, 1].
    Uses per-image summed-area tables, so the cost is O(N*H*W + M).
    """
    masks = np.asarray(masks, dtype=bool)
    # int32 holds any count of a field under 2**31 pixels and halves the sums' time against
    # numpy's default int64 (the WSCNN benchmark scores hundreds of mask sets)
    dtype = np.int32 if masks.shape[1] * masks.shape[2] < 2**31 else np.int64
    sat = np.zeros((masks.shape[0], masks.shape[1] + 1, masks.shape[2] + 1), dtype=dtype)
    sat[:, 1:, 1:] = masks.cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    y0, x0, y1, x1 = (boxes[:, i] for i in range(4))
    inside = sat[image, y1, x1] - sat[image, y0, x1] - sat[image, y1, x0] + sat[image, y0, x0]
    return inside / ((y1 - y0) * (x1 - x0))


def _objects_frame(objects: pd.DataFrame | Sequence[dict[str, Any]]) -> pd.DataFrame:
    df = objects if isinstance(objects, pd.DataFrame) else pd.DataFrame(list(objects))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise RayscreenError(f"localisation objects: missing columns {missing} (found {list(df.columns)}); "
                             "'image' is the index into masks -- see assign_image_index")
    return df


def localisation_scores(masks: np.ndarray, objects: pd.DataFrame | Sequence[dict[str, Any]], coverage: float = 0.9,
                        positive_only: bool = True) -> dict[str, float]:
    """Score segmentation masks against object boxes (the WSCNN paper's Table 3).

    Parameters
    ----------
    masks : (N, H, W) bool, one mask per image.
    objects : DataFrame or list of dicts, one row per object, with ``image`` (index into
        ``masks``), ``y0, x0, y1, x1`` (half-open box, as :func:`load_wscnn_objects`
        writes it) and ``rare`` (bool). Other columns are ignored.
    coverage : fraction of the box the mask must cover (the paper: 0.9).
    positive_only : score only images holding a rare object (the paper's setting).

    Returns
    -------
    dict with ``tp, fp, fn, tn`` (ints) and ``accuracy, precision, recall`` (floats;
    NaN when undefined, e.g. precision with nothing covered).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise RayscreenError(f"localisation masks must be (N, H, W), got shape {masks.shape}")
    if not 0 < coverage <= 1:
        raise RayscreenError(f"localisation coverage={coverage}: expected a fraction in (0, 1]")
    df = _objects_frame(objects)
    if len(df) == 0:
        return dict(tp=0, fp=0, fn=0, tn=0, accuracy=float("nan"), precision=float("nan"), recall=float("nan"))
    image = df["image"].to_numpy().astype(np.int64)
    boxes = df[["y0", "x0", "y1", "x1"]].to_numpy().astype(np.int64)
    rare = df["rare"].to_numpy().astype(bool)
    n, h, w = masks.shape
    bad = (image < 0) | (image >= n)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RayscreenError(f"localisation: object row {i} has image {image[i]}, but there are {n} masks")
    bad = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > h) | (boxes[:, 3] > w) | \
          (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RayscreenError(f"localisation: object row {i} (image {image[i]}) has box {boxes[i].tolist()}, "
                             f"expected 0 <= y0 < y1 <= {h}, 0 <= x0 < x1 <= {w}")
    if positive_only:
        keep = np.isin(image, np.unique(image[rare]))
        image, boxes, rare = image[keep], boxes[keep], rare[keep]
    covered = box_coverage(masks.astype(bool), image, boxes) >= coverage
    tp = int(np.sum(rare & covered))
    fn = int(np.sum(rare & ~covered))
    fp = int(np.sum(~rare & covered))
    tn = int(np.sum(~rare & ~covered))
    total = tp + fp + fn + tn

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return dict(tp=tp, fp=fp, fn=fn, tn=tn, accuracy=ratio(tp + tn, total), precision=ratio(tp, tp + fp),
                recall=ratio(tp, tp + fn))


def assign_image_index(objects: pd.DataFrame, images: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """Add the ``image`` column to a ground-truth table keyed by ``plate, well, field``
    (:func:`rayscreen.synth.wscnn.load_wscnn_objects`): ``images[i]`` is the
    (plate, well, field) of mask ``i``. Objects of other images are dropped."""
    missing = [c for c in ("plate", "well", "field") if c not in objects.columns]
    if missing:
        raise RayscreenError(f"assign_image_index: objects lack columns {missing}")
    key = pd.DataFrame([(str(p), str(w), str(f)) for p, w, f in images], columns=["plate", "well", "field"])
    key["image"] = np.arange(len(key))
    obj = objects.astype({"plate": str, "well": str, "field": str})
    return obj.merge(key, on=["plate", "well", "field"], how="inner")
