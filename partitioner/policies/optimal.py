"""``optimal``: the exact optimum over stgs's discrete choices, as a mixed-integer linear program.

For small instances only (a few GPUs, a few models); it proves what the heuristic ``stgs`` leaves
on the table. Same choices as the heuristic: the shapes of ``problem.shapes(t)``, the batch
buckets of the curves, the curves' planning latencies (headroom and worst-case interference, so
the two policies are comparable) and the duty-cycle schedule of ``partitioner.problem``.

Formulation (HiGHS through ``scipy.optimize.milp``). Per GPU g, binary modes ``zf`` (no MIG)
and ``zm`` (MIG, where allowed), ``zf + zm <= 1``. Instead of enumerating whole-GPU patterns,
a pattern is decomposed into *slots* of fixed shape, each with an activation binary ``a``:

* no-MIG mode: one ``full`` slot and ``floor(100 / pct)`` copies of each MPS share,
  ``sum pct * a <= 100 zf`` (``full`` counts 100);
* MIG mode: every placement (profile, start) of the catalog is either used whole (binary ``h``,
  one ``mig`` slot) or hosts MPS shares (binary ``q``, ``floor(100 / pct)`` copies of each
  MPS-in-MIG share, ``sum pct * a <= 100 q``). The placement rules of ``stgs.catalog`` are
  linear: per memory slice ``sum (h + q) <= zm``, compute slices ``sum c (h + q) <= 7 zm``,
  ``max_count`` per profile. So every valid MIG layout (with instances left empty) is a
  feasible point and nothing else is: exact, without listing the layouts.

Copies of one shape in one host are ordered (``a_c <= a_{c-1}``), and among identical GPUs a GPU
is used only when the previous one is. Per slot j (duty cycle ``d_j = 1 / f_j`` ms), model m
and batch bucket b: binary ``w`` (m runs batch b in j) and ``g = w f_j`` (McCormick, exact for a
binary ``w``). With L the planning latency (``curve.lat``):

    sum_b w[j,m,b] <= a_j ;  sum_{m,b} w <= max_models_per_partition
    sum_{m,b} L g <= 1                            (sum L <= d)
    f_j >= sum_b w[j,m,b] / (slo_m - L_m(b))      (d + L <= slo)
    sum_{m,b} memory w <= shape memory
    sum_{j,b} 1000 b g[j,m,b] >= lambda rate_m    (b >= r d / 1000, summed over the slots)

(m, b) pairs with ``2 L > slo`` or memory above the shape's are never generated (they cannot
run), nor slots where no model runs. Two phases: (A) maximise ``lambda <= min(1, fluid bound)``,
the smallest served fraction over the models (stops at once when every rate can be served);
(B) if ``lambda = 1``: minimise GPUs used + eps * total shape weight (eps keeps the weight
secondary). When full rates cannot be served the plan of phase A is returned: it maximises the
minimum over models of served / rate (no further tie-break), ``feasible = False``.

The plan is rebuilt like the greedy's (``Greedy._partition``); each model's rate is split over its
slots in proportion to their capacity ``1000 b / d``, and each partition is checked with
``schedule()`` (rates scaled down by bisection in the rare case rounding makes it fail).

Limits: at most ``MAX_GPUS`` GPUs, ``MAX_MODELS`` models and ``MAX_COLUMNS`` variables, else
``PlanningError``. Time: phase A gets ``options.time_limit_s``, phase B what is left (at least a
tenth of it); ``plan.info["solver"]["status"]`` says ``optimal``, ``time_limit`` (stopped early:
the plan is the best found, maybe not optimal) or ``infeasible`` (full rates proven unservable).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from partitioner.fluid import fluid_bound
from partitioner.policies import Policy, register
from partitioner.problem import Curve, Problem, Shape, schedule
from stgs.catalog import get_sku
from stgs.errors import PlanningError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan, Unserved
from stgs.types import GpuSpec, ModelSpec

MAX_GPUS = 4
MAX_MODELS = 8
MAX_COLUMNS = 200_000
_EPS = 1e-9
_FULL_TOL = 1e-6  # lambda >= 1 - this counts as serving every rate

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class _Entry:
    """Model ``model`` running batch ``curve.buckets[bi]`` in a slot: columns w and g."""

    model: int
    curve: Curve
    bi: int
    w: int
    g: int

    @property
    def batch(self) -> int:
        return int(self.curve.buckets[self.bi])


@dataclass
class _Slot:
    gpu: int
    shape: Shape
    act: int  # column of the activation binary
    f: int  # column of f = 1 / duty cycle (1/ms)
    host: tuple[int, int | None]  # (gpu, MIG start or None): partitions sharing one MPS server
    start: int | None
    index: int  # copy number within its host and shape
    entries: list[_Entry] = field(default_factory=list)


@dataclass
class _Gpu:
    zf: int
    zm: int | None


class _Milp:
    """Columns and sparse rows, built incrementally."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.rlo: list[float] = []
        self.rhi: list[float] = []

    def var(self, lb: float, ub: float, integer: bool) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def binary(self) -> int:
        return self.var(0.0, 1.0, True)

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
class _Solve:
    phase: str
    status: int
    x: FloatArray | None
    mip_gap: float | None
    seconds: float
    message: str


# ---------------------------------------------------------------------------- policy
@register
class Optimal(Policy):
    name = "optimal"
    description = "exact MILP optimum over the same shapes and batches (small instances only)"

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        return _Solver(problem).run()


class _Solver:
    def __init__(self, problem: Problem) -> None:
        self.p = problem
        self.models = problem.models
        self.max_models = problem.options.max_models_per_partition
        self._entry_cache: dict[tuple[GpuSpec, Shape], list[tuple[int, Curve, int]]] = {}

    # ------------------------------------------------------------------ candidates
    def _candidates(self, t: GpuSpec, shape: Shape) -> list[tuple[int, Curve, int]]:
        """(model index, curve, bucket index) that can run on ``shape`` at all."""
        key = (t, shape)
        if key not in self._entry_cache:
            out: list[tuple[int, Curve, int]] = []
            for mi, m in enumerate(self.models):
                c = self.p.curve(m, t, shape)
                if c is None:
                    continue
                for bi in range(len(c.buckets)):
                    lat = float(c.lat[bi])
                    if lat <= 0 or 2 * lat > m.slo_ms + _EPS:
                        continue
                    if float(c.memory[bi]) > shape.memory_mib:
                        continue
                    out.append((mi, c, bi))
            self._entry_cache[key] = out
        return self._entry_cache[key]

    def _size(self) -> int:
        """Columns the model will have (before building it)."""
        n = 0
        for t in self.p.gpus:
            sku = get_sku(t.sku)
            for s in self.p.shapes(t):
                k = len(self._candidates(t, s))
                if not k:
                    continue
                copies = 1 if s.kind != "mps" else 100 // (s.mps_pct or 100)
                hosts = len(sku.mig_profile(s.mig_profile).starts) if s.in_mig else 1
                n += copies * hosts * (2 * k + 2)
        return n

    def _check_size(self) -> None:
        n = self._size()
        if len(self.p.gpus) > MAX_GPUS or len(self.models) > MAX_MODELS or n > MAX_COLUMNS:
            raise PlanningError(
                f"instance too large for the exact solver ({len(self.p.gpus)} GPUs,"
                f" {len(self.models)} models, about {n} variables; limits: {MAX_GPUS} GPUs,"
                f" {MAX_MODELS} models, {MAX_COLUMNS} variables): use --policy stgs"
            )

    # ------------------------------------------------------------------ model
    def _build(self) -> None:
        lp = _Milp()
        self.lp = lp
        self.lam = lp.var(0.0, 1.0, False)
        self.gpus: list[_Gpu] = []
        self.slots: list[_Slot] = []
        prev_of_type: dict[GpuSpec, int] = {}
        for gi, t in enumerate(self.p.gpus):
            gpu = self._build_gpu(gi, t)
            self.gpus.append(gpu)
            if t in prev_of_type:  # identical GPUs: use them in order
                prev = self.gpus[prev_of_type[t]]
                lp.row(
                    [(c, 1.0) for c in self._used(gpu)] + [(c, -1.0) for c in self._used(prev)],
                    -math.inf,
                    0.0,
                )
            prev_of_type[t] = gi
        for slot in self.slots:
            self._build_slot(slot)
        # coverage
        by_model: dict[int, list[_Entry]] = defaultdict(list)
        for slot in self.slots:
            for e in slot.entries:
                by_model[e.model].append(e)
        self.servable = [bool(by_model.get(mi)) for mi in range(len(self.models))]
        for mi, m in enumerate(self.models):
            if not self.servable[mi]:
                continue
            if m.rate_rps > 0:
                terms = [(e.g, 1000.0 * e.batch / m.rate_rps) for e in by_model[mi]]
            else:  # a model with no load is still deployed once
                terms = [(e.w, 1.0) for e in by_model[mi]]
            lp.row([*terms, (self.lam, -1.0)], 0.0, math.inf)

    @staticmethod
    def _used(gpu: _Gpu) -> list[int]:
        return [gpu.zf] if gpu.zm is None else [gpu.zf, gpu.zm]

    def _new_slot(
        self, gi: int, shape: Shape, host: tuple[int, int | None], start: int | None, index: int
    ) -> _Slot:
        act = self.lp.binary()
        slot = _Slot(gi, shape, act, -1, host, start, index)
        self.slots.append(slot)
        return slot

    def _share_copies(
        self, gi: int, shapes: Sequence[Shape], host_col: int, start: int | None, t: GpuSpec
    ) -> None:
        """MPS shares (copies of each) under one host (a GPU's no-MIG mode or a MIG instance)."""
        lp = self.lp
        knap: list[tuple[int, float]] = []
        for s in shapes:
            if not self._candidates(t, s):
                continue
            pct = 100 if s.kind == "full" else (s.mps_pct or 100)
            copies = 1 if s.kind == "full" else 100 // pct
            prev: int | None = None
            for c in range(copies):
                slot = self._new_slot(gi, s, (gi, start), start, c)
                lp.row([(slot.act, 1.0), (host_col, -1.0)], -math.inf, 0.0)
                if prev is not None:
                    lp.row([(slot.act, 1.0), (prev, -1.0)], -math.inf, 0.0)
                prev = slot.act
                knap.append((slot.act, float(pct)))
        if knap:
            lp.row([*knap, (host_col, -100.0)], -math.inf, 0.0)

    def _build_gpu(self, gi: int, t: GpuSpec) -> _Gpu:
        lp = self.lp
        shapes = self.p.shapes(t)
        zf = lp.binary()
        self._share_copies(gi, [s for s in shapes if not s.in_mig], zf, None, t)
        whole = {s.mig_profile: s for s in shapes if s.kind == "mig" and s.mig_profile}
        shared: dict[str, list[Shape]] = defaultdict(list)
        for s in shapes:
            if s.kind == "mps" and s.mig_profile:
                shared[s.mig_profile].append(s)
        if not t.mig or not (whole or shared):
            return _Gpu(zf, None)
        zm = lp.binary()
        lp.row([(zf, 1.0), (zm, 1.0)], -math.inf, 1.0)
        sku = get_sku(t.sku)
        slices: dict[int, list[int]] = defaultdict(list)
        compute: list[tuple[int, float]] = []
        for prof_name in sorted(set(whole) | set(shared)):
            prof = sku.mig_profile(prof_name)
            count: list[tuple[int, float]] = []
            for start in prof.starts:
                occ: list[int] = []
                s_whole = whole.get(prof_name)
                if s_whole is not None and self._candidates(t, s_whole):
                    occ.append(self._new_slot(gi, s_whole, (gi, start), start, 0).act)
                if any(self._candidates(t, s) for s in shared.get(prof_name, [])):
                    q = lp.binary()
                    self._share_copies(gi, shared[prof_name], q, start, t)
                    occ.append(q)
                if not occ:
                    continue
                if len(occ) > 1:
                    lp.row([(c, 1.0) for c in occ], -math.inf, 1.0)
                for c in occ:
                    for sl in range(start, start + prof.memory_slices):
                        slices[sl].append(c)
                    compute.append((c, float(prof.compute_slices)))
                    count.append((c, 1.0))
            if len(count) > prof.max_count:
                lp.row(count, -math.inf, float(prof.max_count))
        for cols in slices.values():
            lp.row([(c, 1.0) for c in cols] + [(zm, -1.0)], -math.inf, 0.0)
        if compute:
            lp.row([*compute, (zm, -float(sku.compute_slices))], -math.inf, 0.0)
        return _Gpu(zf, zm)

    def _build_slot(self, slot: _Slot) -> None:
        lp = self.lp
        t = self.p.gpus[slot.gpu]
        cands = self._candidates(t, slot.shape)
        f_max = max(1.0 / float(c.lat[bi]) for _, c, bi in cands)
        slot.f = lp.var(0.0, f_max, False)
        lp.row([(slot.f, 1.0), (slot.act, -f_max)], -math.inf, 0.0)
        cap: list[tuple[int, float]] = []
        mem: list[tuple[int, float]] = []
        per_model: dict[int, list[_Entry]] = defaultdict(list)
        for mi, c, bi in cands:
            lat = float(c.lat[bi])
            w = lp.binary()
            g = lp.var(0.0, 1.0 / lat, False)
            e = _Entry(mi, c, bi, w, g)
            slot.entries.append(e)
            per_model[mi].append(e)
            lp.row([(g, 1.0), (w, -1.0 / lat)], -math.inf, 0.0)  # g <= w / L
            lp.row([(g, 1.0), (slot.f, -1.0)], -math.inf, 0.0)  # g <= f
            lp.row([(slot.f, 1.0), (g, -1.0), (w, f_max)], -math.inf, f_max)  # g >= f - F(1-w)
            cap.append((g, lat))
            mem.append((w, float(c.memory[bi])))
        lp.row(cap, -math.inf, 1.0)
        if sum(v for _, v in mem) > slot.shape.memory_mib:
            lp.row([*mem, (slot.act, -slot.shape.memory_mib)], -math.inf, 0.0)
        for mi, es in per_model.items():
            slo = self.models[mi].slo_ms
            lp.row([(e.w, 1.0) for e in es] + [(slot.act, -1.0)], -math.inf, 0.0)
            lp.row(
                [(e.w, 1.0 / (slo - float(e.curve.lat[e.bi]))) for e in es] + [(slot.f, -1.0)],
                -math.inf,
                0.0,
            )
        if len(per_model) > self.max_models:
            lp.row(
                [(e.w, 1.0) for e in slot.entries] + [(slot.act, -float(self.max_models))],
                -math.inf,
                0.0,
            )

    # ------------------------------------------------------------------ solve
    def _solve(
        self, phase: str, c: FloatArray, lam_lb: float, lam_ub: float, limit: float
    ) -> _Solve:
        lb = np.array(self.lp.lb)
        ub = np.array(self.lp.ub)
        lb[self.lam], ub[self.lam] = lam_lb, lam_ub
        t0 = time.perf_counter()
        res = milp(
            c,
            integrality=np.array(self.lp.integer),
            bounds=Bounds(lb, ub),
            constraints=self.cons,
            options={"time_limit": max(limit, 0.01), "disp": False},
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
        self._check_size()
        self._build()
        self.cons = self.lp.constraint()
        n = self.lp.n
        limit = float(self.p.options.time_limit_s)

        servable_pos = [
            m for mi, m in enumerate(self.models) if self.servable[mi] and m.rate_rps > 0
        ]
        bound = fluid_bound(self.p.with_models(servable_pos)) if servable_pos else math.inf
        lam_ub = min(1.0, bound * (1 + 1e-6) + 1e-9)

        # phase A: the largest served fraction lambda
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
            # phase B: fewest GPUs, then least shape weight, at full rates
            c_b = np.zeros(n)
            eps = 0.4 / max(1, len(self.gpus))
            for gpu in self.gpus:
                for col in self._used(gpu):
                    c_b[col] = 1.0
            for slot in self.slots:
                c_b[slot.act] = eps * slot.shape.weight
            left = limit - (time.perf_counter() - t_start)
            b = self._solve("min-gpus", c_b, 1.0, 1.0, max(left, 0.1 * limit))
            solves.append(b)
            if b.x is not None and float(c_b @ b.x) <= float(c_b @ a.x) + 1e-9:
                chosen = b
            if b.status != 0:
                status = "time_limit"
        elapsed = time.perf_counter() - t_start
        info: dict[str, Any] = {
            "status": status,
            "mip_gap": chosen.mip_gap if chosen is not None else None,
            "solve_s": round(elapsed, 4),
            "served_fraction": round(lam, 6),
            "columns": n,
            "rows": len(self.lp.rlo),
            "phases": [
                {
                    "phase": s.phase,
                    "status": s.message,
                    "solve_s": round(s.seconds, 4),
                    "mip_gap": s.mip_gap,
                }
                for s in solves
            ],
        }
        return self._assemble(chosen.x if chosen is not None else None, status, lam, info)

    # ------------------------------------------------------------------ plan
    def _assemble(
        self, x: FloatArray | None, status: str, lam: float, info: dict[str, Any]
    ) -> Plan:
        # per slot: (entry, capacity rps) of the models that run there
        placed: list[tuple[_Slot, list[tuple[_Entry, float]]]] = []
        total_cap: dict[int, float] = defaultdict(float)
        if x is not None:
            for slot in self.slots:
                if x[slot.act] < 0.5:
                    continue
                f = float(x[slot.f])
                runs = [(e, 1000.0 * e.batch * f) for e in slot.entries if x[e.w] > 0.5]
                if runs:
                    placed.append((slot, runs))
                    for e, cap in runs:
                        total_cap[e.model] += cap
        # rates: each model's served rate split over its slots in proportion to capacity
        served_target = {
            mi: min(m.rate_rps, total_cap.get(mi, 0.0)) for mi, m in enumerate(self.models)
        }
        zero_placed: set[int] = set()
        parts: list[tuple[_Slot, list[tuple[Curve, float]]]] = []
        for slot, runs in placed:
            items: list[tuple[Curve, float]] = []
            for e, cap in runs:
                m = self.models[e.model]
                if m.rate_rps <= 0:
                    if e.model in zero_placed:
                        continue
                    zero_placed.add(e.model)
                    items.append((e.curve, 0.0))
                    continue
                tot = total_cap[e.model]
                rate = served_target[e.model] * cap / tot if tot > 0 else 0.0
                if rate > _EPS * max(1.0, m.rate_rps):
                    items.append((e.curve, rate))
            if items:
                parts.append((slot, _fit(items)))
        # neighbours for the interference of MPS partitions: shares in the same host
        host_pct: dict[tuple[int, int | None], int] = defaultdict(int)
        for slot, _ in parts:
            if slot.shape.kind == "mps":
                host_pct[slot.host] += slot.shape.mps_pct or 0
        by_gpu: dict[int, list[tuple[tuple[int, int, int], Partition]]] = defaultdict(list)
        served: dict[int, float] = defaultdict(float)
        for slot, items in parts:
            sched = schedule(items)
            if sched is None:  # _fit guarantees a schedule; keep the plan honest regardless
                continue
            t = self.p.gpus[slot.gpu]
            shape = slot.shape
            neighbours = host_pct[slot.host] - (shape.mps_pct or 0) if shape.kind == "mps" else 0
            models = []
            for s in sched.slots:
                i = int(s.curve.buckets.searchsorted(s.batch))
                slow = self.p.interference.slowdown(s.curve.model.profile, t.sku, neighbours)
                models.append(
                    ModelAssignment(
                        s.curve.model.name, s.batch, s.rate_rps, float(s.curve.raw_solo[i]) * slow
                    )
                )
            for (c, r), mi in zip(items, _model_indices(self.models, items), strict=True):
                del c
                served[mi] += r
            part = Partition(
                kind=shape.kind,  # type: ignore[arg-type]
                sm_count=shape.sm_count,
                memory_mib=shape.memory_mib,
                duty_cycle_ms=sched.duty_cycle_ms,
                models=tuple(models),
                mig_profile=shape.mig_profile,
                mig_start=slot.start,
                mps_pct=shape.mps_pct,
            )
            key = (
                slot.start if slot.start is not None else -1,
                -(shape.mps_pct or 100),
                slot.index,
            )
            by_gpu[slot.gpu].append((key, part))
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
            missing_zero = m.rate_rps <= 0 and mi not in zero_placed
            if rest > 1e-6 * max(1.0, m.rate_rps) or missing_zero:
                unserved.append(Unserved(m.name, max(0.0, rest), self._reason(mi, status, lam)))
        return Plan(
            policy="optimal",
            feasible=not unserved,
            gpus=gpus,
            unserved=tuple(unserved),
            info={"solver": info},
        )

    def _reason(self, mi: int, status: str, lam: float) -> str:
        if not self.servable[mi]:
            m = self.models[mi]
            return (
                f"no partition of these GPUs serves it within slo_ms={m.slo_ms:g} (no profile,"
                " or even a batch of 1 takes more than half the SLO with headroom and"
                " interference, or it does not fit in memory)"
            )
        if status == "time_limit":
            return "the exact solver stopped at its time limit before serving this rate"
        return (
            "insufficient GPU capacity: the exact optimum serves at most"
            f" {100 * lam:.2f}% of every model's rate"
        )


def _model_indices(models: Sequence[ModelSpec], items: Sequence[tuple[Curve, float]]) -> list[int]:
    index = {m.name: i for i, m in enumerate(models)}
    return [index[c.model.name] for c, _ in items]


def _fit(items: list[tuple[Curve, float]]) -> list[tuple[Curve, float]]:
    """The rates, scaled down by the least common factor that ``schedule`` accepts."""
    if schedule(items) is not None:
        return items

    def scaled(k: float) -> list[tuple[Curve, float]]:
        return [(c, r * k) for c, r in items]

    lo, hi = 0.0, 1.0
    if schedule(scaled(0.0)) is None:
        return []
    for _ in range(40):
        mid = (lo + hi) / 2
        if schedule(scaled(mid)) is not None:
            lo = mid
        else:
            hi = mid
    return scaled(lo)
