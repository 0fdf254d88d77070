"""Planning for the pipelined worker (issue 17): ``planner.worker_pipeline`` chooses how a
batch's host time meets its GPU time in the duty cycle (one rule,
``stgs.hostcosts.round_shares_ms``): their sum for a sequential worker, for a pipelined one the
larger of a batch's GPU time and the next batch's host time; a request's latency includes its
batch's host time in both. The planner, the independent plan checker and the simulator follow
the one setting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import least_attained
from plan_checker import build_models, check_plan

from partitioner.fluid import fluid_bound
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from stgs.errors import ConfigError
from stgs.hostcosts import batch_occupancy_ms, round_shares_ms
from stgs.runtime.worker import PIPELINE_ENV
from stgs.scenario import PlannerOptions, scenario_from_mapping

MODELS = [
    {"name": "mobilenet_v3_large", "slo_ms": 10, "rate_rps": 2000},
    {"name": "resnet50", "slo_ms": 20, "rate_rps": 1500},
]


def _sc(models: list[dict[str, Any]], **planner: Any) -> Any:
    return scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
            "models": models,
            "planner": planner,
        }
    )


def test_the_rule() -> None:
    """Sequential: GPU + host per batch; pipelined: each batch's GPU time or the next batch's
    host time (the worker stages it while this one runs), round the partition's models."""
    dev, host = np.array([1.0, 2.0, 0.5]), np.array([0.7, 3.0, 0.25])
    assert round_shares_ms(list(dev), list(host), False) == [1.7, 5.0, 0.75]
    assert round_shares_ms(list(dev), list(host), True) == [3.0, 2.0, 0.7]
    assert round_shares_ms([0.5], [0.7], True) == [0.7]  # alone: max(GPU, host)
    assert batch_occupancy_ms(dev, host, True).tolist() == [1.0, 3.0, 0.5]


def test_the_default_is_the_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIPELINE_ENV, raising=False)
    assert PlannerOptions().worker_pipeline is True
    monkeypatch.setenv(PIPELINE_ENV, "0")
    assert PlannerOptions().worker_pipeline is False
    assert PlannerOptions(worker_pipeline=True).worker_pipeline is True  # a setting wins
    monkeypatch.setenv(PIPELINE_ENV, "maybe")
    with pytest.raises(ConfigError, match="STGS_WORKER_PIPELINE='maybe'"):
        PlannerOptions()


@pytest.mark.parametrize("policy", ["stgs", "temporal", "mps-only"])  # GPUs without MIG
def test_pipelined_plans_more_and_the_checker_agrees(policy: str) -> None:
    """The pipelined peak is above the sequential one, and below the fluid bound of its own
    rule; each plan is valid by the independent checker under its own setting. The pipelined
    plan at its peak is infeasible for a sequential worker: the checker, told the workers are
    sequential, finds a cycle its batches overrun."""
    pol = get_policy(policy)
    peaks = {}
    for pipelined in (False, True):
        sc = _sc(MODELS, worker_pipeline=pipelined)
        prob = Problem.from_scenario(sc)
        peak = find_peak(prob, pol)
        assert peak.k > 0
        assert peak.k <= fluid_bound(prob) * (1 + 1e-6)
        scaled = [{**m, "rate_rps": m["rate_rps"] * peak.k} for m in MODELS]
        sc_k = _sc(scaled, worker_pipeline=pipelined)
        assert check_plan(peak.plan, sc_k, *build_models(sc_k)) == []
        peaks[pipelined] = (peak, scaled)
    assert peaks[True][0].k > peaks[False][0].k * 1.05
    # the rates the pipelined model serves: infeasible for the sequential one
    seq = _sc(peaks[True][1], worker_pipeline=False)
    assert not get_policy(policy).plan(Problem.from_scenario(seq)).feasible
    found = check_plan(peaks[True][0].plan, seq, *build_models(seq))
    assert any("sequential worker" in v for v in found), found


def test_without_host_costs_the_settings_plan_alike() -> None:
    zero = {"host_request_ms": 0, "host_batch_ms": 0, "host_item_ms": 0}
    a, b = (
        get_policy("stgs").plan(Problem.from_scenario(_sc(MODELS, worker_pipeline=p, **zero)))
        for p in (False, True)
    )
    assert a.to_dict() == b.to_dict()


def test_the_simulator_keeps_99_percent_of_a_pipelined_plan() -> None:
    """The pipelined stgs plan at 95% of its peak, simulated with pipelined workers (Poisson
    arrivals, the profiles' noise, the measured host costs): >= 99% of each model's requests
    within their SLO; the same rates on sequential workers miss far more."""
    sc = _sc(MODELS, worker_pipeline=True)
    prob = Problem.from_scenario(sc)
    k = 0.95 * find_peak(prob, get_policy("stgs")).k
    rates = {m.name: m.rate_rps * k for m in prob.models}
    plan = get_policy("stgs").plan(prob.with_models([m.scaled(k) for m in prob.models]))
    assert plan.feasible
    attained = {
        pipelined: least_attained(prob.with_options(worker_pipeline=pipelined), plan, rates)
        for pipelined in (True, False)
    }
    assert attained[True] >= 0.99, attained
    assert attained[False] < 0.9, attained
