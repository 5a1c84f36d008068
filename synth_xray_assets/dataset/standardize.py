"""Standardize chest X-rays as the study did: shorter side to the target resolution with the
aspect ratio kept, then a center crop to a square, in one consistent mode. An image with an EXIF
orientation tag (a phone photo of a film, a rotated JPEG) is turned upright first.

Each image is decoded once; JPEGs much larger than the target are decoded at reduced size
(``Image.draft``: the JPEG decoder's DCT scaling), and batches use both cores. Bad input
(empty, corrupt, truncated, not an image, over the pixel limit) is reported, never raised.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from synth_xray_assets.operations.lifetime import exit_with_parent
from synth_xray_assets.storage import sha256_bytes

# Never let PIL fill a truncated file with grey silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False
EXIF_ORIENTATION = 0x0112
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # the upright image's width and height are swapped


@dataclass(frozen=True)
class StandardizeResult:
    """One image's outcome: ``pixels`` (uint8 [res, res] or [res, res, 3]) or a ``reason`` it was skipped."""

    sha256: str
    pixels: np.ndarray | None
    original_size: tuple[int, int] | None  # upright (after the EXIF orientation), as stored
    original_mode: str | None
    reason: str | None = None


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode (16-bit, float, palette, alpha) to ``L`` or ``RGB``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # X-rays: transparent = no signal
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img if img.mode == mode else img.convert(mode)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (aspect kept), then the central ``size`` x ``size`` square.

    Done as one resampling of the central square of the source (PIL's ``box``), which gives
    the same pixels as resize-then-crop without resampling the part the crop throws away.
    Bilinear with antialiasing, as torchvision's ``Resize``.
    """
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def standardize_bytes(
    data: bytes, size: int, mode: str = "L", max_pixels: int = 178_956_970
) -> StandardizeResult:
    """Decode ``data`` once and standardize it; bad input comes back with a ``reason``."""
    digest = sha256_bytes(data)
    if not data:
        return StandardizeResult(digest, None, None, None, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                return StandardizeResult(
                    digest, None, (w, h), img.mode, f"over the pixel limit: {w}x{h} > {max_pixels} pixels"
                )
            original_mode = img.mode
            if img.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
                w, h = h, w
            if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale while still >= size
                img.draft(mode if img.mode in ("L", "RGB") else None, (size, size))
            img.load()
            upright = ImageOps.exif_transpose(img)  # no tag: an unchanged copy
            out = resize_center_crop(to_mode(upright, mode), size)
            return StandardizeResult(digest, np.asarray(out, dtype=np.uint8), (w, h), original_mode)
    except Image.DecompressionBombError as exc:  # PIL quotes twice the limit: say ours
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{size.group(1)} pixels" if size else "the image"
        return StandardizeResult(
            digest, None, None, None, f"over the pixel limit: {pixels} > {max_pixels} pixels"
        )
    except Image.UnidentifiedImageError:  # PIL's text names a BytesIO object's address: not useful
        return StandardizeResult(digest, None, None, None, "not an image: no image format PIL can read")
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input, reported per image
        return StandardizeResult(
            digest,
            None,
            None,
            None,
            f"corrupt or truncated image: {type(exc).__name__}: {_without_addresses(exc)}",
        )


def _without_addresses(exc: Exception) -> str:
    """The exception's text without Python object addresses (``<_io.BytesIO object at 0x...>``)."""
    return re.sub(r"<([\w.]+) object at 0x[0-9a-f]+>", r"<\1>", str(exc))


def _standardize_chunk(args: tuple[list[bytes], int, str, int]) -> list[StandardizeResult]:
    chunk, size, mode, max_pixels = args
    before, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        return [standardize_bytes(b, size, mode, max_pixels) for b in chunk]
    finally:  # in this process (workers=1) the caller's limit comes back
        Image.MAX_IMAGE_PIXELS = before


def standardize_many(
    items: Iterable[bytes],
    size: int,
    mode: str = "L",
    max_pixels: int = 178_956_970,
    workers: int = 2,
    chunk_size: int = 8,
) -> Iterator[StandardizeResult]:
    """Standardize many encoded images, in order, over ``workers`` processes (1: in this process)."""
    chunks = _chunks(items, chunk_size)
    if workers <= 1:
        for chunk in chunks:
            yield from _standardize_chunk((chunk, size, mode, max_pixels))
        return
    # fork starts in milliseconds; the children run only PIL and numpy, no threads or torch.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    # Each worker dies with this process (a killed step leaves no standardizer behind).
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        for results in pool.map(_standardize_chunk, ((c, size, mode, max_pixels) for c in chunks)):
            yield from results


def _chunks(items: Iterable[bytes], n: int) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
