"""Standardization throughput: our way against the plain way, in one run.

Plain way: full decode with PIL, torchvision ``Resize`` + ``CenterCrop``, one process.
Our way: reduced-size JPEG decoding (``Image.draft``) and both cores
(``synth_xray_assets.dataset.standardize.standardize_many``).

    .venv/bin/python benchmarks/standardize.py [--size 512] \
        [--folder ../shared/data/chest-xray-originals-sample]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

from PIL import Image
from torchvision import transforms

from synth_xray_assets.dataset.standardize import standardize_many

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/chest-xray-originals-sample"


def plain(blobs: list[bytes], size: int, mode: str) -> int:
    """torchvision's usual way: decode the whole image (ImageFolder's loader converts to RGB)."""
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    for b in blobs:
        tf(Image.open(io.BytesIO(b)).convert(mode))
    return len(blobs)


def ours(blobs: list[bytes], size: int, workers: int) -> int:
    return sum(r.pixels is not None for r in standardize_many(blobs, size, "L", workers=workers))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=DEFAULT)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    if not files:
        print(f"SKIP: no images under {args.folder} (the shared real-data folder is absent)")
        return
    blobs = [p.read_bytes() for p in files]  # read once, so both ways time decoding, not the disk
    print(f"{len(blobs)} images from {args.folder}, target {args.size} px, {args.workers} workers")
    rows = []
    for name, fn in [
        ("plain (full decode RGB, torchvision, 1 process)", lambda: plain(blobs, args.size, "RGB")),
        ("plain (full decode L, torchvision, 1 process)", lambda: plain(blobs, args.size, "L")),
        ("ours, 1 process (draft decode)", lambda: ours(blobs, args.size, 1)),
        (f"ours, {args.workers} processes (draft decode)", lambda: ours(blobs, args.size, args.workers)),
    ]:
        t = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        rows.append((name, n / dt))
        print(f"{name:48s} {n / dt:8.1f} images/s ({n} images in {dt:.2f} s)")
    print(
        f"speed-up of ours ({args.workers} processes) over plain RGB: {rows[3][1] / rows[0][1]:.2f}x, "
        f"over plain L: {rows[3][1] / rows[1][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
