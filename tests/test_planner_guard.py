"""Planner limits: rates beyond an upper bound of the node's capacity are refused before
planning, and the planning an API call may start is bounded.

The bound (``partitioner.fluid.rate_excess``) is checked against the planner itself: every
rate a policy plans is within it, on the shipped profiles and the example set.
"""

from __future__ import annotations

from typing import Any

import pytest

from partitioner.fluid import capacity_rps, fluid_bound, rate_excess
from partitioner.planner import make_plan
from partitioner.problem import Problem
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
    """At load factors around the fluid bound (below, at, above it): no model is served above
    its capacity bound, and rate_excess refuses no rates the plan served in full."""
    sc = _scenario(BOUND_SCENARIOS[name])
    k_star = fluid_bound(Problem.from_scenario(sc))
    assert 0 < k_star < float("inf")
    for f in (0.3, 0.7, 0.95, 1.0, 1.5):
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
