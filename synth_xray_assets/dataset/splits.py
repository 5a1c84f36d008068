"""Splits of the real training images shared by every domain: validation by patient, real subsets.

Kermany file names carry the patient (``person123_bacteria_456.jpeg``,
``IM-0001-0001.jpeg``, ``NORMAL2-IM-1427-0001.jpeg``), and many patients have several
images; a per-image split would put one patient on both sides. :func:`validation_split`
therefore carves the classifiers' validation split by patient, stratified by class, when the
source's names carry a patient, and per image (saying so) when they do not.

The same split is used by the classifiers (epoch selection), the chest-X-ray feature
extractor and DreamBooth (which fine-tunes on real train *minus* this split), so that no
generator ever sees an image the classifiers are validated on.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from synth_xray_assets.partitions import parse_generator_key
from synth_xray_assets.settings import CLASS_KEYS, Settings

# The three Kermany forms; group 1 (person) or group 2 (IM-xxxx, with NORMAL2- prefix) is the patient.
_PATIENT = re.compile(
    r"^(?:(person\d+)_(?:bacteria|virus)_\d+(?:_\d+)*|((?:NORMAL\d+-)?IM-\d+)(?:-\d+)+)\.[a-z]+$",
    re.IGNORECASE,
)


def patient_id(file_name: str | None) -> str | None:
    """The patient in a Kermany file name (``person123``, ``IM-0001``, ``NORMAL2-IM-1427``), else None."""
    if not file_name:
        return None
    m = _PATIENT.match(PurePosixPath(file_name).name)
    return None if m is None else (m.group(1) or m.group(2))


def file_name_of(source_id: str) -> str | None:
    """The file name in a dataset manifest's ``source_id`` (``train/12:IM-0001-0001.jpeg``), if any."""
    _, sep, rest = str(source_id).partition(":")
    return rest.split(" (")[0] or None if sep else None


def class_count(n: int, fraction: float) -> int:
    """``fraction`` of ``n``, rounded half up (10% of 3875 is 388, as the study's 522 needs)."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per image into sorted ``(keep_idx, val_idx)``, ``fraction`` of each class in val.

    Each class with at least two images gives at least one to validation when ``fraction > 0``.
    """
    labels = np.asarray(labels)
    return grouped_stratified_split(labels, np.arange(len(labels)), fraction, seed)


def grouped_stratified_split(
    labels: np.ndarray, groups: Sequence[Any] | np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ``(keep_idx, val_idx)`` with whole groups (patients) on one side, stratified by class.

    A group's class is its most frequent label. Per class, groups are taken in a seeded random
    order while they fit into ``fraction`` of the class's images (rounded half up); at least
    one group goes to validation when ``fraction > 0`` and the class has two groups or more,
    and at least one group always stays. With one image per group this is a per-image split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels).astype(np.int64)
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups, dtype=object)), sort=False)
    if len(codes) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(codes)} group ids")
    sizes = np.bincount(codes, minlength=len(uniques))
    majority = np.array([np.bincount(labels[codes == g]).argmax() for g in range(len(uniques))], np.int64)
    rng = np.random.default_rng(seed)
    val_groups: list[int] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(majority == cls)
        target = class_count(int(sizes[members].sum()), fraction)
        taken, chosen = 0, []
        for g in rng.permutation(members):
            if len(chosen) >= len(members) - 1:
                break
            if taken + sizes[g] <= target:
                chosen.append(int(g))
                taken += int(sizes[g])
        if fraction > 0 and not chosen and len(members) >= 2:
            chosen.append(int(members[np.argmin(sizes[members])]))
        val_groups += chosen
    in_val = np.isin(codes, val_groups)
    return np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64)


@dataclass(frozen=True)
class ValidationSplit:
    """The classifiers' validation split of real train, and how it was drawn.

    ``keep``/``val``: sorted row positions in the train split. ``unit``: ``patient`` (names
    carry one), ``image`` (they do not) or ``none`` (nothing carved: the study's protocol).
    ``straddled_per_image``: patients a per-image split with the same fraction and seed would
    have put on both sides (None when names carry no patient).
    """

    keep: np.ndarray
    val: np.ndarray
    unit: str
    n_patients_keep: int
    n_patients_val: int
    n_images_without_patient: int
    straddled_per_image: int | None

    def summary(self) -> dict[str, Any]:
        """The split's counts for metadata and the report (no index arrays)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("keep", "val")}
        return {**out, "n_images_keep": len(self.keep), "n_images_val": len(self.val)}

    def describe(self) -> str:
        """One line for metadata and the report."""
        if self.unit == "none":
            return f"no validation split carved: all {len(self.keep)} real training images train"
        if self.unit == "image":
            return (
                f"per image (the file names carry no patient): {len(self.keep)} images train, "
                f"{len(self.val)} validate"
            )
        straddled = f"; a per-image split would have split {self.straddled_per_image} patients across it"
        loose = f"; {self.n_images_without_patient} images without a patient in their name split per image"
        return (
            f"by patient: {self.n_patients_keep} patients / {len(self.keep)} images train, "
            f"{self.n_patients_val} patients / {len(self.val)} images validate"
            + straddled
            + (loose if self.n_images_without_patient else "")
        )


def patient_groups(source_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Per image, its patient (or a unique per-image id when its name carries none), and how many
    images carry none."""
    ids = [patient_id(file_name_of(s)) for s in source_ids]
    groups = np.array([p if p is not None else f"image:{i}" for i, p in enumerate(ids)], dtype=object)
    return groups, sum(p is None for p in ids)


def identical_images_together(groups: np.ndarray, hashes: Sequence[str]) -> np.ndarray:
    """``groups`` with the groups of byte-identical images merged, so that a copy filed under
    another patient id (or none) never lands on the other side of the split."""
    parent = {g: g for g in groups}

    def root(g: Any) -> Any:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[str, Any] = {}
    for g, h in zip(groups, hashes):
        a, b = root(first.setdefault(h, g)), root(g)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller id names the merged group: deterministic
    return np.array([root(g) for g in groups], dtype=object)


def validation_split(
    train_rows: pd.DataFrame, fraction: float, seed: int, carve: bool = True
) -> ValidationSplit:
    """The validation split of the train rows of a dataset manifest (``label``, ``source_id``, and
    ``pixel_sha256`` or ``sha256`` when there: identical images stay on one side).

    ``carve=False`` (the study's protocol, selection on test) keeps every image for training.
    """
    labels = train_rows["label"].to_numpy(np.int64)
    groups, n_loose = patient_groups(train_rows["source_id"].astype(str).tolist())
    same = next((c for c in ("pixel_sha256", "sha256") if c in train_rows), None)
    if same:
        groups = identical_images_together(groups, train_rows[same].tolist())
    n_groups = len(set(groups))
    if not carve:
        return ValidationSplit(
            np.arange(len(labels)), np.zeros(0, np.int64), "none", n_groups, 0, n_loose, None
        )
    if fraction <= 0:
        raise ValueError("classifier.val_fraction must be > 0: the model is selected on that split")
    by_patient = n_loose < len(labels)
    keep, val = grouped_stratified_split(labels, groups, fraction, seed)
    straddled = None
    if by_patient:
        old_keep, old_val = stratified_split(labels, fraction, seed)
        straddled = len(set(groups[old_keep]) & set(groups[old_val]))
    return ValidationSplit(
        keep=keep,
        val=val,
        unit="patient" if by_patient else "image",
        n_patients_keep=len(set(groups[keep])),
        n_patients_val=len(set(groups[val])),
        n_images_without_patient=n_loose,
        straddled_per_image=straddled,
    )


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of ``fraction`` of each class of ``labels`` (rounded half up), drawn with ``seed``.

    Prefixes of one permutation per class, so for one seed a smaller subset lies inside a larger
    one (10% within 25%).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"real_fraction must be in [0, 1], got {fraction}")
    labels = np.asarray(labels)
    out = [np.zeros(0, np.int64)]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = class_count(len(idx), fraction)
        out.append(np.random.default_rng([seed, 0, int(cls)]).permutation(idx)[:k])
    return np.sort(np.concatenate(out)).astype(np.int64)


# ---------------------------------------------------------------- generators' real images


def generator_train_positions(
    split: ValidationSplit, labels: np.ndarray, key: str, subset_seed: int
) -> np.ndarray:
    """Rows of the train split a generator is fine-tuned on: its class's images of real train less
    the validation split, or, for a matched generator, of the limited subset that its fraction's
    experiments use (drawn once with ``subset_seed``, the same for every seed)."""
    class_key, fraction = parse_generator_key(key)
    label = CLASS_KEYS.index(class_key)
    labels = np.asarray(labels)
    pool = split.keep
    chosen = pool if fraction is None else pool[real_subset(labels[pool], fraction, subset_seed)]
    return chosen[labels[chosen] == label]


def shared_validation_split(s: Settings, train_rows: pd.DataFrame) -> ValidationSplit:
    """The validation split every experiment, seed, the feature extractor and DreamBooth share:
    by patient when the file names carry one; none under the study's protocol (selection on test)."""
    c = s.classifier
    return validation_split(train_rows, c.val_fraction, c.split_seed, carve=c.selection != "test")


def subset_seed(s: Settings, seed: int) -> int:
    """The seed of an experiment's real subset: fixed (``split_seed``) with matched generators, whose
    fine-tuning set must be that subset, else the run's seed."""
    return s.classifier.split_seed if s.dreambooth.generators == "matched" else seed


def generator_positions(
    s: Settings, train_rows: pd.DataFrame, key: str
) -> tuple[np.ndarray, ValidationSplit]:
    """Rows of the train split generator ``key`` is fine-tuned on, and the split they exclude."""
    split = shared_validation_split(s, train_rows)
    labels = train_rows["label"].to_numpy(np.int64)
    return generator_train_positions(split, labels, key, s.classifier.split_seed), split
