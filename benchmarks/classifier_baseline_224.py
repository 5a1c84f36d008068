"""The Baseline experiment on the real chest X-rays, at a size a 2-core CPU can train in minutes.

Real data: ``../shared/data/chest-xray-pneumonia-224`` (the Hub dataset's 5216 / 624 train /
test images, pre-resized to 224 px). The same code as the ``classifier_experiment`` asset
(``classifier.experiment.run_experiment``): validation = 10% of each class of real train
(selection), the rest trains, the 624 test images score the selected and the last epoch.
Prints accuracy, F1 and AUC with 95% bootstrap confidence intervals over test images, beside
the study's figures.

Deviations from the study, for the CPU (defaults; all flags): 48 px crops of 55 px resized
images instead of 224 of 256; 4 epochs (cosine over 4) instead of 20; batch 32 instead of 512;
random initialisation unless ``--weights`` gives a local ImageNet DenseNet-121 file (no
network here for torchvision's download).

    .venv/bin/python benchmarks/classifier_baseline_224.py [--resolution 48] [--epochs 4] \
        [--batch 32] [--threads 1] [--weights densenet121.pth] [--data-dir /tmp/synth-xray-baseline]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from synth_xray_assets.classifier.experiment import run_experiment
from synth_xray_assets.classifier.stats import Bootstrap, bootstrap_ci
from synth_xray_assets.dataset.sources import (
    check_splits_and_classes,
    iter_records,
    load_source,
    resolve_source,
)
from synth_xray_assets.dataset.store import build_standardized_dataset
from synth_xray_assets.settings import PUBLISHED_RESULTS, Settings

SOURCE = Path(__file__).resolve().parents[1].parent / "shared/data/chest-xray-pneumonia-224"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--resolution", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--weights", type=str, default=None, help="local ImageNet DenseNet-121 weights")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "synth-xray-baseline")
    args = parser.parse_args()
    if not (args.source / "data").is_dir():
        print(f"SKIP: the real-data mirror is absent: {args.source}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    resize = round(args.resolution * 256 / 224)
    s = Settings.for_profile(
        "full",
        args.data_dir,
        {
            "dataset": {"source": str(args.source), "resolution": 64},
            "classifier": {
                "resolution": args.resolution,
                "resize": resize,
                "epochs": args.epochs,
                "batch_size": args.batch,
                "pretrained": "imagenet" if args.weights else "none",
                "weights_file": args.weights,
                "seeds": [args.seed],
            },
        },
    )
    start = time.perf_counter()
    resolved = resolve_source(s)
    dsd = load_source(resolved, s)
    check_splits_and_classes(dsd, s, resolved.location)
    records = {split: iter_records(dsd, split, s.dataset.class_names) for split in s.dataset.splits}
    report = build_standardized_dataset(records, s.dataset, s.data_dir / "dataset", log=lambda m: None)
    print(
        f"dataset {report.version}: {len(report.manifest)} images standardized to 64 px "
        f"({report.decoded} decoded, {report.reused} reused) in {time.perf_counter() - start:.0f} s"
    )
    c = s.classifier
    print(
        f"baseline, seed {args.seed}: DenseNet-121, {c.resolution} px (resize {c.resize}), "
        f"{c.epochs} epochs, batch {c.batch_size}, AdamW lr {c.learning_rate:g}, init {c.pretrained}, "
        f"{torch.get_num_threads()} torch threads, {c.num_workers} loader workers"
    )
    result, data = run_experiment(s, "baseline", args.seed, "cpu", log=print)
    y = data.test_y
    print(
        f"trained on {result.n_train} real images (validation {result.n_val}, test {result.n_test}); "
        f"selected epoch {result.selected_epoch}/{result.epochs}; training {result.train_time_s:.0f} s "
        f"({result.train_images_per_s:.1f} images/s); total {time.perf_counter() - start:.0f} s"
    )
    published = PUBLISHED_RESULTS["baseline"]
    print(f"{'':24s} {'accuracy':>22s} {'F1':>22s} {'AUC':>22s}")
    for label, prob in (
        ("selected on validation", result.test_prob_selected),
        ("last epoch", result.test_prob_last),
    ):
        cells = []
        for metric in ("accuracy", "f1", "auc"):
            est, low, high = bootstrap_ci(y, prob, metric, Bootstrap(args.bootstrap))
            cells.append(f"{est:.3f} [{low:.3f}, {high:.3f}]")
        print(f"{label:24s} " + " ".join(f"{cell:>22s}" for cell in cells))
    study = [published["accuracy"], published["f1"], published["auc"]]
    print(f"{'study (test-selected)':24s} " + " ".join(f"{v:>22.3f}" for v in study))
    last = f"{published['last_accuracy']:>22.3f} {'':>22s} {published['last_auc']:>22.3f}"
    print(f"{'study (last epoch)':24s} {last}")
    cm = result.test_selected["confusion"]
    print(f"confusion (selected; rows true NORMAL/PNEUMONIA, columns predicted): {cm}")
    print(f"outputs: {result.weights_path} and beside it")


if __name__ == "__main__":
    main()
