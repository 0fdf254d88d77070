"""Planner limits: rates beyond an upper bound of the node's capacity are refused before
planning, every plan runs within a time budget, and plans are made off the service lock.

The bound (``partitioner.fluid.rate_excess``) is checked against the planner itself: every
rate a policy plans is within it, on the shipped profiles and the example set. The HTTP
behaviour is checked against the real daemon (``stgs serve``, simulated node); the
controller's re-plans with the real service and controller on virtual time.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from api.config import ControllerConfig, DaemonConfig
from api.controller import Controller
from api.daemon import build
from api.launch import LocalDaemon, wait_until
from api.planproc import ChildCache, PlanJob, PlannerDiedError, PlannerPool, run_job
from partitioner.fluid import capacity_rps, clipped_to_bound, fluid_bound, rate_excess
from partitioner.planner import make_plan
from partitioner.problem import Problem, load_profile_table
from stgs.catalog import get_sku
from stgs.errors import BeyondCapacityError
from stgs.profiles import ProfileRow, ProfileTable, write_profiles
from stgs.scenario import Scenario, scenario_from_mapping

BOUND_SCENARIOS: dict[str, dict[str, Any]] = {
    "one H100, one model": {
        "gpus": [{"sku": "H100-80GB"}],
        "models": [{"name": "resnet50", "slo_ms": 50, "rate_rps": 1000}],
    },
    "H100 and two L4, four models": {
        "gpus": [{"sku": "H100-80GB"}, {"sku": "L4", "count": 2}],
        "models": [
            {"name": "resnet50", "slo_ms": 25, "rate_rps": 400},
            {"name": "mobilenet_v3_large", "slo_ms": 15, "rate_rps": 50},
            {"name": "bert_base", "slo_ms": 100, "rate_rps": 300},
            {"name": "vgg16", "slo_ms": 60, "rate_rps": 20},
        ],
    },
    "example set, A100 with MIG and an L4, spare fill": {
        "profiles": "example",
        "gpus": [{"sku": "A100-80GB", "count": 2}, {"sku": "L4"}],
        "models": [
            {"name": "resnet50", "slo_ms": 50, "rate_rps": 900},
            {"name": "bert_base", "slo_ms": 100, "rate_rps": 200},
            {"name": "efficientnet_b0", "slo_ms": 20, "rate_rps": 300},
        ],
        "planner": {"spare_factor": "fill"},
    },
}


def _scenario(spec: dict[str, Any]) -> Scenario:
    return scenario_from_mapping(spec)


def _scaled(sc: Scenario, k: float) -> tuple[Scenario, Problem]:
    scaled = sc.scaled(k)
    return scaled, Problem.from_scenario(scaled)


@pytest.mark.parametrize("name", list(BOUND_SCENARIOS))
@pytest.mark.parametrize("policy", ["stgs", "temporal"])
def test_every_planned_rate_is_within_the_bound(name: str, policy: str) -> None:
    """At load factors around the fluid bound (below, near, above it): no model is served above
    its capacity bound, and rate_excess refuses no rates the plan served in full."""
    sc = _scenario(BOUND_SCENARIOS[name])
    k_star = fluid_bound(Problem.from_scenario(sc))
    assert 0 < k_star < float("inf")
    for f in (0.5, 0.95, 1.5):
        scaled, prob = _scaled(sc, k_star * f)
        plan = make_plan(scaled, policy, problem=prob)
        for m in prob.models:
            assert plan.served_rate(m.name) <= capacity_rps(prob, m) * (1 + 1e-6), (f, m.name)
        excess = rate_excess(prob)
        if plan.feasible:
            assert excess is None, (f, excess)
        if f >= 1.5:  # well above the bound: refused, with the model, its rate and the bound
            assert excess is not None
            assert excess.model in {m.name for m in prob.models}
            assert excess.bound_rps < excess.rate_rps
            assert excess.model in excess.message and "fluid bound" in excess.message


def test_one_model_above_its_capacity_is_named() -> None:
    sc = _scenario(BOUND_SCENARIOS["H100 and two L4, four models"])
    prob = Problem.from_scenario(sc)
    bert = next(m for m in prob.models if m.name == "bert_base")
    cap = capacity_rps(prob, bert)
    assert cap > 0
    prob = prob.with_models(
        [bert.scaled(2 * cap / bert.rate_rps) if m is bert else m for m in prob.models]
    )
    excess = rate_excess(prob)
    assert excess is not None and excess.model == "bert_base" and excess.factor is None
    assert excess.bound_rps == pytest.approx(cap)
    assert f"{2 * cap:g}" in excess.message


def test_models_no_shape_serves_are_left_to_the_planner() -> None:
    """An SLO no shape meets: no bound to give, the planner's refusal names the cause."""
    sc = _scenario(
        {"gpus": [{"sku": "L4"}], "models": [{"name": "resnet50", "slo_ms": 0.01, "rate_rps": 5}]}
    )
    prob = Problem.from_scenario(sc)
    assert capacity_rps(prob, prob.models[0]) == 0
    assert rate_excess(prob) is None


def test_measured_overload_is_planned_at_the_bound() -> None:
    """The controller's re-plans (``clip``) plan rates above the bound at k* x the rates, in
    the same proportions; API calls (no clip) are refused."""
    sc = _scenario(BOUND_SCENARIOS["H100 and two L4, four models"])
    sc = sc.scaled(2 * fluid_bound(Problem.from_scenario(sc)))
    prob = Problem.from_scenario(sc)
    excess = rate_excess(prob)
    assert excess is not None
    clipped = clipped_to_bound(prob)
    assert rate_excess(clipped) is None
    k = clipped.models[0].rate_rps / prob.models[0].rate_rps
    assert 0 < k < 1
    for m, c in zip(prob.models, clipped.models, strict=True):
        assert c.rate_rps == pytest.approx(k * m.rate_rps)
    table = load_profile_table(None)
    job = PlanJob(sc, "stgs", None, table_key=1, table=table)
    with pytest.raises(BeyondCapacityError, match="fluid bound"):
        run_job(job, ChildCache())
    plan = run_job(replace(job, clip=True), ChildCache())
    for m, c in zip(prob.models, clipped.models, strict=True):
        assert plan.served_rate(m.name) <= c.rate_rps * (1 + 1e-6)


# ---------------------------------------------------------------------- through the daemon
# One real daemon (``stgs serve``) on a simulated node of 32 H100s, so that rates within the
# bound can still take the planner tens of seconds (the stgs policy at half the bound: ~20 s
# on one core); models ``echo`` and ``fail`` (CPU workers without torch), profiled by a CSV
# loaded at start. Each HTTP call has a timeout: on code without the limits they hang.
GPUS = 32
BUDGET_S = 3.0


def _profile_rows() -> list[ProfileRow]:
    sms = get_sku("H100-80GB").sm_count
    return [
        ProfileRow("H100-80GB", m, "full", sms, b, 0.5 + 0.05 * b, 10.0)
        for m in ("echo", "fail")
        for b in (1, 2, 4, 8)
    ]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    work = tmp_path_factory.mktemp("guard")
    write_profiles(_profile_rows(), work / "profiles.csv")
    d = LocalDaemon(
        work,
        '[backend]\nkind = "simulated"\n'
        f'simulated_gpus = [{{ sku = "H100-80GB", count = {GPUS} }}]\n'
        f'[planner]\nprofiles = "profiles.csv"\ntime_budget_s = {BUDGET_S}\n'
        "[controller]\ninterval_s = 600\n",
    )
    proc = d.start()
    try:
        with d.client(timeout_s=10.0) as c:
            wait_until("the daemon", lambda: c.get("/v1/status").status_code == 200, 60.0, proc)
            r = c.post("/v1/models", json={"name": "echo", "slo_ms": 100, "rate_rps": 50})
            assert r.status_code == 201, r.text
        yield d
    finally:
        d.stop()


def _bound_rps(prob_rows: list[ProfileRow], name: str) -> float:
    """The node's capacity bound for ``name`` alone, as the daemon computes it."""
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": GPUS}],
            "models": [{"name": name, "slo_ms": 100, "rate_rps": 1}],
        }
    )
    prob = Problem.from_scenario(sc, ProfileTable(prob_rows))
    return capacity_rps(prob, prob.models[0])


def test_rates_beyond_the_bound_are_refused_at_once(daemon: LocalDaemon) -> None:
    """preview, apply and registration at 1M request/s: 422 in well under a second, naming
    the model, the rate and the bound (unbounded, each planned for minutes)."""
    bound = _bound_rps(_profile_rows(), "echo")
    with daemon.client(timeout_s=10.0) as c:
        for path in ("/v1/plan/preview", "/v1/plan/apply"):
            t0 = time.perf_counter()
            r = c.post(path, json={"rates": {"echo": 1_000_000}})
            secs = time.perf_counter() - t0
            assert r.status_code == 422, r.text
            assert secs < 1.0, secs
            err = r.json()["error"]
            assert "echo" in err and "1e+06" in err and f"{bound:.6g}" in err, err
        t0 = time.perf_counter()
        r = c.post("/v1/models", json={"name": "fail", "slo_ms": 100, "rate_rps": 1_000_000})
        assert r.status_code == 422 and time.perf_counter() - t0 < 1.0, r.text
        m = c.get("/v1/models/fail").json()
        assert m["status"] == "refused" and "fluid bound" in m["detail"], m
        assert c.get("/v1/models/echo").json()["status"] == "ready"  # nothing else changed
        assert c.delete("/v1/models/fail").status_code == 200


def test_a_plan_over_the_time_budget_is_abandoned(daemon: LocalDaemon) -> None:
    """A preview within the bound that takes the planner ~20 s: 503 after the budget, and
    the daemon answers other calls meanwhile (planning is in another process)."""
    rate = 0.5 * _bound_rps(_profile_rows(), "echo")
    out: dict[str, Any] = {}
    with daemon.client(timeout_s=2 * BUDGET_S) as c:

        def preview() -> None:
            t0 = time.perf_counter()
            out["response"] = c.post("/v1/plan/preview", json={"rates": {"echo": rate}})
            out["secs"] = time.perf_counter() - t0

        t = threading.Thread(target=preview)
        t.start()
        slowest = 0.0
        while t.is_alive():
            t0 = time.perf_counter()
            assert c.get("/v1/status").status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.1)
        t.join()
        r = out["response"]
        assert r.status_code == 503, r.text
        assert "planner.time_budget_s" in r.json()["error"]
        assert BUDGET_S <= out["secs"] < BUDGET_S + 2.0, out["secs"]
        assert slowest < 0.5, slowest
        # the next plan works: a fresh planner process replaced the killed one
        r = c.post("/v1/plan/preview", json={"rates": {"echo": 60}})
        assert r.status_code == 200 and r.json()["plan"]["feasible"], r.text
        kinds = [e["kind"] for e in c.get("/v1/events", params={"kind": "plan_timeout"}).json()]
        assert kinds == ["plan_timeout"]


def test_delete_does_not_wait_for_a_slow_registration(daemon: LocalDaemon) -> None:
    """A registration that plans past the budget (rates within the bound), and a DELETE of
    another model meanwhile: the DELETE answers in well under a second (it needs the lock,
    the registration's plan does not hold it); the registration fails with 503."""
    rate = 0.5 * _bound_rps(_profile_rows(), "fail")
    out: dict[str, Any] = {}
    with daemon.client(timeout_s=2 * BUDGET_S) as c:

        def register() -> None:
            out["response"] = c.post(
                "/v1/models", json={"name": "fail", "slo_ms": 100, "rate_rps": rate}
            )

        t = threading.Thread(target=register)
        t.start()
        wait_until(
            "the registration",
            lambda: c.get("/v1/models/fail").status_code == 200,
            5.0,
            daemon.procs[-1],
        )
        t0 = time.perf_counter()
        r = c.delete("/v1/models/echo")
        secs = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        assert secs < 0.5, secs
        assert t.is_alive()  # still planning
        t.join()
        r = out["response"]
        assert r.status_code == 503 and "planner.time_budget_s" in r.json()["error"], r.text
        assert c.get("/v1/models/fail").json()["status"] == "failed"
        assert c.get("/v1/models/echo").status_code == 404


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_controller_replan_over_the_budget_is_logged_and_retried(tmp_path: Path) -> None:
    """The real service and controller (in process, virtual time): a measured load within
    the bound whose plan outlives the budget fails the pass (logged, an event, a back-off),
    the loop goes on, and the re-plan is tried again once the back-off has passed."""
    write_profiles(_profile_rows(), tmp_path / "profiles.csv")
    cfg = DaemonConfig.model_validate(
        {
            "backend": {
                "kind": "simulated",
                "simulated_gpus": [{"sku": "H100-80GB", "count": GPUS}],
            },
            "planner": {"profiles": "profiles.csv", "time_budget_s": 30.0},
        }
    ).resolved(tmp_path)
    d = build(cfg, background=False)
    try:
        d.service.restore()
        spec = {"name": "echo", "slo_ms": 100, "rate_rps": 50, "source": "builtin:echo"}
        d.service.register(spec)  # within a generous budget: a loaded machine starts slowly
        d.service.cfg = cfg.model_copy(
            update={"planner": cfg.planner.model_copy(update={"time_budget_s": 1.0})}
        )
        clock = _Clock()
        rules = ControllerConfig(interval_s=1.0, rate_halflife_s=0.5, hysteresis=0.2, hold_s=1.0)
        ctl = Controller(d.service, rules, clock=clock)
        rate = int(0.5 * _bound_rps(_profile_rows(), "echo"))
        tries: list[float] = []
        for _ in range(40):
            ctl.meter.arrived("echo", rate)
            ctl.meter.finished("echo", rate, True)
            clock.t += 1.0
            assert ctl.step() is False
            if ctl.errors > len(tries):
                tries.append(clock.t)
            if len(tries) == 2:
                break
        assert len(tries) == 2, ctl.status()
        assert ctl.last_error is not None and "planner.time_budget_s" in ctl.last_error
        assert tries[1] - tries[0] >= 2 * rules.hold_s  # the back-off
        events = [e.kind for e in d.store.events(limit=20)]
        assert events.count("plan_timeout") == 2 and events.count("controller_error") == 2
        assert d.service.planned_rates() == {"echo": 50}  # the plan in force stayed
    finally:
        d.close()


def test_a_planner_process_that_dies_fails_its_call_only() -> None:
    """A planner process killed mid-plan (as the OOM killer would): that call gets
    PlannerDiedError (503 in the daemon) at once, the next call a fresh process."""
    table = ProfileTable(_profile_rows())
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": GPUS}],
            "models": [
                {
                    "name": "echo",
                    "slo_ms": 100,
                    "rate_rps": 0.5 * _bound_rps(_profile_rows(), "echo"),
                }
            ],
        }
    )
    pool = PlannerPool()
    try:
        pool.start()
        pid = pool._idle[0].proc.pid
        assert pid is not None
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.perf_counter()
        with pytest.raises(PlannerDiedError, match="died"):
            pool.plan(PlanJob(sc, "stgs", None, table_key=1), table, 30.0)
        assert time.perf_counter() - t0 < 5.0
        small = replace(sc, models=(replace(sc.models[0], rate_rps=50.0),))
        assert pool.plan(PlanJob(small, "stgs", None, table_key=1), table, 30.0).feasible
    finally:
        pool.close()


def test_a_concurrent_admission_never_drops_a_model_just_admitted(tmp_path: Path) -> None:
    """Two registrations at once (a repository's models at start): the second one's plan is
    made right after the first was applied, while the first was still finishing its admission.
    It must keep the first model (it once planned without it and applied that, leaving the first
    model "not in the current plan" for good)."""
    write_profiles(_profile_rows(), tmp_path / "profiles.csv")
    cfg = DaemonConfig.model_validate(
        {
            "backend": {"kind": "simulated", "simulated_gpus": [{"sku": "H100-80GB"}]},
            "planner": {"profiles": "profiles.csv"},
        }
    ).resolved(tmp_path)
    d = build(cfg, background=False)
    svc = d.service
    first_applied = threading.Event()
    real = svc.planning.optimistic

    def optimistic(decide: Any, commit: Any) -> Any:
        out = real(decide, commit)
        if threading.current_thread().name == "first":
            first_applied.set()
            time.sleep(0.5)  # the window before its admission is wound up
        return out

    svc.planning.optimistic = optimistic  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def register(name: str, after: threading.Event | None) -> None:
        try:
            if after is not None:
                assert after.wait(60)
            svc.register({"name": name, "slo_ms": 100, "rate_rps": 50, "source": f"builtin:{name}"})
        except BaseException as exc:
            errors.append(exc)

    try:
        svc.restore()
        a = threading.Thread(target=register, args=("echo", None), name="first")
        b = threading.Thread(target=register, args=("fail", first_applied), name="second")
        a.start()
        b.start()
        a.join(60)
        b.join(60)
        assert not errors, errors
        status = {r.name: r.status for r in d.store.models()}
        assert status == {"echo": "ready", "fail": "ready"}, status
        plan = svc.runtime.current_plan
        assert plan is not None and plan.served_rate("echo") > 0 and plan.served_rate("fail") > 0
    finally:
        d.close()
