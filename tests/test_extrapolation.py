"""No planning on unmeasured ground (issue 17): a partition smaller than the smallest profiled
one of its kind is planned with ``planner.extrapolation_margin`` on its extrapolated latency, or
not at all with ``"forbid"``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from plan_checker import build_models, check_plan

from partitioner.policies import get_policy
from partitioner.problem import Problem
from stgs.catalog import get_sku
from stgs.errors import ConfigError
from stgs.latency import LatencyModel
from stgs.profiles import read_profiles
from stgs.scenario import DEFAULT_EXTRAPOLATION_MARGIN, PlannerOptions, scenario_from_mapping

H100 = get_sku("H100-80GB")
SMALLEST_PCT = 20  # the profile's smallest MPS share
FLOOR = H100.mps_sm_count(SMALLEST_PCT)  # 26 SMs
BELOW = H100.mps_sm_count(12)  # the planner's 12% share: 14 SMs


def _toy_profile(path: Path) -> Path:
    """One model, Amdahl-like (0.3 + 20/s + b (2/s + 0.01) ms), measured on the whole GPU and
    at MPS 20, 50 and 100%: nothing below 20% (26 SMs)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["gpu", "model", "partition", "sm_count", "batch", "latency_ms", "memory_mib"])
        for part, pct in (("full", 100), ("mps:20", 20), ("mps:50", 50), ("mps:100", 100)):
            sm = H100.mps_sm_count(pct)
            for b in (1, 2, 4, 8, 16, 32):
                lat = 0.3 + 20 / sm + b * (2 / sm + 0.01)
                w.writerow(["H100-80GB", "toy", part, sm, b, round(lat, 4), 100 + b])
    return path


@pytest.fixture()
def toy(tmp_path: Path) -> Path:
    return _toy_profile(tmp_path / "toy.csv")


def _scenario(profile: Path, margin: Any) -> Any:
    """Eight light models on one H100 without MIG: trusting the extrapolation, its best plan
    puts them on 12% shares. The fixed batch margin (``batch_margin: z``) keeps the duty cycles
    near their batches' time, so that a slower latency breaks the cycles too (the "slo" margin
    plans longer cycles with room, which only the SLO rule then catches)."""
    return scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
            "profiles": str(profile),
            "models": [
                {"name": f"m{i}", "profile": "toy", "slo_ms": 30, "rate_rps": 100} for i in range(8)
            ],
            "planner": {"extrapolation_margin": margin, "batch_margin": "z"},
        }
    )


def _plan(sc: Any) -> Any:
    plan = get_policy("stgs").plan(Problem.from_scenario(sc))
    assert check_plan(plan, sc, *build_models(sc)) == []  # valid by the independent rules
    return plan


def test_the_latency_model_says_where_it_extrapolates(toy: Path) -> None:
    lm = LatencyModel(read_profiles(toy).rows_for("H100-80GB", "toy"))
    assert lm.smallest_measured(BELOW, kind="mps") == FLOOR
    assert lm.extrapolates(BELOW, kind="mps") and not lm.extrapolates(FLOOR, kind="mps")
    plain = lm.latency_ms(4, BELOW, kind="mps")
    assert lm.latency_ms(4, BELOW, kind="mps", extrapolation_margin=1.1) == pytest.approx(
        1.1 * plain
    )
    curve = lm.latency_curve([1, 4], BELOW, kind="mps", extrapolation_margin=1.25)
    assert list(curve) == pytest.approx([1.25 * x for x in lm.latency_curve([1, 4], BELOW)])
    # inside the measured range the margin changes nothing
    at = lm.latency_ms(4, FLOOR, kind="mps")
    assert lm.latency_ms(4, FLOOR, kind="mps", extrapolation_margin=1.1) == at
    with pytest.raises(ValueError, match="extrapolation_margin"):
        lm.latency_ms(4, BELOW, kind="mps", extrapolation_margin=0.9)


def test_planning_below_the_profiled_range(toy: Path) -> None:
    """Margin 1 (the extrapolation as it is): the plan uses 12% shares. The default margin
    multiplies the latency predicted there (the plan's latency_ms and the curve the planner
    plans with); "forbid": no partition below the smallest profiled share."""
    trust = _plan(_scenario(toy, 1))
    assert {p.mps_pct for _, p in trust.partitions()} == {12}

    sc = _scenario(toy, DEFAULT_EXTRAPOLATION_MARGIN)
    prob = Problem.from_scenario(sc)
    plain = Problem.from_scenario(_scenario(toy, 1))
    gt = prob.gpu_types[0]
    for shape in prob.shapes(gt):
        if shape.kind != "mps":
            continue
        c, c1 = prob.curve(prob.models[0], gt, shape), plain.curve(plain.models[0], gt, shape)
        assert c is not None and c1 is not None
        factor = DEFAULT_EXTRAPOLATION_MARGIN if shape.sm_count < FLOOR else 1.0
        assert list(c.raw_solo) == pytest.approx(list(factor * c1.raw_solo)), shape.label
    # the plan's latency_ms carries the factor: the checker re-derives it with the margin
    # (_plan asserts that), and without it every model on a 12% share is reported 1.1x off
    margined = _plan(sc)
    below = {a.name for _, p in margined.partitions() if p.sm_count < FLOOR for a in p.models}
    assert below, "the plan still uses 12% shares, now with the margin"
    sc1 = _scenario(toy, 1)
    off = [e for e in check_plan(margined, sc1, *build_models(sc1)) if "reported latency" in e]
    assert {e.split(": reported")[0].split()[-1] for e in off} == below

    forbid = _plan(_scenario(toy, "forbid"))
    parts = [p for _, p in forbid.partitions()]
    assert parts and all(p.sm_count >= FLOOR for p in parts)
    assert all((p.mps_pct or 100) >= SMALLEST_PCT for p in parts)
    assert {a.name for p in parts for a in p.models} == {f"m{i}" for i in range(8)}


def test_the_checker_holds_plans_to_the_margin(toy: Path) -> None:
    """A plan made trusting the extrapolation breaks the rules under "forbid" (a partition
    below the profiled range) and, judged with a margin of 2, its cycles no longer fit."""
    trust = _plan(_scenario(toy, 1))
    forbid = _scenario(toy, "forbid")
    errs = check_plan(trust, forbid, *build_models(forbid))
    assert errs and all("below the smallest profiled mps partition" in e for e in errs), errs
    twice = _scenario(toy, 2)
    errs = check_plan(trust, twice, *build_models(twice))
    assert any("> duty cycle" in e for e in errs) and any("> slo" in e for e in errs), errs


def test_the_option_and_its_default() -> None:
    assert PlannerOptions().extrapolation_margin == DEFAULT_EXTRAPOLATION_MARGIN > 1
    assert PlannerOptions(extrapolation_margin=" Forbid ").extrapolation_margin == "forbid"
    for bad in (0.5, 0, "never", True, 11):
        with pytest.raises(ValueError, match="extrapolation_margin must be"):
            PlannerOptions(extrapolation_margin=bad)
    with pytest.raises(ConfigError, match="extrapolation_margin"):
        _scenario(Path("unused.csv"), "sometimes")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "planner.md").read_text()
    assert f"`planner.extrapolation_margin`, default {DEFAULT_EXTRAPOLATION_MARGIN:g}" in doc
