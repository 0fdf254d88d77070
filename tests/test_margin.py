"""The batch margin (issue 17): per model, from its rate, its batch, the partition's cycle and
its SLO slack, the Poisson arrivals per cycle that a batch serves with >= 99% of the requests
in time (``partitioner/margin.py``; docs/planner.md "Batch margin"), planned in one place
(``partitioner.problem``) and checked against the simulator."""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Any

import numpy as np
import pytest
from plan_checker import build_models, check_plan

from partitioner.margin import (
    MAX_CYCLES,
    SLACK_STEPS,
    cycle_capacity,
    miss_share,
    patience,
    z_capacity,
)
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem, schedule
from partitioner.sim import SimOptions, WorkloadSpec, generate
from partitioner.sim.run import noise_for, simulate
from stgs.errors import ConfigError
from stgs.profiles import default_profiles_path
from stgs.scenario import PlannerOptions, scenario_from_mapping

TARGET = PlannerOptions().batch_margin_target  # the Poisson share of a 99% SLO's budget


def _worker_with_deadlines(lam: float, batch: int, wait: float, cycles: int, seed: int) -> float:
    """The share of requests that miss, by brute force: Poisson arrivals (rate ``lam`` per
    cycle of 1), a visit at every integer time taking up to ``batch`` queued requests, oldest
    first, dropping those that waited more than ``wait`` (their deadline passed)."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0.0, cycles, rng.poisson(lam * cycles)))
    queue: deque[float] = deque()
    i = missed = served = 0
    for visit in range(1, cycles + 1):
        while i < times.size and times[i] <= visit:
            queue.append(float(times[i]))
            i += 1
        taken = 0
        while queue and taken < batch:
            t = queue.popleft()
            if visit - t > wait + 1e-12:
                missed += 1
                continue
            taken += 1
            served += 1
    return missed / max(1, missed + served)


@pytest.mark.parametrize(
    ("lam", "batch", "k", "f"),
    [(3.0, 4, 1, 0.0), (3.0, 4, 1, 0.5), (3.9, 4, 2, 0.25), (0.5, 1, 1, 0.5), (12.0, 16, 1, 0.3)],
)
def test_the_miss_share_is_a_worker_s(lam: float, batch: int, k: int, f: float) -> None:
    """The chain's stationary miss share is what a brute-force worker loses: a request may
    start its batch ``k + f`` cycles after it arrives."""
    model = miss_share(lam, batch, k, f)
    brute = _worker_with_deadlines(lam, batch, k + f, 60_000, seed=1)
    assert model == pytest.approx(brute, rel=0.08, abs=4e-4), (model, brute)


def test_one_cycle_of_patience_is_the_poisson_tail() -> None:
    """k = 1, f = 0: the requests beyond the batch miss, E[(N - b)+] / lam."""
    lam, b = 6.3, 8
    p = [math.exp(-lam) * lam**n / math.factorial(n) for n in range(80)]
    tail = sum((n - b) * pn for n, pn in enumerate(p) if n > b) / lam
    assert miss_share(lam, b, 1, 0.0) == pytest.approx(tail, rel=1e-9)


def test_the_capacity_is_the_largest_mean_that_keeps_the_target() -> None:
    for b, k, fs in [(1, 1, 0), (4, 1, 3), (8, 2, 0), (16, 1, 0), (32, 1, 5), (64, 3, 0)]:
        cap = cycle_capacity(b, k, fs, TARGET)
        f = fs / SLACK_STEPS
        assert miss_share(cap, b, k, f) <= 1 - TARGET + 1e-9
        if cap < b:  # no larger mean keeps it: the margin is no larger than the target needs
            assert miss_share(cap * 1.002, b, k, f) > 1 - TARGET
    # more patience, more capacity; a stricter target, less
    assert cycle_capacity(8, 1, 0, TARGET) < cycle_capacity(8, 1, 4, TARGET)
    assert cycle_capacity(8, 1, 4, TARGET) < cycle_capacity(8, 2, 0, TARGET)
    assert cycle_capacity(8, 2, 0, 0.999) < cycle_capacity(8, 2, 0, TARGET)
    # against the former z = 1: stricter for small batches that may wait one cycle only,
    # looser once a second cycle is allowed
    assert cycle_capacity(4, 1, 0, TARGET) < z_capacity(4, 1.0) < cycle_capacity(4, 2, 0, TARGET)
    with pytest.raises(ValueError):
        cycle_capacity(8, 1, 0, 1.0)
    with pytest.raises(ValueError):
        miss_share(1.0, 0, 1)


def test_patience_counts_whole_cycles_and_a_fraction_of_one_more() -> None:
    assert patience(10.0, 10.0) == (1, 0)
    assert patience(14.0, 10.0) == (1, 3)  # 0.4 of a cycle: 3 eighths, rounded down
    assert patience(25.0, 10.0) == (2, 4)
    assert patience(5.0, 10.0) == (1, 0)  # the duty-cycle rule guarantees one
    assert patience(1e6, 10.0) == (MAX_CYCLES, 0)


def test_z_capacity_is_the_former_rule() -> None:
    for b in (1, 4, 16, 128):
        n = z_capacity(b, 1.0)
        assert n + math.sqrt(n) == pytest.approx(b)
    assert z_capacity(16, 0.0) == 16


# ------------------------------------------------------------------------------- planner
def _data(models: list[dict[str, Any]], **planner: Any) -> dict[str, Any]:
    return {
        "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
        "models": models,
        "planner": planner,
    }


MODELS = [
    {"name": "resnet50", "slo_ms": 15, "rate_rps": 700},
    {"name": "mobilenet_v3_large", "slo_ms": 10, "rate_rps": 900},
    {"name": "bert_base", "slo_ms": 60, "rate_rps": 150},
]


def _predicted(curve: Any, i: int) -> float:
    """A batch's predicted time in the cycle: its planning latency less the headroom."""
    return float(curve.lat[i] - curve.headroom * curve.slowdown * curve.raw_solo[i])


def _keeps(curve: Any, i: int, rate: float, busy: float) -> bool:
    """The margin, re-derived from partitioner.margin alone (not the curve's cache): ``busy``
    is the partition's cycle at the predicted latencies."""
    if rate <= 0:
        return True
    k, fs = patience(curve.slo - _predicted(curve, i), busy)
    return miss_share(rate * busy / 1000.0, curve.bucket_list[i], k, fs / SLACK_STEPS) <= (
        1 - TARGET + 1e-6
    )


def _pred_busy(sched: Any) -> float:
    return sum(_predicted(s.curve, s.curve.bucket_list.index(s.batch)) for s in sched.slots)


def test_every_partition_keeps_the_margin_on_its_cycle() -> None:
    """A plan's partitions: each model's batch keeps the target share of its Poisson arrivals
    in time on the partition's cycle (its busy time at the predicted latencies), and the plan
    is valid by the independent rules."""
    sc = scenario_from_mapping(_data(MODELS))
    prob = Problem.from_scenario(sc)
    plan = get_policy("stgs").plan(prob)
    assert plan.feasible
    assert check_plan(plan, sc, *build_models(sc)) == []
    gtype = prob.gpu_types[0]
    shapes = {s.label: s for s in prob.shapes(gtype)}
    checked = 0
    for _, p in plan.partitions():
        label = "full" if p.kind == "full" else f"mps:{p.mps_pct}"
        curves = {m.name: prob.curve(m, gtype, shapes[label]) for m in prob.models}
        busy = sum(
            _predicted(curves[a.name], curves[a.name].bucket_list.index(a.batch))  # type: ignore[union-attr]
            for a in p.models
        )
        for a in p.models:
            c = curves[a.name]
            assert c is not None
            assert _keeps(c, c.bucket_list.index(a.batch), a.rate_rps, busy), (p, a)
            checked += 1
    assert checked >= 3


def test_a_saturated_partition_keeps_room_for_bursts() -> None:
    """One model alone on a partition at 97% of what its largest batch serves: the duty-cycle
    rule alone (b >= r d) plans it, and would lose more than 1% of the requests to Poisson
    bursts; with the margin that rate does not fit, and the partition's ``max_rps`` does."""
    prob = Problem.from_scenario(scenario_from_mapping(_data(MODELS[1:2])))
    gtype = prob.gpu_types[0]
    shape = next(s for s in prob.shapes(gtype) if s.label == "mps:25")
    curve = prob.curve(prob.models[0], gtype, shape)
    z0 = Problem.from_scenario(
        scenario_from_mapping(_data(MODELS[1:2], batch_margin="z", batch_margin_z=0))
    ).curve(prob.models[0], gtype, shape)
    assert curve is not None and z0 is not None
    top = max(i for i, lat in enumerate(curve.lat_list) if 2 * lat <= curve.slo)
    rate = 0.97 * 1000.0 * curve.bucket_list[top] / curve.lat_list[top]
    plain = schedule([(z0, rate)])
    assert plain is not None and plain.slots[0].batch == curve.bucket_list[top]
    assert not _keeps(curve, top, rate, _pred_busy(plain))
    assert schedule([(curve, rate)]) is None
    kept = schedule([(curve, curve.max_rps * 0.999)])
    assert kept is not None
    s = kept.slots[0]
    assert _keeps(curve, curve.bucket_list.index(s.batch), s.rate_rps, _pred_busy(kept))


def test_schedule_finds_a_schedule_whenever_one_keeps_every_rule() -> None:
    """Against brute force over duty cycles and batches: two models time-sharing a partition,
    rates on a grid; whenever some (d, batches) keeps the duty-cycle rules and the margins,
    ``schedule`` finds a schedule (its batches the least fixed point)."""
    prob = Problem.from_scenario(scenario_from_mapping(_data(MODELS[:2])))
    gtype = prob.gpu_types[0]
    shape = next(s for s in prob.shapes(gtype) if s.label == "mps:50")
    ca, cb = (prob.curve(m, gtype, shape) for m in prob.models)
    assert ca is not None and cb is not None
    missed = tried = 0
    for ra, rb in itertools.product((50.0, 300.0, 900.0, 1600.0), (50.0, 400.0, 1200.0)):
        found = schedule([(ca, ra), (cb, rb)])
        if found is not None:
            assert found.busy_ms <= found.duty_cycle_ms + 1e-9
            busy = _pred_busy(found)
            for s in found.slots:
                i = s.curve.bucket_list.index(s.batch)
                assert s.batch >= s.rate_rps * found.duty_cycle_ms / 1000.0 - 1e-9
                assert found.duty_cycle_ms + s.latency_ms <= s.curve.slo + 1e-9
                assert _keeps(s.curve, i, s.rate_rps, busy)
        brute = False
        for i, j in itertools.product(range(len(ca.bucket_list)), range(len(cb.bucket_list))):
            busy = ca.lat_list[i] + cb.lat_list[j]
            d = min(
                ca.slo - ca.lat_list[i],
                cb.slo - cb.lat_list[j],
                1000.0 * ca.bucket_list[i] / ra,
                1000.0 * cb.bucket_list[j] / rb,
            )
            if busy > d or ca.memory_list[i] + cb.memory_list[j] > shape.memory_mib:
                continue
            pred = _predicted(ca, i) + _predicted(cb, j)
            if _keeps(ca, i, ra, pred) and _keeps(cb, j, rb, pred):
                brute = True
                break
        tried += 1
        missed += brute and found is None
    assert missed == 0 and tried == 12


def test_batch_margin_z_keeps_the_former_rule() -> None:
    """``batch_margin: z``: b >= n + z sqrt(n) on the duty cycle, as before issue 17."""
    prob = Problem.from_scenario(
        scenario_from_mapping(_data(MODELS, batch_margin="z", batch_margin_z=1.0))
    )
    plan = get_policy("stgs").plan(prob)
    for _, p in plan.partitions():
        for a in p.models:
            n = a.rate_rps * p.duty_cycle_ms / 1000.0
            assert a.batch >= n + math.sqrt(n) - 1e-6


@pytest.mark.parametrize(
    "planner",
    [{"batch_margin": "q"}, {"batch_margin_target": 0.3}, {"batch_margin_target": 1.0}],
)
def test_bad_margin_options_are_refused(planner: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        scenario_from_mapping(_data(MODELS, **planner))


# ------------------------------------------------------------------------------ simulator
SIM_SCENARIO = {
    "gpus": [{"sku": "L4", "count": 1}],
    "models": [{"name": "resnet50", "slo_ms": 20, "rate_rps": 100}],
}


def _least_attained(planner: dict[str, Any], *, load: float = 1.0) -> float:
    """The stgs plan at its peak, simulated 10 s (Poisson, seed 0, each partition sent its
    planned share): the least model's SLO attainment at the rates x ``load``."""
    prob = Problem.from_scenario(scenario_from_mapping({**SIM_SCENARIO, "planner": planner}))
    peak = find_peak(prob, get_policy("stgs"))
    rates = {m.name: m.rate_rps * peak.k * load for m in prob.models}
    opts = SimOptions(duration_s=10, routing="model")
    arrivals = generate(WorkloadSpec(name="poisson"), rates, 10, seed=0)
    _, metrics = simulate(
        prob,
        get_policy("stgs"),
        arrivals,
        rates,
        opts,
        seed=0,
        noise=noise_for(opts, default_profiles_path()),
        plan=peak.plan,
    )
    return min(float(v["slo_attainment"]) for v in metrics.per_model.values())


def test_the_simulator_keeps_99_percent_at_the_planned_peak() -> None:
    """At the peak the planner finds, the simulated model keeps >= 99% within its SLO; without
    a margin (z = 0) it does not; 5% more load than planned breaks it (the margin is not larger
    than it needs to be), where the former z = 1 kept 99% at 15% more than its own, lower,
    peak."""
    assert _least_attained({}) >= 0.99
    assert _least_attained({"batch_margin": "z", "batch_margin_z": 0}) < 0.99
    assert _least_attained({}, load=1.05) < 0.99
    former = {"batch_margin": "z", "batch_margin_z": 1.0}
    assert _least_attained(former, load=1.15) >= 0.99
    peaks = [
        find_peak(
            Problem.from_scenario(scenario_from_mapping({**SIM_SCENARIO, "planner": p})),
            get_policy("stgs"),
        ).k
        for p in ({}, former)
    ]
    assert peaks[0] > 1.1 * peaks[1]


def test_the_planner_benchmark_compares_the_margins(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m benchmarks.planner --margins``: per scenario the former and the new peak and
    their simulated attainment (one small scenario here, on the example profiles)."""
    import argparse

    from benchmarks import planner
    from benchmarks.lib.cases import Case
    from stgs.interference import load_weights

    case = Case("one-L4", dict(SIM_SCENARIO))
    monkeypatch.setattr(planner, "measured_scenarios", lambda *a: [case])
    args = argparse.Namespace(
        simulate=2.0, sku="L4", seed=1, weights=None, routing="model", quick=True,
        profiles=None, json=None, planner_inputs=True,
    )  # fmt: skip
    assert planner.margins(args, load_weights()) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| one-L4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    former, new = float(cells[2]), float(cells[4])
    assert former > 0 and new > 0 and float(cells[6]) == pytest.approx(new / former, abs=2e-3)
    assert "| stgs / fluid bound, geomean |" in out
    assert "scenarios with a model below 0.99 (planned)" in out
