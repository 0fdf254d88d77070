"""What planning costs the serving daemon: inference latency while a slow plan runs, and the
time of small previews (the per-call overhead of planning in a planner process).

    python -m benchmarks.plan_isolation [--gpus 32] [--budget-s 3] [--no-budget]

Starts ``stgs serve`` on a simulated node of ``--gpus`` H100s (CPU workers), with ``echo``
profiled by a synthetic CSV, registers ``echo`` at 50 request/s and measures sequential
KServe v2 inference latency (p50, p99) idle, then while a preview at half the node's bound
plans (tens of seconds unbounded; abandoned after the budget). ``--no-budget`` leaves
``planner.time_budget_s`` out of the config, to run the same flow on a tree without it (run
there with ``PYTHONPATH`` pointing at that tree). docs/operations.md "Planner limits" quotes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from api.launch import LocalDaemon, wait_until
from stgs.catalog import get_sku
from stgs.profiles import ProfileRow, write_profiles

BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _latencies_ms(c: httpx.Client, until: threading.Event | None, n: int) -> list[float]:
    """Sequential inference: ``n`` requests, or as many as run until ``until`` is set."""
    out: list[float] = []
    while (until is None and len(out) < n) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        r = c.post("/v2/models/echo/infer", json=BODY)
        r.raise_for_status()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _summary(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=3.0)
    ap.add_argument("--no-budget", action="store_true", help="a tree without time_budget_s")
    args = ap.parse_args()
    sms = get_sku("H100-80GB").sm_count
    rows = [
        ProfileRow("H100-80GB", "echo", "full", sms, b, 0.5 + 0.05 * b, 10.0) for b in (1, 2, 4, 8)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_profiles(rows, work / "profiles.csv")
        budget = "" if args.no_budget else f"time_budget_s = {args.budget_s}\n"
        d = LocalDaemon(
            work,
            '[backend]\nkind = "simulated"\n'
            f'simulated_gpus = [{{ sku = "H100-80GB", count = {args.gpus} }}]\n'
            f'[planner]\nprofiles = "profiles.csv"\n{budget}'
            "[controller]\ninterval_s = 600\n",
        )
        proc = d.start()
        try:
            with d.client(timeout_s=600.0) as c:
                wait_until("the daemon", lambda: c.get("/v1/status").status_code == 200, 60, proc)
                r = c.post("/v1/models", json={"name": "echo", "slo_ms": 100, "rate_rps": 50})
                r.raise_for_status()
                _latencies_ms(c, None, 50)  # warm up
                out: dict[str, Any] = {"idle": _summary(_latencies_ms(c, None, 300))}
                small = []
                for i in range(10):
                    t0 = time.perf_counter()
                    c.post("/v1/plan/preview", json={"rates": {"echo": 50 + i}}).raise_for_status()
                    small.append((time.perf_counter() - t0) * 1000.0)
                out["small_preview_ms"] = round(statistics.median(small), 1)
                # half of the fluid bound (8080.8 request/s per GPU for this profile)
                rate = 0.5 * 8080.8 * args.gpus
                done = threading.Event()
                res: dict[str, Any] = {}

                def slow() -> None:
                    t0 = time.perf_counter()
                    with d.client(timeout_s=600.0) as c2:
                        r = c2.post("/v1/plan/preview", json={"rates": {"echo": rate}})
                    res["status"], res["secs"] = r.status_code, time.perf_counter() - t0
                    done.set()

                t = threading.Thread(target=slow)
                t.start()
                out["while_planning"] = _summary(_latencies_ms(c, done, 0))
                t.join()
                out["slow_preview"] = {"status": res["status"], "secs": round(res["secs"], 2)}
            print(out)
        finally:
            d.stop()


if __name__ == "__main__":
    main()
