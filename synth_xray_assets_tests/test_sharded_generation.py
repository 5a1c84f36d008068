"""One image set split by image index over several devices: the same bytes as on one, and a shard
that fails names itself, keeps what was made, and a re-run finishes the set."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from synth_xray_assets import storage
from synth_xray_assets.diffusion.generate import Recipe, ShardFailed, generate_set
from synth_xray_assets.diffusion.image_sets import MANIFEST
from synth_xray_assets.diffusion.pipelines import SavedPipeline

RECIPE = Recipe("a chest xray image", 2, 4.0, 32, seed_offset=100, extra_columns={"class_key": "normal"})
COUNT = 5


@dataclass(frozen=True)
class FailingAt:
    """A picklable factory whose pipeline raises when asked for image ``index``'s seed."""

    path: Path
    index: int

    def __call__(self, device: str):
        return _FailAtSeed(SavedPipeline(self.path)(device), RECIPE.seed_offset + self.index)


class _FailAtSeed:
    """The pipeline, but sampling the given seed raises (as a card falling over would)."""

    def __init__(self, pipe, seed):
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "_seed", seed)

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)

    def __call__(self, **kwargs):
        if any(g.initial_seed() == self._seed for g in kwargs["generator"]):
            raise RuntimeError(f"injected failure at seed {self._seed}")
        return self._pipe(**kwargs)


def make(factory, out, devices, batch_size=1):
    return generate_set(
        factory, out, COUNT, RECIPE, batch_size=batch_size, devices=devices, log=lambda m: None
    )


def files(out: Path) -> dict[str, bytes]:
    """Every file of the set, by its path in the set (temporaries too)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_failed_shard_is_named_and_two_shards_finish_to_the_one_device_bytes(tiny_base_model, tmp_path):
    # Two rounds of shard processes only: each spawned process imports torch and diffusers anew.
    one = make(SavedPipeline(tiny_base_model), tmp_path / "one", ("cpu",), batch_size=2)
    assert one.generated == list(range(COUNT))
    reference = files(tmp_path / "one")
    assert MANIFEST in reference and len(reference) == COUNT + 1

    out = tmp_path / "two"
    with pytest.raises(ShardFailed) as failed:
        make(FailingAt(tiny_base_model, 3), out, ("cpu", "cpu"))  # 3 is shard 1's second image
    err = failed.value
    assert (err.shard, err.device, err.index) == (1, "cpu", 3)
    assert "shard 1 of 2" in str(err) and "'cpu'" in str(err) and "image index 3" in str(err)
    assert "injected failure" in err.reason
    made = sorted(p.name for p in (out / "images").iterdir())
    assert made == ["00000.png", "00001.png", "00002.png", "00004.png"]  # shard 0 finished
    dead = _dead_temporary(out / "images" / "00003.png")

    again = make(SavedPipeline(tiny_base_model), out, ("cpu", "cpu"))  # shard 1 alone is started
    assert again.generated == [3] and again.reused == 4  # only the missing image
    assert not dead.exists()
    assert files(out) == reference  # PNGs and manifest, byte for byte


def _dead_temporary(path: Path) -> Path:
    """A temporary of ``path`` as a writer killed before its rename leaves it."""
    writer = subprocess.Popen(["true"])
    writer.wait()  # its pid is now free
    tmp = path.parent / f".{path.name}.{storage._HOST}-{writer.pid}.abcd1234.tmp"
    tmp.mkdir()
    (tmp / path.name).write_bytes(b"half a png")
    return tmp


def test_several_devices_refuse_a_lambda_before_any_work(tiny_base_model, tmp_path):
    with pytest.raises(TypeError, match="picklable"):
        make(lambda device: None, tmp_path, ("cpu", "cpu"))
    assert not (tmp_path / "images").exists()


def _prior_class_images(data: Path, compute) -> tuple[dict[str, bytes], dict]:
    """Materialize the dataset, ``base_model`` and ``prior_class_images`` (tiny models) under ``data`` with
    ``compute``; the prior set's files and the step's metadata."""
    import dagster as dg
    from conftest import tiny_overrides_json

    from synth_xray_assets.dataset import assets as dataset_assets
    from synth_xray_assets.dreambooth import assets as dreambooth_assets
    from synth_xray_assets.dreambooth.store import prior_dir
    from synth_xray_assets.resources import SettingsResource
    from synth_xray_assets.settings import Settings

    s = Settings.for_profile("demo")
    resources = {
        "settings": SettingsResource(data_dir=str(data), overrides_json=tiny_overrides_json()),
        "compute": compute,
    }
    assets = [
        dataset_assets.chest_xray_dataset,
        dreambooth_assets.base_model_asset(s),
        dreambooth_assets.prior_class_images_asset(s),
    ]
    result = dg.materialize(assets, resources=resources)
    assert result.success
    meta = result.asset_materializations_for_node("prior_class_images")[0].metadata
    return files(prior_dir(data)), {k: v.value for k, v in meta.items()}


def test_a_generation_step_splits_its_images_over_the_free_cards(tmp_path):
    """``prior_class_images`` on a machine of three (fake) cards, one of them held by another
    program: the step takes its card and the other free one, makes the set in two shard processes
    (each a device of its own; on this CPU both are ``cpu``), and writes the same bytes as a machine
    without cards; the busy card is skipped, not waited for."""
    import fcntl
    import os

    from synth_xray_assets.cards import CardConfig, lock_file
    from synth_xray_assets.layout import Layout
    from synth_xray_assets.resources import ComputeResource

    one, one_meta = _prior_class_images(tmp_path / "one", ComputeResource())
    assert one_meta["device"] == "cpu" and "gpu_cards" not in one_meta  # no card: nothing locked
    cards = [CardConfig(index=i, name=f"Fake {i}", total_memory=2**34, key=f"fake-{i}") for i in range(3)]
    data = tmp_path / "three"
    busy = lock_file(Layout(data).card_locks, cards[2])
    busy.parent.mkdir(parents=True)
    fd = os.open(busy, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another program's step on card 2
    try:
        three, meta = _prior_class_images(data, ComputeResource(cards=cards))
    finally:
        os.close(fd)
    assert three == one  # PNGs and manifest, byte for byte
    assert meta["device"] == "cpu, cpu"  # its own card and the free one: two shards
    assert [c["key"] for c in meta["gpu_cards"]] == ["fake-0", "fake-1"]
