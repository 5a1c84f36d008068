"""The study's step graph from the demo Definitions, and the list scheduler on small known cases."""

import pytest

from synth_xray_assets.definitions import build_defs
from synth_xray_assets.operations.schedule import (
    Step,
    add_step,
    longest_path,
    scaling_efficiency,
    simulate,
    split_cards,
    split_step,
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
    sched = simulate(steps, minutes, [2], cards={"wide": 2})
    assert sched.start["cpu"] == 0.0 and sched.cards["cpu"] == 0
    assert sched.total == 5.0 and sched.end["wide"] in (1.0, 2.0)
    assert simulate(steps, minutes, [1, 1], cards={"wide": 1}).total == 5.0
    with pytest.raises(ValueError, match="more cards than one machine"):
        simulate(steps, minutes, [1, 1], cards={"wide": 2})


def test_graph_edits_and_card_splits():
    steps = {s.name: s for s in (gpu("gen"), gpu("use", "gen"))}
    split = split_step(steps, "gen", 2)
    assert sorted(split) == ["gen#0", "gen#1", "use"] and split["use"].deps == ("gen#0", "gen#1")
    added = add_step(steps, gpu("ref"), before=["use"])
    assert added["use"].deps == ("gen", "ref")
    assert split_cards({"normal": 672, "pneumonia": 1944}, 8, 8) == {"normal": 2, "pneumonia": 6}
    assert split_cards({"normal": 672, "pneumonia": 1944}, 2, 8) == {"normal": 1, "pneumonia": 1}
    assert split_cards({"normal": 672, "pneumonia": 1944}, 16, 8) == {"normal": 4, "pneumonia": 8}
    assert scaling_efficiency(1) == 1.0 and scaling_efficiency(4) == pytest.approx(0.81)


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
