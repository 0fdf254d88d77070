"""The shipped MEASURED profiles are the default, and plans made on them pass the checker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from plan_checker import build_models, check_plan

from partitioner.fluid import fluid_bound
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from profiler.models import ZOO as ZOO_MODELS
from stgs.latency import fit_report
from stgs.profiles import (
    default_interference_path,
    default_profiles_path,
    example_profiles_path,
    measured_interference_path,
    measured_profiles_path,
    read_interference,
    read_profiles,
)
from stgs.scenario import load_scenario, scenario_from_mapping

pytestmark = pytest.mark.shipped_profiles

ZOO = set(ZOO_MODELS)
# measured on a lent H200 in session 6 (benchmarks/results/2026-12-04-h200/)
H200_MODELS = {"resnet50", "vit_b_16", "bert_base", "mobilenet_v3_large", "efficientnet_b0"}
MEASURED = {"H100-80GB": ZOO, "H200-141GB": H200_MODELS}


def test_default_is_the_measured_set() -> None:
    assert default_profiles_path() == measured_profiles_path()
    assert default_interference_path() == measured_interference_path()
    table = read_profiles(measured_profiles_path())
    assert table.gpus() == sorted(MEASURED)
    for gpu, models in MEASURED.items():
        assert set(table.models(gpu)) == models
        for model in models:
            rows = table.rows_for(gpu, model)
            parts = {r.partition for r in rows}
            assert {"full", "mps:100", "mps:75", "mps:50", "mps:37", "mps:25", "mps:12"} <= parts
            assert {f"green:{n}" for n in range(16, 129, 16)} <= parts
            assert {r.batch for r in rows} == {1, 2, 4, 8, 16, 32, 64, 128}
            assert len(rows) == 15 * 8, (gpu, model)
    assert read_interference(measured_interference_path())  # co-location rows were measured


def test_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STGS_PROFILES", "example")
    assert default_profiles_path() == example_profiles_path()
    monkeypatch.setenv("STGS_PROFILES", "/somewhere/fleet.csv")
    assert str(default_profiles_path()) == "/somewhere/fleet.csv"
    assert default_interference_path().name == "fleet-interference.csv"


@pytest.mark.parametrize("gpu", sorted(MEASURED))
def test_fit_error_of_the_measured_set(gpu: str) -> None:
    """Held-out error per model, batch held out and SM count held out: issue #3's targets
    (median <= 5%, p95 <= 12%), as the tables in docs/profiling.md report them."""
    table = read_profiles(measured_profiles_path())
    for model in sorted(MEASURED[gpu]):
        rep = fit_report(table.rows_for(gpu, model))
        assert rep.n_points > 0
        assert rep.median_error <= 0.05, rep
        assert rep.p95_error <= 0.12, rep
        sm = fit_report(table.rows_for(gpu, model), mode="sm")
        assert sm.n_points > 0
        assert sm.median_error <= 0.05, sm
        assert sm.p95_error <= 0.12, sm


def _scenario(mig: bool, sku: str = "H100-80GB") -> dict[str, Any]:
    fourth = (
        {"name": "wav2vec2_base", "slo_ms": 100, "rate_rps": 40}
        if sku == "H100-80GB"
        else {"name": "vit_b_16", "slo_ms": 40, "rate_rps": 200}
    )
    return {
        "gpus": [{"sku": sku, "count": 2, "mig": mig}],
        "models": [
            {"name": "resnet50", "slo_ms": 30, "rate_rps": 600},
            {"name": "mobilenet_v3_large", "slo_ms": 15, "rate_rps": 300},
            {"name": "bert_base", "slo_ms": 60, "rate_rps": 120},
            fourth,
        ],
    }


@pytest.mark.parametrize("sku", sorted(MEASURED))
@pytest.mark.parametrize("mig", [True, False])
@pytest.mark.parametrize("policy", ["stgs", "temporal", "mig-only", "mps-only"])
def test_plans_on_measured_profiles_pass_the_checker(policy: str, mig: bool, sku: str) -> None:
    data = _scenario(mig, sku)
    prob = Problem.from_scenario(scenario_from_mapping(data))
    peak = find_peak(prob, get_policy(policy))
    assert peak.k <= fluid_bound(prob) * (1 + 1e-6)
    if peak.k <= 0:
        assert policy == "mig-only" and not mig  # no MIG: nothing to give each model
        return
    scaled = {**data, "models": [{**m, "rate_rps": m["rate_rps"] * peak.k} for m in data["models"]]}
    sc = scenario_from_mapping(scaled)
    lm, interference = build_models(sc)
    violations = check_plan(peak.plan, sc, lm, interference)
    assert violations == [], violations


def test_embedded_scenario_plans_on_measured_profiles() -> None:
    sc = load_scenario(str(measured_profiles_path().with_name("example-scenario.yaml")))
    assert {g.sku for g in sc.gpus} == {"H100-80GB"}
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"feasible": true' in out.stdout


def test_h200_scenario_plans_on_its_own_measured_rows(tmp_path: Path) -> None:
    """An H200 scenario of models measured there plans on the H200 rows; a model measured on
    the H100 only is a one-line error (exit 2) that says where it was profiled."""
    models = "\n".join(f"  - {{name: {m}, slo_ms: 40, rate_rps: 200}}" for m in sorted(H200_MODELS))
    sc = tmp_path / "h200.yaml"
    sc.write_text(f"gpus: [{{sku: H200-141GB, count: 2}}]\nmodels:\n{models}\n")
    out = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(sc), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["feasible"] is True
    assert {g["sku"] for g in plan["gpus"]} == {"H200-141GB"}
    sc.write_text("gpus: [{sku: H200-141GB}]\nmodels: [{name: vgg16, slo_ms: 100, rate_rps: 10}]\n")
    bad = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(sc)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "'vgg16' was profiled on H100-80GB only" in bad.stderr
