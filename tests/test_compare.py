"""`stgs compare` end to end on a tiny grid: outputs, an out-of-tree policy, a trace workload,
identical results whatever the number of processes, one-line errors for bad experiments."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from api.cli import main
from partitioner.sim.compare import load_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]

POLICY = """
from partitioner.policies import Policy, get_policy


class Doubled(Policy):
    name = "doubled"

    def plan(self, problem, current=None):
        return get_policy("temporal").plan(
            problem.with_models([m.scaled(2) for m in problem.models]), current
        )
"""

EXPERIMENT = """
name: tiny
scenario:
  gpus: [{sku: H100-80GB, count: 1}]
  models:
    - {name: resnet50, slo_ms: 50, rate_rps: 200}
    - {name: bert_base, slo_ms: 100, rate_rps: 40}
    - {name: mobilenet_v3_large, slo_ms: 15, rate_rps: 60}
policies: [stgs, mps-only, "tiny_policy:Doubled"]
workloads:
  - {name: poisson, kind: poisson}
  - {name: trace, kind: trace, path: trace-small.csv}
  - {name: step, kind: step, at_s: 1, factor: 3, controller: true}
loads: [1, 4]
seeds: [0, 1]
simulator:
  duration_s: 3
  warmup_s: 0.5
  controller: {interval_s: 0.5, rate_halflife_s: 0.5, hold_s: 1}
"""


@pytest.fixture()
def experiment(tmp_path: Path) -> Path:
    (tmp_path / "tiny_policy.py").write_text(POLICY)
    shutil.copy(ROOT / "examples" / "trace-small.csv", tmp_path / "trace-small.csv")
    p = tmp_path / "exp.yaml"
    p.write_text(EXPERIMENT)
    return p


def test_compare_cli_end_to_end(
    experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = main(["compare", str(experiment), "--out", str(out), "--jobs", "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiny_policy:Doubled" in text and "SLO att." in text
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 * 2 * 2
    assert {r["policy"] for r in rows} == {"stgs", "mps-only", "tiny_policy:Doubled"}
    for r in rows:
        assert 0.0 <= float(r["slo_attainment"]) <= 1.0
        assert int(r["requests"]) > 0
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == "stgs.compare/v1" and len(data["runs"]) == len(rows)
    assert set(data["runs"][0]["per_model"]) == {"resnet50", "bert_base", "mobilenet_v3_large"}
    resolved = json.loads((out / "experiment.resolved.json").read_text())
    assert resolved["format"] == "stgs.experiment/v1"
    assert resolved["simulator"]["reconfig"]["mig_create_s"] > 0
    for name in ("attainment_vs_load", "goodput_vs_load", "gpus_needed", "attainment_over_time"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.csv").is_file()


def test_compare_same_results_with_more_processes(experiment: Path) -> None:
    exp = load_experiment(experiment)
    exp = type(exp)(
        exp.spec.model_copy(update={"workloads": exp.spec.workloads[0::2], "loads": [2.0]}),
        exp.base_dir,
        exp.scenario,
        exp.gpu_sets,
    )
    one = run_experiment(exp, jobs=1, progress=False)
    two = run_experiment(exp, jobs=2, progress=False)

    def strip(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "plan_s")} for r in rows]

    assert json.dumps(strip(one), sort_keys=True) == json.dumps(strip(two), sort_keys=True)


def test_two_experiments_in_one_process_use_their_own_models(tmp_path: Path) -> None:
    """The per-process problem cache is keyed by the scenario, not by its index in one
    experiment: a second experiment whose GPU set 0 holds other models gets its own problem
    (keyed by index, it got the first one's and failed with a KeyError on its model names)."""
    rows = {}
    for name, models in (
        ("a", "[{name: resnet50, slo_ms: 50, rate_rps: 100}]"),
        (
            "b",
            "[{name: vit_b_16, slo_ms: 40, rate_rps: 80}, {name: bert_base, slo_ms: 100,"
            " rate_rps: 20}]",
        ),
    ):
        p = tmp_path / f"{name}.yaml"
        p.write_text(
            f"scenario: {{gpus: [{{sku: H100-80GB}}], models: {models}}}\npolicies: [stgs]\n"
            "loads: [1]\nseeds: [0]\nsimulator: {duration_s: 2, warmup_s: 0.5}\n"
        )
        rows[name] = run_experiment(load_experiment(p), jobs=1, progress=False)
    assert set(rows["a"][0]["per_model"]) == {"resnet50"}
    assert set(rows["b"][0]["per_model"]) == {"vit_b_16", "bert_base"}
    assert all(r["requests"] > 0 for r in rows["a"] + rows["b"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            "scenario: {gpus: [{sku: H100-80GB}], models: [{name: resnet50, slo_ms: 50, "
            "rate_rps: 1}]}\npolicies: [stgs]\nloadz: [1]\n",
            "loadz",
        ),
        (
            "scenario: {gpus: [{sku: H100-80GB}], models: [{name: resnet50, slo_ms: 50, "
            "rate_rps: 1}]}\npolicies: [nope]\n",
            "unknown policy",
        ),
        (
            "scenario: {gpus: [{sku: H100-80GB}], models: [{name: resnet50, slo_ms: 50, "
            "rate_rps: 1}]}\npolicies: [stgs]\nworkloads: [{name: t, kind: trace}]\n",
            "path",
        ),
    ],
)
def test_bad_experiment_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    rc = main(["compare", str(p), "--out", str(tmp_path / "o"), "--jobs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1
