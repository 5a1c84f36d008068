"""The study's step graph from the demo Definitions, and the list scheduler on small known cases."""

import pytest

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.operations.schedule import (
    Cards,
    Step,
    longest_path,
    scaling_efficiency,
    simulate,
    step_graph,
)
from synth_xray_assets.settings import Settings


def gpu(name: str, *deps: str) -> Step:
    return Step(name, name, None, "gpu", deps)


def test_two_cards_halve_two_independent_equal_steps():
    steps = {s.name: s for s in (gpu("a"), gpu("b"))}
    minutes = {"a": 10.0, "b": 10.0}
    assert simulate(steps, minutes, [1]).total == 20.0
    assert simulate(steps, minutes, [2]).total == 10.0
    assert simulate(steps, minutes, [1, 1]).total == 10.0  # two machines of one card


def test_a_chain_is_not_sped_up_by_cards():
    steps = {s.name: s for s in (gpu("a"), gpu("b", "a"), gpu("c", "b"))}
    minutes = {"a": 1.0, "b": 2.0, "c": 3.0}
    for cards in (1, 2, 8):
        sched = simulate(steps, minutes, [cards])
        assert sched.total == 6.0
        assert [n for n, _ in sched.critical_path(steps)] == ["a", "b", "c"]
    assert longest_path(steps, minutes) == (6.0, ["a", "b", "c"])


def test_longest_remaining_path_goes_first_and_waits_are_named():
    # one card: "long" heads a longer chain than "short", so it runs first although "short" sorts first
    steps = {s.name: s for s in (gpu("short"), gpu("long"), gpu("tail", "long"))}
    minutes = {"short": 1.0, "long": 2.0, "tail": 2.0}
    sched = simulate(steps, minutes, [1])
    assert sched.start == {"long": 0.0, "tail": 2.0, "short": 4.0}
    assert sched.critical_path(steps) == [("long", "start"), ("tail", "after"), ("short", "card")]


def test_steps_off_the_gpu_pool_take_no_card_and_multi_card_steps_wait_for_a_whole_machine():
    cpu = Step("cpu", "cpu", None, "cpu")
    steps = {s.name: s for s in (gpu("a"), gpu("b"), cpu, gpu("wide"))}
    minutes = {"a": 1.0, "b": 1.0, "cpu": 5.0, "wide": 1.0}
    sched = simulate(steps, minutes, [2], cards=Cards(fixed={"wide": 2}))
    assert sched.start["cpu"] == 0.0 and sched.cards["cpu"] == 0
    assert sched.total == 5.0 and sched.end["wide"] in (1.0, 2.0)
    assert simulate(steps, minutes, [1, 1], cards=Cards(fixed={"wide": 1})).total == 5.0
    with pytest.raises(ValueError, match="more cards than one machine"):
        simulate(steps, minutes, [1, 1], cards=Cards(fixed={"wide": 2}))


def test_an_elastic_step_takes_the_cards_free_when_it_starts():
    """A generation step splits its images over the cards free at its start (none waited for)."""
    steps = {s.name: s for s in (gpu("gen"), gpu("busy"), gpu("after", "gen"))}
    minutes = {"gen": 8.0, "busy": 20.0, "after": 1.0}
    # 4 cards, "busy" (the longer chain) starts first on one: "gen" takes the 3 free, 8/3 minutes
    sched = simulate(steps, minutes, [4], cards=Cards(elastic={"gen": 0}))
    assert sched.cards["gen"] == 3 and sched.end["gen"] == pytest.approx(8 / 3)
    assert sched.start["after"] == pytest.approx(8 / 3) and sched.total == 20.0
    capped = simulate(steps, minutes, [4], cards=Cards(elastic={"gen": 2}))  # at most 2
    assert capped.cards["gen"] == 2 and capped.end["gen"] == 4.0
    alone = simulate(steps, minutes, [1], cards=Cards(elastic={"gen": 0}))  # no card free: waits for one
    assert alone.cards["gen"] == 1 and alone.start["gen"] == 20.0


def test_data_parallel_scaling():
    assert scaling_efficiency(1, 0.9) == 1.0 and scaling_efficiency(4, 0.9) == pytest.approx(0.81)


def test_the_demo_definitions_give_the_expected_steps_and_dependencies(tmp_path):
    s = Settings.for_profile("demo", tmp_path)
    steps = step_graph(build_defs(s))
    runs = [n for n in steps if n.startswith("classifier_experiment[")]
    assert len(runs) == len(s.classifier.all_experiments()) * len(s.classifier.seeds)
    assert "chest_xray_source" not in steps  # observed, not materialized
    assert steps["chest_xray_dataset"].pool == "cpu" and steps["study_report"].pool is None
    for c in ("normal", "pneumonia"):
        assert steps[f"dreambooth_checkpoint[{c}]"].pool == "gpu"
        assert {"base_model", "prior_class_images"} <= set(steps[f"dreambooth_checkpoint[{c}]"].deps)
        assert steps[f"synthetic_images[{c}]"].deps == (f"dreambooth_checkpoint[{c}]",)
        assert f"synthetic_images[{c}]" in steps[f"fid_scores[{c}]"].deps
        # the FID reference waits for the base model only, and runs on a card beside DreamBooth
        ref = steps[f"base_model_images[{c}]"]
        assert ref.pool == "gpu" and set(ref.deps) == {"base_model", "chest_xray_dataset"}
        assert ref.name in steps[f"fid_scores[{c}]"].deps
    other = {"normal": "pneumonia", "pneumonia": "normal"}
    for c in other:  # identity mapping: a class's scores never wait for the other class
        assert f"synthetic_images[{other[c]}]" not in steps[f"fid_scores[{c}]"].deps
    for run in runs:
        assert {"synthetic_images[normal]", "synthetic_images[pneumonia]"} <= set(steps[run].deps)
    assert set(runs) <= set(steps["study_report"].deps)
    minutes = dict.fromkeys(steps, 1.0)
    one, many = simulate(steps, minutes, [1]), simulate(steps, minutes, [len(steps)])
    gpu_steps = sum(st.pool == "gpu" for st in steps.values())
    assert one.total >= gpu_steps  # one card runs every gpu step in turn
    assert many.total == longest_path(steps, minutes)[0]  # enough cards: only the chain counts
