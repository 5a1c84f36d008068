"""The training curves of one classifier run, as a PNG beside its weights."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from synth_xray_assets.storage import write_bytes_atomic  # noqa: E402


def run_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """One run: training loss and validation accuracy per epoch (and test accuracy when recorded)."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 2.8))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    left.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    left.set_title("loss", fontsize=9)
    right.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    right.plot(epochs, [h["train_accuracy"] for h in history], marker=".", alpha=0.6, label="train")
    if any("test_accuracy" in h for h in history):
        right.plot(epochs, [h.get("test_accuracy", np.nan) for h in history], marker="x", label="test")
    right.set_title("accuracy", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())
