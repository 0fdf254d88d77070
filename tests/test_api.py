"""The REST API and KServe v2 endpoints in process (TestClient), on the simulated node.

The model is ``echo`` (a worker that needs no torch: fast); profiling is a fake that returns
synthetic rows at once, so registration runs the real admission control, planner and runtime.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.config import DaemonConfig
from api.daemon import Daemon, build
from api.inference import EXTENSIONS
from stgs.catalog import get_sku
from stgs.profiles import ProfileRow
from stgs.registry import ModelEntry

TOKEN = "api-test-token-0123456789"


def fake_profiler(model: ModelEntry, sku: str) -> list[ProfileRow]:
    sms = get_sku(sku).sm_count
    return [ProfileRow(sku, model.name, "full", sms, b, 0.5 + 0.05 * b, 10.0) for b in (1, 2, 4, 8)]


def _daemon(tmp_path: Path, **server: object) -> Daemon:
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "models").mkdir(exist_ok=True)
    cfg = DaemonConfig.model_validate(
        {
            "server": {"token_file": "token", **server},
            "backend": {"kind": "simulated"},
        }
    ).resolved(tmp_path)
    d = build(cfg, background=False)
    d.service.profiler = fake_profiler
    d.service.restore()
    return d


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = _daemon(tmp_path)
    yield d
    d.close()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[TestClient]:
    with TestClient(create_app(daemon.ctx), raise_server_exceptions=True) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def register(c: TestClient, name: str = "echo", **kw: object) -> dict[str, object]:
    r = c.post("/v1/models", json={"name": name, "slo_ms": 100, "rate_rps": 50, **kw})
    assert r.status_code in (201, 202), r.text
    return dict(r.json())


def test_register_list_get_delete(client: TestClient, daemon: Daemon) -> None:
    m = register(client)
    assert m["status"] == "ready" and m["ready"] is True and m["planned_rate_rps"] == 50
    assert daemon.store.get_model("echo") is not None  # in the store before the call returned
    assert daemon.store.latest_plan("last_good") is not None
    assert [x["name"] for x in client.get("/v1/models").json()] == ["echo"]
    assert client.get("/v1/models/echo").json()["spec"]["source"] == "builtin:echo"
    r = client.post("/v1/models", json={"name": "echo", "slo_ms": 100, "rate_rps": 5})
    assert r.status_code == 409 and "already registered" in r.json()["error"]
    plan = client.get("/v1/plan").json()
    assert plan["plan"]["feasible"] and plan["partitions"][0]["state"] == "ready"
    assert client.delete("/v1/models/echo").json() == {"deleted": "echo"}
    assert client.get("/v1/models/echo").status_code == 404
    assert client.delete("/v1/models/echo").status_code == 404
    assert client.get("/v1/plan").json()["partitions"] == []
    kinds = [e["kind"] for e in client.get("/v1/events").json()]
    assert {"register", "profiled", "apply", "delete"} <= set(kinds)


def test_admission_control_refuses_with_the_planners_reason(client: TestClient) -> None:
    r = client.post("/v1/models", json={"name": "echo", "slo_ms": 0.01, "rate_rps": 5})
    assert r.status_code == 422
    assert "cannot meet slo_ms=0.01" in r.json()["error"]
    m = client.get("/v1/models/echo").json()
    assert m["status"] == "refused" and "slo_ms=0.01" in m["detail"]
    # a refused model may be registered again with a reachable SLO
    assert register(client)["status"] == "ready"


def test_kserve_json_and_binary(client: TestClient) -> None:
    register(client)
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/echo/ready").status_code == 200
    assert client.get("/v2/models/nope/ready").status_code == 404
    assert client.get("/v2").json()["extensions"] == list(EXTENSIONS)
    assert client.get("/v2/models/echo").json()["inputs"][0]["name"] == "input"

    body = {
        "inputs": [
            {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
        ]
    }
    r = client.post("/v2/models/echo/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [2, 3] and out["data"] == [1, 2, 3, 4, 5, 6]

    x = np.arange(8, dtype=np.int64).reshape(2, 4)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 4],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = client.post(
        "/v2/models/echo/infer",
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = json.loads(r.content[:n])
    o = meta["outputs"][0]
    assert o["datatype"] == "INT64" and o["parameters"]["binary_data_size"] == x.nbytes
    got = np.frombuffer(r.content[n:], dtype="<i8").reshape(o["shape"])
    np.testing.assert_array_equal(got, x)

    metrics = client.get("/metrics").text
    assert 'stgs_inference_request_success_total{model="echo"} 2.0' in metrics
    assert 'stgs_inference_count_total{model="echo"} 4.0' in metrics
    assert 'stgs_model_planned_requests_per_second{model="echo"} 50.0' in metrics
    assert "stgs_plan_gpus_used 1.0" in metrics
    # the worker's batch statistics (STATS frames) beside the plan's prediction
    assert 'stgs_partition_planned_batch_seconds{gpu="0"' in metrics
    end = time.monotonic() + 10
    while 'stgs_partition_batches_total{gpu="0"' not in metrics and time.monotonic() < end:
        time.sleep(0.05)
        metrics = client.get("/metrics").text
    ran = [ln for ln in metrics.splitlines() if ln.startswith("stgs_partition_batches_total{")]
    assert ran and all('model="echo"' in ln and float(ln.split()[-1]) >= 1 for ln in ran)
    spare = [ln for ln in metrics.splitlines() if ln.startswith("stgs_plan_spare_factor ")]
    assert len(spare) == 1 and float(spare[0].split()[1]) > 1.0  # the default: fill
    assert 'stgs_reconfigurations_total{result="success"} 1.0' in metrics
    assert "stgs_partition_up{" in metrics and 'stgs_gpu_mig_enabled{gpu="0"} 1.0' in metrics


BAD_INFER: list[tuple[dict[str, str], bytes, int, str]] = [
    ({}, b"not json", 400, "not valid JSON"),
    ({}, b"[1, 2]", 400, "JSON object"),
    ({}, b'{"inputs": []}', 400, "inputs"),
    (
        {},
        b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
        400,
        "unknown input",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [2], "datatype": "FP32", "data": [1]}]}',
        400,
        "1 values",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ["a"]}]}',
        400,
        "not FP32",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [NaN]}]}',
        400,
        "NaN",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [-1], "datatype": "FP32", "data": []}]}',
        400,
        "batch >= 1",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [99999999, 99999999], "datatype": "FP32"}]}',
        400,
        "batch",
    ),
    (
        {},
        b'{"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}',
        400,
        "not supported",
    ),
    ({"Inference-Header-Content-Length": "abc"}, b"{}", 400, "not an integer"),
    ({"Inference-Header-Content-Length": "999"}, b"{}", 400, "outside the body"),
    ({"Inference-Header-Content-Length": "-5"}, b"{}", 400, "outside the body"),
    (
        {"Inference-Header-Content-Length": "96"},
        b'{"inputs":[{"name":"input","shape":[4],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":16}}]}' + b"\x00" * 4,
        400,
        "ends before",
    ),
    ({}, b"\xff\xfe", 400, "JSON"),
    ({}, b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32"}]}', 400, "no data"),
]


@pytest.mark.parametrize(("headers", "body", "status", "msg"), BAD_INFER)
def test_bad_inference_requests_get_clear_4xx(
    client: TestClient, headers: dict[str, str], body: bytes, status: int, msg: str
) -> None:
    register(client)
    r = client.post("/v2/models/echo/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert msg in r.json()["error"]


def test_unknown_model_infer_is_404(client: TestClient) -> None:
    r = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


NASTY_MODELS: list[object] = [
    {},
    [],
    "x",
    None,
    {"name": "../etc/passwd", "slo_ms": 10, "rate_rps": 1},
    {"name": "echo", "slo_ms": -1, "rate_rps": 1},
    b'{"name": "echo", "slo_ms": Infinity, "rate_rps": 1}',
    b'{"name": "echo", "slo_ms": NaN, "rate_rps": 1}',
    b"{not json",
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "extra": 1},
    {"name": "echo", "slo_ms": "ten", "rate_rps": 1},
    {"name": "e" * 500, "slo_ms": 10, "rate_rps": 1},
    {"name": "nosuchmodel", "slo_ms": 10, "rate_rps": 1},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "source": "file:../../etc/passwd"},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "source": "file:/etc/passwd"},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "source": "file:model.pkl"},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "source": "http://evil/x"},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "source": "builtin:tiny_mlp"},
    {"name": "tiny_mlp", "slo_ms": 10, "rate_rps": 1, "inputs": [{"shape": [3]}]},
    {"name": "echo", "slo_ms": 10, "rate_rps": 1, "dtype": "int4"},
]


@pytest.mark.parametrize("body", NASTY_MODELS)
def test_nasty_registrations_are_422(client: TestClient, body: object) -> None:
    if isinstance(body, bytes):
        r = client.post("/v1/models", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/models", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]
    assert client.get("/v1/models").json() == []


def test_model_files_only_from_the_model_dir(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "outside.pt").write_bytes(b"x")
    (tmp_path / "models" / "link.pt").symlink_to(tmp_path / "outside.pt")
    r = client.post(
        "/v1/models", json={"name": "m", "slo_ms": 1, "rate_rps": 1, "source": "file:link.pt"}
    )
    assert r.status_code == 422 and "outside the model directory" in r.json()["error"]
    (tmp_path / "models" / "ok.pt").write_bytes(b"x")
    r = client.post(
        "/v1/models", json={"name": "m", "slo_ms": 1, "rate_rps": 1, "source": "file:ok.pt"}
    )
    assert r.status_code == 422 and "not a TorchScript archive" in r.text
    assert "ok.pt" in r.json()["error"]


def test_nasty_paths_and_queries(client: TestClient) -> None:
    for path in (
        "/v1/models/..%2F..%2Fetc",
        "/v1/models/%00",
        "/v1/events?limit=-1",
        "/v1/events?limit=abc",
        "/v2/models/%2e%2e/ready",
        "/v1/nope",
    ):
        r = client.get(path)
        assert 400 <= r.status_code < 500, (path, r.status_code)
    assert client.delete("/v1/models/" + "x" * 300).status_code == 422
    assert client.put("/v1/models").status_code == 405


def test_plan_preview_and_apply(client: TestClient, daemon: Daemon) -> None:
    register(client)
    r = client.post("/v1/plan/preview", json={"rates": {"echo": 500}})
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["feasible"] and "partitions_added" in r.json()["changes"]
    assert daemon.runtime.current_plan is not None
    assert daemon.runtime.current_plan.served_rate("echo") == 50  # a dry run changed nothing
    assert client.post("/v1/plan/preview", json={"policy": "os.system"}).status_code == 422
    assert client.post("/v1/plan/preview", json={"rates": {"nope": 1}}).status_code == 404
    assert client.post("/v1/plan/preview", json={"rates": {"echo": -1}}).status_code == 422
    r = client.post("/v1/plan/apply", json={"rates": {"echo": 200}})
    assert r.status_code == 200, r.text
    assert daemon.runtime.current_plan.served_rate("echo") == 200
    assert client.post("/v1/plan/apply").status_code == 200
    g = client.get("/v1/gpus").json()
    assert g["backend"] == "simulated" and g["gpus"][0]["mig_enabled"] is True
    assert g["gpus"][0]["mig_devices"] and g["gpus"][0]["partitions"]
    s = client.get("/v1/status").json()
    assert s["models"] == {"ready": 1} and s["restored"] is True


def test_token_required_for_mutations(daemon: Daemon) -> None:
    with TestClient(create_app(daemon.ctx)) as c:
        assert c.get("/v1/models").status_code == 200  # loopback: reads are open
        r = c.post("/v1/models", json={"name": "echo", "slo_ms": 100, "rate_rps": 5})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        bad = {"Authorization": "Bearer wrong-token-wrong-token"}
        assert c.delete("/v1/models/echo", headers=bad).status_code == 401
        assert c.post("/v1/plan/apply").status_code == 401


def test_off_loopback_every_call_needs_the_token(tmp_path: Path) -> None:
    d = _daemon(tmp_path, host="0.0.0.0")
    try:
        with TestClient(create_app(d.ctx)) as c:
            for path in ("/v1/models", "/v2/health/live", "/metrics", "/openapi.json"):
                assert c.get(path).status_code == 401, path
            ok = {"Authorization": f"Bearer {TOKEN}"}
            assert c.get("/v1/models", headers=ok).status_code == 200
    finally:
        d.close()


def test_restart_restores_registered_models(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    with TestClient(create_app(d.ctx)) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        register(c)
    d.close()  # workers gone, like a crash (the store keeps everything)
    d2 = _daemon(tmp_path)
    try:
        assert d2.service.model_ready("echo")
        assert d2.store.get_model("echo").status == "ready"  # type: ignore[union-attr]
        out = d2.service.infer("echo", [np.ones(3, np.float32)])
        np.testing.assert_array_equal(out[0], np.ones(3, np.float32))
        assert [e.kind for e in d2.store.events(kind="start")] == ["start", "start"]
    finally:
        d2.close()


def test_models_profile_one_at_a_time(tmp_path: Path) -> None:
    """Two registrations that need profiling: the second waits ("queued") until the first is
    measured (side by side they would time each other on one GPU); the profiled event says how
    many rows and how long."""
    d = _daemon(tmp_path)
    d.service.background = True
    spans: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow(model: ModelEntry, sku: str) -> list[ProfileRow]:
        t0 = time.monotonic()
        time.sleep(1.0)
        with lock:
            spans.append((t0, time.monotonic()))
        return fake_profiler(model, sku)

    d.service.profiler = slow
    try:
        with TestClient(create_app(d.ctx)) as c:
            c.headers["Authorization"] = f"Bearer {TOKEN}"
            for name in ("echo", "fail"):
                assert register(c, name)["status"] == "profiling"
            end = time.monotonic() + 30
            while not any(m["detail"].startswith("measuring") for m in c.get("/v1/models").json()):
                assert time.monotonic() < end
                time.sleep(0.01)
            details = sorted(m["detail"] for m in c.get("/v1/models").json())
            assert details[1] == "queued" and details[0].startswith("measuring on H100-80GB")
            d.service.wait_background(60)
            assert [m["status"] for m in c.get("/v1/models").json()] == ["ready", "ready"]
            profiled = c.get("/v1/events", params={"kind": "profiled"}).json()
        (_, end_first), (start_second, _) = sorted(spans)
        assert start_second >= end_first
        assert {e["data"]["model"] for e in profiled} == {"echo", "fail"}
        assert all(e["data"]["rows"] == 4 and e["data"]["seconds"] >= 1.0 for e in profiled)
    finally:
        d.close()


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in (
        "/v1/models",
        "/v1/models/{name}",
        "/v1/plan",
        "/v1/plan/preview",
        "/v1/plan/apply",
        "/v1/gpus",
        "/metrics",
        "/v2/models/{model}/infer",
    ):
        assert p in paths, p
    assert client.get("/docs").status_code == 200
