"""``optimal``: the exact optimum over stgs's discrete choices, as a mixed-integer linear program.

For small instances only (a few GPUs, a few models): it measures what the heuristic ``stgs``
leaves on the table. Same choices as the heuristic: the shapes of ``problem.shapes(t)``, the
batch buckets of the curves, the curves' planning latencies (headroom and worst-case
interference, as they are, so both policies are judged alike) and the duty-cycle rule of
``partitioner.problem``.

Formulation: a configuration program, solved by HiGHS (``scipy.optimize.milp``).

* A *configuration* of a shape: models with one batch bucket each (at most
  ``max_models_per_partition``), their memory within the shape's, whose smallest duty cycle
  ``D = sum_m L_m(b_m)`` meets every SLO: ``D + L_m(b_m) <= slo_m``. It serves any rates
  ``r_m <= cap_m = Curve.rate_cap(b_m, D, D')`` (the duty-cycle rule at ``d = D`` and the batch
  margin on the partition's predicted cycle ``D'``, both of the batches alone; a larger d serves
  less).
  A partition's feasible rates are exactly the union of its configurations' boxes
  ``[0, cap]``, so choosing one configuration per partition linearises the duty cycle exactly
  (no McCormick products, a strong LP relaxation). Enumerated depth first with SLO and memory
  pruning; left out as dominated (nothing lost): a batch whose next smaller bucket already
  serves the model's whole rate, and, within a *group* of shapes taking the same resource (the
  shares of a GPU without MIG, ``full`` = 100%; the MPS shares inside one MIG profile; one MIG
  profile used whole), a configuration that serves no more of any model (counted up to its
  rate) on a share at least as large (Pareto filter, on groups of at most ``_PARETO_MAX``).
* Integer ``n[g, s, c]``: partitions of shape s on GPU g running configuration c (counting
  instead of naming slots removes the symmetry between copies).
* GPU g: binary ``zf`` (no MIG: ``sum pct * n <= 100 zf`` over MPS shares and ``full``) or, where
  MIG is allowed, binary ``x[g, mu]`` choosing a *maximal* MIG layout up to placement: a multiset
  mu of profiles that some layout of ``stgs.catalog.enumerate_layouts`` realises (instances may
  stay empty; where an instance sits does not change its curves). An instance of profile p is
  used whole or hosts MPS shares: integer ``h[g, p, pi]`` instances host the share multiset pi
  (maximal multisets of its MPS-in-MIG shares, sum <= 100). ``zf + sum_mu x <= 1``;
  ``sum_c n[g, mig:p, c] + sum_pi h[g, p, pi] <= sum_mu mu(p) x[g, mu]``;
  ``sum_c n[g, p/pct, c] <= sum_pi pi(pct) h[g, p, pi]``. Identical GPUs are used in order.
* Coverage: ``sum cap_m(c) n[g, s, c] >= lambda rate_m`` (a model with no load: placed once).

Objective, lexicographic in two steps: (A) maximise lambda <= 1, the smallest served fraction
over the models (skipped when the ``stgs`` plan already serves every rate); (B) at lambda = 1,
minimise GPUs used + eps * total weight, eps < 1 / (largest total weight): fewest GPUs, then
least shape weight (a MIG instance hosting MPS shares counts its whole weight, once: it is
taken from the GPU whole; a tiny extra per hosted share prefers a whole instance on ties).
When the full rates cannot be served, A's plan is returned: ``feasible = False``, maximising
min_m served_m / rate_m (no further tie-break). Past the peak, ``k * lambda`` is the peak
itself: ``exact_peak`` finds it in one solve.

Each step: LP relaxation (bound, reduced costs); a MIP over the ``_RESTRICT`` columns of least
reduced cost for a good solution fast; reduced-cost fixing against the best solution known
(``stgs``'s plan, step A's, the restricted one) drops the columns that cannot be in a better
one; then the exact MIP over the rest (HiGHS is slow on many columns, mostly in presolve).
``stgs``'s plan also caps the GPU count, so ``optimal`` never uses more GPUs than ``stgs``.
Relative gaps: 1e-7 in A (it decides whether lambda reaches 1), 1e-4 in B (the GPU count is
integral, so exact; the weight within the gap).

The plan is built like the greedy's (``Greedy._partition``): each model's rate is split over its
partitions in proportion to their ``cap``, every partition is checked with ``schedule()`` at
its rates (scaled down by bisection in the rare case rounding breaks it).
``plan.info["solver"]``: ``status`` (``optimal``; ``time_limit``: stopped early, the best plan
found, which may be ``stgs``'s, see ``plan_from``; ``infeasible``: the full rates are proven
unservable), ``mip_gap``, ``solve_s``, ``served_fraction``, per-solve details.

Limits (else ``PlanningError``): ``MAX_GPUS`` GPUs, ``MAX_MODELS`` models, ``MAX_CONFIGS``
enumerated configurations, ``MAX_COLUMNS`` variables. Configurations grow like
(buckets + 1) ^ models on large shapes (fewer with tight SLOs and low rates): 3 to 4 models on
one or two GPUs solve in seconds; beyond, expect ``time_limit``. Time: step A gets
``options.time_limit_s``, step B what is left (at least a tenth of it); enumeration and the
``stgs`` start are not counted.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import coo_array, csr_array, vstack

from partitioner.fluid import fluid_bound
from partitioner.policies import Policy, register
from partitioner.policies.stgs_policy import Stgs
from partitioner.problem import Curve, Problem, Shape, schedule
from stgs.catalog import MigLayout, MigPlacement, enumerate_layouts, get_sku
from stgs.errors import PlanningError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan, Unserved
from stgs.types import GpuSpec

MAX_GPUS = 4
MAX_MODELS = 8
MAX_CONFIGS = 300_000  # enumerated, before the Pareto filter, over all (GPU type, shape)
MAX_COLUMNS = 200_000
_EPS = 1e-9
_DISP = False
# relative MIP gaps: A decides whether lambda reaches 1, so it must close below _FULL_TOL; in B
# the GPU count is integral (exact under any gap < 1 / objective) and the weight a tie-break
_GAP_A = 1e-7
_GAP_B = 1e-4
_FULL_TOL = 1e-6  # lambda >= 1 - this: every rate is served
_PARETO_MAX = 10_000  # larger groups: left to reduced-cost fixing (Pareto is quadratic)
_RESTRICT = 1500  # columns of least reduced cost in the MIP that looks for a first solution
_RESTRICT_S = 5.0  # and its time limit (s)
_TINY = 1e-3  # cost of an MPS share inside MIG, relative to its weight (tie-break)

FloatArray = npt.NDArray[np.float64]
_Cut = tuple[list[int], float, float]  # sum of the columns within [lower, upper]


# ---------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class _Config:
    """Models (index, bucket index) time-sharing one partition at duty cycle ``cycle_ms``."""

    runs: tuple[tuple[int, int], ...]
    cycle_ms: float
    caps: tuple[float, ...]  # rps per run: 1000 b / cycle


@dataclass
class _ShapeConfigs:
    shape: Shape
    curves: dict[int, Curve]
    configs: list[_Config]


class _TooLarge(Exception):
    pass


def _enumerate(
    shape: Shape,
    curves: dict[int, Curve],
    rates: Sequence[float],
    max_models: int,
    budget: int,
) -> list[_Config]:
    """The feasible configurations of ``shape`` that can matter (raises _TooLarge past budget).

    Left out, as dominated (a configuration with a smaller batch for one model serves the
    others more, and this model still its whole rate): a model whose next smaller bucket would
    already serve its rate, i.e. ``1000 b' / D' >= rate`` with ``D'`` the cycle with that
    bucket. In the depth-first walk, ``D`` is bounded by the SLO slack of the models chosen so
    far, which prunes whole branches. Needs latency and memory non-decreasing in the batch
    (checked per curve; without it nothing is pruned for that model). A model with no load only
    ever needs its smallest bucket.
    """
    cands: list[tuple[int, bool, list[tuple[int, float, float, float]]]] = []
    for mi, c in sorted(curves.items()):
        slo = c.slo
        mono = bool(np.all(np.diff(c.lat) >= 0) and np.all(np.diff(c.memory) >= 0))
        opts: list[tuple[int, float, float, float]] = []
        for bi in range(len(c.buckets)):
            lat = float(c.lat[bi])
            mem = float(c.memory[bi])
            if lat > 0 and 2 * lat <= slo + _EPS and mem <= shape.memory_mib:
                opts.append((bi, lat, mem, slo - lat))
        if rates[mi] <= 0:
            opts = opts[:1]
        if opts:
            cands.append((mi, mono, opts))
    out: list[_Config] = []
    runs: list[tuple[int, int]] = []
    chosen: list[tuple[int, bool, int]] = []  # (model, monotone, option index)

    def dominated(total: float, pred: float) -> bool:
        """Could one model take its next smaller bucket and still serve its whole rate?"""
        for (mi, mono, k), (_, _, opts) in zip(chosen, picked, strict=True):
            if not mono or k == 0:
                continue
            c = curves[mi]
            bi, bi_prev = opts[k][0], opts[k - 1][0]
            cycle = total - c.lat_list[bi] + c.lat_list[bi_prev]
            cycle_pred = pred - c.pred_list[bi] + c.pred_list[bi_prev]
            if c.rate_cap(bi_prev, cycle, cycle_pred) >= rates[mi]:
                return True
        return False

    picked: list[tuple[int, bool, list[tuple[int, float, float, float]]]] = []

    def walk(i: int, total: float, pred: float, mem: float, slack: float) -> None:
        if i == len(cands):
            if runs and not dominated(total, pred):
                if len(out) >= budget:
                    raise _TooLarge
                caps = tuple(curves[mi].rate_cap(bi, total, pred) for mi, bi in runs)
                out.append(_Config(tuple(runs), total, caps))
            return
        walk(i + 1, total, pred, mem, slack)
        if len(runs) >= max_models:
            return
        mi, mono, opts = cands[i]
        rate = rates[mi]
        for k, (bi, lat, m_mem, m_slack) in enumerate(opts):
            t2 = total + lat
            s2 = min(slack, m_slack)
            if t2 > s2 + _EPS:
                if mono:
                    break  # larger buckets: longer latency, less slack
                continue
            if mem + m_mem > shape.memory_mib:
                if mono:
                    break
                continue
            # the final cycle is at most s2 (its predicted part too): if the smaller bucket
            # serves the rate even then, this bucket and every larger one are dominated
            if mono and k > 0 and rate > 0 and curves[mi].rate_cap(opts[k - 1][0], s2, s2) >= rate:
                break
            runs.append((mi, bi))
            chosen.append((mi, mono, k))
            picked.append(cands[i])
            walk(i + 1, t2, pred + curves[mi].pred_list[bi], mem + m_mem, s2)
            runs.pop()
            chosen.pop()
            picked.pop()

    walk(0, 0.0, 0.0, 0.0, math.inf)
    return out


def _pareto(values: FloatArray) -> list[int]:
    """Rows of ``values`` (bigger is better in every column) that no other row dominates.

    Of rows equal within tolerance, the first is kept.
    """
    n = len(values)
    if n <= 1:
        return list(range(n))
    order = np.lexsort((np.arange(n), -values.sum(axis=1)))
    kept = np.zeros((0, values.shape[1]))
    keep_idx: list[int] = []
    tol = 1e-9
    chunk = 512
    for s in range(0, n, chunk):
        idx = order[s : s + chunk]
        x = values[idx]
        alive = np.ones(len(idx), dtype=bool)
        for k0 in range(0, len(kept), 4096):
            kb = kept[k0 : k0 + 4096]
            alive &= ~(kb[:, None, :] >= x[None, :, :] - tol).all(axis=2).any(axis=0)
        # within the chunk: j, earlier in the order, dominates i
        sub, sub_idx = x[alive], idx[alive]
        if len(sub) > 1:
            ge = (sub[:, None, :] >= sub[None, :, :] - tol).all(axis=2)  # ge[j, i]: j >= i
            earlier = np.tri(len(sub), k=-1, dtype=bool).T  # earlier[j, i]: j < i
            dominated = (ge & earlier).any(axis=0)
            sub, sub_idx = sub[~dominated], sub_idx[~dominated]
        kept = np.vstack([kept, sub])
        keep_idx.extend(int(i) for i in sub_idx)
    return sorted(keep_idx)


def _filter_group(group: list[_ShapeConfigs], rates: Sequence[float]) -> None:
    """Drop the configurations another one of the group serves at least as well, for less.

    A group is a set of shapes that take the same resource: the shares of a GPU without MIG
    (``full`` takes 100%), the MPS shares inside one MIG profile, or that profile used whole.
    What a configuration serves is counted up to each rate (one partition never needs more; a
    model with no load counts 1 where it is placed). A configuration that serves no more of any
    model on a share at least as large is never needed: swapping it for the better one keeps
    every constraint (a smaller share still fits the GPU's or the instance's 100%, shares may
    stay empty) and does not raise the objective (costs grow with the share within a group).
    """
    n_models = len(rates)
    rows: list[tuple[int, int]] = []
    for gi, sc in enumerate(group):
        rows.extend((gi, ci) for ci in range(len(sc.configs)))
    if len(rows) <= 1:
        return
    values = np.zeros((len(rows), n_models + 1))
    for r, (gi, ci) in enumerate(rows):
        sc = group[gi]
        cfg = sc.configs[ci]
        for (mi, _), cap in zip(cfg.runs, cfg.caps, strict=True):
            values[r, mi] = min(cap, rates[mi]) / rates[mi] if rates[mi] > 0 else 1.0
        values[r, n_models] = -float(_share(sc.shape))
    keep: dict[int, list[int]] = defaultdict(list)
    for r in _pareto(values):
        gi, ci = rows[r]
        keep[gi].append(ci)
    for gi, sc in enumerate(group):
        sc.configs = [sc.configs[ci] for ci in keep.get(gi, [])]


def _share(shape: Shape) -> int:
    """Percentage of its host (a GPU without MIG, or a MIG instance) that a shape takes."""
    return 100 if shape.kind != "mps" else (shape.mps_pct or 100)


# ---------------------------------------------------------------------------- MIG structure
@cache
def _profile_multisets(
    sku: str, profiles: frozenset[str]
) -> tuple[tuple[Counter[str], MigLayout], ...]:
    """Maximal multisets of ``profiles`` that a valid layout realises, with one such layout."""
    seen: dict[tuple[tuple[str, int], ...], tuple[MigPlacement, ...]] = {}
    for lay in enumerate_layouts(sku):
        kept = tuple(p for p in lay if p.profile in profiles)
        key = tuple(sorted(Counter(p.profile for p in kept).items()))
        if key and key not in seen:
            seen[key] = kept
    keys = list(seen)
    out = []
    for k in keys:
        ck = Counter(dict(k))
        if any(k2 != k and _sub(ck, Counter(dict(k2))) for k2 in keys):
            continue
        out.append((ck, seen[k]))
    return tuple(out)


def _sub(a: Counter[str], b: Counter[str]) -> bool:
    return all(b[p] >= n for p, n in a.items())


@cache
def _share_multisets(pcts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Maximal multisets of MPS shares (sum <= 100), largest share first."""
    out: list[tuple[int, ...]] = []
    ordered = sorted(set(pcts), reverse=True)

    def walk(i: int, left: int, cur: list[int]) -> None:
        if i == len(ordered):
            if cur and left < min(ordered):
                out.append(tuple(cur))
            return
        p = ordered[i]
        for k in range(left // p, -1, -1):
            walk(i + 1, left - k * p, cur + [p] * k)

    walk(0, 100, [])
    return tuple(out)


# ---------------------------------------------------------------------------- the MILP
class _Milp:
    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.rlo: list[float] = []
        self.rhi: list[float] = []

    def var(self, lb: float, ub: float, integer: bool = True) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def row(self, terms: Sequence[tuple[int, float]], lo: float, hi: float) -> None:
        r = len(self.rlo)
        for c, v in terms:
            if v != 0.0:
                self.rows.append(r)
                self.cols.append(c)
                self.vals.append(v)
        self.rlo.append(lo)
        self.rhi.append(hi)

    @property
    def n(self) -> int:
        return len(self.lb)

    def constraint(self) -> LinearConstraint:
        a = coo_array(
            (np.array(self.vals), (np.array(self.rows), np.array(self.cols))),
            shape=(len(self.rlo), self.n),
        ).tocsr()
        return LinearConstraint(a, np.array(self.rlo), np.array(self.rhi))


@dataclass
class _Use:
    """Columns n[g, s, c] of one (GPU, shape)."""

    gpu: int
    sc: _ShapeConfigs
    cols: list[int]


@dataclass
class _GpuCols:
    zf: int
    layouts: list[tuple[int, Counter[str], MigLayout]]  # (column, multiset, one layout)
    hosts: dict[str, list[tuple[int, tuple[int, ...]]]]  # profile -> (column h, share multiset)

    @property
    def used(self) -> list[int]:
        return [self.zf, *(c for c, _, _ in self.layouts)]


@dataclass
class _Solve:
    phase: str
    status: int
    x: FloatArray | None
    mip_gap: float | None
    seconds: float
    message: str
    fixed: int | None = None  # columns fixed to 0 by reduced costs


@dataclass
class _Best:
    """The best solution known: objective value, where it came from, its columns (None: stgs)."""

    value: float
    source: str
    x: FloatArray | None


@register
class Optimal(Policy):
    name = "optimal"
    description = "exact MILP optimum over the same shapes and batches (small instances only)"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        return _Solver(problem).run()


_FD_LOCK = threading.Lock()


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what the solver's C++ code prints to file descriptor 1 (HiGHS writes debug lines
    such as ``HighsMipSolverData::...`` even with ``disp`` off) to stderr, so that
    ``stgs plan --json`` keeps stdout pure JSON. Python-level output is untouched."""
    with _FD_LOCK:
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError):  # no usable fd 1: nothing to protect
            yield
            return
        try:
            os.dup2(2, 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def exact_peak(problem: Problem, k_hi: float | None = None) -> tuple[float, str]:
    """The largest factor k on all rates that a plan over these choices serves: (k, status).

    One solve instead of a bisection: at any ``k_hi`` at or past the peak, the largest served
    fraction lambda of rates ``k_hi * r`` gives the peak ``k_hi * lambda`` (serving a fraction of
    every rate and serving scaled rates are the same thing). ``k_hi`` defaults to the fluid bound,
    which no plan exceeds. With status ``time_limit`` the k returned is only a lower bound.
    """
    if k_hi is None:
        k_hi = fluid_bound(problem) * (1 + 1e-6)
    if not math.isfinite(k_hi) or k_hi <= 0:
        return max(k_hi, 0.0), "optimal"
    plan = _Solver(problem.with_models([m.scaled(k_hi) for m in problem.models])).run()
    solver = plan.info["solver"]
    status = str(solver["status"])
    # at k_hi the plan cannot serve everything: "infeasible" is phase A's proven maximum
    # served fraction, i.e. the peak is optimal (within the solver's relative gap)
    return k_hi * float(solver["served_fraction"]), "optimal" if status == "infeasible" else status


class _Solver:
    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.models = problem.models
        self.max_models = problem.options.max_models_per_partition
        self.gap: float | None = None  # relative gap of the last optimisation

    # ------------------------------------------------------------------ configurations
    def _type_configs(self, t: GpuSpec, budget: int) -> tuple[list[_ShapeConfigs], int]:
        """The configurations of every shape of type ``t`` (and how many were enumerated)."""
        rates = [m.rate_rps for m in self.models]
        out: list[_ShapeConfigs] = []
        count = 0
        for shape in self.p.shapes(t):
            curves: dict[int, Curve] = {}
            for mi, m in enumerate(self.models):
                c = self.p.curve(m, t, shape)
                if c is not None:
                    curves[mi] = c
            configs = _enumerate(shape, curves, rates, self.max_models, budget - count)
            count += len(configs)
            out.append(_ShapeConfigs(shape, curves, configs))
        groups: dict[tuple[str | None, bool], list[_ShapeConfigs]] = defaultdict(list)
        for sc in out:
            groups[(sc.shape.mig_profile, sc.shape.kind == "mig")].append(sc)
        for group in groups.values():
            if sum(len(sc.configs) for sc in group) <= _PARETO_MAX:
                _filter_group(group, rates)
        return [sc for sc in out if sc.configs], count

    def _too_large(self, what: str) -> PlanningError:
        return PlanningError(
            f"instance too large for the exact solver ({what}; limits: {MAX_GPUS} GPUs,"
            f" {MAX_MODELS} models, {MAX_CONFIGS} partition configurations, {MAX_COLUMNS}"
            " variables): use --policy stgs"
        )

    def _configs(self) -> dict[GpuSpec, list[_ShapeConfigs]]:
        if len(self.p.gpus) > MAX_GPUS or len(self.models) > MAX_MODELS:
            raise self._too_large(f"{len(self.p.gpus)} GPUs, {len(self.models)} models")
        out: dict[GpuSpec, list[_ShapeConfigs]] = {}
        budget = MAX_CONFIGS
        for t in self.p.gpu_types:
            try:
                out[t], count = self._type_configs(t, budget)
            except _TooLarge:
                raise self._too_large(
                    f"more than {MAX_CONFIGS} partition configurations to enumerate"
                ) from None
            budget -= count
        return out

    # ------------------------------------------------------------------ model
    def _build(self, by_type: dict[GpuSpec, list[_ShapeConfigs]]) -> None:
        lp = _Milp()
        self.lp = lp
        self.lam = lp.var(0.0, 1.0, integer=False)
        self.gpu_cols: list[_GpuCols] = []
        self.uses: list[_Use] = []
        prev_of_type: dict[GpuSpec, int] = {}
        for gi, t in enumerate(self.p.gpus):
            cols = self._build_gpu(gi, t, by_type[t])
            self.gpu_cols.append(cols)
            if t in prev_of_type:  # identical GPUs are used in order
                prev = self.gpu_cols[prev_of_type[t]]
                lp.row(
                    [(c, 1.0) for c in cols.used] + [(c, -1.0) for c in prev.used],
                    -math.inf,
                    0.0,
                )
            prev_of_type[t] = gi
            if lp.n > MAX_COLUMNS:
                raise self._too_large(f"more than {MAX_COLUMNS} variables")
        cover: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for use in self.uses:
            for col, cfg in zip(use.cols, use.sc.configs, strict=True):
                for (mi, _), cap in zip(cfg.runs, cfg.caps, strict=True):
                    r = self.models[mi].rate_rps
                    cover[mi].append((col, cap / r if r > 0 else 1.0))
        self.servable = [mi in cover for mi in range(len(self.models))]
        for terms in cover.values():
            lp.row([*terms, (self.lam, -1.0)], 0.0, math.inf)

    def _use(self, gi: int, sc: _ShapeConfigs, ub: float) -> _Use:
        use = _Use(gi, sc, [self.lp.var(0.0, ub) for _ in sc.configs])
        self.uses.append(use)
        return use

    def _build_gpu(self, gi: int, t: GpuSpec, scs: list[_ShapeConfigs]) -> _GpuCols:
        lp = self.lp
        zf = lp.var(0.0, 1.0)
        knap: list[tuple[int, float]] = []
        for sc in scs:
            s = sc.shape
            if s.in_mig:
                continue
            pct = 100 if s.kind == "full" else (s.mps_pct or 100)
            use = self._use(gi, sc, float(100 // pct))
            knap.extend((c, float(pct)) for c in use.cols)
        if knap:
            lp.row([*knap, (zf, -100.0)], -math.inf, 0.0)
        else:
            lp.ub[zf] = 0.0
        cols = _GpuCols(zf, [], {})
        mig_scs = [sc for sc in scs if sc.shape.in_mig]
        if not t.mig or not mig_scs:
            lp.row([(zf, 1.0)], -math.inf, 1.0)
            return cols
        sku = get_sku(t.sku)
        profiles = frozenset(sc.shape.mig_profile or "" for sc in mig_scs)
        for ms, lay in _profile_multisets(sku.name, profiles):
            cols.layouts.append((lp.var(0.0, 1.0), ms, lay))
        lp.row([(c, 1.0) for c in cols.used], -math.inf, 1.0)
        for prof in sorted(profiles):
            max_count = sku.mig_profile(prof).max_count
            inst: list[tuple[int, float]] = []
            whole = [
                sc for sc in mig_scs if sc.shape.kind == "mig" and sc.shape.mig_profile == prof
            ]
            for sc in whole:
                inst.extend((c, 1.0) for c in self._use(gi, sc, float(max_count)).cols)
            shared = [
                sc for sc in mig_scs if sc.shape.kind == "mps" and sc.shape.mig_profile == prof
            ]
            if shared:
                pcts = tuple(sorted({sc.shape.mps_pct or 100 for sc in shared}))
                hosts = [(lp.var(0.0, float(max_count)), pi) for pi in _share_multisets(pcts)]
                cols.hosts[prof] = hosts
                inst.extend((c, 1.0) for c, _ in hosts)
                for sc in shared:
                    pct = sc.shape.mps_pct or 100
                    use = self._use(gi, sc, float(max_count * (100 // pct)))
                    lp.row(
                        [(c, 1.0) for c in use.cols]
                        + [(c, -float(pi.count(pct))) for c, pi in hosts],
                        -math.inf,
                        0.0,
                    )
            lp.row([*inst] + [(c, -float(ms[prof])) for c, ms, _ in cols.layouts], -math.inf, 0.0)
        return cols

    # ------------------------------------------------------------------ solve
    def _matrix(self, cuts: Sequence[_Cut]) -> tuple[Any, FloatArray, FloatArray]:
        """The rows with the cuts appended: (csr matrix, lower, upper)."""
        a = self.cons.A
        lo, hi = np.asarray(self.cons.lb, dtype=float), np.asarray(self.cons.ub, dtype=float)
        if cuts:
            extra = np.zeros((len(cuts), self.lp.n))
            for r, (cols, _, _) in enumerate(cuts):
                extra[r, cols] = 1.0
            a = vstack([a, csr_array(extra)], format="csr")
            lo = np.concatenate([lo, [c[1] for c in cuts]])
            hi = np.concatenate([hi, [c[2] for c in cuts]])
        return a, lo, hi

    def _bounds(
        self, lam_lb: float, lam_ub: float, ub: FloatArray | None = None
    ) -> tuple[FloatArray, FloatArray]:
        lower = np.array(self.lp.lb)
        upper = np.array(self.lp.ub) if ub is None else ub.copy()
        lower[self.lam], upper[self.lam] = lam_lb, lam_ub
        return lower, upper

    def _relax(
        self, c: FloatArray, lam_lb: float, lam_ub: float, cuts: Sequence[_Cut]
    ) -> tuple[float, FloatArray] | None:
        """The LP relaxation: its optimum and the reduced costs at the lower bounds."""
        a, lo, hi = self._matrix(cuts)
        up, down = np.isfinite(hi), np.isfinite(lo)
        a_ub = vstack([a[up], -a[down]], format="csr")
        b_ub = np.concatenate([hi[up], -lo[down]])
        lower, upper = self._bounds(lam_lb, lam_ub)
        bounds = [
            (lo_, None if math.isinf(up_) else up_) for lo_, up_ in zip(lower, upper, strict=True)
        ]
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        if res.status != 0:
            return None
        return float(res.fun), np.asarray(res.lower.marginals, dtype=np.float64)

    def _solve(
        self,
        phase: str,
        c: FloatArray,
        lam_lb: float,
        lam_ub: float,
        limit: float,
        cuts: Sequence[_Cut] = (),
        ub: FloatArray | None = None,
        gap: float = _GAP_B,
    ) -> _Solve:
        lower, upper = self._bounds(lam_lb, lam_ub, ub)
        a, lo, hi = self._matrix(cuts)
        t0 = time.perf_counter()
        with _stdout_to_stderr():
            res = milp(
                c,
                integrality=np.array(self.lp.integer),
                bounds=Bounds(lower, upper),
                constraints=LinearConstraint(a, lo, hi),
                options={
                    "time_limit": max(limit, 0.01),
                    "disp": _DISP,
                    "mip_rel_gap": gap,
                },
            )
        seconds = time.perf_counter() - t0
        got = getattr(res, "mip_gap", None)
        x = None if res.x is None else np.asarray(res.x, dtype=np.float64)
        return _Solve(
            phase,
            int(res.status),
            x,
            float(got) if got is not None and math.isfinite(got) else None,
            seconds,
            str(res.message),
            None if ub is None else int(np.sum((ub == 0) & (np.array(self.lp.ub) > 0))),
        )

    # ------------------------------------------------------------------ incumbent
    def _heuristic(self) -> tuple[Plan, float, float | None]:
        """The ``stgs`` plan as a starting incumbent: (plan, served fraction, cost in phase B).

        It is a feasible point of this program (same shapes, buckets, curves and schedule rule),
        so its values bound the optimum and drive reduced-cost fixing.
        """
        plan = Stgs().plan(self.p)
        lam = 1.0
        for mi, m in enumerate(self.models):
            if not self.servable[mi]:
                continue
            if m.rate_rps > 0:
                lam = min(lam, plan.served_rate(m.name) / m.rate_rps)
            elif not any(a.name == m.name for _, p in plan.partitions() for a in p.models):
                lam = 0.0
        if lam < 1 - _FULL_TOL:
            return plan, max(0.0, lam), None
        cost = 0.0
        for g in plan.gpus:
            if not g.partitions:
                continue
            cost += 1.0
            shapes = self.p.shapes(self.p.gpus[g.index])
            hosts: set[int | None] = set()
            for part in g.partitions:
                hosted = part.kind == "mps" and part.mig_profile is not None
                if hosted and part.mig_start not in hosts:  # the instance's weight, once
                    hosts.add(part.mig_start)
                    cost += self.eps * _instance_weight(g.sku, part.mig_profile or "")
                shape = next(
                    (
                        s
                        for s in shapes
                        if s.kind == part.kind
                        and s.mig_profile == part.mig_profile
                        and s.mps_pct == part.mps_pct
                    ),
                    None,
                )
                w = shape.weight if shape is not None else 1.0
                cost += self.eps * (_TINY * w if shape is not None and _hosted(shape) else w)
        return plan, 1.0, cost

    def _optimise(
        self,
        phase: str,
        c: FloatArray,
        lam: tuple[float, float],
        cuts: Sequence[_Cut],
        gap: float,
        best: _Best | None,
        deadline: float,
        solves: list[_Solve],
        floor: float = -math.inf,
    ) -> tuple[bool, _Best | None]:
        """min c x: (proven optimal, best solution), ``best`` being a known one or None.

        The LP relaxation gives a bound and reduced costs; a MIP over the columns of least
        reduced cost finds a good solution fast; against the best known value, reduced-cost
        fixing drops the columns that cannot appear in a better solution; the MIP over the rest
        is exact (HiGHS is slow on many columns, mostly in presolve).
        """

        def left() -> float:
            return deadline - time.perf_counter()

        def keep_better(sol: _Solve) -> None:
            nonlocal best
            if sol.x is not None:
                value = float(c @ sol.x)
                if best is None or value < best.value - 1e-12:
                    best = _Best(value, "milp", sol.x)

        # the LP leaves lambda unbounded above: with lambda at its bound of 1 the LP duals (and
        # so the reduced costs) vanish; a relaxation with more room keeps them informative
        relax = self._relax(c, lam[0], math.inf if lam[1] > lam[0] else lam[1], cuts)
        if relax is None:  # no LP answer: the plain MIP
            sol = self._solve(phase, c, lam[0], lam[1], left(), cuts, gap=gap)
            solves.append(sol)
            keep_better(sol)
            self.gap = sol.mip_gap
            return sol.status == 0, best
        z, d = relax

        bound = max(z, floor)

        def proven() -> bool:
            if best is None:
                return False
            self.gap = max(0.0, best.value - bound) / max(1.0, abs(best.value))
            return best.value - bound <= gap * max(1.0, abs(best.value)) + 1e-9

        cfg = self.config_cols
        if not proven() and len(cfg) > _RESTRICT:
            ub = np.array(self.lp.ub)
            keep = cfg[np.argsort(d[cfg], kind="stable")[:_RESTRICT]]
            ub[cfg] = 0.0
            ub[keep] = np.asarray(self.lp.ub)[keep]
            limit = min(0.25 * left(), _RESTRICT_S)
            sol = self._solve(f"{phase} (restricted)", c, lam[0], lam[1], limit, cuts, ub, gap)
            solves.append(sol)
            keep_better(sol)
        if proven():
            return True, best
        ub_fixed = None
        if best is not None:
            ub_fixed = np.array(self.lp.ub)
            tol = 1e-6 * max(1.0, abs(best.value))
            drop = (np.array(self.lp.lb) == 0) & (z + d > best.value + tol)
            drop[self.lam] = False
            ub_fixed[drop] = 0.0
        sol = self._solve(phase, c, lam[0], lam[1], max(left(), 0.01), cuts, ub_fixed, gap)
        solves.append(sol)
        keep_better(sol)
        if sol.status == 2:
            self.gap = 0.0
        elif sol.mip_gap is not None:
            self.gap = sol.mip_gap
        else:
            proven()  # the gap to the LP bound
        # status 2 after fixing: no solution beats the known one, which is then optimal
        return sol.status == 0 or (sol.status == 2 and best is not None), best

    def run(self) -> Plan:
        t_start = time.perf_counter()
        by_type = self._configs()
        self._build(by_type)
        self.cons = self.lp.constraint()
        self.config_cols = np.array([c for use in self.uses for c in use.cols], dtype=np.int64)
        n = self.lp.n
        limit = float(self.p.options.time_limit_s)

        self.eps = 0.4 / max(1, len(self.p.gpus))  # total weight < 2 per GPU: eps W < 1 GPU
        used_cols = [col for cols in self.gpu_cols for col in cols.used]
        c_b = np.zeros(n)
        c_b[used_cols] = 1.0
        # weights: a partition's shape; MPS inside MIG: the hosting instance, once (and a
        # tiny share of its own weight, so a whole instance wins a tie with one hosting shares)
        for use in self.uses:
            w = use.sc.shape.weight
            c_b[use.cols] = self.eps * (_TINY * w if _hosted(use.sc.shape) else w)
        for gi, cols in enumerate(self.gpu_cols):
            for prof, hosts in cols.hosts.items():
                w = _instance_weight(self.p.gpus[gi].sku, prof)
                c_b[[col for col, _ in hosts]] = self.eps * w
        heur, heur_lam, heur_cost = self._heuristic()
        t_built = time.perf_counter()
        deadline = t_built + limit

        solves: list[_Solve] = []
        lam = heur_lam
        a_best: _Best | None = None
        if heur_lam < 1 - _FULL_TOL:
            # phase A: the largest fraction lambda of every model's rate that can be served
            c_a = np.zeros(n)
            c_a[self.lam] = -1.0
            known = _Best(-heur_lam, "stgs", None) if heur_lam > 0 else None
            proven, a_best = self._optimise(
                "max-served-fraction", c_a, (0.0, 1.0), (), _GAP_A, known, deadline, solves, -1.0
            )
            if a_best is not None:
                lam = -a_best.value
            if lam < 1 - _FULL_TOL:
                status = "infeasible" if proven else "time_limit"
                info = self._info(status, lam, solves, t_start, a_best)
                if a_best is None or a_best.x is None:
                    return replace(heur, policy="optimal", info={"solver": info})
                return self._assemble(a_best.x, status, lam, info)
        lam = 1.0

        # phase B: fewest GPUs, then least shape weight, serving every rate
        known_b: _Best | None = None
        if heur_cost is not None:
            known_b = _Best(heur_cost, "stgs", None)
        if a_best is not None and a_best.x is not None:
            value = float(c_b @ a_best.x)
            if known_b is None or value < known_b.value:
                known_b = _Best(value, "milp", a_best.x)
        assert known_b is not None  # lambda = 1 came from stgs or from phase A
        # the GPU count: at least the LP bound (rounded up), at most the known solution's
        c_used = np.zeros(n)
        c_used[used_cols] = 1.0
        relax = self._relax(c_used, 1.0, 1.0, ())
        g_lo = math.ceil(relax[0] - 1e-6) if relax is not None else 0
        cuts: list[_Cut] = [(used_cols, float(g_lo), float(math.floor(known_b.value + 1e-9)))]
        deadline_b = max(deadline, time.perf_counter() + 0.1 * limit)
        proven, b_best = self._optimise(
            "min-gpus", c_b, (1.0, 1.0), cuts, _GAP_B, known_b, deadline_b, solves
        )
        info = self._info("optimal" if proven else "time_limit", lam, solves, t_start, b_best)
        if b_best is None or b_best.x is None:
            return replace(heur, policy="optimal", info={"solver": info})
        return self._assemble(b_best.x, info["status"], lam, info)

    def _info(
        self,
        status: str,
        lam: float,
        solves: Sequence[_Solve],
        t_start: float,
        best: _Best | None,
    ) -> dict[str, Any]:
        return {
            "status": status,
            "mip_gap": self.gap,
            "solve_s": round(time.perf_counter() - t_start, 4),
            "served_fraction": lam,
            "plan_from": "stgs" if best is None else best.source,
            "columns": self.lp.n,
            "rows": len(self.lp.rlo),
            "phases": [
                {
                    "phase": s.phase,
                    "message": s.message,
                    "solve_s": round(s.seconds, 4),
                    "mip_gap": s.mip_gap,
                    "fixed_columns": s.fixed,
                }
                for s in solves
            ],
        }

    # ------------------------------------------------------------------ plan
    def _assemble(
        self, x: FloatArray | None, status: str, lam: float, info: dict[str, Any]
    ) -> Plan:
        # the partitions: (gpu, shape, configuration, MIG start or None, host key)
        parts = list(self._placed(x)) if x is not None else []
        total_cap: dict[int, float] = defaultdict(float)
        for _, _, cfg, _, _ in parts:
            for (mi, _), cap in zip(cfg.runs, cfg.caps, strict=True):
                total_cap[mi] += cap
        target = {mi: min(m.rate_rps, total_cap.get(mi, 0.0)) for mi, m in enumerate(self.models)}
        zero_placed: set[int] = set()
        fitted: list[tuple[int, _ShapeConfigs, int | None, tuple[int, int | None], Any]] = []
        for gi, sc, cfg, start, host in parts:
            items: list[tuple[Curve, float]] = []
            for (mi, _), cap in zip(cfg.runs, cfg.caps, strict=True):
                m = self.models[mi]
                if m.rate_rps <= 0:
                    if mi not in zero_placed:
                        zero_placed.add(mi)
                        items.append((sc.curves[mi], 0.0))
                    continue
                rate = target[mi] * cap / total_cap[mi]
                if rate > _EPS * max(1.0, m.rate_rps):
                    items.append((sc.curves[mi], rate))
            sched = schedule(_fit(items)) if items else None
            if sched is not None:
                fitted.append((gi, sc, start, host, sched))
        # MPS neighbours (interference): the shares present in the same host, with the largest
        # batch each runs
        host_parts: dict[tuple[int, int | None], list[tuple[int, float, int]]] = defaultdict(list)
        for j, (_, sc, _, host, sched) in enumerate(fitted):
            if sc.shape.kind == "mps":
                big = max(s.batch for s in sched.slots)
                host_parts[host].append((j, float(sc.shape.mps_pct or 0), big))
        index = {m.name: i for i, m in enumerate(self.models)}
        served: dict[int, float] = defaultdict(float)
        by_gpu: dict[int, list[tuple[tuple[int, int], Partition]]] = defaultdict(list)
        for j, (gi, sc, start, host, sched) in enumerate(fitted):
            shape = sc.shape
            sku = self.p.gpus[gi].sku
            neighbours: list[tuple[float, int | None]] = (
                [(pct, big) for k, pct, big in host_parts[host] if k != j]
                if shape.kind == "mps"
                else []
            )
            models = []
            for s in sched.slots:
                i = int(s.curve.buckets.searchsorted(s.batch))
                slow = self.p.interference.slowdown_beside(s.curve.model.profile, sku, neighbours)
                models.append(
                    ModelAssignment(
                        s.curve.model.name, s.batch, s.rate_rps, float(s.curve.raw_solo[i]) * slow
                    )
                )
                served[index[s.curve.model.name]] += s.rate_rps
            part = Partition(
                kind=shape.kind,  # type: ignore[arg-type]
                sm_count=shape.sm_count,
                memory_mib=shape.memory_mib,
                duty_cycle_ms=sched.duty_cycle_ms,
                models=tuple(models),
                mig_profile=shape.mig_profile,
                mig_start=start,
                mps_pct=shape.mps_pct,
            )
            by_gpu[gi].append(((-1 if start is None else start, -(shape.mps_pct or 100)), part))
        gpus = tuple(
            GpuPlan(
                gi,
                t.sku,
                any(p.mig_profile is not None for _, p in by_gpu.get(gi, [])),
                tuple(p for _, p in sorted(by_gpu.get(gi, []), key=lambda kp: kp[0])),
            )
            for gi, t in enumerate(self.p.gpus)
        )
        placed = {index[a.name] for parts_ in by_gpu.values() for _, q in parts_ for a in q.models}
        unserved = []
        for mi, m in enumerate(self.models):
            rest = m.rate_rps - served.get(mi, 0.0)
            if rest > 1e-6 * max(1.0, m.rate_rps) or (m.rate_rps <= 0 and mi not in placed):
                unserved.append(Unserved(m.name, max(0.0, rest), self._reason(mi, status, lam)))
        return Plan(
            policy="optimal",
            feasible=not unserved,
            gpus=gpus,
            unserved=tuple(unserved),
            info={"solver": info},
        )

    def _placed(
        self, x: FloatArray
    ) -> Iterator[tuple[int, _ShapeConfigs, _Config, int | None, tuple[int, int | None]]]:
        """The chosen partitions, with their MIG placements."""
        chosen: dict[tuple[int, Shape], list[tuple[_ShapeConfigs, _Config]]] = defaultdict(list)
        for use in self.uses:
            for col, cfg in zip(use.cols, use.sc.configs, strict=True):
                for _ in range(round(float(x[col]))):
                    chosen[(use.gpu, use.sc.shape)].append((use.sc, cfg))
        for gi, cols in enumerate(self.gpu_cols):
            flat = [k for k in chosen if k[0] == gi and not k[1].in_mig]
            for key in flat:
                for sc, cfg in chosen[key]:
                    yield gi, sc, cfg, None, (gi, None)
            layout = next((lay for c, _, lay in cols.layouts if x[c] > 0.5), None)
            if layout is None:
                continue
            free: dict[str, list[int]] = defaultdict(list)
            for pl in layout:
                free[pl.profile].append(pl.start)
            # whole instances first, then the instances hosting MPS shares
            for key in [k for k in chosen if k[0] == gi and k[1].kind == "mig"]:
                for sc, cfg in chosen[key]:
                    starts = free[key[1].mig_profile or ""]
                    if starts:  # always, for a solution within tolerances
                        start = starts.pop(0)
                        yield gi, sc, cfg, start, (gi, start)
            for prof, hosts in cols.hosts.items():
                queues = {
                    pct: list(chosen[k])
                    for k in chosen
                    if k[0] == gi and k[1].kind == "mps" and k[1].mig_profile == prof
                    for pct in [k[1].mps_pct or 100]
                }
                for col, pi in hosts:
                    for _ in range(round(float(x[col]))):
                        if not free[prof]:
                            break
                        start = free[prof].pop(0)
                        for pct in pi:
                            q = queues.get(pct)
                            if q:
                                sc, cfg = q.pop(0)
                                yield gi, sc, cfg, start, (gi, start)

    def _reason(self, mi: int, status: str, lam: float) -> str:
        if not self.servable[mi]:
            m = self.models[mi]
            return (
                f"no partition of these GPUs serves it within slo_ms={m.slo_ms:g}: no profile,"
                " or a batch of 1 takes more than half the SLO with headroom and interference,"
                " or it does not fit in memory"
            )
        if status == "time_limit":
            return "the exact solver stopped at its time limit before serving this rate"
        return (
            "insufficient GPU capacity: the exact optimum serves at most"
            f" {100 * lam:.2f}% of every model's rate"
        )


def _hosted(shape: Shape) -> bool:
    """An MPS share inside a MIG instance."""
    return shape.kind == "mps" and shape.in_mig


def _instance_weight(sku_name: str, profile: str) -> float:
    """Packing weight of a whole MIG instance: max(compute share, memory share)."""
    sku = get_sku(sku_name)
    prof = sku.mig_profile(profile)
    return max(prof.fraction, prof.memory_slices / sku.memory_slices)


def _fit(items: list[tuple[Curve, float]]) -> list[tuple[Curve, float]]:
    """The rates, scaled down by the least common factor that ``schedule`` accepts."""
    if schedule(items) is not None:
        return items

    def scaled(k: float) -> list[tuple[Curve, float]]:
        return [(c, r * k) for c, r in items]

    if schedule(scaled(0.0)) is None:
        return []
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if schedule(scaled(mid)) is not None:
            lo = mid
        else:
            hi = mid
    return scaled(lo)
