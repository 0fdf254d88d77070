"""The `stgs` command: plans, JSON against the schema, bad input -> exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from api.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "plan.schema.json").read_text())


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_plan_embedded_example_json_matches_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    jsonschema.validate(plan, SCHEMA)
    assert plan["format"] == "stgs.plan/v1" and plan["feasible"] is True


@pytest.mark.parametrize("policy", ["stgs", "temporal", "mig-only", "mps-only"])
def test_plan_table_every_policy(policy: str, tmp_path: Path) -> None:
    sc = tmp_path / "s.yaml"
    sc.write_text(
        "gpus: [{sku: H100-80GB, count: 2}]\n"
        "models: [{name: resnet50, slo_ms: 50, rate_rps: 400}, {name: bert_base, slo_ms: 100,"
        " rate_rps: 100}]\n"
    )
    r = run("plan", str(sc), "--policy", policy)
    assert r.returncode == 0, r.stderr
    assert "resnet50" in r.stdout and "bert_base" in r.stdout


def test_peak_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sc = tmp_path / "s.yaml"
    sc.write_text("gpus: [{sku: L4}]\nmodels: [{name: resnet18, slo_ms: 40, rate_rps: 100}]\n")
    assert main(["plan", str(sc), "--peak", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    jsonschema.validate(plan, SCHEMA)
    assert plan["k"] > 1 and plan["feasible"]
    assert plan["k"] <= plan["info"]["fluid_bound_k"] * (1 + 1e-6)


BAD = {
    "unknown-sku": "gpus: [{sku: X900}]\nmodels: [{name: resnet50, slo_ms: 50, rate_rps: 1}]\n",
    "missing-profile": "gpus: [{sku: L4}]\nmodels: [{name: nosuchnet, slo_ms: 50, rate_rps: 1}]\n",
    "negative-rate": "gpus: [{sku: L4}]\nmodels: [{name: resnet50, slo_ms: 50, rate_rps: -5}]\n",
    "malformed-yaml": "gpus: [{sku: L4\nmodels: [\n",
    "not-a-mapping": "- just\n- a list\n",
    "unknown-key": "gpus: [{sku: L4}]\nmodels: [{name: resnet50, slo: 50, rate_rps: 1}]\n",
    "mig-on-l4": (
        "gpus: [{sku: L4, mig: true}]\nmodels: [{name: resnet50, slo_ms: 50, rate_rps: 1}]\n"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exit_2_one_line(case: str, tmp_path: Path) -> None:
    sc = tmp_path / f"{case}.yaml"
    sc.write_text(BAD[case])
    r = run("plan", str(sc))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("stgs: error:")


def test_missing_file_and_unknown_policy() -> None:
    assert run("plan", "/nonexistent.yaml").returncode == 2
    r = run("plan", "--policy", "nope")
    assert r.returncode == 2 and "known:" in r.stderr


def test_infeasible_exit_1_with_reason(tmp_path: Path) -> None:
    sc = tmp_path / "s.yaml"
    sc.write_text("gpus: [{sku: L4}]\nmodels: [{name: vgg16, slo_ms: 1, rate_rps: 10}]\n")
    r = run("plan", str(sc))
    assert r.returncode == 1
    assert "cannot meet slo_ms=1" in r.stdout


def test_replan_keeps_layout_when_it_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 450 -> 470 req/s: the current partition holds the new rate at the same batches (no
    # worker restarts). A rate where a batch must grow restarts the worker either way, and a
    # fresh layout of the same cost may then win the tie.
    sc = tmp_path / "s.yaml"
    sc.write_text(
        "gpus: [{sku: H100-80GB, count: 2}]\n"
        "models: [{name: resnet50, slo_ms: 50, rate_rps: 450}, {name: vit_b_16, slo_ms: 80,"
        " rate_rps: 200}]\n"
    )
    assert main(["plan", str(sc), "--json"]) == 0
    cur = tmp_path / "cur.json"
    cur.write_text(capsys.readouterr().out)
    sc.write_text(sc.read_text().replace("rate_rps: 450", "rate_rps: 470"))
    assert main(["plan", str(sc), "--json", "--current", str(cur)]) == 0
    plan = json.loads(capsys.readouterr().out)
    ch = plan["info"]["changes"]
    assert ch["partitions_added"] == 0 and ch["partitions_removed"] == 0


def test_policies_and_fit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in ("stgs", "temporal", "mig-only", "mps-only", "optimal"):
        assert name in out
    assert main(["fit", "--gpu", "L4"]) == 0
    assert "resnet50" in capsys.readouterr().out
