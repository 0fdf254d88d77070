"""benchmarks/triton_gpu.py: the sharing policies the daemon serves as baselines, NVIDIA Triton
(nvidia-pytriton) serving stgs's model code, one trial's verdict, and the whole path in
--simulated mode (every system behind HTTP, driven by the same KServe v2 client).

Triton's tests need nvidia-pytriton in its own directory (``make setup``: .venv/triton-site,
scripts/install_pytriton.sh; or ``STGS_TRITON_SITE``): they skip without it, or fail where
``STGS_REQUIRE_PYTRITON=1`` (CI)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from _helpers import run_python

from partitioner.policies import get_policy, policy_names
from partitioner.policies.sharing import SHARING, Concurrent, EqualMps, TimeSlice
from partitioner.problem import Problem
from stgs.scenario import scenario_from_mapping

MIX = (
    "resnet50:15:300,mobilenet_v3_large:10:300,vit_b_16:20:150,bert_base:25:150,"
    "efficientnet_b0:10:300"
)


@pytest.fixture(scope="module")
def tg() -> ModuleType:
    return importlib.import_module("benchmarks.triton_gpu")


@pytest.fixture(scope="module")
def bl() -> ModuleType:
    return importlib.import_module("benchmarks.baselines_gpu")


def _problem(text: str, gpus: list[dict[str, Any]] | None = None) -> Problem:
    models = [
        {"name": n, "slo_ms": float(s), "rate_rps": float(r)}
        for n, s, r in (x.split(":") for x in text.split(","))
    ]
    gpus = gpus or [{"sku": "H100-80GB", "count": 1, "mig": False}]
    return Problem.from_scenario(scenario_from_mapping({"gpus": gpus, "models": models}))


def pytriton_site() -> Path:
    import sys

    for cand in (os.environ.get("STGS_TRITON_SITE"), str(Path(sys.prefix) / "triton-site")):
        if cand and (Path(cand) / "pytriton").is_dir():
            return Path(cand)
    why = (
        "nvidia-pytriton is not installed: `make setup` installs it into .venv/triton-site"
        " (scripts/install_pytriton.sh), or set STGS_TRITON_SITE"
    )
    if os.environ.get("STGS_REQUIRE_PYTRITON") == "1":
        pytest.fail(why + "; STGS_REQUIRE_PYTRITON=1 requires it")
    pytest.skip(why)


# ---------------------------------------------------------------------- the sharing policies
@pytest.mark.shipped_profiles
def test_sharing_policies_place_one_partition_per_model(bl: ModuleType) -> None:
    prob = _problem(MIX)
    models = bl.parse_models(MIX)
    rates = {m.name: m.rate_rps for m in models}
    full, at20 = bl.max_batches(models), bl.mps_max_batches(models, 20, 0.1)
    for policy, kind, pct, batches in (
        (TimeSlice(), "full", None, full),
        (EqualMps(), "mps", 20, at20),
        (Concurrent(), "mps", 100, full),
    ):
        plan = policy.plan(prob)
        assert plan.feasible and not plan.unserved, policy.name
        parts = [p for _, p in plan.partitions()]
        assert len(parts) == len(models)
        assert {p.models[0].name for p in parts} == {m.name for m in models}
        for p in parts:
            (a,) = p.models
            assert (p.kind, p.mps_pct) == (kind, pct)
            assert a.batch == batches[a.name]  # the baselines' rule, in one place
            assert a.rate_rps == pytest.approx(rates[a.name])
            assert 0 < a.latency_ms <= p.duty_cycle_ms
    # the batch fits twice in the SLO alone; the next power of two does not (where profiled)
    assert full == {
        "resnet50": 64,
        "mobilenet_v3_large": 64,
        "vit_b_16": 64,
        "bert_base": 64,
        "efficientnet_b0": 32,
    }


@pytest.mark.shipped_profiles
def test_sharing_policies_refuse_what_they_cannot_serve() -> None:
    hot = _problem(MIX.replace(":300", ":30000").replace(":150", ":15000"))
    for policy in (TimeSlice(), EqualMps(), Concurrent()):
        plan = policy.plan(hot)
        assert not plan.feasible and plan.unserved, policy.name
        assert len(plan.partitions()) == 5  # placed all the same: serving what they can
        for m in hot.models:
            lost = sum(u.rate_rps for u in plan.unserved if u.name == m.name)
            assert plan.served_rate(m.name) + lost == pytest.approx(m.rate_rps, rel=1e-6)
    # time slicing: the five share one GPU's time, so together they serve at most all of it
    ts = TimeSlice().plan(hot)
    busy = sum(a.rate_rps * a.latency_ms / a.batch for _, p in ts.partitions() for a in p.models)
    assert busy <= 1000.0 * 1.0001
    # GPUs in MIG mode: nothing placed, everything unserved with the reason
    mig = EqualMps().plan(_problem(MIX, [{"sku": "H100-80GB", "count": 1, "mig": True}]))
    assert not mig.feasible and not mig.partitions()
    assert {u.name for u in mig.unserved} == {m.name for m in hot.models}
    assert "without MIG" in mig.unserved[0].reason
    # two GPUs: the models alternate, each GPU's MPS shares split among its own models
    two = EqualMps().plan(_problem(MIX, [{"sku": "H100-80GB", "count": 2, "mig": False}]))
    assert [len(g.partitions) for g in two.gpus] == [3, 2]
    assert [g.partitions[0].mps_pct for g in two.gpus] == [33, 50]


def test_sharing_policies_are_served_by_dotted_path_only() -> None:
    from api.config import PlannerConfig

    for name, path in SHARING.items():
        assert get_policy(path).name == name
        assert PlannerConfig(policy=path).policy == path  # the daemon's config takes it
        # not a planner policy: the plan checker, simulator and `stgs compare` never see it
        assert name not in policy_names()


# ---------------------------------------------------------------------- one trial, the rules
def test_trial_from_records(tg: ModuleType) -> None:
    models = tg.parse_models("a:10:100,b:20:50")
    ok_a = [(0, 0.0005, 0.005, 200)] * 99 + [(0, 0.0005, 0.011, 200)]  # 1 late: 99%
    ok_b = [(1, 0.0005, 0.015, 200)] * 98 + [(1, 0.0005, 0.001, 429), (1, 0.003, 0.001, -1)]
    tr = tg.trial_from_records(ok_a + ok_b, models, [100.0, 50.0], 1.0, 0.99, 2.0)
    assert tr["attainment"] == {"a": 0.99, "b": 0.98}
    assert not tr["passed"] and tr["worst_model"] == "b" and tr["verdict"] == "fail"
    rows = {r["model"]: r for r in tr["rows"]}
    assert rows["b"]["codes"] == {"200": 98, "429": 1, "-1": 1} and rows["b"]["errors"] == 2
    assert rows["all"]["sent"] == 200 and rows["all"]["within_slo"] == 99 + 98
    assert rows["a"]["p99_ok_ms"] is not None and tr["rate_rps"] == 150.0
    # the same misses with the client far behind its schedule: not the system's failure
    lagging = [(i, 0.05, lat, c) for i, _, lat, c in ok_a + ok_b]
    tr = tg.trial_from_records(lagging, models, [100.0, 50.0], 1.0, 0.99, 2.0)
    assert tr["load_generator_limited"] and tr["verdict"] == "load generator limited"
    assert tg.trial_outcome(tr) is None
    tr = tg.trial_from_records(ok_a, models, [100.0, 50.0], 1.0, 0.99, 2.0)
    assert not tr["passed"] and tr["attainment"]["b"] is None  # nothing sent counts as 0


@pytest.mark.shipped_profiles
def test_triton_models_rule(tg: ModuleType, bl: ModuleType) -> None:
    prob = _problem(MIX)
    got = {m["name"]: m for m in tg.triton_models(prob, 0.5)}
    full = bl.max_batches(bl.parse_models(MIX))
    for m in prob.models:
        t = got[m.name]
        assert t["max_batch"] == full[m.name]
        assert 0 < 2 * t["latency_ms"] <= m.slo_ms
        slack_us = (m.slo_ms - 2 * t["latency_ms"]) * 1000
        assert t["queue_delay_us"] == int(0.5 * slack_us)
        assert t["timeout_us"] == int(m.slo_ms * 1000)
    assert all(m["queue_delay_us"] == 0 for m in tg.triton_models(prob, 0.0))


def test_triton_python_says_what_is_missing(tg: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no nvidia-pytriton"):
        tg.triton_python(tmp_path / "empty", tmp_path)
    stubs = tmp_path / "site" / "pytriton" / "tritonserver" / "python_backend_stubs" / "3.0"
    stubs.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no Python backend stub"):
        tg.triton_python(tmp_path / "site", tmp_path)


def test_one_request_for_every_system(tg: ModuleType) -> None:
    """The client sends each model the request that stgs's API parses (a built-in's input is
    ``input`` there, whatever the registry calls it: bert_base's ``input_ids``), and Triton's
    server binds the same names."""
    import argparse
    from types import SimpleNamespace

    from api.inference import model_io, parse_infer
    from api.kserve import HEADER, binary_request
    from benchmarks import _triton_server
    from stgs.registry import model_entry

    assert (_triton_server.INPUT, _triton_server.OUTPUT) == ("input", "output")
    mix = tg.parse_models("bert_base:25:1,tiny_mlp:50:1,tiny_cnn:50:1")
    run = tg.Run(argparse.Namespace(json=None), mix, {})
    for m, t in zip(mix, run.targets, strict=True):
        lookup = SimpleNamespace(
            record=lambda name: SimpleNamespace(spec={}),
            entry=lambda rec, name=m.name: model_entry(name),
        )
        body, headers = binary_request(t.inputs(), binary_output=True)
        call = parse_infer(body, headers[HEADER], model_io(lookup, m.name))
        assert call is not None, m.name
    assert model_entry("bert_base").inputs[0].name == "input_ids"  # what this test is about


# ---------------------------------------------------------------------- Triton, for real
def test_triton_serves_stgs_model_code_on_cpu(tg: ModuleType, tmp_path: Path) -> None:
    """pytriton's Triton serves tiny torch models through stgs's runner: each model's answers
    equal in-process torch, batched by Triton; the server and Triton end with close()."""
    import torch
    import tritonclient.http as httpclient

    from stgs.backend import SimulatedNode
    from stgs.runtime.models import build_module, model_entry

    site = pytriton_site()
    backend = SimulatedNode("H100-80GB", mig_enabled=False)
    models = [
        {"name": "tiny_mlp", "max_batch": 8, "queue_delay_us": 2000, "timeout_us": 10_000_000},
        {"name": "tiny_cnn", "max_batch": 4, "queue_delay_us": 0, "timeout_us": 10_000_000},
    ]
    args = type("A", (), {"triton_site": str(site), "ready_timeout_s": 180.0})()
    srv = tg.TritonServer(backend, tmp_path / "triton", models, args)
    try:
        info = srv.start()
        assert info["server"]["name"] == "triton" and info["server"]["version"].startswith("2.")
        # the stubs run nvidia-pytriton's numpy < 2; stgs's model code this interpreter's numpy
        assert int(info["packages"]["numpy_stub"].split(".")[0]) < 2
        assert info["packages"]["numpy"] == np.__version__
        c = httpclient.InferenceServerClient(srv.addr)
        for name in ("tiny_mlp", "tiny_cnn"):
            cfg = c.get_model_config(name)
            assert cfg["max_batch_size"] == next(
                m["max_batch"] for m in models if m["name"] == name
            )
            assert "dynamic_batching" in cfg
            x = np.stack([model_entry(name).example(seed=i) for i in range(3)])
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            got = c.infer(name, [inp]).as_numpy("output")
            with torch.inference_mode():
                want = build_module(name)(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        c.close()
    finally:
        notes = srv.close()
        backend.close()
    assert srv.proc is not None and srv.proc.returncode is not None
    assert any("exited" in n for n in notes), notes
    with pytest.raises(ProcessLookupError):
        os.killpg(srv.proc.pid, 0)  # tritonserver and its stubs are gone with it


@pytest.mark.shipped_profiles
def test_triton_gpu_simulated(tmp_path: Path) -> None:
    """Every system behind HTTP on the simulated node, one short trial each, the same client."""
    site = pytriton_site()
    out = tmp_path / "tg.json"
    proc = run_python(
        "-m",
        "benchmarks.triton_gpu",
        "--simulated",
        "--systems",  # mps: as concurrent at another share (its plan: the policy tests above)
        "stgs,timeslice,concurrent,triton",
        "--triton-site",
        str(site),
        "--trial-s",
        "1",
        "--warmup-s",
        "0.3",
        "--max-trials",
        "1",
        "--start",
        "1",
        "--stgs-start",
        "1",
        "--max-lag-ms",
        "1e9",
        "--clients",
        "1",
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out),
        timeout=400,
    )
    res = json.loads(out.read_text())
    assert list(res["systems"]) == ["stgs", "timeslice", "concurrent", "triton"]
    assert proc.stdout.count("| fluid bound") == 4  # the table after each system
    n = len(res["models"])
    for name, s in res["systems"].items():
        assert "error" not in s, (name, s.get("error"))
        (tr,) = s["trials"]
        assert tr["factor"] == 1.0 and len(tr["rows"]) == n + 1
        for r in tr["rows"]:
            assert r["sent"] > 0 and r["ok"] + r["errors"] == r["sent"]
            assert sum(r["codes"].values()) == r["sent"]
        assert s["result"]["factor"] == (1.0 if tr["passed"] else 0.0)
    # the daemon served each baseline's placement, one stgs worker per model
    want = {"timeslice": ("full", None), "concurrent": ("mps", 100)}
    for name, (kind, pct) in want.items():
        plan = res["systems"][name]["server"]["plan_json"]
        parts = [p for g in plan["gpus"] for p in g["partitions"]]
        assert len(parts) == n and {(p["kind"], p["mps_pct"]) for p in parts} == {(kind, pct)}
        assert [len(p["models"]) for p in parts] == [1] * n
    assert res["systems"]["stgs"]["server"]["plan_json"]["policy"] == "stgs"
    tri = res["systems"]["triton"]
    assert tri["server"]["server"]["name"] == "triton"
    assert [m["name"] for m in tri["server"]["models"]] == [m["name"] for m in res["models"]]
    assert any("exited" in note for note in tri["cleanup"])
    for m in tri["server"]["models"]:  # Triton's own counts: it ran them, in batches
        st = tri["stats"][m["name"]]
        assert st["requests"] > 0 and 1 <= st["mean_batch"] <= m["max_batch"]
    with pytest.raises(ProcessLookupError):
        os.kill(tri["server"]["pid"], 0)
    # --combine: the table of several calls' files
    comb = run_python("-m", "benchmarks.triton_gpu", "--combine", str(out), timeout=60)
    assert "NVIDIA Triton" in comb.stdout and "| fluid bound" in comb.stdout
