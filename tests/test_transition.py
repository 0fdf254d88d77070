"""One transition planner (stgs.transition), three users: the runtime carries its steps out on
the simulated node, the simulator costs them, the replan scores them. The same plan pairs (MIG
and MPS, every SKU of the catalog at once, one GPU each) go through all three, and they must
agree on what is kept, restarted, started, stopped, and stopped before the new partitions are
ready (break first)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from _helpers import make_partition

from partitioner.replan import diff, disruptions
from partitioner.sim.config import SimOptions
from partitioner.sim.engine import _FINISH, _READY, READY, STOPPED, Simulator, step_seconds
from stgs.backend import SimulatedNode
from stgs.catalog import SKUS, GpuSku
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.runtime import PartitionRuntime, PartitionState, Runtime
from stgs.transition import PartitionKey, Transition, node_state_of, partition_keys, transition
from stgs.types import ModelSpec

SKU_LIST = list(SKUS.values())  # GPU i of the node is the i-th SKU of the catalog


def _part(
    models: list[tuple[str, int, float]],
    kind: str,
    mig: tuple[str, int] | None = None,
    mps: int | None = None,
) -> Partition:
    return make_partition(models, kind, mig, mps, sm_count=8)


def _profile(sku: GpuSku, slices: int) -> str:
    return next(p.name for p in sku.mig_profiles if p.compute_slices == slices)


def _gpu(i: int, sku: GpuSku, stage: str) -> GpuPlan:
    """GPU ``i``'s partitions at one stage of the chain."""
    mig = sku.supports_mig
    g3 = _profile(sku, 3) if mig else ""
    rate = 20.0 if stage == "A" else 30.0  # "rate": only the rates change
    echo_b = 4 if stage in ("A", "rate") else 8  # "batch": one batch changes
    share = 50 if stage in ("A", "rate", "batch") else 40  # "share": an MPS share changes
    moved = stage in ("moved", "layout", "mode")  # "moved": sleep:1 moves to partition 1
    first = [("echo", echo_b, rate), *([("sleep:1", 2, 5.0)] if moved else [])]
    second = [("echo", 2, 5.0)] if moved else [("sleep:1", 2, 5.0)]
    if stage == "empty":
        return GpuPlan(i, sku.name, mig)
    if not mig:  # MPS on the whole GPU; the MIG stages leave it as it is
        return GpuPlan(
            i,
            sku.name,
            False,
            (_part(first, "mps", mps=100 - share), _part(second, "mps", mps=share)),
        )
    if stage == "layout":  # one instance over both old ones: they break first
        return GpuPlan(i, sku.name, True, (_part(first, "mig", mig=(_profile(sku, 7), 0)),))
    if stage == "mode":  # MIG off under a serving GPU: it breaks first
        return GpuPlan(i, sku.name, False, (_part(first, "full"),))
    share_in = 100 if stage in ("A", "rate", "batch") else share  # MPS inside a MIG instance
    return GpuPlan(
        i,
        sku.name,
        True,
        (_part(first, "mig", mig=(g3, 0)), _part(second, "mps", mig=(g3, 4), mps=share_in)),
    )


STAGES = ["empty", "A", "rate", "batch", "share", "moved", "layout", "mode", "empty"]
PLANS = [Plan(s, True, tuple(_gpu(i, sku, s) for i, sku in enumerate(SKU_LIST))) for s in STAGES]


def _slots(keys: Any) -> frozenset[tuple[object, ...]]:
    return frozenset(k.slot for k in keys)


# ------------------------------------------------------------------------------ the simulator
class _Latency:
    def latency_curve(self, batches: Any, *_a: Any, **_k: Any) -> Any:
        return np.ones(len(batches))


def _problem() -> Any:
    """Just what the simulator reads of a problem, for two cheap models on every SKU."""
    models = [ModelSpec("echo", 100.0, 1.0), ModelSpec("sleep:1", 100.0, 1.0)]
    latency = {(sku.name, m.profile): _Latency() for sku in SKU_LIST for m in models}
    interference = SimpleNamespace(
        gamma=lambda *_: 0.0,
        slowdown=lambda *_: 1.0,
        slowdown_beside=lambda *_: 1.0,
        neighbour_weight=lambda *_: 1.0,
    )
    return SimpleNamespace(models=models, latency=latency, interference=interference)


def _sim_change(sim: Simulator, t: float, new: Plan) -> dict[str, Any]:
    """Start the simulator's transition to ``new`` at ``t`` ms and run it to the end (no
    requests): what it kept, started, stopped (and stopped first), and its costs."""
    before = {id(p): p for p in sim.parts if p.state == READY}
    n_reconfigs = len(sim.reconfigs)
    sim._begin_transition(t, new)
    while sim.heap:
        t, _, kind, payload = heapq.heappop(sim.heap)
        if kind == _READY:
            sim._on_ready(t, payload)
        elif kind == _FINISH:
            sim._on_finish(t, payload)
    assert sim.transition is None
    rec = sim.reconfigs[-1] if len(sim.reconfigs) > n_reconfigs else None
    return {
        "kept": {p.key for p in sim.parts if id(p) in before and p.state == READY},
        "started": {p.key for p in sim.parts if id(p) not in before and p.state == READY},
        "stopped": {p.key for p in before.values() if p.state == STOPPED},
        "break_first": 0 if rec is None else rec.break_first,
        "record": rec,
        "t": t,
    }


# ------------------------------------------------------------------------------ the runtime
@pytest.fixture(scope="module")
def node() -> Iterator[SimulatedNode]:
    n = SimulatedNode([s.name for s in SKU_LIST], mig_enabled=True)
    yield n
    n.close()


def _check_semantics(stage: str, change: Transition) -> None:
    """What each stage of the chain is about."""
    mig_gpus = {i for i, s in enumerate(SKU_LIST) if s.supports_mig}
    if stage == "A":
        assert not change.kept and not change.stopped and len(change.started) == 2 * len(SKUS)
    elif stage == "rate":
        assert not change.started and not change.stopped
        assert len(change.kept) == 2 * len(SKUS) and len(change.reweighted) == len(SKUS)
    elif stage in ("batch", "share", "moved"):
        assert change.started and _slots(change.stopped) == change.restarted
        assert not change.early  # restarts in place start beside the old workers
    elif stage in ("layout", "mode"):
        assert set(change.disrupted) == mig_gpus
        assert {k.gpu for k in change.kept} == set(range(len(SKUS))) - mig_gpus
    if stage == "mode":
        assert set(change.mode_changed) == mig_gpus
    if stage == "empty":
        assert not change.started and not change.kept


def test_runtime_simulator_and_replan_agree(node: SimulatedNode) -> None:
    rt = Runtime(node, ready_timeout_s=30.0, drain_timeout_s=5.0, monitor_interval_s=0.05)
    sim = Simulator(_problem(), PLANS[0], {}, SimOptions(duration_s=1))
    sim.run()
    events: list[tuple[PartitionKey, PartitionState]] = []
    set_state = rt._set

    def record(p: PartitionRuntime, state: PartitionState, error: str | None = None) -> None:
        events.append((p.key, state))
        set_state(p, state, error)

    rt._set = record  # type: ignore[method-assign]
    t = 1000.0
    try:
        for prev, plan in itertools.pairwise(PLANS):
            change = transition(prev, plan)  # the planner's view: the node as prev leaves it
            _check_semantics(plan.policy, change)
            kept, started = set(change.kept), set(change.started)
            stopped, early = set(change.stopped), set(change.early)

            # the runtime, on the simulated node
            pids = {k: p.pid for k, p in rt.partitions.items()}
            events.clear()
            rec = rt.apply(plan)
            assert set(rec.kept) == {str(k) for k in kept}, plan.policy
            assert rec.started == [str(k) for k in change.started], plan.policy
            assert sorted(rec.stopped) == sorted(str(k) for k in stopped), plan.policy
            assert {k: rt.partitions[k].pid for k in kept} == {k: pids[k] for k in kept}
            assert set(rt.partitions) == kept | started
            first_ready = min(
                (
                    i
                    for i, (k, s) in enumerate(events)
                    if s is PartitionState.READY and k in started
                ),
                default=0,  # nothing starts: nothing can stop first
            )
            stopped_first = {
                k for k, s in events[:first_ready] if s is PartitionState.STOPPED and k in stopped
            }
            assert stopped_first == early, plan.policy
            for k in kept:  # re-weighted in place
                assert rt.partitions[k].rates == {m.name: m.rate_rps for m in k_part(plan, k)}

            # the simulator's costing
            got = _sim_change(sim, t, plan)
            assert got["kept"] == kept and got["started"] == started, plan.policy
            assert got["stopped"] == stopped and got["break_first"] == len(early), plan.policy
            if got["record"] is not None:
                r = got["record"]
                costs = sim.options.reconfig
                pre = sum(step_seconds(s, costs) for s in change.steps if s.phase != "free")
                free = sum(step_seconds(s, costs) for s in change.steps if s.phase == "free")
                start = costs.worker_start_s if started else 0.0
                assert r.ready_s - r.start_s >= pre + start - 1e-9, plan.policy
                assert r.done_s - r.ready_s >= free - 1e-9, plan.policy
            t = got["t"] + 1000.0

            # the replan's scoring
            ch = diff(prev, plan)
            assert (ch.partitions_kept, ch.partitions_added, ch.partitions_removed) == (
                len(kept),
                len(started),
                len(stopped),
            ), plan.policy
            assert disruptions(prev, plan) == len({k.gpu for k in early}), plan.policy
            assert set(ch.gpus_mode_changed) == set(change.mode_changed)
            # and every path sees the same restarts: places stopped and started again
            assert _slots(started) & _slots(stopped) == change.restarted
    finally:
        rt.close()
    assert not node.mps_daemons()
    assert all(node.mig_layout(i) == () for i, s in enumerate(SKU_LIST) if s.supports_mig)


def k_part(plan: Plan, key: PartitionKey) -> tuple[ModelAssignment, ...]:
    return partition_keys(plan)[key][1].models


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(range(1, len(PLANS) - 1), 2)))
def test_every_pair_costs_and_scores_the_same_steps(a: int, b: int) -> None:
    """Every ordered pair of the chain's plans (no workers): the simulator and the replan
    agree with the steps, and a plan applied again changes nothing."""
    prev, plan = PLANS[a], PLANS[b]
    change = transition(prev, plan)
    assert change.node == transition(prev, plan, node_state_of(prev)).node
    sim = Simulator(_problem(), prev, {}, SimOptions(duration_s=1))
    sim.run()
    got = _sim_change(sim, 1000.0, plan)
    assert got["kept"] == set(change.kept) and got["started"] == set(change.started)
    assert got["stopped"] == set(change.stopped)
    assert got["break_first"] == len(change.early)
    ch = diff(prev, plan)
    assert (ch.partitions_kept, ch.partitions_added, ch.partitions_removed) == (
        len(change.kept),
        len(change.started),
        len(change.stopped),
    )
    assert disruptions(prev, plan) == len(change.disrupted)
    again = transition(plan, plan)
    assert not again.changes and len(again.kept) == len(plan.partitions())
