"""Load factors: the largest factor k on all rates that a policy still fits on the given GPUs
(``find_peak``), by the bisection the stgs policy's *fill* spare capacity uses too
(:func:`partitioner.search.largest_factor`)."""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.fluid import fluid_bound
from partitioner.policies import Policy
from partitioner.problem import Problem
from partitioner.search import largest_factor
from stgs.plan import Plan


@dataclass(frozen=True)
class Peak:
    k: float
    plan: Plan
    bound: float  # the fluid bound: no policy can reach a larger k


def find_peak(problem: Problem, policy: Policy, rel_tol: float = 2e-3) -> Peak:
    """Bisection on k in (0, fluid bound]: the largest k whose plan serves every model."""
    bound = fluid_bound(problem)
    base = problem.models

    def attempt(k: float) -> Plan:
        return policy.plan(problem.with_models([m.scaled(k) for m in base]))

    hi = bound * (1 + 1e-6)
    if hi <= 0:
        plan = attempt(0.0)
        return Peak(0.0, plan.with_info(k_search="no positive k fits"), bound)
    k, at_k = largest_factor(attempt, 0.0, hi, rel_tol=rel_tol)
    return Peak(k, at_k if at_k is not None else attempt(k), bound)
