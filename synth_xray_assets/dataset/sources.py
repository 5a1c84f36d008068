"""Where the real images come from, read with ``datasets.load_dataset``.

A source is one of:
- a Hub dataset id (``hf-vision/chest-xray-pneumonia``), at a revision, token from the settings
  resource (``dg.EnvVar("HF_TOKEN")``);
- a local folder in the Hub's parquet layout (``data/{split}-*.parquet``);
- an image folder ``{split}/{NORMAL,PNEUMONIA}/*``;
- ``"demo"``: the project's synthetic phantoms, generated into ``data/sources/``.

Images are read undecoded (bytes), so that one bad file is reported, not fatal. Hidden files in
an image folder (a name starting with ``.``, or inside such a folder), which ``datasets`` passes
over silently, come back as records with a ``skip_reason``, so they are listed. Problems with
the source as a whole (missing, unreadable, a split or a class absent) raise ``SourceError``
naming the problem and the path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import combined_hash, sha256_file

# The folder names ``datasets``' imagefolder reads as each split (its SPLIT_KEYWORDS).
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class SourceError(RuntimeError):
    """The source as a whole cannot be used: the message names what and where."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "hub" | "parquet" | "imagefolder"
    location: str  # Hub id or absolute folder
    revision: str | None = None
    synthetic: bool = False  # True for the demo phantoms

    def origin(self) -> dict:
        """What a stored dataset records of its source (``phantoms``: the project's, not patients)."""
        return {
            "kind": self.kind,
            "location": self.location,
            "revision": self.revision,
            "phantoms": self.synthetic,
        }


@dataclass(frozen=True)
class SourceRecord:
    split: str
    label: int | None  # None: a label that is not one of the class names
    label_name: str
    source_id: str
    data: bytes
    skip_reason: str | None = None  # set: not an image to read (listed as skipped with this reason)
    # where a person finds it: the file relative to the source folder, or the parquet file and row
    source_path: str = ""


def resolve_source(settings: Settings) -> ResolvedSource:
    """Decide what kind of source ``settings.dataset.source`` is (generating the demo phantoms)."""
    source = settings.dataset.source
    if source == "demo":
        from synth_xray_assets.dataset.phantoms import write_phantom_dataset

        folder = write_phantom_dataset(settings.phantoms, settings.layout.demo_phantoms)
        return ResolvedSource("parquet", str(folder.resolve()), synthetic=True)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"dataset source {source!r} is a file; expected a folder ({path.resolve()})")
        if not os.access(path, os.R_OK | os.X_OK):
            raise SourceError(f"dataset source folder is not readable: {path.resolve()}")
        if any(path.glob("*.parquet")) or any(path.glob("data/*.parquet")):
            return ResolvedSource("parquet", str(path.resolve()))
        if any(p.is_dir() for p in path.iterdir()):
            return ResolvedSource("imagefolder", str(path.resolve()))
        raise SourceError(
            f"dataset source folder has neither parquet files nor split folders: {path.resolve()}"
        )
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise SourceError(
            f"dataset source does not exist: {path.resolve()} (nor is it a Hub id 'owner/name')"
        )
    return ResolvedSource("hub", source, revision=settings.dataset.revision)


def load_source(resolved: ResolvedSource, settings: Settings, token: str | None = None) -> Any:
    """The source as a ``datasets.DatasetDict`` whose ``image`` column is not decoded
    (``token``: the Hugging Face token for a gated Hub dataset; never logged)."""
    import datasets

    try:
        if resolved.kind == "hub":
            dsd = datasets.load_dataset(resolved.location, revision=resolved.revision, token=token)
        elif resolved.kind == "parquet":
            dsd = datasets.load_dataset(resolved.location)
        else:
            dsd = datasets.load_dataset("imagefolder", data_dir=resolved.location)
    except Exception as exc:  # noqa: BLE001 - re-raised with the source named
        where = resolved.location + (f"@{resolved.revision}" if resolved.revision else "")
        message = str(exc).replace(token, "***") if token else str(exc)  # never log a token
        raise SourceError(
            f"cannot read dataset source {where} ({resolved.kind}): {type(exc).__name__}: {message}"
        ) from None
    for column in ("image", "label"):
        for split, ds in dsd.items():
            if column not in ds.column_names:
                raise SourceError(
                    f"split {split!r} of {resolved.location} has no {column!r} column: {ds.column_names}"
                )
    return dsd.cast_column("image", datasets.Image(decode=False))


def check_splits_and_classes(dsd: Any, settings: Settings, location: str) -> None:
    """Every configured split is there and every class name is among its labels."""
    for split in settings.dataset.splits:
        if split not in dsd:
            raise SourceError(
                f"split {split!r} is missing from dataset source {location} (it has {sorted(dsd)})"
            )
        names = _label_names(dsd[split])
        labels = set(dsd[split]["label"])
        for class_name in settings.dataset.class_names:
            if class_name not in names or names.index(class_name) not in labels:
                raise SourceError(
                    f"class {class_name!r} is missing from split {split!r} of dataset source {location}"
                )


def iter_records(
    dsd: Any, split: str, class_names: tuple[str, ...], resolved: ResolvedSource | None = None
) -> Iterator[SourceRecord]:
    """The split's images as bytes with our label index (None for an unknown label)."""
    ds = dsd[split]
    names, locate = _label_names(ds), _locator(resolved, split)
    for i, row in enumerate(ds):
        yield _record(split, i, row, (names, class_names), locate)


def record_at(
    dsd: Any, split: str, index: int, class_names: tuple[str, ...], resolved: ResolvedSource
) -> SourceRecord:
    """Row ``index`` of ``split`` as :func:`iter_records` gives it (to re-derive one stored image)."""
    ds = dsd[split]
    return _record(split, index, ds[int(index)], (_label_names(ds), class_names), _locator(resolved, split))


def _record(
    split: str,
    i: int,
    row: dict,
    names: tuple[list[str], tuple[str, ...]],
    locate: Callable[[int, str | None], str],
) -> SourceRecord:
    """One source row as a record; ``names``: the source's label names and ours."""
    label_names, class_names = names
    raw = row["label"]
    name = (
        label_names[raw] if label_names and isinstance(raw, int) and 0 <= raw < len(label_names) else str(raw)
    )
    label = class_names.index(name) if name in class_names else None
    image = row["image"] or {}
    data, path = image.get("bytes"), image.get("path")
    source_id = f"{split}/{i}" + (f":{Path(path).name}" if path else "")
    if data is None and path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            data = b""
            source_id += f" (unreadable: {exc})"
    return SourceRecord(split, label, name, source_id, data or b"", source_path=locate(i, path))


def _locator(resolved: ResolvedSource | None, split: str) -> Callable[[int, str | None], str]:
    """How a row of ``split`` is named for people: its file relative to the source folder
    (``train/NORMAL/x.jpeg``), or its parquet file and row (``data/train-00000-of-00001.parquet
    row 12 (x.jpeg)``), or the Hub dataset's split and row."""
    root = Path(resolved.location) if resolved and resolved.kind != "hub" else None
    files = sorted(root.glob(f"**/{split}-*.parquet")) if root and resolved.kind == "parquet" else []
    table = (
        str(files[0].relative_to(root))
        if len(files) == 1
        else f"{resolved.location if resolved else ''}:{split}"
    )

    def locate(i: int, path: str | None) -> str:
        if root is not None and resolved.kind == "imagefolder" and path and Path(path).is_relative_to(root):
            return str(Path(path).relative_to(root))
        return f"{table} row {i}" + (f" ({Path(path).name})" if path else "")

    return locate


def source_records(
    dsd: Any, resolved: ResolvedSource, settings: Settings
) -> dict[str, Iterator[SourceRecord]]:
    """Every split's records: its images, then its hidden files (listed, not read)."""
    names = settings.dataset.class_names
    return {
        split: chain(iter_records(dsd, split, names, resolved), hidden_records(resolved, split))
        for split in settings.dataset.splits
    }


def hidden_records(resolved: ResolvedSource, split: str) -> Iterator[SourceRecord]:
    """The hidden files of an image folder's split, which ``datasets`` skips without a word."""
    if resolved.kind != "imagefolder":
        return
    root = Path(resolved.location)
    folder = next((root / n for n in SPLIT_FOLDERS.get(split, (split,)) if (root / n).is_dir()), None)
    if folder is None:
        return
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and any(part.startswith(".") for part in rel.parts):
            label_name = rel.parts[0] if len(rel.parts) > 1 else ""
            reason = "hidden file (its name or a folder's starts with '.'): not read"
            name = f"{folder.name}/{rel}"
            yield SourceRecord(split, None, label_name, name, b"", skip_reason=reason, source_path=name)


def _label_names(ds: Any) -> list[str]:
    feature = ds.features["label"]
    return list(getattr(feature, "names", []) or [])


def source_fingerprint(resolved: ResolvedSource, token: str | None = None) -> str:
    """The source's version: the Hub revision's commit sha, or a local folder's content hash."""
    if resolved.kind == "hub":
        from huggingface_hub import HfApi

        info = HfApi(token=token).dataset_info(resolved.location, revision=resolved.revision)
        return str(info.sha)
    root = Path(resolved.location)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    return combined_hash([f"{p.relative_to(root)}:{sha256_file(p)}" for p in files])
