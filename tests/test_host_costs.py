"""The host-cost model: one data file (stgs/data/host-costs.json) that the planner, the daemon
and the simulator read; the planner's terms (PlannerOptions.host_*_ms) in the plans and in the
checker; the fit that writes the file (python -m benchmarks.fit_host_costs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _helpers import ROOT
from plan_checker import build_models, check_plan

from api.config import DaemonConfig, load_config
from partitioner.peak import find_peak
from partitioner.policies import get_policy
from partitioner.problem import Problem
from partitioner.sim.config import HostCosts, SimOptions
from stgs.hostcosts import (
    HOST_COSTS_ENV,
    ApiPoint,
    ApiWay,
    HostCostTerms,
    fit_api_way,
    load_host_costs,
)
from stgs.scenario import PlannerOptions, scenario_from_mapping

ZERO = {"host_request_ms": 0.0, "host_batch_ms": 0.0, "host_item_ms": 0.0}


def _scenario(**planner: Any) -> Any:
    return scenario_from_mapping(
        {
            "gpus": [{"sku": "H100-80GB", "count": 1, "mig": False}],
            "models": [
                {"name": "efficientnet_b0", "slo_ms": 10, "rate_rps": 600},
                {"name": "mobilenet_v3_large", "slo_ms": 10, "rate_rps": 600},
                {"name": "resnet50", "slo_ms": 15, "rate_rps": 600},
            ],
            "planner": planner,
        }
    )


def _check(plan: Any, sc: Any) -> list[str]:
    return check_plan(plan, sc, *build_models(sc))


def _plan(sc: Any) -> Any:
    return get_policy("stgs").plan(Problem.from_scenario(sc))


def _planner_numbers(t: HostCostTerms) -> tuple[float, float, float]:
    """The planner's three numbers, derived here by hand from the file's terms: an image
    (3x224x224 float32) on the way in and back, per batch, per image in a batch."""
    mb = 3 * 224 * 224 * 4 / 1e6
    return (
        t.request_ms + t.request_ms_per_mb * mb + t.reply_ms,
        t.batch_ms,
        t.sample_ms + t.sample_ms_per_mb * mb,
    )


def test_planner_daemon_and_simulator_read_the_one_file() -> None:
    """The planner's defaults, the daemon's [planner] (defaults and the shipped
    deploy/stgs.toml) and the simulator's HostCosts all come from stgs/data/host-costs.json."""
    f = load_host_costs()
    t = f.entry().terms
    assert f.default == "H100-80GB" and f.hosts[f.default].provenance.runs
    want = _planner_numbers(t)
    for o in (_scenario().options, PlannerOptions()):
        assert (o.host_request_ms, o.host_batch_ms, o.host_item_ms) == want
    # the daemon serves through its frontends: the API way, when the file has one
    api = f.entry().api
    daemon = want if api is None else (_api_way(api), *want[1:])
    for o in (DaemonConfig().planner, load_config(ROOT / "deploy" / "stgs.toml").planner):
        assert (o.host_request_ms, o.host_batch_ms, o.host_item_ms) == daemon
    for host in (HostCosts(), SimOptions().host):
        assert host.terms() == t
    # the simulator's costs of an image request are the planner's numbers
    sim = HostCosts()
    assert sim.request_delay_ms("resnet50") + sim.reply_delay_ms() == pytest.approx(want[0])
    assert sim.batch_extra_ms("resnet50", 8) == pytest.approx(want[1] + 8 * want[2])
    # a value set in a config or scenario still wins
    assert _scenario(host_batch_ms=0.5).options.host_batch_ms == 0.5


def _api_way(api: ApiWay) -> float:
    """The API way at an image, by hand."""
    return round(api.request_ms + api.request_ms_per_mb * 3 * 224 * 224 * 4 / 1e6 + api.reply_ms, 4)


def test_a_daemon_with_frontends_plans_the_api_way(tmp_path: Path) -> None:
    """A file whose entry has the API way: a daemon with frontends plans host_request_ms from
    it, one without frontends (the control plane serves) keeps the in-process way, and a value
    set in [planner] wins over both."""
    shipped = load_host_costs()
    prov = shipped.entry().provenance
    api = ApiWay(request_ms=0.5, request_ms_per_mb=1.0, reply_ms=0.75, provenance=prov)
    doc = shipped.model_copy(
        update={"hosts": {shipped.default: shipped.entry().model_copy(update={"api": api})}}
    )
    other = tmp_path / "host-costs.json"
    other.write_text(json.dumps(doc.model_dump()))
    code = (
        "import json\n"
        "from api.config import DaemonConfig\n"
        "out = []\n"
        "for server, planner in (({'frontends': 2}, {}), ({'frontends': 0}, {}),"
        " ({'frontends': 2}, {'host_request_ms': 2.0})):\n"
        "    c = DaemonConfig.model_validate({'server': server, 'planner': planner})\n"
        "    out.append(c.planner.host_request_ms)\n"
        "print(json.dumps(out))\n"
    )
    got = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, HOST_COSTS_ENV: str(other)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    in_process = _planner_numbers(shipped.entry().terms)[0]
    assert json.loads(got) == [pytest.approx(_api_way(api)), pytest.approx(in_process), 2.0]


def test_the_api_way_fit_recovers_its_terms() -> None:
    """fit_api_way on per-model medians made from known terms gives them back: the way in a
    line over the input sizes, the rest of the way its median."""
    points = [
        ApiPoint(mb=mb, in_ms=0.3 + 0.8 * mb, way_ms=0.3 + 0.8 * mb + 0.6 + noise, label=str(k))
        for k, (mb, noise) in enumerate([(0.0003, 0.0), (0.602, 0.01), (0.602, -0.01), (1.2, 0.0)])
    ]
    terms, info = fit_api_way(points)
    assert terms == pytest.approx(
        {"request_ms": 0.3, "request_ms_per_mb": 0.8, "reply_ms": 0.6}, abs=2e-3
    )
    assert set(info["points"]) == {"0", "1", "2", "3"}
    with pytest.raises(ValueError, match="no API measurements"):
        fit_api_way([])


_PRINT_DEFAULTS = """
import json
from api.config import DaemonConfig
from partitioner.sim.config import HostCosts
from stgs.scenario import PlannerOptions
o, d = PlannerOptions(), DaemonConfig().planner
keys = ("host_request_ms", "host_batch_ms", "host_item_ms")
print(json.dumps({"planner": [getattr(o, k) for k in keys],
                  "daemon": [getattr(d, k) for k in keys],
                  "sim": HostCosts().terms().model_dump()}))
"""


def test_another_file_moves_planner_daemon_and_simulator(tmp_path: Path) -> None:
    """With another host-cost file ($STGS_HOST_COSTS: a host of another kind) all three take
    its numbers: none of them keeps a number of its own. A bad file is a one-line error."""
    terms = HostCostTerms(
        request_ms=1.25,
        request_ms_per_mb=0.5,
        batch_ms=0.75,
        sample_ms=0.03,
        sample_ms_per_mb=0.2,
        reply_ms=0.4,
    )
    shipped = load_host_costs()
    entry = shipped.entry().model_copy(update={"terms": terms, "api": None})
    doc = shipped.model_copy(update={"default": "other", "hosts": {"other": entry}})
    other = tmp_path / "host-costs.json"
    other.write_text(json.dumps(doc.model_dump()))
    env = {**os.environ, HOST_COSTS_ENV: str(other)}
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_DEFAULTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    got = json.loads(out)
    assert tuple(got["planner"]) == tuple(got["daemon"]) == _planner_numbers(terms)
    assert got["sim"] == terms.model_dump()
    # a broken file: the stgs CLI says which file and why, exit 2
    other.write_text('{"format": "stgs.host-costs/v1", "default": "x", "hosts": {}}')
    bad = subprocess.run(
        [sys.executable, "-m", "api.cli", "plan", str(ROOT / "stgs/data/example-scenario.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert f"host-cost file {other}" in bad.stderr and "Traceback" not in bad.stderr


# Where host-cost numbers must not be typed: the product, its config, docs and benchmarks.
_SCANNED = ("stgs", "partitioner", "profiler", "api", "benchmarks", "deploy", "docs", "examples")
_NAMES = (
    "host_request_ms|host_batch_ms|host_item_ms|request_ms|request_ms_per_mb|batch_ms|sample_ms"
    "|sample_ms_per_mb|reply_ms"
)
# a name followed by a number: `host_batch_ms = 0.25`, `batch_ms` 0.377, (0.6 ms) ...
_NAMED_NUMBER = re.compile(rf"\b({_NAMES})\b\W{{0,3}}\s*[=:]?\s*\(?\d+\.\d")


def _scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in _SCANNED:
        for p in sorted((ROOT / top).rglob("*")):
            rel = p.relative_to(ROOT).as_posix()
            if (
                p.is_file()
                and p.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".service"}
                and not rel.startswith("benchmarks/results/")
                and rel != "stgs/data/host-costs.json"
            ):
                files.append(p)
    return files


def test_host_cost_numbers_live_in_one_data_file() -> None:
    """grep: the file's numbers (and the planner's, derived from them) appear in no other file
    of the product, its config, docs or benchmarks, and no host-cost option is given a number
    there (docs cite the file; tests set their own values)."""
    t = load_host_costs().entry().terms
    numbers = {f"{v:.4f}" for v in (*t.model_dump().values(), *_planner_numbers(t))}
    numbers |= {f"{v:.3f}" for v in t.model_dump().values() if v >= 0.1}
    hits = []
    for p in _scanned_files():
        text = p.read_text(encoding="utf-8", errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            found = [n for n in numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", line)]
            if found or _NAMED_NUMBER.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert hits == [], "\n".join(hits)


def test_a_plan_without_host_costs_breaks_the_rules_with_them() -> None:
    lean = _plan(_scenario(**ZERO))
    assert _check(lean, _scenario(**ZERO)) == []
    # the same plan, judged with the host time a request really pays: some SLO is broken
    errors = _check(lean, _scenario())
    assert any("host way" in e for e in errors), errors
    # planned with host costs it is valid with them
    sc = _scenario()
    assert _check(_plan(sc), sc) == []


def test_host_costs_enter_cycle_and_slo() -> None:
    sc = _scenario(host_request_ms=1.0, host_batch_ms=0.5, host_item_ms=0.1)
    prob = Problem.from_scenario(sc)
    zero = Problem.from_scenario(_scenario(**ZERO))
    gt = prob.gpu_types[0]
    shape = prob.shapes(gt)[0]
    m = prob.models[0]
    c, c0 = prob.curve(m, gt, shape), zero.curve(m, gt, shape)
    assert c is not None and c0 is not None
    # L(b) grows by host_batch + b host_item; the SLO left to cycle and batch by host_request
    assert abs((c.lat - c0.lat) - (0.5 + 0.1 * c.buckets)).max() < 1e-9
    assert c.slo == m.slo_ms - 1.0 and c0.slo == m.slo_ms


def test_host_costs_lower_the_peak() -> None:
    lean = find_peak(Problem.from_scenario(_scenario(**ZERO)), get_policy("stgs")).k
    real = find_peak(Problem.from_scenario(_scenario()), get_policy("stgs")).k
    assert 0 < real < lean
