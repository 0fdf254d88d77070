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
    # the doubled time-slicing policy cannot plan 2 x 4 x the rates on one GPU: accepted here
    # (the refusal without the flag has its own test)
    args = ["compare", str(experiment), "--out", str(out), "--jobs", "1", "--no-progress"]
    rc = main([*args, "--allow-infeasible"])
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


# ------------------------------------------------------------------ edges (issue 18)
SMALL = (
    "scenario: {gpus: [{sku: H100-80GB}], models: [{name: resnet50, slo_ms: 50, rate_rps: 100}]}\n"
)


def _compare(tmp_path: Path, text: str, *extra: str) -> tuple[int, Path]:
    p = tmp_path / "exp.yaml"
    p.write_text(SMALL + text)
    out = tmp_path / "out"
    rc = main(["compare", str(p), "--out", str(out), "--jobs", "1", "--no-progress", *extra])
    return rc, out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("policies: [stgs]\nseeds: []\n", "seeds"),
        ("policies: [stgs]\nseeds: [0, 0]\n", "a seed is listed twice"),
        ("policies: [stgs]\nseeds: [-1]\n", "seeds must be >= 0"),
        ("policies: [stgs]\nloads: [0]\n", "loads must be > 0"),
        ("policies: [stgs]\nloads: [-2]\n", "loads must be > 0"),
        ("policies: [stgs]\nloads: [1, 1]\n", "a load is listed twice"),
        (
            "policies: [stgs]\nsimulator: {duration_s: 2, warmup_s: 2}\n",
            "warmup_s (2) must be shorter than duration_s (2)",
        ),
        (
            "policies: [stgs]\nworkloads: [{name: s, kind: step, at_s: 5}]\n"
            "simulator: {duration_s: 2}\n",
            "never happens",
        ),
        ("policies: [stgs, 'no_such_module:P']\n", "cannot import policy"),
        ("policies: [stgs]\ngpu_sets: [{name: x, gpus: [{sku: X900}]}]\n", "unknown GPU SKU"),
        ("policies: [stgs]\ngpu_sets: [{name: x, gpus: [{sku: L4, count: 0}]}]\n", "count"),
        ("policies: [stgs]\nworkloads: [{name: t, kind: trace, path: t.csv}]\n", "models not"),
    ],
)
def test_impossible_settings_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    (tmp_path / "t.csv").write_text("time_s,model\n0.1,resnet50\n0.2,vit_b_16\n")
    rc, out = _compare(tmp_path, text)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing ran, nothing written


def test_no_request_at_all_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(
        "scenario: {gpus: [{sku: H100-80GB}], models: [{name: resnet50, slo_ms: 50,"
        " rate_rps: 0}]}\npolicies: [stgs]\n"
    )
    assert main(["compare", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "every model's rate_rps is 0" in capsys.readouterr().err


def test_negative_jobs_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "exp.yaml"
    p.write_text(SMALL + "policies: [stgs]\n")
    assert main(["compare", str(p), "--out", str(tmp_path / "o"), "--jobs", "-1"]) == 2
    assert "--jobs -1" in capsys.readouterr().err


FLAKY = """
from partitioner.policies import Policy, get_policy


class Flaky(Policy):
    name = "flaky"

    def plan(self, problem, current=None):
        if problem.models[0].rate_rps > 150:
            raise RuntimeError("boom above 150 req/s")
        return get_policy("stgs").plan(problem, current)
"""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failing_cell_keeps_the_finished_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: str
) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    p = tmp_path / "exp.yaml"
    p.write_text(
        SMALL + "policies: [stgs, 'flaky:Flaky']\nloads: [1, 2]\nseeds: [0, 1]\n"
        "simulator: {duration_s: 1}\n"
    )
    out = tmp_path / "out"
    rc = main(["compare", str(p), "--out", str(out), "--jobs", jobs, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    assert "cell failed: 1xH100-80GB x poisson x 2 x flaky:Flaky: RuntimeError: boom" in (
        captured.err
    )
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    done = {(r["policy"], float(r["load"])) for r in rows}
    assert done == {("stgs", 1.0), ("stgs", 2.0), ("flaky:Flaky", 1.0)}
    assert len(rows) == 3 * 2  # two seeds each
    data = json.loads((out / "results.json").read_text())
    assert data["failed"] == [
        {
            "policy": "flaky:Flaky",
            "workload": "poisson",
            "gpu_set": "1xH100-80GB",
            "load": 2.0,
            "error": "RuntimeError: boom above 150 req/s",
        }
    ]
    assert (out / "plots" / "attainment_vs_load.png").is_file()


def test_infeasible_runs_exit_1_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "policies: [stgs]\nloads: [1, 500]\nsimulator: {duration_s: 0.5}\n"
    rc, out = _compare(tmp_path, text)
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 of 2 run(s) started from a plan that cannot serve every rate" in err
    assert "1xH100-80GB x poisson x 500 x stgs" in err and "--allow-infeasible" in err
    assert (out / "results.csv").is_file()  # the results are written all the same
    rc, _ = _compare(tmp_path, text, "--allow-infeasible")
    assert rc == 0
    with (out / "summary.csv").open() as f:
        summary = {float(r["load"]): r for r in csv.DictReader(f)}
    assert summary[500.0]["infeasible"] == "1" and summary[1.0]["infeasible"] == "0"


def test_confidence_intervals_over_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from scipy import stats

    from partitioner.sim.compare import summarise
    from partitioner.sim.plots import series

    rc, out = _compare(
        tmp_path, "policies: [stgs]\nloads: [1, 2]\nseeds: [0, 1, 2]\nsimulator: {duration_s: 1}\n"
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "means ± 95% CI" in table and " ± " in table
    with (out / "results.csv").open() as f:
        runs = list(csv.DictReader(f))
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 2
    for s in summary:
        vals = np.array(
            [float(r["goodput_rps"]) for r in runs if float(r["load"]) == float(s["load"])]
        )
        assert len(vals) == 3 and vals.std() > 0  # the seeds differ
        half = stats.t.ppf(0.975, 2) * vals.std(ddof=1) / np.sqrt(3)
        assert float(s["goodput_rps"]) == pytest.approx(vals.mean(), rel=1e-5)
        assert float(s["goodput_rps_ci95"]) == pytest.approx(half, rel=1e-5)
        assert s["seeds"] == "3"
    rows = json.loads((out / "results.json").read_text())["runs"]
    x, y, err = series(summarise(rows), "1xH100-80GB", "poisson", "stgs", "goodput_rps")
    assert x == [1.0, 2.0] and err is not None and all(e > 0 for e in err)
    assert y == pytest.approx([float(s["goodput_rps"]) for s in summary], rel=1e-5)
    assert err == pytest.approx([float(s["goodput_rps_ci95"]) for s in summary], rel=1e-5)
    # one seed: no interval (no ±, empty columns, no error bars)
    one = [r for r in rows if r["seed"] == 0]
    s1 = summarise(one)
    assert all(np.isnan(s["goodput_rps_ci95"]) for s in s1)
    assert series(s1, "1xH100-80GB", "poisson", "stgs", "goodput_rps")[2] is None


MARKER = """
from pathlib import Path

from partitioner.policies import Policy, get_policy


class Marker(Policy):
    name = "marker"

    def plan(self, problem, current=None):
        Path(__file__).with_name("planned").touch()
        return get_policy("stgs").plan(problem, current)
"""


def test_unknown_policy_after_a_good_one_refused_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cells of the first policy would run first (and did, before the check moved up)."""
    (tmp_path / "marker.py").write_text(MARKER)
    rc, out = _compare(tmp_path, "policies: ['marker:Marker', nope]\nsimulator: {duration_s: 1}\n")
    assert rc == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "planned").exists() and not out.exists()
    # the control: the marker policy alone runs, and leaves its mark
    rc, out = _compare(tmp_path, "policies: ['marker:Marker']\nsimulator: {duration_s: 1}\n")
    assert rc == 0 and (tmp_path / "planned").exists()
