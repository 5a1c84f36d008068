"""Small summaries of a training run for the UI: smoothed loss, the loss curve, folder versions."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from synth_xray_assets.storage import combined_hash, sha256_file


def smoothed(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (the smoothing TensorBoard shows)."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else (1 - alpha) * avg + alpha * v
        out.append(float(avg))
    return out


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


def folder_version(
    folder: str | Path, patterns: Sequence[str] = ("**/*.safetensors", "**/*config*.json", "model_index.json")
) -> str:
    """A content hash of a model folder's weights and configs (its data version)."""
    folder = Path(folder)
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"no model files in {folder}")
    return combined_hash([f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files])[:16]
