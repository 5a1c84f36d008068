"""Files on disk: atomic writes, content hashes, and small pictures for the UI.

Big files live under ``data/``; assets record their paths and small facts in metadata.
Every write goes to a temporary name in the same folder and is renamed into place, so a
half-written file never looks complete.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from synth_xray_assets.operations.faults import fault_point

# Temporaries are named for their writer (host and pid), so that only dead writers' are removed.
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


FULL_DISK_BYTES = 1 << 20  # less free than this after a failed write: the disk was full


class DiskFullError(OSError):
    """A write ran out of disk space; the earlier version of the output was left as it was."""


@contextlib.contextmanager
def atomic_path(path: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files and folders; an existing folder at ``path`` is replaced. Until the rename,
    ``path`` keeps its earlier version: a kill or a failed write (a full disk raises
    ``DiskFullError`` saying how much space was needed and where) leaves it untouched.
    Temporaries of killed writers are removed by the next write of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_replaced_folder(path)
    _remove_dead_temporaries(path)
    owner = f"{_HOST}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        fault_point("write", str(path))
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    except Exception as exc:
        if isinstance(exc, DiskFullError) or not _is_full_disk(exc, path.parent):
            raise
        raise _disk_full(path, tmp, expected_bytes) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_full_disk(exc: BaseException, folder: Path) -> bool:
    """ENOSPC, a library's "No space left on device", or any failure with the disk full (torch's
    writer reports a full disk as "unexpected pos")."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if "no space left on device" in f"{exc} {exc.__cause__}".lower():
        return True
    return shutil.disk_usage(folder).free < FULL_DISK_BYTES


def _disk_full(path: Path, tmp: Path, expected_bytes: int | None) -> DiskFullError:
    written = _tree_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(path.parent).free
    needed = (
        f"{_mib(expected_bytes)} needed"
        if expected_bytes is not None
        else f"more than the {_mib(written)} written before the disk filled"
    )
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on device writing {path}: {needed}, {_mib(free)} free in {path.parent} "
        f"(after removing the partial write). The earlier version of {path.name}, if any, is intact; "
        "free space there (or point the data folder elsewhere) and run again",
        str(path),
    )


def _tree_bytes(root: Path) -> int:
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"


def _recover_replaced_folder(path: Path) -> None:
    """A kill between moving the old folder aside and renaming the new one in left only ``.old``."""
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        old.rename(path)


def _remove_dead_temporaries(path: Path) -> None:
    """Remove ``.{name}.{host}-{pid}.*.tmp`` beside ``path`` left by this host's dead writers."""
    _remove_dead(path.parent, f".{glob.escape(path.name)}.*.tmp", re.escape(path.name))


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Remove every temporary in ``folder`` (whatever its destination) left by this host's dead
    writers, e.g. a generation shard killed mid-write; returns what was removed."""
    return _remove_dead(Path(folder), ".*.tmp", ".+")


def _remove_dead(folder: Path, pattern: str, name_regex: str) -> list[Path]:
    owned = re.compile(rf"\.{name_regex}\.{re.escape(_HOST)}-(\d+)\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    for tmp in folder.glob(pattern):
        match = owned.fullmatch(tmp.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path, expected_bytes=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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
