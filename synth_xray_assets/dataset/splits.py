"""Splits of the dataset's images: a stratified validation split carved from a labelled set."""

from __future__ import annotations

import math

import numpy as np


def class_count(n: int, fraction: float) -> int:
    """``fraction`` of ``n``, rounded half up (10% of 3875 is 388, as the study's 522 needs)."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into sorted ``(keep_idx, val_idx)`` with ``fraction`` of each class in ``val_idx``.

    Each class with at least two images gives at least one to validation when ``fraction > 0``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = [np.zeros(0, np.int64)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_val = class_count(len(idx), fraction)
        if fraction > 0 and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val.append(rng.choice(idx, size=n_val, replace=False))
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    keep_idx = np.setdiff1d(np.arange(len(labels)), val_idx).astype(np.int64)
    return keep_idx, val_idx
