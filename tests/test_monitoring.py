"""Monitoring: the metrics pass ``promtool check metrics``, the alert rules pass ``promtool
check rules`` and their unit tests, the Grafana dashboard reads only exported metrics, and the
metrics table of docs/operations.md lists exactly what the daemon exports.

promtool comes from Debian's prometheus package (``make setup`` runs
scripts/install_promtool.sh); the tests that need it skip without it, except where
``STGS_REQUIRE_PROMTOOL=1`` (CI) makes a missing promtool a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import numpy as np
import pytest

from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until
from api.metrics import MIB, Metrics
from stgs.backend import DeviceRef, DeviceUsage, GpuInfo
from stgs.transition import PartitionKey

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
DOCS = ROOT / "docs" / "operations.md"
NAME = re.compile(r"\b((?:stgs|nv)_[a-z0-9_]+)")
HISTOGRAMS = ("stgs_inference_request_duration_seconds", "stgs_reconfiguration_duration_seconds")
HISTOGRAMS += ("stgs_process_stall_seconds",)
# what promtool says of Triton's own names (counters without _total, _us units)
TRITON_LINTS = re.compile(
    r'^nv_[a-z_]+ (counter metrics should have "_total" suffix|'
    r"metric names should not contain abbreviated units|"
    r'non-histogram and non-summary metrics should not have "_count" suffix)$'
)


def promtool() -> str:
    for cand in (
        os.environ.get("STGS_PROMTOOL"),
        shutil.which("promtool"),
        str(Path(sys.executable).parent / "promtool"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    why = (
        "promtool is not installed: `make setup` extracts it from Debian's prometheus package"
        " (scripts/install_promtool.sh: needs apt-get, and root for `apt-get update`)"
    )
    if os.environ.get("STGS_REQUIRE_PROMTOOL") == "1":
        pytest.fail(why + "; STGS_REQUIRE_PROMTOOL=1 requires it")
    pytest.skip(why)


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def check_metrics(text: str) -> list[str]:
    """promtool's complaints about an exposition (exit 0: none; 3: lint problems only)."""
    r = run_promtool("check", "metrics", stdin=text)
    assert r.returncode in (0, 3), r.stdout + r.stderr  # 1: the text does not parse
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]


def family_names(text: str) -> set[str]:
    return {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")}


def referenced(expr: str) -> set[str]:
    """The metric families a PromQL expression reads (histogram series by their family)."""
    out = set()
    for n in NAME.findall(expr):
        for suffix in ("_bucket", "_count", "_sum"):
            if n.endswith(suffix) and n[: -len(suffix)] in HISTOGRAMS:
                n = n[: -len(suffix)]
        out.add(n)
    return out


class _Backend:
    def gpus(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                0,
                "GPU-1234",
                "NVIDIA H100 80GB HBM3",
                "H100-80GB",
                132,
                81559,
                True,
                True,
                False,
                True,
            )
        ]

    def usage(self) -> list[DeviceUsage]:
        return [
            DeviceUsage(DeviceRef(0), None, 20000 * MIB, 81559 * MIB, 0.42),
            DeviceUsage(DeviceRef(0, 4), "3g.40gb", 9000 * MIB, 40320 * MIB, 0.3),
        ]


class _Service:
    """What Metrics.refresh reads, with measured GPU usage as from NVML."""

    backend = _Backend()
    runtime = SimpleNamespace(current_plan=None, partitions={})
    inflight = SimpleNamespace(lock=threading.Lock(), counts={"resnet50": 3})

    def planned_rates(self) -> dict[str, float]:
        return {"resnet50": 100.0}

    def models(self) -> list[Any]:
        return [SimpleNamespace(name="resnet50", spec={"source": "builtin:resnet50"})]

    def model_ready(self, name: str) -> bool:
        return True

    def model_io(self, name: str) -> Any:
        return SimpleNamespace(version="1")


@pytest.fixture(scope="module")
def exported() -> tuple[str, str]:
    """(/metrics, /metrics/triton) of a Metrics over the fake service (every family, the
    NVML-measured ones included, with or without samples)."""
    m = Metrics()
    m.on_request("resnet50", 2, 0.012, True, "")
    m.on_request("resnet50", 1, 0.3, False, "DeadlineExceededError")
    m.on_reconfig(True, 1.5)
    m.on_plan("ok")
    m.refresh(_Service(), None)  # type: ignore[arg-type]
    return m.render().decode(), m.render_triton().decode()


def known_names(exported: tuple[str, str]) -> set[str]:
    return family_names(exported[0]) | family_names(exported[1])


# ---------------------------------------------------------------------------- the metrics
def test_metrics_pass_promtool(exported: tuple[str, str]) -> None:
    text = exported[0]
    assert check_metrics(text) == []
    assert "_created" not in text
    assert 'stgs_gpu_utilization_ratio{gpu="0"} 0.42' in text
    assert 'stgs_gpu_memory_used_bytes{gpu="0"} 2.097152e+10' in text
    assert (
        'stgs_mig_instance_utilization_ratio{gpu="0",mig_profile="3g.40gb",mig_start="4"} 0.3'
        in text
    )
    assert 'stgs_planner_plans_total{result="timeout"} 0.0' in text  # every result from 0
    for name in family_names(text):
        assert name.startswith("stgs_"), name
        assert not re.search(r"_(mib|rps|ms)(_|$)", name), name


def test_triton_series_are_named_as_triton_names_them(exported: tuple[str, str]) -> None:
    text = exported[1]
    assert all(TRITON_LINTS.match(p) for p in check_metrics(text)), check_metrics(text)
    lab = '{model="resnet50",version="1"}'
    for line in (
        f"nv_inference_request_success{lab} 1.0",
        f"nv_inference_request_failure{lab} 1.0",
        f"nv_inference_count{lab} 2.0",
        f"nv_inference_exec_count{lab} 0.0",
        f"nv_inference_request_duration_us{lab} 12000.0",
        f"nv_inference_pending_request_count{lab} 3.0",
        'nv_gpu_utilization{gpu_uuid="GPU-1234"} 0.42',
        "# TYPE nv_inference_request_success counter",
    ):
        assert line in text, line


def test_partition_ids_are_short_and_stable() -> None:
    k = PartitionKey(0, "mps", None, None, 50, (("resnet50", 8),))
    assert k.short_id == "mps-" + k.short_id.rsplit("-", 1)[1] and len(k.short_id) == 10
    # the same in every process (not Python's salted hash)
    code = (
        "from stgs.transition import PartitionKey as K;"
        "print(K(0, 'mps', None, None, 50, (('resnet50', 8),)).short_id)"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert other.stdout.strip() == k.short_id
    mig = PartitionKey(1, "mig", "3g.40gb", 4, None, (("bert_base", 4),))
    assert mig.short_id.startswith("3g.40gb@4-")
    ids = {
        k.short_id,
        PartitionKey(0, "mps", None, None, 50, (("resnet50", 16),)).short_id,  # another batch
        PartitionKey(0, "mps", None, None, 50, (("resnet50", 8),), ordinal=1).short_id,
    }
    assert len(ids) == 3


def test_docs_table_lists_every_metric(exported: tuple[str, str]) -> None:
    text = DOCS.read_text()
    table = text[text.index("| metric | type |") :]
    table = table[: table.index("\n\n")]
    documented = {m.group(1) for m in re.finditer(r"^\| `((?:stgs|nv)_[a-z0-9_]+)`", table, re.M)}
    assert documented == known_names(exported)


# ---------------------------------------------------------------------------- alerts, dashboard
def test_alert_rules_pass_promtool(exported: tuple[str, str]) -> None:
    r = run_promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_promtool("test", "rules", str(ALERTS.with_name("alerts.test.yml")))
    assert r.returncode == 0, r.stdout + r.stderr
    names: set[str] = set()
    for ln in ALERTS.read_text().splitlines():
        if not ln.lstrip().startswith(("summary", "description", "#")):
            names |= referenced(ln)
    assert names and names <= known_names(exported), names - known_names(exported)


# A small schema of what Grafana needs of a dashboard to import it (Grafana publishes no JSON
# schema of the whole model offline): the fields this dashboard uses, typed.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {
                    "type": "array",
                    "items": {"type": "object", "required": ["name", "type"]},
                }
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["row", "timeseries", "stat"]},
                    "gridPos": {
                        "type": "object",
                        "required": ["h", "w", "x", "y"],
                        "properties": {
                            "w": {"type": "integer", "minimum": 1, "maximum": 24},
                            "x": {"type": "integer", "minimum": 0, "maximum": 23},
                        },
                    },
                    "targets": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["refId", "expr"],
                            "properties": {"expr": {"type": "string", "minLength": 1}},
                        },
                    },
                },
            },
        },
    },
}


def test_dashboard_reads_only_exported_metrics(exported: tuple[str, str]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dash, DASHBOARD_SCHEMA)
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    names = set().union(*(referenced(e) for e in exprs))
    assert names <= known_names(exported), names - known_names(exported)
    # what an operator looks for first
    for want in (
        "stgs_inference_slo_met_total",
        "stgs_inference_request_duration_seconds",
        "stgs_inference_request_failure_total",
        "stgs_partition_restarts_total",
        "stgs_gpu_utilization_ratio",
        "stgs_gpu_memory_used_bytes",
        "stgs_reconfigurations_total",
    ):
        assert want in names, want
    assert any("histogram_quantile(0.99" in e for e in exprs)


# ---------------------------------------------------------------------------- the live daemon
@pytest.mark.slow
def test_live_daemon_metrics_pass_promtool(tmp_path: Path, exported: tuple[str, str]) -> None:
    promtool()  # skip before starting the daemon
    d = LocalDaemon(tmp_path, ONE_SIMULATED_GPU, server_options="frontends = 1\n")
    try:
        d.start_serving("tiny_mlp", 1000, 5)
        x = np.ones((2, 64), np.float32)
        body = {
            "inputs": [
                {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        with d.client() as c:
            for _ in range(3):
                r = c.post("/v2/models/tiny_mlp/infer", json=body)
                assert r.status_code == 200, r.text

            def counted() -> str | None:
                text: str = c.get("/metrics").text
                ok = 'stgs_inference_request_success_total{model="tiny_mlp"} 3.0' in text
                ran = "stgs_partition_batches_total{" in text
                return text if ok and ran else None

            text = wait_until("the requests in /metrics", counted, 20, d.procs[-1])
            triton = c.get("/metrics/triton").text
            plan_ids = [p["id"] for p in c.get("/v1/plan").json()["partitions"]]
        assert check_metrics(text) == []
        names = family_names(text)
        assert names <= known_names(exported), names - known_names(exported)
        assert 'stgs_model_ready{model="tiny_mlp"} 1.0' in text
        info = [ln for ln in text.splitlines() if ln.startswith("stgs_partition_info{")]
        assert len(info) == 1 and 'models="tiny_mlpx' in info[0], info
        pid = re.search(r'partition="([^"]+)"', info[0])
        assert pid is not None and "tiny_mlp" not in pid.group(1)  # short: no models in it
        assert f'stgs_partition_up{{gpu="0",partition="{pid.group(1)}"}} 1.0' in text
        assert plan_ids == [pid.group(1)]  # GET /v1/plan names the same id
        assert not [p for p in check_metrics(triton) if not TRITON_LINTS.match(p)]
        assert 'nv_inference_request_success{model="tiny_mlp",version="1"} 3.0' in triton
        assert 'nv_inference_count{model="tiny_mlp",version="1"} 6.0' in triton
        execs = re.search(
            r'^nv_inference_exec_count\{model="tiny_mlp",version="1"\} (\S+)$', triton, re.M
        )
        assert execs is not None and float(execs.group(1)) >= 1
    finally:
        d.stop()
