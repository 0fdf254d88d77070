"""Incremental replanning: repairing the current plan keeps its partitions in place."""

from __future__ import annotations

from typing import Any

from plan_checker import build_models, check_plan

from partitioner.greedy import Greedy
from partitioner.policies import get_policy
from partitioner.policies.stgs_policy import VARIANTS
from partitioner.problem import Problem
from partitioner.replan import align_gpus, diff, disruptions, disruptive
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.scenario import scenario_from_mapping

GPUS = [{"sku": "H100-80GB", "count": 2}, {"sku": "H100-80GB", "count": 1, "mig": False}]
MODELS = [
    {"name": "resnet50", "slo_ms": 40, "rate_rps": 900},
    {"name": "mobilenet_v3_large", "slo_ms": 20, "rate_rps": 500},
    {"name": "bert_base", "slo_ms": 80, "rate_rps": 200},
    {"name": "vgg16", "slo_ms": 100, "rate_rps": 60},
]


def _data(models: list[dict[str, Any]]) -> dict[str, Any]:
    return {"gpus": GPUS, "models": models}


def _problem(models: list[dict[str, Any]]) -> Problem:
    return Problem.from_scenario(scenario_from_mapping(_data(models)))


def _valid(models: list[dict[str, Any]], plan: Plan) -> None:
    sc = scenario_from_mapping(_data(models))
    lm, interference = build_models(sc)
    assert check_plan(plan, sc, lm, interference) == []


def _current() -> Plan:
    plan = get_policy("stgs").plan(_problem(MODELS))
    assert plan.feasible
    return plan


def test_repair_at_the_same_rates_changes_nothing() -> None:
    cur = _current()
    rep = Greedy(_problem(MODELS), VARIANTS[0]).repair(cur)
    assert rep is not None and rep.feasible
    ch = diff(cur, rep)
    assert ch.partitions_changed == 0 and ch.models_moved == ()
    _valid(MODELS, rep)


def test_repair_adds_a_model_without_touching_the_others() -> None:
    cur = _current()
    more = [*MODELS, {"name": "efficientnet_b0", "slo_ms": 30, "rate_rps": 150}]
    rep = Greedy(_problem(more), VARIANTS[0]).repair(cur)
    assert rep is not None and rep.feasible
    ch = diff(cur, rep)
    assert ch.partitions_removed == 0  # nothing running is torn down
    assert set(ch.models_moved) <= {"efficientnet_b0"}
    _valid(more, rep)


def test_repair_absorbs_a_rate_increase_and_a_removal() -> None:
    cur = _current()
    changed = [
        {**m, "rate_rps": m["rate_rps"] * (1.6 if m["name"] == "resnet50" else 1.0)}
        for m in MODELS
        if m["name"] != "vgg16"
    ]
    rep = Greedy(_problem(changed), VARIANTS[0]).repair(cur)
    assert rep is not None and rep.feasible
    _valid(changed, rep)
    served = {a.name for _, p in rep.partitions() for a in p.models}
    assert "vgg16" not in served


def test_incremental_stgs_prefers_few_changes() -> None:
    """With a current plan, stgs picks the candidate that changes least for the same GPUs."""
    cur = _current()
    bumped = [{**m, "rate_rps": m["rate_rps"] * 1.1} for m in MODELS]
    prob = _problem(bumped)
    fresh = get_policy("stgs").plan(prob)
    inc = get_policy("stgs").plan(prob, cur)
    assert inc.feasible
    _valid(bumped, inc)
    assert (
        inc.gpus_used + 0.05 * diff(cur, inc).partitions_changed
        <= fresh.gpus_used + 0.05 * diff(cur, fresh).partitions_changed + 1e-9
    )
    assert "changes" in inc.info


def test_repair_refuses_a_plan_for_other_gpus() -> None:
    cur = _current()
    other = Problem.from_scenario(
        scenario_from_mapping({"gpus": [{"sku": "L4", "count": 3}], "models": MODELS})
    )
    assert Greedy(other, VARIANTS[0]).repair(cur) is None


def _mps(pct: int, name: str = "m") -> Partition:
    return Partition("mps", 66, 40000.0, 10.0, (ModelAssignment(name, 4, 100.0, 2.0),), mps_pct=pct)


def _mig(prof: str, start: int, name: str = "m") -> Partition:
    return Partition(
        "mig", 16, 10000.0, 10.0, (ModelAssignment(name, 4, 100.0, 2.0),), mig_profile=prof,
        mig_start=start,
    )  # fmt: skip


def _plan(*gpus: GpuPlan) -> Plan:
    return Plan(policy="t", feasible=True, gpus=gpus)


def test_disruptive_rules() -> None:
    old = GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(50, "b")))
    assert not disruptive(old, old)
    assert disruptive(old, GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(37, "c"))))
    half = GpuPlan(0, "H100-80GB", False, (_mps(50, "a"),))
    assert not disruptive(half, GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(25, "c"))))
    assert not disruptive(None, old)
    mig = GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0),))
    assert not disruptive(
        mig, GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0), _mig("3g.40gb", 4)))
    )
    assert disruptive(mig, GpuPlan(0, "H100-80GB", True, (_mig("1g.10gb", 0),)))
    assert disruptive(mig, old)  # MIG mode off under a serving GPU


def test_align_puts_a_new_layout_on_the_idle_gpu() -> None:
    prob = Problem.from_scenario(
        scenario_from_mapping(
            {"gpus": [{"sku": "H100-80GB", "count": 2, "mig": False}], "models": MODELS[:1]}
        )
    )
    cur = _plan(
        GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(50, "b"))),
        GpuPlan(1, "H100-80GB", False, ()),
    )
    fresh = _plan(
        GpuPlan(0, "H100-80GB", False, (_mps(75, "a"), _mps(25, "b"))),
        GpuPlan(1, "H100-80GB", False, ()),
    )
    assert disruptions(cur, fresh) == 1
    aligned = align_gpus(cur, fresh, prob)
    assert disruptions(cur, aligned) == 0
    assert [len(g.partitions) for g in aligned.gpus] == [0, 2]


def test_spare_factor_plans_headroom_and_keeps_it() -> None:
    """spare_factor 1.5: a plan for 1.5x the rates serving the real rates (valid at them), and
    a later 1.3x rise is absorbed by keeping the layout (no partition changed)."""
    data = {**_data(MODELS), "planner": {"spare_factor": 1.5}}
    prob = Problem.from_scenario(scenario_from_mapping(data))
    plan = get_policy("stgs").plan(prob)
    assert plan.feasible and plan.info.get("spare_factor") in (1.5, round(1.5**0.5, 4))
    _valid(MODELS, plan)
    lean = get_policy("stgs").plan(_problem(MODELS))
    assert plan.gpus_used >= lean.gpus_used
    up = [{**m, "rate_rps": m["rate_rps"] * 1.2} for m in MODELS]
    prob_up = Problem.from_scenario(
        scenario_from_mapping({**_data(up), "planner": data["planner"]})
    )
    again = get_policy("stgs").plan(prob_up, plan)
    assert again.feasible
    assert diff(plan, again).partitions_changed == 0
    _valid(up, again)
