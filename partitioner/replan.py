"""Incremental replanning: diff two plans, and prefer plans that change few partitions.

What changes is what the runtime does: the steps of ``stgs.transition.transition`` (one
identity, :class:`stgs.transition.PartitionKey`). A partition is *kept* when the runtime keeps
its worker (same GPU, shape, place, models and batches; a rate change only re-weights routing);
every other one is *added* (a worker started) or *removed* (a worker stopped): a batch or model
change restarts a worker and counts as one of each. A model is *moved* when the set of places
(GPU, shape, place) that serve it changes.

Score of a candidate: ``gpus_used + reconfig_cost * (partitions added + removed + 10 x GPUs
disrupted)``, among the candidates that serve every model (else the one serving the most). A
GPU is *disrupted* when the runtime stops serving partitions there before the new ones are
ready (``disruptive``: a MIG mode change under a serving GPU, or new MIG instances whose slices
old ones hold; MPS shares never break first). A fresh plan's GPUs are first renumbered
(``align_gpus``) so that new layouts land on GPUs idle now where they can.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import linear_sum_assignment

from partitioner.problem import Curve, Problem, Shape, schedule
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.transition import Transition, partition_keys, transition
from stgs.types import GpuSpec


@dataclass(frozen=True)
class Changes:
    partitions_added: int
    partitions_removed: int
    partitions_kept: int
    models_moved: tuple[str, ...]
    gpus_mode_changed: tuple[int, ...]

    @property
    def partitions_changed(self) -> int:
        return self.partitions_added + self.partitions_removed

    def to_dict(self) -> dict[str, object]:
        return {
            "partitions_added": self.partitions_added,
            "partitions_removed": self.partitions_removed,
            "partitions_kept": self.partitions_kept,
            "models_moved": list(self.models_moved),
            "gpus_mode_changed": list(self.gpus_mode_changed),
        }


def diff(old: Plan, new: Plan) -> Changes:
    return _changes(old, new, transition(old, new))


def _changes(old: Plan, new: Plan, change: Transition) -> Changes:
    def homes(plan: Plan) -> dict[str, set[tuple[object, ...]]]:
        out: dict[str, set[tuple[object, ...]]] = defaultdict(set)
        for k, (_, p) in partition_keys(plan).items():
            for m in p.models:
                out[m.name].add(k.place)
        return out

    oh, nh = homes(old), homes(new)
    moved = tuple(sorted(n for n in set(oh) | set(nh) if oh.get(n) != nh.get(n)))
    return Changes(
        len(change.started), len(change.stopped), len(change.kept), moved, change.mode_changed
    )


def current_rates(current: Plan) -> tuple[dict[str, float], dict[str, int]]:
    """Per model: the total rate the plan gives it, and how many partitions serve it."""
    old_rate: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for _, p in current.partitions():
        for a in p.models:
            old_rate[a.name] += a.rate_rps
            count[a.name] += 1
    return old_rate, count


def rate_share(a: ModelAssignment, old_rate: dict[str, float], count: dict[str, int]) -> float:
    """The share of its model's new rate an assignment keeps: its share of the old rate
    (evenly over its partitions where the old rate was zero)."""
    return a.rate_rps / old_rate[a.name] if old_rate[a.name] > 0 else 1 / count[a.name]


def keep_plan(problem: Problem, current: Plan) -> Plan | None:
    """The current partitions and model placement at the new rates, or None if it cannot hold.

    Each model's new rate is spread over its current partitions in proportion to the old rates
    (evenly where the old rates were zero); every partition's duty cycle is then re-solved.
    """
    models = {m.name: m for m in problem.models}
    old_rate, count = current_rates(current)
    if set(old_rate) != set(models):
        return None
    gpus = []
    for g in current.gpus:
        if g.index >= len(problem.gpus) or problem.gpus[g.index].sku != g.sku:
            return None
        gtype = problem.gpus[g.index]
        parts = []
        for p in g.partitions:
            shape = _shape_of(problem, gtype, p)
            if shape is None:
                return None
            items = []
            for a in p.models:
                m = models[a.name]
                share = rate_share(a, old_rate, count)
                c = problem.curve(m, gtype, shape)
                if c is None:
                    return None
                items.append((c, m.rate_rps * share))
            sched = schedule(items)
            if sched is None:
                return None
            parts.append(
                Partition(
                    kind=p.kind,
                    sm_count=p.sm_count,
                    memory_mib=p.memory_mib,
                    duty_cycle_ms=sched.duty_cycle_ms,
                    models=tuple(
                        ModelAssignment(
                            s.curve.model.name,
                            s.batch,
                            s.rate_rps,
                            _rescaled(s.curve, s.batch, a.latency_ms, a.batch),
                        )
                        for s, a in zip(sched.slots, p.models, strict=True)
                    ),
                    mig_profile=p.mig_profile,
                    mig_start=p.mig_start,
                    mps_pct=p.mps_pct,
                )
            )
        gpus.append(GpuPlan(g.index, g.sku, g.mig, tuple(parts)))
    return Plan(policy=current.policy, feasible=True, gpus=tuple(gpus))


def _rescaled(curve: Curve, batch: int, old_latency: float, old_batch: int) -> float:
    """Predicted latency at the new batch, keeping the interference the old plan reported
    (the neighbours did not change)."""
    i = int(curve.buckets.searchsorted(batch))
    j = int(curve.buckets.searchsorted(old_batch))
    if j < len(curve.raw_solo) and curve.raw_solo[j] > 0 and old_latency > 0:
        return float(old_latency * curve.raw_solo[i] / curve.raw_solo[j])
    return float(curve.raw_solo[i] * curve.slowdown)


def _shape_of(problem: Problem, gtype: GpuSpec, p: Partition) -> Shape | None:
    for s in problem.shapes(gtype):
        if s.kind == p.kind and s.mig_profile == p.mig_profile and s.mps_pct == p.mps_pct:
            return s
    return None


def _on_one_gpu(old: GpuPlan | None, new: GpuPlan) -> Transition:
    """The runtime's steps on one GPU, from ``old`` (None: idle) to ``new``."""
    before = Plan("old", True, () if old is None else (old,))
    return transition(before, Plan("new", True, (new,)))


def disruptive(old: GpuPlan | None, new: GpuPlan) -> bool:
    """Must this GPU stop old partitions before its new ones are ready (no make before break)?

    The runtime's rule (``stgs.transition``): a change of MIG mode on a GPU that still serves,
    or new MIG instances whose slices old ones hold (those old ones stop first). MPS shares
    never do: new MPS workers start beside the old ones, whatever their shares add up to."""
    return bool(_on_one_gpu(old, new).early)


def disruptions(current: Plan, plan: Plan) -> int:
    return len(transition(current, plan).disrupted)


def align_gpus(current: Plan, plan: Plan, problem: Problem) -> Plan:
    """Renumber ``plan``'s GPUs (within each SKU and MIG capability) to keep most of the
    current partitions in place and to put new layouts on GPUs that are idle now, so that the
    runtime can start them before it stops the old ones. A linear assignment per GPU type."""
    old_by = {g.index: g for g in current.gpus}
    groups: dict[GpuSpec, list[GpuPlan]] = defaultdict(list)
    for g in plan.gpus:
        if g.index >= len(problem.gpus):
            return plan
        groups[problem.gpus[g.index]].append(g)  # same SKU and same MIG permission
    remap: dict[int, int] = {}
    for gs in groups.values():
        idx = [g.index for g in gs]
        if len(gs) < 2:
            continue
        cost = np.zeros((len(gs), len(idx)))
        for i, g in enumerate(gs):
            for j, phys in enumerate(idx):
                old = old_by.get(phys)
                change = _on_one_gpu(old, replace(g, index=phys))
                cost[i, j] = (
                    10.0 * bool(change.early)
                    + 3.0 * bool(change.mode_changed)
                    - len(change.kept)
                    + 1e-3 * abs(i - j)
                )
        rows, cols = linear_sum_assignment(cost)
        for r, c in zip(rows, cols, strict=True):
            remap[gs[r].index] = idx[c]
    if all(k == v for k, v in remap.items()):
        return plan
    gpus = sorted((replace(g, index=remap.get(g.index, g.index)) for g in plan.gpus),
                  key=lambda g: g.index)  # fmt: skip
    return replace(plan, gpus=tuple(gpus))


def score(
    plan: Plan, current: Plan, reconfig_cost: float, count_gpus: bool = True
) -> tuple[float, float]:
    """(unserved rate, GPUs + reconfig_cost x (partitions changed + 10 x disruptive GPUs));
    without ``count_gpus`` (spare capacity planning) the changes alone."""
    unserved = sum(u.rate_rps for u in plan.unserved)
    change = transition(current, plan)
    changes = len(change.started) + len(change.stopped) + 10 * len(change.disrupted)
    return (unserved, (plan.gpus_used if count_gpus else 0) + reconfig_cost * changes)


def choose_incremental(
    problem: Problem,
    current: Plan,
    fresh: Plan,
    repaired: Plan | None = None,
    *,
    count_gpus: bool = True,
) -> Plan:
    """Pick among keeping the current layout, repairing it (the current partitions kept, the
    new rates fitted into them and the free space: ``Greedy.repair``) and the fresh plan, by
    the reconfiguration-aware score; the chosen plan carries the changes it makes in
    ``info["changes"]``."""
    candidates = [align_gpus(current, fresh, problem)]
    kept = keep_plan(problem, current)
    if kept is not None:
        candidates.append(replace(kept, policy=fresh.policy))
    if repaired is not None:
        candidates.append(replace(repaired, policy=fresh.policy))
    cost = problem.options.reconfig_cost
    best = min(candidates, key=lambda p: score(p, current, cost, count_gpus))
    change = transition(current, best)
    return best.with_info(
        changes={
            **_changes(current, best, change).to_dict(),
            "gpus_disrupted": len(change.disrupted),
        }
    )
