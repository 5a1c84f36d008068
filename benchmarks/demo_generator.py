"""Does the demo's generator learn the classes? Figures of a materialized data folder (`make demo`).

Per class, with the chest-X-ray classifier the platform trained (``cxr_feature_extractor``, real
train only):

* class fidelity: the share of the class's synthetic images it assigns to the class, beside its
  recall on the real test images of the class (the aim: within 10 points);
* FD in its feature space against the real test images of the class (held out from every
  generator), for the fine-tuned images and for the base model's images of the class prompt made
  with the same sampler settings and seeds (target: fine-tuned at least 25% below the base), and
  the real floor (real train against real test);
* the mean pixel of the left lung field (rows 35-60%, columns 20-40%), synthetic against real.

FD here uses every image of small sets (tens), so it is biased upwards; compare the figures with
each other, not with the study's. ``fid_scores`` is the platform's own measurement.

    .venv/bin/python benchmarks/demo_generator.py [data folder, default data/]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from synth_xray_assets.classifier.data import normalize_batch, prepare_images
from synth_xray_assets.classifier.model import load_classifier, pooled_features
from synth_xray_assets.dataset.store import StandardizedDataset
from synth_xray_assets.diffusion.pipelines import load_pipeline, sample_images, use_dpm_solver
from synth_xray_assets.dreambooth.store import base_model_path
from synth_xray_assets.evaluation.extractor import extractor_settings, extractor_weights
from synth_xray_assets.settings import CLASS_KEYS, Settings
from synth_xray_assets.synthesis.store import SyntheticImages, synthetic_dir


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD of two feature sets; tr sqrt(C_a C_b) from the singular values of the small cross-Gram matrix."""
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (ca**2).sum() + (cb**2).sum() - 2 * cross)


def left_lung_mean(images: np.ndarray) -> float:
    r = images.shape[1]
    return float(images[:, int(0.35 * r) : int(0.6 * r), int(0.2 * r) : int(0.4 * r)].mean())


def main(data_dir: Path) -> None:
    torch.set_num_threads(1)
    s = Settings.for_profile("demo", data_dir)
    ds = StandardizedDataset.open(s.layout.dataset)
    xs = extractor_settings(s.classifier, s.evaluation)
    model = load_classifier(extractor_weights(data_dir), xs).eval()

    def classify(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = normalize_batch(prepare_images(np.asarray(images), xs.resize, xs.resolution))
        with torch.no_grad():
            return torch.softmax(model(x), 1)[:, 1].numpy(), pooled_features(model, x).double().numpy()

    base = use_dpm_solver(load_pipeline(base_model_path(data_dir), "cpu"))
    g, db = s.generation, s.dreambooth
    print(
        "class | fidelity | recall (real test) | FD fine-tuned | FD base | change | FD real floor"
        " | lung syn/real"
    )
    for label, key in enumerate(CLASS_KEYS):
        synthetic = SyntheticImages.open(synthetic_dir(data_dir, key)).images()
        seeds = [g.seed_offset + i for i in range(len(synthetic))]
        base_images = sample_images(
            base, db.class_prompt, seeds, g.num_inference_steps, g.guidance_scale, db.resolution
        )
        p_syn, f_syn = classify(synthetic)
        p_test, f_test = classify(ds.images("test", label))
        _, f_base = classify(base_images)
        _, f_train = classify(ds.images("train", label))
        hit = (lambda p: p > 0.5) if label else (lambda p: p <= 0.5)
        fd_syn, fd_base = frechet_distance(f_syn, f_test), frechet_distance(f_base, f_test)
        print(
            f"{key} | {hit(p_syn).mean():.3f} | {hit(p_test).mean():.3f} | {fd_syn:.1f} | {fd_base:.1f} | "
            f"{100 * (fd_syn / fd_base - 1):+.0f}% | {frechet_distance(f_train, f_test):.1f} | "
            f"{left_lung_mean(synthetic):.1f}/{left_lung_mean(ds.images('train', label)):.1f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data"))
