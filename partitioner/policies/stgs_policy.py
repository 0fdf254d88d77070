"""``stgs``: adaptive partition sizes (MIG, MPS, MPS inside MIG) plus temporal sharing.

Runs the greedy engine in a few variants (every shape family; MIG-mode families only; flat
MPS only) and keeps the best plan: feasible first, then fewest GPUs, then least GPU compute in
partitions. With a current plan, it also considers keeping or repairing that plan and charges
every partition changed ``options.reconfig_cost`` GPUs (see ``partitioner.replan``).
"""

from __future__ import annotations

from dataclasses import replace

from partitioner.greedy import ALL_FAMILIES, FULL, MIG, MIG_MPS, MPS, Greedy, GreedyConfig
from partitioner.policies import Policy, register
from partitioner.problem import Problem
from stgs.plan import Plan

LARGE_MODELS = 100

_BASE = (
    GreedyConfig("stgs", ALL_FAMILIES),
    GreedyConfig("stgs", frozenset({MIG, MIG_MPS}), fallback_families=frozenset({FULL, MPS})),
    GreedyConfig("stgs", frozenset({FULL, MPS})),
)
VARIANTS = _BASE + tuple(replace(c, consolidate=False) for c in _BASE)


def plan_score(plan: Plan) -> tuple[float, ...]:
    """Lower is better: unserved rate, GPUs used, SMs allotted to partitions."""
    unserved = sum(u.rate_rps for u in plan.unserved)
    sms = sum(p.sm_count for _, p in plan.partitions())
    return (round(unserved, 6), plan.gpus_used, float(sms))


@register
class Stgs(Policy):
    name = "stgs"
    description = "spatio-temporal: adaptive MIG/MPS partition sizes + duty-cycle time sharing"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        # Large instances: the all-families variant alone (solve time grows with models x GPUs).
        variants = VARIANTS if len(problem.models) <= LARGE_MODELS else VARIANTS[:1]
        plans = [Greedy(problem, cfg).run() for cfg in variants]
        best = min(plans, key=plan_score)
        if current is not None:
            from partitioner.replan import choose_incremental

            repaired = Greedy(problem, VARIANTS[0]).repair(current)
            best = choose_incremental(problem, current, best, repaired)
        return best
