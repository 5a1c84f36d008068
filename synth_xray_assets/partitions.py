"""The partitions shared across domains, from settings: one per generator, and experiment x seed.

A generator is one DreamBooth model and its synthetic images. With ``dreambooth.generators =
"study"`` there is one per class (``normal``, ``pneumonia``); with ``"matched"`` also one per class
and limited real fraction of the classifier experiments (``normal-r10``, ``pneumonia-r25``, ...),
fine-tuned only on that fraction's fixed real subset.
"""

import dagster as dg

from synth_xray_assets.settings import CLASS_KEYS, ClassifierSettings, Settings

# normal / pneumonia: the per-generator assets' partitions under the study's arrangement.
class_partitions = dg.StaticPartitionsDefinition(list(CLASS_KEYS))


def experiment_partitions(classifier: ClassifierSettings) -> dg.MultiPartitionsDefinition:
    """The classifier grid: the settings' experiments and balance controls x seeds."""
    return dg.MultiPartitionsDefinition(
        {
            "experiment": dg.StaticPartitionsDefinition(classifier.all_experiments()),
            "seed": dg.StaticPartitionsDefinition([str(s) for s in classifier.seeds]),
        }
    )


def fraction_tag(fraction: float) -> str:
    """``r10`` for 0.1, ``r25`` for 0.25, ``r12p5`` for 0.125: the matched generator's key suffix."""
    return "r" + f"{100 * fraction:g}".replace(".", "p")


def limited_fractions(experiments: dict[str, tuple[float, int]]) -> list[float]:
    """The real fractions strictly between 0 and 1 of experiments that use synthetic images."""
    return sorted({float(f) for f, n in experiments.values() if 0.0 < f < 1.0 and n > 0})


def generator_keys(generators: str, experiments: dict[str, tuple[float, int]]) -> list[str]:
    """Partition keys of the per-generator assets: one per class and, with matched generators,
    one per class and limited fraction (``normal-r10``, ...)."""
    keys = list(CLASS_KEYS)
    if generators == "matched":
        keys += [f"{c}-{fraction_tag(f)}" for f in limited_fractions(experiments) for c in CLASS_KEYS]
    return keys


def generator_partitions(s: Settings) -> dg.StaticPartitionsDefinition:
    """The per-generator assets' partitions under the settings (``class_partitions`` for "study")."""
    keys = generator_keys(s.dreambooth.generators, s.classifier.experiments)
    return class_partitions if keys == list(CLASS_KEYS) else dg.StaticPartitionsDefinition(keys)


def class_of_generator(s: Settings) -> dg.StaticPartitionMapping:
    """From a per-class asset (``base_model_images[normal]``) to the per-generator assets of that
    class (``fid_scores[normal]``, ``fid_scores[normal-r10]``, ...): every generator reads its
    class's partition."""
    keys = generator_keys(s.dreambooth.generators, s.classifier.experiments)
    return dg.StaticPartitionMapping({c: [k for k in keys if class_key_of(k) == c] for c in CLASS_KEYS})


def generator_for(class_key: str, real_fraction: float, generators: str) -> str:
    """The generator whose images an experiment with ``real_fraction`` of real train uses."""
    if generators == "matched" and 0.0 < real_fraction < 1.0:
        return f"{class_key}-{fraction_tag(real_fraction)}"
    return class_key


def parse_generator_key(key: str) -> tuple[str, float | None]:
    """``("normal", None)`` for ``normal`` (all of real train less validation); ``("normal", 0.1)``
    for ``normal-r10`` (the fixed 10% subset)."""
    class_key, _, tag = key.partition("-")
    if class_key not in CLASS_KEYS:
        raise ValueError(f"unknown generator key {key!r}: expected a class key {CLASS_KEYS}")
    if not tag:
        return class_key, None
    if not tag.startswith("r"):
        raise ValueError(f"unknown generator key {key!r}: expected '{class_key}-r<percent>'")
    return class_key, float(tag[1:].replace("p", ".")) / 100


def class_key_of(partition_key: str) -> str:
    """The class of a generator partition (``normal`` for ``normal`` and ``normal-r10``)."""
    return parse_generator_key(partition_key)[0]


def class_label(partition_key: str) -> int:
    """0 for normal, 1 for pneumonia (the dataset's ClassLabel order), of a generator partition."""
    return CLASS_KEYS.index(class_key_of(partition_key))
