"""The planning problem: partition shapes per GPU type, per-(model, shape) latency curves, and
the duty-cycle schedule check that every policy shares.

Feasibility of one partition (Nexus's duty cycle; every latency below carries the headroom
factor ``1 + h`` and, for MPS partitions, the interference factor):

    sum_m L_m(b_m)  <=  d          (the partition runs each model's batch once per cycle)
    b_m  >=  r_m * d / 1000        (a cycle's arrivals fit in one batch)
    d + L_m(b_m)  <=  slo_m - t    (a request waits at most one cycle, then its batch runs)

where ``L_m(b) = (1 + h) slowdown l_m(b) + host_batch_ms + b host_item_ms`` (the worker's host
work around a batch is part of the cycle; ``l_m`` is the profile's latency, multiplied by
``extrapolation_margin`` on a partition below the smallest profiled one) and
``t = host_request_ms`` (the way to the worker and back; ``PlannerOptions``). ``Curve.lat`` is
``L``, ``Curve.slo`` is ``slo_m - t``.

Batches come from the runtime's CUDA-graph buckets (``BATCH_BUCKETS``): the runtime pads a batch
to its bucket, so planning with bucket sizes predicts what runs.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt

from partitioner.margin import cycle_capacity as margin_capacity
from partitioner.margin import patience, z_capacity
from stgs.catalog import GpuSku, get_sku
from stgs.errors import ProfileError
from stgs.latency import InterferenceModel, LatencyModel, build_latency_models
from stgs.profiles import (
    InterferenceRow,
    ProfileTable,
    default_interference_path,
    default_profiles_path,
    read_interference,
    read_profiles,
)
from stgs.scenario import FORBID, PlannerOptions, Scenario
from stgs.types import GpuSpec, ModelSpec

FloatArray = npt.NDArray[np.float64]

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_EPS = 1e-9


@dataclass(frozen=True)
class Shape:
    """A partition shape available on a GPU type.

    ``frac`` is the share of the GPU's compute it takes (compute slices / 7 for MIG, the MPS
    percentage for MPS, both for MPS inside a MIG instance) and ``mem_frac`` its share of the
    memory slices (memory slices / 8 for MIG): a valid layout keeps both sums <= 1, and
    ``weight = max(frac, mem_frac)`` is what a partition costs when packing. ``isolated`` shapes
    (a whole GPU, a MIG instance) have no co-located neighbours sharing their L2 and bandwidth.
    """

    kind: str  # "full" | "mps" | "mig"
    sm_count: int
    memory_mib: float
    frac: float
    mps_pct: int | None = None
    mig_profile: str | None = None  # for "mig", and for "mps" inside a MIG instance
    mem_frac: float = -1.0  # default: equal to frac

    def __post_init__(self) -> None:
        if self.mem_frac < 0:
            object.__setattr__(self, "mem_frac", self.frac)

    @property
    def weight(self) -> float:
        return max(self.frac, self.mem_frac)

    @property
    def isolated(self) -> bool:
        return self.kind != "mps"

    @property
    def in_mig(self) -> bool:
        return self.mig_profile is not None

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "mig":
            return f"mig:{self.mig_profile}"
        if self.mig_profile:
            return f"mig:{self.mig_profile}/mps:{self.mps_pct}"
        return f"mps:{self.mps_pct}"

    def neighbour_pct(self) -> float:
        """Share of the enclosing GPU or MIG instance that co-located MPS neighbours may hold."""
        return 0.0 if self.isolated else float(100 - (self.mps_pct or 100))


def shapes_for(gpu: GpuSpec, options: PlannerOptions) -> tuple[Shape, ...]:
    """Every partition shape the planner may use on ``gpu``, smallest first."""
    sku = gpu.info
    out: list[Shape] = [Shape("full", sku.sm_count, float(sku.memory_mib), 1.0)]
    for pct in options.mps_shares:
        if pct < 100:
            out.append(
                Shape("mps", sku.mps_sm_count(pct), sku.memory_mib * pct / 100.0, pct / 100.0, pct)
            )
    if gpu.mig:
        for prof in sku.mig_profiles:
            mem_frac = prof.memory_slices / sku.memory_slices
            out.append(
                Shape(
                    "mig",
                    prof.sm_count,
                    float(prof.memory_mib),
                    prof.fraction,
                    None,
                    prof.name,
                    mem_frac,
                )
            )
            if options.mps_in_mig and prof.compute_slices > 1:
                for pct in options.mps_shares:
                    if pct < 100:
                        out.append(
                            Shape(
                                "mps",
                                sku.mps_sm_count(pct, within_sm=prof.sm_count),
                                prof.memory_mib * pct / 100.0,
                                prof.fraction * pct / 100.0,
                                pct,
                                prof.name,
                                mem_frac * pct / 100.0,
                            )
                        )
    out.sort(key=lambda s: (s.weight, s.frac, s.kind != "mig", s.label))
    return tuple(out)


@dataclass
class Curve:
    """One model on one shape of one GPU type: batch latencies with headroom and interference.

    ``lat[i]`` is the planning latency (ms) of batch ``buckets[i]``; ``raw[i]`` the predicted
    latency without headroom and with the shape's worst-case interference.
    """

    model: ModelSpec
    shape: Shape
    buckets: npt.NDArray[np.int64]
    lat: FloatArray
    raw_solo: FloatArray
    memory: FloatArray
    slowdown: float
    headroom: float
    margin_z: float = 0.0  # PlannerOptions.batch_margin_z (with margin "z")
    host_request_ms: float = 0.0  # PlannerOptions.host_request_ms: outside the cycle
    margin: str = "z"  # PlannerOptions.batch_margin: "slo" or "z"
    margin_target: float = 0.995  # PlannerOptions.batch_margin_target (with margin "slo")
    cycle_cache: dict[float, float] = field(default_factory=dict, repr=False, compare=False)
    _kcap: dict[tuple[int, int, int], float] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def slo(self) -> float:
        """What the cycle and the batch may take of the SLO (the request's host way is not)."""
        return self.model.slo_ms - self.host_request_ms

    @cached_property
    def capacity(self) -> FloatArray:
        """Requests a duty cycle may *expect* at each bucket (the rule ``b >= r d / 1000``):
        with margin "z", the n with n + z sqrt(n) = b; with margin "slo", b itself (its margin
        is checked on the partition's cycle, :meth:`cycle_capacity`)."""
        b = self.buckets.astype(np.float64)
        if self.margin == "slo" or self.margin_z <= 0:
            return b
        return np.array([z_capacity(float(x), self.margin_z) for x in b], dtype=np.float64)

    @cached_property
    def capacity_list(self) -> list[float]:
        return [float(x) for x in self.capacity]

    @cached_property
    def pred_list(self) -> list[float]:
        """Each bucket's *predicted* latency in the cycle: ``lat`` without the headroom (the
        profile's latency with the shape's interference, and the host time). The batch margin
        is sized on it; the headroom stays for the latency's own error."""
        h = self.headroom * self.slowdown
        return [float(lat - h * raw) for lat, raw in zip(self.lat, self.raw_solo, strict=True)]

    @cached_property
    def cap1_list(self) -> list[float]:
        """Margin "slo": each bucket's capacity with one cycle of patience (the least)."""
        t = self.margin_target
        return [margin_capacity(int(b), 1, 0, t) for b in self.buckets]

    def cycle_capacity(self, i: int, cycle_ms: float) -> float:
        """Requests per cycle that bucket ``i`` serves when the partition's cycle (its busy
        time, at the predicted latencies) is ``cycle_ms``, keeping the batch margin: with
        margin "slo", the Poisson mean whose share of requests served within the visits the SLO
        allows is the target (:mod:`partitioner.margin`); with margin "z", :attr:`capacity`."""
        if self.margin != "slo":
            return self.capacity_list[i]
        k, f = patience(self.slo - self.pred_list[i], cycle_ms)
        key = (i, k, f)
        cap = self._kcap.get(key)
        if cap is None:
            cap = self._kcap[key] = margin_capacity(self.bucket_list[i], k, f, self.margin_target)
        return cap

    def keeps_margin(self, i: int, rate: float, cycle_ms: float) -> bool:
        """Does bucket ``i`` at ``rate`` keep the batch margin in a cycle of ``cycle_ms`` (the
        partition's busy time at the predicted latencies, :attr:`pred_list`)?"""
        if self.margin != "slo" or rate <= 0:
            return True
        expected = rate * cycle_ms / 1000.0
        if expected <= self.cap1_list[i] + 1e-12:
            return True
        return expected <= self.cycle_capacity(i, cycle_ms) + 1e-12

    def rate_cap(self, i: int, busy_ms: float, busy_pred_ms: float) -> float:
        """The largest rate (request/s) bucket ``i`` serves in a partition whose batches take
        ``busy_ms`` (planning latencies: the shortest duty cycle) and ``busy_pred_ms``
        (predicted): the duty-cycle rule ``b >= r d / 1000`` at ``d = busy_ms`` and the batch
        margin on the predicted cycle."""
        if self.margin != "slo":
            return 1000.0 * self.capacity_list[i] / busy_ms
        return min(
            1000.0 * self.bucket_list[i] / busy_ms,
            1000.0 * self.cycle_capacity(i, busy_pred_ms) / busy_pred_ms,
        )

    @cached_property
    def bucket_list(self) -> list[int]:
        return [int(b) for b in self.buckets]

    @cached_property
    def lat_list(self) -> list[float]:
        return [float(x) for x in self.lat]

    @cached_property
    def memory_list(self) -> list[float]:
        return [float(x) for x in self.memory]

    @cached_property
    def max_rps(self) -> float:
        """Saturated throughput alone on the partition: the largest :meth:`rate_cap` of a
        bucket alone (its batch the whole cycle) with 2 L(b) <= slo."""
        ok = (2 * self.lat <= self.slo + _EPS) & (self.memory <= self.shape.memory_mib)
        if not ok.any():
            return 0.0
        lat, pred = self.lat_list, self.pred_list
        return max(self.rate_cap(i, lat[i], pred[i]) for i in np.flatnonzero(ok).tolist())

    @cached_property
    def cost_per_rps(self) -> float:
        """GPU share (packing weight) per request/s when saturated (inf when it cannot serve)."""
        return self.shape.weight / self.max_rps if self.max_rps > 0 else math.inf

    @property
    def servable(self) -> bool:
        return self.max_rps > 0


@dataclass
class Problem:
    """Everything a policy needs: GPUs, models, their latency curves per GPU type and shape."""

    gpus: tuple[GpuSpec, ...]
    models: tuple[ModelSpec, ...]
    latency: dict[tuple[str, str], LatencyModel]
    interference: InterferenceModel
    headroom: float = 0.1
    options: PlannerOptions = field(default_factory=PlannerOptions)
    _curves: dict[tuple[str, str, float, GpuSpec, Shape], Curve | None] = field(
        default_factory=dict
    )

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_scenario(
        cls,
        sc: Scenario,
        table: ProfileTable | None = None,
        latency: dict[tuple[str, str], LatencyModel] | None = None,
    ) -> Problem:
        """The problem of ``sc``; ``latency``: the models already built from ``table`` (a
        caller that plans often on one table builds them once: they take ~0.2 s)."""
        if latency is None:
            if table is None:
                table = load_profile_table(sc.profiles)
            latency = build_latency_models(table)
        if sc.interference is not None:
            rows = read_interference(sc.interference)
        elif sc.profiles is None:
            rows = _shipped_interference()
        else:
            rows = []
        interference = InterferenceModel.from_rows(
            rows, default_gamma=sc.options.interference_gamma
        )
        prob = cls(sc.gpus, sc.models, latency, interference, sc.headroom, sc.options)
        prob.check_profiles()
        return prob

    def with_models(self, models: Sequence[ModelSpec]) -> Problem:
        """The same GPUs and curves (cache shared), other models or rates."""
        p = Problem(
            self.gpus, tuple(models), self.latency, self.interference, self.headroom, self.options
        )
        p._curves = self._curves
        return p

    # Planner options that shapes and curves do not depend on: changing them keeps the cache.
    _CURVE_FREE_OPTIONS = frozenset(
        {
            "spare_factor",
            "max_spare_factor",
            "reconfig_cost",
            "time_limit_s",
            "max_models_per_partition",
        }
    )

    def with_options(self, **update: object) -> Problem:
        """The same GPUs and models with planner options changed; the curve cache is shared
        when no changed option enters the curves (``_CURVE_FREE_OPTIONS``)."""
        p = Problem(
            self.gpus,
            self.models,
            self.latency,
            self.interference,
            self.headroom,
            self.options.model_copy(update=update),
        )
        if set(update) <= self._CURVE_FREE_OPTIONS:
            p._curves = self._curves
        return p

    def with_gpus(self, gpus: Sequence[GpuSpec]) -> Problem:
        p = Problem(
            tuple(gpus), self.models, self.latency, self.interference, self.headroom, self.options
        )
        p._curves = self._curves
        return p

    def check_profiles(self) -> None:
        """Every model needs a profile on at least one of the GPU types."""
        skus = {g.sku for g in self.gpus}
        for m in self.models:
            if not any((sku, m.profile) in self.latency for sku in skus):
                here = sorted({gm for (g, gm) in self.latency if g in skus})
                elsewhere = sorted({g for (g, gm) in self.latency if gm == m.profile})
                where = (
                    f"{m.profile!r} was profiled on {', '.join(elsewhere)} only"
                    if elsewhere
                    else f"no GPU has a profile of {m.profile!r}"
                )
                raise ProfileError(
                    f"model {m.name!r}: no profile for {m.profile!r} on {', '.join(sorted(skus))}"
                    f" ({where}; profiled there: {', '.join(here) or 'none'}); measure it with"
                    " `stgs profile`, or use `profiles: example` for the synthetic example set"
                )

    # ---------------------------------------------------------------- queries
    @cached_property
    def gpu_types(self) -> tuple[GpuSpec, ...]:
        """Distinct (sku, mig) types in first-seen order."""
        return tuple(dict.fromkeys(self.gpus))

    def count(self, gtype: GpuSpec) -> int:
        return sum(1 for g in self.gpus if g == gtype)

    def shapes(self, gtype: GpuSpec) -> tuple[Shape, ...]:
        return shapes_for(gtype, self.options)

    def max_batch(self, model: ModelSpec, sku: str) -> int:
        if self.options.max_batch is not None:
            return self.options.max_batch
        lm = self.latency.get((sku, model.profile))
        return lm.max_measured_batch if lm is not None else BATCH_BUCKETS[0]

    def curve(self, model: ModelSpec, gtype: GpuSpec, shape: Shape) -> Curve | None:
        """Latency curve of ``model`` on ``shape``, or None when it has no profile there (or
        the shape lies below its profiled range and ``extrapolation_margin`` is "forbid"; with
        a factor, the latency there is multiplied by it)."""
        # A curve depends on the model's name, profile and SLO, not on its rate: plans at other
        # rates (peak search, replanning) reuse it. Rates live in schedules, never in curves.
        key = (model.name, model.profile, model.slo_ms, gtype, shape)
        if key in self._curves:
            return self._curves[key]
        lm = self.latency.get((gtype.sku, model.profile))
        if lm is None:
            self._curves[key] = None
            return None
        bmax = self.max_batch(model, gtype.sku)
        buckets = np.array([b for b in BATCH_BUCKETS if b <= bmax] or [1], dtype=np.int64)
        mig_profile = shape.mig_profile if shape.in_mig else None
        opts = self.options
        margin = opts.extrapolation_margin
        if margin == FORBID and lm.extrapolates(
            shape.sm_count, mig_profile=mig_profile, kind=shape.kind
        ):
            self._curves[key] = None  # below the profiled range: not planned on
            return None
        solo = lm.latency_curve(
            buckets,
            shape.sm_count,
            mig_profile=mig_profile,
            kind=shape.kind,
            extrapolation_margin=1.0 if margin == FORBID else float(margin),
        )
        slowdown = self.interference.slowdown(model.profile, gtype.sku, shape.neighbour_pct())
        memory = np.array([lm.memory_mib(int(b)) for b in buckets], dtype=np.float64)
        host = opts.host_batch_ms + opts.host_item_ms * buckets.astype(np.float64)
        c = Curve(
            model,
            shape,
            buckets,
            np.asarray(solo, dtype=np.float64) * slowdown * (1.0 + self.headroom) + host,
            np.asarray(solo, dtype=np.float64),
            memory,
            slowdown,
            self.headroom,
            opts.batch_margin_z,
            opts.host_request_ms,
            opts.batch_margin,
            opts.batch_margin_target,
        )
        self._curves[key] = c
        return c

    def sku(self, gtype: GpuSpec) -> GpuSku:
        return get_sku(gtype.sku)


def load_profile_table(path: Path | None) -> ProfileTable:
    return read_profiles(path if path is not None else default_profiles_path())


def _shipped_interference() -> list[InterferenceRow]:
    p = default_interference_path()
    return list(read_interference(p)) if p.is_file() else []


# ---------------------------------------------------------------------------- scheduling
@dataclass(frozen=True)
class Slot:
    """One model's place in a partition's schedule."""

    curve: Curve
    rate_rps: float
    batch: int
    latency_ms: float  # planning latency (headroom and interference included)


@dataclass(frozen=True)
class Schedule:
    duty_cycle_ms: float
    slots: tuple[Slot, ...]

    @property
    def busy_ms(self) -> float:
        return sum(s.latency_ms for s in self.slots)

    @property
    def utilisation(self) -> float:
        return self.busy_ms / self.duty_cycle_ms if self.duty_cycle_ms > 0 else 1.0

    @property
    def memory_mib(self) -> float:
        return sum(
            float(s.curve.memory[int(np.searchsorted(s.curve.buckets, s.batch))])
            for s in self.slots
        )


def _bucket_index(curve: Curve, expected: float) -> int:
    """Index of the smallest bucket whose capacity covers ``expected`` requests per cycle
    (len(buckets) when none)."""
    return bisect.bisect_left(curve.capacity_list, expected - 1e-9)


def schedule(items: Sequence[tuple[Curve, float]]) -> Schedule | None:
    """The best duty cycle for models time-sharing one partition, or None when infeasible.

    ``items``: (curve, rate_rps) per model; all curves belong to the same shape. Exact over the
    bucket grid: the feasible duty cycles of each model form an interval (0, d_m]; within a
    stretch of d where every batch is constant the capacity check is easiest at its right end, so
    checking ``d_max = min_m d_m`` and every batch breakpoint below it is exhaustive.
    """
    if not items:
        return None
    d_max = math.inf
    for curve, rate in items:
        d_m = _max_cycle(curve, rate)
        if d_m <= 0:
            return None
        d_max = min(d_max, d_m)
    # Memory: the models' memory at their batches must fit the partition.
    shape_mem = items[0][0].shape.memory_mib
    cands = [d_max]
    sched = _try(items, d_max, shape_mem)
    if sched is not None:
        return sched
    for curve, rate in items:
        if rate <= 0:
            continue
        for cap in curve.capacity_list:
            d = 1000.0 * cap / rate
            if d < d_max - 1e-12:
                cands.append(d)
    for d in sorted(set(cands), reverse=True)[1:]:
        sched = _try(items, d, shape_mem)
        if sched is not None:
            return sched
    return None


def _max_cycle(curve: Curve, rate: float) -> float:
    """Largest duty cycle d with d + L(b(d)) <= slo and memory fitting, for one model alone."""
    cache = curve.cycle_cache
    d = cache.get(rate)
    if d is None:
        if len(cache) > 4096:
            cache.clear()
        d = cache[rate] = _max_cycle_uncached(curve, rate)
    return d


def _max_cycle_uncached(curve: Curve, rate: float) -> float:
    slo = curve.slo
    fits = curve.memory <= curve.shape.memory_mib
    if rate <= 0:
        # batch 1 every cycle; its latency bounds the cycle through the SLO
        return slo - float(curve.lat[0]) if fits[0] else -1.0
    # bucket b serves d in (1000 cap(prev) / r, 1000 cap(b) / r]: the smallest bucket whose
    # capacity (the batch less its Poisson margin) covers the r d / 1000 expected requests
    ub = 1000.0 * curve.capacity / rate
    lb = np.concatenate(([0.0], ub[:-1]))
    cap = np.minimum(ub, slo - curve.lat)
    ok = (cap > lb + 1e-12) & fits
    if not ok.any():
        return -1.0
    return float(np.max(cap[ok]))


def _try(items: Sequence[tuple[Curve, float]], d: float, shape_mem: float) -> Schedule | None:
    """The schedule at duty cycle ``d``: each model's smallest bucket with ``b >= r d / 1000``
    (its capacity), then, with the "slo" batch margin, the least batches that keep the margin
    in the partition's cycle (its busy time at the predicted latencies: a batch grown for its
    margin lengthens the cycle of every model, so this is a fixed point, reached from below;
    the least one, since a model whose margin fails at some batches fails at any smaller ones
    of the others). The cycle
    reported is ``d``, lowered where an SLO needs it (a cycle shorter than ``d`` keeps every
    rule but ``busy <= cycle``, which is checked)."""
    idx: list[int] = []
    busy = 0.0
    for curve, rate in items:
        if rate > 0:
            i = bisect.bisect_left(curve.capacity_list, rate * d / 1000.0 - 1e-9)
            if i >= len(curve.bucket_list):
                return None
        else:
            i = 0
        idx.append(i)
        busy += curve.lat_list[i]
    if busy > d + 1e-9:
        return None
    if items[0][0].margin == "slo":  # one problem's curves: one margin rule
        pred = sum(curve.pred_list[i] for (curve, _), i in zip(items, idx, strict=True))
        grown = True
        while grown:
            grown = False
            for j, (curve, rate) in enumerate(items):
                i = idx[j]
                if rate <= 0 or rate * pred <= 1000.0 * curve.cap1_list[i] + 1e-9:
                    continue  # within even the least patience's capacity
                if curve.keeps_margin(i, rate, pred):
                    continue
                if i + 1 >= len(curve.bucket_list):
                    return None
                idx[j] = i + 1
                busy += curve.lat_list[i + 1] - curve.lat_list[i]
                pred += curve.pred_list[i + 1] - curve.pred_list[i]
                grown = True
            if busy > d + 1e-9:
                return None
    slots = []
    mem = 0.0
    for (curve, rate), i in zip(items, idx, strict=True):
        lat = curve.lat_list[i]
        d = min(d, curve.slo - lat)
        mem += curve.memory_list[i]
        slots.append(Slot(curve, rate, curve.bucket_list[i], lat))
    if busy > d + 1e-9 or mem > shape_mem + 1e-6:
        return None
    return Schedule(d, tuple(slots))
