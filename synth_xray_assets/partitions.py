"""The partitions shared across domains: one per class, and experiment x seed."""

import dagster as dg

from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import CLASS_KEYS

# normal / pneumonia: the per-class assets (checkpoint, synthetic images, FID).
class_partitions = dg.StaticPartitionsDefinition(list(CLASS_KEYS))

_classifier = SettingsResource.from_env().get().classifier
# The classifier grid: the seven experiments x the profile's seeds.
experiment_partitions = dg.MultiPartitionsDefinition(
    {
        "experiment": dg.StaticPartitionsDefinition(list(_classifier.experiments)),
        "seed": dg.StaticPartitionsDefinition([str(s) for s in _classifier.seeds]),
    }
)


def class_label(class_key: str) -> int:
    """0 for normal, 1 for pneumonia (the dataset's ClassLabel order)."""
    return CLASS_KEYS.index(class_key)
