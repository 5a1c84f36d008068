"""Files on disk: atomic writes, content hashes, and small pictures for the UI.

Big files live under ``data/``; assets record their paths and small facts in metadata.
Every write goes to a temporary name in the same folder and is renamed into place, so a
half-written file never looks complete.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files and folders; an existing folder at ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def save_png_atomic(image: Image.Image, path: str | Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def save_numpy_atomic(array: np.ndarray, path: str | Path) -> Path:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return write_bytes_atomic(path, buf.getvalue())


def write_parquet_atomic(frame: Any, path: str | Path) -> Path:
    """Write a pandas DataFrame as parquet, atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return write_bytes_atomic(path, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def combined_hash(parts: Sequence[str]) -> str:
    """A short, order-independent fingerprint of many hashes (a data version)."""
    h = hashlib.sha256()
    for part in sorted(parts):
        h.update(part.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def image_grid(images: Sequence[Image.Image | np.ndarray], columns: int = 8, cell: int = 96) -> Image.Image:
    """Tile images (PIL or uint8 arrays, gray or RGB) into one RGB grid of ``cell``-pixel squares."""
    if not images:
        return Image.new("RGB", (cell, cell), "white")
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        tile = img.convert("RGB").resize((cell, cell), Image.Resampling.BILINEAR)
        grid.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return grid


def png_markdown(image: Image.Image, alt: str = "grid") -> str:
    """Markdown with the image embedded as a base64 PNG (for ``MetadataValue.md``)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def markdown_table(frame: Any, index: bool = False) -> str:
    """A pandas DataFrame as a markdown table for ``MetadataValue.md`` ("" when it has no rows)."""
    if frame is None or len(frame) == 0:
        return ""
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in frame.iterrows():
        cells = ([str(idx)] if index else []) + [str(v) for v in row.tolist()]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


MODEL_FILE_PATTERNS = ("**/*.safetensors", "**/*config*.json", "model_index.json")
VERSION_FILE = ".content-version.json"  # inside a model folder: its hash, its files' sizes and times


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


def _hash_files(folder: Path, files: list[Path]) -> str:
    return combined_hash([f"{p.relative_to(folder)}:{sha256_file(p)}" for p in files])[:16]


def write_folder_version(folder: str | Path, patterns: Sequence[str] = MODEL_FILE_PATTERNS) -> str:
    """Hash a model folder's weights and configs once and store the hash in it (``VERSION_FILE``).

    Call it where the folder is written (inside its atomic write): later readers get the hash
    from :func:`folder_version` without re-reading gigabytes of weights.
    """
    folder = Path(folder)
    files = _model_files(folder, patterns)
    record = {
        "version": _hash_files(folder, files),
        "patterns": list(patterns),
        "files": _listing(folder, files),
    }
    write_json_atomic(folder / VERSION_FILE, record)
    return record["version"]


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
        return _hash_files(folder, files)
