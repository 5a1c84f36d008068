"""Class fidelity on a planted set, and each synthetic set's own seed stream."""

import numpy as np
import pytest

from synth_xray_assets.dataset.phantoms import render_phantom
from synth_xray_assets.diffusion.generate import Recipe, generate_set, seed_stream_offset
from synth_xray_assets.diffusion.pipelines import load_pipeline
from synth_xray_assets.evaluation.fidelity import FidelityInputs, fidelity_share, measure_class_fidelity
from synth_xray_assets.partitions import generator_keys
from synth_xray_assets.settings import GenerationSettings, Settings
from synth_xray_assets.synthesis.store import SyntheticImages


def _phantoms(label: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_phantom(label, 48, 48, rng) for _ in range(n)])


def _pooled(images: np.ndarray) -> np.ndarray:
    """Images averaged over 4 x 4 blocks, as vectors."""
    n = len(images)
    return images.reshape(n, 12, 4, 12, 4).astype(float).mean((2, 4)).reshape(n, -1)


def test_class_fidelity_of_a_planted_set_is_near_zero():
    # A classifier trained on real images only: the nearer class mean of the pooled images.
    centroids = np.stack([_pooled(_phantoms(label, 80, label + 1)).mean(0) for label in (0, 1)])

    def predict(images: np.ndarray) -> np.ndarray:
        d = ((_pooled(images)[:, None, :] - centroids[None]) ** 2).sum(-1)
        return (d[:, 1] < d[:, 0]).astype(float)

    about = dict(
        generator="pneumonia",
        class_key="pneumonia",
        threshold=0.8,
        extractor_sha256="-",
        synthetic_version="-",
    )
    real_test = _phantoms(1, 30, 5)  # the class's real test images: the recall to read the share by
    # planted: real NORMAL images presented as the PNEUMONIA generator's output
    planted = measure_class_fidelity(predict, FidelityInputs(_phantoms(0, 40, 3), real_test, 1), about, 0.95)
    assert planted.share < 0.1 and planted.ci_high < 0.25 and not planted.passed
    honest = measure_class_fidelity(predict, FidelityInputs(_phantoms(1, 40, 4), real_test, 1), about, 0.95)
    assert honest.share > 0.8 and honest.ci_low > 0.6 and honest.passed
    # the recall on the real test images is measured the same way, whatever the synthetic set
    recall = float((predict(real_test) > 0.5).mean())
    assert planted.real_recall == honest.real_recall == recall > 0.6 and planted.n_real == 30
    assert planted.real_recall_low < recall < planted.real_recall_high
    # a mislabelled real test set (NORMAL images as PNEUMONIA's) gives the recall near zero
    wrong = measure_class_fidelity(
        predict, FidelityInputs(_phantoms(1, 40, 4), _phantoms(0, 30, 6), 1), about, 0.95
    )
    assert wrong.real_recall < 0.1
    # the Wilson interval, by hand: 0 of 40 -> [0, z^2 / (n + z^2)]
    k, share, low, high = fidelity_share(np.zeros(40), 1)
    z2 = 1.959964**2
    assert (k, share, low) == (0, 0.0, 0.0) and high == pytest.approx(z2 / (40 + z2), rel=1e-4)


def test_every_synthetic_set_has_its_own_seed_stream(tiny_base_model, tmp_path):
    g = GenerationSettings()
    keys = generator_keys("matched", Settings.for_profile("demo", tmp_path).classifier.experiments)
    names = [*keys, "prior", "base-normal", "base-pneumonia"]
    starts = sorted(seed_stream_offset(g, n) for n in names)
    # no two streams overlap over a full set of images
    assert all(b - a >= g.images_per_class for a, b in zip(starts, starts[1:]))
    made = {}
    for name in ("normal", "pneumonia"):
        root = tmp_path / name
        generate_set(
            lambda device: load_pipeline(tiny_base_model, device),
            root,
            2,
            # the same prompt: only the seeds can tell the sets apart
            Recipe("a chest xray image", 2, 4.0, 32, seed_offset=seed_stream_offset(g, name)),
            batch_size=2,
        )
        made[name] = SyntheticImages.open(root)
    seeds = {n: list(m.manifest.seed) for n, m in made.items()}
    assert (
        seeds["normal"][0] == seed_stream_offset(g, "normal") and seeds["normal"][1] == seeds["normal"][0] + 1
    )
    assert not set(seeds["normal"]) & set(seeds["pneumonia"])
    a, b = made["normal"].images(), made["pneumonia"].images()
    assert not np.array_equal(a[0], b[0])  # image 0 of each set starts from different noise
