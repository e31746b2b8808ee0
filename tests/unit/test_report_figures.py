"""The report's pure parts: array helpers checked by hand, figures rendered to PNG, the page."""

import io

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from rayscreen.report import figures as F
from rayscreen.report.html import FigureRef, Section, render_page
from rayscreen.report.run import _class_score


def _png_shape(data: bytes) -> tuple:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(data), format="png").shape


# --------------------------------------------------------------------------- plate maps


def test_row_labels_round_trip_to_1536_well_rows():
    assert [F.row_label(i) for i in (0, 7, 15, 25, 26, 31)] == ["A", "H", "P", "Z", "AA", "AF"]
    assert all(F.row_index(F.row_label(i)) == i for i in range(52))


@pytest.mark.parametrize("rows, cols, expected", [
    (["A", "B"], [1, 3], (2, 3)),
    (["H"], [12], (8, 12)),
    (["I"], [1], (16, 24)),
    (["A"], [13], (16, 24)),
    (["P"], [25], (32, 48)),
    (["AF"], [60], (32, 60)),  # beyond 1536 wells the grid widens to fit
])
def test_plate_layout_is_the_smallest_standard_plate(rows, cols, expected):
    row_labels, col_labels = F.plate_layout(rows, cols)
    assert (len(row_labels), len(col_labels)) == expected
    assert row_labels[0] == "A" and col_labels[0] == 1 and col_labels[-1] == expected[1]


def test_well_grid_places_values_and_leaves_gaps_nan():
    grid, rl, cl = F.well_grid(["A", "B", "H"], [1, 12, 3], [0.5, 0.25, 1.0])
    assert grid.shape == (8, 12) and rl[-1] == "H" and cl[-1] == 12
    assert grid[0, 0] == 0.5 and grid[1, 11] == 0.25 and grid[7, 2] == 1.0
    assert np.isnan(grid).sum() == 96 - 3


def test_plate_heatmap_renders():
    grid, rl, cl = F.well_grid(["A", "P"], [1, 24], [0.1, 0.9])
    h, w, _ = _png_shape(F.to_png(F.plate_heatmap(grid, rl, cl, title="P1")))
    assert w > h > 100  # a 384-well plate is wider than tall


# --------------------------------------------------------------------------- fields


def test_top_fields_skips_nan_and_unscored_status_and_keeps_tie_order():
    scores = np.array([[0.2, np.nan, 0.9],
                       [0.9, 0.95, 0.5],
                       [0.3, 0.99, 0.1]])
    status = np.zeros((3, 3), np.int8)
    status[2, 1] = 3  # QC-flagged: its score must not count even if present
    assert F.top_fields(scores, 3, status) == [(1, 1, 0.95), (0, 2, 0.9), (1, 0, 0.9)]
    assert F.top_fields(scores, 1) == [(2, 1, 0.99)]
    assert F.top_fields(scores, 0, status) == []
    assert len(F.top_fields(scores, 100, status)) == 7


def test_to_rgb_stretches_each_channel_and_blends_colours():
    dna = np.array([[0.0, 10.0], [20.0, 40.0]])
    actin = np.array([[100.0, 100.0], [100.0, 300.0]])
    rgb = F.to_rgb(np.stack([dna, actin]), percentiles=(0, 100))
    assert rgb.shape == (2, 2, 3)
    # DNA -> blue, stretched min..max: 0, .25, .5, 1; Actin -> green: 0, 0, 0, 1; no red
    np.testing.assert_allclose(rgb[..., 2], [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(rgb[..., 1], [[0, 0], [0, 1]])
    np.testing.assert_allclose(rgb[..., 0], 0)
    grey = F.to_rgb(dna[None], percentiles=(0, 100))
    np.testing.assert_allclose(grey[..., 0], grey[..., 2])
    flat = F.to_rgb(np.full((1, 3, 3), 7.0))  # a constant channel must not divide by zero
    assert np.isfinite(flat).all()


def test_upsample_nearest_by_hand():
    a = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(F.upsample_nearest(a, (4, 4)),
                                  [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    b = np.arange(6).reshape(2, 3)
    # rows: i*2//3 = 0,0,1 ; columns: j*3//5 = 0,0,1,1,2
    np.testing.assert_array_equal(F.upsample_nearest(b, (3, 5)),
                                  [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])


def test_saliency_figure_and_thumbnails_render():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (3, 32, 40)).astype(np.uint16)
    sal = rng.random((8, 10)).astype(np.float16)
    sal[0, 0] = np.nan
    fig = F.saliency_figure(image, sal, (sal > 0.5).astype(np.uint8), title="t", channels=["a", "b", "c"])
    assert len(fig.axes) == 2
    _png_shape(F.to_png(fig))
    assert len(F.saliency_figure(image, None).axes) == 1
    _png_shape(F.to_png(F.thumbnails([image, image[:1]], ["x", "y"])))


# --------------------------------------------------------------------------- training, profiles


def test_curve_columns_and_training_curves():
    m = pd.DataFrame({"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "val_accuracy": [0.5, 0.7],
                      "val_roc_auc": [0.6, 0.8], "seconds": [3.0, 3.0],
                      "val_samples": [120, 120]})  # the loop writes it: a count, not a score
    assert F.curve_columns(m) == (["train_loss", "val_loss"], ["val_accuracy", "val_roc_auc"])
    fig = F.training_curves(m)
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    _png_shape(F.to_png(fig))


def test_embed_2d_pca_preserves_planar_distances_and_marks_nan_rows():
    rng = np.random.default_rng(1)
    plane = rng.normal(size=(20, 2)) * [3.0, 1.0]
    rot = np.linalg.qr(rng.normal(size=(4, 4)))[0][:2]  # an orthonormal 2-D basis in 4-D
    X = plane @ rot + 5.0
    X = np.hstack([X, np.full((20, 1), np.nan)])  # an all-NaN feature is dropped
    X[3, 0] = np.nan  # this profile gets NaN coordinates
    coords = F.embed_2d(X)
    assert coords.shape == (20, 2)
    assert np.isnan(coords[3]).all() and np.isfinite(np.delete(coords, 3, 0)).all()
    keep = np.delete(np.arange(20), 3)

    def dists(a):
        return np.linalg.norm(a[:, None] - a[None], axis=-1)

    np.testing.assert_allclose(dists(coords[keep]), dists(plane[keep]), atol=1e-8)
    assert coords[keep, 0].var() > coords[keep, 1].var()  # PC1 is the wide axis
    np.testing.assert_array_equal(F.embed_2d(np.ones((1, 3))), [[0.0, 0.0]])
    one = F.embed_2d(np.array([[0.0], [2.0], [4.0]]))
    np.testing.assert_allclose(np.abs(one[:, 0]), [2, 0, 2])
    np.testing.assert_allclose(one[:, 1], 0)
    with pytest.raises(ValueError, match="pca"):
        F.embed_2d(X, "tsne")


def test_scatter_by_draws_one_collection_per_category():
    coords = np.array([[0, 0], [1, 1], [2, 2], [np.nan, np.nan]])
    fig = F.scatter_by(coords, ["a", "b", "a", None], title="x")
    assert len(fig.axes[0].collections) == 3  # a, b, (none)
    _png_shape(F.to_png(fig))


# --------------------------------------------------------------------------- evaluation, QC


def test_confusion_figure_annotates_counts():
    conf = pd.DataFrame([[2, 0], [1, 3]], index=["actin", "tubulin"], columns=["actin", "tubulin"])
    fig = F.confusion_figure(conf)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["1", "2", "3"]  # zero cells are left blank
    _png_shape(F.to_png(fig))


def test_qc_per_plate_counts_by_hand():
    fields = pd.DataFrame({"Metadata_Plate": ["P2", "P1", "P1", "P2", "P2"],
                           "flagged": [True, False, False, True, False]})
    out = F.qc_per_plate(fields)
    assert out["plate"].tolist() == ["P1", "P2"]
    assert out["n_fields"].tolist() == [2, 3] and out["n_flagged"].tolist() == [0, 2]
    np.testing.assert_allclose(out["fraction"], [0, 2 / 3])
    _png_shape(F.to_png(F.qc_figure(out)))


def test_class_score_binary_and_multiclass():
    binary = np.array([[0.8, 0.2], [0.3, 0.7]])
    s, what = _class_score(binary, ["neg", "pos"])
    np.testing.assert_allclose(s, [0.2, 0.7])
    assert what == "P(pos)"
    multi = np.array([[0.1, 0.6, 0.3], [np.nan, np.nan, np.nan]])
    s, what = _class_score(multi, ["a", "b", "c"])
    assert s[0] == 0.6 and np.isnan(s[1]) and what == "max class probability"


# --------------------------------------------------------------------------- page


def test_render_page_escapes_text_and_links_figures_relatively():
    table = pd.DataFrame({"plate": ["<P1>"], "n": [0.123456]})
    sections = [Section("Stages & status", notes=["a < b"], tables=[("t", table)]),
                Section("Plate maps", figures=[FigureRef("figures/plate_P1.png", "caption <i>")]),
                Section("Training", missing="train has not run")]
    page = render_page("Report <script>alert(1)</script>", sections)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;P1&gt;" in page and "a &lt; b" in page and "0.123" in page and "0.123456" not in page
    assert '<img src="figures/plate_P1.png"' in page and "caption &lt;i&gt;" in page
    assert 'href="#stages-status"' in page and 'id="stages-status"' in page
    assert 'class="missing">train has not run' in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_upsample_by_the_tile_block_size_puts_each_block_over_its_own_pixels():
    """A 10-row field in 4-row blocks is 3 tile rows (ceil): rows 4-7 are block 1, not 4-6."""
    tile = np.array([[0], [1], [2]])
    rows = F.upsample_nearest(tile, (10, 1), factor=4)[:, 0].tolist()
    assert rows == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert F.upsample_nearest(tile, (10, 1))[:, 0].tolist() != rows  # spread evenly: off by a row


def test_the_qc_figure_of_a_large_screen_shows_its_worst_plates_at_a_readable_width():
    n = 2000
    summary = pd.DataFrame({"plate": [f"P{i:04d}" for i in range(n)], "n_fields": 100,
                            "n_flagged": [i % 7 for i in range(n)]})
    fig = F.qc_figure(summary)
    ax = fig.axes[0]
    assert len(ax.patches) == F.QC_MAX_BARS and fig.get_figwidth() <= 0.5 * F.QC_MAX_BARS + 2
    assert [p.get_height() for p in ax.patches] == [6] * F.QC_MAX_BARS  # the most flagged first
    assert f"{F.QC_MAX_BARS} of {n} plates" in ax.get_title()


def test_names_with_dollar_signs_are_drawn_as_written():
    """matplotlib reads $...$ as maths: a plate named P$1_$2 (or a compound's) failed to
    render, and the report lost the whole section."""
    grid, rl, cl = F.well_grid(["A", "B"], [1, 2], np.array([0.1, 0.9]))
    for name in ["P$1_$2", r"P$\frac$"]:
        assert F.to_png(F.plate_heatmap(grid, rl, cl, title=f"{name}: score", label="score"))[:4] == b"\x89PNG"
    confusion = pd.DataFrame([[2, 0], [1, 1]], index=["$a_$b", "m2"], columns=["$a_$b", "m2"])
    assert F.to_png(F.confusion_figure(confusion))[:4] == b"\x89PNG"
    coords = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert F.to_png(F.scatter_by(coords, ["x$_1$y", "q", "x$_1$y"], title="t"))[:4] == b"\x89PNG"
