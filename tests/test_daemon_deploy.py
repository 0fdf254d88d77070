"""deploy/: the example config loads; the systemd unit has what the daemon relies on;
sd_notify speaks systemd's datagram protocol."""

from __future__ import annotations

import configparser
import socket
from pathlib import Path

import pytest

from api.config import DaemonConfig, load_config
from api.daemon import sd_notify

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_loads_with_the_defaults() -> None:
    cfg = load_config(DEPLOY / "stgs.toml")
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8470
    assert cfg.server == DaemonConfig().server  # the limits shown are the defaults
    assert cfg.workers == DaemonConfig().workers
    assert cfg.paths.state_dir == Path("/var/lib/stgs")
    assert cfg.controller.hold_s == 30.0
    assert cfg.planner.spare_factor == DaemonConfig().planner.spare_factor == "fill"
    assert cfg.planner.max_spare_factor == DaemonConfig().planner.max_spare_factor
    assert cfg.planner.extrapolation_margin == DaemonConfig().planner.extrapolation_margin


def test_systemd_unit() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    text = (DEPLOY / "stgs.service").read_text()
    unit.read_string(text)
    s = unit["Service"]
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert s["StateDirectory"] == "stgs" and s["RuntimeDirectory"] == "stgs"
    # unprivileged: the MIG changes that need root are stgs-mig.service's (test_systemd_unit
    # runs systemd-analyze on both)
    assert s["User"] == "stgs" and s["CapabilityBoundingSet"] == "" and "NoNewPrivileges" in s
    assert "WatchdogSec" in s and "DeviceAllow=/dev/nvidiactl" in text
    assert s["RestartPreventExitStatus"] == "2"  # a config or state error is not retried
    # the example config fits that unit: the daemon never asks for a MIG change
    assert load_config(DEPLOY / "stgs.toml").backend.allow_mig_changes is False
    assert DaemonConfig().backend.allow_mig_changes is True  # the default (a root daemon)


def test_sd_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1\nSTATUS=serving")
        assert srv.recv(100) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd_notify("WATCHDOG=1") is False  # logged, never raised


def test_systemd_status_follows_what_is_served(tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET) the daemon says READY=1, then keeps STATUS up to date as
    models come and go (it once kept "serving 0 model(s)" after a model was added)."""
    import socket
    import time

    from api.launch import ONE_SIMULATED_GPU, LocalDaemon

    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(1.0)
        d = LocalDaemon(tmp_path / "d", ONE_SIMULATED_GPU, server_options="frontends = 1\n")
        got: list[str] = []

        def until(text: str, timeout_s: float = 60.0, since: int = 0) -> None:
            """Wait for a message with ``text`` among those from index ``since`` on."""
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                if any(text in m for m in got[since:]):
                    return
                try:
                    got.append(srv.recv(4096).decode())
                except TimeoutError:
                    continue
            raise AssertionError(f"no {text!r} in {got}")

        try:
            d.start(env={"NOTIFY_SOCKET": str(path)})
            until("READY=1")
            until("STATUS=serving 0 of 0 registered model(s)")
            d.register("tiny_mlp", 500, 5)
            until("STATUS=serving 1 of 1 registered model(s)")
            n = len(got)
            with d.client() as c:
                assert c.delete("/v1/models/tiny_mlp").status_code in (200, 204)
            until("STATUS=serving 0 of 0 registered model(s)", 30, since=n)
        finally:
            d.stop()


def test_json_logs_and_the_access_log(tmp_path: Path) -> None:
    """``server.log_format = "json"``: every line the daemon and its frontends write is one JSON
    object (time, level, logger, process, message); ``access_log`` logs each request."""
    import json

    import httpx

    from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

    d = LocalDaemon(
        tmp_path,
        ONE_SIMULATED_GPU,
        server_options='frontends = 1\nlog_format = "json"\naccess_log = true\n',
    )
    try:
        p = d.start_ready()
        for _ in range(3):
            assert httpx.get(f"{d.url}/v2/health/live").status_code == 200

        def logged() -> bool:
            return "/v2/health/live" in d.log_path.read_text(errors="replace")

        wait_until("the access log line", logged, 10, p)
    finally:
        d.stop()
    lines = [ln for ln in d.log_path.read_text(errors="replace").splitlines() if ln.strip()]
    objs = [json.loads(ln) for ln in lines]  # every line parses
    assert all({"time", "level", "logger", "process", "message"} <= o.keys() for o in objs)
    assert {o["process"] for o in objs} >= {"daemon", "frontend 0"}
    assert any("/v2/health/live" in o["message"] for o in objs)


def test_every_event_is_logged_once_with_its_reason(tmp_path: Path) -> None:
    """Registrations, plans, transitions and faults reach the daemon's log once each, with the
    reason its event holds (``GET /v1/events``): a registration, a worker killed with SIGKILL
    (failed, restarted), a deletion."""
    import json
    import os
    import signal

    from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

    d = LocalDaemon(tmp_path, ONE_SIMULATED_GPU, server_options='log_format = "json"\n')
    try:
        p = d.start_ready()
        d.register("tiny_mlp", 5000, 5, 300)
        with d.client() as c:
            part = c.get("/v1/plan").json()["partitions"][0]
            os.kill(int(part["pid"]), signal.SIGKILL)

            def restarted() -> bool:
                kinds = [e["kind"] for e in c.get("/v1/events", params={"limit": 500}).json()]
                return "worker_failed" in kinds and "worker_restarted" in kinds

            wait_until("the worker restarted", restarted, 60, p)
            assert c.delete("/v1/models/tiny_mlp").status_code in (200, 202, 204)
            wait_until(
                "the deletion applied",
                lambda: c.get("/v1/events", params={"limit": 1}).json()[0]["kind"] == "apply",
                60,
                p,
            )
            events = c.get("/v1/events", params={"limit": 500}).json()
    finally:
        d.stop()
    lines = [json.loads(ln) for ln in d.log_path.read_text().splitlines() if ln.strip()]
    logged = [(o["level"], o["message"]) for o in lines if o["logger"] == "api.events"]
    kinds = {e["kind"] for e in events}
    assert {"register", "apply", "worker_failed", "worker_restarted", "delete"} <= kinds, kinds
    for e in events:
        text = f"{e['kind']}: {e['message']}"
        got = [level for level, msg in logged if msg == text]
        assert len(got) == 1, (text, got)  # once, with its reason
        assert got[0] == ("WARNING" if e["kind"].endswith("_failed") else "INFO"), (text, got)
    # the runtime does not log the fault a second time beside its event
    assert not any("failed" in o["message"] and o["logger"] != "api.events" for o in lines)


def test_frontend_trace_is_written_at_a_clean_stop(tmp_path: Path) -> None:
    """``STGS_FRONTEND_TRACE=DIR``: each frontend writes its requests' times when the daemon
    stops it (SIGTERM, which uvicorn re-raises once done: the file is written before that)."""
    import httpx
    import numpy as np

    from api.frontend import FRONTEND_TRACE, FRONTEND_TRACE_ENV
    from api.launch import ONE_SIMULATED_GPU, LocalDaemon

    d = LocalDaemon(tmp_path / "d", ONE_SIMULATED_GPU, server_options="frontends = 1\n")
    try:
        d.start_ready(env={FRONTEND_TRACE_ENV: str(tmp_path / "trace")})
        for _ in range(3):
            assert httpx.post(f"{d.url}/v2/models/nosuch/infer", content=b"{}").status_code == 404
    finally:
        d.stop()
    files = list((tmp_path / "trace").glob("frontend-*.npz"))
    assert len(files) == 1, files
    with np.load(files[0]) as z:
        rows = z["requests"]
    col = {c: k for k, c in enumerate(FRONTEND_TRACE)}
    assert rows.shape == (3, len(FRONTEND_TRACE))
    assert (rows[:, col["status"]] == 404).all()
    assert (rows[:, col["t_arrival"]] <= rows[:, col["t_body"]]).all()
    assert (rows[:, col["t_body"]] <= rows[:, col["t_written"]]).all()
