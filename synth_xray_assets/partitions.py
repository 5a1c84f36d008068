"""The partitions shared across domains: one per generator (class, or class x limited fraction with
matched generators), and experiment x seed. Both are functions of the settings (``*_partitions_for``)."""

import dagster as dg

from synth_xray_assets.dataset.splits import generator_keys, parse_generator_key
from synth_xray_assets.resources import SettingsResource
from synth_xray_assets.settings import CLASS_KEYS, Settings


def class_partitions_for(s: Settings) -> dg.StaticPartitionsDefinition:
    """normal / pneumonia (and, with matched generators, normal-r10, pneumonia-r10, ...): the
    per-generator assets (checkpoint, synthetic images, FID, memorization)."""
    return dg.StaticPartitionsDefinition(generator_keys(s.dreambooth.generators, s.classifier.experiments))


def experiment_partitions_for(s: Settings) -> dg.MultiPartitionsDefinition:
    """The classifier grid: the experiments and balance controls x the profile's seeds."""
    return dg.MultiPartitionsDefinition(
        {
            "experiment": dg.StaticPartitionsDefinition(s.classifier.all_experiments()),
            "seed": dg.StaticPartitionsDefinition([str(seed) for seed in s.classifier.seeds]),
        }
    )


_settings = SettingsResource.from_env().get()
class_partitions = class_partitions_for(_settings)
experiment_partitions = experiment_partitions_for(_settings)


def class_key_of(partition_key: str) -> str:
    """The class of a generator partition (``normal`` for ``normal`` and ``normal-r10``)."""
    return parse_generator_key(partition_key)[0]


def class_label(partition_key: str) -> int:
    """0 for normal, 1 for pneumonia (the dataset's ClassLabel order), of a generator partition."""
    return CLASS_KEYS.index(class_key_of(partition_key))
