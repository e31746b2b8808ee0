"""The WSCNN localisation metric on hand-made masks with hand-counted answers."""

import math

import numpy as np
import pandas as pd
import pytest

from rayscreen.models.localisation import assign_image_index, box_coverage, localisation_scores
from rayscreen.store.errors import RayscreenError
from rayscreen.synth.wscnn import render_wscnn_image


def _case():
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, :10, :10] = True  # image 0 (positive): top-left quarter
    masks[1] = True            # image 1 (negative: no rare object): everything
    # image 2 (positive): empty mask
    objects = [
        dict(image=0, y0=0, x0=0, y1=5, x1=5, rare=True),       # covered 100%        -> TP
        dict(image=0, y0=5, x0=5, y1=10, x1=10, rare=True),     # covered 100%        -> TP
        dict(image=0, y0=0, x0=1, y1=1, x1=11, rare=True),      # 9/10 = exactly 90%  -> TP
        dict(image=0, y0=8, x0=8, y1=12, x1=12, rare=True),     # 4/16 = 25%          -> FN
        dict(image=0, y0=2, x0=2, y1=6, x1=6, rare=False),      # covered             -> FP
        dict(image=0, y0=0, x0=0, y1=3, x1=3, rare=False),      # covered             -> FP
        dict(image=0, y0=0, x0=0, y1=10, x1=11, rare=False),    # 100/110 = 90.9%     -> FP
        dict(image=0, y0=15, x0=15, y1=19, x1=19, rare=False),  # outside             -> TN
        dict(image=1, y0=1, x0=1, y1=4, x1=4, rare=False),      # negative image: ignored by default
        dict(image=2, y0=3, x0=3, y1=6, x1=6, rare=True),       # empty mask          -> FN
        dict(image=2, y0=10, x0=10, y1=12, x1=12, rare=False),  #                     -> TN
        dict(image=2, y0=0, x0=0, y1=2, x1=2, rare=False),      #                     -> TN
    ]
    return masks, objects


def test_hand_counted_scores():
    masks, objects = _case()
    got = localisation_scores(masks, objects)
    assert (got["tp"], got["fn"], got["fp"], got["tn"]) == (3, 2, 3, 3)
    assert got["accuracy"] == pytest.approx(6 / 11)
    assert got["precision"] == pytest.approx(3 / 6)
    assert got["recall"] == pytest.approx(3 / 5)
    # the same from a DataFrame
    assert localisation_scores(masks, pd.DataFrame(objects)) == got


def test_negative_images_and_coverage_threshold():
    masks, objects = _case()
    allimg = localisation_scores(masks, objects, positive_only=False)
    assert (allimg["tp"], allimg["fn"], allimg["fp"], allimg["tn"]) == (3, 2, 4, 3)
    assert allimg["precision"] == pytest.approx(3 / 7)
    strict = localisation_scores(masks, objects, coverage=0.95)
    # the exactly-90% circle becomes a miss, the 90.9% ellipse a true negative
    assert (strict["tp"], strict["fn"], strict["fp"], strict["tn"]) == (2, 3, 2, 4)


def test_box_coverage_by_hand():
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    boxes = np.array([[0, 0, 4, 4], [1, 1, 3, 3], [0, 0, 2, 2], [3, 3, 4, 4]])
    np.testing.assert_allclose(box_coverage(masks, np.zeros(4, int), boxes), [4 / 16, 1, 1 / 4, 0])


def test_undefined_ratios_are_nan():
    masks = np.zeros((1, 10, 10), dtype=bool)
    got = localisation_scores(masks, [dict(image=0, y0=0, x0=0, y1=2, x1=2, rare=True)])
    assert got["fn"] == 1 and got["recall"] == 0 and math.isnan(got["precision"])
    empty = localisation_scores(masks, pd.DataFrame(columns=["image", "y0", "x0", "y1", "x1", "rare"]))
    assert empty["tp"] == 0 and math.isnan(empty["accuracy"])


def test_errors_name_the_problem():
    masks = np.zeros((2, 10, 10), dtype=bool)
    with pytest.raises(RayscreenError, match=r"missing columns \['image'\]"):
        localisation_scores(masks, [dict(y0=0, x0=0, y1=2, x1=2, rare=True)])
    with pytest.raises(RayscreenError, match="row 0 has image 5, but there are 2 masks"):
        localisation_scores(masks, [dict(image=5, y0=0, x0=0, y1=2, x1=2, rare=True)])
    with pytest.raises(RayscreenError, match=r"row 1 \(image 1\) has box \[0, 0, 12, 2\]"):
        localisation_scores(masks, [dict(image=0, y0=0, x0=0, y1=2, x1=2, rare=True),
                                    dict(image=1, y0=0, x0=0, y1=12, x1=2, rare=True)])
    with pytest.raises(RayscreenError, match=r"\(N, H, W\)"):
        localisation_scores(np.zeros((10, 10), bool), [])


def test_on_simulated_images_with_perfect_and_full_masks():
    """Ground-truth masks of the circles score perfectly; an all-covering mask finds every
    circle but calls every ellipse of a positive image a false positive."""
    frames, masks = [], []
    for i, positive in enumerate([True, False, True]):
        rng = np.random.default_rng(i)
        _, objects, labels = render_wscnn_image(rng, positive, 0.1, return_labels=True)
        circle_ids = objects.loc[objects["rare"], "object"].to_numpy() + 1
        masks.append(np.isin(labels, circle_ids))
        frames.append(objects.assign(image=i))
    objects = pd.concat(frames, ignore_index=True)
    masks = np.stack(masks)
    n_circles = int(objects["rare"].sum())
    assert n_circles >= 2
    # drawn pixels cover most but not all of a tight box, so score boxes against filled boxes
    boxes = np.zeros_like(masks)
    for r in objects[objects["rare"]].itertuples():
        boxes[r.image, r.y0:r.y1, r.x0:r.x1] = True
    perfect = localisation_scores(boxes, objects)
    assert (perfect["tp"], perfect["fn"], perfect["fp"]) == (n_circles, 0, 0)
    assert perfect["precision"] == perfect["recall"] == perfect["accuracy"] == 1.0
    # a disc inside its box covers ~pi/4 of it: below 90%, so pixel-exact masks are misses
    assert localisation_scores(masks, objects)["tp"] == 0
    full = localisation_scores(np.ones_like(masks), objects)
    n_ellipses_pos = int((~objects["rare"] & objects["image"].isin([0, 2])).sum())
    assert (full["tp"], full["fp"], full["tn"]) == (n_circles, n_ellipses_pos, 0)


def test_assign_image_index():
    objects = pd.DataFrame(dict(plate=["p", "p", "p", "q"], well=["A01", "A01", "A02", "A01"], field=["0", "1", "0", "0"],
                                y0=0, x0=0, y1=1, x1=1, rare=[True, False, True, False]))
    out = assign_image_index(objects, [("p", "A02", "0"), ("p", "A01", "0"), ("p", "A01", "1")])
    assert sorted(zip(out["well"], out["field"], out["image"])) == [("A01", "0", 1), ("A01", "1", 2), ("A02", "0", 0)]
    with pytest.raises(RayscreenError, match="lack columns"):
        assign_image_index(objects.drop(columns="field"), [])
