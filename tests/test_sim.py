"""The simulator: exact latencies on a hand-computable case, conservation, determinism,
attainment below and past a plan's peak, workload rates, re-planning with reconfiguration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim import (
    ControllerOptions,
    NoiseModel,
    SimOptions,
    Simulator,
    WorkloadSpec,
    compute_metrics,
    fit_noise,
    generate,
    runtime_buckets,
    simulate,
)
from partitioner.sim.config import HostCosts
from partitioner.sim.engine import DEADLINE, NO_WORKER, OK
from stgs.errors import ConfigError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.scenario import scenario_from_mapping

SC = {
    "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
    "models": [
        {"name": "resnet50", "slo_ms": 50, "rate_rps": 400},
        {"name": "bert_base", "slo_ms": 100, "rate_rps": 100},
    ],
}


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem.from_scenario(scenario_from_mapping(SC))


def one_model_plan(batch: int, duty_ms: float = 10.0) -> Plan:
    part = Partition("full", 132, 81559.0, duty_ms, (ModelAssignment("resnet50", batch, 400, 1),))
    return Plan("hand", True, (GpuPlan(0, "H100-80GB", False, (part,)), GpuPlan(1, "x", False)))


def test_runtime_buckets_mirror_the_runtime() -> None:
    assert runtime_buckets(1) == (1,)
    assert runtime_buckets(12) == (1, 2, 4, 8, 12)
    assert runtime_buckets(16) == (1, 2, 4, 8, 16)
    models = pytest.importorskip("stgs.runtime.models")
    for b in (1, 2, 3, 5, 12, 16, 33, 128):
        assert runtime_buckets(b) == models.batch_buckets(b)


def test_hand_computable_latencies(problem: Problem) -> None:
    """One partition, one model, batch 4: arrivals 0, 0, 0, 0, 0, 1 ms, then 100 ms later one.

    The first arrival starts a batch of 1 at t=0 (the worker was idle); the next four queue and
    run as one batch of 4 when it ends; the arrival at 1 ms waits for that batch too.
    """
    lm = problem.latency[("H100-80GB", "resnet50")]
    l1 = lm.latency_ms(1, 132)
    l4 = lm.latency_ms(4, 132)
    l2 = lm.latency_ms(2, 132)
    arr = np.array([0, 0, 0, 0, 0, 0.001, 0.2])  # seconds
    sim = Simulator(
        problem,
        one_model_plan(4),
        {"resnet50": arr},
        SimOptions(duration_s=1, noise="off", admission=False, host=HostCosts(enabled=False)),
    )
    res = sim.run()
    lat = res.finish_ms - res.arrival_ms
    assert res.status.tolist() == [OK] * 7
    t1 = l1
    t2 = t1 + l4  # four at t=0 waited for the first batch
    t3 = t2 + l1  # the 1 ms arrival: alone in the next batch
    want = [t1, t2, t2, t2, t2, t3 - 1.0, l1]
    np.testing.assert_allclose(lat, want, rtol=0, atol=1e-9)
    assert res.batches == 4
    # a batch of 3 pads to the bucket of 4; of 2 runs as 2
    by_n = sim.parts[0].lat[0]
    assert by_n[3] == by_n[4] == pytest.approx(l4)
    assert by_n[2] == pytest.approx(l2)


def test_host_costs_hand_computable(problem: Problem) -> None:
    """The same arrivals as above with host costs: queued 0.5 ms after arrival, a batch of n
    holds the worker 0.2 + n x (0.1 + 0.05 x MB) ms beyond its GPU latency, answers arrive
    0.3 ms after the batch."""
    lm = problem.latency[("H100-80GB", "resnet50")]
    l1, l4 = lm.latency_ms(1, 132), lm.latency_ms(4, 132)
    host = HostCosts(
        request_ms=0.25,
        request_ms_per_mb=0.25 / 0.602112,
        batch_ms=0.2,
        sample_ms=0.1,
        sample_ms_per_mb=0.05,
        reply_ms=0.3,
    )
    mb = 3 * 224 * 224 * 4 / 1e6
    assert host.mb("resnet50") == pytest.approx(mb) and host.mb("bert_base") == 0.001024
    assert host.request_delay_ms("resnet50") == pytest.approx(0.5)
    d1 = l1 + 0.2 + 1 * (0.1 + 0.05 * mb)
    d4 = l4 + 0.2 + 4 * (0.1 + 0.05 * mb)
    arr = np.array([0, 0, 0, 0, 0, 0.001, 0.2])
    opts = SimOptions(duration_s=1, noise="off", admission=False, host=host)
    res = Simulator(problem, one_model_plan(4), {"resnet50": arr}, opts).run()
    lat = res.finish_ms - res.arrival_ms
    t1 = 0.5 + d1
    t2 = t1 + d4
    t3 = t2 + d1  # the 1 ms arrival (queued at 1.5 ms, during the batch of 4) runs alone
    want = [t1 + 0.3, *[t2 + 0.3] * 4, t3 + 0.3 - 1.0, 0.5 + d1 + 0.3]
    np.testing.assert_allclose(lat, want, rtol=0, atol=1e-9)
    # disabled: no cost at all, whatever the fields say
    off = host.model_copy(update={"enabled": False})
    assert off.request_delay_ms("x") == off.batch_extra_ms("x", 4) == off.reply_delay_ms() == 0
    # admission sees the host time too: a request is dropped when arrival + SLO is before the
    # batch start + the measured (GPU + host) batch time
    arr = np.zeros(40)
    res_on, res_off = (
        Simulator(
            problem,
            one_model_plan(1),
            {"resnet50": arr},
            SimOptions(duration_s=1, noise="off", host=h),
        ).run()
        for h in (host, off)
    )
    assert (res_on.status == OK).sum() < (res_off.status == OK).sum()


def test_deadline_and_no_worker_drops(problem: Problem) -> None:
    # 200 requests at once, batch 1, SLO 50 ms: the queue cannot drain in time
    arr = {"resnet50": np.zeros(200), "bert_base": np.array([0.5])}
    res = Simulator(problem, one_model_plan(1), arr, SimOptions(duration_s=1, noise="off")).run()
    st = res.status
    assert (st == NO_WORKER).sum() == 1  # bert_base has no partition
    assert (st == DEADLINE).sum() > 0 and (st == OK).sum() > 0
    ok = st == OK
    lat = res.finish_ms - res.arrival_ms
    # admission drops what would miss; as in the worker, a take refused on the prediction alone
    # shrinks the estimate (ADMISSION_DECAY, so that a model is never locked out): a completed
    # request misses its SLO by less than one batch (here ~1.5 ms), and only a few do
    dur = float(np.diff(np.sort(res.finish_ms[ok])).max())
    assert np.all(lat[ok] <= 50.0 + dur + 1e-9)
    assert (lat[ok] > 50.0 + 1e-9).sum() <= 0.1 * ok.sum()


def test_conservation_and_littles_law(problem: Problem) -> None:
    rates = {"resnet50": 400.0, "bert_base": 100.0}
    arr = generate(WorkloadSpec(name="p"), rates, 10.0, seed=3)
    res, met = simulate(problem, get_policy("stgs"), arr, rates, SimOptions(duration_s=10))
    n = sum(a.size for a in arr.values())
    assert res.arrival_ms.size == n == res.status.size
    done = res.status == OK
    dropped = res.status != OK
    assert int(done.sum() + dropped.sum()) == n  # every request exactly once
    assert np.all(np.isfinite(res.finish_ms)) and np.all(res.finish_ms >= res.arrival_ms)
    s = met.summary
    assert s["completed"] + s["dropped"] == s["requests"] == n
    # Little's law: mean number in system = arrival rate x mean time in system
    t_end = float(res.finish_ms.max())
    grid = np.linspace(0.0, t_end, 20001)
    in_sys = np.searchsorted(np.sort(res.arrival_ms), grid, "right") - np.searchsorted(
        np.sort(res.finish_ms), grid, "right"
    )
    lhs = float(np.mean(in_sys))
    rhs = n / t_end * float(np.mean(res.finish_ms - res.arrival_ms))
    assert lhs == pytest.approx(rhs, rel=0.02)


def test_same_seed_bit_identical(problem: Problem) -> None:
    rates = {"resnet50": 600.0, "bert_base": 150.0}
    opts = SimOptions(duration_s=5, noise=0.05)
    out = []
    for _ in range(2):
        arr = generate(WorkloadSpec(name="b", kind="gamma", cv=3), rates, 5.0, seed=7)
        res, met = simulate(problem, get_policy("stgs"), arr, rates, opts, seed=7)
        out.append((res, met))
    (a, ma), (b, mb) = out
    assert a.finish_ms.tobytes() == b.finish_ms.tobytes()
    assert a.status.tobytes() == b.status.tobytes()
    assert ma.summary == mb.summary
    arr2 = generate(WorkloadSpec(name="b", kind="gamma", cv=3), rates, 5.0, seed=8)
    res2, _ = simulate(problem, get_policy("stgs"), arr2, rates, opts, seed=8)
    assert res2.finish_ms.size != a.finish_ms.size or not np.array_equal(
        res2.finish_ms, a.finish_ms
    )


def test_model_order_does_not_change_arrivals() -> None:
    a = generate(WorkloadSpec(name="p"), {"x": 50.0, "y": 80.0}, 3.0, seed=1)
    b = generate(WorkloadSpec(name="p"), {"y": 80.0, "x": 50.0}, 3.0, seed=1)
    assert a["x"].tobytes() == b["x"].tobytes() and a["y"].tobytes() == b["y"].tobytes()


def test_attainment_below_and_past_peak(problem: Problem) -> None:
    base = {"resnet50": 400.0, "bert_base": 100.0}
    plan_rates = {m: r * 2 for m, r in base.items()}  # planned for 2x
    pol = get_policy("stgs")
    prob = problem.with_models([m.scaled(2) for m in problem.models])
    plan = pol.plan(prob)
    assert plan.feasible
    low = generate(WorkloadSpec(name="p"), plan_rates, 10.0, seed=0)
    _, m_low = simulate(problem, pol, low, plan_rates, SimOptions(duration_s=10), plan=plan)
    assert m_low.summary["slo_attainment"] > 0.99
    # the same plan at 12x its rates: far past what it was made for
    over = {m: r * 12 for m, r in plan_rates.items()}
    high = generate(WorkloadSpec(name="p"), over, 5.0, seed=0)
    _, m_hi = simulate(problem, pol, high, plan_rates, SimOptions(duration_s=5), plan=plan)
    assert m_hi.summary["slo_attainment"] < 0.7
    assert m_hi.summary["dropped"] > 0


@pytest.mark.parametrize(
    "spec",
    [
        WorkloadSpec(name="p", kind="poisson"),
        WorkloadSpec(name="g", kind="gamma", cv=3),
        WorkloadSpec(name="m", kind="mmpp", burst_factor=4, burst_s=0.5, calm_s=2),
        WorkloadSpec(name="d", kind="diurnal", period_s=20, amplitude=0.5),
    ],
)
def test_workload_mean_rates(spec: WorkloadSpec) -> None:
    arr = generate(spec, {"a": 2000.0}, 40.0, seed=11)["a"]
    assert np.all(np.diff(arr) >= 0) and arr.min() >= 0 and arr.max() < 40.0
    tol = 0.02 if spec.kind in ("poisson", "diurnal") else 0.12
    assert arr.size / 40.0 == pytest.approx(2000.0, rel=tol)


def test_gamma_cv_and_step_rates() -> None:
    arr = generate(WorkloadSpec(name="g", kind="gamma", cv=2.5), {"a": 1000.0}, 50.0, seed=2)["a"]
    gaps = np.diff(arr)
    assert float(np.std(gaps) / np.mean(gaps)) == pytest.approx(2.5, rel=0.1)
    st = generate(WorkloadSpec(name="s", kind="step", at_s=5, factor=3), {"a": 500.0}, 10, 0)["a"]
    assert (st < 5).sum() / 5 == pytest.approx(500, rel=0.06)
    assert (st >= 5).sum() / 5 == pytest.approx(1500, rel=0.06)


def test_trace_replay(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("time_s,model\n0.5,a\n0.1,a\n2.0,b\n9.0,a\n")
    out = generate(WorkloadSpec(name="t", kind="trace", path=str(p)), {"a": 0, "b": 0}, 5.0, 0)
    assert out["a"].tolist() == [0.1, 0.5] and out["b"].tolist() == [2.0]
    fast = generate(
        WorkloadSpec(name="t", kind="trace", path=str(p)), {"a": 0, "b": 0}, 5.0, 0, load=2
    )
    assert fast["a"].tolist() == [0.05, 0.25, 4.5]


def test_noise_fitted_from_p99(tmp_path: Path) -> None:
    p = tmp_path / "prof.csv"
    p.write_text(
        "gpu,model,partition,sm_count,batch,latency_ms,memory_mib,p99_ms\n"
        "H100-80GB,m,full,132,1,1.0,10,1.1\nH100-80GB,m,full,132,2,2.0,10,2.2\n"
    )
    nm = fit_noise(p, 0.01)
    assert nm.sigma("H100-80GB", "m") == pytest.approx(math.log(1.1) / 2.3263478740408408)
    assert nm.sigma("H100-80GB", "other") == 0.01
    assert NoiseModel(default=0.0).sigma("x", "y") == 0.0


def test_controller_replans_with_reconfiguration_cost(problem: Problem) -> None:
    base = {"resnet50": 300.0, "bert_base": 50.0}
    arr = generate(WorkloadSpec(name="s", kind="step", at_s=3, factor=4), base, 20.0, seed=0)
    opts = SimOptions(
        duration_s=20,
        controller=ControllerOptions(enabled=True, interval_s=0.5, rate_halflife_s=1, hold_s=2),
    )
    res, met = simulate(problem, get_policy("mps-only"), arr, base, opts)
    assert res.replans >= 1
    assert len(res.plans) >= 2
    for r in res.reconfigurations:
        assert r.start_s < r.ready_s <= r.done_s
        assert r.ready_s - r.start_s >= opts.reconfig.worker_start_s
    s = met.summary
    assert s["completed"] + s["dropped"] == s["requests"]
    # the controller made a plan for the new rates: the last plan serves more
    assert res.plans[-1][1].served_rate("resnet50") > res.plans[0][1].served_rate("resnet50")


def test_metrics_time_series_shape(problem: Problem) -> None:
    rates = {"resnet50": 100.0, "bert_base": 20.0}
    arr = generate(WorkloadSpec(name="p"), rates, 4.0, seed=0)
    res, _ = simulate(problem, get_policy("temporal"), arr, rates, SimOptions(duration_s=4))
    met = compute_metrics(res, window_s=0.5)
    assert len(met.timeseries["t_s"]) == 8
    assert set(met.per_model) == {"resnet50", "bert_base"}


def _two_mps_plan() -> Plan:
    a = Partition("mps", 66, 40000.0, 10.0, (ModelAssignment("resnet50", 1, 400, 1),), mps_pct=50)
    b = Partition("mps", 66, 40000.0, 10.0, (ModelAssignment("bert_base", 1, 100, 1),), mps_pct=50)
    return Plan("two", True, (GpuPlan(0, "H100-80GB", False, (a, b)),))


@pytest.mark.parametrize("mode", ["busy", "static"])
def test_interference_busy_vs_static(problem: Problem, mode: str) -> None:
    """``busy``: a batch is slowed by gamma x the shares of the MPS neighbours running when it
    starts; alone it runs at the profile's latency. ``static``: always by every neighbour."""
    lm = problem.latency[("H100-80GB", "resnet50")]
    solo = float(lm.latency_curve(np.asarray([1.0]), 66, kind="mps")[0])
    slow = problem.interference.slowdown("resnet50", "H100-80GB", 50)
    assert slow > 1.01
    off = HostCosts(enabled=False)
    opts = SimOptions(duration_s=1, noise="off", admission=False, host=off, interference=mode)
    # resnet50 alone at 0 s; at 0.5 s bert_base starts first (t=0.5), resnet50 1 us later
    arr = {"resnet50": np.array([0.0, 0.500001]), "bert_base": np.array([0.5])}
    res = Simulator(problem, _two_mps_plan(), arr, opts).run()
    lat = res.finish_ms - res.arrival_ms
    r = np.flatnonzero(res.model == 0)
    if mode == "busy":
        assert lat[r[0]] == pytest.approx(solo)  # nobody else was running
        assert lat[r[1]] == pytest.approx(solo * slow)  # bert_base's batch was
    else:
        assert lat[r[0]] == pytest.approx(solo * slow)
        assert lat[r[1]] == pytest.approx(solo * slow)


def test_deadlines_given_and_source_index(problem: Problem) -> None:
    """Replays pass each request's own deadline (one already past is dropped, whatever the
    SLO), and every result maps back to its position in the input."""
    arr = np.array([0.3, 0.1, 0.2])  # unsorted on purpose
    dl = np.array([0.3 + 0.05, 0.1 - 0.001, 0.2 + 0.05])  # the second expired on arrival
    opts = SimOptions(duration_s=1, noise="off", host=HostCosts(enabled=False))
    res = Simulator(
        problem, one_model_plan(4), {"resnet50": arr}, opts, deadlines={"resnet50": dl}
    ).run()
    np.testing.assert_allclose(res.arrival_ms, arr[res.source_index] * 1000.0)
    assert sorted(res.source_index.tolist()) == [0, 1, 2]
    st = dict(zip(res.source_index.tolist(), res.status.tolist(), strict=True))
    assert st == {0: OK, 1: DEADLINE, 2: OK}
    with pytest.raises(Exception, match="deadlines"):
        Simulator(problem, one_model_plan(4), {"resnet50": arr}, opts, deadlines={}).run()


def _mig_part(model: str, rate: float, start: int, batch: int = 8) -> Partition:
    return Partition(
        "mig",
        16,
        9728.0,
        10.0,
        (ModelAssignment(model, batch, rate, 1),),
        mig_profile="1g.10gb",
        mig_start=start,
    )


def test_replan_to_the_idle_gpu_makes_before_break(problem: Problem) -> None:
    """The compare-zoo defect (docs/simulator.md): a re-plan that moves every partition from
    MIG GPU 0 to the idle GPU 1 leaves GPU 0 empty with ``mig`` off (as ``align_gpus`` does).
    Nothing new needs GPU 0, so its old partitions must keep serving until the new ones are
    ready: no request may find no worker, and nothing is stopped before its replacement."""
    old = Plan(
        "old",
        True,
        (
            GpuPlan(
                0, "H100-80GB", True, (_mig_part("resnet50", 150, 0), _mig_part("bert_base", 40, 1))
            ),
            GpuPlan(1, "H100-80GB", False),
        ),
    )
    new = Plan(
        "new",
        True,
        (
            GpuPlan(0, "H100-80GB", False),
            GpuPlan(
                1,
                "H100-80GB",
                True,
                (_mig_part("resnet50", 250, 0, 16), _mig_part("bert_base", 60, 1)),
            ),
        ),
    )
    base = {"resnet50": 100.0, "bert_base": 25.0}
    arr = generate(WorkloadSpec(name="s", kind="step", at_s=1, factor=1.5), base, 12.0, seed=0)
    opts = SimOptions(
        duration_s=12,
        controller=ControllerOptions(enabled=True, interval_s=0.5, rate_halflife_s=0.25, hold_s=1),
    )
    sim = Simulator(problem, old, arr, opts, replan=lambda _r, _cur: new, planned_rates=base)
    res = sim.run()
    assert res.replans >= 1 and len(res.reconfigurations) == 1  # later re-plans: no change
    r = res.reconfigurations[0]
    assert r.break_first == 0
    assert r.partitions_started == 2 and r.partitions_stopped == 2
    assert r.ready_s - r.start_s >= opts.reconfig.worker_start_s
    assert int((res.status == NO_WORKER).sum()) == 0
    during = (res.arrival_ms >= r.start_s * 1000) & (res.arrival_ms < r.ready_s * 1000)
    assert during.sum() > 100 and (res.status[during] == OK).mean() > 0.95  # the old ones serve
    assert res.plans[-1][1] is new
    # a GPU that serves before and after a MIG mode change still breaks first
    # (it serves both models: the daemon's Service.replan, and the simulator, refuse a plan
    # that drops one)
    whole = Partition(
        "full",
        132,
        81559.0,
        10.0,
        (ModelAssignment("resnet50", 8, 400, 1), ModelAssignment("bert_base", 8, 60, 1)),
    )
    back = Plan(
        "whole", True, (GpuPlan(0, "H100-80GB", False), GpuPlan(1, "H100-80GB", False, (whole,)))
    )
    sim2 = Simulator(problem, new, arr, opts, replan=lambda _r, _cur: back, planned_rates=base)
    res2 = sim2.run()
    assert res2.reconfigurations[0].break_first == 2
    assert int(((res2.status == NO_WORKER) & (res2.model == 0)).sum()) > 0  # resnet50 waited


def test_overrun_slows_only_the_named_model(problem: Problem) -> None:
    """simulator.overrun: the named model's batches run that much longer than its profile
    says (the planner does not know); other models and bad keys as stated."""
    arr = {"resnet50": np.array([0.0]), "bert_base": np.array([0.0])}
    plan = get_policy("stgs").plan(problem)
    opts = {"duration_s": 1, "noise": "off", "admission": False, "host": HostCosts(enabled=False)}
    base = Simulator(problem, plan, arr, SimOptions(**opts)).run()
    slow = Simulator(problem, plan, arr, SimOptions(**opts, overrun={"resnet50": 1.3})).run()
    lat0, lat1 = base.finish_ms - base.arrival_ms, slow.finish_ms - slow.arrival_ms
    names = [base.models[i] for i in base.model]
    for name, a, b in zip(names, lat0, lat1, strict=True):
        assert b == pytest.approx(a * (1.3 if name == "resnet50" else 1.0), rel=1e-9)
    with pytest.raises(ValueError, match="overrun"):
        SimOptions(overrun={"resnet50": 0.0})
    with pytest.raises(ConfigError, match="not in the problem"):
        Simulator(problem, plan, arr, SimOptions(**opts, overrun={"vgg16": 1.2}))
