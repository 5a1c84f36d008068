"""The full study's wall time on 1, 2, 4 and 8 cards and on a Kubernetes cluster, from the real graph.

Builds the step graph of the full profile's ``Definitions`` (``build_defs``), takes each step's cost
from a cost table (``benchmarks/costs_full.json``: README midpoints, all estimates, until
``benchmarks/gpu.py --costs`` measures a card) and list-schedules it
(``synth_xray_assets/operations/schedule.py``) three ways: one card per step; with data-parallel
DreamBooth (each class's share of the cards, ``dreambooth.data_parallel.ranks_for``); as built, also
the prior-class and synthetic images split by image index over the cards free when their step
starts (``generation.cards``; the base model's reference images on one card, beside DreamBooth).
Then, for the goals (30 minutes on one 8-card machine, 2 hours on one card), what each further
change would give, cumulatively, every figure an estimate.

    .venv/bin/python benchmarks/schedule.py [--costs benchmarks/costs_full.json] [--per-doubling F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np

from synth_xray_assets.classifier.data import experiment_spec, mix_normal_share, oversample_to_share
from synth_xray_assets.dataset.splits import class_count
from synth_xray_assets.definitions import build_defs
from synth_xray_assets.dreambooth.data_parallel import ranks_for
from synth_xray_assets.dreambooth.loss import num_train_steps
from synth_xray_assets.operations.schedule import (
    Cards,
    Schedule,
    Step,
    longest_path,
    scaling_efficiency,
    simulate,
    step_graph,
)
from synth_xray_assets.settings import CLASS_KEYS, Settings

ROOT = Path(__file__).resolve().parents[1]
# STUDY.md: real train 5216 = 1341 NORMAL + 3875 PNEUMONIA (672 and 1944 DreamBooth steps).
STUDY_REAL_TRAIN = {"normal": 1341, "pneumonia": 3875}
MACHINES = {"1 card": [1], "2 cards": [2], "4 cards": [4], "8 cards": [8], "k8s 2 x 8 (DP 4)": [8, 8]}
K8S_DP_CARDS = 4  # dreambooth.data_parallel_cards on Kubernetes, deploy/README.md's example
GOAL_8 = 30.0  # minutes on one 8-card machine
GOAL_1 = 120.0  # minutes on one card


@dataclass(frozen=True)
class Plan:
    """How the study runs: the graph as built and the changes that the tables compare."""

    per_doubling: float  # data-parallel efficiency: per_doubling ** log2(cards), from the cost table
    data_parallel: bool = False  # DreamBooth on several cards, split between the classes
    shard_generation: bool = False  # prior-class and synthetic images on the cards free at their start
    shard_reference: bool = False  # the base model's reference images too
    early_real_only: bool = False  # classifier runs with no synthetic image wait only for the dataset
    dreambooth_factor: float = 1.0
    generation_factor: float = 1.0
    seeds: int | None = None  # None: the settings' seeds


def load_costs(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text())["costs"]


def full_settings(seeds: int | None = None) -> Settings:
    overrides = {"classifier": {"seeds": list(range(seeds))}} if seeds else None
    return Settings.for_profile("full", tempfile.mkdtemp(prefix="schedule-"), overrides)


def images_per_class(s: Settings) -> int:
    """Synthetic images per class (and base-model reference images per class) on the study's real train."""
    return s.synthetic_count(s.generation.images_per_class, sum(STUDY_REAL_TRAIN.values()))


@cache
def full_graph(seeds: int | None) -> dict[str, Step]:
    """The step graph of the full profile's ``Definitions`` (``seeds`` seeds, or the settings')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return step_graph(build_defs(full_settings(seeds)))


def classifier_images_per_epoch(s: Settings, experiment: str) -> int:
    """Training images per epoch of one run: its real share of the pool (real train less the
    validation split), its synthetic images, or a balance control's oversampled pool."""
    c = s.classifier
    val = c.val_fraction if c.selection == "validation" else 0.0
    pool = {k: n - class_count(n, val) for k, n in STUDY_REAL_TRAIN.items()}
    labels = np.repeat([0, 1], [pool["normal"], pool["pneumonia"]])
    spec = experiment_spec(c, experiment)
    if spec.balance_like is not None:
        like = experiment_spec(c, spec.balance_like)
        share = mix_normal_share(
            labels, like.real_fraction, s.synthetic_count(like.n_synthetic, sum(STUDY_REAL_TRAIN.values()))
        )
        return len(labels) + len(oversample_to_share(labels, share, 0))
    real = sum(class_count(n, spec.real_fraction) for n in pool.values())
    return real + s.synthetic_count(spec.n_synthetic, sum(STUDY_REAL_TRAIN.values()))


def dreambooth_steps(s: Settings) -> dict[str, int]:
    return {k: num_train_steps(n, s.dreambooth) for k, n in STUDY_REAL_TRAIN.items()}


def step_minutes(
    s: Settings, steps: Mapping[str, Step], costs: Mapping[str, dict], plan: Plan
) -> dict[str, float]:
    """Each step's minutes on one card under ``plan``'s speed-ups."""
    gen_rate = costs["generation_images_per_s"]["value"] / plan.generation_factor
    gen_minutes = images_per_class(s) / gen_rate / 60
    ref_rate = costs["base_model_images_per_s"]["value"] / plan.generation_factor
    ref_minutes = images_per_class(s) / ref_rate / 60
    db_steps = dreambooth_steps(s)
    out: dict[str, float] = {}
    for name, step in steps.items():
        key = step.partition
        if step.asset == "dreambooth_checkpoint":
            rate = costs["dreambooth_optimizer_steps_per_s"]["value"]
            out[name] = db_steps[key] / rate / 60 * plan.dreambooth_factor
        elif step.asset == "synthetic_images":
            out[name] = gen_minutes
        elif step.asset == "base_model_images":
            out[name] = ref_minutes
        elif step.asset == "fid_scores":
            out[name] = costs["fid_scores"]["value"]
        elif step.asset == "classifier_experiment":
            experiment = key.split("|")[0]
            images = classifier_images_per_epoch(s, experiment) * s.classifier.epochs
            out[name] = images / costs["classifier_train_images_per_s"]["value"] / 60
        else:
            out[name] = costs[step.asset]["value"]
    return out


def planned(plan: Plan, machines: list[int], costs: Mapping[str, dict]):
    """The steps, their minutes and their cards under ``plan`` on ``machines``."""
    s = full_settings(plan.seeds)
    steps = dict(full_graph(plan.seeds))
    if plan.early_real_only:
        for name, step in steps.items():
            if step.asset == "classifier_experiment":
                spec = experiment_spec(s.classifier, step.partition.split("|")[0])
                if spec.n_synthetic == 0:  # the baseline and the balance controls
                    deps = tuple(d for d in step.deps if not d.startswith("synthetic_images"))
                    steps[name] = replace(step, deps=deps)
    minutes = step_minutes(s, steps, costs, plan)
    cluster = len(machines) > 1  # Kubernetes: a pod sees the GPUs it asked for, one unless set
    # The rule the generation assets follow (ComputeResource.generation_devices, generation.cards
    # None): the cards free when the step starts, a synthetic set at most its share of the machine
    # (the cards / the generators), the base model's images one card. A pod holds one card.
    most = {"prior_class_images": 0, "synthetic_images": max(machines) // len(CLASS_KEYS)}
    sharded = {"prior_class_images", "synthetic_images"} if plan.shard_generation and not cluster else set()
    if plan.shard_reference and not cluster:
        sharded.add("base_model_images")
    elastic = {n: most.get(st.asset, 0) for n, st in steps.items() if st.asset in sharded}
    cards: dict[str, int] = {}
    if plan.data_parallel:
        # The rule the asset follows (dreambooth.data_parallel.ranks_for): each class's share of one
        # machine's cards by its steps, rounded down to a count that divides the global batch; on
        # Kubernetes dreambooth.data_parallel_cards, one count for both classes.
        db_steps = dreambooth_steps(s)
        for c in CLASS_KEYS:
            k = K8S_DP_CARDS if cluster else ranks_for(c, db_steps, max(machines), s.dreambooth)
            name = f"dreambooth_checkpoint[{c}]"
            cards[name] = k
            minutes[name] = minutes[name] / (k * scaling_efficiency(k, plan.per_doubling))
    return steps, minutes, Cards(cards, elastic)


def run(plan: Plan, machines: list[int], costs: Mapping[str, dict]) -> tuple[Schedule, dict, dict, Cards]:
    steps, minutes, cards = planned(plan, machines, costs)
    return simulate(steps, minutes, machines, cards), steps, minutes, cards


def hm(minutes: float) -> str:
    """``1:05`` for 65 minutes."""
    m = round(minutes)
    return f"{m // 60}:{m % 60:02d}"


def collapsed(chain: list[tuple[str, str]], minutes: Mapping[str, float]) -> str:
    """The chain with runs of one asset's steps folded: ``classifier_experiment x 50 (64 min)``."""
    groups: list[list] = []
    for name, how in chain:
        asset = name.split("[")[0]
        if groups and groups[-1][0] == asset and how == "card":
            groups[-1][1].append(name)
        else:
            groups.append([asset, [name], how])
    parts = []
    for asset, names, how in groups:
        total = sum(minutes[n] for n in names)
        label = names[0] if len(names) == 1 else f"{asset} x {len(names)}"
        arrow = {"start": "", "after": " -> ", "card": " ~> "}[how]
        parts.append(f"{arrow}{label} {total:.0f}")
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", type=Path, default=Path("benchmarks/costs_full.json"))
    parser.add_argument(
        "--per-doubling",
        type=float,
        help="data-parallel efficiency per doubling (default: the cost table's, measured or not)",
    )
    args = parser.parse_args()
    costs = load_costs(args.costs)
    if args.per_doubling is None:
        args.per_doubling = costs["dreambooth_data_parallel_per_doubling"]["value"]
    est = any(e["estimate"] for e in costs.values())
    mark = " (est.)" if est else ""
    measured = sorted(k for k, e in costs.items() if not e["estimate"])
    s = full_settings()
    db = dreambooth_steps(s)
    n_runs = len(s.classifier.all_experiments()) * len(s.classifier.seeds)
    print(f"benchmarks/schedule.py: the full profile's graph, costs from {args.costs}")
    print(f"  measured entries: {', '.join(measured) or 'none: every figure below is an estimate'}")
    print(
        f"  DreamBooth {db['normal']} / {db['pneumonia']} steps, {images_per_class(s)} images per class, "
        f"{len(s.classifier.all_experiments())} experiments x {len(s.classifier.seeds)} seeds = {n_runs} "
        f"classifier runs; data-parallel efficiency {args.per_doubling}^log2(k)"
    )

    base = Plan(per_doubling=args.per_doubling)
    plans = {
        "a card per step": base,
        "DP DreamBooth": replace(base, data_parallel=True),
        "as built": replace(base, data_parallel=True, shard_generation=True),
    }
    print(
        f"\nWall time, h:mm{mark}; DP = data-parallel DreamBooth, cards split between the classes by "
        "steps; as built = DP and the prior-class and synthetic images on the cards free at their start"
    )
    print(
        f"{'machines':18s}"
        + "".join(f"{p:>16s}" for p in plans)
        + f"{'DP cards N,P':>14s}{'busy (built)':>14s}"
    )
    results: dict[tuple[str, str], Schedule] = {}
    for label, machines in MACHINES.items():
        row = f"{label:18s}"
        for pname, plan in plans.items():
            sched, steps, minutes, cards = run(plan, machines, costs)
            results[(label, pname)] = sched
            row += f"{hm(sched.total) + mark:>16s}"
        split = ",".join(str(cards.fixed.get(f"dreambooth_checkpoint[{c}]", 1)) for c in CLASS_KEYS)
        busy = sched.card_minutes() / (sched.total * sum(machines))
        print(row + f"{split:>14s}{busy:>14.0%}")

    steps, minutes, _ = planned(base, [1], costs)
    floor, path = longest_path(steps, minutes)
    print(f"\nLongest dependency chain as built (no number of cards beats it): {hm(floor)}{mark}")
    print("  " + collapsed([(n, "start" if i == 0 else "after") for i, n in enumerate(path)], minutes))
    print("\nCritical path of the schedule, minutes (-> after its dependency, ~> waited for a card):")
    for label, pname in [
        ("1 card", "as built"),
        ("8 cards", "a card per step"),
        ("8 cards", "as built"),
        ("k8s 2 x 8 (DP 4)", "as built"),
    ]:
        sched = results[(label, pname)]
        steps, _, _ = planned(plans[pname], MACHINES[label], costs)
        ran = {n: sched.end[n] - sched.start[n] for n in sched.end}  # a sharded step: its wall time
        print(f"  {label}, {pname} ({hm(sched.total)}{mark}): {collapsed(sched.critical_path(steps), ran)}")

    levers = [
        (
            "start: as built (above)",
            {},
            "no",
            "data-parallel DreamBooth, the FID reference beside it, generation on the free cards",
        ),
        (
            "real-only runs start after the dataset",
            {"early_real_only": True},
            "no",
            "the baseline and balance controls (20 of 50 runs) use no synthetic image (their own asset)",
        ),
        (
            "the FID reference on free cards too",
            {"shard_reference": True},
            "no",
            "base_model_images on the cards free at its start (generation.cards), not one",
        ),
        (
            "cached latents in DreamBooth",
            {"dreambooth_factor": 0.85},
            "no",
            "x0.85 DreamBooth: the VAE encodes each image once, not 16 images a step",
        ),
        (
            "bf16 weights + AdamW states",
            {"dreambooth_factor": 0.85 * 0.75},
            "yes",
            "x0.75 DreamBooth: numerics",
        ),
        (
            "half the DreamBooth images (4 epochs)",
            {"dreambooth_factor": 0.85 * 0.75 * 0.5},
            "yes",
            "x0.5 DreamBooth; fewer steps at a larger batch save time only so",
        ),
        (
            "25 DPM-Solver steps, not 50",
            {"generation_factor": 0.5},
            "yes",
            "x0.5 generation and FID reference",
        ),
        ("3 seeds, not 5", {"seeds": 3}, "yes", "x0.6 classifiers: wider intervals"),
    ]
    print(
        f"\nGoal: under {GOAL_8:.0f} min on one 8-card machine, under {GOAL_1 / 60:.0f} h on one card. "
        "Each change on top of those above it; every factor an ESTIMATE (not measured), every time (est.)"
    )
    print(f"{'change':44s} {'changes results':>15s} {'1 card':>8s} {'8 cards':>8s}  effect")
    plan = plans["as built"]
    reached: dict[str, str] = {}
    for name, update, changes, effect in levers:
        plan = replace(plan, **update)
        one, eight = (run(plan, m, costs)[0].total for m in ([1], [8]))
        print(f"{name:44s} {changes:>15s} {hm(one):>8s} {hm(eight):>8s}  {effect}")
        if eight < GOAL_8:
            reached.setdefault("8", name)
        if one < GOAL_1:
            reached.setdefault("1", name)
    for key, goal in (("8", f"{GOAL_8:.0f} min on 8 cards"), ("1", f"{GOAL_1 / 60:.0f} h on one card")):
        print(
            f"  {goal}: "
            + (f"reached at '{reached[key]}' (est.)" if key in reached else "not reached by these")
        )
    if "1" not in reached:  # on one card the wall time is the sum of the work: say where it goes
        _, minutes, _ = planned(plan, [1], costs)
        by_asset: dict[str, float] = {}
        for name, m in minutes.items():
            by_asset[name.split("[")[0]] = by_asset.get(name.split("[")[0], 0.0) + m
        top = sorted(by_asset.items(), key=lambda kv: -kv[1])[:4]
        print(
            f"  one card after every change, {hm(sum(minutes.values()))} of work (est.): "
            + ", ".join(f"{a} {hm(m)}" for a, m in top)
            + f"; {hm(sum(minutes.values()) - GOAL_1)} more to cut"
        )


if __name__ == "__main__":
    sys.exit(main())
