"""The fluid bound and the fractional split of each model's rate over GPU types.

Serving one request/s of model m on shape s of GPU type t costs ``frac(s) / T`` of a GPU's
compute and ``mem_frac(s) / T`` of its memory slices, with ``T(m, t, s)`` the saturated
throughput at the best batch b with ``2 (1 + h) l(b, s) <= slo`` (planning-notes.md: the
efficiency frontier). Packing fractionally (a linear program) gives

    k* = max k  s.t.  sum_{t,s} y[m,t,s] = k r_m                       for every model m
                      sum_{m,s} y[m,t,s] frac(s) / T(m,t,s) <= N_t       compute, per GPU type
                      sum_{m,s} y[m,t,s] mem_frac(s) / T(m,t,s) <= N_t   memory slices, per type

No plan can beat k*: every valid MIG layout keeps both sums <= 1 per GPU (MPS shares keep their
one sum <= 1), and a model that time-shares a partition still uses a share >= r / T of it (its
batch latency is at most slo/2 because d >= L and d + L <= slo). The bound leaves interference
out (it only makes things slower), so it stays an upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import linprog

from partitioner.problem import Problem
from stgs.types import GpuSpec, ModelSpec

_EPS = 1e-9


def _lp(
    problem: Problem, costs: dict[tuple[str, GpuSpec], float], maximize_k: bool
) -> tuple[float, dict[tuple[str, GpuSpec], float]] | None:
    """Solve the fluid LP. maximize_k: max k; else min total GPU use at k = 1."""
    models = [m for m in problem.models if m.rate_rps > 0]
    types = problem.gpu_types
    var: list[tuple[str, GpuSpec]] = [
        (m.name, t)
        for m in models
        for t in types
        if math.isfinite(costs.get((m.name, t), math.inf))
    ]
    if not models:
        return (math.inf if maximize_k else 1.0), {}
    served = {name for name, _ in var}
    if any(m.name not in served for m in models):
        return None
    n = len(var) + 1  # last variable: k
    idx = {v: i for i, v in enumerate(var)}
    a_eq = np.zeros((len(models), n))
    for r, m in enumerate(models):
        for t in types:
            i = idx.get((m.name, t))
            if i is not None:
                a_eq[r, i] = 1.0
        a_eq[r, -1] = -m.rate_rps
    a_ub = np.zeros((len(types), n))
    for r, t in enumerate(types):
        for (name, tt), i in idx.items():
            if tt == t:
                a_ub[r, i] = costs[(name, tt)]
    b_ub = np.array([problem.count(t) for t in types], dtype=float)
    c = np.zeros(n)
    bounds: list[tuple[float, float | None]]
    if maximize_k:
        c[-1] = -1.0
        bounds = [(0.0, None)] * n
    else:
        for (name, t), i in idx.items():
            c[i] = costs[(name, t)]
        bounds = [(0.0, None)] * (n - 1) + [(1.0, 1.0)]
    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=np.zeros(len(models)),
        bounds=bounds,
        method="highs",
    )
    if res.status != 0:
        return None
    x = res.x
    return float(x[-1]), {v: float(x[i]) for v, i in idx.items()}


def _columns(
    problem: Problem, models: list[ModelSpec], k: float | None, interference: bool
) -> list[tuple[int, int, float, float]]:
    """LP columns (model row, type row, compute cost, memory cost) per request/s.

    ``k=None``: the classic frontier, every feasible batch at its saturated throughput. Else the
    batches a model's rate ``k r`` can fill: a duty cycle ``d`` gathers ``n = k r d / 1000``
    requests and ``d + L(b) <= slo``, so a bucket ``b`` carries at most
    ``n_b = min(b, k r (slo - L(b)) / 1000)`` requests per run at cost ``frac L(b) / (1000 n_b)``
    per request/s (a split rate only gathers fewer).
    """
    cols: list[tuple[int, int, float, float]] = []
    for mi, m in enumerate(models):
        for ti, t in enumerate(problem.gpu_types):
            front: list[tuple[float, float]] = []
            for shape in problem.shapes(t):
                curve = problem.curve(m, t, shape)
                if curve is None:
                    continue
                # the classic bound: profile latency with headroom only; with
                # ``interference``: the planner's latency (interference and host costs)
                lat = curve.lat if interference else curve.raw_solo * (1.0 + curve.headroom)
                slo = curve.slo if interference else m.slo_ms
                ok = (2 * lat <= slo + _EPS) & (curve.memory <= shape.memory_mib)
                if not ok.any():
                    continue
                b = curve.buckets[ok].astype(np.float64)
                lb = lat[ok]
                n = b if k is None else np.minimum(b, k * m.rate_rps * (slo - lb) / 1000.0)
                pos = n > 0
                if not pos.any():
                    continue
                per_rps = float(np.min(lb[pos] / (1000.0 * n[pos])))  # GPU-time per request/s
                front.append((shape.frac * per_rps, shape.mem_frac * per_rps))
            # keep the Pareto front of (compute, memory) cost per request/s
            front.sort()
            best_mem = math.inf
            for cc, mc in front:
                if mc < best_mem - 1e-15:
                    cols.append((mi, ti, cc, mc))
                    best_mem = mc
    return cols


def _max_k(
    problem: Problem, models: list[ModelSpec], cols: list[tuple[int, int, float, float]]
) -> float:
    """The LP: largest k with every model's rate k r_m packed fractionally at these costs."""
    types = problem.gpu_types
    served = {mi for mi, *_ in cols}
    if len(served) < len(models):
        return 0.0
    n = len(cols) + 1
    a_eq = np.zeros((len(models), n))
    a_ub = np.zeros((2 * len(types), n))
    for j, (mi, ti, cc, mc) in enumerate(cols):
        a_eq[mi, j] = 1.0
        a_ub[2 * ti, j] = cc
        a_ub[2 * ti + 1, j] = mc
    for mi, m in enumerate(models):
        a_eq[mi, -1] = -m.rate_rps
    b_ub = np.repeat([float(problem.count(t)) for t in types], 2)
    c = np.zeros(n)
    c[-1] = -1.0
    res = linprog(
        c,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=a_eq,
        b_eq=np.zeros(len(models)),
        bounds=[(0, None)] * n,
        method="highs",
    )
    return float(res.x[-1]) if res.status == 0 else 0.0


def fluid_bound(
    problem: Problem, *, interference: bool = False, rate_aware: bool = True, rel_tol: float = 1e-4
) -> float:
    """k*: the largest factor on all rates that a fractional packing could serve (0: none).

    Every model is served at its most efficient partition shape and batch, packed fractionally
    (compute and memory slices per GPU type). ``rate_aware`` (default) admits only the batches
    that the model's scaled rate fills within its SLO (see ``_columns``): a model at 20 request/s
    with a 50 ms SLO never runs batches of 64, in any plan. Its cost per request/s then falls as
    k grows while k r_m grows, so the served load is monotone in k and a bisection on k finds
    the bound. ``rate_aware=False`` is the classic frontier (saturated batches at any rate),
    looser still. ``interference=True`` charges every MPS shape the slowdown of a GPU (or MIG
    instance) filled with neighbours: no longer a bound (a partition may run beside idle
    neighbours), but a diagnostic of how much of the gap to k* the interference model explains.
    """
    models = [m for m in problem.models if m.rate_rps > 0]
    if not models:
        return math.inf
    k_hi = _max_k(problem, models, _columns(problem, models, None, interference))
    if not rate_aware or k_hi <= 0:
        return k_hi
    # Fixed-point iteration from above: for k >= k*, costs at k are no larger than at k*, so the
    # LP at rate-k costs still reaches k* (k' >= k*), and k' < k until k = k*. Every iterate
    # is therefore an upper bound, decreasing to k*.
    k = k_hi
    for _ in range(100):
        k_next = _max_k(problem, models, _columns(problem, models, k, interference))
        if k_next >= k * (1 - rel_tol):
            return k
        k = k_next
    return k


def split_rates(
    problem: Problem, costs: dict[tuple[str, GpuSpec], float]
) -> dict[tuple[str, GpuSpec], float]:
    """How much of each model's rate each GPU type should serve (guidance for rounding)."""
    types = problem.gpu_types
    out: dict[tuple[str, GpuSpec], float] = {}
    if len(types) == 1:
        for m in problem.models:
            out[(m.name, types[0])] = m.rate_rps
        return out
    sol = _lp(problem, costs, maximize_k=False)
    if sol is None:
        sol_k = _lp(problem, costs, maximize_k=True)
        if sol_k is None or sol_k[0] <= 0:
            # no fractional packing at all: send each model to its cheapest type
            for m in problem.models:
                t = min(types, key=lambda t: costs.get((m.name, t), math.inf))
                out[(m.name, t)] = m.rate_rps
            return out
        k, y = sol_k
        sol = (1.0, {v: val / k for v, val in y.items()})
    _, y = sol
    for m in problem.models:
        if m.rate_rps <= 0:
            t = min(types, key=lambda t: costs.get((m.name, t), math.inf))
            out[(m.name, t)] = 0.0
            continue
        for t in types:
            val = y.get((m.name, t), 0.0)
            if val > 1e-6 * m.rate_rps:
                out[(m.name, t)] = val
    return out


@dataclass(frozen=True)
class RateExcess:
    """Rates that no plan can serve on the node: the model named (alone above its bound, or
    the largest share of the node when only the rates together are too high), its rate, the
    upper bound of its rate, and ``factor``: the largest factor on all rates that could fit
    (None: the model alone is above its bound)."""

    model: str
    rate_rps: float
    bound_rps: float
    factor: float | None = None

    @property
    def message(self) -> str:
        if self.factor is None:
            return (
                f"rate {self.rate_rps:g} request/s for {self.model} exceeds what the node could"
                f" ever serve within its SLO: at most {self.bound_rps:.6g} request/s on all its"
                f" GPUs (fluid bound)"
            )
        return (
            f"the rates together exceed what the node could ever serve within the SLOs: at most"
            f" {self.factor:.4g} x each rate (fluid bound), e.g. {self.model} at"
            f" {self.bound_rps:.6g} request/s instead of {self.rate_rps:g}"
        )


def capacity_rps(problem: Problem, model: ModelSpec) -> float:
    """An upper bound of ``model``'s rate that the node serves within its SLO, alone on every
    GPU (the classic fluid bound: each request at the saturated throughput of its best shape
    and batch). 0 when no shape meets the SLO (the planner then gives its own reason)."""
    unit = replace(model, rate_rps=1.0)
    return fluid_bound(problem.with_models([unit]), rate_aware=False)


def rate_excess(problem: Problem, rel_tol: float = 1e-6) -> RateExcess | None:
    """Why ``problem``'s rates are beyond every plan, or None when they may fit. Cheap (a few
    small LPs: milliseconds), so that callers refuse absurd rates before they plan: the
    heuristics' work grows with the rates and does not end early on its own.

    A true upper bound (no plan serves more; see the module docstring): a model alone above
    :func:`capacity_rps`, or the models that can be served at all, together above the
    rate-aware fluid bound (k* < 1). Models that no shape serves are left to the planner,
    whose refusal names the cause (an SLO too tight for the profile)."""
    caps = {m.name: capacity_rps(problem, m) for m in problem.models if m.rate_rps > 0}
    servable = [m for m in problem.models if caps.get(m.name, 0.0) > 0]
    if not servable:
        return None
    for m in servable:
        if m.rate_rps > caps[m.name] * (1 + rel_tol):
            return RateExcess(m.name, m.rate_rps, caps[m.name])
    k = fluid_bound(problem.with_models(servable))
    if k >= 1 - rel_tol:
        return None
    top = max(servable, key=lambda m: m.rate_rps / caps[m.name])
    return RateExcess(top.name, top.rate_rps, top.rate_rps * k, factor=k)


def clipped_to_bound(problem: Problem) -> Problem:
    """``problem`` with every rate that a shape serves scaled by min(1, k*) (the rate-aware
    fluid bound of those models): the most the node could carry in the same proportions. For
    re-plans on measured load (overload must still get the best plan the node has, and the
    heuristics' work stays bounded), where API calls refuse instead (:func:`rate_excess`)."""
    servable = {m.name for m in problem.models if m.rate_rps > 0 and capacity_rps(problem, m) > 0}
    if not servable:
        return problem
    k = fluid_bound(problem.with_models([m for m in problem.models if m.name in servable]))
    if k >= 1:
        return problem
    return problem.with_models([m.scaled(k) if m.name in servable else m for m in problem.models])
