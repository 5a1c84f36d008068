"""One classifier experiment run, end to end, and its files on disk.

Layout of ``data/classifier/{experiment}/seed-{seed}/`` (every file written atomically)::

    best.safetensors      weights of the selected epoch
    last.safetensors      weights of the last epoch
    train_state.pt        the resumable training state (only while a run is unfinished)
    composition.parquet   every image of train / val / test: role, source, label, image_id, position
    predictions.parquet   per test image: image_id, label, prob_selected, prob_last (PNEUMONIA)
    curves.png            training loss and validation accuracy per epoch
    run.json              metrics, history, counts, timings (written last: the run is complete)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synth_xray_assets.classifier.curves import run_curves
from synth_xray_assets.classifier.data import ExperimentData, experiment_spec, load_experiment_data
from synth_xray_assets.classifier.model import describe_weights
from synth_xray_assets.classifier.train import RunExtra, RunResult, TrainRun, train_classifier
from synth_xray_assets.layout import Layout
from synth_xray_assets.settings import Settings
from synth_xray_assets.storage import sha256_bytes, write_json_atomic, write_parquet_atomic

RUN_FILE = "run.json"
PREDICTIONS_FILE = "predictions.parquet"
COMPOSITION_FILE = "composition.parquet"
CURVES_FILE = "curves.png"
_PER_IMAGE = ("test_labels", "test_prob_selected", "test_prob_last", "test_image_ids")


# Classifier settings that do not change what one run computes (which runs exist, how they are reported).
_NOT_IN_FINGERPRINT = ("seeds", "experiments", "balance_controls", "num_workers", "bootstrap_samples")


def settings_fingerprint(s: Settings, experiment: str) -> str:
    """A hash of everything in the settings that shapes one experiment's run: the classifier
    recipe and split, this experiment's own spec, and the generator arrangement."""
    c = s.classifier
    spec = experiment_spec(c, experiment)
    recipe = {k: v for k, v in c.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    payload = {"classifier": recipe, "spec": asdict(spec), "generators": s.dreambooth.generators}
    if spec.balance_like:
        payload["balance_like"] = asdict(experiment_spec(c, spec.balance_like))
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:16]


def run_dir(data_dir: str | Path, experiment: str, seed: int | str) -> Path:
    return Layout(Path(data_dir)).classifier_run(experiment, seed)


def run_experiment(
    s: Settings,
    experiment: str,
    seed: int,
    device: str = "cpu",
    log: Callable[[str], Any] = print,
    num_workers: int | None = None,
) -> tuple[RunResult, ExperimentData]:
    """Compose, train and score one experiment for one seed; write its files under :func:`run_dir`."""
    data = load_experiment_data(s, experiment, seed, log)
    out = run_dir(s.data_dir, experiment, seed)
    (out / RUN_FILE).unlink(missing_ok=True)  # the old run's summary no longer describes this folder
    counts = data.counts()
    run = TrainRun(
        seed,
        device,
        out,
        log,
        prepared=True,
        experiment=experiment,
        num_workers=num_workers,
        extra=RunExtra(
            n_real=counts["train_real_normal"] + counts["train_real_pneumonia"],
            n_synthetic=counts["train_synthetic_normal"] + counts["train_synthetic_pneumonia"],
            counts=counts,
            real_fraction=data.spec.real_fraction,
            balance_like=data.spec.balance_like,
            target_normal_share=data.target_normal_share,
            normal_share=data.normal_share(),
            generators=s.dreambooth.generators,
            generator_keys=data.generators,
            validation_split={**data.split.summary(), "describe": data.split.describe()},
            settings_fingerprint=settings_fingerprint(s, experiment),
            dataset_version=data.dataset_version,
            data_origin=data.data_origin,
            synthetic_versions=data.synthetic_versions,
            initial_weights=describe_weights(s.classifier),
            profile=s.profile,
        ),
    )
    result = train_classifier(data, s.classifier, run)
    write_parquet_atomic(data.composition, out / COMPOSITION_FILE)
    save_run(result, out, data.composition.loc[data.composition.role == "test", "image_id"].tolist())
    return result, data


def save_run(result: RunResult, folder: str | Path, test_image_ids: list[str]) -> Path:
    """Write a finished run's ``predictions.parquet``, ``curves.png`` and, last, ``run.json``."""
    folder = Path(folder)
    write_parquet_atomic(
        pd.DataFrame(
            {
                "image_id": [str(i) for i in test_image_ids],
                "label": np.asarray(result.test_labels, np.int64),
                "prob_selected": np.asarray(result.test_prob_selected, np.float64),
                "prob_last": np.asarray(result.test_prob_last, np.float64),
            }
        ),
        folder / PREDICTIONS_FILE,
    )
    run_curves(result.history, folder / CURVES_FILE, title=f"{result.experiment}, seed {result.seed}")
    summary = {k: v for k, v in result.to_dict().items() if k not in _PER_IMAGE}
    return write_json_atomic(folder / RUN_FILE, summary)


def load_run(path: str | Path) -> RunResult:
    """A finished run, its per-image test labels, probabilities and image ids included."""
    path = Path(path)
    run = json.loads((path / RUN_FILE).read_text())
    pred = pd.read_parquet(path / PREDICTIONS_FILE)
    run["test_labels"] = pred.label.astype(int).tolist()
    run["test_prob_selected"] = pred.prob_selected.astype(float).tolist()
    run["test_prob_last"] = pred.prob_last.astype(float).tolist()
    run["test_image_ids"] = pred.image_id.astype(str).tolist()
    return RunResult.from_dict(run)


def is_finished(path: str | Path) -> bool:
    path = Path(path)
    return (path / RUN_FILE).is_file() and (path / PREDICTIONS_FILE).is_file()
