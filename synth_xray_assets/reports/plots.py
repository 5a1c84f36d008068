"""The study's four figures, from the results table and the runs, written atomically as PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from synth_xray_assets.classifier.train import RunResult  # noqa: E402
from synth_xray_assets.settings import CLASS_NAMES  # noqa: E402
from synth_xray_assets.storage import write_bytes_atomic  # noqa: E402

HEATMAP_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def _save(fig: plt.Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def accuracy_comparison(table: pd.DataFrame, path: Path) -> Path:
    """Bars per experiment: ours (selected, last epoch; mean +- std over seeds) beside the study's."""
    names = list(table["experiment"])
    x = np.arange(len(names))
    bars = [
        ("ours, selected epoch", table["accuracy_mean"], table["accuracy_std"], "#1f77b4"),
        ("ours, last epoch", table["last_accuracy_mean"], table["last_accuracy_std"], "#aec7e8"),
        ("study, reported (test-selected)", table["published_accuracy"], None, "#d62728"),
        ("study, last epoch", table["published_last_accuracy"], None, "#ff9896"),
    ]
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(names)), 4.2))
    for i, (label, mean, std, color) in enumerate(bars):
        values = 100 * pd.to_numeric(mean, errors="coerce").to_numpy(dtype=float)
        err = (
            None if std is None else 100 * np.nan_to_num(pd.to_numeric(std, errors="coerce").to_numpy(float))
        )
        ax.bar(x + (i - 1.5) * width, values, width, yerr=err, capsize=2, label=label, color=color)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    finite = 100 * pd.concat([table[c] for c in ("accuracy_mean", "published_accuracy")]).astype(float)
    low = np.nanmin(finite.to_numpy()) if finite.notna().any() else 0.0
    ax.set_ylim(max(0.0, low - 15), 100)
    ax.set_title("Test accuracy per experiment")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def training_curves(runs_by_experiment: dict[str, list[RunResult]], path: Path) -> Path:
    """Train loss and validation accuracy per epoch (mean over seeds); test accuracy when recorded."""
    has_test = any(
        "test_accuracy" in h for runs in runs_by_experiment.values() for r in runs for h in r.history
    )
    panels = [("train_loss", "training loss"), ("val_accuracy", "validation accuracy")]
    if has_test:
        panels.append(("test_accuracy", "test accuracy (used for selection)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for name, runs in runs_by_experiment.items():
        epochs = min(len(r.history) for r in runs)
        for ax, (key, title) in zip(axes, panels, strict=True):
            values = [[h.get(key, np.nan) for h in r.history[:epochs]] for r in runs]
            ax.plot(np.arange(1, epochs + 1), np.nanmean(np.array(values, dtype=float), axis=0), label=name)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Training curves (mean over seeds)")
    return _save(fig, path)


def confusion_matrices(
    table: pd.DataFrame, runs_by_experiment: dict[str, list[RunResult]], path: Path
) -> Path:
    """One confusion matrix per experiment at the selected epoch, mean over seeds."""
    names = list(table["experiment"])
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        cm = np.mean(
            [np.array(r.test_selected["confusion"], dtype=float) for r in runs_by_experiment[name]], 0
        )
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            text = f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks([0, 1], CLASS_NAMES, fontsize=7)
        ax.set_yticks([0, 1], CLASS_NAMES, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{name} (n seeds = {len(runs_by_experiment[name])})", fontsize=9)
    fig.suptitle("Confusion matrices on the test set (selected epoch, mean over seeds)")
    fig.tight_layout()
    return _save(fig, path)


def metrics_heatmap(table: pd.DataFrame, path: Path) -> Path:
    """Experiments x metrics (mean over seeds, selected epoch), annotated."""
    values = np.array([[float(v) for v in table[f"{m}_mean"]] for m in HEATMAP_METRICS]).T
    fig, ax = plt.subplots(figsize=(1.2 * len(HEATMAP_METRICS) + 2, 0.5 * len(table) + 1.5))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0.5, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(HEATMAP_METRICS)), HEATMAP_METRICS)
    ax.set_yticks(range(len(table)), list(table["experiment"]))
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title("Test metrics (selected epoch, mean over seeds)")
    return _save(fig, path)
