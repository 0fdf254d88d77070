"""The fluid bound: an upper bound on every policy's peak, and tighter when rates cap batches."""

from __future__ import annotations

from typing import Any

import pytest

from partitioner.fluid import fluid_bound
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from stgs.scenario import scenario_from_mapping


def problem(gpus: list[dict[str, Any]], models: list[dict[str, Any]]) -> Problem:
    return Problem.from_scenario(scenario_from_mapping({"gpus": gpus, "models": models}))


def test_low_rates_cap_the_batch() -> None:
    """Many models share one GPU, so at the peak each has a low rate: with a 12 ms SLO a cycle
    gathers a few requests of each, never the saturated batch the classic frontier assumes."""
    models = [
        {"name": f"r{i}", "profile": "resnet18", "slo_ms": 12, "rate_rps": 1} for i in range(8)
    ]
    p = problem([{"sku": "L4"}], models)
    classic = fluid_bound(p, rate_aware=False)
    aware = fluid_bound(p)
    assert 0 < aware < 0.9 * classic
    for policy in ("stgs", "temporal"):
        k = find_peak(p, get_policy(policy)).k
        assert 0 < k <= aware * (1 + 1e-6)


def test_high_rates_change_nothing() -> None:
    """Rates that fill the best batch within the SLO: the rate-aware bound equals the classic."""
    p = problem(
        [{"sku": "L4", "count": 2}],
        [
            {"name": "resnet50", "slo_ms": 200, "rate_rps": 3000},
            {"name": "bert_base", "slo_ms": 200, "rate_rps": 2000},
        ],
    )
    assert fluid_bound(p) == pytest.approx(fluid_bound(p, rate_aware=False), rel=1e-9)


@pytest.mark.parametrize("policy", ["stgs", "temporal", "mig-only", "mps-only"])
def test_no_policy_beats_the_bound(policy: str) -> None:
    p = problem(
        [{"sku": "H100-80GB"}, {"sku": "L4", "count": 2}],
        [
            {"name": "resnet50", "slo_ms": 25, "rate_rps": 40},
            {"name": "mobilenet_v3_large", "slo_ms": 15, "rate_rps": 5},
            {"name": "bert_base", "slo_ms": 100, "rate_rps": 30},
            {"name": "vgg16", "slo_ms": 60, "rate_rps": 2},
        ],
    )
    bound = fluid_bound(p)
    peak = find_peak(p, get_policy(policy))
    assert peak.k <= bound * (1 + 1e-6)
    assert peak.bound == pytest.approx(bound)


def test_interference_diagnostic_is_lower() -> None:
    p = problem(
        [{"sku": "H200-141GB", "mig": False}],
        [{"name": "googlenet", "slo_ms": 40, "rate_rps": 100}],
    )
    assert fluid_bound(p, interference=True) <= fluid_bound(p)
