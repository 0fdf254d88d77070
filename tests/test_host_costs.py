"""The planner's host-cost terms (PlannerOptions.host_*_ms): in the plans, and in the checker."""

from __future__ import annotations

from typing import Any

from plan_checker import build_models, check_plan

from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from stgs.scenario import scenario_from_mapping

ZERO = {"host_request_ms": 0.0, "host_batch_ms": 0.0, "host_item_ms": 0.0}


def _scenario(**planner: Any) -> Any:
    return scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
            "models": [
                {"name": "efficientnet_b0", "slo_ms": 10, "rate_rps": 600},
                {"name": "mobilenet_v3_large", "slo_ms": 10, "rate_rps": 600},
                {"name": "resnet50", "slo_ms": 15, "rate_rps": 600},
            ],
            "planner": planner,
        }
    )


def _check(plan: Any, sc: Any) -> list[str]:
    return check_plan(plan, sc, *build_models(sc))


def _plan(sc: Any) -> Any:
    return get_policy("stgs").plan(Problem.from_scenario(sc))


def test_defaults_are_the_measured_host_costs() -> None:
    o = _scenario().options
    assert (o.host_request_ms, o.host_batch_ms, o.host_item_ms) == (0.6, 0.25, 0.07)


def test_a_plan_without_host_costs_breaks_the_rules_with_them() -> None:
    lean = _plan(_scenario(**ZERO))
    assert _check(lean, _scenario(**ZERO)) == []
    # the same plan, judged with the host time a request really pays: some SLO is broken
    errors = _check(lean, _scenario())
    assert any("host way" in e for e in errors), errors
    # planned with host costs it is valid with them
    sc = _scenario()
    assert _check(_plan(sc), sc) == []


def test_host_costs_enter_cycle_and_slo() -> None:
    sc = _scenario(host_request_ms=1.0, host_batch_ms=0.5, host_item_ms=0.1)
    prob = Problem.from_scenario(sc)
    zero = Problem.from_scenario(_scenario(**ZERO))
    gt = prob.gpu_types[0]
    shape = prob.shapes(gt)[0]
    m = prob.models[0]
    c, c0 = prob.curve(m, gt, shape), zero.curve(m, gt, shape)
    assert c is not None and c0 is not None
    # L(b) grows by host_batch + b host_item; the SLO left to cycle and batch by host_request
    assert abs((c.lat - c0.lat) - (0.5 + 0.1 * c.buckets)).max() < 1e-9
    assert c.slo == m.slo_ms - 1.0 and c0.slo == m.slo_ms


def test_host_costs_lower_the_peak() -> None:
    lean = find_peak(Problem.from_scenario(_scenario(**ZERO)), get_policy("stgs")).k
    real = find_peak(Problem.from_scenario(_scenario()), get_policy("stgs")).k
    assert 0 < real < lean
