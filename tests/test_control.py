"""One rule set for re-planning (partitioner/control.py): the daemon's controller and the
simulator's make the same decisions, at the same times, with the same rates, on one trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.config import ControllerConfig, DaemonConfig
from api.controller import Controller
from api.daemon import build
from api.service import ConflictError
from partitioner.control import ControlLoop, ControlRules, Counts
from partitioner.policies import Policy, get_policy
from partitioner.problem import Problem
from partitioner.sim import ControllerOptions, SimOptions, Simulator
from partitioner.sim.compare import load_experiment
from partitioner.sim.run import simulate
from stgs.catalog import get_sku
from stgs.errors import ConfigError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.profiles import ProfileRow
from stgs.registry import ModelEntry
from stgs.scenario import scenario_from_mapping

RULES = {"interval_s": 1.0, "rate_halflife_s": 2.0, "hysteresis": 0.2, "hold_s": 5.0}
# req/s of resnet50 from each time (s) on: a step up at 20 s, a step down at 40 s
STEPS = ((0.0, 100.0), (20.0, 200.0), (40.0, 50.0))
DURATION_S = 70.0


def _arrivals() -> np.ndarray:
    bounds = [t for t, _ in STEPS[1:]] + [DURATION_S]
    parts = [
        t0 + np.arange(0.0, t1 - t0, 1.0 / r) for (t0, r), t1 in zip(STEPS, bounds, strict=True)
    ]
    return np.concatenate(parts)


def _problem(slo_ms: float) -> Problem:
    sc = {
        "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
        "models": [{"name": "resnet50", "slo_ms": slo_ms, "rate_rps": 100}],
    }
    return Problem.from_scenario(scenario_from_mapping(sc))


def _plan(rate: float) -> Plan:
    """A whole H100 for resnet50 (room for 400 req/s) assigned ``rate``: a re-plan only
    re-weights it (same partition key), so the simulator's plan changes take no time."""
    part = Partition("full", 132, 81559.0, 10.0, (ModelAssignment("resnet50", 8, rate, 1),))
    return Plan("hand", True, (GpuPlan(0, "H100-80GB", False, (part,)),))


def _simulator_decisions(slo_ms: float) -> list[tuple[float, float]]:
    calls: list[float] = []

    def replan(rates: Any, _cur: Plan) -> Plan:
        calls.append(float(rates["resnet50"]))
        return _plan(float(rates["resnet50"]))

    opts = SimOptions(
        duration_s=DURATION_S,
        noise="off",
        controller=ControllerOptions(enabled=True, **RULES),
    )
    sim = Simulator(_problem(slo_ms), _plan(100.0), {"resnet50": _arrivals()}, opts, replan=replan)
    res = sim.run()
    assert res.replans == len(calls) and len(res.plans) == 1 + len(calls)
    return [(t, r) for (t, _), r in zip(res.plans[1:], calls, strict=True)]


class _FakePlanner:
    def __init__(self) -> None:
        self.rates = {"resnet50": 100.0}
        self.calls: list[dict[str, float]] = []

    def planned_rates(self) -> dict[str, float]:
        return dict(self.rates)

    def replan(self, rates: dict[str, float], *, reason: str, clip: bool = False) -> None:
        self.calls.append(dict(rates))
        self.rates = dict(rates)

    def log_event(self, kind: str, message: str, **data: Any) -> None:
        raise AssertionError(message)


def _daemon_decisions(slo_met: bool) -> list[tuple[float, float]]:
    """The daemon's controller on a virtual clock: each interval the requests of the trace
    that arrived in it, answered (within SLO or not) before the next step."""
    t = [0.0]
    fp = _FakePlanner()
    ctl = Controller(fp, ControllerConfig(**RULES), clock=lambda: t[0])
    ctl.step()  # started before the load
    arr = _arrivals()
    out = []
    for k in range(1, int(DURATION_S / RULES["interval_s"])):
        t[0] = k * RULES["interval_s"]
        n = int(((arr >= t[0] - RULES["interval_s"]) & (arr < t[0])).sum())
        ctl.meter.arrived("resnet50", n)
        ctl.meter.finished("resnet50", n, slo_met)
        if ctl.step():
            out.append((t[0], fp.calls[-1]["resnet50"]))
    assert ctl.errors == 0
    return out


def test_daemon_and_simulator_decide_alike_on_load_steps() -> None:
    """100 -> 200 -> 50 req/s, everything within SLO: the same re-plans, at the same times,
    for the same rates (the simulator counts a request when it is answered, a few ms after
    it arrives: rates agree to a request or two per interval)."""
    daemon = _daemon_decisions(slo_met=True)
    sim = _simulator_decisions(slo_ms=50.0)
    assert len(daemon) == len(sim) == 3
    for (td, rd), (ts, rs) in zip(daemon, sim, strict=True):
        assert abs(td - ts) <= RULES["interval_s"]
        assert rs == pytest.approx(rd, rel=0.02)
    (t1, r1), (t2, r2), (t3, r3) = daemon
    assert 25.0 <= t1 <= 27.0 and 180 < r1 < 200  # out of band at ~21 s, held 5 s
    assert 45.0 <= t2 <= 47.0 and 50 < r2 < 80  # the step down
    assert t3 > t2 + RULES["hold_s"] and 50 <= r3 < r2  # the EWMA settling at 50


def test_daemon_and_simulator_act_alike_on_slo_misses() -> None:
    """Rates in band but every request late (a 1 ms SLO in the simulator): both ask for
    planned x (1 + hysteresis) once hold_s has passed, then again on the new plan."""
    daemon = _daemon_decisions(slo_met=False)
    sim = _simulator_decisions(slo_ms=1.0)
    assert daemon[0][0] == 6.0 and daemon[0][1] == pytest.approx(120.0)  # out at 1 s, held 5
    assert len(sim) == len(daemon)
    for (td, rd), (ts, rs) in zip(daemon, sim, strict=True):
        assert abs(td - ts) <= RULES["interval_s"]
        assert rs == pytest.approx(rd, rel=0.02)


def _fake_profiler(model: ModelEntry, sku: str) -> list[ProfileRow]:
    sms = get_sku(sku).sm_count
    return [ProfileRow(sku, model.name, "full", sms, b, 0.5 + 0.05 * b, 10.0) for b in (1, 2, 4, 8)]


def test_daemon_and_simulator_refuse_a_plan_that_drops_a_model_and_back_off_alike(
    tmp_path: Path,
) -> None:
    """Every request late and a policy whose plan serves none of the model: the daemon's
    service refuses it (409, the plan in force stays), the simulator does not apply it, and
    both controllers back off alike: the same number of re-plans, all refused."""
    empty = Plan("hand", True, (GpuPlan(0, "H100-80GB", False),))
    # the simulator: its controller's re-plans, each answered with the dropping plan
    calls: list[float] = []

    def replan(rates: Any, _cur: Plan) -> Plan:
        calls.append(float(rates["resnet50"]))
        return empty

    opts = SimOptions(
        duration_s=DURATION_S, noise="off", controller=ControllerOptions(enabled=True, **RULES)
    )
    sim = Simulator(_problem(1.0), _plan(100.0), {"resnet50": _arrivals()}, opts, replan=replan)
    res = sim.run()
    assert res.replans == res.info["replans_refused"] == len(calls) and len(res.plans) == 1
    # the daemon: the real service (one model served at 100 req/s) and controller, whose
    # policy makes the same plan
    cfg = DaemonConfig.model_validate({"backend": {"kind": "simulated"}}).resolved(tmp_path)
    d = build(cfg, background=False)
    try:
        svc = d.service
        svc.profiler = _fake_profiler
        svc.restore()
        svc.register({"name": "echo", "slo_ms": 100, "rate_rps": 100, "source": "builtin:echo"})
        served = svc.current_plan()
        assert served is not None and svc.planned_rates() == {"echo": 100.0}
        svc.planning.plan = lambda *_a, **_k: empty  # type: ignore[method-assign]
        with pytest.raises(ConflictError, match="would serve none of echo"):
            svc.replan({"echo": 120.0}, reason="test")
        assert svc.current_plan() is served
        t = [0.0]
        ctl = Controller(svc, ControllerConfig(**RULES), clock=lambda: t[0])
        ctl.step()  # started before the load
        arr = _arrivals()
        for k in range(1, int(DURATION_S / RULES["interval_s"])):
            t[0] = k * RULES["interval_s"]
            n = int(((arr >= t[0] - RULES["interval_s"]) & (arr < t[0])).sum())
            ctl.meter.arrived("echo", n)
            ctl.meter.finished("echo", n, False)
            assert ctl.step() is False
        assert ctl.errors == ctl.rules.failures == res.replans >= 2
        assert "would serve none of echo" in (ctl.last_error or "")
        assert svc.current_plan() is served
    finally:
        d.close()


def test_control_loop_is_pure_and_clock_injected() -> None:
    loop = ControlLoop(ControlRules(**RULES))
    planned = {"a": 100.0}
    assert loop.step(0.0, planned, {}).rates is None  # starts the clock
    decisions = []
    for k in range(1, 20):
        d = loop.step(float(k), planned, {"a": Counts(300, 300, 300)})
        if d.rates is not None:
            decisions.append((k, d.rates["a"], d.reason))
            planned = d.rates
    (k, rate, reason), *_ = decisions
    assert k == 6 and 250 < rate < 300 and reason.startswith("a: rate")


def test_retired_simulator_controller_keys_name_their_replacements(tmp_path: Path) -> None:
    for key, new in [
        ("ewma_alpha", "rate_halflife_s"),
        ("band", "hysteresis"),
        ("cooldown_s", "hold_s"),
        ("margin", "spare_factor"),
    ]:
        p = tmp_path / f"{key}.yaml"
        p.write_text(
            "name: x\nscenario:\n  gpus: [{sku: H100-80GB, count: 1}]\n"
            "  models: [{name: resnet50, slo_ms: 50, rate_rps: 100}]\n"
            "policies: [stgs]\nworkloads: [{name: p, kind: poisson}]\n"
            f"simulator: {{controller: {{{key}: 0.5}}}}\n"
        )
        with pytest.raises(ConfigError) as err:
            load_experiment(p)
        msg = str(err.value)
        assert "simulator.controller: the simulator's controller" in msg
        assert repr(key) in msg and new in msg
    # the daemon's defaults are the simulator's
    assert ControllerOptions().model_dump(exclude={"enabled"}) == ControlRules().model_dump()
    assert ControllerConfig().model_dump(exclude={"deadline_drop"}) == ControlRules().model_dump()


class _Recording(Policy):
    """A policy's plans, recording the rate of every re-plan (a plan with a current one)."""

    name = "recording"

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.rates: list[float] = []

    def plan(self, problem: Problem, current: Plan | None = None) -> Plan:
        if current is not None:
            self.rates.append(problem.models[0].rate_rps)
        return self.inner.plan(problem, current)


def test_fill_re_plans_as_spare_does_and_holds_its_plan() -> None:
    """The controller's rules are the policy's business only through the rates a plan serves:
    stgs-fill's first re-plan comes at the same time with the same rate as stgs-spare's (a
    rise out of the band around the *served* rate). Fill answers re-plans its room covers by
    holding its plan: no reconfiguration at all, and never more than 1.5x makes."""
    opts = SimOptions(
        duration_s=DURATION_S, noise="off", controller=ControllerOptions(enabled=True, **RULES)
    )
    runs = {}
    for name in ("stgs-spare", "stgs-fill"):
        pol = _Recording(get_policy(name))
        res, met = simulate(
            _problem(80.0), pol, {"resnet50": _arrivals()}, {"resnet50": 100.0}, opts
        )
        runs[name] = (res, met.summary, pol.rates)
    spare, fill = runs["stgs-spare"], runs["stgs-fill"]
    assert fill[0].plans[0][1].info["spare"] == "fill"
    assert fill[0].plans[0][1].info["spare_factor"] > 2  # room for the step to 200 req/s
    assert spare[2] and fill[2]  # both re-planned ...
    assert fill[2][0] == pytest.approx(spare[2][0])  # ... first with the same rate
    # at the same time: fill's held plan takes effect at once, 1.5x's at once too where it
    # only re-weights (the replan scores a worker restart: stgs.transition), else when its
    # transition (which started at the decision) is done
    reconf = spare[0].reconfigurations
    decided = min([spare[0].plans[1][0], *(r.start_s for r in reconf[:1])])
    assert fill[0].plans[1][0] == pytest.approx(decided)
    assert fill[1]["reconfigurations"] == 0 <= spare[1]["reconfigurations"]
    assert fill[1]["slo_attainment"] >= spare[1]["slo_attainment"]
