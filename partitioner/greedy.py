"""The greedy engine behind the heuristic policies: size partitions, time-share, pack, assemble.

One engine, configured per policy (which shape families, whether partitions are time-shared):

1. split each model's rate over GPU types (the fluid LP's guidance, ``fluid.split_rates``);
2. per GPU type, give each model ``floor(rate / T*)`` dedicated partitions of its most efficient
   shape (throughput ``T*`` at its best batch), leaving a residual rate;
3. place residuals, largest first: into an open time-shared partition where the duty-cycle
   schedule still holds (best fit), else into a new partition of the shape that serves the
   residual at the least GPU fraction x utilisation;
4. shrink every shared partition to the smallest shape that still schedules its models;
5. pack partitions onto GPUs (MPS shares, MIG placements); what does not fit is re-placed
   into the free space left on any GPU (smaller shapes, rate split), else reported unserved.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from partitioner.fluid import split_rates
from partitioner.packing import GpuBin, Instance
from partitioner.problem import Curve, Problem, Schedule, Shape, schedule
from partitioner.replan import current_rates, rate_share
from stgs.catalog import MigPlacement, free_starts, get_sku
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan, Unserved
from stgs.types import GpuSpec, ModelSpec

FULL, MPS, MIG, MIG_MPS = "full", "mps", "mig", "mig-mps"
ALL_FAMILIES = frozenset({FULL, MPS, MIG, MIG_MPS})


def family(shape: Shape) -> str:
    if shape.kind == "mps":
        return MIG_MPS if shape.in_mig else MPS
    return shape.kind


@dataclass(frozen=True)
class GreedyConfig:
    name: str
    families: frozenset[str] = ALL_FAMILIES
    time_sharing: bool = True
    shrink: bool = True
    consolidate: bool = True  # empty lightly loaded shared partitions into the others
    dedicate: bool = True  # False: no saturated copies first, every rate placed as a residual
    fallback_families: frozenset[str] = frozenset({FULL})  # for GPU types that have none of them


@dataclass
class Part:
    """A partition under construction."""

    gtype: GpuSpec
    shape: Shape
    items: list[tuple[ModelSpec, float]]
    sched: Schedule
    shared: bool = True
    bin: int = -1
    instance: Instance | None = None
    pct_index: int = -1

    @property
    def load(self) -> float:
        return self.shape.weight * self.sched.utilisation


@dataclass
class _TypeState:
    gtype: GpuSpec
    shapes: tuple[Shape, ...]
    parts: list[Part] = field(default_factory=list)
    bins: list[GpuBin] = field(default_factory=list)


class Greedy:
    def __init__(self, problem: Problem, cfg: GreedyConfig) -> None:
        self.p = problem
        self.cfg = cfg
        self.max_models = problem.options.max_models_per_partition if cfg.time_sharing else 1
        self.types: dict[GpuSpec, _TypeState] = {}
        for t in problem.gpu_types:
            shapes = tuple(s for s in problem.shapes(t) if family(s) in cfg.families)
            if not shapes:
                shapes = tuple(s for s in problem.shapes(t) if family(s) in cfg.fallback_families)
            self.types[t] = _TypeState(t, shapes)
        self.unserved: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._curves: dict[tuple[str, GpuSpec, Shape], Curve | None] = {}
        self._best_cache: dict[tuple[str, GpuSpec], tuple[float, Shape | None]] = {}

    # ------------------------------------------------------------------ helpers
    def _best(self, m: ModelSpec, t: GpuSpec) -> tuple[float, Shape | None]:
        """(packing weight per request/s, shape) of ``m``'s cheapest shape on ``t`` (cached).

        The weight is the shape's *packing* weight (``_pack_weight``): copies of an MPS share
        that leave a sliver of their GPU or MIG instance unused are charged part of it."""
        key = (m.name, t)
        got = self._best_cache.get(key)
        if got is None:
            best: tuple[float, Shape | None] = (math.inf, None)
            for shape in self.types[t].shapes:
                c = self._curve(m, t, shape)
                if c is None:
                    continue
                cost = _pack_weight(t, shape) / c.max_rps
                if cost < best[0] - 1e-15:
                    best = (cost, shape)
            got = self._best_cache[key] = best
        return got

    def _curve(self, m: ModelSpec, t: GpuSpec, s: Shape) -> Curve | None:
        key = (m.name, t, s)
        if key not in self._curves:
            c = self.p.curve(m, t, s)
            self._curves[key] = c if c is not None and c.servable else None
        return self._curves[key]

    def _sched(
        self, t: GpuSpec, s: Shape, items: Sequence[tuple[ModelSpec, float]]
    ) -> Schedule | None:
        curves = []
        for m, r in items:
            c = self._curve(m, t, s)
            if c is None:
                return None
            curves.append((c, r))
        return schedule(curves)

    # ------------------------------------------------------------------ main
    def run(self) -> Plan:
        costs = {(m.name, t): self._best(m, t)[0] for m in self.p.models for t in self.types}
        admitted = []
        for m in self.p.models:
            if all(math.isinf(costs[(m.name, t)]) for t in self.types):
                self.unserved[m.name].append((m.rate_rps, self._refusal(m)))
            else:
                admitted.append(m)
        split = split_rates(self.p.with_models(admitted), costs) if admitted else {}
        residuals: list[tuple[ModelSpec, GpuSpec, float]] = []
        by_name = {m.name: m for m in admitted}
        for (name, t), rate in split.items():
            if self.cfg.dedicate:
                residuals.extend(self._dedicate(by_name[name], t, rate))
            else:
                residuals.append((by_name[name], t, rate))
        self._place_residuals(residuals)
        if self.cfg.time_sharing and self.cfg.consolidate:
            for st in self.types.values():
                self._consolidate(st)
        if self.cfg.shrink:
            for st in self.types.values():
                for part in st.parts:
                    if part.shared:
                        self._shrink(part)
        leftovers: list[tuple[ModelSpec, float]] = []
        for st in self.types.values():
            leftovers.extend(self._pack(st))
        if leftovers:
            for st in self.types.values():
                self._upgrade_mig(st)
        for m, rate in leftovers:
            rest = self._fill_free_space(m, rate)
            if rest > 1e-9 * max(1.0, m.rate_rps):
                self.unserved[m.name].append(
                    (rest, "insufficient GPU capacity: no free partition can take this rate")
                )
        return self._assemble()

    def repair(self, current: Plan) -> Plan | None:
        """The current plan kept in place, with the new rates fitted into it and the free space.

        Every current partition stays where it is (no MIG instance is destroyed, no MPS client
        restarted) unless no model of it remains; each model's new rate is spread over its
        current partitions in proportion to the old rates; a partition that cannot hold its
        share gives up the largest uniform fraction it must, and that rate, with the rates of
        new models, goes to shared partitions with room or to new partitions in the free
        space (``_fill_free_space``). None when the plan does not fit these GPUs.
        """
        if len(current.gpus) != len(self.p.gpus):
            return None
        models = {m.name: m for m in self.p.models}
        old_rate, count = current_rates(current)
        indices: dict[GpuSpec, list[int]] = defaultdict(list)
        for i, spec in enumerate(self.p.gpus):
            indices[spec].append(i)
        for t, st in self.types.items():
            st.parts = []
            st.bins = [GpuBin(t.sku) for _ in indices[t]]
        residual: list[tuple[ModelSpec, float]] = []
        for g in current.gpus:
            t = self.p.gpus[g.index]
            if g.sku != t.sku or (g.mig and not t.mig):
                return None
            st = self.types[t]
            bi = indices[t].index(g.index)
            b = st.bins[bi]
            instances: dict[int, Instance] = {}
            for p in g.partitions:
                shape = next(
                    (
                        s
                        for s in self.p.shapes(t)
                        if s.kind == p.kind
                        and s.mig_profile == p.mig_profile
                        and s.mps_pct == p.mps_pct
                    ),
                    None,
                )
                if shape is None:
                    return None
                items = []
                for a in p.models:
                    m = models.get(a.name)
                    if m is None:
                        continue  # deregistered
                    items.append((m, m.rate_rps * rate_share(a, old_rate, count)))
                sched = self._sched(t, shape, items) if items else None
                if items and sched is None:
                    lam = self._max_fraction(t, shape, items)
                    residual.extend((m, r * (1 - lam)) for m, r in items)
                    items = [(m, r * lam) for m, r in items] if lam > 0 else []
                    sched = self._sched(t, shape, items) if items else None
                if not items or sched is None:
                    residual.extend(items)
                    continue  # the partition goes; its space is free
                kept = Part(t, shape, items, sched, shared=self.cfg.time_sharing, bin=bi)
                if shape.kind == "mig" or shape.in_mig:
                    start = p.mig_start if p.mig_start is not None else -1
                    inst = instances.get(start)
                    if inst is None:
                        inst = instances[start] = b.take_instance(shape.mig_profile or "", start)
                    if shape.in_mig:
                        inst.mps_pcts.append(shape.mps_pct or 100)
                        kept.pct_index = len(inst.mps_pcts) - 1
                    kept.instance = inst
                else:
                    kept.pct_index = b.take_mps(shape.mps_pct or 100)
                st.parts.append(kept)
        for m in self.p.models:
            if m.name not in old_rate:
                residual.append((m, m.rate_rps))
        for m, rate in residual:
            if rate <= 1e-9:
                continue
            rest = self._fill_free_space(m, rate)
            if rest > 1e-9 * max(1.0, m.rate_rps):
                self.unserved[m.name].append(
                    (rest, "insufficient GPU capacity: no free partition can take this rate")
                )
        return self._assemble()

    def _max_fraction(
        self, t: GpuSpec, shape: Shape, items: Sequence[tuple[ModelSpec, float]]
    ) -> float:
        """Largest lambda in [0, 1] with every rate scaled by lambda still scheduling."""
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = (lo + hi) / 2
            if self._sched(t, shape, [(m, r * mid) for m, r in items]) is not None:
                lo = mid
            else:
                hi = mid
        return lo

    def _refusal(self, m: ModelSpec) -> str:
        best: tuple[float, str] | None = None
        for t, st in self.types.items():
            for s in st.shapes:
                c = self.p.curve(m, t, s)
                if c is not None and (best is None or float(c.lat[0]) < best[0]):
                    best = (float(c.lat[0]), f"{t.sku} {s.label}")
        if best is None:
            return f"no profile of {m.profile!r} on these GPUs"
        return (
            f"cannot meet slo_ms={m.slo_ms:g} on any partition of these GPUs: the fastest batch"
            f" of 1 takes {best[0]:.2f} ms with headroom and interference ({best[1]}), and"
            f" a request may wait one duty cycle before its batch runs"
        )

    # ------------------------------------------------------------------ step 2
    def _dedicate(
        self, m: ModelSpec, t: GpuSpec, rate: float
    ) -> list[tuple[ModelSpec, GpuSpec, float]]:
        st = self.types[t]
        _cost, shape = self._best(m, t)
        if shape is None:
            return [(m, t, rate)]
        curve = self._curve(m, t, shape)
        assert curve is not None
        tmax = curve.max_rps * (1 - 1e-9)
        n = int(rate // tmax) if rate > 0 else 0
        if n:
            sched = schedule([(curve, tmax)])
            if sched is None:  # numerical edge: fall back to residual placement
                return [(m, t, rate)]
            for _ in range(n):
                st.parts.append(Part(t, shape, [(m, tmax)], sched, shared=False))
        return [(m, t, rate - n * tmax)] if rate - n * tmax > 1e-9 or rate <= 0 else []

    # ------------------------------------------------------------------ step 3
    def _place_residuals(self, residuals: list[tuple[ModelSpec, GpuSpec, float]]) -> None:
        def weight(item: tuple[ModelSpec, GpuSpec, float]) -> float:
            m, t, r = item
            c, _ = self._best(m, t)
            return r * c if math.isfinite(c) else 0.0

        for m, t, rate in sorted(residuals, key=weight, reverse=True):
            self._place_one(m, t, rate)

    IDLE_COST = 0.5  # what a new partition's idle share is charged, against joining one

    def _place_one(self, m: ModelSpec, t: GpuSpec, rate: float) -> None:
        st = self.types[t]
        opened = self._open(m, t, rate)
        if self.cfg.time_sharing:
            # Join the open partition whose load (weight x utilisation) grows least: a tight-SLO
            # model that shortens a partition's duty cycle shrinks every neighbour's batch, and
            # that loss counts here. Opening a new partition costs its load plus part of its
            # idle share (later residuals may fill it, or they may not).
            best: tuple[float, Part | None, Schedule | None] | None = None
            if opened is not None:
                w = opened.shape.weight
                u = opened.sched.utilisation
                best = (w * u + self.IDLE_COST * w * (1 - u), None, None)
            for part in self._open_shared(st, m):
                sched = self._sched(t, part.shape, [*part.items, (m, rate)])
                if sched is None:
                    continue
                key = part.shape.weight * (sched.utilisation - part.sched.utilisation)
                if best is None or key < best[0]:
                    best = (key, part, sched)
            if best is not None and best[1] is not None and best[2] is not None:
                _, part, sched = best[0], best[1], best[2]
                part.items.append((m, rate))
                part.sched = sched
                return
        if opened is None:
            # the residual alone is more than any one shape serves within SLO: split it
            _cost, shape = self._best(m, t)
            curve = self._curve(m, t, shape) if shape is not None else None
            if curve is None or curve.max_rps <= 0:
                self.unserved[m.name].append(
                    (rate, "no partition shape serves it on this GPU type")
                )
                return
            half = rate / 2
            self._place_one(m, t, half)
            self._place_one(m, t, rate - half)
            return
        st.parts.append(opened)

    CANDIDATES = 24  # shared partitions tried per placement: the ones with the most idle time

    def _open_shared(self, st: _TypeState, m: ModelSpec) -> list[Part]:
        """Shared partitions that could take ``m``, the idlest first, at most CANDIDATES."""
        parts = [
            p
            for p in st.parts
            if p.shared
            and len(p.items) < self.max_models
            and p.sched.utilisation < 0.999
            and all(pm.name != m.name for pm, _ in p.items)
        ]
        parts.sort(key=lambda p: p.sched.utilisation)
        return parts[: self.CANDIDATES]

    def _open(self, m: ModelSpec, t: GpuSpec, rate: float) -> Part | None:
        best: tuple[float, Part] | None = None
        for shape in self.types[t].shapes:
            sched = self._sched(t, shape, [(m, rate)])
            if sched is None:
                continue
            if self.cfg.time_sharing:
                key = shape.weight * sched.utilisation + 1e-6 * shape.weight
            else:
                key = shape.weight  # no sharing: the smallest partition that serves it
            if best is None or key < best[0]:
                best = (key, Part(t, shape, [(m, rate)], sched, shared=self.cfg.time_sharing))
        return best[1] if best else None

    def _consolidate(self, st: _TypeState) -> None:
        """Empty the least-loaded shared partitions into the others where their schedules hold.

        Residual placement is greedy: late residuals open partitions that stay half idle. Here
        each shared partition, least loaded first, tries to hand all its models (splitting a
        rate over several partitions where needed) to the other shared partitions; when every
        model finds room the partition is dropped, else nothing changes.
        """
        t = st.gtype
        for part in sorted((p for p in st.parts if p.shared), key=lambda p: p.load):
            others = [q for q in st.parts if q.shared and q is not part]
            if not others:
                break
            saved = [(q, list(q.items), q.sched) for q in others]
            ok = True
            for m, rate in sorted(part.items, key=lambda it: -it[1]):
                left = rate
                others.sort(key=lambda q: q.sched.utilisation)
                for q in others[: self.CANDIDATES]:
                    if left <= 1e-9:
                        break
                    has = any(qm.name == m.name for qm, _ in q.items)
                    if not has and len(q.items) >= self.max_models:
                        continue
                    left -= self._top_up(t, q, m, left)
                if left > 1e-9 * max(1.0, rate):
                    ok = False
                    break
            if ok:
                st.parts.remove(part)
            else:
                for q, items, sched in saved:
                    q.items, q.sched = items, sched

    def _top_up(self, t: GpuSpec, q: Part, m: ModelSpec, rate: float) -> float:
        """Add the most of ``rate`` of ``m`` that ``q`` can take (``_max_extra``); return it."""
        take = self._max_extra(t, q, m, rate)
        if take > 0:
            q.items = _with_rate(q.items, m, take)
            sched = self._sched(t, q.shape, q.items)
            assert sched is not None
            q.sched = sched
        return take

    def _max_extra(self, t: GpuSpec, q: Part, m: ModelSpec, rate: float) -> float:
        """Largest extra rate <= ``rate`` of ``m`` that partition ``q`` can take (bisection)."""
        if self._sched(t, q.shape, _with_rate(q.items, m, rate)) is not None:
            return rate
        if self._sched(t, q.shape, _with_rate(q.items, m, 0.0)) is None:
            return 0.0
        lo, hi = 0.0, rate
        for _ in range(12):
            mid = (lo + hi) / 2
            if self._sched(t, q.shape, _with_rate(q.items, m, mid)) is not None:
                lo = mid
            else:
                hi = mid
        return lo if lo > 1e-3 * rate else 0.0

    def _shrink(self, part: Part) -> None:
        for shape in self.types[part.gtype].shapes:  # smallest first
            if shape.weight >= part.shape.weight:
                break
            sched = self._sched(part.gtype, shape, part.items)
            if sched is not None:
                part.shape, part.sched = shape, sched
                return

    # ------------------------------------------------------------------ step 5
    def _pack(self, st: _TypeState) -> list[tuple[ModelSpec, float]]:
        """Pack this type's partitions onto its GPUs; return the rates that did not fit."""
        n_gpus = self.p.count(st.gtype)
        st.bins = [GpuBin(st.gtype.sku) for _ in range(n_gpus)]
        left: list[tuple[ModelSpec, float]] = []
        mig_parts = [p for p in st.parts if p.shape.in_mig]
        flat_parts = [p for p in st.parts if not p.shape.in_mig]
        sku = get_sku(st.gtype.sku)

        # MPS inside MIG: group shares into instances of their profile (first-fit decreasing)
        groups: dict[str, list[tuple[Instance, list[Part]]]] = defaultdict(list)
        whole: list[Part] = []
        for part in sorted(mig_parts, key=lambda p: -(p.shape.mps_pct or 100)):
            if part.shape.kind == "mig":
                whole.append(part)
                continue
            pct = part.shape.mps_pct or 100
            prof = part.shape.mig_profile or ""
            for inst, members in groups[prof]:
                if inst.mps_free >= pct:
                    inst.mps_pcts.append(pct)
                    members.append(part)
                    break
            else:
                groups[prof].append((Instance(prof, -1, [pct]), [part]))
        units: list[tuple[str, list[Part], Instance | None]] = [
            (p.shape.mig_profile or "", [p], None) for p in whole
        ]
        for prof, insts in groups.items():
            units.extend((prof, members, inst) for inst, members in insts)
        units.sort(
            key=lambda u: (
                -sku.mig_profile(u[0]).compute_slices,
                -sku.mig_profile(u[0]).memory_slices,
            )
        )
        for prof, members, proto in units:
            placed = False
            for bi, b in enumerate(st.bins):
                start = b.best_start(prof)
                if start is None:
                    continue
                inst = b.take_instance(prof, start)
                if proto is not None:
                    inst.mps_pcts = list(proto.mps_pcts)
                for j, part in enumerate(members):
                    part.bin, part.instance, part.pct_index = bi, inst, j
                placed = True
                break
            if not placed:
                left.extend(it for part in members for it in part.items)
                for part in members:
                    part.bin = -1
        for part in sorted(flat_parts, key=lambda p: -p.shape.frac):
            pct = part.shape.mps_pct or 100
            for bi, b in enumerate(st.bins):
                if b.can_take_mps(pct):
                    part.pct_index = b.take_mps(pct)
                    part.bin = bi
                    break
            else:
                left.extend(part.items)
                part.bin = -1
        st.parts = [p for p in st.parts if p.bin >= 0]
        return left

    def _upgrade_mig(self, st: _TypeState) -> None:
        """On MIG GPUs whose compute slices are all taken, move whole-instance partitions to a
        profile with the same compute slices and more memory slices (and SMs: H100 1g.10gb ->
        1g.20gb) where a free memory slice allows: no other instance could use that slice, and
        the partition gains room for the rates that did not fit."""
        t = st.gtype
        if not t.mig:
            return
        sku = get_sku(t.sku)
        shapes = {s.mig_profile: s for s in self.p.shapes(t) if s.kind == "mig"}
        for bi, b in enumerate(st.bins):
            if not b.mig:
                continue
            used = sum(sku.mig_profile(i.profile).compute_slices for i in b.instances)
            if used < sku.compute_slices:
                continue
            for part in sorted(st.parts, key=lambda p: -p.load):
                inst = part.instance
                if part.bin != bi or part.shape.kind != "mig" or inst is None:
                    continue
                cur = sku.mig_profile(inst.profile)
                others = [MigPlacement(i.start, i.profile) for i in b.instances if i is not inst]
                for prof in sku.mig_profiles:
                    if (
                        prof.compute_slices != cur.compute_slices
                        or prof.memory_slices <= cur.memory_slices
                        or prof.sm_count < cur.sm_count
                        or prof.name not in shapes
                    ):
                        continue
                    starts = free_starts(sku, others, prof.name)
                    if not starts:
                        continue
                    sched = self._sched(t, shapes[prof.name], part.items)
                    if sched is None:
                        continue
                    inst.profile, inst.start = (
                        prof.name,
                        min(starts, key=lambda x: abs(x - inst.start)),
                    )
                    part.shape, part.sched = shapes[prof.name], sched
                    part.shared = part.shared or self.cfg.time_sharing  # room for others now
                    break

    def _fill_free_space(self, m: ModelSpec, rate: float) -> float:
        """Serve ``rate`` of ``m`` from shapes that still fit somewhere; return what is left."""
        for t, st in self.types.items():
            if rate <= 1e-9:
                break
            # partitions that already serve m and have room (e.g. upgraded MIG instances)
            for part in st.parts:
                if rate <= 1e-9:
                    break
                if part.bin < 0 or part.sched.utilisation >= 0.999:
                    continue
                if not any(pm.name == m.name for pm, _ in part.items):
                    continue
                rate -= self._top_up(t, part, m, rate)
            # shared partitions with room
            if self.cfg.time_sharing:
                for part in self._open_shared(st, m):
                    if rate <= 1e-9:
                        break
                    take = self._max_rate(t, part.shape, part.items, m, rate)
                    if take > 0:
                        sched = self._sched(t, part.shape, [*part.items, (m, take)])
                        assert sched is not None
                        part.items.append((m, take))
                        part.sched = sched
                        rate -= take
            while rate > 1e-9:
                got = self._new_in_free_space(st, m, rate)
                if got <= 0:
                    break
                rate -= got
        return max(0.0, rate)

    def _max_rate(
        self,
        t: GpuSpec,
        shape: Shape,
        items: Sequence[tuple[ModelSpec, float]],
        m: ModelSpec,
        rate: float,
    ) -> float:
        """Largest rate <= ``rate`` of ``m`` that can join ``items`` on ``shape`` (bisection)."""
        if self._sched(t, shape, [*items, (m, rate)]) is not None:
            return rate
        if not items:
            # alone on a partition a model serves up to its saturated throughput
            curve = self._curve(m, t, shape)
            if curve is None:
                return 0.0
            cap = min(rate, curve.max_rps * (1 - 1e-9))
            if cap > 0 and self._sched(t, shape, [(m, cap)]) is not None:
                return cap
        lo, hi = 0.0, rate
        if self._sched(t, shape, [*items, (m, 0.0)]) is None:
            return 0.0
        for _ in range(14):
            mid = (lo + hi) / 2
            if self._sched(t, shape, [*items, (m, mid)]) is not None:
                lo = mid
            else:
                hi = mid
        return lo if lo > 1e-6 * max(1.0, rate) else 0.0

    def _new_in_free_space(self, st: _TypeState, m: ModelSpec, rate: float) -> float:
        """Open the shape serving the most of ``rate`` in some GPU's free space; return the rate."""
        best: tuple[float, Shape, int, float] | None = None
        seen: set[tuple[object, ...]] = set()
        for bi, b in enumerate(st.bins):
            room = (
                b.mig,
                b.layout,
                tuple(sorted(b.mps_pcts)),
                tuple(sorted((i.profile, i.mps_free) for i in b.instances if i.mps_pcts)),
            )
            if room in seen:  # an identical bin was already tried
                continue
            seen.add(room)
            for shape in st.shapes:
                if not self._fits(b, shape):
                    continue
                take = self._max_rate(st.gtype, shape, [], m, rate)
                if take <= 0:
                    continue
                key = take - 1e-9 * shape.weight
                if best is None or key > best[0]:
                    best = (key, shape, bi, take)
        if best is None:
            return 0.0
        _, shape, bi, take = best
        sched = self._sched(st.gtype, shape, [(m, take)])
        assert sched is not None
        part = Part(st.gtype, shape, [(m, take)], sched, shared=self.cfg.time_sharing, bin=bi)
        b = st.bins[bi]
        if shape.kind == "mig":
            start = b.best_start(shape.mig_profile or "")
            assert start is not None
            part.instance = b.take_instance(shape.mig_profile or "", start)
        elif shape.in_mig:
            inst = next(
                (
                    i
                    for i in b.instances
                    if i.profile == shape.mig_profile
                    and i.mps_pcts
                    and i.mps_free >= (shape.mps_pct or 0)
                ),
                None,
            )
            if inst is None:
                start = b.best_start(shape.mig_profile or "")
                assert start is not None
                inst = b.take_instance(shape.mig_profile or "", start)
            inst.mps_pcts.append(shape.mps_pct or 100)
            part.instance, part.pct_index = inst, len(inst.mps_pcts) - 1
        else:
            part.pct_index = b.take_mps(shape.mps_pct or 100)
        st.parts.append(part)
        return take

    @staticmethod
    def _fits(b: GpuBin, shape: Shape) -> bool:
        if shape.kind == "mig":
            return b.best_start(shape.mig_profile or "") is not None
        if shape.in_mig:
            if any(
                i.profile == shape.mig_profile and i.mps_pcts and i.mps_free >= (shape.mps_pct or 0)
                for i in b.instances
            ):
                return True
            return b.best_start(shape.mig_profile or "") is not None
        return b.can_take_mps(shape.mps_pct or 100)

    # ------------------------------------------------------------------ assembly
    def _assemble(self) -> Plan:
        indices: dict[GpuSpec, list[int]] = defaultdict(list)
        for i, g in enumerate(self.p.gpus):
            indices[g].append(i)
        gpu_plans: dict[int, GpuPlan] = {}
        for t, st in self.types.items():
            by_bin: dict[int, list[Part]] = defaultdict(list)
            for part in st.parts:
                by_bin[part.bin].append(part)
            for bi, idx in enumerate(indices[t]):
                parts = by_bin.get(bi, [])
                b = st.bins[bi] if bi < len(st.bins) else GpuBin(t.sku)
                gpu_plans[idx] = GpuPlan(
                    idx,
                    t.sku,
                    bool(b.mig),
                    tuple(self._partition(p, b, parts) for p in _ordered(parts)),
                )
        unserved = tuple(
            Unserved(name, sum(r for r, _ in items), items[0][1])
            for name, items in self.unserved.items()
        )
        return Plan(
            policy=self.cfg.name,
            feasible=not unserved,
            gpus=tuple(gpu_plans[i] for i in range(len(self.p.gpus))),
            unserved=unserved,
        )

    def _partition(self, part: Part, b: GpuBin, on_gpu: Sequence[Part]) -> Partition:
        """``part`` as the plan states it: its latencies with the interference of its actual
        MPS neighbours (``on_gpu``: the parts on its GPU) at the batches they run."""
        shape = part.shape
        neighbours: list[tuple[float, int | None]] = []
        if shape.kind == "mps":
            if part.instance is not None:
                total: float = sum(part.instance.mps_pcts) - (shape.mps_pct or 0)
            else:
                total = sum(b.mps_pcts) - (shape.mps_pct or 0)
            for q in on_gpu:
                if q is not part and q.shape.kind == "mps" and q.instance is part.instance:
                    pct = float(q.shape.mps_pct or 0)
                    neighbours.append((pct, max(s.batch for s in q.sched.slots)))
                    total -= pct
            if total > 1e-9:  # shares held by no part here: their batches are not known
                neighbours.append((float(total), None))
        models = []
        for slot in part.sched.slots:
            i = int(slot.curve.buckets.searchsorted(slot.batch))
            slow = self.p.interference.slowdown_beside(
                slot.curve.model.profile, part.gtype.sku, neighbours
            )
            models.append(
                ModelAssignment(
                    slot.curve.model.name,
                    slot.batch,
                    slot.rate_rps,
                    float(slot.curve.raw_solo[i]) * slow,
                )
            )
        return Partition(
            kind=shape.kind,  # type: ignore[arg-type]
            sm_count=shape.sm_count,
            memory_mib=shape.memory_mib,
            duty_cycle_ms=part.sched.duty_cycle_ms,
            models=tuple(models),
            mig_profile=shape.mig_profile,
            mig_start=part.instance.start if part.instance is not None else None,
            mps_pct=shape.mps_pct,
        )


PACK_WASTE_COST = 0.5  # share of an MPS container's unusable remainder charged to each copy


def _pack_weight(t: GpuSpec, shape: Shape) -> float:
    """What one copy of ``shape`` costs when a model's dedicated copies fill their container.

    ``c = floor(100 / pct)`` copies of an MPS share fit in a MIG instance; the rest of the
    instance, ``1 - c pct / 100`` of it, only takes smaller shares of that same instance, so
    each copy is charged ``PACK_WASTE_COST`` of its part of that remainder: an 87% share of a
    3g instance costs more than its 43.5% of the GPU, a 50% or 25% share nothing more. A
    flat MPS share's remainder is open to every other model's partitions on the GPU (measured:
    charging it too left more rate unserved on large mixes), so it is charged nothing.
    """
    if shape.kind != "mps" or not shape.mps_pct or shape.mig_profile is None:
        return shape.weight
    sku = get_sku(t.sku)
    prof = sku.mig_profile(shape.mig_profile)
    container = max(
        prof.compute_slices / sku.compute_slices, prof.memory_slices / sku.memory_slices
    )
    copies = max(1, 100 // shape.mps_pct)
    rest = max(0.0, 1.0 - copies * shape.mps_pct / 100.0)
    return shape.weight + PACK_WASTE_COST * container * rest / copies


def _with_rate(
    items: Sequence[tuple[ModelSpec, float]], m: ModelSpec, extra: float
) -> list[tuple[ModelSpec, float]]:
    """``items`` with ``extra`` rate of ``m`` added (to its entry, or as a new one)."""
    out = list(items)
    for i, (im, r) in enumerate(out):
        if im.name == m.name:
            out[i] = (im, r + extra)
            return out
    out.append((m, extra))
    return out


def _ordered(parts: Iterable[Part]) -> list[Part]:
    return sorted(
        parts,
        key=lambda p: (
            p.instance.start if p.instance is not None else -1,
            -(p.shape.mps_pct or 100),
            p.pct_index,
        ),
    )
