"""Does a synthetic image copy a training image? Nearest real neighbours in two senses.

For every synthetic image: the nearest real training image by cosine distance in the
chest-X-ray feature space, and the nearest by pixel (Pearson) correlation at
``memorization_pixel_size``. With ``memorization_centered`` both are taken after subtracting
the real images' mean (mean feature, mean image): radiographs share most of their anatomy, so
raw pixel correlation between *different* real patients is often above 0.95 and raw cosine
between pooled ReLU features is within ~0.002, while a copy stays at correlation 1 and
distance 0 either way. Either value past its threshold marks a near-copy; the columns say
which. The same search among the real images themselves (leave-one-out) gives the baseline:
how close different real radiographs come to each other (the real dataset's duplicates show
up there).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from synth_xray_assets.settings import EvaluationSettings
from synth_xray_assets.storage import image_grid

COLUMNS = (
    "synthetic_index",
    "nearest_real_index",
    "cosine_distance",
    "nearest_real_index_pixel",
    "pixel_correlation",
    "near_copy_feature",
    "near_copy_pixel",
    "near_copy",
)
_CHUNK = 512  # query rows per similarity block


def nearest_real_images(
    synthetic: np.ndarray,
    real: np.ndarray,
    synthetic_features: np.ndarray,
    real_features: np.ndarray,
    settings: EvaluationSettings,
) -> pd.DataFrame:
    """One row per synthetic image: the position in ``real`` of its nearest real image by feature
    cosine distance and by pixel correlation, both values, and the near-copy flags (:data:`COLUMNS`)."""
    if len(synthetic) != len(synthetic_features) or len(real) != len(real_features):
        raise ValueError("images and features must have the same length")
    if len(real) == 0:
        raise ValueError("no real images to compare with")
    return _table(*_search(synthetic, real, synthetic_features, real_features, settings, False), settings)


def real_baseline(real: np.ndarray, real_features: np.ndarray, settings: EvaluationSettings) -> pd.DataFrame:
    """The same table for each real image against the *other* real images (leave-one-out).

    Byte-identical duplicates in the real set (the dataset has a few) show up here as copies.
    """
    if len(real) < 2:
        raise ValueError("the baseline needs at least 2 real images")
    table = _table(*_search(real, real, real_features, real_features, settings, True), settings)
    return table.rename(columns={"synthetic_index": "real_index"})


def memorization_summary(
    table: pd.DataFrame, settings: EvaluationSettings, baseline: pd.DataFrame | None = None
) -> dict[str, Any]:
    """Small JSON-able facts for metadata: counts of near-copies and the closest distances."""
    out: dict[str, Any] = {
        "n_synthetic": len(table),
        "n_near_copies": int(table["near_copy"].sum()),
        "n_near_copies_feature": int(table["near_copy_feature"].sum()),
        "n_near_copies_pixel": int(table["near_copy_pixel"].sum()),
        "min_cosine_distance": float(table["cosine_distance"].min()),
        "median_cosine_distance": float(table["cosine_distance"].median()),
        "max_pixel_correlation": float(table["pixel_correlation"].max()),
        "median_pixel_correlation": float(table["pixel_correlation"].median()),
        "cosine_threshold": settings.memorization_cosine_threshold,
        "pixel_threshold": settings.memorization_pixel_threshold,
        "centered": settings.memorization_centered,
        "pixel_size": settings.memorization_pixel_size,
    }
    if baseline is not None:
        out.update(
            real_vs_real_n=len(baseline),
            real_vs_real_median_cosine_distance=float(baseline["cosine_distance"].median()),
            real_vs_real_median_pixel_correlation=float(baseline["pixel_correlation"].median()),
            real_vs_real_near_copies=int(baseline["near_copy"].sum()),
        )
    return out


@dataclass(frozen=True)
class PairsView:
    """Which closest pairs to show (``by`` which measure, how many) and how: tile size, pairs per row."""

    by: str = "cosine_distance"
    n: int = 8
    cell: int = 96
    pairs_per_row: int = 4


def closest_pairs_image(
    synthetic: np.ndarray, real: np.ndarray, table: pd.DataFrame, view: PairsView = PairsView()
) -> Image.Image:
    """The ``view.n`` closest pairs side by side (synthetic left, its nearest real image right).

    ``by="cosine_distance"``: nearest in feature space, real tile labelled ``d=`` (red past the
    threshold); ``by="pixel_correlation"``: nearest by pixels, labelled ``r=``.
    """
    by, n, cell = view.by, view.n, view.cell
    if by == "cosine_distance":
        rows, real_col, flag = table.nsmallest(n, by), "nearest_real_index", "near_copy_feature"
    elif by == "pixel_correlation":
        rows, real_col, flag = table.nlargest(n, by), "nearest_real_index_pixel", "near_copy_pixel"
    else:
        raise ValueError(f"by must be 'cosine_distance' or 'pixel_correlation', not {by!r}")
    images: list[np.ndarray] = []
    for row in rows.itertuples(index=False):
        images += [synthetic[row.synthetic_index], real[getattr(row, real_col)]]
    columns = 2 * max(1, min(view.pairs_per_row, len(rows)))
    grid = image_grid(images, columns=columns, cell=cell)
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows.itertuples(index=False)):
        x, y = (2 * i % columns + 1) * cell, (2 * i // columns + 1) * cell
        draw.rectangle((x, y - 12, x + cell, y), fill="black")
        value = getattr(row, by)
        label = f"d={value:.4f}" if by == "cosine_distance" else f"r={value:.4f}"
        draw.text((x + 2, y - 12), label, fill="red" if getattr(row, flag) else "white")
    return grid


def memorization_histogram(
    table: pd.DataFrame, settings: EvaluationSettings, baseline: pd.DataFrame | None = None
) -> Image.Image:
    """Histograms of nearest-neighbour cosine distance and pixel correlation, thresholds marked,
    real-vs-real baseline overlaid when given (matplotlib Agg, no global backend change)."""
    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    panels = (
        (
            "cosine_distance",
            settings.memorization_cosine_threshold,
            "feature cosine distance to nearest real",
        ),
        ("pixel_correlation", settings.memorization_pixel_threshold, "pixel correlation with nearest real"),
    )
    for ax, (column, threshold, title) in zip(fig.subplots(1, 2), panels, strict=True):
        values = [table[column].to_numpy()]
        if baseline is not None:
            values.append(baseline[column].to_numpy())
        low = min(float(np.min(v)) for v in values + [np.array([threshold])])
        high = max(float(np.max(v)) for v in values + [np.array([threshold])])
        bins = np.linspace(low, high if high > low else low + 1e-6, 30)
        ax.hist(values[0], bins=bins, alpha=0.7, label=f"synthetic (n={len(values[0])})")
        if baseline is not None:
            ax.hist(values[1], bins=bins, alpha=0.5, label=f"real vs other real (n={len(values[1])})")
        ax.axvline(threshold, color="red", linestyle="--", label="near-copy threshold")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


# --------------------------------------------------------------------------- internals


def _table(
    cos_idx: np.ndarray,
    cos_dist: np.ndarray,
    pix_idx: np.ndarray,
    pix_corr: np.ndarray,
    settings: EvaluationSettings,
) -> pd.DataFrame:
    near_feature = cos_dist < settings.memorization_cosine_threshold
    near_pixel = pix_corr > settings.memorization_pixel_threshold
    table = pd.DataFrame(
        {
            "synthetic_index": np.arange(len(cos_idx)),
            "nearest_real_index": cos_idx,
            "cosine_distance": cos_dist.astype(np.float64),
            "nearest_real_index_pixel": pix_idx,
            "pixel_correlation": pix_corr.astype(np.float64),
            "near_copy_feature": near_feature,
            "near_copy_pixel": near_pixel,
            "near_copy": near_feature | near_pixel,
        }
    )
    return table[list(COLUMNS)]


def _search(
    queries: np.ndarray,
    keys: np.ndarray,
    query_features: np.ndarray,
    key_features: np.ndarray,
    settings: EvaluationSettings,
    exclude_self: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest key of every query: by feature cosine distance, and by pixel correlation."""
    qf, kf = (torch.from_numpy(np.asarray(f, dtype=np.float64)) for f in (query_features, key_features))
    kp = _pixel_rows(keys, settings.memorization_pixel_size)
    qp = kp if queries is keys else _pixel_rows(queries, settings.memorization_pixel_size)  # once
    if settings.memorization_centered:  # centre on the real (key) images' mean feature and mean image
        qf, kf = qf - kf.mean(0), kf - kf.mean(0)
        qp, kp = qp - kp.mean(0), kp - kp.mean(0)
    cos_idx, cos_sim = _nearest(_unit_rows(qf), _unit_rows(kf), exclude_self)
    # Pearson correlation: each row to zero mean, then a dot product of unit rows.
    pix_idx, pix_corr = _nearest(
        _unit_rows(qp - qp.mean(1, keepdim=True)), _unit_rows(kp - kp.mean(1, keepdim=True)), exclude_self
    )
    return cos_idx, np.clip(1.0 - cos_sim, 0.0, 2.0), pix_idx, np.clip(pix_corr, -1.0, 1.0)


def _pixel_rows(images: np.ndarray, size: int, chunk: int = _CHUNK) -> torch.Tensor:
    """Grayscale images as float64 rows of ``size`` x ``size`` pixels (antialiased resize).

    Converted ``chunk`` images at a time, so memory stays bounded by the small output plus one
    chunk in float32 (3875 images of 512 px at once were about 4 GB; 512 at a time, 0.5 GB).
    """
    images = np.asarray(images) if not isinstance(images, np.ndarray) else images
    out = torch.empty((len(images), size * size), dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(np.asarray(images[start : start + chunk])).float()
        if x.ndim == 4:  # [N, H, W, 3]
            x = x.mean(dim=-1)
        x = x.unsqueeze(1)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = x.flatten(1).double()
    return out


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero: similarity 0


def _nearest(queries: torch.Tensor, keys: torch.Tensor, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index and value of the largest dot product of each (unit) query row with the (unit) keys."""
    best_idx, best_val = [], []
    for start in range(0, len(queries), _CHUNK):
        sim = queries[start : start + _CHUNK] @ keys.T
        if exclude_self:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = -torch.inf
        val, idx = sim.max(dim=1)
        best_idx.append(idx)
        best_val.append(val)
    return torch.cat(best_idx).numpy(), torch.cat(best_val).numpy()
