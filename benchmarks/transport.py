"""Added latency per request of the daemon <-> worker transport (target: < 0.3 ms p50).

    .venv/bin/python -m benchmarks.transport [--n 3000]

A worker process on the simulated node serves the ``echo`` model (no compute), so the round
trip is all transport: framing, one ``sendmsg`` of header and raw array buffer, the worker's
reader thread, its duty-cycle loop, the reply, and the daemon's reader thread resolving the
future. Measured one request at a time (latency), through the bare transport and through
``Runtime.submit`` (routing included), then with 32 requests in flight (throughput).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import Future
from typing import Any

import numpy as np

from stgs.backend import DeviceRef, SimulatedNode
from stgs.plan import GpuPlan, ModelAssignment, Partition, Plan
from stgs.runtime import Runtime
from stgs.runtime.process import WorkerProcess
from stgs.runtime.worker import ModelSlot, WorkerSpec

PAYLOADS = {
    "256 B (64 x f32)": np.ones(64, np.float32),
    "150 KB (3x112x112 f32)": np.ones((3, 112, 112), np.float32),
    "602 KB (3x224x224 f32)": np.ones((3, 224, 224), np.float32),
}


def _lat(submit: Any, x: np.ndarray, n: int) -> np.ndarray:
    for _ in range(min(200, n)):  # warm up
        submit("echo", x).result(10)
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        submit("echo", x).result(10)
        out[i] = time.perf_counter() - t0
    return out * 1e6


def _throughput(submit: Any, x: np.ndarray, n: int, depth: int = 32) -> float:
    t0 = time.perf_counter()
    inflight: list[Future[Any]] = []
    for _ in range(n):
        inflight.append(submit("echo", x))
        if len(inflight) >= depth:
            inflight.pop(0).result(10)
    for f in inflight:
        f.result(10)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per measurement")
    args = ap.parse_args()
    node = SimulatedNode("L4")
    rows = []
    try:
        w = WorkerProcess(node, DeviceRef(0), None, WorkerSpec("bench", (ModelSlot("echo", 8),)))
        if not w.wait_ready(30):
            raise SystemExit(f"worker did not start: {w.exit_reason()}")
        for label, x in PAYLOADS.items():
            lat = _lat(w.transport.submit, x, args.n)
            tput = _throughput(w.transport.submit, x, args.n)
            rows.append(("transport", label, lat, tput))
        w.stop()
        rt = Runtime(node)
        part = Partition("full", 58, 1000.0, 1.0, (ModelAssignment("echo", 8, 100.0, 0.1),))
        rt.apply(Plan("bench", True, (GpuPlan(0, "L4", False, (part,)),)))
        try:
            x = PAYLOADS["256 B (64 x f32)"]
            rows.append(
                (
                    "Runtime.submit",
                    "256 B (64 x f32)",
                    _lat(rt.submit, x, args.n),
                    _throughput(rt.submit, x, args.n),
                )
            )
        finally:
            rt.close()
    finally:
        node.close()
    print(
        f"{'path':<16} {'payload':<24} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'req/s @32':>10}"
    )
    for path, label, lat, tput in rows:
        p50, p90, p99 = np.percentile(lat, [50, 90, 99])
        print(f"{path:<16} {label:<24} {p50:8.1f} {p90:8.1f} {p99:8.1f} {tput:10.0f}")


if __name__ == "__main__":
    main()
