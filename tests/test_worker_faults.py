"""Worker faults through the front door: the real daemon (``stgs serve``) on the simulated node,
its CPU worker killed (SIGKILL) or stopped (SIGSTOP) under load from a client in its own thread.

What must hold (issue 13): the supervisor notices a dead worker within a second and a hung one
within twice its slowest batch plus a second; the partition shows as failed and is restarted;
requests in flight and in the gap are answered at once with 503 (never 500, never a hang past
SLO + grace); ``/v2/health/live`` keeps answering; the event log and the metrics say what
happened.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from api.inference import ANSWER_GRACE_S
from api.kserve import binary_request
from api.launch import ONE_SIMULATED_GPU, LocalDaemon, wait_until

pytestmark = pytest.mark.slow

SLO_MS = 250.0
SECTIONS = ONE_SIMULATED_GPU + "[workers]\nhang_grace_s = 0.8\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDaemon]:
    d = LocalDaemon(tmp_path_factory.mktemp("faults"), SECTIONS)
    try:
        d.start_serving("tiny_mlp", SLO_MS, 20)
        yield d
    finally:
        d.stop()
        if os.environ.get("STGS_E2E_LOG"):
            print(d.log_path.read_text(errors="replace"))


def _partitions(c: httpx.Client) -> list[dict[str, Any]]:
    return list(c.get("/v1/plan").json()["partitions"])


def _ready_partition(c: httpx.Client) -> dict[str, Any] | None:
    parts = _partitions(c)
    return parts[0] if parts and parts[0]["state"] == "ready" else None


@dataclass
class Load:
    """A closed-loop client in its own thread: (sent, seconds, status) per request."""

    url: str
    results: list[tuple[float, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body, headers = binary_request(np.ones((1, 64), np.float32))
        with httpx.Client(base_url=self.url, timeout=30.0) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    status = c.post("/v2/models/tiny_mlp/infer", content=body, headers=headers)
                    code = status.status_code
                except httpx.HTTPError:
                    code = -1
                self.results.append((t0, time.monotonic() - t0, code))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._t = threading.Thread(target=self.run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._t.join(10)


def _timed_infer(c: httpx.Client) -> tuple[float, float, int]:
    body, headers = binary_request(np.ones((1, 64), np.float32))
    t0 = time.monotonic()
    r = c.post("/v2/models/tiny_mlp/infer", content=body, headers=headers)
    return t0, time.monotonic() - t0, r.status_code


def _wait_state(c: httpx.Client, pid: int, timeout_s: float) -> float:
    """Seconds until the partition that ran ``pid`` is no longer ready with it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        parts = _partitions(c)
        if not parts or parts[0]["pid"] != pid or parts[0]["state"] != "ready":
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"worker {pid}'s fault not noticed in {timeout_s} s")


def _check_answers(results: list[tuple[float, float, int]], since: float) -> None:
    after = [r for r in results if r[0] >= since - 1.0]
    assert after, "the load generator sent nothing"
    codes = {code for _, _, code in after}
    assert codes <= {200, 429, 503}, codes  # never a 500 or a dropped connection
    slowest = max(secs for _, secs, _ in after)
    assert slowest <= SLO_MS / 1e3 + ANSWER_GRACE_S + 0.5, slowest


def test_sigkill_worker_is_noticed_restarted_and_gap_answers_503(served: LocalDaemon) -> None:
    with served.client() as c:
        for round_ in range(2):
            part = _ready_partition(c)
            assert part is not None
            pid, restarts = int(part["pid"]), int(part["restarts"])
            with Load(served.url) as load:
                time.sleep(0.3)
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                noticed = _wait_state(c, pid, 5.0)
                gap = c.get("/v2/models/tiny_mlp/ready")
                wait_until("serving again", lambda: _ready_partition(c), 30, served.procs[-1])
                back = time.monotonic() - t_kill
                time.sleep(0.3)
            assert noticed < 1.0, noticed
            assert gap.status_code in (200, 400)  # 400 while no worker is ready
            part = _ready_partition(c)
            assert part is not None and part["pid"] != pid
            assert part["restarts"] == restarts + 1, (round_, part)
            _check_answers(load.results, t_kill)
            gap_codes = [code for t, _, code in load.results if t_kill <= t < t_kill + back]
            assert 503 in gap_codes or not gap_codes
            assert load.results[-1][2] == 200  # serving again
        events = c.get("/v1/events", params={"kind": "worker_failed"}).json()
        assert len(events) >= 2 and "signal 9" in events[0]["message"]
        assert c.get("/v1/events", params={"kind": "worker_restarted"}).json()
        metrics = c.get("/metrics").text
        assert "stgs_worker_failures_total 2.0" in metrics


def test_sigstop_worker_is_detected_killed_restarted_and_live_answers(
    served: LocalDaemon,
) -> None:
    with served.client() as c:
        part = _ready_partition(c)
        assert part is not None
        pid = int(part["pid"])
        lives: list[float] = []
        stop = threading.Event()

        def probe_live() -> None:
            with httpx.Client(base_url=served.url, timeout=10.0) as lc:
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert lc.get("/v2/health/live").status_code == 200
                    lives.append(time.monotonic() - t0)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe_live, daemon=True)
        prober.start()
        try:
            many = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            with (
                Load(served.url) as load,
                ThreadPoolExecutor(60) as pool,
                httpx.Client(base_url=served.url, timeout=30.0, limits=many) as bc,
            ):
                time.sleep(0.3)
                t_stop = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                # 60 requests at once to the stopped worker: before, each held one of the 40
                # thread-pool threads for 30 s and health checks queued behind them
                burst = list(pool.map(lambda _: _timed_infer(bc), range(60)))
                noticed = _wait_state(c, pid, 10.0)
                wait_until("serving again", lambda: _ready_partition(c), 30, served.procs[-1])
                time.sleep(0.3)
        finally:
            stop.set()
            prober.join(10)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        # tiny_mlp's batches take well under 50 ms: 2 x slowest + grace (0.8) + polling
        assert noticed < 2 * 0.05 + 1.0, noticed
        _check_answers(load.results, t_stop)
        _check_answers(burst, t_stop)
        assert max(lives) < 0.5, max(lives)
        events = c.get("/v1/events", params={"kind": "worker_failed"}).json()
        assert "hung" in events[0]["message"], events[0]
