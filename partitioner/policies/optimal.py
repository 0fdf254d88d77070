"""``optimal``: the exact optimum over stgs's discrete choices, as a mixed-integer linear program.

For small instances only (a few GPUs, a few models): it measures what the heuristic ``stgs``
leaves on the table. Same choices as the heuristic: the shapes of ``problem.shapes(t)``, the
batch buckets of the curves, the curves' planning latencies (headroom and worst-case
interference, so both policies are judged alike) and the duty-cycle rule of
``partitioner.problem``.

Formulation: a configuration program, solved by HiGHS (``scipy.optimize.milp``).

* A *configuration* of a shape is a set of models with one batch bucket each,
  ``|set| <= max_models_per_partition``, whose memory fits the shape and whose duty cycle
  ``D = sum_m L_m(b_m)`` (the smallest possible one) meets every SLO: ``D + L_m(b_m) <= slo_m``.
  It serves any rates ``r_m <= cap_m = 1000 b_m / D``: at ``d = D`` every constraint of the duty
  cycle holds (a larger d only lowers what it serves). So a partition's feasible rates are
  exactly the union of its configurations' boxes ``[0, cap]``, and choosing one configuration
  per partition linearises the duty cycle without approximation. Configurations are enumerated
  depth-first with SLO and memory pruning; those whose ``cap`` vector another one of the same
  shape dominates are dropped (Pareto filter), which loses nothing.
* Integer ``n[g, s, c]``: how many partitions of shape s on GPU g run configuration c. Partitions
  of one shape on one GPU are interchangeable, so counting them instead of naming slots removes
  the symmetry between copies.
* GPU g: binary ``zf`` (no MIG: ``sum pct * n <= 100 zf`` over MPS shares, ``full`` counts 100)
  or, where MIG is allowed, binary ``x[g, mu]`` choosing a *maximal* MIG layout up to placement,
  i.e. a multiset mu of profiles that some valid layout of ``stgs.catalog.enumerate_layouts``
  realises (instances may stay empty; where an instance sits does not change its curves). Each
  instance of profile p is used whole (a ``mig`` partition) or hosts MPS shares: integer
  ``h[g, p, pi]`` instances host the share multiset pi (maximal multisets of the MPS-in-MIG
  shares, sum <= 100). ``zf + sum_mu x <= 1``;
  ``sum_c n[g, mig:p, c] + sum_pi h[g, p, pi] <= sum_mu mu(p) x[g, mu]``;
  ``sum_c n[g, p/pct, c] <= sum_pi pi(pct) h[g, p, pi]``.
* Coverage: ``sum_{g,s,c} cap_m(c) n[g,s,c] >= lambda rate_m`` (a model with no load must be
  placed once); identical GPUs are used in order (symmetry).

Two phases: (A) maximise ``lambda <= min(1, fluid bound)``, the smallest served fraction over the
models (it stops as soon as every rate is served); (B) if ``lambda = 1``: minimise GPUs used +
eps * total shape weight (eps < 1 / total weight: the weight only breaks ties). When the full
rates cannot be served, phase A's plan is returned: it maximises min_m served_m / rate_m (no
further tie-break) and is ``feasible = False``.

The plan is built like the greedy's (``Greedy._partition``): every partition is checked with
``schedule()`` at its rates (each model's rate split over its partitions in proportion to their
``cap``; in the rare case rounding breaks ``schedule`` the partition's rates are scaled down by
bisection). ``plan.info["solver"]["status"]``: ``optimal``, ``time_limit`` (stopped early: the
best plan found, maybe not optimal) or ``infeasible`` (full rates proven unservable).

Limits (else ``PlanningError``): ``MAX_GPUS`` GPUs, ``MAX_MODELS`` models, ``MAX_CONFIGS``
enumerated configurations, ``MAX_COLUMNS`` variables. The configurations grow like
(buckets + 1) ^ models on large shapes: 3 to 4 models with loose SLOs, more with tight ones.
Time: phase A gets ``options.time_limit_s``, phase B what is left (at least a tenth of it).
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from partitioner.fluid import fluid_bound
from partitioner.policies import Policy, register
from partitioner.problem import Curve, Problem, Shape, schedule
from stgs.catalog import MigLayout, MigPlacement, enumerate_layouts, get_sku
from stgs.errors import PlanningError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan, Unserved
from stgs.types import GpuSpec

MAX_GPUS = 4
MAX_MODELS = 8
MAX_CONFIGS = 400_000  # enumerated, before the Pareto filter, over all (GPU type, shape)
MAX_COLUMNS = 200_000
_EPS = 1e-9
_DISP = False
_FULL_TOL = 1e-6  # lambda >= 1 - this: every rate is served

FloatArray = npt.NDArray[np.float64]


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
    shape: Shape, curves: dict[int, Curve], max_models: int, budget: int
) -> list[_Config]:
    """Every feasible configuration of ``shape`` (raises _TooLarge past ``budget``)."""
    cands: list[tuple[int, list[tuple[int, float, float, float]]]] = []
    for mi, c in sorted(curves.items()):
        opts = []
        slo = c.model.slo_ms
        for bi in range(len(c.buckets)):
            lat = float(c.lat[bi])
            mem = float(c.memory[bi])
            if lat > 0 and 2 * lat <= slo + _EPS and mem <= shape.memory_mib:
                opts.append((bi, lat, mem, slo - lat))
        if opts:
            cands.append((mi, opts))
    out: list[_Config] = []
    runs: list[tuple[int, int]] = []
    lats: list[float] = []

    def walk(i: int, total: float, mem: float, slack: float) -> None:
        if i == len(cands):
            if runs:
                if len(out) >= budget:
                    raise _TooLarge
                caps = tuple(1000.0 * float(curves[mi].buckets[bi]) / total for mi, bi in runs)
                out.append(_Config(tuple(runs), total, caps))
            return
        walk(i + 1, total, mem, slack)
        if len(runs) >= max_models:
            return
        mi, opts = cands[i]
        for bi, lat, m_mem, m_slack in opts:
            t2 = total + lat
            s2 = min(slack, m_slack)
            if t2 > s2 + _EPS or mem + m_mem > shape.memory_mib:
                continue
            runs.append((mi, bi))
            lats.append(lat)
            walk(i + 1, t2, mem + m_mem, s2)
            runs.pop()
            lats.pop()

    walk(0, 0.0, 0.0, math.inf)
    return out


def _pareto(configs: list[_Config], n_models: int) -> list[_Config]:
    """Drop configurations whose capacity vector another one dominates (ties: keep one)."""
    if len(configs) <= 1:
        return configs
    caps = np.zeros((len(configs), n_models))
    for i, c in enumerate(configs):
        for (mi, _), cap in zip(c.runs, c.caps, strict=True):
            caps[i, mi] = cap
    order = np.lexsort((np.arange(len(configs)), -caps.sum(axis=1)))
    kept = np.zeros((0, n_models))
    keep_idx: list[int] = []
    tol = 1e-9
    chunk = 512
    for s in range(0, len(order), chunk):
        idx = order[s : s + chunk]
        x = caps[idx]
        alive = np.ones(len(idx), dtype=bool)
        if len(kept):
            for k0 in range(0, len(kept), 4096):
                kb = kept[k0 : k0 + 4096]
                dom = (kb[:, None, :] >= x[None, :, :] - tol).all(axis=2).any(axis=0)
                alive &= ~dom
        # within the chunk: j (earlier in the order) dominates i
        sub = x[alive]
        sub_idx = idx[alive]
        if len(sub) > 1:
            ge = (sub[:, None, :] >= sub[None, :, :] - tol).all(axis=2)  # ge[j, i]: j >= i
            earlier = np.tri(len(sub), k=-1, dtype=bool).T  # earlier[j, i]: j < i
            dominated = (ge & earlier).any(axis=0)
            sub, sub_idx = sub[~dominated], sub_idx[~dominated]
        kept = np.vstack([kept, sub])
        keep_idx.extend(int(i) for i in sub_idx)
    return [configs[i] for i in sorted(keep_idx)]


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


@register
class Optimal(Policy):
    name = "optimal"
    description = "exact MILP optimum over the same shapes and batches (small instances only)"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        return _Solver(problem).run()


_CONFIG_CACHE: dict[tuple[object, ...], tuple[object, _ShapeConfigs]] = {}


class _Solver:
    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.models = problem.models
        self.max_models = problem.options.max_models_per_partition

    # ------------------------------------------------------------------ configurations
    def _shape_configs(self, t: GpuSpec, shape: Shape, budget: int) -> _ShapeConfigs:
        curves: dict[int, Curve] = {}
        for mi, m in enumerate(self.models):
            c = self.p.curve(m, t, shape)
            if c is not None:
                curves[mi] = c
        # configurations depend on the curves, not on the rates: cache across rate scalings
        key = (
            t,
            shape,
            self.max_models,
            tuple((m.profile, m.slo_ms, m.name) for m in self.models),
            id(self.p.latency),
            id(self.p.interference),
            self.p.headroom,
        )
        hit = _CONFIG_CACHE.get(key)
        if hit is not None and hit[0] is self.p.latency:
            sc = hit[1]
            return _ShapeConfigs(shape, curves, sc.configs)
        configs = _pareto(_enumerate(shape, curves, self.max_models, budget), len(self.models))
        sc = _ShapeConfigs(shape, curves, configs)
        if len(_CONFIG_CACHE) > 4096:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = (self.p.latency, sc)
        return sc

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
            out[t] = []
            for s in self.p.shapes(t):
                try:
                    sc = self._shape_configs(t, s, budget)
                except _TooLarge:
                    raise self._too_large(
                        f"more than {MAX_CONFIGS} partition configurations"
                    ) from None
                budget -= len(sc.configs)
                if sc.configs:
                    out[t].append(sc)
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
    def _lp_bound(self, c: FloatArray) -> float:
        """min c x over the LP relaxation at full rates (-inf when it fails)."""
        lb = np.array(self.lp.lb)
        ub = np.array(self.lp.ub)
        lb[self.lam] = ub[self.lam] = 1.0
        res = milp(c, bounds=Bounds(lb, ub), constraints=self.cons)
        return float(res.fun) if res.status == 0 else -math.inf

    def _solve(
        self,
        phase: str,
        c: FloatArray,
        lam_lb: float,
        lam_ub: float,
        limit: float,
        at_least: Sequence[tuple[list[int], float]] = (),
    ) -> _Solve:
        lb = np.array(self.lp.lb)
        ub = np.array(self.lp.ub)
        lb[self.lam], ub[self.lam] = lam_lb, lam_ub
        cons = [self.cons]
        for cols, rhs in at_least:
            row = np.zeros(self.lp.n)
            row[cols] = 1.0
            cons.append(LinearConstraint(row[None, :], rhs, np.inf))
        t0 = time.perf_counter()
        res = milp(
            c,
            integrality=np.array(self.lp.integer),
            bounds=Bounds(lb, ub),
            constraints=cons,
            options={"time_limit": max(limit, 0.01), "disp": _DISP},
        )
        seconds = time.perf_counter() - t0
        gap = getattr(res, "mip_gap", None)
        x = None if res.x is None else np.asarray(res.x, dtype=np.float64)
        return _Solve(
            phase,
            int(res.status),
            x,
            float(gap) if gap is not None and math.isfinite(gap) else None,
            seconds,
            str(res.message),
        )

    def run(self) -> Plan:
        t_start = time.perf_counter()
        by_type = self._configs()
        self._build(by_type)
        self.cons = self.lp.constraint()
        n = self.lp.n
        limit = float(self.p.options.time_limit_s)
        t_built = time.perf_counter()

        pos = [m for mi, m in enumerate(self.models) if self.servable[mi] and m.rate_rps > 0]
        bound = fluid_bound(self.p.with_models(pos)) if pos else math.inf
        lam_ub = min(1.0, bound * (1 + 1e-6) + 1e-9)

        # phase A: the largest fraction lambda of every model's rate that can be served
        c_a = np.zeros(n)
        c_a[self.lam] = -1.0
        a = self._solve("max-served-fraction", c_a, 0.0, lam_ub, limit)
        solves = [a]
        chosen = a if a.x is not None else None
        lam = float(a.x[self.lam]) if a.x is not None else 0.0
        if a.status == 0:
            status = "optimal" if lam >= 1 - _FULL_TOL else "infeasible"
        elif a.status == 1:
            status = "time_limit"
        else:
            raise PlanningError(f"exact solver failed: {a.message}")

        if a.x is not None and lam >= 1 - _FULL_TOL:
            # phase B: fewest GPUs, then least shape weight, serving every rate
            c_b = np.zeros(n)
            eps = 0.4 / max(1, len(self.p.gpus))
            for cols in self.gpu_cols:
                for col in cols.used:
                    c_b[col] = 1.0
            for use in self.uses:
                for col in use.cols:
                    c_b[col] = eps * use.sc.shape.weight
            # the LP bound on the GPU count, rounded up, tightens the weak relaxation of used_g
            used_cols = [col for cols in self.gpu_cols for col in cols.used]
            c_lp = np.zeros(n)
            c_lp[used_cols] = 1.0
            lb_gpus = self._lp_bound(c_lp)
            extra = [(used_cols, math.ceil(lb_gpus - 1e-6))] if lb_gpus > 0 else []
            left = limit - (time.perf_counter() - t_built)
            b = self._solve("min-gpus", c_b, 1.0, 1.0, max(left, 0.1 * limit), extra)
            solves.append(b)
            if b.x is not None and float(c_b @ b.x) <= float(c_b @ a.x) + 1e-9:
                chosen = b
            if b.status != 0:
                status = "time_limit"
        info: dict[str, Any] = {
            "status": status,
            "mip_gap": chosen.mip_gap if chosen is not None else None,
            "solve_s": round(time.perf_counter() - t_start, 4),
            "served_fraction": round(lam, 6),
            "columns": n,
            "rows": len(self.lp.rlo),
            "phases": [
                {
                    "phase": s.phase,
                    "message": s.message,
                    "solve_s": round(s.seconds, 4),
                    "mip_gap": s.mip_gap,
                }
                for s in solves
            ],
        }
        x = chosen.x if chosen is not None else None
        return self._assemble(x, status, lam, info)

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
        # MPS neighbours (interference): the shares present in the same host
        host_pct: dict[tuple[int, int | None], int] = defaultdict(int)
        for _, sc, _, host, _ in fitted:
            if sc.shape.kind == "mps":
                host_pct[host] += sc.shape.mps_pct or 0
        index = {m.name: i for i, m in enumerate(self.models)}
        served: dict[int, float] = defaultdict(float)
        by_gpu: dict[int, list[tuple[tuple[int, int], Partition]]] = defaultdict(list)
        for gi, sc, start, host, sched in fitted:
            shape = sc.shape
            sku = self.p.gpus[gi].sku
            neighbours = host_pct[host] - (shape.mps_pct or 0) if shape.kind == "mps" else 0
            models = []
            for s in sched.slots:
                i = int(s.curve.buckets.searchsorted(s.batch))
                slow = self.p.interference.slowdown(s.curve.model.profile, sku, neighbours)
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
        unserved = []
        for mi, m in enumerate(self.models):
            rest = m.rate_rps - served.get(mi, 0.0)
            if rest > 1e-6 * max(1.0, m.rate_rps) or (m.rate_rps <= 0 and mi not in zero_placed):
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
                    start = free[key[1].mig_profile or ""].pop(0)
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
