"""benchmarks/multi_gpu.py on the simulated node with two GPUs (issue 19): the daemon plans
across both, a load step moves a model between them without losing a request, a load drop gives
a GPU back (its workers and its MPS daemon gone); and the checks that decide it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import ROOT

from benchmarks.lib.kserve_load import NO_ANSWER
from benchmarks.multi_gpu import Model, moved, parse_rates, phase_table, pid_alive, placement

pytestmark = pytest.mark.slow


def test_multi_gpu_simulated(tmp_path: Path) -> None:
    out = tmp_path / "multi.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.multi_gpu",
            "--simulated",
            "--seconds",
            "3",
            "--settle-s",
            "1",
            # plans of MPS shares (the daemon's default, "fill", plans these rates as whole
            # GPUs): the GPU given back had an MPS daemon to stop
            "--planner",
            "spare_factor=1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    checks = {c["check"]: c for c in res["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    for name in (
        "a: plan across both GPUs",
        "a: every model >= 99% within SLO",
        "b: a model moved to the other GPU",
        "b: none lost",
        "c: a GPU given back (no partition on it)",
        "c: none lost",
    ):
        assert name in checks, sorted(checks)
    assert any(n.endswith("workers gone") for n in checks)
    mps = [c for n, c in checks.items() if n.endswith("MPS control daemon stopped")]
    assert mps and "one ran on it in the phase" in mps[0]["detail"], mps
    # what the checks read, from the plans the daemon served
    gpus_a = {g["index"] for g in res["plan_a"]["gpus"] if g["partitions"]}
    assert gpus_a == {0, 1}
    assert moved(placement({"plan": res["plan_a"]}), placement({"plan": res["plan_b"]}))
    assert len([g for g in res["plan_c"]["gpus"] if g["partitions"]]) == 1
    phases = res["phases"]
    assert all(r["sent"] > 0 for r in phases["b. load step"].values())
    assert sum(r["lost"] for p in phases.values() for r in p.values()) == 0
    assert "all 10 checks passed" in proc.stdout


def _view(*gpus: list[str]) -> dict[str, object]:
    return {
        "plan": {
            "gpus": [
                {"index": i, "partitions": [{"models": [{"name": n} for n in names]}]}
                for i, names in enumerate(gpus)
            ]
        }
    }


def test_moved_is_a_model_that_changed_gpus() -> None:
    before = placement(_view(["a", "b"], ["a", "c"]))
    assert before == {"a": {0, 1}, "b": {0}, "c": {1}}
    # a leaves GPU 1 (it shrinks onto GPU 0): not a move; c goes from GPU 1 to GPU 0: a move
    assert moved(before, placement(_view(["a", "b", "c"], []))) == ["c: GPU [1] -> [0]"]
    assert moved(before, placement(_view(["a", "b"], ["a", "c"]))) == []
    assert moved(before, placement(_view(["a", "b"], ["c"]))) == []


def test_phase_table_counts_lost_apart_from_shed() -> None:
    m = [Model("x", 100.0, 10.0)]
    rows = [
        (0, 0.0, 0.05, 200, 2),
        (0, 0.0, 0.20, 200, 2),  # late: answered, not within SLO
        (0, 0.0, 0.01, 429, 2),
        (0, 0.0, 0.01, 503, 2),
        (0, 0.0, 60.0, NO_ANSWER, 2),
        (0, 0.0, 0.01, -1, 2),  # a connection error
        (0, 0.0, 0.05, 200, 1),  # another phase
    ]
    t = phase_table("b", rows, 2, m)["x"]
    assert (t["sent"], t["ok"], t["429"], t["503"], t["lost"], t["other"]) == (6, 2, 1, 1, 2, 0)
    assert t["within_slo"] == pytest.approx(1 / 6)
    assert np.isfinite(t["p99_ms"])


def test_parse_rates_and_pids() -> None:
    m = [Model("x", 100.0, 10.0), Model("y", 50.0, 5.0)]
    assert parse_rates("y:20", m, "--step") == [10.0, 20.0]
    with pytest.raises(ValueError, match="no model 'z'"):
        parse_rates("z:1", m, "--step")
    assert pid_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.multi_gpu", "--simulated", "--step", "nosuch:3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "no model 'nosuch' in the mix" in proc.stderr
