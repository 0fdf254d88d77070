"""The bisection on a load factor that the peak search (:mod:`partitioner.peak`) and the stgs
policy's *fill* spare capacity (:mod:`partitioner.policies.stgs_policy`) share. It imports no
policy, so that a policy can use it without importing itself back through the peak search."""

from __future__ import annotations

import math
from collections.abc import Callable

from stgs.plan import Plan


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
