"""Incremental replanning: repairing the current plan keeps its partitions in place."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from plan_checker import build_models, check_plan

from partitioner.greedy import Greedy
from partitioner.policies import get_policy
from partitioner.policies.stgs_policy import (
    VARIANTS,
    at_rates,
    fits_within,
    gpus_by_type,
    hold_plan,
    on_gpus,
)
from partitioner.problem import Problem
from partitioner.replan import align_gpus, diff, disruptions, disruptive
from partitioner.search import largest_factor
from stgs.errors import ConfigError
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.scenario import scenario_from_mapping
from stgs.transition import transition

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
    # nothing running is torn down: a partition that gains the model restarts in place (the
    # runtime's rule, stgs.transition: its model set changed), no other one stops
    change = transition(cur, rep)
    assert ch.partitions_removed == len(change.stopped)
    assert {k.slot for k in change.stopped} <= change.restarted
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
    # MPS shares over 100% during the overlap do not break first: the runtime starts the new
    # MPS workers beside the old ones (stgs.transition; the planner used to count it)
    assert not disruptive(old, GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(37, "c"))))
    half = GpuPlan(0, "H100-80GB", False, (_mps(50, "a"),))
    assert not disruptive(half, GpuPlan(0, "H100-80GB", False, (_mps(50, "a"), _mps(25, "c"))))
    assert not disruptive(None, old)
    mig = GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0),))
    assert not disruptive(
        mig, GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0), _mig("3g.40gb", 4)))
    )
    assert disruptive(mig, GpuPlan(0, "H100-80GB", True, (_mig("1g.10gb", 0),)))
    assert not disruptive(mig, GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0, "b"),)))
    assert disruptive(mig, old)  # MIG mode off under a serving GPU


def test_align_puts_a_new_layout_on_the_idle_gpu() -> None:
    prob = Problem.from_scenario(
        scenario_from_mapping({"gpus": [{"sku": "H100-80GB", "count": 2}], "models": MODELS[:1]})
    )
    # a new MIG layout over the old instances breaks first (an MPS share change does not: the
    # runtime starts new MPS workers beside the old ones)
    cur = _plan(
        GpuPlan(0, "H100-80GB", True, (_mig("3g.40gb", 0, "a"), _mig("3g.40gb", 4, "b"))),
        GpuPlan(1, "H100-80GB", True, ()),
    )
    fresh = _plan(
        GpuPlan(0, "H100-80GB", True, (_mig("4g.40gb", 0, "a"), _mig("2g.20gb", 4, "b"))),
        GpuPlan(1, "H100-80GB", True, ()),
    )
    assert disruptions(cur, fresh) == 1
    aligned = align_gpus(cur, fresh, prob)
    assert disruptions(cur, aligned) == 0
    assert [len(g.partitions) for g in aligned.gpus] == [0, 2]


def test_spare_factor_plans_headroom_and_keeps_it() -> None:
    """spare_factor 1.5: a plan for 1.5x the rates serving the real rates (valid at them), and
    a later 1.3x rise is absorbed by keeping the layout (at most a batch change restarts one)."""
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
    # the runtime's rule (stgs.transition): a partition whose batches change restarts, one
    # stopped and one started; nothing else changes and no GPU breaks first
    ch = diff(plan, again)
    assert ch.partitions_added == ch.partitions_removed <= 1
    assert again.info["changes"]["gpus_disrupted"] == 0
    _valid(up, again)


def _scaled(k: float) -> list[dict[str, Any]]:
    return [{**m, "rate_rps": m["rate_rps"] * k} for m in MODELS]


def _fill_problem(models: list[dict[str, Any]], **planner: Any) -> Problem:
    data = {**_data(models), "planner": {"spare_factor": "fill", **planner}}
    return Problem.from_scenario(scenario_from_mapping(data))


@pytest.mark.parametrize("k", [1.0, 2.5])
def test_fill_plans_more_room_on_the_lean_plans_gpus(k: float) -> None:
    """spare_factor "fill": the lean plan's GPUs (no more of any type), a factor at least 1.5
    where the 1.5x rates fit on those GPUs (as the 1.5x plan's), valid at the real rates. At
    2.5x the rates the 1.5x plan takes a second GPU; fill stays on the lean plan's one."""
    models = _scaled(k)
    lean_prob = _problem(models)
    lean = get_policy("stgs").plan(lean_prob)
    spare = get_policy("stgs-spare").plan(lean_prob)
    plan = get_policy("stgs").plan(_fill_problem(models))
    assert lean.feasible and plan.feasible
    assert plan.info["spare"] == "fill"
    assert plan.gpus_used == lean.gpus_used
    assert fits_within(plan, lean, lean_prob)
    assert gpus_by_type(plan, lean_prob) == gpus_by_type(lean, lean_prob)
    _valid(models, plan)
    for m in models:  # the real rates served, not the planned ones
        assert plan.served_rate(m["name"]) == pytest.approx(m["rate_rps"])
    f = plan.info["spare_factor"]
    assert 1 < f <= 8.0
    # 1.5x the rates on the lean plan's GPUs, as fill's search tries them
    at_15 = on_gpus(
        lean_prob.with_models([m.scaled(1.5) for m in lean_prob.models]),
        lean,
        lambda p: get_policy("stgs").plan(p),
    )
    if k == 1.0:
        assert at_15.feasible and spare.gpus_used == lean.gpus_used
        assert f >= max(1.5, spare.info["spare_factor"])
    else:
        assert spare.gpus_used > lean.gpus_used  # 1.5x takes another GPU; fill does not
    if fits_within(spare, lean, lean_prob):
        assert f >= spare.info["spare_factor"]
    # the room is real: the plan at f x the rates (undoing at_rates) is valid there
    _valid([{**m, "rate_rps": m["rate_rps"] * f} for m in models], at_rates(plan, 1 / f))


def test_fill_is_deterministic_and_capped() -> None:
    prob = _fill_problem(MODELS)
    a = get_policy("stgs-fill").plan(prob)
    b = get_policy("stgs-fill").plan(_fill_problem(MODELS))
    assert a.to_dict() == b.to_dict()
    assert a.policy == "stgs-fill"
    capped = get_policy("stgs").plan(_fill_problem(MODELS, max_spare_factor=1.2))
    assert 1 < capped.info["spare_factor"] <= 1.2
    lean = get_policy("stgs").plan(_fill_problem(MODELS, max_spare_factor=1))
    assert lean.info["spare_factor"] == 1.0


def test_largest_factor_bisects_to_tolerance_and_decides_first() -> None:
    probes: list[float] = []
    ok = _plan(GpuPlan(0, "H100-80GB", False, (_mps(50),)))
    bad = replace(ok, feasible=False)

    def attempt(threshold: float) -> Any:
        def at(f: float) -> Plan:
            probes.append(f)
            return ok.with_info(f=f) if f <= threshold else bad

        return at

    f, plan = largest_factor(attempt(2.37), 1.0, 8.0, rel_tol=0.03, geometric=True, first=1.5)
    assert probes[:2] == [8.0, 1.5]
    assert 2.37 / 1.03 <= f <= 2.37 and plan is not None and plan.info["f"] == f
    probes.clear()
    f, plan = largest_factor(attempt(9.0), 1.0, 8.0, geometric=True)
    assert (f, probes) == (8.0, [8.0])
    f, plan = largest_factor(attempt(0.5), 1.0, 8.0, rel_tol=0.03, geometric=True, first=1.5)
    assert f == 1.0 and plan is None
    # not monotone: fits at 1.5, not at 1.6 .. 8: the first probe keeps 1.5
    f, _ = largest_factor(
        lambda x: ok if x <= 1.5 or x == 8.5 else bad, 1.0, 8.0, geometric=True, first=1.5
    )
    assert f >= 1.5


def test_fits_within_counts_gpus_by_type() -> None:
    prob = _problem(MODELS)  # two MIG-capable H100s, one without MIG
    one = _plan(GpuPlan(0, "H100-80GB", False, (_mps(50),)), GpuPlan(1, "H100-80GB", False, ()))
    other = _plan(GpuPlan(0, "H100-80GB", False, ()), GpuPlan(1, "H100-80GB", False, (_mps(50),)))
    two = _plan(*(GpuPlan(i, "H100-80GB", False, (_mps(50),)) for i in (0, 1)))
    no_mig = _plan(GpuPlan(2, "H100-80GB", False, (_mps(50),)))
    assert fits_within(other, one, prob)  # the same type, another index
    assert not fits_within(two, one, prob)  # one GPU more
    assert not fits_within(no_mig, one, prob)  # a GPU of a type the lean plan does not use
    assert not fits_within(replace(one, feasible=False), one, prob)


def test_fill_holds_its_plan_while_the_room_lasts() -> None:
    """A re-plan at 1.3x the rates keeps every partition and batch of a fill plan (the
    runtime restarts no worker); past the room it plans afresh, still valid."""
    from stgs.runtime.runtime import partition_keys

    plan = get_policy("stgs-fill").plan(_fill_problem(MODELS))
    f = plan.info["spare_factor"]
    assert f > 1.3
    up = _scaled(1.3)
    again = get_policy("stgs-fill").plan(_fill_problem(up), plan)
    assert again.feasible and set(partition_keys(again)) == set(partition_keys(plan))
    assert again.info["spare_factor"] == pytest.approx(f / 1.3, rel=1e-3)
    assert again.info["changes"]["partitions_added"] == 0
    _valid(up, again)
    assert hold_plan(_problem(_scaled(f * 1.1)), plan) is None
    far = _scaled(f * 1.1)
    moved = get_policy("stgs-fill").plan(_fill_problem(far), plan)
    assert moved.feasible
    _valid(far, moved)


@pytest.mark.parametrize("policy", ["stgs-fill", "stgs-spare"])
def test_spare_capacity_releases_a_gpu_when_the_load_falls(policy: str) -> None:
    """Spare capacity judges re-plans by their changes, not by GPUs, except once a plan with
    room (1.5x the new rates) fits on fewer GPUs than the current plan holds: then a GPU is
    freed, as a lean plan frees it. A 10% drop keeps every GPU (and fill's partitions)."""
    high = _scaled(6)
    cur = get_policy(policy).plan(_fill_problem(high) if policy == "stgs-fill" else _problem(high))
    assert cur.feasible and cur.gpus_used >= 2
    small = _scaled(6 * 0.9)
    kept = get_policy(policy).plan(
        _fill_problem(small) if policy == "stgs-fill" else _problem(small), cur
    )
    assert kept.gpus_used == cur.gpus_used
    if policy == "stgs-fill":
        assert kept.info["changes"]["partitions_added"] == 0
    low = _scaled(6 * 0.2)
    fell = get_policy(policy).plan(
        _fill_problem(low) if policy == "stgs-fill" else _problem(low), cur
    )
    assert fell.feasible and fell.gpus_used < cur.gpus_used
    assert fell.info["spare_factor"] >= 1.5  # the GPUs it keeps still have room
    _valid(low, fell)


@pytest.mark.parametrize("bad", ["fil", 0.5, 11, True, "", None])
def test_spare_factor_must_be_a_factor_or_fill(bad: Any) -> None:
    data = {**_data(MODELS), "planner": {"spare_factor": bad}}
    with pytest.raises(ConfigError, match=r'planner\.spare_factor: spare_factor must be .*"fill"'):
        scenario_from_mapping(data)


def test_spare_factor_accepts_numbers_and_fill() -> None:
    for v, want in [(1.5, 1.5), ("2", 2.0), (1, 1.0), ("fill", "fill"), (" Fill ", "fill")]:
        data = {**_data(MODELS), "planner": {"spare_factor": v}}
        assert scenario_from_mapping(data).options.spare_factor == want
    with pytest.raises(ConfigError, match="max_spare_factor"):
        scenario_from_mapping({**_data(MODELS), "planner": {"max_spare_factor": 0.5}})
