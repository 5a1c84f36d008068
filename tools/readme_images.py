"""Make the README's two pictures, docs/images/samples.png and docs/images/lineage.png.

``samples.png``: per class, synthetic images of a materialized data folder (``make demo``) above
real test images of the same class, the way ``synthetic_images`` shows its grid, with a label
above each class. ``lineage.png``: the browser test's screenshot of the lineage graph, made
smaller (run the test with ``SYNTH_XRAY_SCREENSHOTS=<folder>`` first).

    .venv/bin/python tools/readme_images.py --data data --screenshots /tmp/shots
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.layout import Layout
from synth_xray_assets.partitions import class_label
from synth_xray_assets.settings import CLASS_KEYS
from synth_xray_assets.storage import image_grid
from synth_xray_assets.synthesis.store import SyntheticImages

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
COLUMNS = 8
CELL = 80  # pixels per image in the picture (the demo's images are 64 px)
LABEL_HEIGHT = 22
GAP = 6  # between the synthetic rows and the real row
SCREENSHOT = "1-asset-graph.png"  # test_ui_browser.py's lineage graph
LINEAGE_CROP = (0, 0, 1600, 720)  # the page without the empty bottom of the graph pane
LINEAGE_WIDTH = 1200


def class_block(data: Path, key: str) -> Image.Image:
    """Two rows of synthetic images of class ``key`` above one row of its real test images, a thin
    white gap between them, and a label on top."""
    layout = Layout(data)
    synthetic = image_grid(
        list(SyntheticImages.open(layout.synthetic(key)).images(limit=2 * COLUMNS)), COLUMNS, CELL
    )
    real = image_grid(
        list(StandardizedDataset.open(layout.dataset).images("test", class_label(key))[:COLUMNS]),
        COLUMNS,
        CELL,
    )
    block = Image.new("RGB", (synthetic.width, LABEL_HEIGHT + synthetic.height + GAP + real.height), "white")
    block.paste(synthetic, (0, LABEL_HEIGHT))
    block.paste(real, (0, LABEL_HEIGHT + synthetic.height + GAP))
    text = f"{key.upper()}: synthetic (top {synthetic.height // CELL} rows), real test phantoms (bottom row)"
    ImageDraw.Draw(block).text((4, 5), text, fill="black")
    return block


def samples_picture(data: Path) -> Image.Image:
    """The classes' blocks one above the other."""
    blocks = [class_block(data, key) for key in CLASS_KEYS]
    picture = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        picture.paste(block, (0, y))
        y += block.height
    return picture


def lineage_picture(screenshots: Path) -> Image.Image:
    """The lineage screenshot, cropped, scaled to ``LINEAGE_WIDTH`` and reduced to a 256-colour palette."""
    shot = Image.open(screenshots / SCREENSHOT).convert("RGB").crop(LINEAGE_CROP)
    height = round(shot.height * LINEAGE_WIDTH / shot.width)
    small = shot.resize((LINEAGE_WIDTH, height), Image.Resampling.LANCZOS)
    return small.quantize(colors=256, method=Image.Quantize.MEDIANCUT)


def save(image: Image.Image, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    image.save(path, optimize=True)
    print(f"{path}: {image.width} x {image.height}, {path.stat().st_size / 1024:.0f} KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data"), help="a materialized data folder")
    parser.add_argument("--screenshots", type=Path, help="the browser test's screenshot folder")
    args = parser.parse_args()
    save(samples_picture(args.data), "samples.png")
    if args.screenshots:
        save(lineage_picture(args.screenshots), "lineage.png")


if __name__ == "__main__":
    main()
