"""Every policy's plans pass an independent validity check (tests/plan_checker.py).

The checker re-derives every rule from the plan's JSON and the latency models; it shares no
code with the planner's schedule, shapes or packing. Plans at high load may be infeasible: they
must still be valid (what they serve, they serve within the rules) and account for the rest.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plan_checker import assert_valid, build_models, check_plan, mig_layout_violations

from partitioner.peak import find_peak
from partitioner.policies import get_policy, policy_names
from partitioner.problem import Problem
from profiler.models import ZOO
from stgs.catalog import MigPlacement, enumerate_layouts, get_sku, layout_violation
from stgs.latency import InterferenceModel, LatencyModel
from stgs.plan import Plan
from stgs.scenario import Scenario, scenario_from_mapping


def _m(name: str, slo: float, rate: float) -> dict[str, Any]:
    return {"name": name, "slo_ms": slo, "rate_rps": rate}


# name -> (scenario mapping, small: also for the exact "optimal" policy, whose MILP is slow on
# MIG GPUs and at peak load: small means few models, and at most one MIG GPU)
SCENARIOS: dict[str, tuple[dict[str, Any], bool]] = {
    "example-mix": (
        {
            "gpus": [{"sku": "H100-80GB", "count": 2}, {"sku": "H200-141GB", "mig": False}],
            "models": [
                _m("resnet50", 50, 1500),
                _m("mobilenet_v3_large", 15, 800),
                _m("efficientnet_b0", 20, 400),
                _m("vit_b_16", 80, 600),
                _m("bert_base", 100, 300),
                _m("wav2vec2_base", 200, 120),
                _m("densenet121", 40, 150),
                _m("vgg16", 100, 90),
            ],
        },
        False,
    ),
    "l4-light": (
        {
            "gpus": [{"sku": "L4"}],
            "models": [
                _m("resnet18", 30, 100),
                _m("mobilenet_v3_large", 20, 200),
                _m("efficientnet_b0", 50, 50),
            ],
            "planner": {"time_limit_s": 3},
        },
        True,
    ),
    "l4-single": (
        {
            "gpus": [{"sku": "L4"}],
            "models": [_m("resnet18", 30, 300)],
            "planner": {"time_limit_s": 3},
        },
        True,
    ),
    "h100-nomig-single": (
        {
            "gpus": [{"sku": "H100-80GB", "mig": False}],
            "models": [_m("bert_base", 60, 400)],
            "planner": {"time_limit_s": 3},
        },
        True,
    ),
    "a100-mig-single": (
        {
            "gpus": [{"sku": "A100-80GB", "mig": True}],
            "models": [_m("resnet50", 40, 800)],
            "planner": {"time_limit_s": 3},
        },
        True,
    ),
    "a100-heavy": (
        {
            "gpus": [{"sku": "A100-80GB", "count": 4}],
            "models": [
                _m("resnet50", 60, 3000),
                _m("vit_b_16", 100, 800),
                _m("bert_base", 80, 500),
                _m("densenet121", 50, 400),
                _m("inception_v3", 40, 300),
            ],
        },
        False,
    ),
    "h200-mig-tight": (
        {
            "gpus": [{"sku": "H200-141GB", "mig": True}],
            "models": [
                _m("mobilenet_v3_large", 10, 1000),
                _m("resnet18", 10, 2000),
                _m("googlenet", 15, 500),
            ],
        },
        False,
    ),
    "h100x8-all-models": (
        {
            "gpus": [{"sku": "H100-80GB", "count": 8, "mig": False}],
            "models": [
                _m(name, slo, rate)
                for name, slo, rate in zip(
                    ZOO,
                    (50, 20, 10, 20, 80, 40, 100, 60, 30, 25, 100, 200),
                    (5000, 4000, 3000, 2500, 1200, 900, 500, 800, 2000, 3500, 1000, 300),
                    strict=True,
                )
            ],
        },
        False,
    ),
    "mixed-fleet": (
        {
            "gpus": [
                {"sku": "L4", "count": 2},
                {"sku": "A100-80GB", "mig": False},
                {"sku": "H100-80GB", "mig": True},
            ],
            "models": [
                _m("wav2vec2_base", 200, 50),
                _m("bert_base", 100, 200),
                _m("vgg16", 60, 150),
                _m("mnasnet1_0", 20, 1500),
            ],
        },
        False,
    ),
    "h100-overload": (
        {
            "gpus": [{"sku": "H100-80GB", "mig": True}],
            "models": [
                _m("resnet50", 30, 5000),
                _m("vit_b_16", 50, 2000),
                _m("vgg16", 40, 1000),
            ],
        },
        False,
    ),
    "h200-mig-many-light": (
        {
            "gpus": [{"sku": "H200-141GB", "count": 2, "mig": True}],
            "headroom": 0.2,
            "models": [
                _m("resnet50", 100, 40),
                _m("resnet18", 50, 30),
                _m("densenet121", 150, 20),
                _m("inception_v3", 120, 10),
                _m("googlenet", 60, 50),
                _m("bert_base", 200, 25),
                _m("wav2vec2_base", 200, 10),
                _m("efficientnet_b0", 80, 35),
            ],
            "planner": {
                "mps_shares": [25, 50, 75],
                "interference_gamma": 0.3,
                "max_models_per_partition": 3,
            },
        },
        False,
    ),
}

PEAK_SCENARIOS = ("example-mix", "mixed-fleet")
PEAK_SCENARIOS_SMALL = ("l4-single", "h100-nomig-single")
EXACT = "optimal"


_MODELS_CACHE: dict[tuple[object, ...], tuple[Any, InterferenceModel]] = {}


def _checker_models(
    sc: Scenario,
) -> tuple[dict[tuple[str, str], LatencyModel], InterferenceModel]:
    """The checker's own latency/interference models (built once per profile set and gamma)."""
    key = (sc.profiles, sc.interference, sc.options.interference_gamma)
    if key not in _MODELS_CACHE:
        _MODELS_CACHE[key] = build_models(sc)
    return _MODELS_CACHE[key]


def _check(plan: Plan, sc: Scenario) -> list[str]:
    lm, interference = _checker_models(sc)
    return check_plan(plan, sc, lm, interference)


def _assert_valid(plan: Plan, sc: Scenario) -> None:
    lm, interference = _checker_models(sc)
    assert_valid(plan, sc, lm, interference)


@cache
def _scenario(name: str) -> Scenario:
    return scenario_from_mapping(SCENARIOS[name][0], source=name)


@cache
def _problem(name: str) -> Problem:
    return Problem.from_scenario(_scenario(name))


@cache
def _plan(policy: str, scenario: str) -> Plan:
    return get_policy(policy).plan(_problem(scenario))


def _cases(peak: bool = False) -> Iterator[Any]:
    for policy in policy_names():
        if peak:
            names = PEAK_SCENARIOS_SMALL if policy == EXACT else PEAK_SCENARIOS
        else:
            names = tuple(n for n, (_, small) in SCENARIOS.items() if small or policy != EXACT)
        for name in names:
            marks = [pytest.mark.slow] if policy == EXACT else []
            yield pytest.param(policy, name, id=f"{policy}-{name}", marks=marks)


# ------------------------------------------------------------------------------ plans


@pytest.mark.parametrize(("policy", "scenario"), list(_cases()))
def test_policy_plan_is_valid(policy: str, scenario: str) -> None:
    plan = _plan(policy, scenario)
    _assert_valid(plan, _scenario(scenario))


@pytest.mark.parametrize(("policy", "scenario"), list(_cases(peak=True)))
def test_plan_at_peak_is_valid(policy: str, scenario: str) -> None:
    peak = find_peak(_problem(scenario), get_policy(policy))
    assert peak.k >= 0
    assert peak.plan.feasible or peak.k == 0
    _assert_valid(peak.plan, _scenario(scenario).scaled(peak.k))


def test_scenarios_cover_infeasible_and_mig_mps() -> None:
    """The fixed scenarios exercise what the checker checks (else the checks prove little)."""
    plans = [_plan(p, s) for p in policy_names() if p != EXACT for s in SCENARIOS]
    kinds = {(p.kind, p.mig_profile is not None) for plan in plans for _, p in plan.partitions()}
    assert {("full", False), ("mig", True), ("mps", False), ("mps", True)} <= kinds
    assert any(not plan.feasible for plan in plans)
    assert any(len(p.models) > 1 for plan in plans for _, p in plan.partitions())


GPU_CHOICES = (
    ("H100-80GB", True),
    ("H100-80GB", False),
    ("H200-141GB", True),
    ("H200-141GB", False),
    ("A100-80GB", True),
    ("A100-80GB", False),
    ("L4", None),
)


@st.composite
def small_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    entries = draw(st.lists(st.sampled_from(GPU_CHOICES), min_size=1, max_size=2, unique=True))
    gpus = []
    for sku, mig in entries:
        e: dict[str, Any] = {"sku": sku, "count": draw(st.integers(1, 2))}
        if mig is not None:
            e["mig"] = mig
        gpus.append(e)
    names = draw(st.lists(st.sampled_from(ZOO), min_size=1, max_size=4, unique=True))
    models = [
        _m(
            n,
            draw(st.sampled_from((10, 15, 20, 30, 50, 80, 100, 150, 200))),
            draw(st.floats(10, 5000, allow_nan=False, allow_infinity=False)),
        )
        for n in names
    ]
    return {"gpus": gpus, "models": models}


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=small_scenarios())
def test_random_small_scenarios_give_valid_plans(data: dict[str, Any]) -> None:
    sc = scenario_from_mapping(data)
    problem = Problem.from_scenario(sc)
    for policy in policy_names():
        if policy == EXACT:
            continue
        _assert_valid(get_policy(policy).plan(problem), sc)


# ------------------------------------------------------------------------------ the checker


def _find(
    pred: Callable[[Mapping[str, Any]], bool],
    policies: tuple[str, ...] = ("stgs", "mig-only", "mps-only", "temporal"),
) -> tuple[dict[str, Any], Scenario]:
    """A valid plan dict (and its scenario) with a GPU for which ``pred`` holds."""
    for policy, name in itertools.product(policies, SCENARIOS):
        if policy not in policy_names():
            continue
        plan = _plan(policy, name)
        if plan.feasible and any(pred(g) for g in plan.to_dict()["gpus"]):
            sc = _scenario(name)
            assert _check(plan, sc) == []
            return plan.to_dict(), sc
    raise AssertionError("no plan of the fixed scenarios has the feature this test breaks")


def _violations(data: Mapping[str, Any], sc: Scenario) -> list[str]:
    lm, interference = _checker_models(sc)
    return check_plan(data, sc, lm, interference)


def _has(violations: list[str], *words: str) -> bool:
    return any(all(w in v for w in words) for v in violations)


def _busy_partition(data: dict[str, Any]) -> dict[str, Any]:
    return next(
        p
        for g in data["gpus"]
        for p in g["partitions"]
        if any(m["rate_rps"] > 0 for m in p["models"])
    )


def test_checker_catches_raised_rate() -> None:
    data, sc = _find(lambda g: bool(g["partitions"]))
    broken = copy.deepcopy(data)
    m = next(m for m in _busy_partition(broken)["models"] if m["rate_rps"] > 0)
    m["rate_rps"] *= 10
    assert _has(_violations(broken, sc), m["name"], "requests per cycle")


def test_checker_catches_shrunk_duty_cycle() -> None:
    data, sc = _find(lambda g: bool(g["partitions"]))
    broken = copy.deepcopy(data)
    part = _busy_partition(broken)
    part["duty_cycle_ms"] /= 4
    assert _has(_violations(broken, sc), "batches take", "> duty cycle")


def test_checker_catches_overlapping_mig_start() -> None:
    def two_instances(g: Mapping[str, Any]) -> bool:
        return len({p["mig_start"] for p in g["partitions"] if p["kind"] == "mig"}) >= 2

    data, sc = _find(two_instances)
    broken = copy.deepcopy(data)
    g = next(g for g in broken["gpus"] if two_instances(g))
    a, b = [p for p in g["partitions"] if p["kind"] == "mig"][:2]
    b["mig_start"] = a["mig_start"]
    out = _violations(broken, sc)
    assert _has(out, "mig_start") and _has(out, "overlaps")


def test_checker_catches_mps_over_100() -> None:
    def flat_mps(g: Mapping[str, Any]) -> bool:
        return any(p["kind"] == "mps" and p["mig_start"] is None for p in g["partitions"])

    data, sc = _find(flat_mps)
    broken = copy.deepcopy(data)
    g = next(g for g in broken["gpus"] if flat_mps(g))
    share = next(p for p in g["partitions"] if p["kind"] == "mps")
    g["partitions"].append({**copy.deepcopy(share), "mps_pct": 100})
    assert _has(_violations(broken, sc), "MPS shares sum to", "more than 100%")


def test_checker_catches_mps_in_mig_over_100_and_mixed_use() -> None:
    def mps_in_mig(g: Mapping[str, Any]) -> bool:
        return any(p["kind"] == "mps" and p["mig_start"] is not None for p in g["partitions"])

    data, sc = _find(mps_in_mig)
    broken = copy.deepcopy(data)
    g = next(g for g in broken["gpus"] if mps_in_mig(g))
    share = next(p for p in g["partitions"] if p["kind"] == "mps")
    g["partitions"].append({**copy.deepcopy(share), "mps_pct": 100})
    assert _has(_violations(broken, sc), "in instance @", "more than 100%")

    broken = copy.deepcopy(data)
    g = next(g for g in broken["gpus"] if mps_in_mig(g))
    share = next(p for p in g["partitions"] if p["kind"] == "mps")
    whole = {**copy.deepcopy(share), "kind": "mig", "mps_pct": None}
    g["partitions"].append(whole)
    assert _has(_violations(broken, sc), "used whole and also holds MPS shares")


def test_checker_catches_coverage_and_fields() -> None:
    data, sc = _find(lambda g: bool(g["partitions"]))
    # a served model dropped from a plan still marked feasible
    broken = copy.deepcopy(data)
    part = _busy_partition(broken)
    dropped = part["models"].pop(0)
    assert _has(_violations(broken, sc), dropped["name"], "marked feasible")
    # wrong SM count, wrong reported latency
    broken = copy.deepcopy(data)
    part = _busy_partition(broken)
    part["sm_count"] += 2
    part["models"][0]["latency_ms"] *= 1.5
    out = _violations(broken, sc)
    assert _has(out, "sm_count") and _has(out, "reported latency_ms")
    # MIG on a GPU the scenario keeps out of MIG; format
    broken = copy.deepcopy(data)
    broken["format"] = "stgs.plan/v0"
    assert _has(_violations(broken, sc), "format")
    sc_nomig = _scenario("h100x8-all-models")
    plan = _plan("temporal", "h100x8-all-models").to_dict()
    plan["gpus"][0]["mig"] = True
    out = _violations(plan, sc_nomig)
    assert _has(out, "does not allow MIG")


def test_checker_catches_infeasible_plan_losing_rate() -> None:
    policy, name = next(
        (p, s)
        for p in ("stgs", "temporal", "mig-only", "mps-only")
        for s in SCENARIOS
        if not _plan(p, s).feasible
    )
    data, sc = _plan(policy, name).to_dict(), _scenario(name)
    assert data["unserved"] and _violations(data, sc) == []
    lost = data["unserved"][0]["name"]
    data["unserved"] = []
    out = _violations(data, sc)
    assert _has(out, lost, "unserved", "< its rate")
    assert _has(out, "lists no unserved")


def test_assert_valid_raises_with_every_violation() -> None:
    data, sc = _find(lambda g: bool(g["partitions"]))
    broken = copy.deepcopy(data)
    broken["format"] = "nope"
    _busy_partition(broken)["duty_cycle_ms"] /= 4
    lm, interference = _checker_models(sc)
    with pytest.raises(AssertionError, match="format") as info:
        assert_valid(broken, sc, lm, interference)
    assert "duty cycle" in str(info.value)


# ------------------------------------------------------------------------------ MIG layouts


def test_mig_layout_rules_from_scratch() -> None:
    h100 = get_sku("H100-80GB")
    ok = [
        [(0, "3g.40gb"), (4, "3g.40gb")],
        [(0, "4g.40gb"), (4, "3g.40gb")],
        [(0, "2g.20gb"), (2, "2g.20gb"), (4, "2g.20gb"), (6, "1g.10gb")],
        [(s, "1g.10gb") for s in range(7)],
        [(0, "7g.80gb")],
        [(s, "1g.20gb") for s in (0, 2, 4)] + [(6, "1g.10gb")],
    ]
    for layout in ok:
        assert mig_layout_violations(h100, layout) == [], layout
    bad = {
        "overlaps": [(0, "3g.40gb"), (2, "2g.20gb")],
        "may only start": [(1, "1g.20gb")],
        "compute slices": [
            *[(s, "2g.20gb") for s in (0, 2, 4)],
            (6, "1g.10gb"),
            (7, "1g.10gb"),
        ],
        "no MIG profile": [(0, "5g.50gb")],
    }
    for word, layout in bad.items():
        assert _has(mig_layout_violations(h100, layout), word), (word, layout)
    assert mig_layout_violations(get_sku("L4"), [(0, "1g.10gb")])


@pytest.mark.parametrize("sku_name", ["H100-80GB", "A100-40GB"])
def test_mig_layout_rules_agree_with_catalog(sku_name: str) -> None:
    """The from-scratch rules accept exactly the catalog's layouts (sets of up to 3)."""
    sku = get_sku(sku_name)
    valid = {frozenset((pl.start, pl.profile) for pl in lay) for lay in enumerate_layouts(sku_name)}
    cands = sorted((s, p.name) for p in sku.mig_profiles for s in p.starts)
    for n in range(1, 4):
        for combo in itertools.combinations(cands, n):
            mine = not mig_layout_violations(sku, combo)
            assert mine == (frozenset(combo) in valid), combo
            theirs = layout_violation(sku, [MigPlacement(s, p) for s, p in combo]) is None
            assert mine == theirs, combo
