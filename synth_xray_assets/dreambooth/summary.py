"""Small summaries of a training run for the UI: smoothed loss and the loss curve."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from PIL import Image


def smoothed(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (the smoothing TensorBoard shows), with pandas' ``ewm``."""
    return [float(v) for v in pd.Series(values, dtype=float).ewm(alpha=alpha, adjust=False).mean()]


def loss_curve(
    losses: Sequence[float], title: str, prior: Sequence[float] | None = None, resumed_at: int = 0
) -> Image.Image:
    """A small PNG-ready plot of per-step loss, its moving average and the prior term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=90)
    ax.plot(steps, losses, color="0.75", lw=0.8, label="loss")
    ax.plot(steps, smoothed(losses), color="C0", lw=1.5, label="smoothed")
    if prior is not None and any(prior):
        ax.plot(steps, smoothed(prior), color="C1", lw=1.0, label="prior term (smoothed)")
    if resumed_at:
        ax.axvline(resumed_at, color="C3", ls="--", lw=0.8, label=f"resumed at {resumed_at}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue()))
