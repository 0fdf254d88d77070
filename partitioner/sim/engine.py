"""The discrete-event simulator: a plan's partitions serve per-model arrivals in virtual time.

No GPU, no threads, no wall clock: one event loop over pre-generated arrivals (merged, sorted)
and a heap of partition and controller events. What it mirrors of the runtime
(``stgs/runtime``; see docs/simulator.md for the differences):

* **Routing** (``Runtime.submit``): a request goes to the READY partition serving its model with
  the least ``(in_flight + 1) / rate`` (the rate the plan assigned there); ties go to the older
  partition. No READY partition: the request fails at once ("no worker"). ``in_flight`` is that
  model's alone (``SimOptions.routing = "model"``, the runtime's rule,
  ``stgs.batching.route_load``, inlined in the event loop), or the worker's, all its models'
  (``"worker"``, the runtime's former rule).
* **Executor** (``Worker.serve``): work conserving round-robin over the partition's models in
  plan order; a cycle starts at the first model whenever something is queued; each visit takes up
  to ``batch`` queued requests of that model (FIFO), answers "deadline exceeded" for those whose
  deadline (arrival + SLO) is before now + the EMA of that model's measured batch latency
  (admission; without admission: before now), and runs the rest as one batch.
* **Batch latency**: the runtime pads a batch of n to the smallest captured bucket >= n, its
  buckets being the powers of two below the planned batch and the planned batch itself
  (``stgs.batching.batch_buckets``); latency = l(bucket, partition) from the latency
  functions x the interference slowdown ``1 + gamma x sum(pct x w) / 100`` x a noise factor:
  lognormal (median 1, sigma fitted from the profile's ``p99_ms``), or with ``noise: runtime``
  drawn from the runtime's measured factors (``partitioner/sim/noise.py``). ``pct``: the MPS
  shares of the neighbours (same GPU or MIG instance) running a batch when this one starts,
  ``w`` the neighbour weight of the batch each runs (``stgs.interference``)
  (``SimOptions.interference = "busy"``, the default), or of every MPS neighbour in the plan
  at its largest batch (``"static"``, as the plan reports it).
* **Host costs** (``SimOptions.host``): a request is queued in the worker a fixed time after it
  arrives; a batch holds the worker for its GPU latency plus a per-batch and per-request host
  time; answers reach the client a fixed time after the batch (docs/simulator.md).
* **Re-planning** (the controller, in virtual time): the daemon's rules and parameters,
  ``partitioner.control.ControlLoop``, fed each request's arrival and SLO outcome when it is
  answered (as the daemon's meter is); the policy call and the transition it starts hold the
  controller (the daemon's loop waits for ``Service.replan``), and a plan that would serve none
  of a model is not applied: the daemon's glue, ``partitioner.control.planned_rates``,
  ``check_keeps_live`` and ``ReplanRules.attempt`` (the back-off), runs here as there.
* **Transitions** (``Runtime._transition``): the steps of ``stgs.transition.transition``, the
  runtime's own, on the node state the simulated plans left (MIG modes and instances, MPS
  daemons); each MIG and MPS step costs its ``ReconfigCosts`` seconds (``step_seconds``), each
  new worker its start, model loads and graph captures.

Deterministic: the same inputs and seed give the same results to the bit.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from partitioner.control import (
    ControlLoop,
    Counts,
    DropsLiveModelError,
    check_keeps_live,
    planned_rates,
)
from partitioner.problem import Problem
from partitioner.sim.config import ReconfigCosts, SimOptions
from partitioner.sim.noise import factors_for
from partitioner.sim.workload import model_rng
from stgs.batching import ADMISSION_DECAY, batch_buckets
from stgs.catalog import get_sku
from stgs.errors import ConfigError
from stgs.plan import GpuPlan, Partition, Plan
from stgs.transition import Held, NodeState, PartitionKey, Step, node_state_of, transition
from stgs.transition import partition_keys as plan_partition_keys

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# request outcomes
OK, DEADLINE, NO_WORKER = 0, 1, 2
# partition states (the runtime's PartitionState, those that matter here)
STARTING, READY, DRAINING, STOPPED = 0, 1, 2, 3
# event kinds
_DONE, _CTRL, _READY, _FINISH = 0, 1, 2, 3

_NOISE_BLOCK = 4096
_NOISE_STREAM = 0x401


# The batch sizes a worker captures for a planned batch: the runtime's own function.
runtime_buckets = batch_buckets


# ------------------------------------------------------------------------------------ keys
PartKey = PartitionKey


def partition_keys(plan: Plan) -> list[tuple[PartKey, GpuPlan, Partition]]:
    """The one partition identity (``stgs.transition.partition_keys``): GPU, shape, place,
    models with batches, ordinal."""
    return [(k, g, p) for k, (g, p) in plan_partition_keys(plan).items()]


def step_seconds(step: Step, costs: ReconfigCosts) -> float:
    """Seconds one transition step takes on the node (worker starts and drains are timed
    apart: they run in parallel with serving)."""
    if step.op == "mig_layout":
        return costs.mig_destroy_s * len(step.destroy) + costs.mig_create_s * len(step.create)
    if step.op == "mig_mode":
        return costs.mig_mode_change_s
    if step.op == "mps_start" and not step.running:
        return costs.mps_start_s
    return 0.0


def gpu_fraction(g: GpuPlan, p: Partition) -> float:
    """Share of the GPU's compute a partition holds (for utilisation)."""
    frac = 1.0
    if p.mig_profile is not None and g.mig:
        frac = get_sku(g.sku).mig_profile(p.mig_profile).fraction
    if p.kind == "mps" and p.mps_pct is not None:
        frac *= p.mps_pct / 100.0
    return frac


# ------------------------------------------------------------------------------------ noise
@dataclass(frozen=True)
class NoiseModel:
    """Lognormal sigma per (gpu sku, profile name); ``default`` for the rest. ``factors``: per
    profile name (``"*"``: the rest) the runtime's measured factors that ``noise: runtime``
    draws from (``partitioner.sim.noise.load_runtime_noise``)."""

    sigmas: Mapping[tuple[str, str], float] = field(default_factory=dict)
    default: float = 0.0
    factors: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def sigma(self, sku: str, profile: str) -> float:
        return self.sigmas.get((sku, profile), self.default)


# ------------------------------------------------------------------------------------ parts
class _Part:
    __slots__ = (
        "born_ms",
        "busy",
        "busy_ms",
        "died_ms",
        "draw_block",
        "factors",
        "gamma",
        "gpu",
        "host",
        "in_flight",
        "key",
        "lat",
        "margin",
        "model_flight",
        "model_idx",
        "nbatch",
        "neigh",
        "noise",
        "noise_i",
        "partition",
        "queues",
        "rates",
        "run_weight",
        "sigma",
        "slot_of",
        "state",
        "weight",
        "weight_n",
    )

    def __init__(self, key: PartKey, gpu: GpuPlan, partition: Partition) -> None:
        self.key = key
        self.gpu = gpu
        self.partition = partition
        self.state = STARTING
        self.in_flight = 0
        self.model_flight: dict[int, int] = {}  # per model index: its requests in flight here
        self.busy = False
        self.busy_ms = 0.0
        self.born_ms = 0.0
        self.died_ms = math.nan
        self.weight = gpu_fraction(gpu, partition)
        self.model_idx: list[int] = []
        self.nbatch: list[int] = []
        self.lat: list[list[float]] = []  # per slot: latency (ms) of a batch of n, n = 0..batch
        # interference "busy": per slot gamma, and the MPS neighbours (part, share %) whose
        # activity at a batch's start slows it; "static": lat already holds the plan's slowdown
        self.gamma: list[float] = []
        self.neigh: list[tuple[_Part, float]] = []
        # per slot, n = 0..batch: the neighbour weight of its batch of n (stgs.interference);
        # run_weight: that of the batch running now (what it costs the neighbours)
        self.weight_n: list[list[float]] = []
        self.run_weight = 1.0
        self.host: list[list[float]] = []  # per slot: host time (ms) a batch of n adds
        # per slot: lognormal sigma (> 0), 0 (no noise) or -1 (noise "runtime": a factor drawn
        # from ``factors[slot]``)
        self.sigma: list[float] = []
        self.factors: list[tuple[float, ...]] = []
        self.queues: list[deque[int]] = []
        self.margin: list[float] = []
        self.slot_of: dict[int, int] = {}
        self.rates: dict[int, float] = {}
        self.noise: list[float] = []
        self.noise_i = 0
        # the seeded stream's block of draws: standard normals (lognormal noise) or uniforms
        # (noise "runtime"); None: no noise
        self.draw_block: Callable[[int], FloatArray] | None = None


@dataclass
class _Transition:
    plan: Plan
    start_ms: float
    new_parts: list[_Part]
    old_parts: list[_Part]
    blocking: list[_Part]
    steps_s: float = 0.0  # MIG and MPS steps before workers start
    free_s: float = 0.0  # MIG steps after the old partitions stopped
    phase: str = "break"  # break -> start -> drain -> done
    ready_ms: float = math.nan


@dataclass(frozen=True)
class Reconfiguration:
    """One plan change that started or stopped partitions."""

    start_s: float
    ready_s: float  # new partitions serving
    done_s: float  # old partitions drained and stopped
    partitions_started: int
    partitions_stopped: int
    break_first: int  # old partitions stopped before their replacement was ready
    gpus_used: int


@dataclass
class SimResult:
    """Per request: arrival and finish (ms), model index, outcome; plus run facts."""

    models: tuple[str, ...]
    slo_ms: FloatArray
    arrival_ms: FloatArray
    finish_ms: FloatArray
    model: IntArray
    status: IntArray
    duration_s: float
    warmup_s: float
    plans: list[tuple[float, Plan]]  # (time s the plan took effect, plan)
    reconfigurations: list[Reconfiguration]
    replans: int  # policy calls by the controller
    busy_weighted_ms: float  # sum over partitions of busy time x GPU fraction
    alive_weighted_ms: float  # sum over partitions of READY..STOPPED time x GPU fraction
    batches: int
    info: dict[str, Any] = field(default_factory=dict)
    # per request: its position in the arrivals given for its model
    source_index: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


# ------------------------------------------------------------------------------------ engine
class Simulator:
    """Simulate ``plan`` (and, with the controller on, its successors) under ``arrivals``.

    ``arrivals``: per model name, sorted arrival times in seconds. ``replan``: called by the
    controller with (new rates per model, current plan); returns the next plan.
    ``planned_rates``: the rates ``plan`` was made for (the controller's starting estimate;
    default: the rates the plan assigns). ``deadlines``: per model, each request's deadline in
    seconds, aligned with ``arrivals`` (default: arrival + SLO; a replay passes the deadlines
    the runtime was given).
    """

    def __init__(
        self,
        problem: Problem,
        plan: Plan,
        arrivals: Mapping[str, FloatArray],
        options: SimOptions,
        *,
        seed: int = 0,
        noise: NoiseModel | None = None,
        replan: Callable[[Mapping[str, float], Plan], Plan] | None = None,
        planned_rates: Mapping[str, float] | None = None,
        deadlines: Mapping[str, FloatArray] | None = None,
    ) -> None:
        self.problem = problem
        self.options = options
        self.seed = seed
        self.noise = noise or NoiseModel(default=0.0)
        self.replan_fn = replan
        self.planned_rates = dict(planned_rates) if planned_rates is not None else None
        self.models = tuple(m.name for m in problem.models)
        self.midx = {n: i for i, n in enumerate(self.models)}
        self.specs = {m.name: m for m in problem.models}
        unknown = sorted(set(arrivals) - set(self.midx))
        if unknown:
            raise ConfigError(f"arrivals for models not in the problem: {', '.join(unknown)}")
        unknown = sorted(set(options.overrun) - set(self.midx))
        if unknown:
            raise ConfigError(f"simulator.overrun names models not in the problem: {unknown}")
        self.arrivals_ms = [
            np.asarray(arrivals.get(n, np.empty(0)), dtype=np.float64) * 1000.0 for n in self.models
        ]
        self.deadlines_ms: list[FloatArray] | None = None
        if deadlines is not None:
            self.deadlines_ms = []
            for n, a in zip(self.models, self.arrivals_ms, strict=True):
                d = np.asarray(deadlines.get(n, np.empty(0)), dtype=np.float64) * 1000.0
                if d.shape != a.shape:
                    raise ConfigError(f"deadlines of {n!r} do not match its arrivals")
                self.deadlines_ms.append(d)
        self.plan = plan
        self.node: NodeState = node_state_of(plan)  # MIG modes, instances, MPS daemons
        self.parts: list[_Part] = []
        self.routes: list[list[tuple[_Part, float]]] = [[] for _ in self.models]
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.n_parts_made = 0
        self.transition: _Transition | None = None
        self.plans: list[tuple[float, Plan]] = [(0.0, plan)]
        self.reconfigs: list[Reconfiguration] = []
        self.replans = 0
        self.batches = 0
        self.busy_weighted_ms = 0.0
        self.alive_weighted_ms = 0.0
        self.ctrl: ControlLoop | None = None
        self.ctrl_requested: dict[str, float] = {}  # the rates the current plan was made for
        self.replans_refused = 0
        self.ctrl_passes = 0  # controller passes run (none while a transition is under way)
        # requests answered since the controller's last pass, per model index (as the
        # daemon's meter counts them: arrival and outcome when the answer is given)
        self.c_done = [0] * len(self.models)
        self.c_met = [0] * len(self.models)
        self._finish: list[float] = []
        self._status: list[int] = []
        self._deadline: list[float] = []

    # -------------------------------------------------------------------- partitions
    def _make_part(self, key: PartKey, g: GpuPlan, p: Partition, plan: Plan) -> _Part:
        part = _Part(key, g, p)
        sku = g.sku
        neighbour = _neighbours(plan, g, p)
        busy_mode = self.options.interference == "busy"
        mig_profile = p.mig_profile if (g.mig and p.mig_profile is not None) else None
        for slot, a in enumerate(p.models):
            if a.name not in self.midx:
                raise ConfigError(f"plan serves {a.name!r}, which the problem does not list")
            spec = self.specs[a.name]
            lm = self.problem.latency.get((sku, spec.profile))
            if lm is None:
                raise ConfigError(f"no latency function for {spec.profile!r} on {sku}")
            buckets = runtime_buckets(a.batch)
            lat_b = lm.latency_curve(
                np.asarray(buckets, dtype=np.float64),
                p.sm_count,
                mig_profile=mig_profile,
                kind=p.kind,  # as the planner predicts it (MPS clients are slower)
            )
            if busy_mode:
                slow = 1.0
                part.gamma.append(self.problem.interference.gamma(spec.profile, sku))
            else:
                slow = self.problem.interference.slowdown_beside(spec.profile, sku, neighbour)
                part.gamma.append(0.0)
            slow *= self.options.overrun.get(a.name, 1.0)  # unknown to planner and controller
            by_n = [0.0]
            w_n = [0.0]  # the neighbour weight of this slot's batch of n (its bucket)
            j = 0
            for n in range(1, a.batch + 1):
                while buckets[j] < n:
                    j += 1
                by_n.append(float(lat_b[j]) * slow)
                w_n.append(self.problem.interference.neighbour_weight(sku, int(buckets[j])))
            part.weight_n.append(w_n)
            mi = self.midx[a.name]
            part.model_idx.append(mi)
            part.nbatch.append(a.batch)
            part.lat.append(by_n)
            host = self.options.host
            part.host.append([host.batch_extra_ms(spec.profile, n) for n in range(a.batch + 1)])
            if self.options.noise == "runtime":
                part.sigma.append(-1.0)
                part.factors.append(factors_for(self.noise.factors, spec.profile))
            else:
                part.sigma.append(self._sigma(sku, spec.profile))
                part.factors.append(())
            part.queues.append(deque())
            part.margin.append(0.0)
            part.slot_of.setdefault(mi, slot)
            part.rates[mi] = part.rates.get(mi, 0.0) + a.rate_rps
        if any(s != 0 for s in part.sigma):
            rng = model_rng(self.seed, f"partition#{self.n_parts_made}", _NOISE_STREAM)
            part.draw_block = rng.random if self.options.noise == "runtime" else rng.standard_normal
        if busy_mode and p.kind == "mps":  # MPS clients of the same GPU (or MIG instance)
            for q in self.parts:
                if (
                    q.state != STOPPED
                    and q.partition.kind == "mps"
                    and q.gpu.index == g.index
                    and q.partition.mig_start == p.mig_start
                ):
                    q.neigh.append((part, float(p.mps_pct or 0)))
                    part.neigh.append((q, float(q.partition.mps_pct or 0)))
        self.n_parts_made += 1
        self.parts.append(part)
        return part

    def _sigma(self, sku: str, profile: str) -> float:
        mode = self.options.noise
        if mode == "off":
            return 0.0
        if mode in ("profile", "runtime"):
            return self.noise.sigma(sku, profile)
        return float(mode)

    def _rebuild_routes(self) -> None:
        routes: list[list[tuple[_Part, float]]] = [[] for _ in self.models]
        for part in self.parts:
            if part.state != READY:
                continue
            for mi, rate in part.rates.items():
                routes[mi].append((part, 1.0 / max(rate, 1e-6)))
        self.routes = routes

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, payload))

    # -------------------------------------------------------------------- run
    def run(self) -> SimResult:
        opts = self.options
        for key, g, p in partition_keys(self.plan):
            part = self._make_part(key, g, p, self.plan)
            part.state = READY
        self._rebuild_routes()
        duration_ms = opts.duration_s * 1000.0
        ctrl = opts.controller
        if ctrl.enabled and self.replan_fn is not None:
            pr = self.planned_rates
            self.ctrl_requested = {
                n: (pr.get(n, 0.0) if pr is not None else self._plan_rate(self.plan, n))
                for n in self.models
            }
            self.ctrl = ControlLoop(ctrl)
            # the controller runs before the load starts: its clock starts at 0
            self.ctrl.estimator.fold(0.0, self._ctrl_planned(), {})
            self._push(ctrl.interval_s * 1000.0, _CTRL, None)
        counting = self.ctrl is not None
        c_done = self.c_done
        c_met = self.c_met

        # merged arrivals
        counts = [a.size for a in self.arrivals_ms]
        n_total = int(sum(counts))
        arr = np.concatenate(self.arrivals_ms) if n_total else np.empty(0, dtype=np.float64)
        mod = (
            np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts)])
            if n_total
            else np.empty(0, dtype=np.int64)
        )
        src = (
            np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
            if n_total
            else np.empty(0, dtype=np.int64)
        )
        slo = np.array([self.specs[n].slo_ms for n in self.models], dtype=np.float64)
        if self.deadlines_ms is not None and n_total:
            dl = np.concatenate(self.deadlines_ms)
        else:
            dl = arr + slo[mod] if n_total else np.empty(0, dtype=np.float64)
        order = np.lexsort((mod, arr))  # by time, then model index: stable, deterministic
        arr, mod, src, dl = arr[order], mod[order], src[order], dl[order]
        # Host cost before the worker's queue: requests are routed and queued this much after
        # they arrive (deadlines and latency still count from the arrival).
        pre = np.array(
            [opts.host.request_delay_ms(self.specs[n].profile) for n in self.models],
            dtype=np.float64,
        )
        if n_total and pre.any():
            queued = arr + pre[mod]
            order = np.lexsort((mod, queued))
            arr, mod, queued = arr[order], mod[order], queued[order]
            src, dl = src[order], dl[order]
        else:
            queued = arr
        reply_ms = opts.host.reply_delay_ms()
        deadline = dl.tolist()
        arr_l = queued.tolist()
        mod_l = mod.tolist()
        finish = [math.nan] * n_total
        status = [OK] * n_total
        self._finish = finish
        self._status = status
        self._deadline = deadline

        heap = self.heap
        by_model = opts.routing == "model"
        heappop = heapq.heappop
        i = 0
        inf = math.inf
        while True:
            t_ev = heap[0][0] if heap else inf
            if i < n_total and arr_l[i] <= t_ev:
                t = arr_l[i]
                m = mod_l[i]
                cands = self.routes[m]
                if not cands:
                    status[i] = NO_WORKER
                    finish[i] = t
                    if counting:
                        c_done[m] += 1
                    i += 1
                    continue
                if len(cands) == 1:
                    part = cands[0][0]
                elif by_model:
                    part = cands[0][0]
                    best = (part.model_flight.get(m, 0) + 1) * cands[0][1]
                    for c, inv in cands[1:]:
                        load = (c.model_flight.get(m, 0) + 1) * inv
                        if load < best:
                            best = load
                            part = c
                else:
                    part = cands[0][0]
                    best = (part.in_flight + 1) * cands[0][1]
                    for c, inv in cands[1:]:
                        load = (c.in_flight + 1) * inv
                        if load < best:
                            best = load
                            part = c
                part.queues[part.slot_of[m]].append(i)
                part.in_flight += 1
                part.model_flight[m] = part.model_flight.get(m, 0) + 1
                if not part.busy:
                    self._serve(part, t, 0)
                i += 1
                continue
            if not heap:
                break
            t, _, kind, payload = heappop(heap)
            if kind == _DONE:
                part, slot, live, dur = payload
                t_ans = t + reply_ms
                for j in live:
                    finish[j] = t_ans
                if counting:
                    mi = part.model_idx[slot]
                    c_done[mi] += len(live)
                    c_met[mi] += sum(1 for j in live if t_ans <= deadline[j])
                part.in_flight -= len(live)
                mi = part.model_idx[slot]
                part.model_flight[mi] -= len(live)
                est = part.margin[slot]
                part.margin[slot] = dur if est == 0.0 else 0.8 * est + 0.2 * dur
                part.busy_ms += dur
                self._serve(part, t, slot + 1)
            elif kind == _CTRL:
                self._control(t)
            elif kind == _READY:
                self._on_ready(t, payload)
            elif kind == _FINISH:
                self._on_finish(t, payload)

        end_ms = max(duration_ms, max((f for f in finish if f == f), default=0.0))
        for part in self.parts:
            died = part.died_ms if part.died_ms == part.died_ms else end_ms
            if part.born_ms == part.born_ms:  # it served at some point
                self.alive_weighted_ms += max(0.0, died - part.born_ms) * part.weight
            self.busy_weighted_ms += part.busy_ms * part.weight
        return SimResult(
            models=self.models,
            slo_ms=slo,
            arrival_ms=arr,
            finish_ms=np.asarray(finish, dtype=np.float64),
            model=mod,
            status=np.asarray(status, dtype=np.int64),
            duration_s=opts.duration_s,
            warmup_s=opts.warmup_s,
            plans=[(t / 1000.0, p) for t, p in self.plans],
            reconfigurations=self.reconfigs,
            replans=self.replans,
            busy_weighted_ms=self.busy_weighted_ms,
            alive_weighted_ms=self.alive_weighted_ms,
            batches=self.batches,
            info={
                "controller_passes": self.ctrl_passes,
                **({"replans_refused": self.replans_refused} if self.replans_refused else {}),
            },
            source_index=src,
        )

    # -------------------------------------------------------------------- the executor
    def _serve(self, part: _Part, t: float, slot: int) -> None:
        """The worker loop from ``slot`` at time ``t``: start the next batch, or go idle."""
        queues = part.queues
        n_slots = len(queues)
        deadline = self._deadline
        status = self._status
        finish = self._finish
        admission = self.options.admission
        while True:
            while slot < n_slots:
                q = queues[slot]
                if q:
                    k = part.nbatch[slot]
                    take = [q.popleft() for _ in range(min(k, len(q)))]
                    lim = t + (part.margin[slot] if admission else 0.0)
                    live = []
                    predicted = False
                    for j in take:
                        if lim > deadline[j]:
                            status[j] = DEADLINE
                            finish[j] = t
                            predicted = predicted or t <= deadline[j]
                        else:
                            live.append(j)
                    part.in_flight -= len(take) - len(live)
                    part.model_flight[part.model_idx[slot]] -= len(take) - len(live)
                    if self.ctrl is not None and len(take) > len(live):
                        self.c_done[part.model_idx[slot]] += len(take) - len(live)
                    if not live and predicted:
                        # as the worker: a take refused on the prediction alone shrinks it
                        part.margin[slot] *= ADMISSION_DECAY
                    if live:
                        dur = part.lat[slot][len(live)]
                        if part.neigh:  # interference "busy": the neighbours running now
                            pct = 0.0
                            for other, share in part.neigh:
                                if other.busy:
                                    pct += share * other.run_weight
                            dur *= 1.0 + part.gamma[slot] * pct / 100.0
                        sigma = part.sigma[slot]
                        if sigma > 0.0:
                            dur *= math.exp(sigma * self._draw(part))
                        elif sigma < 0.0:  # noise "runtime": a measured factor
                            fs = part.factors[slot]
                            dur *= fs[int(self._draw(part) * len(fs))]
                        dur += part.host[slot][len(live)]
                        part.busy = True
                        part.run_weight = part.weight_n[slot][len(live)]
                        self.batches += 1
                        self._push(t + dur, _DONE, (part, slot, live, dur))
                        return
                slot += 1
            if any(queues):
                slot = 0
                continue
            part.busy = False
            if part.state == DRAINING:
                self._stopped(part, t)
            return

    @staticmethod
    def _draw(part: _Part) -> float:
        """The partition's next noise draw (a standard normal, or a uniform with noise
        "runtime"), from blocks of its seeded stream."""
        if part.noise_i >= len(part.noise):
            assert part.draw_block is not None
            part.noise = part.draw_block(_NOISE_BLOCK).tolist()
            part.noise_i = 0
        z = part.noise[part.noise_i]
        part.noise_i += 1
        return z

    # -------------------------------------------------------------------- controller
    @staticmethod
    def _plan_rate(plan: Plan, model: str) -> float:
        return plan.served_rate(model) + sum(u.rate_rps for u in plan.unserved if u.name == model)

    def _ctrl_planned(self) -> dict[str, float]:
        """Each model's planned rate as the daemon reads it (``Service.planned_rates``): what
        the current plan serves of it, or the rate asked for when it serves none."""
        return planned_rates(self.plan, {n: self.ctrl_requested[n] for n in self.models})

    def _next_tick(self, t: float) -> None:
        nxt = t + self.options.controller.interval_s * 1000.0
        if nxt < self.options.duration_s * 1000.0:
            self._push(nxt, _CTRL, None)

    def _control(self, t: float) -> None:
        """One pass of the daemon's controller (``partitioner.control``) at virtual time t."""
        ctrl = self.ctrl
        assert ctrl is not None and self.replan_fn is not None
        self.ctrl_passes += 1
        planned = self._ctrl_planned()
        counts = {
            n: Counts(self.c_done[i], self.c_done[i], self.c_met[i])
            for i, n in enumerate(self.models)
        }
        for i in range(len(self.models)):
            self.c_done[i] = self.c_met[i] = 0
        d = ctrl.step(t / 1000.0, planned, counts)
        if d.rates is None:
            self._next_tick(t)
            return
        rates, replan_fn = d.rates, self.replan_fn

        def replan() -> Plan:
            new = replan_fn(rates, self.plan)
            self.replans += 1
            check_keeps_live(new, planned)  # as Service.replan does
            return new

        try:  # the daemon's controller around its replan: a failure backs off
            new = ctrl.replan_rules.attempt(t / 1000.0, replan)
        except DropsLiveModelError:  # a controller error there
            self.replans_refused += 1
            self._next_tick(t)
            return
        self.ctrl_requested = dict(rates)
        self._begin_transition(t, new)
        if self.transition is None:  # nothing to start or stop: done at once
            self._next_tick(t)
        # else the next pass is interval_s after the transition is done (_on_finish)

    # -------------------------------------------------------------------- transitions
    def _begin_transition(self, t: float, new: Plan) -> None:
        """Cost ``stgs.transition.transition``'s steps, as ``Runtime._transition`` does them:
        keep what matches, make before break."""
        costs = self.options.reconfig
        live = {p.key: p for p in self.parts if p.state in (READY, STARTING)}
        change = transition({k: Held(p.partition) for k, p in live.items()}, new, self.node)
        self.node = change.node
        want = {k: (g, p) for k, g, p in partition_keys(new)}
        kept = set(change.kept)
        for k in change.kept:  # rate changes only re-weight routing
            part = live[k]
            part.partition = p = want[k][1]
            part.rates = {}
            for a in p.models:
                mi = self.midx[a.name]
                part.rates[mi] = part.rates.get(mi, 0.0) + a.rate_rps
        old = [p for k, p in live.items() if k not in kept]
        if not change.started and not old:
            self.plan = new
            self.plans.append((t, new))
            self._rebuild_routes()
            return
        blocking = [live[k] for k in change.early]
        steps_s = sum(step_seconds(s, costs) for s in change.steps if s.phase in ("break", "start"))
        free_s = sum(step_seconds(s, costs) for s in change.steps if s.phase == "free")
        new_parts = []
        for k in change.started:
            g, p = want[k]
            part = self._make_part(k, g, p, new)
            part.born_ms = math.nan
            new_parts.append(part)
        tr = _Transition(new, t, new_parts, old, blocking, steps_s, free_s)
        self.transition = tr
        for b in blocking:
            self._drain(b, t)
        self._rebuild_routes()
        if not blocking:  # else the last of them to stop starts the workers (_stopped)
            self._start_workers(t)

    def _start_workers(self, t: float) -> None:
        tr = self.transition
        assert tr is not None
        tr.phase = "start"
        costs = self.options.reconfig
        t0 = t + tr.steps_s * 1000.0
        ready = t0
        for part in tr.new_parts:
            own = costs.worker_start_s
            for b in part.nbatch:
                own += costs.model_load_s + costs.graph_capture_s * len(runtime_buckets(b))
            ready = max(ready, t0 + own * 1000.0)  # started together, awaited in order
            self._push(ready, _READY, part)
        if not tr.new_parts:
            self._push(t0, _READY, None)

    def _on_ready(self, t: float, part: _Part | None) -> None:
        tr = self.transition
        assert tr is not None
        if part is not None:
            part.state = READY
            part.born_ms = t
            self._rebuild_routes()
        if part is None or part is tr.new_parts[-1]:
            tr.phase = "drain"
            tr.ready_ms = t
            self.plan = tr.plan
            self.plans.append((t, tr.plan))
            for p in tr.old_parts:
                if p.state in (READY, STARTING):
                    self._drain(p, t)
            self._rebuild_routes()
            self._maybe_done(t)

    def _drain(self, part: _Part, t: float) -> None:
        if part.state == STARTING:
            part.state = STOPPED
            part.died_ms = t
            _unlink(part)
            return
        part.state = DRAINING
        if not part.busy and not any(part.queues):
            self._stopped(part, t)

    def _stopped(self, part: _Part, t: float) -> None:
        part.state = STOPPED
        part.died_ms = t
        _unlink(part)
        tr = self.transition
        if tr is None:
            return
        if tr.phase == "break" and all(p.state == STOPPED for p in tr.blocking):
            self._push(t, _FINISH, "break")
        elif tr.phase == "drain":
            self._maybe_done(t)

    def _on_finish(self, t: float, what: str) -> None:
        tr = self.transition
        if tr is None:
            return
        if what == "break" and tr.phase == "break":
            self._start_workers(t)
        elif what == "done" and tr.phase == "finishing":
            n_old = len(tr.old_parts)
            self.reconfigs.append(
                Reconfiguration(
                    start_s=tr.start_ms / 1000.0,
                    ready_s=tr.ready_ms / 1000.0,
                    done_s=t / 1000.0,
                    partitions_started=len(tr.new_parts),
                    partitions_stopped=n_old,
                    break_first=len(tr.blocking),
                    gpus_used=tr.plan.gpus_used,
                )
            )
            tr.phase = "done"
            self.transition = None
            if self.ctrl is not None:  # the controller's replan() returns now
                self._next_tick(t)

    def _maybe_done(self, t: float) -> None:
        tr = self.transition
        assert tr is not None
        if all(p.state == STOPPED for p in tr.old_parts):
            self._push(t + tr.free_s * 1000.0, _FINISH, "done")
            tr.phase = "finishing"


# ------------------------------------------------------------------------------------ helpers
def _unlink(part: _Part) -> None:
    """A stopped partition slows no neighbour any more."""
    for q, _ in part.neigh:
        q.neigh = [(x, share) for x, share in q.neigh if x is not part]
    part.neigh = []


def _neighbours(plan: Plan, g: GpuPlan, p: Partition) -> list[tuple[float, int | None]]:
    """The other MPS partitions of the same GPU (or MIG instance) in ``plan``: (share, the
    largest batch it runs) each."""
    if p.kind != "mps":
        return []
    out: list[tuple[float, int | None]] = []
    seen_self = False
    for q in g.partitions:
        if q.kind != "mps" or q.mig_start != p.mig_start:
            continue
        if q is p and not seen_self:
            seen_self = True
            continue
        out.append((float(q.mps_pct or 0), max((a.batch for a in q.models), default=None)))
    return out
