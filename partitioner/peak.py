"""Load factors: the largest factor k on all rates that a policy still fits on the given GPUs
(``find_peak``), and the search both it and the stgs policy's *fill* spare capacity use
(``largest_factor``)."""

from __future__ import annotations

import math
from collections.abc import Callable
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


def largest_factor(
    attempt: Callable[[float], Plan],
    lo: float,
    hi: float,
    *,
    accept: Callable[[Plan], bool] = lambda p: p.feasible,
    rel_tol: float = 2e-3,
    geometric: bool = False,
    first: float | None = None,
) -> tuple[float, Plan | None]:
    """Bisection on a factor in [``lo``, ``hi``]: the largest one whose plan ``accept`` takes.

    ``attempt(k)`` makes the plan at factor k; ``lo`` is taken as accepted without a plan
    (returned as None unless a larger factor is accepted). ``hi`` is tried first; then the
    bracket is halved (arithmetically, or ``geometric``-ally: in log space) until it is
    narrower than ``rel_tol`` (of ``hi``; geometric: ``hi / lo <= 1 + rel_tol``). ``first``,
    when inside the bracket, is the first split point instead of the middle (a factor the
    caller wants decided exactly). Deterministic: the same probes for the same inputs.

    Heuristics need not be monotone in k (a plan may fail at k and fit at k' > k); bisection
    then returns some accepted k, and the plan returned is always the one made at that k.
    """
    top = attempt(hi)
    if accept(top):
        return hi, top
    lo_plan: Plan | None = None

    def wide() -> bool:
        return hi > lo * (1 + rel_tol) if geometric else hi - lo > rel_tol * hi

    mid = first if first is not None and lo < first < hi else None
    while wide():
        if mid is None:
            mid = math.sqrt(lo * hi) if geometric else (lo + hi) / 2
        p = attempt(mid)
        if accept(p):
            lo, lo_plan = mid, p
        else:
            hi = mid
        mid = None
    return lo, lo_plan


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
