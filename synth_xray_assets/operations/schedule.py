"""The study's steps on N cards: the step graph of a ``Definitions`` and a list scheduler.

A step is one asset partition (``dreambooth_checkpoint[normal]``, ``classifier_experiment[baseline|0]``)
or an unpartitioned asset. Its dependencies follow the asset graph's partition mappings (per-class
steps after the unpartitioned ones, the classifiers after every class's synthetic images, the report
after everything). A step of the ``gpu`` pool takes one card unless told otherwise; other steps take
none. Observable source assets are observed, not materialized, and are left out.

``simulate`` runs a list scheduler over machines of some cards each: whenever a step ends, every
ready step (its dependencies done) starts, longest remaining path first (ties by name), if some
machine has the cards it needs free. It knows nothing of the study's costs: the caller gives each
step's minutes and cards (``benchmarks/schedule.py`` reads them from a cost table).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

GPU_POOL = "gpu"
_EPS = 1e-9


@dataclass(frozen=True)
class Step:
    """One asset partition to materialize: its name, asset, partition key, pool and dependencies."""

    name: str
    asset: str
    partition: str | None = None
    pool: str | None = None
    deps: tuple[str, ...] = ()


def step_name(asset: str, partition: str | None) -> str:
    """``asset[partition]``, or ``asset`` when unpartitioned."""
    return f"{asset}[{partition}]" if partition is not None else asset


def step_graph(defs: dg.Definitions) -> dict[str, Step]:
    """Every materializable asset partition of ``defs`` as a step, with its partition-level
    dependencies (through the graph's partition mappings), in the graph's topological order."""
    graph = defs.resolve_asset_graph()
    keys = [k for k in graph.toposorted_asset_keys if graph.get(k).is_materializable]
    steps: dict[str, Step] = {}
    for key in keys:
        node = graph.get(key)
        partitions = node.partitions_def.get_partition_keys() if node.partitions_def else [None]
        pools = sorted(node.pools or ())
        for partition in partitions:
            deps: list[str] = []
            for parent in sorted(node.parent_keys):
                if not graph.has(parent) or not graph.get(parent).is_materializable:
                    continue
                parent_def = graph.get(parent).partitions_def
                if parent_def is None:
                    deps.append(step_name(parent.to_user_string(), None))
                    continue
                upstream = graph.get_parent_partition_keys_for_child(partition, parent, key)
                deps += [
                    step_name(parent.to_user_string(), p)
                    for p in upstream.partitions_subset.get_partition_keys()
                ]
            name = step_name(key.to_user_string(), partition)
            steps[name] = Step(
                name, key.to_user_string(), partition, pools[0] if pools else None, tuple(deps)
            )
    return steps


def default_cards(step: Step) -> int:
    """One card for a step of the gpu pool, none otherwise."""
    return 1 if step.pool == GPU_POOL else 0


def remaining_paths(steps: Mapping[str, Step], minutes: Mapping[str, float]) -> dict[str, float]:
    """Each step's minutes plus the longest chain of minutes after it (its priority)."""
    children: dict[str, list[str]] = {n: [] for n in steps}
    for s in steps.values():
        for d in s.deps:
            children[d].append(s.name)
    out: dict[str, float] = {}
    for name in reversed(topological_order(steps)):
        out[name] = minutes[name] + max((out[c] for c in children[name]), default=0.0)
    return out


def topological_order(steps: Mapping[str, Step]) -> list[str]:
    """The step names, each after its dependencies (ties by name); raises on a cycle or a missing step."""
    for s in steps.values():
        missing = [d for d in s.deps if d not in steps]
        if missing:
            raise KeyError(f"{s.name} depends on unknown steps {missing}")
    waiting = {n: len(set(s.deps)) for n, s in steps.items()}
    children: dict[str, list[str]] = {n: [] for n in steps}
    for s in steps.values():
        for d in set(s.deps):
            children[d].append(s.name)
    ready = sorted(n for n, w in waiting.items() if w == 0)
    order: list[str] = []
    while ready:
        n = heapq.heappop(ready)
        order.append(n)
        for c in children[n]:
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    if len(order) != len(steps):
        raise ValueError(f"the step graph has a cycle among {sorted(set(steps) - set(order))}")
    return order


def longest_path(steps: Mapping[str, Step], minutes: Mapping[str, float]) -> tuple[float, list[str]]:
    """The chain of dependencies with the most minutes: no number of cards finishes sooner."""
    paths = remaining_paths(steps, minutes)
    children: dict[str, list[str]] = {n: [] for n in steps}
    for s in steps.values():
        for d in s.deps:
            children[d].append(s.name)
    roots = [n for n, s in steps.items() if not s.deps]
    node = min(roots, key=lambda n: (-paths[n], n))
    chain = [node]
    while children[node]:
        node = min(children[node], key=lambda n: (-paths[n], n))
        chain.append(node)
    return paths[chain[0]], chain


@dataclass
class Schedule:
    """When each step ran and on which machine, the wall time, and the chain that set it."""

    start: dict[str, float] = field(default_factory=dict)
    end: dict[str, float] = field(default_factory=dict)
    machine: dict[str, int | None] = field(default_factory=dict)
    cards: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return max(self.end.values(), default=0.0)

    def card_minutes(self) -> float:
        return sum((self.end[n] - self.start[n]) * self.cards[n] for n in self.end)

    def critical_path(self, steps: Mapping[str, Step]) -> list[tuple[str, str]]:
        """The chain that ends last, each step with why it started when it did: ``"start"`` (at 0),
        ``"after"`` (the step before it in the chain, a dependency, ended then) or ``"card"`` (it
        waited for the cards the step before it freed)."""
        if not self.end:
            return []
        name = max(self.end, key=lambda n: (self.end[n], n))
        chain: list[tuple[str, str]] = []
        while True:
            t = self.start[name]
            deps = [d for d in steps[name].deps if abs(self.end[d] - t) <= _EPS]
            freed = [
                n
                for n in self.end
                if abs(self.end[n] - t) <= _EPS and self.cards[n] and self.machine[n] == self.machine[name]
            ]
            if t > _EPS and deps:
                chain.append((name, "after"))
                name = min(deps)
            elif t > _EPS and freed:
                chain.append((name, "card"))
                name = min(freed)
            else:
                chain.append((name, "start"))
                return chain[::-1]


@dataclass(frozen=True)
class Cards:
    """The cards of the steps that take other than one: ``fixed`` a set number (data-parallel
    DreamBooth); ``elastic`` every card free on one machine when the step starts, up to a most
    (0: no most), its one-card minutes split evenly over them (a generation step's image shards)."""

    fixed: Mapping[str, int] = field(default_factory=dict)
    elastic: Mapping[str, int] = field(default_factory=dict)


def simulate(
    steps: Mapping[str, Step],
    minutes: Mapping[str, float],
    machines: Sequence[int],
    cards: Cards | None = None,
) -> Schedule:
    """List-schedule ``steps`` on ``machines`` (cards per machine): a step starts when its
    dependencies are done and one machine has its cards free (``cards.fixed``, default one for the
    gpu pool, none otherwise; ``cards.elastic`` steps start on the machine with the most free cards
    and take them); ready steps are taken longest remaining path first, ties by name, and any that
    fits starts. A step needing more cards than any machine has raises ``ValueError``."""
    cards = cards or Cards()
    need = {n: cards.fixed.get(n, default_cards(s)) for n, s in steps.items()}
    too_big = [n for n, k in need.items() if k > max(machines, default=0)]
    if too_big:
        raise ValueError(f"steps {too_big} need more cards than one machine has ({list(machines)})")
    priority = remaining_paths(steps, minutes)
    waiting = {n: len(set(s.deps)) for n, s in steps.items()}
    children: dict[str, list[str]] = {n: [] for n in steps}
    for s in steps.values():
        for d in set(s.deps):
            children[d].append(s.name)
    free = list(machines)
    ready = [n for n, w in waiting.items() if w == 0]
    running: list[tuple[float, str]] = []
    out = Schedule(cards=need)
    now = 0.0
    while ready or running:
        ready.sort(key=lambda n: (-priority[n], n))
        for name in list(ready):
            if name in cards.elastic:
                need[name] = _free_now(free, cards.elastic[name])
            k = need[name]
            fits = [m for m, f in enumerate(free) if f >= k]
            if k and not fits:
                continue
            m = min(fits, key=lambda m: (free[m], m)) if k else None  # the fullest machine that fits
            if m is not None:
                free[m] -= k
            out.start[name], out.machine[name] = now, m
            share = k if name in cards.elastic else 1
            heapq.heappush(running, (now + minutes[name] / share, name))
            ready.remove(name)
        if not running:
            raise RuntimeError(f"no step can start: {ready}")  # unreachable: sizes were checked
        now = running[0][0]
        while running and running[0][0] <= now + _EPS:
            _, name = heapq.heappop(running)
            out.end[name] = now
            if out.machine[name] is not None:
                free[out.machine[name]] += need[name]
            for c in children[name]:
                waiting[c] -= 1
                if waiting[c] == 0:
                    ready.append(c)
    return out


def _free_now(free: Sequence[int], most: int) -> int:
    """The cards an elastic step takes: the most free on one machine, at least 1 (it then waits
    for a card like any step), at most ``most`` (0: no most)."""
    k = max(max(free, default=0), 1)
    return min(k, most) if most else k


def scaling_efficiency(k: int, per_doubling: float) -> float:
    """Data-parallel efficiency on ``k`` cards: ``per_doubling ** log2(k)`` (1 on one card)."""
    return per_doubling ** math.log2(k) if k > 1 else 1.0
