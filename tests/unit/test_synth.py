"""Synthetic screens: the WSCNN simulation and the MOA screen.

Pure generators are tested on arrays (no I/O); writer tests need ``rayscreen.store`` and
skip with a reason when it cannot be imported.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from rayscreen.synth import moa as moa_mod
from rayscreen.synth.common import field_rng
from rayscreen.synth.moa import (ARTEFACTS, CHANNELS, design_moa_screen, plate_effects, render_moa_field,
                                 treatment_phenotype)
from rayscreen.synth.wscnn import grid_positions, render_wscnn_image, to_dtype, wscnn_layout


def _store():
    """The plate store's create/open, or a clean skip while it is not importable."""
    store = pytest.importorskip("rayscreen.store", reason="rayscreen.store is not importable yet")
    if not hasattr(store, "create_plate") or not hasattr(store, "open_plate"):
        pytest.skip("rayscreen.store.create_plate/open_plate not available yet")
    return store


def _wscnn_images(n: int, positive: bool, rare_fraction: float = 0.1, **kw):
    return [render_wscnn_image(np.random.default_rng([7, i]), positive, rare_fraction, return_labels=True, **kw)
            for i in range(n)]


# ------------------------------------------------------------------------------------------
# WSCNN simulation (pure)
# ------------------------------------------------------------------------------------------

def test_wscnn_image_shape_range_and_object_count():
    for image, objects, labels in _wscnn_images(12, positive=True) + _wscnn_images(12, positive=False):
        assert image.shape == (210, 280) and image.dtype == np.float32 and labels.shape == (210, 280)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert 30 <= len(objects) <= 48
        # one object per grid slot, and each object drawn: a label value per object
        assert objects["slot"].is_unique and objects["slot"].between(0, 47).all()
        assert set(np.unique(labels)) == set(range(len(objects) + 1))


def test_wscnn_object_sizes_and_shapes():
    objects = pd.concat([o for _, o, _ in _wscnn_images(20, positive=True, rare_fraction=0.2)])
    assert objects["major_axis"].between(15, 20).all()
    circles, ellipses = objects[objects["rare"]], objects[~objects["rare"]]
    assert (circles["kind"] == "circle").all() and (ellipses["kind"] == "ellipse").all()
    assert (circles["minor_axis"] == circles["major_axis"]).all()
    assert (ellipses["minor_axis"] / ellipses["major_axis"]).between(0.55, 0.8).all()
    # drawn pixels: a circle of diameter 15-20 spans 15-20 pixels (one pixel of rasterisation slack)
    for o in (circles,):
        assert (o["y1"] - o["y0"]).between(14, 21).all() and (o["x1"] - o["x0"]).between(14, 21).all()
    extent = np.maximum(ellipses["y1"] - ellipses["y0"], ellipses["x1"] - ellipses["x0"])
    assert extent.max() <= 21
    # same intensity distribution for both kinds: only the shape tells a circle
    assert objects["intensity"].between(0.6, 0.9).all()


def test_wscnn_circle_fraction_matches_rare_fraction():
    for fraction in (0.1, 0.2):
        counts = []
        for _, objects, _ in _wscnn_images(30, positive=True, rare_fraction=fraction):
            n, k = len(objects), int(objects["rare"].sum())
            assert k == max(1, round(fraction * n))
            counts.append((k, n))
        k, n = np.sum(counts, axis=0)
        assert abs(k / n - fraction) < 0.02
    for _, objects, _ in _wscnn_images(30, positive=False, rare_fraction=0.2):
        assert not objects["rare"].any() and (objects["kind"] == "ellipse").all()


def test_wscnn_boxes_inside_image_and_tight_around_object_pixels():
    positions = grid_positions()
    for image, objects, labels in _wscnn_images(10, positive=True):
        assert (objects["y0"] >= 0).all() and (objects["x0"] >= 0).all()
        assert (objects["y1"] <= 210).all() and (objects["x1"] <= 280).all()
        boxes = ndi.find_objects(labels)
        for o in objects.itertuples():
            ys, xs = boxes[o.object]
            assert (ys.start, xs.start, ys.stop, xs.stop) == (o.y0, o.x0, o.y1, o.x1)
            # the box holds only this object: objects never touch
            inside = labels[o.y0:o.y1, o.x0:o.x1]
            assert set(np.unique(inside)) <= {0, o.object + 1}
            # objects are brighter than the background inside their box
            assert image[labels == o.object + 1].mean() > image[labels == 0].mean() + 0.3
            # shifted 1-20 px from their grid position
            dy, dx = o.cy - positions[o.slot][0], o.cx - positions[o.slot][1]
            assert 1.0 - 1e-9 <= math.hypot(dy, dx) <= 20.0 + 1e-9


def test_wscnn_is_deterministic_and_seed_dependent():
    a_img, a_obj = render_wscnn_image(np.random.default_rng([3, 1]), True, 0.1)
    b_img, b_obj = render_wscnn_image(np.random.default_rng([3, 1]), True, 0.1)
    c_img, _ = render_wscnn_image(np.random.default_rng([4, 1]), True, 0.1)
    np.testing.assert_array_equal(a_img, b_img)
    pd.testing.assert_frame_equal(a_obj, b_obj)
    assert not np.array_equal(a_img, c_img)
    # per-field generators: a pure function of (seed, plate, well, field)
    assert not np.array_equal(render_wscnn_image(field_rng(0, 0, 0, 0), True)[0],
                              render_wscnn_image(field_rng(0, 0, 0, 1), True)[0])


def test_wscnn_configurable_shape():
    image, objects = render_wscnn_image(np.random.default_rng(0), True, 0.2, shape=(105, 140), size=(7, 10),
                                        shift=(1, 10))
    assert image.shape == (105, 140)
    assert objects["major_axis"].between(7, 10).all()
    assert (objects["y1"] <= 105).all() and (objects["x1"] <= 140).all()


def test_to_dtype_spans_the_integer_range():
    img = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_dtype(img, "uint8"), [[0, 128, 255]])
    assert to_dtype(img, "uint16").max() == 65535


def test_wscnn_layout_fills_384_well_plates_and_balances_labels():
    layout = wscnn_layout(4000, fields_per_well=4, positive_fraction=0.5, seed=1, name_prefix="sim")
    assert len(layout) == 1000
    assert layout.groupby("plate").size().to_dict() == {"sim-p01": 384, "sim-p02": 384, "sim-p03": 232}
    assert (layout["Metadata_Label"] == "positive").sum() == 500
    assert layout.groupby("plate")["well"].apply(lambda w: w.is_unique).all()
    assert layout["well"].iloc[0] == "A01" and layout["well"].iloc[383] == "P24"
    # thirds within each label, as the paper's train/val/test split
    split = layout.groupby(["Metadata_Label", "Metadata_Split"]).size()
    assert split.between(166, 167).all()
    # the layout is seeded
    pd.testing.assert_frame_equal(layout, wscnn_layout(4000, 4, 0.5, 1, "sim"))
    assert not layout["Metadata_Label"].equals(wscnn_layout(4000, 4, 0.5, 2, "sim")["Metadata_Label"])
    assert len(wscnn_layout(10, fields_per_well=4)) == 3  # rounded up to whole wells


# ------------------------------------------------------------------------------------------
# MOA screen (pure)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def screen():
    return design_moa_screen(seed=0, n_plates=2, fields_per_well=2, artefact_fraction=0.1)


@pytest.fixture(scope="module")
def rendered(screen):
    """Every field of the default demo screen (2 plates x 48 wells x 2 fields): (layout row, image, truth)."""
    out = []
    for row in screen.layout.itertuples(index=False):
        for f in range(screen.fields_per_well):
            image, truth = screen.render_field(row.plate, row.well, f)
            out.append((row, image, truth))
    return out


def test_moa_design_controls_on_every_plate_and_all_treatments(screen):
    layout = screen.layout
    assert layout["Metadata_MOA"].nunique() == 7  # 6 MOAs + DMSO
    assert len(screen.compounds) == 12 and screen.compounds.groupby("moa").size().eq(2).all()
    for plate, wells in layout.groupby("plate"):
        controls = wells[wells["Metadata_Control"]]
        assert len(controls) == 12
        assert (controls["Metadata_Compound"] == "DMSO").all() and (controls["Metadata_MOA"] == "DMSO").all()
        assert (controls["Metadata_Concentration"] == 0.0).all()
        treated = wells[~wells["Metadata_Control"]]
        assert len(treated) == 36 and treated["Metadata_Treatment"].is_unique
        assert set(treated["Metadata_Concentration"]) == {0.3, 1.0, 3.0}
        assert wells["well"].is_unique and wells["Metadata_Batch"].nunique() == 1
    assert screen.plate_format == 96 and layout["Metadata_Batch"].nunique() == 2
    # a different random arrangement per plate, so position is not confounded with treatment
    p1, p2 = (g.set_index("well")["Metadata_Treatment"] for _, g in layout.groupby("plate"))
    assert not p1.equals(p2)
    assert set(screen.annotations("moa-p01").columns) >= {
        "Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MOA",
        "Metadata_Control", "Metadata_Batch"}


def test_moa_fields_are_uint16_three_channels(rendered):
    _, image, truth = rendered[0]
    assert image.shape == (3, 128, 128) and image.dtype == np.uint16
    assert tuple(CHANNELS) == ("DNA", "Actin", "Tubulin")
    assert set(truth) == {"plate", "well", "field", "artefact", "is_artefact", "n_cells", "n_responders"}


def test_moa_is_deterministic_independent_of_order_and_seed_dependent(screen):
    keys = [("moa-p01", "A01", 0), ("moa-p02", "C03", 1), ("moa-p01", "B02", 1)]
    forward = [screen.render_field(*k)[0] for k in keys]
    fresh = design_moa_screen(seed=0, n_plates=2, fields_per_well=2, artefact_fraction=0.1)
    backward = [fresh.render_field(*k)[0] for k in reversed(keys)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    other = design_moa_screen(seed=1, n_plates=2, fields_per_well=2, artefact_fraction=0.1)
    assert not np.array_equal(forward[0], other.render_field(*keys[0])[0])


def test_moa_vignetting_darkens_corners(screen, rendered):
    for plate in screen.plates:
        clean = [img.astype(np.float64) for row, img, t in rendered if row.plate == plate and not t["is_artefact"]]
        # light above the camera's offset (which no illumination shapes), averaged over the plate
        mean = np.mean(clean, axis=0) - screen.effects(screen.plates.index(plate)).background[:, None, None]
        for c in range(3):
            corners = np.mean([mean[c, :16, :16].mean(), mean[c, :16, -16:].mean(),
                               mean[c, -16:, :16].mean(), mean[c, -16:, -16:].mean()])
            centre = mean[c, 56:72, 56:72].mean()
            assert corners < 0.92 * centre, (plate, CHANNELS[c], corners, centre)
    # the illumination differs between plates and channels (a per-batch correction is needed)
    e1, e2 = plate_effects(0, 0, (128, 128)), plate_effects(0, 1, (128, 128))
    assert not np.allclose(e1.illumination, e2.illumination)
    assert not np.allclose(e1.illumination[0], e1.illumination[1])
    assert not np.allclose(e1.gain, e2.gain)


def _laplacian_variance(image: np.ndarray) -> float:
    return float(np.mean([ndi.laplace(ndi.gaussian_filter(c.astype(np.float64), 1.0)).var() for c in image]))


def test_moa_artefacts_paired_with_the_same_field():
    """The same cells (same generator) rendered clean and with each artefact."""
    for k in range(4):
        def render(artefact):
            return render_moa_field(np.random.default_rng([11, k]), artefact=artefact,
                                    effects=plate_effects(0, 0, (128, 128)))

        clean, cells = render("none")
        assert len(cells) > 0
        blurred, cells_b = render("blur")
        pd.testing.assert_frame_equal(cells, cells_b)
        assert _laplacian_variance(blurred) < 0.5 * _laplacian_variance(clean)
        assert (clean == 65535).mean() == 0.0
        assert (render("saturation")[0] == 65535).mean() > 0.005
        empty, no_cells = render("empty")
        assert len(no_cells) == 0
        def foreground(img):  # pixels well above the field's median
            return ((img - np.median(img, axis=(1, 2), keepdims=True)) > 2000).mean()

        assert foreground(empty.astype(np.float64)) < 0.001 < foreground(clean.astype(np.float64))
        debris = render("debris")[0].astype(np.float64)
        assert (debris[1] > 2 * clean[1].max()).mean() > 0.005  # actin: bright clumps far above any cell
    with pytest.raises(ValueError, match="artefact"):
        render_moa_field(np.random.default_rng(0), artefact="smudge")


def test_moa_artefact_flags_match_injected_artefacts():
    screen = design_moa_screen(seed=3, n_plates=1, fields_per_well=2, artefact_fraction=0.5)
    stats = {}
    for row in screen.layout.itertuples(index=False):
        for f in range(2):
            image, truth = screen.render_field(row.plate, row.well, f)
            assert truth["is_artefact"] == (truth["artefact"] != "none")
            bg = np.median(image.astype(np.float64), axis=(1, 2), keepdims=True)
            stats.setdefault(truth["artefact"], []).append(
                (_laplacian_variance(image), (image == 65535).mean(), ((image - bg) > 2000).mean(), truth["n_cells"]))
    n = sum(len(v) for v in stats.values())
    flagged = n - len(stats["none"])
    assert abs(flagged / n - 0.5) < 0.15  # binomial(96, 0.5): 4 sigma
    assert set(stats) == {"none", *ARTEFACTS}
    s = {k: np.array(v) for k, v in stats.items()}
    assert np.median(s["blur"][:, 0]) < 0.3 * np.median(s["none"][:, 0])
    assert (s["saturation"][:, 1] > 0.002).all() and (s["none"][:, 1] == 0).all()
    assert (s["empty"][:, 2] < 0.001).all() and (s["empty"][:, 3] == 0).all()
    assert np.median(s["none"][:, 2]) > 0.05


def test_moa_rare_fraction_is_the_fraction_of_responding_cells():
    screen = design_moa_screen(seed=0, n_plates=1, fields_per_well=2, rare_fraction=0.3, artefact_fraction=0.0)
    treated = responders = 0
    for row in screen.layout.itertuples(index=False):
        for f in range(2):
            _, truth = screen.render_field(row.plate, row.well, f)
            if row.Metadata_Control:
                assert truth["n_responders"] == 0
            else:
                treated += truth["n_cells"]
                responders += truth["n_responders"]
    assert abs(responders / treated - 0.3) < 0.05
    assert (screen.layout.loc[~screen.layout["Metadata_Control"], "Metadata_RareFraction"] == 0.3).all()


def test_moa_phenotype_follows_direction_and_dose(screen):
    """Higher doses move the same parameters further, in the MOA's direction."""
    compound = screen.compounds.iloc[0]  # Actin disruptors: fibres down
    low, high = (treatment_phenotype(compound, d, 3) for d in (0, 2))
    base = moa_mod.BASELINE["actin_fibres"]
    assert high["actin_fibres"] < low["actin_fibres"] < base
    assert treatment_phenotype(compound, 2, 3, strength=0.0) == pytest.approx(moa_mod.BASELINE)


def test_random_moa_directions_are_seeded_within_range_and_none_of_the_real_moas():
    dirs = moa_mod.random_moa_directions(1000, 16)
    assert list(dirs) == [f"RND{i:02d}" for i in range(1, 17)]
    assert dirs == moa_mod.random_moa_directions(1000, 16)
    assert dirs != moa_mod.random_moa_directions(1001, 16)
    for d in dirs.values():
        assert 2 <= len(d) <= 4
        for param, lf in d.items():
            assert 0.3 * moa_mod.RANDOM_MOA_RANGE[param] <= abs(lf) <= moa_mod.RANDOM_MOA_RANGE[param]
    assert not set(dirs) & set(moa_mod.MOA_DIRECTIONS)


def test_a_screen_of_other_moas_moves_its_compounds_along_their_directions():
    dirs = {"up": {"cell_radius": 0.4}, "down": {"tubulin_texture": -1.0}}
    screen = design_moa_screen(3, 1, n_moas=2, compounds_per_moa=2, moa_directions=dirs)
    assert screen.compounds["compound"].tolist() == ["up01", "up02", "down01", "down02"]
    assert set(screen.layout["Metadata_MOA"]) == {"up", "down", moa_mod.DMSO}
    up, down = (screen.compounds.set_index("compound").loc[c] for c in ("up01", "down01"))
    assert treatment_phenotype(up, 2, 3)["cell_radius"] > moa_mod.BASELINE["cell_radius"]
    assert treatment_phenotype(down, 2, 3)["tubulin_texture"] < moa_mod.BASELINE["tubulin_texture"]
    from rayscreen.store import RayscreenError
    with pytest.raises(RayscreenError, match=r"MOA 'odd': unknown phenotype parameters \['size'\]"):
        design_moa_screen(3, 1, n_moas=1, moa_directions={"odd": {"size": 1.0}})
    with pytest.raises(RayscreenError, match="n_moas=3: expected 1 to 2"):
        design_moa_screen(3, 1, n_moas=3, moa_directions=dirs)


def test_random_moa_directions_can_keep_away_from_given_moas():
    far = moa_mod.random_moa_directions(1003, 16, avoid=moa_mod.MOA_DIRECTIONS, max_cosine=0.5)
    assert max(moa_mod.direction_cosine(a, b) for a in far.values() for b in moa_mod.MOA_DIRECTIONS.values()) <= 0.5
    near = moa_mod.random_moa_directions(1000, 16)  # unconstrained draws come close by chance
    assert max(moa_mod.direction_cosine(a, b) for a in near.values() for b in moa_mod.MOA_DIRECTIONS.values()) > 0.8
    assert moa_mod.direction_cosine({"density": 1.0}, {"density": -2.0}) == pytest.approx(-1.0)
    assert moa_mod.direction_cosine({"density": 1.0}, {"elongation": 1.0}) == 0.0


@pytest.mark.parametrize("kwargs, expected", [
    ({"n_params": (3, 2)}, "n_params=(3, 2): expected (low, high) integers with 1 <= low <= high <= 9"),
    ({"n_params": (0, 2)}, "n_params=(0, 2)"),
    ({"n_params": (2, 12)}, "n_params=(2, 12)"),
    ({"magnitude": (0.5, 3.0)}, "magnitude=(0.5, 3.0): expected (low, high) with 0 < low <= high <= 1"),
    ({"seed": -1}, "seed=-1: expected an integer >= 0"),
    ({"max_cosine": 0.0}, "max_cosine=0.0: expected a number in (0, 1]"),
    # every direction of <= 4 parameters has a cosine >= 1/2 with one of these +-unit axes
    ({"max_cosine": 0.4, "avoid": {f"{sign}{p}": {p: sign} for p in moa_mod.PARAMS for sign in (1.0, -1.0)}},
     "no direction of 2-4 parameters"),
])
def test_random_moa_directions_bad_arguments_are_named(kwargs, expected):
    from rayscreen.store import RayscreenError

    with pytest.raises(RayscreenError) as e:
        moa_mod.random_moa_directions(**{"seed": 0, "n": 4, **kwargs})
    assert expected in str(e.value)


@pytest.mark.parametrize("directions, expected", [
    ({"DMSO": {"density": 1.0}}, "MOA 'DMSO': the control's name"),
    ({"x": [1.0, 2.0]}, "MOA 'x': expected a mapping of phenotype parameter -> log-fold change"),
    ({"x": {"density": float("nan")}}, "MOA 'x': log-fold changes {'density': nan}: expected finite numbers"),
    ({"x": {"density": "big"}}, "expected finite numbers"),
])
def test_screen_of_other_moas_rejects_bad_directions(directions, expected):
    from rayscreen.store import RayscreenError

    with pytest.raises(RayscreenError) as e:
        design_moa_screen(0, 1, n_moas=1, moa_directions=directions)
    assert expected in str(e.value)


def _classical_profile(image: np.ndarray) -> np.ndarray:
    """Per channel: intensity statistics, foreground fraction and texture; nucleus count and size."""
    x = image.astype(np.float64)
    feats = []
    for ch in x:
        lo, hi = np.percentile(ch, [5, 99.5])
        fg = ch > lo + 0.3 * (hi - lo)
        feats += [ch.mean(), ch.std(), np.percentile(ch, 99), fg.mean(),
                  ndi.laplace(ch)[fg].var() if fg.any() else 0.0, ch[fg].mean() if fg.any() else 0.0]
    lo, hi = np.percentile(x[0], [5, 99.5])
    labels, n = ndi.label(x[0] > lo + 0.3 * (hi - lo))
    return np.array(feats + [n, (labels > 0).sum() / max(n, 1)])


def test_moa_signal_is_learnable_by_a_classical_profile(screen, rendered):
    """Mean profiles, DMSO-normalised per plate, 1-NN MOA matching leaving the compound out (NSC)."""
    rows = {}
    for row, image, truth in rendered:
        if not truth["is_artefact"]:
            rows.setdefault((row.plate, row.well), (row, []))[1].append(_classical_profile(image))
    meta = pd.DataFrame([r._asdict() for r, _ in rows.values()])
    X = np.stack([np.mean(f, axis=0) for _, f in rows.values()])
    X = np.sign(X) * np.log1p(np.abs(X))
    for plate in meta["plate"].unique():
        on = (meta["plate"] == plate).to_numpy()
        ctl = on & meta["Metadata_Control"].to_numpy()
        X[on] = (X[on] - X[ctl].mean(0)) / (X[ctl].std(0) + 1e-9)
    meta["i"] = range(len(meta))
    treated = meta[~meta["Metadata_Control"]].groupby(["Metadata_Compound", "Metadata_Concentration", "Metadata_MOA"])
    keys, profiles = zip(*[(k, X[g["i"].to_numpy()].mean(0)) for k, g in treated])
    P = np.stack(profiles)
    P /= np.linalg.norm(P, axis=1, keepdims=True)
    similarity = P @ P.T
    compounds, moas = np.array([k[0] for k in keys]), np.array([k[2] for k in keys])
    hits = []
    for i in range(len(keys)):
        other = np.flatnonzero(compounds != compounds[i])
        hits.append(moas[other[np.argmax(similarity[i, other])]] == moas[i])
    chance = 1 / len(set(moas))
    assert np.mean(hits) >= 0.6 > 3 * chance


# ------------------------------------------------------------------------------------------
# Writers (need rayscreen.store)
# ------------------------------------------------------------------------------------------

def _tree_digest(root: str) -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_synth_wscnn_writes_plates_annotations_and_ground_truth(tmp_path):
    store = _store()
    from rayscreen.synth import load_wscnn_objects, synth_wscnn

    uris = synth_wscnn(str(tmp_path / "a"), n_images=12, rare_fraction=0.2, fields_per_well=3, seed=5)
    assert len(uris) == 1 and uris[0].endswith("simdata1-p01.zarr")
    plate = store.open_plate(uris[0])
    assert plate.shape == (1, 210, 280) and np.dtype(plate.dtype) == np.uint8
    assert sorted(plate.wells) == ["A01", "A02", "A03", "A04"] and plate.fields("A01") == ["0", "1", "2"]
    ann = plate.annotations.set_index("Metadata_Well")
    assert set(ann["Metadata_Label"]) == {"positive", "negative"}
    assert (ann["Metadata_RareFraction"] == 0.2).all()

    objects = load_wscnn_objects(str(tmp_path / "a"))
    assert list(objects.columns[:8]) == ["plate", "well", "field", "label", "object", "kind", "rare", "slot"]
    assert {"y0", "x0", "y1", "x1"} <= set(objects.columns)
    for (well, field), objs in objects.groupby(["well", "field"]):
        label = ann.loc[well, "Metadata_Label"]
        assert (objs["label"] == label).all()
        assert objs["rare"].any() == (label == "positive")
        image = plate.read(well, field)[0]
        # the stored pixels are the pure render of (seed, plate 0, well, field)
        well_idx = ["A01", "A02", "A03", "A04"].index(well)
        expected, expected_objs = render_wscnn_image(field_rng(5, 0, well_idx, int(field)), label == "positive", 0.2)
        np.testing.assert_array_equal(image, to_dtype(expected, "uint8"))
        np.testing.assert_array_equal(objs[["y0", "x0", "y1", "x1"]].to_numpy(),
                                      expected_objs[["y0", "x0", "y1", "x1"]].to_numpy())

    # same seed: identical bytes on disk; a rerun resumes without error
    synth_wscnn(str(tmp_path / "b"), n_images=12, rare_fraction=0.2, fields_per_well=3, seed=5)
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(str(tmp_path / "b"))
    synth_wscnn(str(tmp_path / "a"), n_images=12, rare_fraction=0.2, fields_per_well=3, seed=5)
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(str(tmp_path / "b"))
    synth_wscnn(str(tmp_path / "c"), n_images=12, rare_fraction=0.2, fields_per_well=3, seed=6)
    c = store.open_plate(str(tmp_path / "c" / "simdata1-p01.zarr"))
    assert not np.array_equal(c.read("A01", "0"), plate.read("A01", "0"))


def test_synth_moa_writes_plates_annotations_and_field_ground_truth(tmp_path):
    store = _store()
    from rayscreen.synth import load_moa_fields, synth_moa

    kw = dict(n_plates=2, field_shape=(64, 64), fields_per_well=2, seed=2, artefact_fraction=0.3,
              n_moas=3, compounds_per_moa=2, concentrations=(1.0, 3.0), n_controls=4)
    uris = synth_moa(str(tmp_path / "a"), **kw)
    assert [u.rsplit("/", 1)[1] for u in uris] == ["moa-p01.zarr", "moa-p02.zarr"]
    truth = load_moa_fields(str(tmp_path / "a"))
    assert list(truth.columns[:4]) == ["plate", "well", "field", "artefact"]
    assert len(truth) == 2 * (3 * 2 * 2 + 4) * 2
    assert truth["is_artefact"].any() and (truth["is_artefact"] == (truth["artefact"] != "none")).all()
    screen = design_moa_screen(seed=2, n_plates=2, field_shape=(64, 64), fields_per_well=2, artefact_fraction=0.3,
                               n_moas=3, compounds_per_moa=2, concentrations=(1.0, 3.0), n_controls=4)
    for uri in uris:
        plate = store.open_plate(uri)
        assert plate.channels == list(CHANNELS) and plate.shape == (3, 64, 64)
        ann = plate.annotations
        assert ann["Metadata_Control"].astype(bool).sum() == 4
        assert set(ann.loc[ann["Metadata_Control"].astype(bool), "Metadata_Compound"]) == {"DMSO"}
        assert {"Metadata_Compound", "Metadata_Concentration", "Metadata_MOA", "Metadata_Batch"} <= set(ann.columns)
        for well in plate.wells[:3]:
            for field in plate.fields(well):
                image, info = screen.render_field(plate.name, well, int(field))
                np.testing.assert_array_equal(plate.read(well, field), image)
                row = truth[(truth["plate"] == plate.name) & (truth["well"] == well) & (truth["field"] == field)]
                assert row["artefact"].item() == info["artefact"]
    synth_moa(str(tmp_path / "b"), **kw)
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(str(tmp_path / "b"))


@pytest.mark.integration
def test_synth_moa_to_s3(s3_bucket):
    store = _store()
    from rayscreen.synth import load_moa_fields, synth_moa

    bucket, options = s3_bucket
    uris = synth_moa(f"{bucket}/screen", n_plates=1, field_shape=(48, 48), fields_per_well=1, n_moas=2,
                     compounds_per_moa=1, concentrations=(1.0,), n_controls=2, storage_options=options)
    plate = store.open_plate(uris[0], storage_options=options)
    assert plate.read(plate.wells[0], "0").shape == (3, 48, 48)
    assert len(load_moa_fields(f"{bucket}/screen", storage_options=options)) == 4


# ------------------------------------------------------------------------------------------
# Argument checks: a user error (RayscreenError, exit 2), raised before anything is written
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs, expected", [
    ("wscnn", {"n_images": 0}, "n_images=0: expected an integer >= 1"),
    ("wscnn", {"n_images": -4}, "n_images=-4: expected an integer >= 1"),
    ("wscnn", {"fields_per_well": 0}, "fields_per_well=0: expected an integer >= 1"),
    ("wscnn", {"rare_fraction": 2}, "rare_fraction=2: expected a fraction in [0, 1]"),
    ("wscnn", {"rare_fraction": float("nan")}, "rare_fraction=nan: expected a fraction in [0, 1]"),
    ("wscnn", {"positive_fraction": -0.5}, "positive_fraction=-0.5: expected a fraction in [0, 1]"),
    ("wscnn", {"seed": -1}, "seed=-1: expected an integer >= 0"),
    ("wscnn", {"shape": (0, 280)}, "shape=(0, 280): expected a (Y, X) pair of integers >= 1"),
    ("moa", {"n_plates": 0}, "n_plates=0: expected an integer >= 1"),
    ("moa", {"fields_per_well": 0}, "fields_per_well=0: expected an integer >= 1"),
    ("moa", {"rare_fraction": 1.5}, "rare_fraction=1.5: expected a fraction in [0, 1]"),
    ("moa", {"artefact_fraction": -0.1}, "artefact_fraction=-0.1: expected a fraction in [0, 1]"),
    ("moa", {"seed": -2}, "seed=-2: expected an integer >= 0"),
    ("moa", {"field_shape": (64,)}, "field_shape=(64,): expected a (Y, X) pair of integers >= 1"),
    ("moa", {"replicates": 0}, "replicates=0: expected an integer >= 1"),
    ("moa", {"n_controls": -1}, "n_controls=-1: expected an integer >= 0"),
    ("moa", {"n_moas": 99}, "n_moas=99: expected 1 to 8"),
    ("moa", {"concentrations": ()}, "concentrations=[]: expected one or more positive numbers"),
    ("moa", {"strength": -1.0}, "strength=-1.0: expected a number >= 0"),
])
def test_synth_out_of_range_arguments_are_user_errors_and_write_nothing(tmp_path, kind, kwargs, expected):
    from rayscreen.store import RayscreenError
    from rayscreen.synth import synth_moa, synth_wscnn

    out = tmp_path / "screen"
    with pytest.raises(RayscreenError) as e:
        (synth_wscnn if kind == "wscnn" else synth_moa)(str(out), **kwargs)
    assert expected in str(e.value)
    assert not out.exists()
