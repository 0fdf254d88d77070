"""End to end: the real daemon process (``stgs serve``) on the simulated node with CPU workers.

Registers two tiny models over HTTP (each profiled in the background with the profiler's CPU
mode), sends KServe v2 inference with ``tritonclient`` (JSON and binary tensors), raises one
model's load until the controller re-plans, kills the daemon with SIGKILL, restarts it on the
same state directory, and checks that every registered model answers again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.launch import free_port, wait_until

pytestmark = pytest.mark.slow

tritonhttp = pytest.importorskip("tritonclient.http")

TOKEN = "e2e-token-0123456789abcdef"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    port = free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = tmp_path / "stgs.toml"
    cfg.write_text(
        f"""
[server]
port = {port}
grpc_port = 0
token_file = "token"
[paths]
state_dir = "state"
runtime_dir = "run"
model_dir = "models"
[backend]
kind = "simulated"
simulated_gpus = [{{ sku = "H100-80GB", count = 1 }}]
[controller]
interval_s = 0.2
rate_halflife_s = 0.5
hysteresis = 0.5
hold_s = 0.6
"""
    )
    procs: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "daemon.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        p = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
        procs.append(p)
        p.port = port  # type: ignore[attr-defined]
        return p

    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        log.close()
        # workers end when the daemon's socket closes; give them a moment, then check
        text = (tmp_path / "daemon.log").read_text(errors="replace")
        if os.environ.get("STGS_E2E_LOG"):
            print(text)


def _client(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30.0,
    )


def _register(c: httpx.Client, name: str, slo_ms: float, rate: float) -> None:
    r = c.post("/v1/models", json={"name": name, "slo_ms": slo_ms, "rate_rps": rate})
    assert r.status_code in (201, 202), r.text


def _infer(tc: Any, model: str, x: np.ndarray, *, binary: bool) -> np.ndarray:
    """KServe v2 inference through tritonclient: tensors as JSON, or as binary data."""
    inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = tritonhttp.InferRequestedOutput("output", binary_data=binary)
    res = tc.infer(model, [inp], outputs=[out])
    return np.asarray(res.as_numpy("output"))


def _infer_json(tc: Any, model: str, x: np.ndarray) -> np.ndarray:
    return _infer(tc, model, x, binary=False)


def _infer_binary(tc: Any, model: str, x: np.ndarray) -> np.ndarray:
    return _infer(tc, model, x, binary=True)


def test_daemon_serves_replans_and_survives_sigkill(
    daemon: Callable[[], subprocess.Popen[bytes]],
) -> None:
    t0 = time.monotonic()
    p = daemon()
    port = p.port  # type: ignore[attr-defined]
    with _client(port) as c:
        wait_until("ready", lambda: c.get("/v2/health/ready").status_code == 200, 30, p)
        # mutating calls need the token
        assert httpx.post(f"http://127.0.0.1:{port}/v1/models", json={}).status_code == 401
        _register(c, "tiny_mlp", slo_ms=5000, rate=2)
        _register(c, "tiny_cnn", slo_ms=5000, rate=2)

        def both_ready() -> bool:
            ms = {m["name"]: m for m in c.get("/v1/models").json()}
            bad = [m for m in ms.values() if m["status"] in ("failed", "refused")]
            assert not bad, bad
            return all(ms[n]["status"] == "ready" and ms[n]["ready"] for n in ms)

        wait_until("both models ready", both_ready, 45, p)

        tc = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=30.0)
        try:
            assert tc.is_server_live() and tc.is_server_ready()
            assert tc.is_model_ready("tiny_mlp") and tc.is_model_ready("tiny_cnn")
            meta = tc.get_model_metadata("tiny_cnn")
            assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
            x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
            a = _infer_json(tc, "tiny_mlp", x)
            b = _infer_binary(tc, "tiny_mlp", x)
            assert a.shape == (3, 10) and a.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            img = np.ones((2, 3, 32, 32), np.float32)
            assert _infer_binary(tc, "tiny_cnn", img).shape == (2, 10)
            with pytest.raises(Exception, match="shape"):
                _infer_json(tc, "tiny_mlp", np.ones((1, 63), np.float32))

            # raise tiny_mlp's load far past its registered 2 rps until the controller re-plans
            def replanned() -> bool:
                end = time.monotonic() + 0.5
                while time.monotonic() < end:
                    _infer_binary(tc, "tiny_mlp", x[:1])
                # re-planned at the measured rate, well above the registered 2 rps
                return bool(c.get("/v1/models/tiny_mlp").json()["planned_rate_rps"] > 5)

            wait_until("a controller re-plan for the higher load", replanned, 60, p)
            assert c.get("/v1/plan").json()["controller"]["replans"] >= 1
            events = c.get("/v1/events", params={"kind": "apply"}).json()
            assert any("controller" in e["data"].get("reason", "") for e in events)
            metrics = c.get("/metrics").text
            assert 'stgs_inference_request_duration_seconds_count{model="tiny_mlp"}' in metrics
            assert "stgs_reconfigurations_total" in metrics
            assert "stgs_process_stall_seconds_count" in metrics  # the stall probe runs
        finally:
            tc.close()

    # kill -9: no shutdown code runs; workers notice the closed socket and exit
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    p2 = daemon()
    with _client(port) as c:
        wait_until(
            "ready after restart", lambda: c.get("/v2/health/ready").status_code == 200, 30, p2
        )
        wait_until(
            "every model ready after restart",
            lambda: all(m["ready"] for m in c.get("/v1/models").json()),
            45,
            p2,
        )
        names = sorted(m["name"] for m in c.get("/v1/models").json())
        assert names == ["tiny_cnn", "tiny_mlp"]
        tc = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=30.0)
        try:
            x = np.ones((1, 64), np.float32)
            assert _infer_json(tc, "tiny_mlp", x).shape == (1, 10)
            assert _infer_binary(tc, "tiny_cnn", np.ones((1, 3, 32, 32), np.float32)).shape == (
                1,
                10,
            )
        finally:
            tc.close()
        starts = c.get("/v1/events", params={"kind": "start"}).json()
        assert len(starts) == 2
    p2.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p2.wait(15)
    # a clean stop: uvicorn shuts down, then re-raises SIGTERM (systemd counts it as success)
    assert p2.returncode in (0, -signal.SIGTERM), p2.returncode
    assert time.monotonic() - t0 < 90
