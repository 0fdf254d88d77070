"""One entry point for callers (the CLI, the daemon, benchmarks): scenario in, plan out."""

from __future__ import annotations

import time
from dataclasses import replace

from partitioner.fluid import fluid_bound
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from stgs.plan import Plan
from stgs.scenario import Scenario


def make_plan(
    scenario: Scenario,
    policy: str = "stgs",
    *,
    current: Plan | None = None,
    peak: bool = False,
    problem: Problem | None = None,
) -> Plan:
    """Plan ``scenario`` with ``policy``; with ``peak``, at the largest load factor k that fits.

    The plan's ``info`` carries ``solve_ms`` and, for peak, the fluid bound on k.
    """
    prob = problem if problem is not None else Problem.from_scenario(scenario)
    pol = get_policy(policy)
    t0 = time.perf_counter()
    if peak:
        res = find_peak(prob, pol)
        out = replace(res.plan, k=res.k).with_info(fluid_bound_k=round(res.bound, 6))
    else:
        out = pol.plan(prob, current)
    return out.with_info(solve_ms=round((time.perf_counter() - t0) * 1000, 3))


__all__ = ["fluid_bound", "make_plan"]
