"""``stgs``: adaptive partition sizes (MIG, MPS, MPS inside MIG) plus temporal sharing.

Runs the greedy engine in a few variants (every shape family; MIG-mode families only; flat
MPS only) and keeps the best plan: feasible first, then fewest GPUs, then least GPU compute in
partitions. With a current plan, it also considers keeping or repairing that plan and charges
every partition changed ``options.reconfig_cost`` GPUs (see ``partitioner.replan``).

Spare capacity (``options.spare_factor``): a factor > 1 plans the rates x that factor (or x its
square root) where the GPUs allow and serves the real rates on that plan; ``"fill"`` plans the
largest factor in [1, ``max_spare_factor``] whose plan fits on the GPUs the lean plan uses
(``fill_factor``), and a re-plan whose new rates that plan still has room for keeps it as it
is (``hold_plan``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from partitioner.greedy import ALL_FAMILIES, FULL, MIG, MIG_MPS, MPS, Greedy, GreedyConfig
from partitioner.policies import Policy, register
from partitioner.problem import Problem
from partitioner.search import largest_factor
from stgs.plan import Plan
from stgs.scenario import FILL
from stgs.types import GpuSpec

LARGE_MODELS = 100
# Fill's bisection stops once its bracket [lo, hi] has hi / lo <= 1 + this: the factor found is
# within 3% of the largest one the search can tell (about 7 plans on a bracket of [1, 8]).
FILL_REL_TOL = 0.03
# ... and decides this factor first (the daemon's former fixed default), so that fill never
# plans less room than spare_factor 1.5 would where that fits on the lean plan's GPUs.
FILL_FIRST = 1.5

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
    return replace(plan, gpus=gpus).with_info(spare_factor=_room(factor))


def _room(factor: float) -> float:
    """A plan's reported ``spare_factor``: 4 decimals, rounded down (never more room than the
    plan has: ``hold_plan`` holds rates up to it, and a batch may fill its cycle exactly)."""
    return math.floor(factor * 1e4 + 1e-9) / 1e4


def hold_plan(problem: Problem, current: Plan) -> Plan | None:
    """``current`` (a plan made for its rates x ``info["spare_factor"]``, serving its rates)
    serving ``problem``'s rates instead, partitions, batches and duty cycles unchanged, or None
    when a new rate exceeds what its partitions were planned for.

    Each model's new rate is spread over its partitions in proportion to the old rates (as
    ``keep_plan``); an assignment is held while its new rate is at most its old rate x the
    factor (the plan was valid at that rate: fewer arrivals per cycle keep it valid). Unlike
    ``keep_plan``, which re-solves every duty cycle (new batches: the runtime restarts those
    workers), nothing changes but the rates. The held plan's factor is the smallest room left.
    """
    from partitioner.replan import current_rates, rate_share

    factor = current.info.get("spare_factor")
    if not current.feasible or not isinstance(factor, int | float) or factor < 1:
        return None
    models = {m.name: m for m in problem.models}
    old_rate, count = current_rates(current)
    if set(old_rate) != set(models) or len(current.gpus) != len(problem.gpus):
        return None
    room = math.inf
    gpus = []
    for g in current.gpus:
        if problem.gpus[g.index].sku != g.sku:
            return None
        parts = []
        for p in g.partitions:
            assigned = []
            for a in p.models:
                rate = models[a.name].rate_rps * rate_share(a, old_rate, count)
                cap = a.rate_rps * factor
                if rate > cap * (1 + 1e-9):
                    return None
                if rate > 0:
                    room = min(room, cap / rate)
                assigned.append(replace(a, rate_rps=rate))
            parts.append(replace(p, models=tuple(assigned)))
        gpus.append(replace(g, partitions=tuple(parts)))
    held = replace(current, gpus=tuple(gpus), unserved=())
    return held.with_info(spare_factor=_room(room if math.isfinite(room) else factor))


def gpus_by_type(plan: Plan, problem: Problem) -> Counter[GpuSpec]:
    """How many GPUs of each type (SKU and MIG permission) the plan puts partitions on."""
    return Counter(problem.gpus[g.index] for g in plan.gpus if g.partitions)


def fits_within(plan: Plan, lean: Plan, problem: Problem) -> bool:
    """Feasible, and no more GPUs of any type than ``lean`` uses."""
    have = gpus_by_type(lean, problem)
    return plan.feasible and all(n <= have[t] for t, n in gpus_by_type(plan, problem).items())


def on_gpus(problem: Problem, lean: Plan, make: Callable[[Problem], Plan]) -> Plan:
    """``make``'s plan of ``problem`` restricted to the GPUs ``lean`` puts partitions on,
    renumbered back to the problem's indices (the other GPUs as in ``lean``: empty)."""
    held = [g.index for g in lean.gpus if g.partitions]
    sub = make(problem.with_gpus([problem.gpus[i] for i in held]))
    by_index = {held[g.index]: replace(g, index=held[g.index]) for g in sub.gpus}
    gpus = tuple(by_index.get(g.index, g) if g.partitions else g for g in lean.gpus)
    return replace(sub, gpus=gpus)


def fill_factor(
    problem: Problem,
    lean: Plan,
    make: Callable[[Problem], Plan],
    cap: float,
    rel_tol: float = FILL_REL_TOL,
) -> tuple[float, Plan | None]:
    """The largest factor f in [1, ``cap``] on every rate whose plan fits on the GPUs the
    ``lean`` plan uses, and that plan (None: no factor above 1 fits).

    Each attempt is ``make`` of the problem at rates x f restricted to those GPUs (``on_gpus``:
    the plan cannot take another one; :func:`fits_within` checks it all the same). The search
    is the peak search's bisection (``partitioner.search.largest_factor``, geometric, to
    ``rel_tol``) on [1, min(cap, the fluid bound of those GPUs)], deciding
    :data:`FILL_FIRST` first. Deterministic and pure (no clock)."""
    from partitioner.fluid import fluid_bound

    held = tuple(g.index for g in lean.gpus if g.partitions)
    if cap <= 1 or not lean.feasible or not held:
        return 1.0, None
    base = problem.models
    # no plan on these GPUs fits past their fluid bound (partitioner.fluid)
    hi = min(cap, fluid_bound(problem.with_gpus([problem.gpus[i] for i in held])) * (1 + 1e-6))
    if hi <= 1:
        return 1.0, None
    return largest_factor(
        lambda f: on_gpus(problem.with_models([m.scaled(f) for m in base]), lean, make),
        1.0,
        hi,
        accept=lambda p: fits_within(p, lean, problem),
        rel_tol=rel_tol,
        geometric=True,
        first=FILL_FIRST,
    )


@register
class Stgs(Policy):
    name = "stgs"
    description = "spatio-temporal: adaptive MIG/MPS partition sizes + duty-cycle time sharing"

    @staticmethod
    def _fresh(problem: Problem, variants: tuple[GreedyConfig, ...]) -> Plan:
        return min((Greedy(problem, cfg).run() for cfg in variants), key=plan_score)

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        spare = problem.options.spare_factor
        fill = spare == FILL
        factor = 1.0 if isinstance(spare, str) else spare
        # Large instances: the all-families variant alone (solve time grows with models x GPUs).
        variants = VARIANTS if len(problem.models) <= LARGE_MODELS else VARIANTS[:1]
        if len(problem.models) <= SMALL_MODELS:
            variants = variants + SMALL_VARIANTS
        # Spare capacity releases a GPU once the load has fallen so far that a plan with room
        # (rates x FILL_FIRST for fill, x the factor for a fixed one) fits on fewer GPUs than
        # the current plan holds: the re-plan then counts GPUs, as a lean one does. Otherwise
        # it judges changes alone (the GPUs it holds are headroom), not GPU count.
        release = False
        roomy_fill: Plan | None = None
        if fill and current is not None:
            if current.gpus_used > 1:  # (one GPU: none to give back, no plan to make)
                roomy_fill = self._fresh(_scaled(problem, FILL_FIRST), variants)
                release = roomy_fill.feasible and roomy_fill.gpus_used < current.gpus_used
            held = None if release else hold_plan(problem, current)
            if held is not None:
                from partitioner.replan import choose_incremental

                # The current fill plan holds the new rates as it is: nothing to change (keeping
                # the layout with re-solved batches, keep_plan, would restart workers for no
                # gain; no candidate beats zero changes without counting GPUs).
                return choose_incremental(problem, current, held, count_gpus=False)
        best = self._fresh(problem, variants)
        if fill:
            # released: fill the GPUs of the plan with room (so that f >= FILL_FIRST), else
            # those of the lean plan
            base = roomy_fill if release and roomy_fill is not None else best
            f, roomy = fill_factor(
                problem,
                base,
                lambda p: self._fresh(p, variants),
                problem.options.max_spare_factor,
            )
            if roomy is not None:
                best = at_rates(roomy, f)
            best = (
                best.with_info(spare="fill")
                if roomy is not None
                else best.with_info(spare="fill", spare_factor=1.0)
            )
        elif factor > 1 and best.feasible:
            # plan for more than the rates where the GPUs allow it (see PlannerOptions)
            for f in (factor, math.sqrt(factor)):
                roomy = self._fresh(_scaled(problem, f), variants)
                if roomy.feasible:
                    best = at_rates(roomy, f)
                    release = current is not None and best.gpus_used < current.gpus_used
                    break
        if current is not None:
            from partitioner.replan import choose_incremental

            repaired = Greedy(problem, VARIANTS[0]).repair(current)
            lean = not fill and factor <= 1
            best = choose_incremental(problem, current, best, repaired, count_gpus=lean or release)
        return best


def _scaled(problem: Problem, factor: float) -> Problem:
    return problem.with_models([m.scaled(factor) for m in problem.models])


@register
class StgsSpare(Stgs):
    """``stgs`` with spare capacity ``spare_factor`` 1.5 (unless the problem sets a factor):
    the daemon's default until session 6 (now ``"fill"``, :class:`StgsFill`)."""

    name = "stgs-spare"
    description = "stgs planning for 1.5x the rates where the GPUs allow (headroom)"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        spare = problem.options.spare_factor
        if isinstance(spare, str) or spare <= 1:
            problem = problem.with_options(spare_factor=1.5)
        return replace(super().plan(problem, current), policy=self.name)


@register
class StgsFill(Stgs):
    """``stgs`` with spare capacity ``"fill"``: the lean plan's GPUs filled (the largest factor
    up to ``max_spare_factor`` that still fits on them), the real rates served on that plan;
    what the daemon runs by default (``planner.spare_factor = "fill"``)."""

    name = "stgs-fill"
    description = "stgs planning for the largest factor the lean plan's GPUs hold (fills them)"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        if problem.options.spare_factor != FILL:
            problem = problem.with_options(spare_factor=FILL)
        return replace(super().plan(problem, current), policy=self.name)
