"""A BBBC021-like mechanism-of-action (MOA) screen: three stains, compounds at doses, batches.

Biology, reduced to a handful of knobs. Each field shows cells drawn as soft ellipses
(cytoplasm) with an elliptical nucleus, in three channels:

- ``DNA``: the nucleus, with a chromatin texture;
- ``Actin``: the cytoplasm with a cortical ring and stress fibres (stripes along the cell's
  long axis);
- ``Tubulin``: the cytoplasm, brightest around the nucleus, with radial microtubule rays.

A :data:`BASELINE` phenotype (the DMSO control) holds the mean cell parameters. A
compound moves them along its MOA's direction (:data:`MOA_DIRECTIONS`, log-fold changes at
full effect) plus a small compound-specific deviation, scaled by the compound's potency
and the dose. So compounds of one MOA share a direction in phenotype space, the signal a
profile should retrieve (NSC / NSCB 1-nearest-neighbour MOA matching).

Screen effects: every plate is a batch with its own vignetting (a smooth multiplicative
field per channel), per-channel gain, background and seeding density; DMSO wells on every
plate; a ``rare_fraction`` of responding cells (1.0: every cell of a treated well
responds; 0.1: a rare phenotype carried by few cells); QC artefacts (blur, saturation,
debris, empty) in an ``artefact_fraction`` of fields, with ground truth.

Pure functions (no I/O): :func:`design_moa_screen` (compounds, plate layouts, plate
effects), :func:`render_moa_field` (one field from phenotypes), :meth:`MoaScreen.render_field`.
The writer :func:`synth_moa` puts them into plates.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field as dc_field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from skimage.filters import gaussian

from .common import (STREAM_COMPOUND, STREAM_LAYOUT, STREAM_PLATE, check_fraction, check_int, check_shape, field_rng,
                     import_create_plate, invalid_argument, join, plate_uri, read_tables, stream_rng, well_at,
                     well_index, write_table)

CHANNELS = ("DNA", "Actin", "Tubulin")
ARTEFACTS = ("blur", "saturation", "debris", "empty")
FIELDS_SUFFIX = "_fields.parquet"
DMSO = "DMSO"

# Mean cell parameters of the DMSO control, for fields of any size (density is per area).
BASELINE: dict[str, float] = {
    "density": 8.0,            # cells per 100 x 100 px
    "cell_radius": 11.0,       # geometric mean of the cell's semi-axes, px
    "elongation": 0.6,         # aspect ratio - 1 (0: round)
    "nucleus_ratio": 0.45,     # nucleus radius / cell radius
    "dna_intensity": 0.6,      # arbitrary units; 1.0 ~ 20,000 counts before plate gain
    "actin_intensity": 0.35,
    "actin_fibres": 0.5,       # stress-fibre contrast in [0, 1]
    "tubulin_intensity": 0.4,
    "tubulin_texture": 0.4,    # microtubule-ray contrast in [0, 1]
}
PARAMS = tuple(BASELINE)

# Log-fold change of each parameter at full effect (potency 1, highest dose), loosely after
# the BBBC021 MOAs (Ljosa et al. 2013). Names -> short codes used for compound names.
MOA_DIRECTIONS: dict[str, dict[str, float]] = {
    "Actin disruptors": {"actin_fibres": -1.4, "actin_intensity": 0.5, "cell_radius": -0.15, "elongation": -0.4},
    "Microtubule destabilizers": {"tubulin_texture": -1.4, "tubulin_intensity": -0.5, "elongation": -1.0,
                                  "nucleus_ratio": 0.1},
    "Microtubule stabilizers": {"tubulin_intensity": 0.6, "tubulin_texture": 0.8, "density": -0.4,
                                "elongation": -0.5},
    "DNA damage": {"nucleus_ratio": 0.3, "dna_intensity": 0.45, "cell_radius": 0.2, "density": -0.4},
    "Aurora kinase inhibitors": {"nucleus_ratio": 0.35, "cell_radius": 0.45, "dna_intensity": -0.3,
                                 "density": -0.8},
    "Protein synthesis": {"density": -0.6, "cell_radius": -0.3, "actin_intensity": -0.5,
                          "tubulin_intensity": -0.5, "dna_intensity": -0.25},
    "Eg5 inhibitors": {"elongation": -1.5, "cell_radius": -0.3, "dna_intensity": 0.6, "nucleus_ratio": -0.25},
    "Cholesterol-lowering": {"actin_intensity": 0.4, "cell_radius": 0.15, "elongation": 0.5,
                             "actin_fibres": 0.4},
}
MOA_CODES = {"Actin disruptors": "ACT", "Microtubule destabilizers": "MTD", "Microtubule stabilizers": "MTS",
             "DNA damage": "DNA", "Aurora kinase inhibitors": "AUR", "Protein synthesis": "PRS",
             "Eg5 inhibitors": "EG5", "Cholesterol-lowering": "CHL"}

# Biological cell-to-cell variation (log-normal sigma) of the per-cell parameters.
CELL_SIGMA = {"cell_radius": 0.12, "elongation": 0.3, "nucleus_ratio": 0.1, "dna_intensity": 0.15,
              "actin_intensity": 0.15, "actin_fibres": 0.15, "tubulin_intensity": 0.15, "tubulin_texture": 0.15}

COUNTS_PER_UNIT = 20000.0  # detector counts of intensity 1.0 at gain 1, centre of the field
UINT16_MAX = 65535


def phenotype(log_fold: Mapping[str, float] | None = None,
              baseline: Mapping[str, float] = BASELINE) -> dict[str, float]:
    """``baseline`` with parameters multiplied by ``exp(log_fold)`` (missing keys: unchanged)."""
    log_fold = dict(log_fold or {})
    unknown = sorted(set(log_fold) - set(baseline))
    if unknown:
        raise ValueError(f"unknown phenotype parameters {unknown}; expected some of {sorted(baseline)}")
    return {k: float(v * math.exp(log_fold.get(k, 0.0))) for k, v in baseline.items()}


# --------------------------------------------------------------------------------------------
# Cells and their pixels
# --------------------------------------------------------------------------------------------

def draw_cells(rng: np.random.Generator, shape: tuple[int, int], treated: Mapping[str, float],
               baseline: Mapping[str, float] = BASELINE, responder_fraction: float = 1.0,
               density_factor: float = 1.0) -> pd.DataFrame:
    """Per-cell parameters of one field: one row per cell.

    The number of cells is Poisson with mean ``density * area / 10^4 * density_factor``, the
    density mixed between ``baseline`` and ``treated`` by ``responder_fraction``. Each cell is
    a responder with probability ``responder_fraction`` and then draws its parameters around
    ``treated``, otherwise around ``baseline`` (log-normal cell-to-cell variation).

    Columns: ``cy, cx`` (centre, px), ``a, b`` (semi-axes, px), ``theta`` (radians),
    ``nucleus_radius``, ``ny, nx`` (nucleus offset, px), the intensity/texture parameters,
    ``phase`` (texture phase), ``responder`` (bool).
    """
    area = shape[0] * shape[1] / 1e4
    density = (1 - responder_fraction) * baseline["density"] + responder_fraction * treated["density"]
    n = int(rng.poisson(density * area * density_factor))
    responder = rng.random(n) < responder_fraction
    rows = []
    centres: list[tuple[float, float]] = []
    for i in range(n):
        mean = treated if responder[i] else baseline
        p = {k: mean[k] * math.exp(rng.normal(0.0, s)) for k, s in CELL_SIGMA.items()}
        aspect = 1.0 + p["elongation"]
        a, b = p["cell_radius"] * math.sqrt(aspect), p["cell_radius"] / math.sqrt(aspect)
        # cells avoid piling up on each other (contact inhibition): a few tries for a free spot
        for _ in range(20):
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            if all(math.hypot(cy - y, cx - x) > 0.9 * p["cell_radius"] + 4 for y, x in centres):
                break
        centres.append((cy, cx))
        r_nuc = min(p["nucleus_ratio"], 0.85) * p["cell_radius"]
        off = max(0.0, b - r_nuc) * 0.4
        rows.append(dict(cy=cy, cx=cx, a=a, b=b, theta=rng.uniform(0, math.pi), nucleus_radius=r_nuc,
                         ny=rng.uniform(-off, off), nx=rng.uniform(-off, off),
                         dna_intensity=p["dna_intensity"], actin_intensity=p["actin_intensity"],
                         actin_fibres=min(p["actin_fibres"], 0.95), tubulin_intensity=p["tubulin_intensity"],
                         tubulin_texture=min(p["tubulin_texture"], 0.95), phase=rng.uniform(0, 2 * math.pi),
                         responder=bool(responder[i])))
    cols = ["cy", "cx", "a", "b", "theta", "nucleus_radius", "ny", "nx", "dna_intensity", "actin_intensity",
            "actin_fibres", "tubulin_intensity", "tubulin_texture", "phase", "responder"]
    return pd.DataFrame(rows, columns=cols)


def _soft(d: np.ndarray, width: float = 0.8) -> np.ndarray:
    """Soft mask from a signed distance (px, positive inside): an anti-aliased edge."""
    return 1.0 / (1.0 + np.exp(-d / width))


def render_cells(rng: np.random.Generator, cells: pd.DataFrame, shape: tuple[int, int]) -> np.ndarray:
    """The specimen: float32 (3, Y, X) stain intensities (DNA, Actin, Tubulin), ~[0, 1.5].

    Cells are rendered in small patches around each cell; overlapping cells take the
    brighter value per channel (a flat monolayer, not stacked cells).
    """
    out = np.zeros((3, *shape), dtype=np.float32)
    for c in cells.itertuples(index=False):
        half = int(math.ceil(max(c.a, c.b))) + 3
        y0, y1 = max(0, int(c.cy) - half), min(shape[0], int(c.cy) + half + 1)
        x0, x1 = max(0, int(c.cx) - half), min(shape[1], int(c.cx) + half + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - c.cy, xx - c.cx
        cos, sin = math.cos(c.theta), math.sin(c.theta)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # u along the long axis
        rho = np.sqrt((u / c.a) ** 2 + (v / c.b) ** 2)
        cyto = _soft((1.0 - rho) * min(c.a, c.b))
        rn = np.sqrt((u - c.nx) ** 2 + (v - c.ny) ** 2) / c.nucleus_radius
        nucleus = _soft((1.0 - rn) * c.nucleus_radius)
        # chromatin: smooth random texture, so DNA has more than a flat disc
        chromatin = gaussian(rng.standard_normal(yy.shape), sigma=1.0)
        dna = c.dna_intensity * nucleus * (1.0 + 0.6 * chromatin)
        # actin: cortical ring at the membrane plus stress fibres along the long axis (period 4 px)
        ring = np.exp(-(((rho - 0.92) * min(c.a, c.b)) / 1.5) ** 2)
        fibres = 0.5 * (1.0 + np.sin(2 * math.pi * v / 4.0 + c.phase))
        actin = c.actin_intensity * (cyto * (1.0 - c.actin_fibres + c.actin_fibres * fibres) + 0.8 * ring * cyto)
        # tubulin: dense around the nucleus, fading outwards, with ~14 radial microtubule rays
        angle = np.arctan2(v, u)
        rays = 0.5 * (1.0 + np.sin(14 * angle + c.phase))
        tubulin = (c.tubulin_intensity * cyto * (1.0 - 0.5 * np.clip(rho, 0, 1))
                   * (1.0 - c.tubulin_texture + c.tubulin_texture * rays))
        for ch, img in enumerate((dna, actin, tubulin)):
            np.maximum(out[ch, y0:y1, x0:x1], np.clip(img, 0, None).astype(np.float32),
                       out=out[ch, y0:y1, x0:x1])
    return out


# --------------------------------------------------------------------------------------------
# Plate effects (batches) and acquisition
# --------------------------------------------------------------------------------------------

def vignetting(rng: np.random.Generator, shape: tuple[int, int], strength: tuple[float, float] = (0.25, 0.45),
               centre_jitter: float = 0.15) -> np.ndarray:
    """Smooth multiplicative illumination, float32 (Y, X): 1 at the optical centre, falling
    quadratically to ``1 - strength`` at the corners. The centre is off the field's centre by
    up to ``centre_jitter`` of the field size."""
    h, w = shape
    cy = h / 2 + rng.uniform(-centre_jitter, centre_jitter) * h
    cx = w / 2 + rng.uniform(-centre_jitter, centre_jitter) * w
    s = rng.uniform(*strength)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = (((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2) / 2  # ~1 at the corners
    return np.clip(1.0 - s * r2, 0.2, 1.0).astype(np.float32)


@dataclass(frozen=True)
class PlateEffects:
    """A plate's batch effects: ``illumination`` float32 (C, Y, X), ``gain`` (C,),
    ``background`` (C,) in counts, ``density_factor`` (seeding density of this batch)."""

    illumination: np.ndarray
    gain: np.ndarray
    background: np.ndarray
    density_factor: float


def plate_effects(seed: int, plate_idx: int, shape: tuple[int, int], n_channels: int = 3,
                  gain_sigma: float = 0.2, vignetting_strength: tuple[float, float] = (0.25, 0.45)) -> PlateEffects:
    """The batch effects of plate ``plate_idx``: a pure function of (seed, plate)."""
    rng = stream_rng(seed, STREAM_PLATE, plate_idx)
    illum = np.stack([vignetting(rng, shape, vignetting_strength) for _ in range(n_channels)])
    gain = np.exp(rng.normal(0.0, gain_sigma, n_channels))
    background = rng.uniform(300, 700, n_channels)
    density = float(np.exp(rng.normal(0.0, 0.1)))
    return PlateEffects(illum, gain, background, density)


def _debris(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """1-3 bright irregular clumps (dust, fibres, precipitate): float32 (Y, X) in [0, ~3]."""
    mask = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.15, 0.85) * shape[0], rng.uniform(0.15, 0.85) * shape[1]
        for _ in range(int(rng.integers(3, 7))):  # a clump of overlapping lumps
            ly, lx = cy + rng.normal(0, 5), cx + rng.normal(0, 5)
            ra, rb = rng.uniform(3, 9), rng.uniform(2, 6)
            t = rng.uniform(0, math.pi)
            u = (xx - lx) * math.cos(t) + (yy - ly) * math.sin(t)
            v = -(xx - lx) * math.sin(t) + (yy - ly) * math.cos(t)
            mask |= (u / ra) ** 2 + (v / rb) ** 2 <= 1
    return mask.astype(np.float32) * rng.uniform(2.0, 3.0)


def _overexposure(rng: np.random.Generator, specimen: np.ndarray, effects: PlateEffects | None) -> np.ndarray:
    """Per-channel exposure factors (C, 1, 1) that push the brightest ~3-10% of a field's
    pixels past 65535, whatever the plate's gain and the field's cells (a too long exposure)."""
    c = specimen.shape[0]
    gain = effects.gain if effects is not None else np.ones(c)
    illum = effects.illumination if effects is not None else 1.0
    bg = effects.background if effects is not None else np.full(c, 500.0)
    bright = np.quantile((specimen * illum).reshape(c, -1), 0.95, axis=1)
    factor = rng.uniform(1.5, 3.0) * (UINT16_MAX - bg) / (COUNTS_PER_UNIT * gain * np.maximum(bright, 1e-3))
    return np.maximum(factor, 1.0).astype(np.float32)[:, None, None]


def acquire(rng: np.random.Generator, specimen: np.ndarray, effects: PlateEffects | None = None,
            read_noise: float = 30.0) -> np.ndarray:
    """Specimen (C, Y, X) float -> detector image (C, Y, X) uint16.

    counts = background + COUNTS_PER_UNIT * gain * illumination * specimen, with shot noise
    (variance = counts) and read noise, clipped to [0, 65535].
    """
    c = specimen.shape[0]
    if effects is None:
        illum, gain, bg = np.ones_like(specimen), np.ones(c), np.full(c, 500.0)
    else:
        illum, gain, bg = effects.illumination, effects.gain, effects.background
    counts = bg[:, None, None] + COUNTS_PER_UNIT * gain[:, None, None] * illum * specimen
    noisy = counts + rng.standard_normal(counts.shape) * np.sqrt(counts + read_noise ** 2)
    return np.rint(np.clip(noisy, 0, UINT16_MAX)).astype(np.uint16)


def render_moa_field(
    rng: np.random.Generator,
    treated: Mapping[str, float] | None = None,
    shape: tuple[int, int] = (128, 128),
    *,
    baseline: Mapping[str, float] = BASELINE,
    responder_fraction: float = 1.0,
    effects: PlateEffects | None = None,
    artefact: str = "none",
    optics_sigma: float = 0.8,
    autofluorescence: float = 0.02,
) -> tuple[np.ndarray, pd.DataFrame]:
    """One field of the MOA screen.

    Parameters
    ----------
    rng : the field's generator (:func:`rayscreen.synth.common.field_rng`).
    treated : the phenotype of responding cells (:func:`phenotype`); None: ``baseline``.
    responder_fraction : fraction of cells that respond (``rare_fraction`` of the screen).
    effects : the plate's batch effects; None: flat illumination, gain 1.
    artefact : "none" or one of :data:`ARTEFACTS`:
        ``blur`` defocus (Gaussian sigma 2.5-4 px on the specimen); ``saturation``
        overexposure (at least the brightest ~5% of pixels clipped at 65535); ``debris``
        (bright clumps in all channels); ``empty`` (no cells).
    optics_sigma : Gaussian blur of the optics, px (a focused field).
    autofluorescence : uniform specimen background (units of :data:`COUNTS_PER_UNIT`).

    Returns
    -------
    image : uint16 (3, Y, X), channels :data:`CHANNELS`.
    cells : the per-cell parameters (:func:`draw_cells`); empty for ``empty`` fields.
    """
    if artefact != "none" and artefact not in ARTEFACTS:
        raise ValueError(f"artefact {artefact!r}: expected 'none' or one of {ARTEFACTS}")
    treated = baseline if treated is None else treated
    density_factor = effects.density_factor if effects is not None else 1.0
    cells = draw_cells(rng, shape, treated, baseline, responder_fraction, density_factor)
    if artefact == "empty":
        cells = cells.iloc[:0]
    specimen = render_cells(rng, cells, shape)
    sigma = rng.uniform(2.5, 4.0) if artefact == "blur" else optics_sigma
    if sigma > 0:
        specimen = gaussian(specimen, sigma=sigma, channel_axis=0, preserve_range=True).astype(np.float32)
    if artefact == "debris":
        specimen = specimen + _debris(rng, shape)[None] * np.array([1.0, 0.8, 0.9], np.float32)[:, None, None]
    # medium and plastic glow faintly everywhere: background that vignetting shapes too
    specimen = specimen + np.float32(autofluorescence)
    if artefact == "saturation":
        specimen = specimen * _overexposure(rng, specimen, effects)
    return acquire(rng, specimen, effects), cells


# --------------------------------------------------------------------------------------------
# The screen design
# --------------------------------------------------------------------------------------------

def make_compounds(seed: int = 0, n_moas: int = 6, compounds_per_moa: int = 2, jitter: float = 0.15,
                   potency: tuple[float, float] = (0.8, 1.25),
                   directions: Mapping[str, Mapping[str, float]] | None = None) -> pd.DataFrame:
    """Compounds with their MOA, potency and log-fold direction (one row per compound).

    A compound's direction is its MOA's plus Gaussian ``jitter`` on every parameter (its
    off-target signature), so compounds of one MOA are alike but not identical. The MOAs
    are the first ``n_moas`` of ``directions`` (default :data:`MOA_DIRECTIONS`; e.g.
    :func:`random_moa_directions` for a reference screen of other biology).
    Columns: ``compound`` (e.g. ``ACT01``: the MOA's code, or its name where it has none,
    and the compound's number), ``moa``, ``potency``, and one ``lf_<param>`` per phenotype
    parameter (log-fold at full effect).
    """
    directions = MOA_DIRECTIONS if directions is None else directions
    moas = list(directions)
    if not 1 <= n_moas <= len(moas):
        raise invalid_argument(f"n_moas={n_moas!r}: expected 1 to {len(moas)} (the MOAs this generator knows: {moas})")
    for moa in moas[:n_moas]:
        if moa == DMSO:  # its wells would pass for controls
            raise invalid_argument(f"MOA {DMSO!r}: the control's name; name the MOA otherwise")
        if not isinstance(directions[moa], Mapping):
            raise invalid_argument(f"MOA {moa!r}: expected a mapping of phenotype parameter -> log-fold change, "
                                   f"not {directions[moa]!r}")
        unknown = sorted(map(str, set(directions[moa]) - set(PARAMS)))
        if unknown:
            raise invalid_argument(f"MOA {moa!r}: unknown phenotype parameters {unknown}; expected some of "
                                   f"{list(PARAMS)}")
        bad = {k: v for k, v in directions[moa].items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)}
        if bad:
            raise invalid_argument(f"MOA {moa!r}: log-fold changes {bad}: expected finite numbers")
    rows = []
    for m, moa in enumerate(moas[:n_moas]):
        for k in range(compounds_per_moa):
            rng = stream_rng(seed, STREAM_COMPOUND, m, k)
            direction = {p: directions[moa].get(p, 0.0) + rng.normal(0.0, jitter) for p in PARAMS}
            rows.append({"compound": f"{MOA_CODES.get(moa, moa)}{k + 1:02d}", "moa": moa,
                         "potency": rng.uniform(*potency), **{f"lf_{p}": v for p, v in direction.items()}})
    return pd.DataFrame(rows)


# The largest log-fold change random_moa_directions draws per parameter: sizes and the
# nucleus/cell ratio change less than intensities, textures and shape in cell biology
# (a 1.6x larger cell is a strong phenotype; a 4x brighter stain is not unusual).
RANDOM_MOA_RANGE = {"density": 1.0, "cell_radius": 0.5, "elongation": 1.5, "nucleus_ratio": 0.4,
                    "dna_intensity": 0.7, "actin_intensity": 0.7, "actin_fibres": 1.5, "tubulin_intensity": 0.7,
                    "tubulin_texture": 1.5}


def direction_cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Cosine similarity of two log-fold directions over :data:`PARAMS` (missing: 0); 0 if
    either is all zero. How alike two MOAs' phenotypes are, up to strength."""
    # by hand: scipy.spatial.distance.cosine gives NaN (and a warning) for an all-zero direction
    va, vb = (np.array([float(d.get(p, 0.0)) for p in PARAMS]) for d in (a, b))
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb / norm) if norm > 0 else 0.0


def random_moa_directions(seed: int, n: int, n_params: tuple[int, int] = (2, 4),
                          magnitude: tuple[float, float] = (0.3, 1.0),
                          avoid: Mapping[str, Mapping[str, float]] | None = None,
                          max_cosine: float = 1.0) -> dict[str, dict[str, float]]:
    """``n`` made-up MOAs (``RND01``, ...), each moving ``n_params`` (low, high) randomly
    chosen phenotype parameters by a log-fold of random sign and size (``magnitude`` (low,
    high) times the parameter's :data:`RANDOM_MOA_RANGE`): the shape of
    :data:`MOA_DIRECTIONS` without its biology. A screen of these compounds is a
    *reference* screen to pretrain a network on, whose features are then tested on screens
    of the real MOAs (transfer, as ImageNet features are).

    Random directions can come close to a real MOA by chance; ``avoid`` (e.g.
    :data:`MOA_DIRECTIONS`) with ``max_cosine`` < 1 redraws any made-up MOA whose
    :func:`direction_cosine` with one of them exceeds ``max_cosine``.
    """
    check_int("seed", seed, 0)
    check_int("n", n)
    lo, hi = n_params
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= len(PARAMS)):
        raise invalid_argument(f"n_params={n_params!r}: expected (low, high) integers with 1 <= low <= high <= "
                               f"{len(PARAMS)} (the phenotype parameters)")
    if not 0 < magnitude[0] <= magnitude[1] <= 1:
        raise invalid_argument(f"magnitude={magnitude!r}: expected (low, high) with 0 < low <= high <= 1 "
                               "(fractions of RANDOM_MOA_RANGE)")
    if not 0 < max_cosine <= 1:
        raise invalid_argument(f"max_cosine={max_cosine!r}: expected a number in (0, 1]")
    avoid = dict(avoid or {})
    rng = np.random.default_rng([int(seed), 0x5EF])
    out = {}
    for i in range(n):
        for _ in range(10000):
            k = int(rng.integers(lo, hi + 1))
            params = sorted(rng.choice(len(PARAMS), size=k, replace=False))
            direction = {PARAMS[j]: float(rng.choice([-1.0, 1.0]) * rng.uniform(*magnitude)
                                          * RANDOM_MOA_RANGE[PARAMS[j]]) for j in params}
            if all(direction_cosine(direction, d) <= max_cosine for d in avoid.values()):
                break
        else:
            raise invalid_argument(f"max_cosine={max_cosine}: no direction of {lo}-{hi} parameters found that far "
                                   f"from all of {sorted(avoid)} in 10000 draws; raise max_cosine")
        out[f"RND{i + 1:02d}"] = direction
    return out


def dose_scale(dose_rank: int, n_doses: int) -> float:
    """Fraction of the full effect at a dose: 0.4 at the lowest, rising linearly to 1.0 at the
    highest concentration (a log-spaced dose series climbing a sigmoid's middle)."""
    return 1.0 if n_doses == 1 else 0.4 + 0.6 * dose_rank / (n_doses - 1)


def treatment_phenotype(compound: Mapping[str, Any], dose_rank: int, n_doses: int, strength: float = 1.0,
                        baseline: Mapping[str, float] = BASELINE) -> dict[str, float]:
    """Mean phenotype of responding cells under ``compound`` (a :func:`make_compounds` row)."""
    scale = strength * compound["potency"] * dose_scale(dose_rank, n_doses)
    return phenotype({p: scale * compound[f"lf_{p}"] for p in PARAMS}, baseline)


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames do not compare to a bool
class MoaScreen:
    """The whole design of a synthetic MOA screen; renders any field as a pure function.

    ``compounds``: :func:`make_compounds`. ``layout``: one row per (plate, well) with
    ``plate``, ``plate_idx``, ``well``, ``well_idx`` and the annotations
    ``Metadata_Plate, Metadata_Well, Metadata_Compound, Metadata_Concentration,
    Metadata_MOA, Metadata_Control, Metadata_Batch, Metadata_Treatment,
    Metadata_RareFraction`` plus ``dose_rank``.
    """

    seed: int
    compounds: pd.DataFrame
    layout: pd.DataFrame
    concentrations: tuple[float, ...]
    field_shape: tuple[int, int]
    fields_per_well: int
    rare_fraction: float
    artefact_fraction: float
    artefact_kinds: tuple[str, ...]
    strength: float
    plate_format: int
    _effects: dict = dc_field(default_factory=dict, compare=False, repr=False)

    @property
    def plates(self) -> list[str]:
        return list(dict.fromkeys(self.layout["plate"]))

    def annotations(self, plate: str) -> pd.DataFrame:
        """Per-well annotations of ``plate`` (``Metadata_*`` columns only)."""
        rows = self.layout[self.layout["plate"] == plate]
        return rows[[c for c in rows.columns if c.startswith("Metadata_")]].reset_index(drop=True)

    def effects(self, plate_idx: int) -> PlateEffects:
        if plate_idx not in self._effects:  # cached: vignetting is the same for all fields of a plate
            self._effects[plate_idx] = plate_effects(self.seed, plate_idx, self.field_shape)
        return self._effects[plate_idx]

    def field_artefact(self, rng: np.random.Generator) -> str:
        """Draws the field's artefact ("none" most of the time) from the field's own generator."""
        if self.artefact_fraction > 0 and rng.random() < self.artefact_fraction:
            return str(self.artefact_kinds[int(rng.integers(len(self.artefact_kinds)))])
        return "none"

    def render_field(self, plate: str, well: str, field: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Field ``field`` of ``well`` on ``plate``: uint16 (3, Y, X) and its ground truth
        ``{plate, well, field, artefact, is_artefact, n_cells, n_responders}``."""
        row = self.layout[(self.layout["plate"] == plate) & (self.layout["well"] == well)]
        if row.empty:
            raise KeyError(f"plate {plate!r} has no well {well!r} in this screen")
        row = row.iloc[0]
        rng = field_rng(self.seed, row["plate_idx"], row["well_idx"], field)
        artefact = self.field_artefact(rng)
        if row["Metadata_Control"]:
            treated, fraction = None, 0.0
        else:
            compound = self.compounds.set_index("compound").loc[row["Metadata_Compound"]]
            treated = treatment_phenotype(compound, int(row["dose_rank"]), len(self.concentrations), self.strength)
            fraction = self.rare_fraction
        image, cells = render_moa_field(rng, treated, self.field_shape, responder_fraction=fraction,
                                        effects=self.effects(int(row["plate_idx"])), artefact=artefact)
        truth = {"plate": plate, "well": well, "field": str(field), "artefact": artefact,
                 "is_artefact": artefact != "none", "n_cells": int(len(cells)),
                 "n_responders": int(cells["responder"].sum()) if len(cells) else 0}
        return image, truth


def design_moa_screen(
    seed: int = 0,
    n_plates: int = 2,
    *,
    n_moas: int = 6,
    compounds_per_moa: int = 2,
    concentrations: Sequence[float] = (0.3, 1.0, 3.0),
    replicates: int = 1,
    n_controls: int = 12,
    field_shape: tuple[int, int] = (128, 128),
    fields_per_well: int = 3,
    rare_fraction: float = 1.0,
    artefact_fraction: float = 0.1,
    artefact_kinds: Sequence[str] = ARTEFACTS,
    strength: float = 1.0,
    name_prefix: str = "moa",
    moa_directions: Mapping[str, Mapping[str, float]] | None = None,
) -> MoaScreen:
    """Design a screen (pure, no I/O): compounds, which well holds what on each plate.

    Every plate (= batch) holds every treatment (compound x concentration) ``replicates``
    times plus ``n_controls`` DMSO wells, in a seeded random arrangement per plate over the
    first wells of a 96-well plate taken column by column (384-well when more than 96 are
    needed). Concentrations are in µM; ``strength`` scales every effect (0: no signal);
    ``moa_directions``: the MOAs to draw from (:func:`make_compounds`).
    """
    check_int("n_plates", n_plates)
    check_int("seed", seed, 0)  # numpy seeds are non-negative
    check_int("n_moas", n_moas)
    check_int("compounds_per_moa", compounds_per_moa)
    check_int("replicates", replicates)
    check_int("n_controls", n_controls, 0)
    check_int("fields_per_well", fields_per_well)
    check_shape("field_shape", field_shape)
    check_fraction("rare_fraction", rare_fraction)
    check_fraction("artefact_fraction", artefact_fraction)
    if not len(concentrations) or not all(isinstance(c, numbers.Real) and c > 0 for c in concentrations):
        raise invalid_argument(f"concentrations={list(concentrations)!r}: expected one or more positive numbers (µM)")
    if not strength >= 0:  # NaN too
        raise invalid_argument(f"strength={strength!r}: expected a number >= 0 (0: no signal)")
    bad = sorted(set(artefact_kinds) - set(ARTEFACTS))
    if bad or not artefact_kinds:
        raise invalid_argument(f"artefact_kinds={list(artefact_kinds)}: expected some of {ARTEFACTS}")
    compounds = make_compounds(seed, n_moas, compounds_per_moa, directions=moa_directions)
    concentrations = tuple(float(c) for c in sorted(concentrations))
    treatments = [(c.compound, c.moa, d) for c in compounds.itertuples() for d in range(len(concentrations))]
    conditions = treatments * replicates + [(DMSO, DMSO, -1)] * n_controls
    n_wells = len(conditions)
    plate_format = 96 if n_wells <= 96 else 384
    if n_wells > plate_format:
        raise invalid_argument(f"{n_wells} wells per plate do not fit a 384-well plate; lower replicates or n_controls")
    wells = [well_at(i, plate_format, order="column") for i in range(n_wells)]
    rows = []
    for p in range(n_plates):
        plate = f"{name_prefix}-p{p + 1:02d}"
        order = stream_rng(seed, STREAM_LAYOUT, p).permutation(n_wells)
        for well, k in zip(wells, order):
            compound, moa, d = conditions[k]
            control = compound == DMSO
            conc = 0.0 if control else concentrations[d]
            rows.append({"plate": plate, "plate_idx": p, "well": well, "well_idx": well_index(well, plate_format),
                         "dose_rank": d,
                         "Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Compound": compound,
                         "Metadata_Concentration": conc, "Metadata_MOA": moa, "Metadata_Control": control,
                         "Metadata_Batch": f"batch{p + 1:02d}",
                         "Metadata_Treatment": DMSO if control else f"{compound}@{conc:g}",
                         "Metadata_RareFraction": 0.0 if control else float(rare_fraction)})
    layout = pd.DataFrame(rows).sort_values(["plate_idx", "well_idx"], kind="stable").reset_index(drop=True)
    return MoaScreen(seed=int(seed), compounds=compounds, layout=layout, concentrations=concentrations,
                     field_shape=tuple(int(v) for v in field_shape), fields_per_well=int(fields_per_well),
                     rare_fraction=float(rare_fraction), artefact_fraction=float(artefact_fraction),
                     artefact_kinds=tuple(artefact_kinds), strength=float(strength), plate_format=plate_format)


def synth_moa(
    out_dir: str,
    n_plates: int = 2,
    field_shape: tuple[int, int] = (128, 128),
    fields_per_well: int = 3,
    seed: int = 0,
    rare_fraction: float = 1.0,
    artefact_fraction: float = 0.1,
    storage_options: dict[str, Any] | None = None,
    *,
    name_prefix: str = "moa",
    ngff: str = "0.5",
    overwrite: bool = False,
    **design_kwargs: Any,
) -> list[str]:
    """Write a synthetic MOA screen as plates under ``out_dir``; returns the plate URIs.

    Defaults are a demo (2 plates x 48 wells x 3 fields of 128 x 128, ~300 fields); pass
    ``n_moas``, ``compounds_per_moa``, ``concentrations``, ``replicates``, ``n_controls``,
    ``artefact_kinds``, ``strength``, ``moa_directions`` (see :func:`design_moa_screen`) for larger screens.
    Plates are uint16 with channels ``DNA, Actin, Tubulin`` and the well annotations of
    :class:`MoaScreen`; per-field ground truth goes to ``<out_dir>/<plate>_fields.parquet``
    (columns ``plate, well, field, artefact, is_artefact, n_cells, n_responders``; read it
    back with :func:`load_moa_fields`). A rerun on an existing output resumes (complete
    wells are skipped) unless ``overwrite``.
    """
    # the design checks every argument: a bad one fails here, before any plate is created
    screen = design_moa_screen(seed, n_plates, field_shape=field_shape, fields_per_well=fields_per_well,
                               rare_fraction=rare_fraction, artefact_fraction=artefact_fraction,
                               name_prefix=name_prefix, **design_kwargs)
    create_plate = import_create_plate()
    uris = []
    for plate in screen.plates:
        annotations = screen.annotations(plate)
        uri = plate_uri(out_dir, plate)
        writer = create_plate(uri, name=plate, wells=annotations["Metadata_Well"].to_list(), channels=list(CHANNELS),
                              field_shape=screen.field_shape, dtype="uint16", field_count=fields_per_well,
                              annotations=annotations, ngff=ngff, storage_options=storage_options,
                              overwrite=overwrite)
        truth = []
        for well in annotations["Metadata_Well"]:
            done = writer.is_complete(well)
            for f in range(fields_per_well):
                image, info = screen.render_field(plate, well, f)
                if not done:
                    writer.write_field(well, f, image)
                truth.append(info)
            if not done:
                writer.complete_well(well, fields_per_well)
        write_table(pd.DataFrame(truth), join(out_dir, f"{plate}{FIELDS_SUFFIX}"), storage_options)
        uris.append(uri)
    return uris


def load_moa_fields(out_dir: str, plates: Sequence[str] | None = None,
                    storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The per-field ground truth written by :func:`synth_moa` (all plates, or ``plates``)."""
    return read_tables(out_dir, FIELDS_SUFFIX, plates, storage_options)
