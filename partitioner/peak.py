"""Peak load: the largest factor k on all rates that a policy still fits on the given GPUs."""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.fluid import fluid_bound
from partitioner.policies import Policy
from partitioner.problem import Problem
from stgs.plan import Plan


@dataclass(frozen=True)
class Peak:
    k: float
    plan: Plan
    bound: float  # the fluid bound: no policy can reach a larger k


def find_peak(problem: Problem, policy: Policy, rel_tol: float = 2e-3) -> Peak:
    """Bisection on k in (0, fluid bound]: the largest k whose plan serves every model.

    Heuristics need not be monotone in k (a plan may fail at k and fit at k' > k); bisection
    then returns some feasible k, and the plan returned is always the one made at that k.
    """
    bound = fluid_bound(problem)
    base = problem.models

    def attempt(k: float) -> Plan:
        return policy.plan(problem.with_models([m.scaled(k) for m in base]))

    hi = bound * (1 + 1e-6)
    if hi <= 0:
        plan = attempt(0.0)
        return Peak(0.0, plan.with_info(k_search="no positive k fits"), bound)
    top = attempt(hi)
    if top.feasible:
        return Peak(hi, top, bound)
    lo, lo_plan = 0.0, None
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        p = attempt(mid)
        if p.feasible:
            lo, lo_plan = mid, p
        else:
            hi = mid
    if lo_plan is None:
        lo_plan = attempt(lo)
    return Peak(lo, lo_plan, bound)
