"""Figures of the report: pure functions from arrays / DataFrames to matplotlib figures.

Nothing here reads files. Figures are built with :class:`matplotlib.figure.Figure`
directly (not ``pyplot``), so no global backend or figure registry is touched: the
Agg canvas renders them to PNG (:func:`to_png`) in any thread or Ray worker, with no
display.

The array helpers (:func:`plate_layout`, :func:`well_grid`, :func:`top_fields`,
:func:`to_rgb`, :func:`upsample_nearest`, :func:`embed_2d`, :func:`qc_per_plate`) hold
the logic the tests check by hand; the figure functions only draw their results.
"""

from __future__ import annotations

import io
import string
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Plate formats by (rows, columns); the smallest that holds every well is drawn, so
# empty wells show as gaps at their true place.
PLATE_FORMATS = ((2, 3), (4, 6), (8, 12), (16, 24), (32, 48))

# Additive colours of channels 0, 1, 2, ... in composites (DNA first: blue, as in
# Cell Painting viewers; then green, red, magenta, cyan, yellow).
CHANNEL_COLOURS = np.array([(0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (0, 1, 1), (1, 1, 0)], dtype=float)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """PNG bytes of a figure (Agg canvas, no display needed).

    Text is drawn as written: titles and legends carry plate, compound and MOA names, and
    matplotlib would read ``$...$`` in them as maths (``P$1_$2`` failed to render, and the
    report lost the section); no figure here uses maths text."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


# --------------------------------------------------------------------------- plate maps


def row_label(index: int) -> str:
    """0 -> "A", 25 -> "Z", 26 -> "AA" (1536-well plates have rows AA..AF)."""
    letters = string.ascii_uppercase
    return letters[index] if index < 26 else letters[index // 26 - 1] + letters[index % 26]


def row_index(label: str) -> int:
    """Inverse of :func:`row_label`."""
    label = str(label).upper()
    if len(label) == 1:
        return ord(label) - ord("A")
    return (ord(label[0]) - ord("A") + 1) * 26 + ord(label[1]) - ord("A")


def plate_layout(rows: Sequence[str], columns: Sequence[int]) -> tuple[list[str], list[int]]:
    """Row and column labels of the smallest standard plate holding these wells.

    rows: row letters of the wells ("A", "P", "AF"); columns: 1-based column numbers.
    Wells beyond a 1536-well plate widen the grid to fit them.
    """
    n_rows = max((row_index(r) + 1 for r in rows), default=1)
    n_cols = max((int(c) for c in columns), default=1)
    for fr, fc in PLATE_FORMATS:
        if n_rows <= fr and n_cols <= fc:
            n_rows, n_cols = fr, fc
            break
    return [row_label(i) for i in range(n_rows)], list(range(1, n_cols + 1))


def well_grid(rows: Sequence[str], columns: Sequence[int], values: Sequence[float]
              ) -> tuple[np.ndarray, list[str], list[int]]:
    """Per-well values laid out as a plate: (grid (R, C) float, row labels, column labels).

    Wells without a value are NaN. rows/columns/values have one entry per well.
    """
    row_labels, col_labels = plate_layout(rows, columns)
    grid = np.full((len(row_labels), len(col_labels)), np.nan)
    for r, c, v in zip(rows, columns, values):
        grid[row_index(r), int(c) - 1] = v
    return grid, row_labels, col_labels


def plate_heatmap(grid: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[int], *, title: str,
                  vmin: float | None = 0.0, vmax: float | None = 1.0, label: str = "score",
                  cmap: str = "viridis") -> Figure:
    """A plate map of a (R, C) grid of well values (NaN = no well, drawn grey)."""
    n_rows, n_cols = grid.shape
    fig = Figure(figsize=(max(4.0, 0.32 * n_cols + 1.5), max(2.5, 0.32 * n_rows + 1.0)))
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="equal")
    step = 1 if n_cols <= 24 else 4  # keep 1536-well labels legible
    ax.set_xticks(range(0, n_cols, step), [str(c) for c in col_labels[::step]], fontsize=7)
    ax.set_yticks(range(0, n_rows, step if n_rows > 16 else 1),
                  list(row_labels[::step if n_rows > 16 else 1]), fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=10, pad=18)
    fig.colorbar(im, ax=ax, label=label, fraction=0.04)
    return fig


# --------------------------------------------------------------------------- fields and saliency


def top_fields(scores: np.ndarray, k: int, status: np.ndarray | None = None) -> list[tuple[int, int, float]]:
    """The k highest field scores as (well index, field index, score), best first.

    scores: (W, F) with NaN where no field was scored; status: (W, F) ``field_status``
    (only 0, read and scored, counts). Ties keep (well, field) order.
    """
    s = np.asarray(scores, dtype=float)
    valid = np.isfinite(s)
    if status is not None:
        valid &= np.asarray(status) == 0
    w, f = np.nonzero(valid)
    order = np.argsort(-s[w, f], kind="stable")[:max(int(k), 0)]
    return [(int(w[i]), int(f[i]), float(s[w[i], f[i]])) for i in order]


def to_rgb(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """A (C, Y, X) field as a (Y, X, 3) float RGB in [0, 1] for display.

    Each channel is stretched between its own low/high percentiles (microscopy channels
    differ by orders of magnitude); one channel is grey, several are blended additively
    in :data:`CHANNEL_COLOURS` (blue, green, red, ...) and clipped.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected a (C, Y, X) field, got shape {image.shape}")
    lo = np.nanpercentile(image, percentiles[0], axis=(1, 2), keepdims=True)
    hi = np.nanpercentile(image, percentiles[1], axis=(1, 2), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.clip((image - lo) / span, 0.0, 1.0)
    if scaled.shape[0] == 1:
        return np.repeat(scaled[0][..., None], 3, axis=-1)
    colours = CHANNEL_COLOURS[np.arange(scaled.shape[0]) % len(CHANNEL_COLOURS)]  # (C, 3)
    return np.clip(np.einsum("cyx,ck->yxk", scaled, colours), 0.0, 1.0)


def upsample_nearest(array: np.ndarray, shape: tuple[int, int], factor: int | None = None) -> np.ndarray:
    """Nearest-neighbour resize of a (y, x) map to (Y, X) (saliency is stored downsampled;
    overlays need field size). With ``factor`` (the map's block size, infer's
    ``saliency_downsample``) pixel (i, j) takes the block holding it, ``array[i // factor,
    j // factor]``; without, the map is spread evenly: ``array[i * y // Y, j * x // X]``."""
    array = np.asarray(array)
    y, x = array.shape
    Y, X = shape
    if factor:
        rows, cols = np.minimum(np.arange(Y) // factor, y - 1), np.minimum(np.arange(X) // factor, x - 1)
    else:
        rows, cols = np.arange(Y) * y // Y, np.arange(X) * x // X
    return array[rows[:, None], cols[None, :]]


def saliency_figure(image: np.ndarray, saliency: np.ndarray | None, mask: np.ndarray | None = None, *,
                    title: str = "", channels: Sequence[str] | None = None, factor: int | None = None) -> Figure:
    """Raw field beside its saliency overlay (and the mask outline where given).

    image: (C, Y, X) raw field; saliency: (y, x) map (any scale; NaN allowed); mask: (y, x) 0/1;
    factor: field pixels per map pixel (:func:`upsample_nearest`).
    """
    rgb = to_rgb(image)
    shape = rgb.shape[:2]
    panels = 1 + (saliency is not None)
    fig = Figure(figsize=(3.2 * panels, 3.4))
    ax = fig.add_subplot(1, panels, 1)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_title("raw" + (f" ({', '.join(channels)})" if channels else ""), fontsize=8)
    ax.set_axis_off()
    if saliency is not None:
        sal = upsample_nearest(np.asarray(saliency, dtype=float), shape, factor)
        top = np.nanmax(sal) if np.isfinite(sal).any() else 0.0
        sal = np.nan_to_num(sal / top if top > 0 else sal)
        ax = fig.add_subplot(1, panels, 2)
        ax.imshow(rgb.mean(axis=-1), cmap="gray", interpolation="nearest")
        ax.imshow(sal, cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
        if mask is not None and np.any(mask):
            ax.contour(upsample_nearest(np.asarray(mask, dtype=float), shape, factor), levels=[0.5], colors="cyan",
                       linewidths=0.8)
        ax.set_title("saliency" + (" + mask" if mask is not None and np.any(mask) else ""), fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def thumbnails(images: Sequence[np.ndarray], titles: Sequence[str], *, columns: int = 4) -> Figure:
    """A grid of (C, Y, X) fields as RGB thumbnails with titles (QC examples)."""
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows))
    for i, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(to_rgb(image), interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------- training


def curve_columns(metrics: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(loss columns, score columns) of a metrics.csv table: ``*loss*`` columns, and the
    ``val_*`` metrics that are not losses (accuracy, F1, ROC AUC: all in [0, 1])."""
    cols = [c for c in metrics.columns if c not in ("epoch", "seconds")]
    losses = [c for c in cols if "loss" in c]
    # counts (val_samples) and times are no scores: they would draw off the [0, 1] axis
    scores = [c for c in cols if c.startswith("val_") and "loss" not in c and not c.endswith(("_samples", "_seconds"))]
    return losses, scores


def training_curves(metrics: pd.DataFrame, *, title: str = "training") -> Figure:
    """Loss and validation metrics per epoch from a metrics.csv table (one row per epoch)."""
    losses, scores = curve_columns(metrics)
    x = metrics["epoch"].to_numpy() if "epoch" in metrics else np.arange(1, len(metrics) + 1)
    fig = Figure(figsize=(9, 3.4))
    ax = fig.add_subplot(1, 2, 1)
    for c in losses:
        ax.plot(x, metrics[c].to_numpy(dtype=float), marker="o", ms=3, label=c)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss", fontsize=9)
    if losses:
        ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    for c in scores:
        ax.plot(x, metrics[c].to_numpy(dtype=float), marker="o", ms=3, label=c.removeprefix("val_"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("validation", fontsize=9)
    if scores:
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    return fig


# --------------------------------------------------------------------------- profiles


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def embed_2d(profiles: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(n, d) profiles -> (n, 2) coordinates by PCA (or UMAP, when installed).

    Features that are NaN in every profile are dropped; a profile with any other NaN
    gets NaN coordinates and takes no part in the fit. A single usable feature gets a
    zero second axis; fewer than 2 usable profiles give zeros.
    """
    X = np.asarray(profiles, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"expected (n, d) profiles, got shape {X.shape}")
    X = X[:, ~np.isnan(X).all(axis=0)] if X.shape[0] else X
    ok = np.isfinite(X).all(axis=1)
    out = np.full((X.shape[0], 2), np.nan)
    Xok = X[ok]
    n, d = Xok.shape
    if n < 2 or d == 0:
        out[ok] = 0.0
        return out
    if method == "umap":
        import umap

        out[ok] = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(Xok)
        return out
    if method != "pca":
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")
    from sklearn.decomposition import PCA

    k = min(2, n, d)
    coords = PCA(n_components=k, random_state=seed).fit_transform(Xok)
    out[ok] = np.hstack([coords, np.zeros((n, 2 - k))]) if k < 2 else coords
    return out


def scatter_by(coords: np.ndarray, labels: Sequence, *, title: str, axes: tuple[str, str] = ("PC1", "PC2"),
               max_legend: int = 20) -> Figure:
    """A 2-D scatter of (n, 2) coordinates coloured by a categorical label per point."""
    labels = pd.Series(list(labels), dtype="object").fillna("(none)").astype(str)
    cats = sorted(labels.unique())
    fig = Figure(figsize=(6.5 if len(cats) <= max_legend else 5, 4.5))
    ax = fig.add_subplot()
    cmap = _categorical_colours(len(cats))
    for i, cat in enumerate(cats):
        sel = (labels == cat).to_numpy()
        ax.scatter(coords[sel, 0], coords[sel, 1], s=14, color=cmap[i], label=cat, alpha=0.85, linewidths=0)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title, fontsize=10)
    if len(cats) <= max_legend:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        ax.text(1.01, 0.5, f"{len(cats)} categories", transform=ax.transAxes, fontsize=7)
    return fig


def _categorical_colours(n: int) -> np.ndarray:
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "hsv"
    cmap = colormaps[name]
    return cmap(np.arange(n) % cmap.N) if name != "hsv" else cmap(np.linspace(0, 1, n, endpoint=False))


# --------------------------------------------------------------------------- evaluation and QC


def confusion_figure(confusion: pd.DataFrame, *, title: str = "NSC confusion (rows: true MOA)") -> Figure:
    """A confusion matrix of counts (rows true, columns predicted), coloured by row fraction."""
    counts = confusion.to_numpy(dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n_r, n_c = counts.shape
    fig = Figure(figsize=(max(4.0, 0.55 * n_c + 2.5), max(3.5, 0.5 * n_r + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n_c), [str(c) for c in confusion.columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n_r), [str(r) for r in confusion.index], fontsize=7)
    for i in range(n_r):
        for j in range(n_c):
            if counts[i, j]:
                ax.text(j, i, f"{counts[i, j]:g}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="fraction of row", fraction=0.04)
    return fig


def qc_per_plate(fields: pd.DataFrame, plate: str = "Metadata_Plate", flagged: str = "flagged") -> pd.DataFrame:
    """Flagged fields per plate from one row per field: columns ``plate``, ``n_fields``,
    ``n_flagged``, ``fraction`` (sorted by plate)."""
    flags = fields[flagged].astype(bool)
    out = (pd.DataFrame({"plate": fields[plate].astype(str).to_numpy(), "flag": flags.to_numpy()})
           .groupby("plate", sort=True)["flag"].agg(n_fields="size", n_flagged="sum").reset_index())
    out["n_flagged"] = out["n_flagged"].astype(int)
    out["fraction"] = out["n_flagged"] / out["n_fields"]
    return out


QC_MAX_BARS = 40  # a bar per plate stays readable up to here; a 2000-plate screen made a 78,000 px wide PNG


def qc_figure(summary: pd.DataFrame) -> Figure:
    """Bars of flagged fields per plate (a :func:`qc_per_plate` table); of a screen with more
    than :data:`QC_MAX_BARS` plates, the plates with the most flagged fields."""
    title = "QC: flagged fields per plate"
    if len(summary) > QC_MAX_BARS:
        title = f"QC: the {QC_MAX_BARS} of {len(summary)} plates with the most flagged fields"
        summary = summary.sort_values(["n_flagged", "plate"], ascending=[False, True]).head(QC_MAX_BARS)
    fig = Figure(figsize=(max(4.0, 0.5 * len(summary) + 2), 3.2))
    ax = fig.add_subplot()
    x = np.arange(len(summary))
    ax.bar(x, summary["n_flagged"].to_numpy(), color="tab:red")
    ax.set_xticks(x, summary["plate"].tolist(), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("flagged fields")
    for xi, (n, tot) in enumerate(zip(summary["n_flagged"], summary["n_fields"])):
        ax.text(xi, n, f"{n}/{tot}", ha="center", va="bottom", fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig
