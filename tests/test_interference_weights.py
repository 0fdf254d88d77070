"""MPS interference by what the neighbours run (issue 17): neighbour weights stored once as data
(``stgs/data/interference-weights.json``, ``stgs.interference``), read by the planner, the plan
checker and the simulator; the GPU benchmark that measures them (``benchmarks/
interference_gpu.py``) and the fit that writes the file, run here with ``--simulated``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import ROOT
from plan_checker import build_models, check_plan

from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim import SimOptions, WorkloadSpec, generate
from partitioner.sim.run import simulate
from stgs import interference as iw
from stgs.errors import ConfigError
from stgs.interference import GpuWeights, WeightsFile, WeightsProvenance, load_weights
from stgs.latency import InterferenceModel
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.scenario import scenario_from_mapping

PROV = WeightsProvenance(command="test", fitted="today", runs=[{"command": "test"}])


def _weights(batches: list[int], weights: list[float], reference: int = 8) -> WeightsFile:
    entry = GpuWeights(reference_batch=reference, batches=batches, weights=weights, provenance=PROV)
    return WeightsFile(format=iw.FORMAT, gpus={"H100-80GB": entry})


@pytest.fixture()
def weights_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``$STGS_INTERFERENCE_WEIGHTS`` at a file of the test's (written by the test)."""
    path = tmp_path / "weights.json"
    monkeypatch.setenv(iw.INTERFERENCE_WEIGHTS_ENV, str(path))
    iw._default.cache_clear()
    yield path
    iw._default.cache_clear()


def test_the_shipped_file_weighs_every_neighbour_1_until_measured() -> None:
    shipped = load_weights(iw.shipped_weights_path())
    assert shipped.format == iw.FORMAT
    im = InterferenceModel()
    for gpu in ("H100-80GB", "H200-141GB", "L4"):
        for batch in (1, 2, 8, 128, None):
            assert im.neighbour_weight(gpu, batch) == 1.0
    g = im.gamma("resnet50", "H100-80GB")
    assert im.slowdown_beside("resnet50", "H100-80GB", [(25, 1), (25, 32)]) == pytest.approx(
        1 + g * 0.5
    )


def test_a_weight_is_that_of_the_smallest_listed_batch_at_or_above() -> None:
    w = _weights([1, 2, 4], [0.2, 0.5, 0.7])
    assert [w.weight("H100-80GB", b) for b in (1, 2, 3, 4, 6, 8, 64, None)] == [
        0.2,
        0.5,
        0.7,
        0.7,
        1.0,  # between the largest listed and the reference: not measured
        1.0,
        1.0,
        1.0,  # batch not known: the worst case
    ]
    assert w.weight("h100 80gb", 1) == 0.2  # GPU names as elsewhere
    assert w.weight("H200-141GB", 1) == 1.0  # no entry: unmeasured


@pytest.mark.parametrize(
    ("batches", "weights", "why"),
    [
        ([1, 2], [0.5, 0.4], "decrease"),
        ([1, 8], [0.2, 0.5], "below the reference"),
        ([2, 1], [0.2, 0.5], "increasing"),
        ([1], [1.5], "must be in"),
        ([1, 2], [0.5], "same length"),
    ],
)
def test_bad_weights_are_refused(batches: list[int], weights: list[float], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        GpuWeights(reference_batch=8, batches=batches, weights=weights, provenance=PROV)


def test_a_bad_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "w.json"
    bad.write_text(json.dumps({"format": "stgs.interference-weights/v0", "gpus": {}}))
    with pytest.raises(ConfigError, match="interference weights file"):
        load_weights(bad)


def test_a_neighbour_at_small_batches_costs_less() -> None:
    im = InterferenceModel(weights=_weights([1, 2], [0.25, 0.5]))
    g = im.gamma("resnet50", "H100-80GB")
    assert im.slowdown("resnet50", "H100-80GB", 50, 1) == pytest.approx(1 + g * 0.5 * 0.25)
    assert im.slowdown("resnet50", "H100-80GB", 50, 32) == pytest.approx(1 + g * 0.5)
    assert im.slowdown("resnet50", "H100-80GB", 50) == pytest.approx(1 + g * 0.5)
    beside = im.slowdown_beside("resnet50", "H100-80GB", [(25, 2), (25, None)])
    assert beside == pytest.approx(1 + g * (0.25 * 0.5 + 0.25))


LIGHT = {
    "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
    # low rates: small batches on MPS shares beside each other
    "models": [
        {"name": "resnet50", "slo_ms": 30, "rate_rps": 40},
        {"name": "mobilenet_v3_large", "slo_ms": 20, "rate_rps": 60},
        {"name": "vit_b_16", "slo_ms": 40, "rate_rps": 30},
        {"name": "efficientnet_b0", "slo_ms": 25, "rate_rps": 50},
    ],
    "planner": {"max_models_per_partition": 1},
}


def _mps_latencies(plan: Any) -> dict[str, float]:
    return {a.name: a.latency_ms for _, p in plan.partitions() if p.kind == "mps" for a in p.models}


def test_plans_report_the_interference_of_their_neighbours_batches(weights_env: Path) -> None:
    """The planner sizes partitions for the worst case; the plan reports each partition's
    slowdown beside its neighbours at their batches, and the independent checker agrees."""
    shutil.copy(iw.shipped_weights_path(), weights_env)
    sc = scenario_from_mapping(LIGHT)
    before = get_policy("stgs").plan(Problem.from_scenario(sc))
    weights_env.write_text(
        json.dumps(_weights([1, 2, 4], [0.0, 0.0, 0.0], reference=64).model_dump())
    )
    iw._default.cache_clear()
    prob = Problem.from_scenario(sc)
    after = get_policy("stgs").plan(prob)
    assert check_plan(after, sc, *build_models(sc)) == []
    lat_before, lat_after = _mps_latencies(before), _mps_latencies(after)
    assert len(lat_after) >= 2, after  # MPS partitions beside each other
    # the same partitions (the planner charges the worst case either way) ...
    assert [
        p.models for _, p in before.partitions()
    ] != [] and lat_before.keys() == lat_after.keys()
    # ... reported faster: every neighbour runs batches <= 4 (weight 0), so no interference
    assert max(a.batch for _, p in after.partitions() for a in p.models) <= 4
    for name, ms in lat_after.items():
        assert ms < lat_before[name] / 1.05, name
    # and the checker holds a plan to the weights: the former reported latencies are wrong now
    assert any("reported latency_ms" in e for e in check_plan(before, sc, *build_models(sc)))


def test_the_simulator_weighs_a_neighbour_by_the_batch_it_runs() -> None:
    """Two MPS partitions side by side, the neighbour busy with batches of vgg16: weighing its
    batches 0, the victim's simulated latency is shorter than weighing them 1."""
    sc = scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
            "models": [
                {"name": "resnet50", "slo_ms": 60, "rate_rps": 200},
                {"name": "vgg16", "slo_ms": 100, "rate_rps": 1500},
            ],
        }
    )
    base = Problem.from_scenario(sc)

    def part(name: str, batch: int, rate: float) -> Partition:
        assigned = (ModelAssignment(name, batch, rate, 5.0),)
        return Partition("mps", 66, 40000.0, 30.0, assigned, mps_pct=50)

    gpu = GpuPlan(0, "H100-80GB", False, (part("resnet50", 8, 200), part("vgg16", 32, 1500)))
    plan = Plan("test", True, (gpu,))

    def p50(weights: WeightsFile) -> float:
        im = InterferenceModel(base.interference.gammas, base.interference.default_gamma, weights)
        prob = Problem(base.gpus, base.models, base.latency, im, base.headroom, base.options)
        rates = {"resnet50": 200.0, "vgg16": 1500.0}
        arrivals = generate(WorkloadSpec(name="poisson"), rates, 3.0, seed=0)
        opts = SimOptions(duration_s=3.0, noise="off", host={"enabled": False})
        _, metrics = simulate(prob, get_policy("stgs"), arrivals, rates, opts, seed=0, plan=plan)
        out = metrics.per_model["resnet50"]
        assert out["dropped"] == 0
        return float(out["p50_ms"])

    every = p50(_weights([1], [1.0]))
    free = p50(_weights([4095], [0.0], reference=4096))  # any batch: weight 0
    assert free < every * 0.97, (free, every)


# ------------------------------------------------------------------------------ benchmark
def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.interference_gpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--victim", "resnet50:60", "--neighbours", "vgg16:50"], "sum to 110%"),
        (["--victim", "nonesuch:50"], "unknown model"),
        (["--neighbours", "vgg16:50,resnet18:10,bert_base:10"], "one or two"),
        (["--neighbour-batches", "1,2,32"], "reference batch 8"),
        (["--victim-batches", "0"], "batch sizes in 1..512"),
        (["--out", "x.json"], "go with --fit"),
    ],
)
def test_the_benchmark_refuses_bad_arguments(args: list[str], why: str) -> None:
    r = _bench(*args, "--simulated")
    assert r.returncode == 2, r
    assert why in r.stderr


def test_the_simulated_run_fits_into_a_weights_file(tmp_path: Path) -> None:
    run = tmp_path / "run.json"
    r = _bench("--simulated", "--neighbours", "vgg16:25,mobilenet_v3_large:25", "--json", str(run))
    assert r.returncode == 0, r.stderr
    assert "| 8 | batch 1 |" in r.stdout and "x alone" in r.stdout
    doc = json.loads(run.read_text())
    assert doc["format"] == iw.BENCH_FORMAT and doc["simulated"] is True
    assert {p["phase"] for p in doc["points"]} == {"alone", "idle", "busy"}
    assert len(doc["points"]) == 2 * (2 + 4)
    # a simulated run is not a measurement: refused unless asked, and never into the shipped file
    refused = _bench("--fit", str(run))
    assert refused.returncode == 2 and "not a measurement" in refused.stderr
    shipped = _bench("--fit", str(run), "--allow-simulated")
    assert shipped.returncode == 2 and "--out" in shipped.stderr
    out = tmp_path / "weights.json"
    fit = _bench("--fit", str(run), "--allow-simulated", "--out", str(out))
    assert fit.returncode == 0, fit.stderr
    w = load_weights(out)
    entry = w.gpus["H100-80GB"]
    assert entry.batches == [1, 2] and entry.reference_batch == 8
    # the synthetic law's weights, b / (b + 4) relative to 8 / 12: 0.3 and 0.5 (1% noise)
    assert entry.weights == pytest.approx([0.3, 0.5], abs=0.12)
    assert w.weight("H100-80GB", 1) < w.weight("H100-80GB", 2) < w.weight("H100-80GB", 8) == 1
    assert "interference_gpu --simulated" in entry.provenance.runs[0]["command"]


def test_fit_refuses_runs_without_an_effect_or_the_reference() -> None:
    run = {
        "format": iw.BENCH_FORMAT,
        "gpu": "H100-80GB",
        "victim": {"model": "resnet50"},
        "points": [
            {"phase": "alone", "victim_batch": 8, "neighbour_batch": None, "median_ms": 2.0},
            {"phase": "busy", "victim_batch": 8, "neighbour_batch": 1, "median_ms": 2.01},
            {"phase": "busy", "victim_batch": 8, "neighbour_batch": 8, "median_ms": 2.02},
        ],
    }
    with pytest.raises(ConfigError, match="no victim shows interference"):
        iw.fit_weights([run], reference_batch=8, command="c", fitted="d")
    with pytest.raises(ConfigError, match="no neighbour batch 32"):
        iw.fit_weights([run], reference_batch=32, command="c", fitted="d")
    with pytest.raises(ConfigError, match="several GPUs"):
        iw.fit_weights([run, {**run, "gpu": "L4"}], reference_batch=8, command="c", fitted="d")


@pytest.mark.skipif(
    shutil.which("nvidia-cuda-mps-control") is not None, reason="a GPU host: MPS would start"
)
def test_without_a_gpu_the_benchmark_says_why_and_does_not_hang() -> None:
    r = _bench("--budget-s", "30", timeout=60)
    assert r.returncode == 2
    assert "nvidia-cuda-mps-control" in r.stderr
