"""``stgs``: adaptive partition sizes (MIG, MPS, MPS inside MIG) plus temporal sharing.

Runs the greedy engine in a few variants (every shape family; MIG-mode families only; flat
MPS only) and keeps the best plan: feasible first, then fewest GPUs, then least GPU compute in
partitions. With a current plan, it also considers keeping or repairing that plan and charges
every partition changed ``options.reconfig_cost`` GPUs (see ``partitioner.replan``).
"""

from __future__ import annotations

import math
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
# Small instances also try placing every rate as a residual (no saturated copies first): the
# exact optimum often time-shares two models over several small partitions at large batches.
SMALL_MODELS = 12
# They also try whole MIG instances only (no MPS inside MIG): two small instances beat one
# instance split into MPS shares (no interference, no share rounding) where the slices allow.
_NO_MIG_MPS = ALL_FAMILIES - {MIG_MPS}
SMALL_VARIANTS = (
    replace(_BASE[0], dedicate=False),
    replace(_BASE[0], families=_NO_MIG_MPS),
    replace(_BASE[0], families=_NO_MIG_MPS, dedicate=False),
    # and one model per flat MPS share (no time sharing), which can win on non-MIG GPUs where
    # the models' SLOs leave no room to share a cycle
    replace(_BASE[2], time_sharing=False, shrink=False),
)


def plan_score(plan: Plan) -> tuple[float, ...]:
    """Lower is better: unserved rate, GPUs used, SMs allotted to partitions."""
    unserved = sum(u.rate_rps for u in plan.unserved)
    sms = sum(p.sm_count for _, p in plan.partitions())
    return (round(unserved, 6), plan.gpus_used, float(sms))


def at_rates(plan: Plan, factor: float) -> Plan:
    """A plan made for rates x ``factor``, serving ``rates``: every assignment's rate divided
    by the factor; batches and duty cycles stay (still valid: fewer arrivals per cycle)."""
    gpus = tuple(
        replace(
            g,
            partitions=tuple(
                replace(
                    p,
                    models=tuple(replace(a, rate_rps=a.rate_rps / factor) for a in p.models),
                )
                for p in g.partitions
            ),
        )
        for g in plan.gpus
    )
    return replace(plan, gpus=gpus).with_info(spare_factor=round(factor, 4))


@register
class Stgs(Policy):
    name = "stgs"
    description = "spatio-temporal: adaptive MIG/MPS partition sizes + duty-cycle time sharing"

    @staticmethod
    def _fresh(problem: Problem, variants: tuple[GreedyConfig, ...]) -> Plan:
        return min((Greedy(problem, cfg).run() for cfg in variants), key=plan_score)

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        # Large instances: the all-families variant alone (solve time grows with models x GPUs).
        variants = VARIANTS if len(problem.models) <= LARGE_MODELS else VARIANTS[:1]
        if len(problem.models) <= SMALL_MODELS:
            variants = variants + SMALL_VARIANTS
        best = self._fresh(problem, variants)
        spare = problem.options.spare_factor
        if spare > 1 and best.feasible:
            # plan for more than the rates where the GPUs allow it (see PlannerOptions)
            for f in (spare, math.sqrt(spare)):
                p_f = problem.with_models([m.scaled(f) for m in problem.models])
                roomy = self._fresh(p_f, variants)
                if roomy.feasible:
                    best = at_rates(roomy, f)
                    break
        if current is not None:
            from partitioner.replan import choose_incremental

            repaired = Greedy(problem, VARIANTS[0]).repair(current)
            # with spare capacity the GPUs are meant to be used: judge changes, not GPU count
            best = choose_incremental(problem, current, best, repaired, count_gpus=spare <= 1)
        return best


@register
class StgsSpare(Stgs):
    """``stgs`` with spare capacity (``spare_factor`` 1.5 unless the problem sets one): what
    the daemon runs by default."""

    name = "stgs-spare"
    description = "stgs planning for 1.5x the rates where the GPUs allow (headroom), as the daemon"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        if problem.options.spare_factor <= 1:
            problem = problem.with_options(spare_factor=1.5)
        return replace(super().plan(problem, current), policy=self.name)
