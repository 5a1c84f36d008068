"""Small summaries of a training run for the UI: smoothed loss, the loss curve; folder versions,
hashed once when a model folder is written and read back after."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from synth_xray_assets.storage import combined_hash, sha256_file, write_json_atomic


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


MODEL_FILE_PATTERNS = ("**/*.safetensors", "**/*config*.json", "model_index.json")
VERSION_FILE = ".content-version.json"  # inside the folder: its hash and the files' sizes and times


def _model_files(folder: Path, patterns: Sequence[str]) -> list[Path]:
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"no model files in {folder}")
    return files


def _listing(folder: Path, files: list[Path]) -> dict[str, list[int]]:
    """Each file's size and modification time: what must be unchanged for a stored hash to hold."""
    out = {}
    for p in files:
        st = p.stat()
        out[str(p.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return out


def write_folder_version(folder: str | Path, patterns: Sequence[str] = MODEL_FILE_PATTERNS) -> str:
    """Hash a model folder's weights and configs once and store the hash in it (``VERSION_FILE``).

    Call it where the folder is written (inside its atomic write): later readers get the hash
    from :func:`folder_version` without re-reading gigabytes of weights.
    """
    folder = Path(folder)
    files = _model_files(folder, patterns)
    version = combined_hash([f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files])[:16]
    record = {"version": version, "patterns": list(patterns), "files": _listing(folder, files)}
    write_json_atomic(folder / VERSION_FILE, record)
    return version


def folder_version(folder: str | Path, patterns: Sequence[str] = MODEL_FILE_PATTERNS) -> str:
    """A content hash of a model folder's weights and configs (its data version).

    Read from the folder's ``VERSION_FILE`` when its files still have the recorded sizes and
    modification times; otherwise hashed (and stored, where the folder is writable).
    """
    folder = Path(folder)
    files = _model_files(folder, patterns)
    try:
        record = json.loads((folder / VERSION_FILE).read_text())
        if record.get("patterns") == list(patterns) and record.get("files") == _listing(folder, files):
            return str(record["version"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        return write_folder_version(folder, patterns)
    except OSError:  # a read-only folder: hash without storing
        return combined_hash([f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files])[:16]
