"""The exact policy ``optimal``: valid plans, never worse than ``stgs``, honest limits."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from partitioner.peak import find_peak
from partitioner.policies import get_policy, policy_names
from partitioner.policies.optimal import exact_peak
from partitioner.problem import Problem, schedule
from stgs.catalog import MigPlacement, get_sku, layout_violation
from stgs.errors import PlanningError
from stgs.plan import Plan
from stgs.scenario import scenario_from_mapping

RESNET = {"name": "resnet50", "slo_ms": 50, "rate_rps": 1500}
MOBILENET = {"name": "mobilenet_v3_large", "slo_ms": 15, "rate_rps": 800}
BERT = {"name": "bert_base", "slo_ms": 100, "rate_rps": 300}
VGG = {"name": "vgg16", "slo_ms": 100, "rate_rps": 90}


def problem(
    gpus: list[dict[str, Any]], models: list[dict[str, Any]], k: float = 1.0, **planner: Any
) -> Problem:
    data: dict[str, Any] = {
        "gpus": gpus,
        "models": [{**m, "rate_rps": m["rate_rps"] * k} for m in models],
    }
    if planner:
        data["planner"] = planner
    return Problem.from_scenario(scenario_from_mapping(data))


def check_plan(p: Problem, plan: Plan) -> None:
    """Every partition schedules at its rates on a real shape; GPUs hold valid layouts."""
    by_name = {m.name: m for m in p.models}
    for g in plan.gpus:
        t = p.gpus[g.index]
        shapes = p.shapes(t)
        shares: dict[int | None, int] = defaultdict(int)
        whole: set[int] = set()
        placements: set[MigPlacement] = set()
        for part in g.partitions:
            shape = next(
                s
                for s in shapes
                if s.kind == part.kind
                and s.mig_profile == part.mig_profile
                and s.mps_pct == part.mps_pct
            )
            assert part.sm_count == shape.sm_count
            assert 0 < len(part.models) <= p.options.max_models_per_partition
            items = []
            for a in part.models:
                curve = p.curve(by_name[a.name], t, shape)
                assert curve is not None
                assert a.batch in curve.buckets
                items.append((curve, a.rate_rps))
            assert schedule(items) is not None, part
            if part.mig_profile is not None:
                assert g.mig
                assert part.mig_start is not None
                placements.add(MigPlacement(part.mig_start, part.mig_profile))
                if part.kind == "mig":
                    assert part.mig_start not in whole
                    whole.add(part.mig_start)
            else:
                assert not g.mig
            shares[part.mig_start] += 100 if part.kind == "full" else (part.mps_pct or 100)
        assert all(v <= 100 for v in shares.values())
        if g.mig:
            assert layout_violation(get_sku(t.sku), sorted(placements)) is None
    if plan.feasible:
        for m in p.models:
            assert plan.served_rate(m.name) >= m.rate_rps * (1 - 1e-6)


def test_registered() -> None:
    assert "optimal" in policy_names()
    assert get_policy("optimal").name == "optimal"


@pytest.mark.parametrize(
    ("gpus", "models", "k"),
    [
        ([{"sku": "L4"}], [RESNET, MOBILENET, BERT], 0.3),
        ([{"sku": "H100-80GB"}], [RESNET, MOBILENET], 1.0),
        ([{"sku": "H100-80GB", "mig": False}], [RESNET, MOBILENET, BERT], 1.0),
        ([{"sku": "H100-80GB"}], [RESNET, VGG], 2.0),
    ],
)
def test_plan_valid_and_serves_every_rate(
    gpus: list[dict[str, Any]], models: list[dict[str, Any]], k: float
) -> None:
    p = problem(gpus, models, k)
    plan = get_policy("optimal").plan(p)
    assert plan.policy == "optimal"
    assert plan.feasible, plan.unserved
    solver = plan.info["solver"]
    assert solver["status"] == "optimal"
    assert solver["served_fraction"] == 1.0
    assert solver["solve_s"] >= 0 and "mip_gap" in solver
    assert Plan.from_json(plan.to_json()).feasible
    check_plan(p, plan)
    assert plan.gpus_used <= get_policy("stgs").plan(p).gpus_used


@pytest.mark.parametrize(
    ("models", "k"), [([RESNET, MOBILENET, BERT], 0.8), ([RESNET, MOBILENET, BERT, VGG], 0.6)]
)
def test_never_more_gpus_than_stgs(models: list[dict[str, Any]], k: float) -> None:
    p = problem([{"sku": "L4", "count": 2}], models, k)
    heuristic = get_policy("stgs").plan(p)
    plan = get_policy("optimal").plan(p)
    check_plan(p, plan)
    if heuristic.feasible:
        assert plan.feasible
        assert plan.gpus_used <= heuristic.gpus_used


def test_peak_at_least_stgs() -> None:
    p = problem([{"sku": "L4"}], [RESNET, MOBILENET, BERT])
    heuristic = find_peak(p, get_policy("stgs"))
    exact = find_peak(p, get_policy("optimal"))
    assert exact.k >= heuristic.k * 0.999
    assert exact.k <= exact.bound * (1 + 1e-6)
    k_star, status = exact_peak(p)  # one solve: at or above the bisection's k
    assert status == "optimal"  # proven: the largest served fraction at the bound
    assert exact.k * (1 - 1e-6) <= k_star <= exact.k * (1 + 3e-3)
    scaled = p.with_models([m.scaled(exact.k) for m in p.models])
    check_plan(scaled, exact.plan)


def test_served_fraction_is_exact() -> None:
    """Past the peak, k * lambda*(k) is the peak itself, whatever k: a check of exactness."""
    p = problem([{"sku": "L4"}], [RESNET, MOBILENET, BERT])
    peaks = []
    for k in (0.6, 0.9, 1.5):
        scaled = p.with_models([m.scaled(k) for m in p.models])
        solver = get_policy("optimal").plan(scaled).info["solver"]
        assert solver["status"] == "infeasible"
        peaks.append(k * solver["served_fraction"])
    assert max(peaks) - min(peaks) <= 1e-5 * max(peaks)
    assert peaks[0] >= find_peak(p, get_policy("stgs")).k * 0.999


def test_infeasible_maximises_the_served_fraction() -> None:
    p = problem([{"sku": "L4"}], [RESNET, MOBILENET, BERT], 3.0)
    plan = get_policy("optimal").plan(p)
    check_plan(p, plan)
    assert not plan.feasible
    solver = plan.info["solver"]
    assert solver["status"] == "infeasible"
    lam = solver["served_fraction"]
    assert 0 < lam < 1
    for m in p.models:
        assert plan.served_rate(m.name) >= lam * m.rate_rps * (1 - 1e-4)
    assert {u.name for u in plan.unserved} <= {m.name for m in p.models}
    assert all("capacity" in u.reason for u in plan.unserved)


def test_model_without_load_is_placed() -> None:
    p = problem([{"sku": "L4"}], [RESNET, {**MOBILENET, "rate_rps": 0}], 0.3)
    plan = get_policy("optimal").plan(p)
    assert plan.feasible
    check_plan(p, plan)
    assert any(a.name == "mobilenet_v3_large" for _, part in plan.partitions() for a in part.models)


def test_unservable_model_is_reported() -> None:
    p = problem([{"sku": "L4"}], [RESNET, {**BERT, "slo_ms": 1}], 0.3)
    plan = get_policy("optimal").plan(p)
    check_plan(p, plan)
    assert not plan.feasible
    assert [u.name for u in plan.unserved] == ["bert_base"]
    assert plan.served_rate("resnet50") >= p.models[0].rate_rps * (1 - 1e-6)


@pytest.mark.parametrize(
    ("gpus", "n_models"), [([{"sku": "L4", "count": 5}], 2), ([{"sku": "L4"}], 9)]
)
def test_too_large_raises(gpus: list[dict[str, Any]], n_models: int) -> None:
    names = [
        "resnet50",
        "mobilenet_v3_large",
        "bert_base",
        "vgg16",
        "resnet18",
        "googlenet",
        "densenet121",
        "efficientnet_b0",
        "mnasnet1_0",
    ]
    models = [{"name": n, "slo_ms": 100, "rate_rps": 10} for n in names[:n_models]]
    with pytest.raises(PlanningError, match=r"too large for the exact solver.*--policy stgs"):
        get_policy("optimal").plan(problem(gpus, models))


def test_tiny_time_limit_does_not_crash() -> None:
    p = problem([{"sku": "H100-80GB"}], [RESNET, MOBILENET, BERT], 2.0, time_limit_s=0.01)
    plan = get_policy("optimal").plan(p)
    check_plan(p, plan)
    assert plan.policy == "optimal"
    assert plan.info["solver"]["status"] in {"time_limit", "optimal", "infeasible"}


def test_mps_inside_mig_is_placed_in_its_instance() -> None:
    """White box: a solution that hosts MPS shares in a MIG instance becomes a valid plan."""
    from partitioner.policies.optimal import _Solver

    p = problem([{"sku": "A100-40GB"}], [RESNET, MOBILENET], 0.2)
    solver = _Solver(p)
    solver._build(solver._configs())
    x = np.zeros(solver.lp.n)
    cols = solver.gpu_cols[0]
    prof, hosts = next((prof, hosts) for prof, hosts in cols.hosts.items() if hosts)
    layout = next(c for c, ms, _ in cols.layouts if ms[prof] >= 1)
    host, shares = max(hosts, key=lambda h: len(set(h[1])))
    x[layout] = x[host] = 1
    for pct in shares:
        use = next(
            u
            for u in solver.uses
            if u.sc.shape.mig_profile == prof and u.sc.shape.mps_pct == pct and u.cols
        )
        x[use.cols[0]] += 1
    plan = solver._assemble(x, "optimal", 1.0, {})
    check_plan(p, plan)
    hosted = [q for _, q in plan.partitions() if q.kind == "mps" and q.mig_profile == prof]
    assert hosted
    assert len({q.mig_start for q in hosted}) == 1
    assert plan.gpus[0].mode == "mig+mps"


def test_solver_prints_go_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """HiGHS writes debug lines to fd 1 even with disp off; they must not reach stdout (where
    `stgs plan --json` writes its JSON)."""
    import os

    from partitioner.policies.optimal import _stdout_to_stderr

    with _stdout_to_stderr():
        os.write(1, b"HighsMipSolverData::noise\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert "noise" not in out and "noise" in err
    assert out == "after\n"
