"""The partitions shared across domains: one per class, and experiment x seed (from settings)."""

import dagster as dg

from synth_xray_assets.settings import CLASS_KEYS, ClassifierSettings

# normal / pneumonia: the per-class assets (checkpoint, synthetic images, FID).
class_partitions = dg.StaticPartitionsDefinition(list(CLASS_KEYS))


def experiment_partitions(classifier: ClassifierSettings) -> dg.MultiPartitionsDefinition:
    """The classifier grid: the settings' experiments x seeds."""
    return dg.MultiPartitionsDefinition(
        {
            "experiment": dg.StaticPartitionsDefinition(list(classifier.experiments)),
            "seed": dg.StaticPartitionsDefinition([str(s) for s in classifier.seeds]),
        }
    )


def class_label(class_key: str) -> int:
    """0 for normal, 1 for pneumonia (the dataset's ClassLabel order)."""
    return CLASS_KEYS.index(class_key)
